"""Know when a series is complete: hooks, manifests, events and metrics (issue #12).

* :mod:`~scp.events.pipeline`: the server's pipeline (dispatcher and completion watcher);
* :mod:`~scp.events.hooks`: hook commands, bounded concurrency, timeouts;
* :mod:`~scp.events.manifest`: series/study manifests, written atomically;
* :mod:`~scp.events.sinks`: the JSON-lines event file and the webhook;
* :mod:`~scp.events.metrics`: Prometheus metrics;
* :mod:`~scp.events.listing`: ``sortscp ls``.

Imports :mod:`scp.store.index`, the standard library and ``prometheus_client``;
never pynetdicom nor :mod:`scp.net` (the handlers call in, not the reverse).
"""

"""Prometheus metrics of one server (``--metrics-port``), in a registry of its own.

Every update is a few hundred nanoseconds (a lock and an add), so the
handler updates counters inline; serving them is ``prometheus_client``'s own
HTTP thread. A registry per server (not the global one) lets several servers
run in one process (the tests do).

Calling AE titles are chosen by the peer: after :data:`MAX_AET_LABELS`
distinct titles, the rest are counted under ``calling_aet="other"`` so a
hostile sender cannot grow the metrics without bound.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

#: Seconds a connection to the metrics endpoint may be idle or slow before it is closed.
METRICS_TIMEOUT = 10.0
#: Connections to the metrics endpoint served at once; more are closed at once.
METRICS_CONNECTIONS = 16


class _MetricsHandler(WSGIRequestHandler):
    timeout = METRICS_TIMEOUT  # (the socket's: a client that sends nothing is dropped)

    def log_message(self, *args: Any) -> None:  # a scrape is not worth a line
        pass


class _MetricsServer(ThreadingWSGIServer):
    """``prometheus_client``'s threaded server, bounded: its own
    ``start_http_server`` gives every connection a thread for as long as the
    client keeps it open, so idle connections took the descriptors the DICOM
    side needs (a thousand of them stopped all associations)."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: the scraper tries again
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out or went away: nothing to report

log = logging.getLogger(__name__)

#: Distinct calling AE title label values kept; the rest become "other".
MAX_AET_LABELS = 100
#: Store latency buckets (seconds): receipt of the dataset to the response.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The counters, gauges and histogram; :meth:`serve` exposes them over HTTP.

    Examples
    --------
    >>> m = Metrics(Path("."))
    >>> m.stored("CT1", 100, 0.01); m.failed("CT1", 0xA700, 0.02)
    >>> m.registry.get_sample_value("sortscp_instances_stored_total", {"calling_aet": "CT1"})
    1.0
    >>> m.registry.get_sample_value("sortscp_instances_failed_total", {"calling_aet": "CT1", "status": "0xA700"})
    1.0
    """

    def __init__(self, out: Path) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._aets: set[str] = set()
        self._lock = threading.Lock()
        self.instances_stored = Counter(
            "sortscp_instances_stored", "Instances stored (answered Success).", ["calling_aet"], registry=r)
        self.instances_failed = Counter(
            "sortscp_instances_failed", "Instances answered with a failure status.", ["calling_aet", "status"],
            registry=r)
        self.bytes_stored = Counter(
            "sortscp_stored_bytes", "Dataset bytes of the instances stored.", ["calling_aet"], registry=r)
        self.associations_active = Gauge("sortscp_associations_active", "Associations open now.", registry=r)
        self.associations = Counter("sortscp_associations", "Associations established.", registry=r)
        self.store_seconds = Histogram(
            "sortscp_store_seconds", "Seconds from the received dataset to the C-STORE response.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.series_completed = Counter("sortscp_series_completed", "Series completions (each revision).",
                                        registry=r)
        self.studies_completed = Counter("sortscp_studies_completed", "Study completions (each revision).",
                                         registry=r)
        self.hook_runs = Counter("sortscp_hook_runs", "Hook processes run.", ["hook"], registry=r)
        self.hook_failures = Counter(
            "sortscp_hook_failures", "Hook runs that failed (non-zero exit, timeout, cannot start).", ["hook"],
            registry=r)
        self.hook_dropped = Counter("sortscp_hook_dropped", "Hook runs dropped (queue full, or stopping).",
                                    ["hook"], registry=r)
        self.events_dropped = Counter("sortscp_events_dropped", "Stored events dropped (queue full).",
                                      registry=r)
        self.webhook_posts = Counter("sortscp_webhook_posts", "Events POSTed to the webhook.", registry=r)
        self.webhook_dropped = Counter(
            "sortscp_webhook_dropped", "Events the webhook never got (queue full, retries exhausted, stopping).",
            registry=r)
        free = Gauge("sortscp_output_free_bytes", "Free bytes of the output file system.", registry=r)
        free.set_function(lambda: _free_bytes(out))
        self._http: Any = None

    def aet(self, calling_aet: str) -> str:
        """The label value for `calling_aet` (bounded, see the module docstring)."""
        if calling_aet in self._aets:
            return calling_aet
        with self._lock:
            if len(self._aets) < MAX_AET_LABELS:
                self._aets.add(calling_aet)
                return calling_aet
        return "other"

    def stored(self, calling_aet: str, nbytes: int, seconds: float | None) -> None:
        label = self.aet(calling_aet)
        self.instances_stored.labels(label).inc()
        self.bytes_stored.labels(label).inc(nbytes)
        if seconds is not None:
            self.store_seconds.observe(seconds)

    def failed(self, calling_aet: str, status: int, seconds: float | None) -> None:
        self.instances_failed.labels(self.aet(calling_aet), f"0x{status:04X}").inc()
        if seconds is not None:
            self.store_seconds.observe(seconds)

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` on `host`:`port` (0: any free port); returns the address."""
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("_Server", (_MetricsServer,), {"address_family": family})
        httpd: Any = make_server(host, port, make_wsgi_app(self.registry), server_class, _MetricsHandler)
        threading.Thread(target=httpd.serve_forever, name="sortscp-metrics", daemon=True).start()
        self._http = httpd
        return str(httpd.server_address[0]), int(httpd.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _free_bytes(out: Path) -> float:
    try:
        return float(shutil.disk_usage(out).free)
    except OSError:
        return float("nan")

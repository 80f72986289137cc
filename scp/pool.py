"""The worker process pool, shared by ``serve`` and ``sort``.

Workers come from a *forkserver* context: the server is threaded, and forking
a threaded process can copy a held lock into the child. A worker that dies
breaks a :class:`~concurrent.futures.ProcessPoolExecutor` for good, so
:class:`WorkerPool` rebuilds it; the jobs that were in flight fail (and are
answered with a failure status), later jobs run on the new pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

log = logging.getLogger(__name__)


def _init_worker() -> None:
    # Ctrl-C and SIGTERM are the parent's to handle: it drains, then closes us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["scp.jobs"])
    return ctx


class WorkerPool:
    """A process pool that replaces itself when a worker dies."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._lock = threading.Lock()
        self._executor = self._new_executor()
        self._closed = False

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=_context(), initializer=_init_worker
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Submit `fn(*args)`; rebuild the pool first if a worker died."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            try:
                return self._executor.submit(fn, *args)
            except BrokenProcessPool:
                log.error("a worker process died; starting a new worker pool")
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new_executor()
                return self._executor.submit(fn, *args)

    def warm_up(self) -> None:
        """Start every worker now, so the first instance does not wait for one."""
        futures = [self.submit(_ping) for _ in range(self.workers)]
        for f in futures:
            f.result()

    def close(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            self._executor.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=exc[0] is None)


def _ping() -> None:
    return None

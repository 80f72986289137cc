"""The worker process pool, shared by ``serve`` and ``sort``.

Workers come from a *forkserver* context: the server is threaded, and forking
a threaded process can copy a held lock into the child. ``sort`` asks for
*fork* (``fork=True``): it has imported everything its workers need, so they
start at once instead of importing pydicom again; the pool then forks only
while the process has a single thread (its workers are started at once, see
:class:`WorkerPool`), else it uses the forkserver too. A worker that dies
breaks a :class:`~concurrent.futures.ProcessPoolExecutor` for good, so
:class:`WorkerPool` rebuilds it; the jobs that were in flight fail (and are
answered with a failure status), later jobs run on the new pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from scp._process import pid_alive

log = logging.getLogger(__name__)


#: How often a worker checks that its parent lives, where it cannot be told.
PARENT_POLL_SECONDS = 1.0


def _init_worker(parent: int | None = None) -> None:
    # Ctrl-C and SIGTERM are the parent's to handle: it drains, then closes us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    """Exit as soon as `parent` does (e.g. killed with SIGKILL).

    A worker's own parent is the forkserver, which lives as long as any worker
    does, so neither would ever notice that the process that started them is gone.
    """
    try:
        fd = os.pidfd_open(parent)
    except (AttributeError, OSError):  # not Linux >= 5.3, or already gone
        fd = None
    if fd is not None:
        select.select([fd], [], [])  # readable once `parent` has exited
    else:
        while pid_alive(parent):
            time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _context(fork: bool = False) -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    if fork and "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["scp.jobs"])
    return ctx


def start_early() -> None:
    """Start the forkserver now, without waiting for it: it imports the workers'
    modules (pydicom: a good part of a short run's time) while this process
    imports its own, on another core. The pool forks its workers from it later."""
    ctx = _context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class WorkerPool:
    """A process pool that replaces itself when a worker dies."""

    def __init__(self, workers: int, fork: bool = False) -> None:
        self.workers = max(1, workers)
        self._fork = fork
        self._lock = threading.Lock()
        self._executor = self._new_executor()
        self._closed = False

    def _new_executor(self) -> ProcessPoolExecutor:
        ctx = _context(self._fork)
        executor = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=ctx, initializer=_init_worker,
            initargs=(os.getpid(),),
        )
        if ctx.get_start_method() == "fork":  # every worker now, while we have one thread
            for f in [executor.submit(_ping) for _ in range(self.workers)]:
                f.result()
        return executor

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Submit `fn(*args)`; rebuild the pool first if a worker died."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            try:
                return self._executor.submit(fn, *args)
            except BrokenProcessPool:
                self._rebuild()
                return self._executor.submit(fn, *args)

    def recover(self) -> None:
        """After a worker died: wait until every process of the broken pool has
        exited (the others are terminated), then start a new pool. Once this
        returns, no process of the old pool writes anything any more."""
        with self._lock:
            if getattr(self._executor, "_broken", False) and not self._closed:
                self._rebuild()

    def _rebuild(self) -> None:
        log.error("a worker process died; starting a new worker pool")
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = self._new_executor()

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

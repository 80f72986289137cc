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

:meth:`WorkerPool.run` gives a job a deadline (``serve --job-timeout``). Each
such job tells the parent when it starts, and in which process, so that

* a job that runs past its deadline is stopped by killing its worker (SIGKILL,
  which also ends a stopped or hung process), then the pool is rebuilt; the
  caller gets :class:`JobTimeout` only once that worker is dead, so a job that
  was answered "failed" can never finish later and file something;
* a job still waiting for a worker at its deadline never starts (the worker
  checks the deadline after announcing the start, so the parent either knows it
  started or knows it never will); if the pool made no progress for a whole
  deadline while a worker looked idle, that worker is hung, and the pool is
  rebuilt too.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from scp._process import pid_alive
from scp.enums import LogFormat
from scp.errors import StoreError
from scp.log import setup_worker_logging, worker_setup

log = logging.getLogger(__name__)


#: How often a worker checks that its parent lives, where it cannot be told.
PARENT_POLL_SECONDS = 1.0
#: How often a caller of :meth:`WorkerPool.run` looks at its job's deadline.
DEADLINE_POLL_SECONDS = 0.2
#: How long after a job's deadline the parent looks whether it started (for
#: the clock's sake only: the check itself is exact, see ``_Generation.drain``).
START_MARGIN_SECONDS = 0.5
#: How long a worker sent SIGTERM gets before SIGKILL when the pool closes.
TERMINATE_GRACE_SECONDS = 1.0
#: How long :meth:`WorkerPool.close` waits for a killed process to be gone.
KILL_WAIT_SECONDS = 5.0


class JobTimeout(StoreError):
    """A pool job did not finish within its deadline; its worker was killed."""


class PoolClosed(StoreError):
    """The pool was closed (the server is stopping) before a job could finish."""


class _Expired:
    """What a job returns that found its deadline passed before it started."""


#: The pipe end a worker announces the jobs it starts on (set by the initializer).
_started_pipe: Any = None


def _init_worker(parent: int | None = None, started: Any = None,
                 log_setup: tuple[str, LogFormat] | None = None) -> None:
    global _started_pipe
    if log_setup is not None:
        setup_worker_logging(log_setup)  # never Python's raw last-resort output
    # Ctrl-C and SIGTERM are the parent's to handle: it drains, then closes us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _started_pipe = started
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _run_job(job_id: int, start_by: float, fn: Callable[..., Any], *args: Any) -> Any:
    """Announce the start, then run `fn(*args)` unless `start_by` has passed.

    The announcement comes first: if this process is stopped after it, the
    parent knows the job runs (and kills us at the deadline); if before it,
    the job finds its deadline passed when it goes on, and does nothing.
    ``time.monotonic`` is one clock for every process of the machine (Linux).
    """
    if _started_pipe is not None:
        _started_pipe.send((job_id, os.getpid(), time.monotonic()))
    if time.monotonic() > start_by:
        return _Expired()
    return fn(*args)


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


@dataclass
class _Generation:
    """One executor and what its workers said about the jobs they started."""

    executor: ProcessPoolExecutor
    reader: Any  # the pipe end the workers announce starts on
    running: dict[int, tuple[int, float]] = field(default_factory=dict)  # job -> (pid, since)
    progress: float = field(default_factory=time.monotonic)  # last start or finish
    lock: threading.Lock = field(default_factory=threading.Lock)
    read_lock: threading.Lock = field(default_factory=threading.Lock)
    ended: threading.Event = field(default_factory=threading.Event)
    gone: set[int] = field(default_factory=set)  # finished before their start was read

    def listen(self) -> None:
        """Read start announcements until the generation ends.

        Each announcement is one write of a few bytes to a pipe, atomic on
        POSIX, so workers need no lock to share it and one killed while
        writing leaves nothing half-written behind.
        """
        while not self.ended.is_set():
            try:
                if self.reader.poll(DEADLINE_POLL_SECONDS):
                    self.drain()
            except Exception:  # noqa: BLE001 - closed or garbled: this generation is over
                return

    def drain(self) -> None:
        """Record every announcement already written. A caller that drains after
        its job's ``start_by`` and finds no announcement knows the job never
        starts: an announcement written later is checked against ``start_by``
        after it is written, by the same machine-wide clock."""
        with self.read_lock:
            while self.reader.poll(0):
                job_id, pid, since = self.reader.recv()
                with self.lock:
                    if job_id in self.gone:  # its caller is done with it already
                        self.gone.discard(job_id)
                    else:
                        self.running[job_id] = (pid, since)
                    self.progress = time.monotonic()

    def finished(self, job_id: int, may_announce: bool) -> None:
        """The caller of `job_id` is done with it (once per job)."""
        with self.lock:
            if self.running.pop(job_id, None) is None and may_announce:
                self.gone.add(job_id)  # its announcement is still on its way
            self.progress = time.monotonic()

    def processes(self) -> list[Any]:
        """The worker processes (``multiprocessing.Process``) of this executor."""
        procs = getattr(self.executor, "_processes", None) or {}
        return list(procs.values())

    def pids(self) -> set[int]:
        with self.lock:
            known = {pid for pid, _ in self.running.values()}
        return known | {p.pid for p in self.processes() if p.pid}


class WorkerPool:
    """A process pool that replaces itself when a worker dies or hangs."""

    def __init__(self, workers: int, fork: bool = False) -> None:
        self.workers = max(1, workers)
        self._fork = fork
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._log_setup = worker_setup()
        self._gen = self._new_generation()
        self._closed = False

    def _new_generation(self) -> _Generation:
        ctx = _context(self._fork)
        reader, writer = ctx.Pipe(duplex=False)
        executor = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=ctx, initializer=_init_worker,
            initargs=(os.getpid(), writer, self._log_setup),
        )
        if ctx.get_start_method() == "fork":  # every worker now, while we have one thread
            for f in [executor.submit(_ping) for _ in range(self.workers)]:
                f.result()
        gen = _Generation(executor, reader)
        threading.Thread(target=gen.listen, name="pool-starts", daemon=True).start()
        return gen

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Submit `fn(*args)`, without a deadline; rebuild the pool first if a worker died."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            try:
                return self._gen.executor.submit(fn, *args)
            except BrokenProcessPool:
                self._rebuild("a worker process died")
                return self._gen.executor.submit(fn, *args)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        """`fn(*args)` in a worker, within `timeout` seconds of running time.

        Raises :class:`JobTimeout` if it runs longer (its worker is killed and
        the pool rebuilt before this returns) or if no worker took it up in
        time (then it never runs), :class:`BrokenProcessPool` if a worker
        died, or what `fn` raised.
        """
        job_id = next(self._ids)
        submitted = time.monotonic()
        start_by = submitted + timeout
        with self._lock:
            if self._closed:
                raise PoolClosed("the server is stopping; it was not filed")
            try:
                gen = self._gen
                future = gen.executor.submit(_run_job, job_id, start_by, fn, *args)
            except BrokenProcessPool:
                self._rebuild("a worker process died")
                gen = self._gen
                future = gen.executor.submit(_run_job, job_id, start_by, fn, *args)
        try:
            result = self._wait(gen, future, job_id, submitted, timeout)
        except (BrokenProcessPool, CancelledError) as exc:
            if self._closed:
                raise PoolClosed("the server stopped before it was filed") from exc
            raise
        finally:
            future.cancel()  # one given up on before it reached a worker never will
            gen.finished(job_id, may_announce=not future.cancelled())
        if isinstance(result, _Expired):
            raise JobTimeout(f"no worker was free to take it up within {timeout:g} s")
        return result

    def _wait(self, gen: _Generation, future: Future, job_id: int, submitted: float,
              timeout: float) -> Any:
        while True:
            try:
                return future.result(DEADLINE_POLL_SECONDS)
            except FutureTimeout:
                pass
            now = time.monotonic()
            with gen.lock:
                running = gen.running.get(job_id)
                stalled = now - gen.progress > timeout
                busy = {pid for pid, _ in gen.running.values()}
            if running is not None:
                pid, since = running
                if now - since <= timeout:
                    continue
                self._replace(gen, f"a job ran past its {timeout:g} s deadline (worker {pid})")
                why = f"not finished within {timeout:g} s; its worker was killed and replaced"
            elif now - submitted > timeout + START_MARGIN_SECONDS:
                try:
                    gen.drain()  # the last word on whether it started
                    known = True
                except Exception:  # noqa: BLE001 - the pipe broke: cannot tell, so kill
                    known = False
                with gen.lock:
                    if job_id in gen.running:
                        continue
                    stalled = time.monotonic() - gen.progress > timeout
                    busy = {pid for pid, _ in gen.running.values()}
                if known and not (stalled and gen.pids() - busy):
                    # Queued behind busy workers: it will find its deadline passed.
                    raise JobTimeout(f"no worker was free to take it up within {timeout:g} s")
                # An idle-looking worker took nothing for a whole deadline: it hangs.
                self._replace(gen, f"no worker took up a job for {timeout:g} s")
                why = f"no worker took it up within {timeout:g} s; the hung workers were replaced"
            else:
                continue
            if future.done() and not future.exception():  # finished just in time
                return future.result()
            raise JobTimeout(why)

    def _replace(self, gen: _Generation, why: str) -> None:
        """Kill every worker of `gen` (a hung one among them) and start a new pool,
        unless another caller already did."""
        with self._lock:
            if self._gen is gen and not self._closed:
                self._rebuild(why)

    def recover(self) -> None:
        """After a worker died: wait until every process of the broken pool has
        exited (the others are killed), then start a new pool. Once this
        returns, no process of the old pool writes anything any more."""
        with self._lock:
            if getattr(self._gen.executor, "_broken", False) and not self._closed:
                self._rebuild("a worker process died")

    def _rebuild(self, why: str) -> None:
        log.error("%s; starting a new worker pool", why)
        self._end(self._gen, grace=0.0)
        self._gen = self._new_generation()

    def _end(self, gen: _Generation, grace: float) -> None:
        """Stop `gen`'s workers: let them exit for `grace` seconds, then SIGTERM,
        then SIGKILL (a stopped process only acts on SIGKILL); return once they
        are gone (or after a bounded wait)."""
        procs = gen.processes()
        gen.executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        if alive and grace > 0:
            for p in alive:
                p.terminate()
            deadline = time.monotonic() + TERMINATE_GRACE_SECONDS
            for p in alive:
                p.join(max(0.0, deadline - time.monotonic()))
            alive = [p for p in alive if p.is_alive()]
        for p in alive:
            p.kill()
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
        stuck = [p.pid for p in alive if p.is_alive()]
        if stuck:  # e.g. blocked in the kernel on a hung network file system
            log.error("worker process(es) %s did not exit after SIGKILL; going on without them",
                      ", ".join(map(str, stuck)))
        gen.ended.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def warm_up(self) -> None:
        """Start every worker now, so the first instance does not wait for one."""
        futures = [self.submit(_ping) for _ in range(self.workers)]
        for f in futures:
            f.result()

    def close(self, wait: bool = True, grace: float | None = None) -> None:
        """Close the pool. ``wait``: let queued jobs run. With ``grace``, queued
        jobs are cancelled and running ones get `grace` seconds before their
        workers are terminated, then killed: this returns within about
        ``grace + 7`` s whatever the workers do."""
        with self._lock:
            self._closed = True
            gen = self._gen
        if grace is None:
            gen.executor.shutdown(wait=wait, cancel_futures=not wait)
            gen.ended.set()
            return
        self._end(gen, grace)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=exc[0] is None)


def _ping() -> None:
    return None

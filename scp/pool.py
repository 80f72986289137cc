"""The worker process pool, shared by ``serve`` and ``sort``.

Each worker is a process with a pipe of its own to the parent. A caller takes
an idle worker, sends it one job, and waits on that pipe for the answer: one
write and one read per job, no queue or helper thread in between (on the serve
path, where a sender waits for every answer, the thread hops of
:class:`~concurrent.futures.ProcessPoolExecutor` cost more than the commit).

Workers come from a *forkserver* context: the server is threaded, and forking
a threaded process can copy a held lock into the child. ``sort`` asks for
*fork* (``fork=True``): it has imported everything its workers need, so they
start at once instead of importing pydicom again; the pool then forks only
while the process has a single thread (its workers are started at once), else
it uses the forkserver too.

A job knows where it runs, so the deadlines of :meth:`WorkerPool.run`
(``serve --job-timeout``) are exact:

* a job that runs past its deadline is stopped by killing its worker (SIGKILL,
  which also ends a stopped or hung process); the caller gets
  :class:`JobTimeout` only once that worker is dead, so a job that was
  answered "failed" can never finish later and file something;
* a job still waiting for a free worker at its deadline is never sent to one;
* a worker that dies fails the one job it had (:class:`BrokenProcessPool`);
  it is replaced, the other workers go on. A worker found dead before it was
  sent anything is replaced and the job goes to another.
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
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from scp._process import pid_alive
from scp.enums import LogFormat
from scp.errors import StoreError
from scp.log import setup_worker_logging, worker_setup

log = logging.getLogger(__name__)


#: How often a worker checks that its parent lives, where it cannot be told.
PARENT_POLL_SECONDS = 1.0
#: How long the pool waits for a killed process to be gone.
KILL_WAIT_SECONDS = 5.0
#: How long a worker asked to exit (the pool closes) gets before SIGKILL.
EXIT_WAIT_SECONDS = 5.0


class JobTimeout(StoreError):
    """A pool job did not finish within its deadline; its worker was killed."""


class PoolClosed(StoreError):
    """The pool was closed (the server is stopping) before a job could finish."""


def _init_worker(parent: int | None = None, log_setup: tuple[str, LogFormat] | None = None) -> None:
    if log_setup is not None:
        setup_worker_logging(log_setup)  # never Python's raw last-resort output
    # Ctrl-C, a hang-up and SIGTERM are the parent's to handle: it drains, then
    # closes us. A terminal sends the first two to its whole process group, and
    # systemd (KillMode=control-group) SIGTERM to every process of the service:
    # a worker that died of it would fail the instances the drain is finishing.
    # The pool stops a worker by its pipe, else with SIGKILL.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _worker_main(conn: Any, parent: int, log_setup: tuple[str, LogFormat]) -> None:
    """A worker's life: run each ``(fn, args)`` received, send back
    ``(True, result)`` or ``(False, exception)``; exit on ``None`` or when the
    parent's end closes."""
    _init_worker(parent, log_setup)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, args = job
        try:
            answer: tuple[bool, Any] = (True, fn(*args))
        except Exception as exc:  # noqa: BLE001 - the caller's to handle
            answer = (False, exc)
        try:
            conn.send(answer)
        except (EOFError, OSError):
            return
        except Exception as exc:  # noqa: BLE001 - an answer that does not pickle
            conn.send((False, RuntimeError(f"the job's answer cannot be sent: {exc!r}")))


def _exit_with(parent: int) -> None:
    """Exit as soon as `parent` does (e.g. killed with SIGKILL).

    A worker's own parent is the forkserver, which lives as long as any worker
    does, so neither would ever notice that the process that started them is gone.
    """
    try:
        fd = os.pidfd_open(parent)
    except (AttributeError, OSError):  # not Linux >= 5.3, or already gone
        fd = None
    if fd is not None:  # readable once `parent` has exited (poll: any fd number, unlike select)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll()
    else:
        while pid_alive(parent):
            time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


#: What the forkserver imports for serve's workers, and for sort's (without pydicom).
#: A forkserver started early (:func:`start_early`) keeps what it imported then.
SERVE_JOBS = "scp.jobs"
SORT_JOBS = "scp.sort_jobs"


def _context(fork: bool = False, preload: str = SERVE_JOBS) -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    if fork and "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([preload])
    return ctx


def start_early(preload: str = SERVE_JOBS) -> None:
    """Start the forkserver now, without waiting for it: it imports the workers'
    modules (pydicom: a good part of a short run's time) while this process
    imports its own, on another core. The pool forks its workers from it later."""
    ctx = _context(preload=preload)
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()



class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, log_setup: tuple[str, LogFormat]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main, args=(child, os.getpid(), log_setup), name="sortscp-worker",
            daemon=True,
        )
        self.proc.start()
        child.close()

    @property
    def pid(self) -> int:
        return self.proc.pid or 0

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self, close: bool = True) -> None:
        """SIGKILL (a stopped process acts on nothing else); return once it is
        gone, or after a bounded wait (a process blocked in the kernel, e.g. on
        a hung network file system, dies only when that call returns).
        ``close``: close our end of its pipe too (only its caller may: another
        thread may be reading it)."""
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(KILL_WAIT_SECONDS)
        if self.proc.is_alive():
            log.error("worker process %s did not exit after SIGKILL; going on without it", self.pid)
        if close:
            self.conn.close()

    def stop(self, grace: float = EXIT_WAIT_SECONDS) -> None:
        """Ask the worker to exit; after `grace` seconds, SIGKILL (it ignores SIGTERM)."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(grace)
        self.kill()


class WorkerPool:
    """Worker processes, each replaced when it dies or runs past a deadline."""

    def __init__(self, workers: int, fork: bool = False, preload: str = SERVE_JOBS) -> None:
        self.workers = max(1, workers)
        self._fork = fork
        self._preload = preload
        self._log_setup = worker_setup()
        self._cond = threading.Condition()
        self._closed = False  # no new jobs
        self._stopping = False  # jobs waiting for a worker fail too
        self._waiting = 0  # callers waiting for a free worker
        self._all: set[_Worker] = set()
        self._idle: list[_Worker] = []
        self._threads: ThreadPoolExecutor | None = None  # for submit()
        ctx = _context(fork, preload)  # every worker now: with fork, while we have one thread
        for _ in range(self.workers):
            self._add(_Worker(ctx, self._log_setup))

    def _add(self, worker: _Worker) -> None:
        with self._cond:
            self._all.add(worker)
            self._idle.append(worker)
            self._cond.notify()

    def _replace(self, worker: _Worker, why: str, level: int = logging.ERROR) -> None:
        """`worker` is dead or must die: once it is gone, start another.
        (`level`: DEBUG where the job's own failure is logged, naming it.)"""
        worker.kill()
        with self._cond:
            self._all.discard(worker)
            closed = self._closed
        if not closed:
            log.log(level, "%s; starting a new worker process", why)
            self._add(_Worker(_context(self._fork, self._preload), self._log_setup))

    def _take(self, deadline: float | None, timeout: float | None) -> _Worker:
        with self._cond:
            if self._closed:
                raise PoolClosed("the server is stopping; it was not filed")
            self._waiting += 1
            try:
                while not self._idle:
                    if self._stopping:
                        raise PoolClosed("the server is stopping; it was not filed")
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise JobTimeout(f"no worker was free to take it up within {timeout:g} s")
                    self._cond.wait(left)
                if self._stopping:
                    raise PoolClosed("the server is stopping; it was not filed")
                return self._idle.pop()
            finally:
                self._waiting -= 1

    def _give_back(self, worker: _Worker) -> None:
        with self._cond:
            if not self._stopping:
                self._idle.append(worker)
                self._cond.notify_all()
                return
            self._all.discard(worker)
            self._cond.notify_all()
        worker.stop()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """`fn(*args)` in a worker, within `timeout` seconds of running time
        (None: no limit), after at most `timeout` seconds waiting for a free worker.

        Raises :class:`JobTimeout` if it runs longer (its worker is killed and
        replaced before this returns) or if no worker was free in time (then it
        never runs), :class:`BrokenProcessPool` if its worker died,
        :class:`PoolClosed` if the pool closed first, or what `fn` raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            worker = self._take(deadline, timeout)
            # Died while idle (its exit reported): it gets nothing, the job goes to another.
            # (A send alone would not tell: a dying worker's second thread holds the
            # socket's other end open for a moment after its main thread is gone.)
            if not worker.alive():
                self._replace(worker, f"worker process {worker.pid} died")
                continue
            try:
                worker.conn.send((fn, args))
            except (BrokenPipeError, ConnectionResetError):
                self._replace(worker, f"worker process {worker.pid} died")
                continue
            except BaseException:  # e.g. arguments that do not pickle: nothing was sent
                self._give_back(worker)
                raise
            break
        # Its running time counts from now: the wait for a free worker was bounded apart.
        try:
            # The job's failure is the caller's one log line (it says the worker was
            # replaced); the replacement itself is a DEBUG line here.
            if not worker.conn.poll(timeout):
                self._replace(worker, f"a job ran past its {timeout:g} s deadline (worker {worker.pid})",
                              logging.DEBUG)
                raise JobTimeout(f"not finished within {timeout:g} s; its worker was killed and replaced")
            answer = worker.conn.recv()
        except (EOFError, OSError):  # its end of the pipe closed: the worker died
            self._replace(worker, f"worker process {worker.pid} died", logging.DEBUG)
            if self._stopping:
                raise PoolClosed("the server stopped before it was filed") from None
            raise BrokenProcessPool("a worker process died while running a job") from None
        except JobTimeout:
            raise
        except Exception as exc:  # read whole, but it does not unpickle: the worker is fine
            self._give_back(worker)
            raise RuntimeError(f"the worker's answer cannot be read: {exc!r}") from exc
        ok, value = answer
        if not ok and getattr(value, "replace_worker", False):  # its state must not outlive the job
            self._replace(worker, f"worker process {worker.pid} is replaced: {value}")
            raise value
        self._give_back(worker)
        if not ok:
            raise value
        return value

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run `fn(*args)` in a worker without a deadline; a :class:`Future` of it.
        Jobs wait in order for a free worker; one not started yet can be cancelled."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            if self._threads is None:
                self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="pool")
            threads = self._threads
        return threads.submit(self.run, fn, *args)

    def recover(self) -> None:
        """Make sure every worker lives (a dead one is replaced as soon as it is
        seen; this looks at the idle ones too). Once this returns, no dead
        worker's process is left."""
        with self._cond:
            dead = [w for w in self._idle if not w.alive()]
            for w in dead:
                self._idle.remove(w)
        for w in dead:
            self._replace(w, f"worker process {w.pid} died")

    @property
    def closed(self) -> bool:
        return self._closed

    def warm_up(self) -> None:
        """Make sure every worker is up and answering, so the first instance
        does not wait for one (each is sent a no-op)."""
        with self._cond:
            workers = list(self._idle)
        for w in workers:
            w.conn.send((_ping, ()))
        for w in workers:
            w.conn.recv()

    def close(self, wait: bool = True, grace: float | None = None) -> None:
        """Close the pool. ``wait``: let running and waiting jobs finish first.
        With ``grace``, waiting jobs fail and running ones get `grace` seconds
        before their workers are terminated, then killed: this returns within
        about ``grace + 7`` s whatever the workers do."""
        with self._cond:
            self._closed = True
            threads = self._threads
        if threads is not None:
            threads.shutdown(wait=wait and grace is None, cancel_futures=not wait or grace is not None)
        limit = None if wait and grace is None else (grace or 0.0)
        end = None if limit is None else time.monotonic() + limit
        with self._cond:
            if end is not None:
                self._stopping = True  # waiting callers give up now
                self._cond.notify_all()
            while self._waiting or len(self._idle) < len(self._all):
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            self._stopping = True
            idle, busy = list(self._idle), [w for w in self._all if w not in self._idle]
            self._idle.clear()
            self._all.clear()
        for w in idle:
            w.stop()
        for w in busy:  # past the grace: their callers hear PoolClosed
            w.kill(close=False)  # its caller, reading the pipe, closes it

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=exc[0] is None)


def _ping() -> None:
    return None

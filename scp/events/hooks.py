"""Hook commands (``--on-stored``, ``--on-series-complete``, ``--on-study-complete``).

A hook is a command line run with the facts of an event in ``SORTSCP_*``
environment variables. No shell unless asked (``--hook-shell``): the command
is split with :func:`shlex.split` and run directly, so a value in the
environment can never be interpreted as shell syntax. At most
``concurrency`` hooks run at once, the rest wait in one bounded queue. They
are started by a helper process (:class:`HookProcess`) in the idle CPU class
(``SCHED_IDLE``: a hook gets only CPU time receiving does not want), each in a
process group of its own, and the whole group is killed after ``timeout``
seconds (SIGTERM, then SIGKILL). Each run ends in one log line: exit status,
seconds and the tail of its stderr (stdout is discarded). A run that finds
the queue full is dropped, logged and counted; nothing here ever blocks the
caller.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scp.log import DropLog

log = logging.getLogger(__name__)

#: Runs waiting for a free slot; more are dropped (logged and counted).
QUEUE_SIZE = 10_000
#: Bytes of a hook's stderr kept for the log line.
STDERR_TAIL = 2000
#: After SIGTERM to a timed-out hook's group, seconds before SIGKILL.
KILL_GRACE = 2.0
SHELL = "/bin/sh"
#: Environment variables a hook gets (inherited ones of these names are removed first).
HOOK_ENV = (
    "SORTSCP_EVENT", "SORTSCP_PATH", "SORTSCP_ABSPATH", "SORTSCP_OUT", "SORTSCP_CALLING_AET",
    "SORTSCP_SOP_INSTANCE_UID", "SORTSCP_SOP_CLASS_UID", "SORTSCP_SERIES_INSTANCE_UID",
    "SORTSCP_STUDY_INSTANCE_UID", "SORTSCP_PATIENT_ID", "SORTSCP_PATIENT_NAME", "SORTSCP_STUDY_DATE",
    "SORTSCP_MODALITY", "SORTSCP_TRANSFER_SYNTAX_UID", "SORTSCP_SIZE", "SORTSCP_DIGEST",
    "SORTSCP_MANIFEST", "SORTSCP_SERIES_FOLDER", "SORTSCP_REVISION", "SORTSCP_INSTANCE_COUNT",
    "SORTSCP_SERIES_COUNT", "SORTSCP_SERIES_DESCRIPTION", "SORTSCP_SERIES_NUMBER", "SORTSCP_TIME",
)


def command_argv(command: str, shell: bool) -> list[str]:
    """The argv of a hook command: ``/bin/sh -c COMMAND`` or its :func:`shlex.split`.

    >>> command_argv("notify --to 'a b'", shell=False)
    ['notify', '--to', 'a b']
    >>> command_argv("echo $SORTSCP_PATH >> log", shell=True)
    ['/bin/sh', '-c', 'echo $SORTSCP_PATH >> log']
    """
    if shell:
        return [SHELL, "-c", command]
    argv = shlex.split(command)
    if not argv:
        raise ValueError("an empty hook command")
    return argv


@dataclass(frozen=True)
class HookResult:
    hook: str
    argv: tuple[str, ...]
    returncode: int | None  #: None: it did not start or was killed by us
    seconds: float
    timed_out: bool = False
    error: str = ""  #: why it did not start
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.error

    def describe(self) -> str:
        if self.error:  # (the program named: "No such file or directory" alone says not which)
            program = shlex.quote(self.argv[0]) if self.argv else "the hook"
            return f"could not start {program}: {self.error}"
        if self.timed_out:
            return f"killed: still running past --hook-timeout (stopped after {self.seconds:.1f} s)"
        if self.returncode is not None and self.returncode < 0:
            return f"killed by signal {-self.returncode}"
        return f"exited {self.returncode}"


def run_hook(hook: str, argv: list[str], env: Mapping[str, str], timeout: float,
             cwd: str | None = None, running: set | None = None) -> HookResult:
    """Run one hook to its end (or its timeout); never raises for the hook's faults.
    While it runs its process is in `running` (so a stop can kill it).

    The hook runs at idle CPU priority (:func:`_idle_priority`), and this
    thread reads its stderr and waits for its exit in one poll loop (no
    thread of its own, no polling sleeps). This is how a server without its
    helper runs hooks (:class:`HookRunner`'s threads): about 0.2 ms of the
    calling process's CPU per run (``Popen``), against about 0.1 ms of the
    helper's (:class:`_HelperLoop`)."""
    start = time.monotonic()
    full_env = {k: v for k, v in os.environ.items() if k not in HOOK_ENV}
    full_env.update(env)
    try:
        proc = subprocess.Popen(
            argv, env=full_env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,
        )
    except OSError as exc:
        return HookResult(hook, tuple(argv), None, time.monotonic() - start, error=exc.strerror or str(exc))
    _idle_priority(proc.pid)
    if running is not None:
        running.add(proc)
    tail = bytearray()
    assert proc.stderr is not None
    try:
        timed_out = not _wait_reading(proc, start + timeout, tail)
        if timed_out:
            kill_group(proc)
            _drain(proc.stderr.fileno(), tail)
    finally:
        if running is not None:
            running.discard(proc)
        proc.stderr.close()
    seconds = time.monotonic() - start
    text = bytes(tail).decode(errors="replace").strip()
    return HookResult(hook, tuple(argv), proc.returncode, seconds, timed_out, "", text)


def _idle_priority(pid: int) -> None:
    """Put a hook's process in the SCHED_IDLE class (what it forks inherits it):
    it runs only on CPU time nothing else wants, so a hook per instance never
    takes CPU from receiving. Set from here, just after the exec: Popen's
    preexec_fn would cost a full fork of the server, and posix_spawn cannot set
    SCHED_IDLE (glibc's posix_spawnattr_setschedpolicy refuses it: EINVAL) nor,
    in Python 3.11, a working folder. (The helper needs neither: its hooks
    inherit its class and folder.) Where the class cannot be set, nice 19."""
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, pid, 19)
        except OSError:
            pass  # it already ended, or the platform refuses: it runs as it is


def _wait_reading(proc: subprocess.Popen, deadline: float, tail: bytearray) -> bool:
    """Read `proc`'s stderr into `tail` until it exits; False at `deadline`."""
    assert proc.stderr is not None
    err = proc.stderr.fileno()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None  # no pidfd: poll for the exit every 50 ms
    poller = select.poll()
    poller.register(err, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if proc.poll() is None:
                    return False
                _drain(err, tail)
                return True
            wait_ms = remaining * 1000 if pidfd is not None else min(remaining, 0.05) * 1000
            for fd, _ in poller.poll(max(1, int(wait_ms))):
                if fd == err and not _read_into(err, tail):
                    poller.unregister(err)
            if (pidfd is not None and select.select([pidfd], [], [], 0)[0]) or \
                    (pidfd is None and proc.poll() is not None):
                proc.wait()
                _drain(err, tail)
                return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read_into(fd: int, tail: bytearray) -> bool:
    """One read of `fd` into `tail` (its last STDERR_TAIL bytes); False at EOF."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return True  # nothing there now (a non-blocking pipe)
    except OSError:
        return False
    if chunk:
        tail.extend(chunk)
        if len(tail) > STDERR_TAIL:
            del tail[: len(tail) - STDERR_TAIL]
    return bool(chunk)


def _drain(err: int, tail: bytearray) -> None:
    """What the ended hook left in its stderr pipe `err`, into `tail` (never
    waits: a process it started may hold the pipe open)."""
    while select.select([err], [], [], 0)[0] and _read_into(err, tail):
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of `proc`, then SIGKILL it after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 10.0)):
        _killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            _killpg(proc.pid, signal.SIGKILL)  # the leader is gone: take the rest of its group with it
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass(frozen=True)
class _Run:
    hook: str
    argv: list[str]
    env: dict[str, str]
    subject: str  #: what it is about, for the log line (a SOP Instance / Series UID)


class HookRunner:
    """Runs hooks, at most ``concurrency`` at once, from one bounded queue.

    Normally the runs go to a :class:`HookProcess`: a run is sent (one JSON
    line) by the thread that submits it when a slot is free, and the
    helper's reply, read by one thread, frees the slot and sends the next
    run waiting. No thread waits per run. Without the helper (it could not
    start, or it died) ``concurrency`` threads of this process run the hooks
    with :func:`run_hook`."""

    def __init__(self, concurrency: int, timeout: float, *, cwd: str | None = None,
                 on_result: Callable[[HookResult, str], None] | None = None,
                 on_drop: Callable[[str, str, str], None] | None = None, queue_size: int = QUEUE_SIZE,
                 helper: bool = True) -> None:
        """`helper`: start the hooks from a :class:`HookProcess` (at idle
        priority); False, or if it cannot start: from this process."""
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.cwd = cwd
        self.on_result = on_result
        self.on_drop = on_drop
        self._drop_log = DropLog()
        self.queue_size = queue_size
        self._cond = threading.Condition()  # guards everything below
        self._waiting: deque[_Run] = deque()  #: runs not started yet
        self._sent: dict[int, _Run] = {}  #: runs the helper runs now, by request id
        self._ids = itertools.count()
        self._busy = 0  #: runs submitted and not finished (waiting, sent or in a thread)
        self._stopping = threading.Event()
        self._closing = False  #: the threads end
        self._threads: list[threading.Thread] = []
        self._running: set[subprocess.Popen] = set()  #: started by the threads
        self._helper: HookProcess | None = None
        if helper:
            try:
                self._helper = HookProcess(self._replies, self._helper_ended)
            except OSError as exc:
                log.warning("hooks run from the server itself: cannot start their helper process: %s", exc)
        if self._helper is None:
            self._start_threads()

    def submit(self, hook: str, argv: list[str], env: dict[str, str], subject: str) -> bool:
        """Queue a run; False (logged, counted) if the queue is full or we stop."""
        return self.submit_all([(hook, argv, env, subject)]) == 1

    def submit_all(self, runs: list[tuple[str, list[str], dict[str, str], str]]) -> int:
        """Queue (hook, argv, env, subject) runs, those that start now sent in one
        write; returns how many were queued (the rest dropped, logged, counted)."""
        if self._stopping.is_set():
            for hook, _, _, subject in runs:
                self._dropped(hook, subject, "the server is stopping")
            return 0
        with self._cond:
            room = max(0, self.queue_size - len(self._waiting))
            self._waiting.extend(_Run(*run) for run in runs[:room])
            self._busy += min(room, len(runs))
            sends = self._take_sendable()
            self._cond.notify(len(runs))
        for hook, _, _, subject in runs[room:]:
            self._dropped(hook, subject, f"{self.queue_size} runs already waiting")
        self._send(sends)
        return min(room, len(runs))

    # ---- through the helper

    def _take_sendable(self) -> list[tuple[int, _Run]]:
        """Runs to send to the helper now (free slots); call with the lock held."""
        sends: list[tuple[int, _Run]] = []
        if self._helper is None or not self._helper.alive:
            return sends
        while self._waiting and len(self._sent) < self.concurrency:
            run = self._waiting.popleft()
            rid = next(self._ids)
            self._sent[rid] = run
            sends.append((rid, run))
        return sends

    def _send(self, sends: list[tuple[int, _Run]]) -> None:
        if not sends:
            return
        assert self._helper is not None
        self._helper.send([
            {"id": rid, "hook": r.hook, "argv": r.argv, "env": r.env, "timeout": self.timeout, "cwd": self.cwd}
            for rid, r in sends
        ])  # if the helper is gone, _helper_ended runs them here

    def _replies(self, replies: list[dict]) -> None:
        """Results from the helper (its reader thread)."""
        finished = 0
        for r in replies:
            with self._cond:
                run = self._sent.pop(r.get("id"), None)  # type: ignore[arg-type]
            if run is None:
                continue
            self._finish(run, HookResult(run.hook, tuple(run.argv), r["returncode"], r["seconds"],
                                         r["timed_out"], r["error"], r["stderr_tail"]))
            finished += 1
        if not finished:
            return
        with self._cond:
            self._busy -= finished
            sends = self._take_sendable()
            self._cond.notify_all()
        self._send(sends)

    def _helper_ended(self, expected: bool) -> None:
        """The helper's output ended: it was closed (drop what it ran), or it died
        (run what it ran, and what waits, from threads of this process)."""
        with self._cond:
            lost = list(self._sent.values())
            self._sent.clear()
            drop = expected or self._stopping.is_set()
            if drop:
                self._busy -= len(lost)
                self._cond.notify_all()
            else:
                self._waiting.extendleft(reversed(lost))
        if drop:
            for run in lost:
                self._dropped(run.hook, run.subject, "the server stopped while it ran", limit=False)
            return
        log.warning("the hook helper process ended (exit status %s); hooks now start from the server itself",
                    self._helper.exit_status() if self._helper is not None else None)
        self._start_threads()

    # ---- from threads of this process

    def _start_threads(self) -> None:
        with self._cond:
            if self._threads:
                return
            self._threads = [
                threading.Thread(target=self._work, name=f"sortscp-hook-{i}", daemon=True)
                for i in range(self.concurrency)
            ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if not self._waiting:
                    return
                run = self._waiting.popleft()
            try:
                if self._stopping.is_set():
                    self._dropped(run.hook, run.subject, "the server stopped before it ran", limit=False)
                    continue
                self._finish(run, run_hook(run.hook, run.argv, run.env, self.timeout, self.cwd, self._running))
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    # ---- common

    def _finish(self, run: _Run, result: HookResult) -> None:
        try:
            self._log(result, run.subject)
            if self.on_result:
                self.on_result(result, run.subject)
        except Exception:  # never lose the thread that reports
            log.exception("hook %s for %s", run.hook, run.subject)

    def _dropped(self, hook: str, subject: str, why: str, *, limit: bool = True) -> None:
        """Log (at most a line a second with `limit`: a hung hook under a flood of
        instances would otherwise write a line per instance) and count a drop.
        Without `limit`, for the runs cut off by the stop, at most one per slot."""
        extra = {"event": "hook_dropped", "hook": hook, "subject": subject, "reason": why}
        if limit:
            self._drop_log.warn(log, "hook %s dropped for %s: %s", hook, subject, why, extra=extra)
        else:
            log.warning("hook %s dropped for %s: %s", hook, subject, why, extra={**extra, "count": 1})
        if self.on_drop:
            self.on_drop(hook, subject, why)

    def _log(self, r: HookResult, subject: str) -> None:
        level = (logging.DEBUG if r.hook == "on_stored" else logging.INFO) if r.ok else logging.WARNING
        if not log.isEnabledFor(level):
            return
        tail = " ".join(r.stderr_tail.split())[-300:]
        extra = {"event": "hook", "hook": r.hook, "subject": subject, "returncode": r.returncode,
                 "timed_out": r.timed_out, "seconds": round(r.seconds, 3), "stderr": tail}
        if r.ok:
            log.log(level, "hook %s for %s exited 0 in %.2f s", r.hook, subject, r.seconds, extra=extra)
        else:
            log.warning("hook %s for %s %s (%.2f s)%s", r.hook, subject, r.describe(), r.seconds,
                        f"; stderr: {tail}" if tail else "", extra=extra)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued run has finished; False at the timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def stop(self, timeout: float) -> None:
        """Let queued runs finish for up to `timeout` s; then drop what is still
        queued (one log line) and kill the process groups of running hooks."""
        finished = self.wait_idle(timeout)
        self._stopping.set()
        with self._cond:
            left = list(self._waiting)
            self._waiting.clear()
            self._busy -= len(left)
            self._cond.notify_all()
        dropped: dict[str, int] = {}
        for run in left:
            dropped[run.hook] = dropped.get(run.hook, 0) + 1
            if self.on_drop:
                self.on_drop(run.hook, run.subject, "the server stopped before it ran")
        if dropped:
            log.warning("stopping: dropped %s hook run(s) not yet started (%s)", sum(dropped.values()),
                        ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())),
                        extra={"event": "hook_dropped", "dropped": dropped})
        if not finished:
            for proc in list(self._running):
                log.warning("stopping: killing hook process %d, still running", proc.pid)
                kill_group(proc)
        if self._helper is not None:  # it kills what it still runs
            if not finished and self._helper.alive:
                log.warning("stopping: killing the hook processes still running")
            self._helper.close()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(KILL_GRACE)
        self._drop_log.flush(log, "hook runs", extra={"event": "hook_dropped"})


# --------------------------------------------------------------------------- the hook process


class HookProcess:
    """A helper process, at idle CPU priority, that starts the hooks of one server.

    Starting a process costs its parent CPU, and a hook started by the
    server runs its first instructions at the server's priority. So the
    server hands each run, as one JSON line, to this helper, which runs in
    the ``SCHED_IDLE`` class from its start: every hook it starts inherits
    the class, and the helper's own work (the spawn, the timeout, the stderr
    tail) takes no CPU that receiving wants. The server's part of a run is a
    line written and a line read (:func:`hook_process_main` for the other side).

    The helper ends when its stdin closes (the server stopped, or died: even
    after a SIGKILL of the server) and then kills the hooks still running.
    `on_replies` gets the results, `on_end` (True if :meth:`close` asked for
    it) the end of the helper; both from the one reader thread.
    """

    def __init__(self, on_replies: Callable[[list[dict]], None], on_end: Callable[[bool], None]) -> None:
        import scp

        root = str(Path(scp.__file__).resolve().parent.parent)
        code = "import sys; sys.path.insert(0, sys.argv[1]); from scp.events.hooks import hook_process_main; hook_process_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, root], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=None, close_fds=True, bufsize=0,
        )
        self.on_replies = on_replies
        self.on_end = on_end
        self._lock = threading.Lock()  #: one writer at a time
        self.alive = True
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="sortscp-hook-results", daemon=True)
        self._reader.start()

    def send(self, requests: list[dict]) -> None:
        """Write `requests` in one write (one JSON line each). If the helper is
        gone, the reader thread reports its end (their runs with it)."""
        data = "".join(json.dumps(r) + "\n" for r in requests).encode()
        with self._lock:
            if not self.alive:
                return
            view = memoryview(data)
            try:
                assert self.proc.stdin is not None
                while view:  # unbuffered: a signal can cut a write short
                    view = view[self.proc.stdin.write(view) or 0:]
            except (OSError, ValueError):
                self.alive = False  # the reader sees the end of its output

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            replies = []
            for raw in lines:
                try:
                    replies.append(json.loads(raw))
                except ValueError:
                    continue
            if replies:
                self.on_replies(replies)
        with self._lock:
            self.alive = False
            expected = self._closed
        self.on_end(expected)

    def exit_status(self) -> int | None:
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def close(self, timeout: float = KILL_GRACE + 3) -> None:
        """Close its stdin: it kills the hooks still running and exits."""
        with self._lock:
            self._closed = True
            self.alive = False
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)


#: Signals a hook starts with at their default action (the helper ignores them; Python ignores SIGPIPE, SIGXFSZ).
_DEFAULT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGPIPE", "SIGXFSZ",
                                                           "SIGHUP", "SIGUSR1", "SIGUSR2")
                         if hasattr(signal, name))
#: Seconds a result may wait in the helper for others while hooks still run (one
#: write, one wake-up of the server's reader, for several); none run: at once.
REPLY_BATCH_SECONDS = 0.05
#: Seconds the helper still waits, after SIGKILL, for a hook to end before it reports it (and stops waiting).
_GIVE_UP = 10.0


class _Hook:
    """One hook the helper started."""

    __slots__ = ("rid", "pid", "pidfd", "err", "start", "deadline", "kill_at", "give_up", "timed_out",
                 "tail", "reported")

    def __init__(self, rid: Any, pid: int, pidfd: int | None, err: int | None, start: float, timeout: float) -> None:
        self.rid, self.pid, self.pidfd, self.err = rid, pid, pidfd, err
        self.start = start
        self.deadline = start + timeout  #: then SIGTERM to its group
        self.kill_at = math.inf  #: then SIGKILL to its group
        self.give_up = math.inf  #: then reported as it is, no longer waited for
        self.timed_out = False
        self.tail = bytearray()
        self.reported = False


class _HelperLoop:
    """The helper's one thread: requests on stdin, results on stdout, and every
    running hook (its stderr pipe, its pidfd, its timeout) in one poll loop.

    A hook is started with :func:`os.posix_spawnp` (``vfork``: no copy of the
    helper's memory, no Python code in the child): stdin and stdout on
    ``/dev/null``, stderr on a pipe, a new session (so its process group can
    be killed), the signals the helper ignores back at their defaults. It
    inherits ``SCHED_IDLE`` and the working folder from the helper, which
    changes folder for a request that asks for another one."""

    def __init__(self) -> None:
        self.base_env = {k: v for k, v in os.environ.items() if k not in HOOK_ENV}
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.home = os.open(".", os.O_RDONLY)  #: the folder for a request without one
        self.cwd: str | None = None
        self.poller = select.poll()
        self.fds: dict[int, _Hook] = {}  #: stderr pipes and pidfds
        self.hooks: dict[int, _Hook] = {}  #: started and not yet reaped, by pid
        self.inbuf = b""
        self.outbuf = bytearray()
        self.writing = False  #: stdout registered for POLLOUT
        self.flush_at = math.inf  #: replies are written by then, or when no hook runs
        self.reading = True  #: stdin open
        self.end_at = math.inf  #: after stdin closed: exit by then even if hooks remain
        os.set_blocking(1, False)
        self.poller.register(0, select.POLLIN)

    def run(self) -> None:
        while self.reading or (self.hooks and time.monotonic() < self.end_at):
            now = time.monotonic()
            wake = min([self.end_at, *(min(h.deadline, h.kill_at, h.give_up) for h in self.hooks.values()
                                       if not h.reported)], default=math.inf)
            if any(h.pidfd is None for h in self.hooks.values()):
                wake = min(wake, now + 0.05)  # no pidfd: look for its exit every 50 ms
            if self.outbuf and not self.writing:
                wake = min(wake, self.flush_at)
            wait = None if wake == math.inf else max(0, math.ceil((wake - now) * 1000))
            ready = {fd for fd, _ in self.poller.poll(wait)}
            # the hooks' fds first, new requests last: a fd closed here is not
            # reused by a hook started in this round while its events are handled
            for fd in ready - {0, 1}:
                h = self.fds.get(fd)
                if h is None:
                    continue  # its hook ended earlier in this round
                if fd == h.err:
                    if not _read_into(fd, h.tail):
                        self._close_err(h)
                        self._exited(h)  # usually it just ended: spares a wake-up for the pidfd
                else:
                    self._exited(h)
            if 1 in ready:
                self._flush()
            if 0 in ready:
                self._requests()
            now = time.monotonic()
            for h in list(self.hooks.values()):
                if h.pidfd is None:
                    self._exited(h)
                if h.pid in self.hooks:
                    self._timers(h, now)
            if self.outbuf and not self.writing and (now >= self.flush_at or self._idle()):
                self._flush()
        for h in self.hooks.values():  # still there at the end: the last word
            _killpg(h.pid, signal.SIGKILL)

    # ---- requests

    def _requests(self) -> None:
        try:
            chunk = os.read(0, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            self._stdin_closed()
            return
        *lines, self.inbuf = (self.inbuf + chunk).split(b"\n")
        for raw in lines:
            try:
                req = json.loads(raw)
            except ValueError:
                continue
            try:
                self._start(req)
            except Exception as exc:  # noqa: BLE001 - reported to the server as the run's error
                self._reply(req.get("id"), None, 0.0, False, f"{type(exc).__name__}: {exc}", b"")

    def _start(self, req: dict) -> None:
        start = time.monotonic()
        argv: list[str] = req["argv"]
        cwd = req.get("cwd")
        try:
            if cwd != self.cwd:
                os.fchdir(self.home)  # a relative folder is relative to the server's
                if cwd is not None:
                    os.chdir(cwd)
                self.cwd = cwd
        except OSError as exc:
            self.cwd = None
            os.fchdir(self.home)
            self._reply(req["id"], None, time.monotonic() - start, False, exc.strerror or str(exc), b"")
            return
        env = self.base_env.copy()
        env.update(req["env"])
        r, w = os.pipe()
        try:
            pid = os.posix_spawnp(
                argv[0], argv, env, setsid=True, setsigdef=_DEFAULT_SIGNALS, setsigmask=(),
                file_actions=[(os.POSIX_SPAWN_DUP2, self.devnull, 0), (os.POSIX_SPAWN_DUP2, self.devnull, 1),
                              (os.POSIX_SPAWN_DUP2, w, 2)],
            )
        except OSError as exc:
            os.close(r)
            self._reply(req["id"], None, time.monotonic() - start, False, exc.strerror or str(exc), b"")
            return
        finally:
            os.close(w)
        os.set_blocking(r, False)
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None  # no pidfd: its exit is looked for every 50 ms
        h = _Hook(req["id"], pid, pidfd, r, start, float(req["timeout"]))
        self.hooks[pid] = h
        self.fds[r] = h
        self.poller.register(r, select.POLLIN)
        if pidfd is not None:
            self.fds[pidfd] = h
            self.poller.register(pidfd, select.POLLIN)

    def _stdin_closed(self) -> None:
        """The server stopped (or died): end every hook, SIGTERM then SIGKILL, and exit."""
        self.reading = False
        self.poller.unregister(0)
        now = time.monotonic()
        self.end_at = now + KILL_GRACE + 1
        for h in self.hooks.values():
            _killpg(h.pid, signal.SIGTERM)
            h.kill_at = min(h.kill_at, now + KILL_GRACE)

    # ---- running hooks

    def _timers(self, h: _Hook, now: float) -> None:
        if not h.timed_out and now >= h.deadline:
            h.timed_out = True
            _killpg(h.pid, signal.SIGTERM)
            h.kill_at = min(h.kill_at, now + KILL_GRACE)
        if now >= h.kill_at:
            _killpg(h.pid, signal.SIGKILL)
            h.kill_at = math.inf
            h.give_up = now + _GIVE_UP
        if now >= h.give_up and not h.reported:  # unkillable (a D state): report it, reap it if it ever ends
            h.give_up = math.inf
            self._report(h, None)

    def _exited(self, h: _Hook) -> None:
        """If `h`'s process ended (a zombie until waited for, which keeps its
        group id ours): the rest of its group killed if it timed out or we
        stop, then reaped and reported."""
        try:
            if os.waitid(os.P_PID, h.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return  # still running
        except ChildProcessError:
            pass
        if h.timed_out or not self.reading:
            _killpg(h.pid, signal.SIGKILL)
        returncode = None
        try:
            _, status = os.waitpid(h.pid, os.WNOHANG)
            returncode = os.waitstatus_to_exitcode(status)
        except (ChildProcessError, ValueError):
            pass
        del self.hooks[h.pid]
        if h.pidfd is not None:
            self.poller.unregister(h.pidfd)
            del self.fds[h.pidfd]
            os.close(h.pidfd)
        if h.err is not None:  # what it left in the pipe, without waiting (a child of it may hold it open)
            _drain(h.err, h.tail)
            self._close_err(h)
        if not h.reported:
            self._report(h, returncode)

    def _idle(self) -> bool:
        return not any(not h.reported for h in self.hooks.values())

    def _close_err(self, h: _Hook) -> None:
        assert h.err is not None
        self.poller.unregister(h.err)
        del self.fds[h.err]
        os.close(h.err)
        h.err = None

    def _report(self, h: _Hook, returncode: int | None) -> None:
        h.reported = True
        self._reply(h.rid, returncode, time.monotonic() - h.start, h.timed_out, "", bytes(h.tail))

    # ---- results

    def _reply(self, rid: Any, returncode: int | None, seconds: float, timed_out: bool, error: str,
               tail: bytes) -> None:
        if not self.reading:
            return  # the server no longer listens
        if not self.outbuf:
            self.flush_at = time.monotonic() + REPLY_BATCH_SECONDS
        self.outbuf += (json.dumps({
            "id": rid, "returncode": returncode, "seconds": seconds, "timed_out": timed_out, "error": error,
            "stderr_tail": tail.decode(errors="replace").strip(),
        }) + "\n").encode()

    def _flush(self) -> None:
        """Write what the server has not read yet, never blocking (a server busy
        elsewhere must not stop this loop): the rest when stdout has room."""
        try:
            n = os.write(1, self.outbuf)
            del self.outbuf[:n]
        except BlockingIOError:
            pass
        except OSError:
            self.outbuf.clear()  # the server is gone: its stdin closing ends us
        want = bool(self.outbuf)
        if want != self.writing:
            if want:
                self.poller.register(1, select.POLLOUT)
            else:
                self.poller.unregister(1)
            self.writing = want


def hook_process_main() -> None:
    """The helper of :class:`HookProcess`: JSON requests on stdin, results on stdout."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(19)
        except OSError:
            pass
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the server stops us by closing stdin
    _HelperLoop().run()
    os._exit(0)

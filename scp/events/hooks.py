"""Hook commands (``--on-stored``, ``--on-series-complete``, ``--on-study-complete``).

A hook is a command line run with the facts of an event in ``SORTSCP_*``
environment variables. No shell unless asked (``--hook-shell``): the command
is split with :func:`shlex.split` and run directly, so a value in the
environment can never be interpreted as shell syntax. At most
``concurrency`` hooks run at once (threads taking runs from one bounded
queue); each runs in a process group of its own, at idle CPU priority
(``SCHED_IDLE``: it gets only CPU time receiving does not want), and the
whole group is killed after ``timeout`` seconds. Each run ends in one log line: exit status,
seconds and the tail of its stderr (stdout is discarded). A run that finds
the queue full is dropped, logged and counted; nothing here ever blocks the
caller.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

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
        if self.error:
            return f"could not start: {self.error}"
        if self.timed_out:
            return f"killed after its timeout of {self.seconds:.1f} s"
        if self.returncode is not None and self.returncode < 0:
            return f"killed by signal {-self.returncode}"
        return f"exited {self.returncode}"


def run_hook(hook: str, argv: list[str], env: Mapping[str, str], timeout: float,
             cwd: str | None = None, running: set | None = None) -> HookResult:
    """Run one hook to its end (or its timeout); never raises for the hook's faults.
    While it runs its process is in `running` (so a stop can kill it).

    The hook runs at idle CPU priority (:func:`_idle_priority`), and this
    thread reads its stderr and waits for its exit in one poll loop (no
    thread of its own, no polling sleeps): each run costs the server about a
    quarter of a millisecond of CPU, the rest is the hook's own, taken from
    idle time."""
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
    try:
        timed_out = not _wait_reading(proc, start + timeout, tail)
        if timed_out:
            kill_group(proc)
            _drain(proc, tail)
    finally:
        if running is not None:
            running.discard(proc)
        assert proc.stderr is not None
        proc.stderr.close()
    seconds = time.monotonic() - start
    text = bytes(tail).decode(errors="replace").strip()
    return HookResult(hook, tuple(argv), proc.returncode, seconds, timed_out, "", text)


def _idle_priority(pid: int) -> None:
    """Put a hook's process in the SCHED_IDLE class (what it forks inherits it):
    it runs only on CPU time nothing else wants, so a hook per instance never
    takes CPU from receiving. Set from here, just after the exec: Popen's
    preexec_fn would cost a full fork of the server, and posix_spawn cannot set
    SCHED_IDLE nor a working folder. Where the class cannot be set, nice 19."""
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
                _drain(proc, tail)
                return True
            wait_ms = remaining * 1000 if pidfd is not None else min(remaining, 0.05) * 1000
            for fd, _ in poller.poll(max(1, int(wait_ms))):
                if fd == err and not _read_into(err, tail):
                    poller.unregister(err)
            if (pidfd is not None and select.select([pidfd], [], [], 0)[0]) or \
                    (pidfd is None and proc.poll() is not None):
                proc.wait()
                _drain(proc, tail)
                return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read_into(fd: int, tail: bytearray) -> bool:
    """One read of `fd` into `tail` (its last STDERR_TAIL bytes); False at EOF."""
    try:
        chunk = os.read(fd, 65536)
    except OSError:
        return False
    if chunk:
        tail.extend(chunk)
        if len(tail) > STDERR_TAIL:
            del tail[: len(tail) - STDERR_TAIL]
    return bool(chunk)


def _drain(proc: subprocess.Popen, tail: bytearray) -> None:
    """What the ended hook left in its stderr pipe (never waits: a process it
    started may hold the pipe open)."""
    assert proc.stderr is not None
    err = proc.stderr.fileno()
    while select.select([err], [], [], 0)[0] and _read_into(err, tail):
        pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of `proc`, then SIGKILL it after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(wait)
            # the leader is gone: take the rest of its group down with it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass(frozen=True)
class _Run:
    hook: str
    argv: list[str]
    env: dict[str, str]
    subject: str  #: what it is about, for the log line (a SOP Instance / Series UID)
    on_done: Callable[[HookResult], None] | None


class HookRunner:
    """``concurrency`` threads running hooks from one bounded queue."""

    def __init__(self, concurrency: int, timeout: float, *, cwd: str | None = None,
                 on_result: Callable[[HookResult, str], None] | None = None,
                 on_drop: Callable[[str, str, str], None] | None = None, queue_size: int = QUEUE_SIZE,
                 helper: bool = True) -> None:
        """`helper`: start the hooks from a :class:`HookProcess` (at idle
        priority); False, or if it cannot start: from this process."""
        self.timeout = timeout
        self.cwd = cwd
        self.on_result = on_result
        self.on_drop = on_drop
        self._queue: queue.Queue[_Run | None] = queue.Queue(queue_size)
        self._threads = [
            threading.Thread(target=self._work, name=f"sortscp-hook-{i}", daemon=True)
            for i in range(max(1, concurrency))
        ]
        self._running: set[subprocess.Popen] = set()
        self._stopping = threading.Event()
        self._idle = threading.Condition()
        self._busy = 0
        self._helper: HookProcess | None = None
        if helper:
            try:
                self._helper = HookProcess()
            except OSError as exc:
                log.warning("hooks run from the server itself: cannot start their helper process: %s", exc)
        for t in self._threads:
            t.start()

    def submit(self, hook: str, argv: list[str], env: dict[str, str], subject: str) -> bool:
        """Queue a run; False (logged, counted) if the queue is full or we stop."""
        if self._stopping.is_set():
            self._dropped(hook, subject, "the server is stopping")
            return False
        try:
            with self._idle:
                self._queue.put_nowait(_Run(hook, argv, env, subject, None))
                self._busy += 1
        except queue.Full:
            self._dropped(hook, subject, f"{self._queue.maxsize} runs already waiting")
            return False
        return True

    def _dropped(self, hook: str, subject: str, why: str) -> None:
        log.warning("hook %s dropped for %s: %s", hook, subject, why,
                    extra={"event": "hook_dropped", "hook": hook, "subject": subject, "reason": why})
        if self.on_drop:
            self.on_drop(hook, subject, why)

    def _work(self) -> None:
        while True:
            run = self._queue.get()
            if run is None:
                return
            try:
                if self._stopping.is_set():
                    self._dropped(run.hook, run.subject, "the server stopped before it ran")
                    continue
                result = None
                if self._helper is not None:
                    result = self._helper.run(run.hook, run.argv, run.env, self.timeout, self.cwd)
                if result is None:
                    if self._stopping.is_set():
                        self._dropped(run.hook, run.subject, "the server stopped while it ran")
                        continue
                    result = run_hook(run.hook, run.argv, run.env, self.timeout, self.cwd, self._running)
                self._log(result, run.subject)
                if self.on_result:
                    self.on_result(result, run.subject)
            except Exception:  # never lose a hook thread
                log.exception("hook %s for %s", run.hook, run.subject)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _log(self, r: HookResult, subject: str) -> None:
        tail = " ".join(r.stderr_tail.split())[-300:]
        extra = {"event": "hook", "hook": r.hook, "subject": subject, "returncode": r.returncode,
                 "timed_out": r.timed_out, "seconds": round(r.seconds, 3), "stderr": tail}
        if r.ok:
            (log.debug if r.hook == "on_stored" else log.info)(
                "hook %s for %s exited 0 in %.2f s", r.hook, subject, r.seconds, extra=extra)
        else:
            log.warning("hook %s for %s %s (%.2f s)%s", r.hook, subject, r.describe(), r.seconds,
                        f"; stderr: {tail}" if tail else "", extra=extra)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued run has finished; False at the timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def stop(self, timeout: float) -> None:
        """Let queued runs finish for up to `timeout` s; then drop what is still
        queued (one log line) and kill the process groups of running hooks."""
        finished = self.wait_idle(timeout)
        self._stopping.set()
        dropped: dict[str, int] = {}
        while True:
            try:
                run = self._queue.get_nowait()
            except queue.Empty:
                break
            if run is None:
                continue
            dropped[run.hook] = dropped.get(run.hook, 0) + 1
            if self.on_drop:
                self.on_drop(run.hook, run.subject, "the server stopped before it ran")
            with self._idle:
                self._busy -= 1
        if dropped:
            log.warning("stopping: dropped %s hook run(s) not yet started (%s)", sum(dropped.values()),
                        ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())),
                        extra={"event": "hook_dropped", "dropped": dropped})
        if not finished:
            for proc in list(self._running):
                log.warning("stopping: killing hook process %d, still running", proc.pid)
                kill_group(proc)
        if self._helper is not None:  # it kills what it still runs
            if not finished:
                log.warning("stopping: killing the hook processes still running")
            self._helper.close()
        for _ in self._threads:
            self._queue.put_nowait(None)
        for t in self._threads:
            t.join(KILL_GRACE)


# --------------------------------------------------------------------------- the hook process


class HookProcess:
    """A helper process, at idle CPU priority, that starts the hooks of one server.

    Starting a process costs its parent CPU (about 0.3 ms from a Python
    server, with the GIL held part of the time), and a hook started by the
    server runs its first instructions at the server's priority. So the
    server hands each run, as one JSON line, to this helper, which runs in
    the ``SCHED_IDLE`` class from its start: every hook it starts is idle
    from its first instruction, and the helper's own work (the fork, the
    timeout, the stderr tail) takes no CPU that receiving wants. The server's
    part of a run is a line written and a line read.

    The helper ends when its stdin closes (the server stopped, or died: even
    after a SIGKILL of the server) and then kills the hooks still running.
    """

    def __init__(self) -> None:
        import scp

        root = str(Path(scp.__file__).resolve().parent.parent)
        code = "import sys; sys.path.insert(0, sys.argv[1]); from scp.events.hooks import hook_process_main; hook_process_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, root], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=None, close_fds=True,
        )
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: dict[int, tuple[threading.Event, list]] = {}
        self._alive = True
        self._reader = threading.Thread(target=self._read, name="sortscp-hook-results", daemon=True)
        self._reader.start()

    def run(self, hook: str, argv: list[str], env: Mapping[str, str], timeout: float,
            cwd: str | None) -> HookResult | None:
        """Run one hook in the helper; None if the helper is gone (run it here)."""
        rid = next(self._ids)
        done: threading.Event = threading.Event()
        box: list = []
        line = json.dumps({"id": rid, "hook": hook, "argv": argv, "env": dict(env), "timeout": timeout,
                           "cwd": cwd}) + "\n"
        with self._lock:
            if not self._alive:
                return None
            self._waiting[rid] = (done, box)
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(line.encode())
                self.proc.stdin.flush()
            except (OSError, ValueError):
                self._waiting.pop(rid, None)
                self._alive = False
                return None
        done.wait()
        if not box:
            return None  # the helper died while it ran
        r = box[0]
        return HookResult(hook, tuple(argv), r["returncode"], r["seconds"], r["timed_out"], r["error"],
                          r["stderr_tail"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                r = json.loads(raw)
            except ValueError:
                continue
            with self._lock:
                waiter = self._waiting.pop(r.get("id"), None)
            if waiter is not None:
                waiter[1].append(r)
                waiter[0].set()
        with self._lock:  # EOF: the helper ended; release every waiter
            closing = not self._alive
            self._alive = False
            waiting, self._waiting = self._waiting, {}
        if not closing:
            try:
                code: int | None = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            log.warning("the hook helper process ended (exit status %s); hooks now start from the server itself",
                        code)
        for done, _ in waiting.values():
            done.set()

    def close(self, timeout: float = KILL_GRACE + 3) -> None:
        """Close its stdin: it kills the hooks still running and exits."""
        with self._lock:
            self._alive = False
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


def hook_process_main() -> None:
    """The helper of :class:`HookProcess`: JSON requests on stdin, results on stdout."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(19)
        except OSError:
            pass
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the server stops us by closing stdin
    out = sys.stdout.buffer
    lock = threading.Lock()
    running: set[subprocess.Popen] = set()

    def one(req: dict) -> None:
        try:
            r = run_hook(req["hook"], req["argv"], req["env"], req["timeout"], req["cwd"], running)
            reply = {"id": req["id"], "returncode": r.returncode, "seconds": r.seconds, "timed_out": r.timed_out,
                     "error": r.error, "stderr_tail": r.stderr_tail}
        except Exception as exc:  # noqa: BLE001 - reported to the server as the run's error
            reply = {"id": req.get("id"), "returncode": None, "seconds": 0.0, "timed_out": False,
                     "error": f"{type(exc).__name__}: {exc}", "stderr_tail": ""}
        with lock:
            try:
                out.write((json.dumps(reply) + "\n").encode())
                out.flush()
            except (OSError, ValueError):
                pass

    for raw in sys.stdin.buffer:
        try:
            req = json.loads(raw)
        except ValueError:
            continue
        threading.Thread(target=one, args=(req,), daemon=True).start()
    killers = [threading.Thread(target=kill_group, args=(proc,)) for proc in list(running)]
    for t in killers:
        t.start()
    for t in killers:
        t.join(KILL_GRACE + 1)
    os._exit(0)

"""The worker pool's deadlines, with real worker processes: a job past its
deadline is stopped by killing its worker *before* the caller hears of it, so
it can never write anything afterwards; a job that waited too long for a worker
never starts; the pool serves the next job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from scp._process import pid_alive
from scp.pool import JobTimeout, WorkerPool

from conftest import cli_env, run_cli
from serve_helpers import wait_until


def write_after(path: str, seconds: float) -> str:
    """A job that writes `path` after `seconds` (a stand-in for a slow commit)."""
    time.sleep(seconds)
    Path(path).write_text("late")
    return path


def pid_to_file_then_sleep(path: str, seconds: float) -> int:
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def fail_replacing_the_worker(path: str) -> None:
    """A job whose failure leaves the worker in a state that must not serve
    another job (as a failed index commit does): its pid in `path`, then raise."""
    from scp.errors import IndexCommitFailed

    Path(path).write_text(str(os.getpid()))
    raise IndexCommitFailed("the index cannot record it")


def both_workers(pool: WorkerPool, seconds: float) -> set[int]:
    """The PIDs the two workers of `pool` answer from, each given a job of
    `seconds` at the same time (up to 20 tries to see both)."""
    pids: set[int] = set()
    for _ in range(20):
        threads = [threading.Thread(target=lambda: pids.add(pool.run(pid_after, seconds, timeout=10)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(pids) == 2:
            break
    return pids


@pytest.fixture
def pool():
    with WorkerPool(1) as p:
        p.warm_up()
        yield p


def test_a_job_past_its_deadline_is_killed_before_the_caller_hears(pool, tmp_path):
    worker = pool.run(pid_after, 0, timeout=10)
    late = tmp_path / "late"
    start = time.monotonic()
    with pytest.raises(JobTimeout, match="killed"):
        pool.run(write_after, str(late), 3, timeout=1)
    took = time.monotonic() - start
    assert took < 1 + 5, f"answered after {took:.1f} s"
    assert not pid_alive(worker), "the worker that ran past its deadline still runs"
    time.sleep(3)
    assert not late.exists(), "a job answered as timed out wrote its file afterwards"
    assert pool.run(pid_after, 0, timeout=10) != worker  # a new worker serves


def test_a_job_queued_past_its_deadline_never_runs(pool, tmp_path):
    """One worker busy (within its own deadline): the queued job fails without
    killing anyone, and does not run when the worker gets free."""
    busy: dict = {}
    started = tmp_path / "started"
    first = threading.Thread(target=lambda: busy.update(pid=pool.run(pid_to_file_then_sleep, str(started), 3,
                                                                     timeout=10)))
    first.start()
    wait_until(lambda: started.exists() and started.read_text(), what="the busy job to run")
    queued = tmp_path / "queued"
    with pytest.raises(JobTimeout, match="free"):
        pool.run(write_after, str(queued), 0, timeout=1)
    first.join(15)
    assert busy.get("pid"), "the busy job did not finish: its worker was killed"
    time.sleep(1)
    assert not queued.exists(), "a job answered as timed out ran later"
    assert pool.run(pid_after, 0, timeout=10) == busy["pid"]  # same worker, never replaced


def test_close_with_grace_ends_a_hung_pool_in_bounded_time(tmp_path):
    pool = WorkerPool(1)
    pool.warm_up()
    answer: dict = {}
    done = threading.Event()

    def call() -> None:
        try:
            answer["result"] = pool.run(pid_after, 60, timeout=120)
        except Exception as exc:  # noqa: BLE001 - what the caller hears is the point
            answer["error"] = exc
        done.set()

    threading.Thread(target=call, daemon=True).start()
    time.sleep(0.5)
    start = time.monotonic()
    pool.close(grace=0.5)
    took = time.monotonic() - start
    assert took < 0.5 + 7, f"close took {took:.1f} s"
    assert done.wait(5), "the caller of the killed job was never answered"
    assert "error" in answer, f"a killed job gave a result: {answer}"


def test_a_stopped_idle_worker_never_stalls_the_pool():
    """One of two workers is stopped (SIGSTOP) while idle. Every job is answered
    within its deadline plus a few seconds. If the stopped worker held a lock of
    the pool's queues (waiting for the next job, or just after sending a result:
    both seen here), one job fails and the pool is rebuilt; either way jobs go on."""
    with WorkerPool(2) as pool:
        pool.warm_up()
        pids = both_workers(pool, 0.3)
        assert len(pids) == 2, f"could not see both workers: {pids}"
        stopped = sorted(pids)[0]
        os.kill(stopped, signal.SIGSTOP)
        try:
            outcomes = []
            for _ in range(6):
                start = time.monotonic()
                try:
                    outcomes.append(pool.run(pid_after, 0, timeout=2))
                except JobTimeout:
                    outcomes.append("timeout")
                took = time.monotonic() - start
                assert took < 2 + 5, f"a job was answered after {took:.1f} s"
            assert outcomes.count("timeout") <= 1, outcomes
            assert stopped not in outcomes
            assert outcomes[-1] != "timeout"
        finally:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass


def test_a_worker_that_died_while_idle_is_replaced_and_the_job_runs(pool):
    """A worker killed between jobs (say, by the OOM killer) a while before the
    next instance comes: that instance is stored by a new worker, not failed."""
    worker = pool.run(pid_after, 0, timeout=10)
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:  # reaped
        time.sleep(0.05)
    time.sleep(0.5)  # "a while before": its exit has been reported to the pool
    # it was sent nothing, so nothing of this job was lost: it runs on a new worker
    assert pool.run(pid_after, 0, timeout=10) not in (worker, 0)


def test_a_worker_dying_mid_job_fails_that_job_only(tmp_path):
    with WorkerPool(2) as pool:
        pool.warm_up()
        marker = tmp_path / "pid"
        box: dict = {}

        def doomed() -> None:
            try:
                box["result"] = pool.run(pid_to_file_then_sleep, str(marker), 30, timeout=60)
            except BrokenProcessPool as exc:
                box["error"] = exc

        victim = threading.Thread(target=doomed)
        victim.start()
        deadline = time.monotonic() + 10
        while not marker.exists() or not marker.read_text():
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.02)
        doomed_pid = int(marker.read_text())
        other: dict = {}
        survivor = threading.Thread(target=lambda: other.update(pid=pool.run(pid_after, 1, timeout=10)))
        survivor.start()
        time.sleep(0.3)  # the survivor's job is now running on the other worker
        os.kill(doomed_pid, signal.SIGKILL)
        victim.join(15)
        survivor.join(15)
        assert "error" in box, f"the killed worker's job did not fail: {box}"
        assert other.get("pid") not in (None, doomed_pid), "the other worker's job was lost"
        # both workers serve again: the survivor and the replacement of the dead one
        pids = both_workers(pool, 0.2)
        assert other["pid"] in pids and doomed_pid not in pids and len(pids) == 2, pids


def test_the_deadline_counts_running_time_not_the_wait_for_a_worker(pool, tmp_path):
    """A job that waited for the busy worker gets its whole deadline once it runs."""
    started = tmp_path / "started"
    first = threading.Thread(target=lambda: pool.run(pid_to_file_then_sleep, str(started), 1.5, timeout=10))
    first.start()
    wait_until(lambda: started.exists() and started.read_text(), what="the first job to run")
    start = time.monotonic()
    pool.run(pid_after, 1.5, timeout=2.5)  # waits ~1.5 s, runs 1.5 s: ~3 s; not JobTimeout
    took = time.monotonic() - start
    first.join(10)
    assert took > 2.5, f"the job did not wait for the busy worker ({took:.1f} s)"


def test_a_job_that_asks_for_it_gets_its_worker_replaced_before_the_caller_hears(pool, tmp_path):
    """The caller gets the job's exception; the worker it ran in is gone by
    then, and the next jobs run in other, live workers."""
    from scp.errors import IndexCommitFailed

    marker = tmp_path / "pid"
    with pytest.raises(IndexCommitFailed):
        pool.run(fail_replacing_the_worker, str(marker), timeout=20)
    dead = int(marker.read_text())
    assert not pid_alive(dead), "the worker was given back to the pool"
    assert dead not in {pool.run(pid_after, 0, timeout=20) for _ in range(6)}


def test_the_parent_watch_works_with_descriptor_numbers_past_1024() -> None:
    """select() refuses a descriptor of 1024 or more: with many workers (each
    inherits the pipes of those before it) the parent watch of each later
    worker died with a traceback, and the worker outlived a killed parent."""
    code = (
        "import os, resource, subprocess, sys\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))\n"
        "held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]\n"
        "from scp.pool import _exit_with\n"
        "parent = subprocess.Popen(['sleep', '0.5'])\n"
        "_exit_with(parent.pid)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=cli_env())
    if "Too many open files" in r.stderr or "not allowed" in r.stderr:
        pytest.skip("cannot open 1100 files here")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("command", ["sort", "serve"])
def test_more_workers_than_allowed_is_a_usage_error(tmp_path: Path, command: str) -> None:
    args = [tmp_path, tmp_path / "dst"] if command == "sort" else ["--out", tmp_path / "out", "--port", "0"]
    r = run_cli(command, *args, "--workers", "100000", timeout=30)
    assert r.returncode == 2 and "--workers" in r.stderr and "256" in r.stderr, r.stderr

"""A stop signal in the first moments of a command: while it imports and
parses its command line, before ``serve`` or ``sort`` hold the signals.

A supervisor or a user may stop the process at any moment after it started
(``docker stop`` right after ``docker run``, a Ctrl-C at once). Before, such a
signal killed it (a death by SIGTERM, exit -15), gave click's ``Aborted!``
(exit 1 for SIGINT), or, for ``ls`` and ``reindex``, which never hold the
signals, nothing took it at all. The signal is sent as soon as the process
catches SIGTERM, which it now does from its first line on: the imports are
still running then.

``nohup`` and a shell's background job start a program with SIGHUP or SIGINT
ignored; those stay ignored, as in any Unix program.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import scp.__main__
from scp.config import STOP_SIGNALS

from conftest import cli_env, free_port, run_cli, wait_for_port


def _catches(pid: int, signum: int) -> bool | None:
    """Whether process `pid` has a handler for `signum` (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return False


def _start(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scp", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), **kwargs)


def _signal_at_once(args: list[str], signum: int) -> tuple[int, str]:
    """Run ``sortscp ARGS``; send `signum` as soon as it catches SIGTERM."""
    proc = _start(args)
    try:
        deadline = time.monotonic() + 30
        while (caught := _catches(proc.pid, signal.SIGTERM)) is False:
            assert time.monotonic() < deadline, "never caught SIGTERM"
            time.sleep(0.002)
        assert caught, f"ended before it caught SIGTERM: {proc.communicate()}"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_the_early_signals_are_the_stop_signals() -> None:
    assert scp.__main__.EARLY_STOP_SIGNALS == STOP_SIGNALS


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_serve_stopped_while_it_starts_exits_0_with_one_line(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "out"
    code, err = _signal_at_once(["serve", "--out", str(out), "--host", "127.0.0.1",
                                 "--port", str(free_port())], signum)
    assert code == 0, err
    assert "Traceback" not in err and "Aborted" not in err, err
    lines = err.strip().splitlines()
    # stopped during the imports (one line), or, on a fast machine, once it ran
    assert lines == [f"sortscp serve: stopped by {signal.Signals(signum).name}"] \
        or lines[-1].endswith("stopped: 0 instances stored, 0 failed"), err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_sort_stopped_while_it_starts_exits_with_its_stop_code(
        tmp_path: Path, signum: int, code: int) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "notes.txt").write_text("not DICOM\n")
    got, err = _signal_at_once(["sort", str(src), str(dst)], signum)
    assert got == code, err
    assert "Traceback" not in err and "Aborted" not in err, err
    assert (src / "notes.txt").read_text() == "not DICOM\n"


def test_ls_stopped_while_it_starts_exits_143(tmp_path: Path) -> None:
    """``ls`` holds no signals of its own: before, it took no SIGTERM at all."""
    out = tmp_path / "out"
    out.mkdir()
    code, err = _signal_at_once(["ls", str(out)], signal.SIGTERM)
    assert code == 143, err
    assert err.strip() == "sortscp ls: stopped by SIGTERM", err


def test_a_server_started_with_sighup_ignored_keeps_running_on_sighup(tmp_path: Path) -> None:
    """``nohup sortscp serve &``: closing the terminal must not stop it."""
    out = tmp_path / "out"
    port = free_port()
    proc = subprocess.Popen(
        ["nohup", sys.executable, "-m", "scp", "serve", "--out", str(out), "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(), cwd=tmp_path)
    try:
        wait_for_port(port, proc=proc)
        proc.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(2)
        wait_for_port(port, timeout=5)  # still accepting
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run_with(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c CODE ARGS`` with this checkout's CLI: CODE raises the
    signal itself, at one chosen moment (a real signal, sent to itself)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=cli_env(), timeout=120)


def test_reindex_stopped_while_it_writes_the_new_index_leaves_nothing(tmp_path: Path) -> None:
    """Found by an independent attack: a SIGTERM while ``reindex`` wrote its
    new index left ``.sortscp/index.sqlite.rebuild-PID`` behind."""
    import pydicom
    from pydicom.data import get_testdata_file

    out = tmp_path / "out"
    (out / "P" / "S").mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(out / "P" / "S" / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    code = """
import os, signal, sqlite3, sys
real = sqlite3.connect
def connect(path, *a, **k):
    conn = real(path, *a, **k)
    if ".rebuild-" in os.fspath(path):
        os.kill(os.getpid(), signal.SIGTERM)  # a service manager stops it now
    return conn
sqlite3.connect = connect
sys.argv = ["sortscp", "reindex", sys.argv[1]]
from scp.__main__ import main
main()
"""
    r = _run_with(code, str(out))
    assert r.returncode == 143, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "sortscp reindex: stopped by SIGTERM", r.stderr
    assert not [p.name for p in (out / ".sortscp").iterdir() if ".rebuild-" in p.name]
    assert run_cli("reindex", out).returncode == 0  # and the next one builds it


def test_a_stop_signal_that_lands_in_a_finalizer_still_stops_the_command(tmp_path: Path) -> None:
    """Found by an independent attack: Python runs a signal handler at the next
    bytecode, which may be a finalizer's; an exception raised there is printed
    and dropped, so the command went on (``echo`` exited 1, not 130, after a
    traceback)."""
    code = f"""
import os, signal, sys
class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands while a finalizer runs
        for _ in range(1000): pass  # (the handler runs here)
sys.argv = ["sortscp", "echo", "127.0.0.1", "{free_port()}", "--timeout", "2"]
import scp.__main__ as m
import scp.cli
real = scp.cli.main
def main():
    Finalized()  # freed at once: its __del__ runs now
    real()
scp.cli.main = main
m.main()
"""
    r = _run_with(code)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and "sortscp echo: stopped by SIGINT" in r.stderr, r.stderr

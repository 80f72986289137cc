"""Helpers for talking to real servers on 127.0.0.1, shared by the tests and the
benchmarks (so this module does not import pytest)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from pathlib import Path

#: Environment for DCMTK's tools: without TCP_NODELAY, their Debian build stalls
#: ~40 ms per instance on delayed ACKs.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(tool: str) -> str | None:
    """Path of DCMTK's `tool`, or None. pynetdicom installs its own ``storescu``
    and ``storescp`` scripts that may come first on PATH; only DCMTK's is wanted."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    for folder in dirs:
        candidate = Path(folder) / tool
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            out = subprocess.run(
                [str(candidate), "--version"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return str(candidate)
    return None


#: Ports handed out by :func:`free_port`: below Linux's ephemeral range
#: (32768-60999 by default), so no client socket of a test, nor a server bound
#: to port 0, takes one between its choice and the server's bind. Each pytest-xdist
#: worker draws from a slice of its own, so tests run in parallel never pick the
#: same port.
_PORTS = range(10000, 32000)
_next_port = [0]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    slices = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    size = len(_PORTS) // slices
    start = _PORTS.start + (int(worker) if worker.isdigit() else 0) % slices * size
    if not _next_port[0]:
        _next_port[0] = random.randrange(size)
    for _ in range(size):
        port = start + _next_port[0] % size
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + size - 1}")


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0,
                  proc: subprocess.Popen | None = None) -> None:
    """Return once `host:port` accepts a connection; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not accept connections within {timeout} s")


def descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found

"""Leftovers in the temporary area are swept while serving, not only at start."""

from __future__ import annotations

import os
import time

import pytest
from pydicom.uid import generate_uid
from test_serve_hostile import ct_dataset, scu_store

from scp._process import start_time
from scp.store.tmp import TMP_DIRNAME


def _dead_pid() -> int:
    for pid in range(4_000_000, 3_000_000, -7):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("no free pid found")


@pytest.mark.parametrize("reused", [False, True], ids=["its pid is free", "its pid runs again"])
def test_files_of_dead_processes_are_swept_when_an_association_ends(serve_process, tmp_path, reused):
    """Also when another process has the dead one's PID now: in a container
    the server is PID 1 every time, and a file a killed one left looked like
    the next one's own and stayed for an hour (the age sweep). A name holds
    its writer's start time too; a live process of that PID that started at
    another time did not write it."""
    out = tmp_path / "out"
    server = serve_process("--workers", "1", out=out)
    tmp = out / TMP_DIRNAME
    if reused:
        pid = server.proc.pid  # alive, as the new PID 1 is
        started = start_time(pid)
        assert started is not None
        left = [tmp / f"r-{pid}.{started - 1}-abandoned.dcm", tmp / f"w-{pid}.{started + 7}-half.part"]
        mine = tmp / f"r-{pid}.{started}-in-progress.dcm"  # the live server's own: kept
    else:
        pid = _dead_pid()
        left = [tmp / f"r-{pid}-abandoned.dcm", tmp / f"w-{pid}-half.part"]
        mine = tmp / f"r-{server.proc.pid}-in-progress.dcm"  # looks like one of the live server's own: kept
    for path in left:
        path.write_bytes(b"\0" * 4096)  # what a process killed mid-write leaves
    mine.write_bytes(b"\0" * 10)
    assert scu_store(server.port, ct_dataset(generate_uid())) == 0
    deadline = time.monotonic() + 10
    while any(p.exists() for p in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(p.exists() for p in left), sorted(os.listdir(tmp))
    assert mine.exists()

"""A large instance goes through ``serve`` without being held in memory."""

from __future__ import annotations

from pathlib import Path

from scp.net.status import SUCCESS

from conftest import ServeProcess, descendants
from serve_helpers import (
    big_instance,
    dataset_bytes,
    expected_path,
    peak_rss_kib,
    send_files,
)

INSTANCE_BYTES = 200 << 20
#: How much the peak memory of any server process (listener, workers) may grow
#: while it receives and files the instance: a small fraction of the instance.
GROWTH_LIMIT_KIB = (INSTANCE_BYTES // 10) >> 10


def test_large_instance_is_received_in_chunks(tmp_path: Path) -> None:
    src = big_instance(tmp_path / "big.dcm", INSTANCE_BYTES)
    server = ServeProcess(tmp_path / "out", "--workers", "1")
    try:
        pids = [server.proc.pid, *descendants(server.proc.pid)]
        before = {pid: peak_rss_kib(pid) for pid in pids}
        assert send_files(server.port, [src]) == {src: SUCCESS}
        peaks = {pid: peak_rss_kib(pid) for pid in pids}
    finally:
        assert server.terminate() == 0, server.log_path.read_text()
    growth = {pid: peaks[pid] - before[pid] for pid in pids}
    print(f"{INSTANCE_BYTES >> 20} MiB instance: peak RSS KiB per server process "
          f"before {before}, after {peaks}")
    assert max(growth.values()) < GROWTH_LIMIT_KIB, (before, peaks)
    assert max(peaks.values()) < (INSTANCE_BYTES // 2) >> 10, peaks
    target = tmp_path / "out" / expected_path(src)
    assert target.stat().st_size > INSTANCE_BYTES
    assert dataset_bytes(target) == dataset_bytes(src)

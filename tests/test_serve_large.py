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


def test_max_pdu_0_announces_the_largest_pdu_it_reads_and_receives_a_large_instance(tmp_path: Path) -> None:
    """``--max-pdu 0`` is "no limit" to a sender, which then puts a whole instance
    in one PDU; we read at most 64 MiB, so that is what is announced, and a
    larger instance arrives in PDUs of that size."""
    from pynetdicom import AE

    from scp.net._pynetdicom import UNLIMITED_PDATA_LIMIT

    from serve_helpers import CALLING_AET, file_identity, running_server

    src = big_instance(tmp_path / "big.dcm", 80 << 20)
    out = tmp_path / "out"
    with running_server(out, max_pdu=0) as server:
        ae = AE(ae_title=CALLING_AET)
        sop_class, _, ts = file_identity(src)
        ae.add_requested_context(sop_class, ts)
        assoc = ae.associate("127.0.0.1", server.address[1], ae_title="SORTSCP")
        assert assoc.is_established
        try:
            announced = assoc.acceptor.maximum_length
            status = assoc.send_c_store(src).Status
        finally:
            assoc.release()
    assert announced == UNLIMITED_PDATA_LIMIT == 64 << 20
    assert status == SUCCESS
    target = out / expected_path(src)
    assert dataset_bytes(target) == dataset_bytes(src)

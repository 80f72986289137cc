"""Limits and faults: too many associations, hostile connections, a full or
read-only disk, a worker that dies, a sender that aborts, a server killed in a
burst, a 1 GiB instance, and bad input on the command line.

Each fault is injected for real (a small tmpfs, SIGKILL, a dropped socket);
every wait is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from conftest import TEST_FILES, ServeProcess, cli_env, descendants, free_port, run_cli
from serve_helpers import layout_files, peak_rss_kib, tmp_area, tmp_files, wait_until

CT = TEST_FILES / "CT_small.dcm"
STEP = 20.0  #: seconds any single network step may take
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
RJ_LOCAL_LIMIT = (0x02, 0x03, 0x02)


# --- helpers ----------------------------------------------------------------------


def new_ae(calling: str = "FAULTSCU", ts: str | None = None) -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ts] if ts else None)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = STEP
    return ae


def associate(port: int, **kwargs):
    assoc = new_ae(**kwargs).associate("127.0.0.1", port, ae_title="SORTSCP")
    return assoc


def ct(uid: str, pixels: bytes | None = None) -> pydicom.Dataset:
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    if pixels is not None:
        side = int((len(pixels) // 2) ** 0.5)
        ds.Rows = ds.Columns = side
        ds.PixelData = pixels[: side * side * 2]
    return ds


def echo_ok(port: int) -> bool:
    assoc = associate(port)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return getattr(status, "Status", None) == SUCCESS


def store_one(port: int, ds: pydicom.Dataset) -> int | None:
    assoc = associate(port)
    assert assoc.is_established, "association refused"
    status = getattr(assoc.send_c_store(ds), "Status", None)
    assoc.release()
    return status


def dataset_offset(f) -> int:
    """Offset of the dataset in a Part 10 file (after preamble and File Meta)."""
    f.seek(132)
    head = f.read(12)
    assert head[:4] == b"\x02\x00\x00\x00", "no File Meta group length"
    return 144 + struct.unpack("<I", head[8:12])[0]


def dataset_digest(path: Path) -> tuple[int, str]:
    """(size, sha256) of the dataset part of a Part 10 file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(dataset_offset(f))
        size = 0
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def write_big_instance(path: Path, nbytes: int, uid: str) -> Path:
    """A real CT instance (CT_small's header) whose pixel data is enlarged to
    `nbytes`, written in chunks so the test never holds it in memory."""
    ds = pydicom.dcmread(CT)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    columns = 16384
    rows = nbytes // (columns * 2)
    ds.Rows, ds.Columns = rows, columns
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    length = rows * columns * 2
    block = random.Random(uid).randbytes(1 << 22)
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        left = length
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
    return path


def worker_pids(server_pid: int) -> list[int]:
    """The pool's worker processes: children of the forkserver, itself a child of the server."""
    below = descendants(server_pid)
    forkservers = {p for p in below if _ppid(p) == server_pid and "forkserver" in _cmdline(p)}
    return sorted(p for p in below if _ppid(p) in forkservers)


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except OSError:
        return -1


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- limits -----------------------------------------------------------------------


def test_extra_association_is_rejected_with_local_limit_exceeded(serve_process):
    server = serve_process("--max-associations", "2")
    held = [associate(server.port) for _ in range(2)]
    try:
        assert all(a.is_established for a in held), server.log()
        extra = associate(server.port)
        assert not extra.is_established and extra.is_rejected, server.log()
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == RJ_LOCAL_LIMIT
        # the one line an admin chasing a modality's failed sends looks for
        wait_until(lambda: "rejected association from" in server.log(), timeout=10, what="the line")
        (line,) = [x for x in server.log().splitlines() if "rejected association from" in x]
        assert "WARNING" in line and "2 associations are open" in line and "--max-associations" in line, line
        # A health check (a C-ECHO alone: the image's HEALTHCHECK) is still answered by a
        # server full of senders, which it would report as down; a restarter would kill it.
        check = run_cli("echo", "127.0.0.1", server.port, "--called-aet", "SORTSCP", "--aet", "HEALTHCHECK",
                        "--timeout", "10", timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr + server.log()
        # ... up to a few of them at once: beyond that, a C-ECHO alone is turned away too
        echoes = [_echo_only_ae().associate("127.0.0.1", server.port, ae_title="SORTSCP") for _ in range(2)]
        held += echoes
        assert all(a.is_established for a in echoes), server.log()
        assert echoes[0].send_c_echo().Status == SUCCESS
        another = _echo_only_ae().associate("127.0.0.1", server.port, ae_title="SORTSCP")
        assert another.is_rejected, server.log()
        rj = another.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == RJ_LOCAL_LIMIT
    finally:
        for a in held:
            a.release()
    wait_until(lambda: echo_ok(server.port), what="a free association slot")
    assert "Traceback" not in server.log()


def _echo_only_ae() -> AE:
    ae = AE(ae_title="MONITOR")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = STEP
    return ae


def test_max_pdu_is_what_the_server_announces(serve_process):
    server = serve_process("--max-pdu", "16384")
    assoc = associate(server.port)
    try:
        assert assoc.acceptor.maximum_length == 16384
        status = assoc.send_c_store(ct("1.2.826.0.1.3680043.10.1.1"))
        assert status.Status == SUCCESS, server.log()
    finally:
        assoc.release()


def _hostile(port: int, payload: bytes, results: dict, name: str, ready: list) -> None:
    """Connect, send `payload`, then wait (bounded) for the server to close."""
    with socket.create_connection(("127.0.0.1", port), timeout=STEP) as s:
        s.settimeout(STEP * 2)
        if payload:
            s.sendall(payload)
        ready.append(name)
        try:
            while s.recv(4096):
                pass
            results[name] = "closed"
        except ConnectionResetError:
            results[name] = "closed"
        except TimeoutError:
            results[name] = "still open"


HOSTILE = {
    "silent": b"",
    "garbage": bytes([0xEE]) + random.Random(1).randbytes(63),
    "half-a-header": b"\x01\x00",
    "pdu-cut-short": b"\x01\x00\x00\x00\x03\xe8" + b"\x00" * 10,  # announces 1000 bytes, sends 10
}


def test_hostile_connections_are_dropped_without_delaying_others(serve_process):
    """pynetdicom's stock server waits for ever for the rest of a PDU; here
    every accepted socket has the network timeout."""
    server = serve_process("--acse-timeout", "2", "--network-timeout", "2", "--max-associations", "8")
    results: dict[str, str] = {}
    ready: list[str] = []
    threads = [threading.Thread(target=_hostile, args=(server.port, payload, results, name, ready),
                                daemon=True)
               for name, payload in HOSTILE.items()]
    for t in threads:
        t.start()
    wait_until(lambda: len(ready) == len(HOSTILE), what="the hostile connections")
    ds = ct("1.2.826.0.1.3680043.10.1.2")
    assert store_one(server.port, ds) == SUCCESS, server.log()  # while they hang on
    for t in threads:
        t.join(STEP * 3)
    assert results == {name: "closed" for name in HOSTILE}, server.log()
    assert echo_ok(server.port), server.log()
    assert len(layout_files(server.out)) == 1


def test_idle_association_is_dropped(serve_process):
    server = serve_process("--network-timeout", "1")
    ae = new_ae()
    ae.network_timeout = None  # the client itself would wait for ever
    assoc = ae.associate("127.0.0.1", server.port, ae_title="SORTSCP")
    assert assoc.is_established
    wait_until(lambda: not assoc.is_alive(), what="the server to drop the idle association")
    assert assoc.is_aborted
    assert echo_ok(server.port)


# --- disk full, read-only folder ---------------------------------------------------


def test_disk_full_fails_the_instance_and_recovers(tmpfs):
    out = tmpfs("2m")
    server = ServeProcess(out, "--workers", "1")
    try:
        pixels = random.Random(2).randbytes(384 * 384 * 2)  # ~300 KB per instance
        sent: dict[str, int | None] = {}
        assoc = associate(server.port)
        assert assoc.is_established, server.log()
        for i in range(20):
            uid = f"1.2.826.0.1.3680043.10.2.{i}"
            sent[uid] = getattr(assoc.send_c_store(ct(uid, pixels)), "Status", None)
            if sent[uid] != SUCCESS:
                break
        assert assoc.is_established, "the association did not survive the full disk"
        assoc.release()
        failed = [u for u, s in sent.items() if s != SUCCESS]
        stored = [u for u, s in sent.items() if s == SUCCESS]
        assert len(failed) == 1 and sent[failed[0]] == OUT_OF_RESOURCES, f"{sent}\n{server.log()}"
        names = {p.name for p in layout_files(out)}
        assert names == {f"{u}.dcm" for u in stored}, "something partial carries a final name"
        for p in layout_files(out):
            assert pydicom.dcmread(p).PixelData == pixels[: 384 * 384 * 2]
        wait_until(lambda: tmp_files(out) == [], what="the temporary folder to be empty")
        assert "No space left on device" in server.log()
        failed_line = [line for line in server.log().splitlines() if failed[0] in line]
        assert failed_line and "the disk is full" in failed_line[0], server.log()
        # Now not even the incoming dataset fits: still a status, still the same association.
        filler = out / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while f.write(bytes(4096)):
                    pass
            except OSError:
                pass
        assoc = associate(server.port)
        uid = "1.2.826.0.1.3680043.10.2.98"
        seen = len(server.log().splitlines())
        assert getattr(assoc.send_c_store(ct(uid, pixels)), "Status", None) == OUT_OF_RESOURCES
        assert echo_ok(server.port) and assoc.is_established, server.log()
        assoc.release()
        # one line for the one instance refused, naming it (there was a second,
        # naming neither the sender nor the instance)
        errors = [line for line in server.log().splitlines()[seen:] if " ERROR " in line]
        assert len(errors) == 1 and uid in errors[0], server.log()
        assert "cannot write the incoming dataset" in errors[0] and "the disk is full" in errors[0]
        assert f"{uid}.dcm" not in {p.name for p in layout_files(out)}
        wait_until(lambda: tmp_files(out) == [], what="the temporary folder to be empty")
        # free space: the server stores again
        filler.unlink()
        for p in layout_files(out)[:3]:
            p.unlink()
        again = ct("1.2.826.0.1.3680043.10.2.99", pixels)
        assert store_one(server.port, again) == SUCCESS, server.log()
        assert any(p.name == f"{again.SOPInstanceUID}.dcm" for p in layout_files(out))
    finally:
        server.kill()


def _fill_to(mount: Path, filler: Path, free_bytes: int) -> None:
    """Make `mount` have about `free_bytes` free (a filler file grown or cut)."""
    def free() -> int:
        st = os.statvfs(mount)
        return st.f_bavail * st.f_frsize
    if free() < free_bytes and filler.exists():
        os.truncate(filler, max(0, filler.stat().st_size - (free_bytes - free())))
    for _ in range(10_000):
        left = free() - free_bytes
        if left <= 0:
            return
        try:
            with open(filler, "ab") as f:
                f.write(b"\1" * (min(left, 1 << 20) if left > 65536 else 4096))
        except OSError:
            return


def test_a_disk_that_fills_between_file_and_index_row_never_blocks_the_retry(tmpfs):
    """Free space stepped down a page at a time, one new instance a step, so
    that the disk fills at every point of a store, the index commit after the
    file's rename included. Each instance that failed (0xA700) is then sent
    again once space is back: every retry succeeds at once (one whose index
    commit had failed used to wait 30 s for its own live worker's claim and
    fail again, until a restart), and the index agrees with the tree."""
    mount = tmpfs("6m")
    out, filler = mount / "out", mount / "filler"
    server = ServeProcess(out, "--workers", "1")
    try:
        assert store_one(server.port, ct("1.2.826.0.1.3680043.10.7.0")) == SUCCESS, server.log()
        failed: list[pydicom.Dataset] = []
        assoc = associate(server.port)
        assert assoc.is_established, server.log()
        statuses = set()
        for step in range(40):
            _fill_to(mount, filler, (40 - step) * 4096)
            ds = ct(f"1.2.826.0.1.3680043.10.7.{step + 1}")
            statuses.add(status := getattr(assoc.send_c_store(ds), "Status", None))
            if status != SUCCESS:
                failed.append(ds)
            if not assoc.is_established:
                assoc = associate(server.port)
        assoc.release()
        assert failed, "the disk never filled"
        # never 0xC211 (the handler failed: a sender does not retry it), which a
        # settle of the index after the worker's failed commit gave
        assert statuses <= {SUCCESS, OUT_OF_RESOURCES}, f"{statuses}\n{server.log()}"
        # each failure in plain words, wherever the disk filled (SQLite's own
        # 'OperationalError: database or disk is full' was not)
        lines = [line for line in server.log().splitlines() if "C-STORE failed" in line]
        assert lines and all("the disk is full" in line for line in lines), "\n".join(lines)
        filler.unlink()
        for ds in failed:
            started = time.monotonic()
            status = store_one(server.port, ds)
            took = time.monotonic() - started
            assert status == SUCCESS and took < 10, f"{ds.SOPInstanceUID}: {status} after {took:.1f} s\n{server.log()}"
        files = layout_files(out)
        assert sorted(p.name for p in files) == sorted(f"{u}.dcm" for u in {
            "1.2.826.0.1.3680043.10.7.0", *(f"1.2.826.0.1.3680043.10.7.{i + 1}" for i in range(40))})
        listed = json.loads(run_cli("ls", "--json", out).stdout)
        count = sum(series["instances"] for study in listed["studies"] for series in study["series"])
        assert count == len(files), f"the index lists {count}, the tree holds {len(files)}\n{server.log()}"
        assert "Traceback" not in server.log()
    finally:
        server.kill()


def test_read_only_output_fails_the_instance_and_recovers(tmpfs):
    out = tmpfs("8m")
    server = ServeProcess(out, "--workers", "1")
    try:
        # A read-only bind mount over the folder: what new opens see when the file
        # system goes read-only (a plain remount,ro is refused while the server
        # holds its instance index open for writing).
        subprocess.run(["mount", "--bind", str(out), str(out)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(out)], check=True, capture_output=True)
        ds = ct("1.2.826.0.1.3680043.10.3.1")
        try:
            assert store_one(server.port, ds) == OUT_OF_RESOURCES, server.log()
            assert layout_files(out) == []
            assert "Read-only file system" in server.log()
        finally:
            subprocess.run(["umount", str(out)], check=True, capture_output=True)
        assert store_one(server.port, ds) == SUCCESS, server.log()
        assert [p.name for p in layout_files(out)] == [f"{ds.SOPInstanceUID}.dcm"]
    finally:
        server.kill()


# --- a worker dies ------------------------------------------------------------------


def test_a_worker_killed_mid_instance_fails_it_and_the_pool_recovers(serve_process, tmp_path, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    big = write_big_instance(tmp_path / "big.dcm", 64 << 20, "1.2.826.0.1.3680043.10.4.1")
    server = serve_process("--workers", "2", "--log-level", "DEBUG")
    out = server.out
    box: dict[str, object] = {}
    workers = worker_pids(server.proc.pid)
    assert workers, "no worker processes found"
    # Freeze the workers, so that the instance is surely still in the pool's
    # hands when they die.
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)

    def send() -> None:
        assoc = associate(server.port, ts=ExplicitVRLittleEndian)
        box["status"] = getattr(assoc.send_c_store(big), "Status", None)
        assoc.release()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    uid = "1.2.826.0.1.3680043.10.4.1"
    wait_until(lambda: f"received {uid} from FAULTSCU; filing it" in server.log()
               or not sender.is_alive(), timeout=120, what="the instance to reach the pool")
    kill_all(workers)
    sender.join(120)
    assert box.get("status") == OUT_OF_RESOURCES, f"{box}\n{server.log()}"
    assert layout_files(out) == []
    # what the dead worker was writing is removed
    wait_until(lambda: tmp_files(out) == [], what=f"no temporary file left ({tmp_files(out)})")
    assert "worker" in server.log()
    # later instances succeed on a new pool
    ds = ct("1.2.826.0.1.3680043.10.4.2")
    assert store_one(server.port, ds) == SUCCESS, server.log()
    assert [p.name for p in layout_files(out)] == [f"{ds.SOPInstanceUID}.dcm"]
    new_workers = worker_pids(server.proc.pid)
    assert new_workers and not set(new_workers) & set(workers)


# --- the sender aborts ---------------------------------------------------------------


# pynetdicom's client may complain in its own thread about the abort it was asked for.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("how", ["abort", "drop"])
def test_sender_stopping_mid_transfer_leaves_no_file(serve_process, tmp_path, monkeypatch, how):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    big = write_big_instance(tmp_path / "big.dcm", 128 << 20, "1.2.826.0.1.3680043.10.5.1")
    server = serve_process()
    out = server.out
    assoc = associate(server.port, ts=ExplicitVRLittleEndian)
    assert assoc.is_established
    sender = threading.Thread(target=lambda: assoc.send_c_store(big), daemon=True)
    sender.start()

    def arriving() -> bool:
        return any((tmp_area(out) / n).stat().st_size > (1 << 20) for n in tmp_files(out)
                   if (tmp_area(out) / n).exists())

    wait_until(arriving, what="the dataset to start arriving")
    if how == "abort":
        assoc.abort()
    else:  # the connection just goes away, no A-ABORT
        assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    wait_until(lambda: tmp_files(out) == [], what=f"no temporary file left ({tmp_files(out)})")
    assert layout_files(out) == []
    assert echo_ok(server.port), server.log()
    wait_until(lambda: "association from FAULTSCU" in server.log(), what="the association line")
    line = next(ln for ln in server.log().splitlines() if "association from FAULTSCU" in ln)
    assert "aborted: 0 stored, 0 failed" in line, line
    # (pynetdicom's client thread may stay blocked until its own DIMSE timeout: not ours to wait for)


# --- the server is killed ------------------------------------------------------------


def test_sigkill_during_a_burst_keeps_every_acknowledged_instance(tmp_path):
    out = tmp_path / "out"
    server = ServeProcess(out, "--workers", "2")
    statuses: dict[str, int | None] = {}
    datasets = {f"1.2.826.0.1.3680043.10.6.{i}": ct(f"1.2.826.0.1.3680043.10.6.{i}") for i in range(200)}

    def burst() -> None:
        ae = new_ae(ts=ImplicitVRLittleEndian)
        ae.dimse_timeout = ae.network_timeout = 3  # the server will vanish
        assoc = ae.associate("127.0.0.1", server.port, ae_title="SORTSCP")
        try:
            for uid, ds in datasets.items():
                if not assoc.is_established:
                    return
                statuses[uid] = getattr(assoc.send_c_store(ds), "Status", None)
        except Exception:  # the server vanished mid-send
            return

    sender = threading.Thread(target=burst, daemon=True)
    sender.start()
    others: list[int] = []
    try:
        # (acknowledged, not just on disk: a file is in place before its C-STORE is answered)
        wait_until(lambda: sum(s == SUCCESS for s in list(statuses.values())) >= 20, timeout=60,
                   what="20 instances acknowledged")
        others = descendants(server.proc.pid)
        assert len(worker_pids(server.proc.pid)) == 2
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(STEP)
        # the workers and the forkserver do not outlive the server
        wait_until(lambda: not [p for p in others if _running(p)], what=f"{others} to exit")
    finally:
        server.kill()
        kill_all([p for p in others if _running(p)])
    sender.join(STEP * 2)
    acknowledged = [uid for uid, s in statuses.items() if s == SUCCESS]
    assert 20 <= len(acknowledged) < len(datasets), "the kill did not land during the burst"
    by_name = {p.name: p for p in layout_files(out)}
    for uid in acknowledged:
        path = by_name.get(f"{uid}.dcm")
        assert path is not None, f"{uid} was acknowledged but is not on disk"
        with open(path, "rb") as f:
            f.seek(dataset_offset(f))
            assert f.read() == encode(datasets[uid], True, True), f"{uid}: dataset bytes differ"
    for path in by_name.values():  # nothing half-written under a final name
        ds = pydicom.dcmread(path)
        assert len(ds.PixelData) == len(datasets[ds.SOPInstanceUID].PixelData), path
    restarted = ServeProcess(out, "--workers", "1")
    try:
        # the temporary files of the killed server and its workers are gone
        assert tmp_files(out) == [], restarted.log()
        assert echo_ok(restarted.port), restarted.log()
        ds = ct("1.2.826.0.1.3680043.10.6.999")
        assert store_one(restarted.port, ds) == SUCCESS, restarted.log()
    finally:
        restarted.kill()


# --- a 1 GiB instance ------------------------------------------------------------------

#: Peak resident memory allowed for the server and for each worker while a
#: 1 GiB instance goes through: a small fraction of the instance.
MEMORY_BOUND_KIB = 256 * 1024


def test_a_1gib_instance_is_stored_with_bounded_memory(serve_process, tmp_path, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    size = 1 << 30
    big = write_big_instance(tmp_path / "big.dcm", size, "1.2.826.0.1.3680043.10.7.1")
    server = serve_process("--workers", "1", "--dimse-timeout", "600", "--network-timeout", "600")
    ae = new_ae(ts=ExplicitVRLittleEndian)
    ae.dimse_timeout = ae.network_timeout = 600
    assoc = ae.associate("127.0.0.1", server.port, ae_title="SORTSCP")
    assert assoc.is_established
    status = getattr(assoc.send_c_store(big), "Status", None)
    assoc.release()
    assert status == SUCCESS, server.log()
    peaks = {pid: peak_rss_kib(pid) for pid in [server.proc.pid, *worker_pids(server.proc.pid)]}
    (stored,) = layout_files(server.out)
    assert dataset_digest(stored) == dataset_digest(big)
    stored.unlink()  # give the disk space back early
    print(f"peak resident memory (VmHWM, MiB) for a 1 GiB instance: "
          f"{ {pid: kib // 1024 for pid, kib in peaks.items()} }")
    assert len(peaks) >= 2, "no worker found"
    assert max(peaks.values()) < MEMORY_BOUND_KIB, peaks


# --- bad input on the command line -------------------------------------------------------


def _cli_error(proc: subprocess.CompletedProcess, *expected: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output, output
    for text in expected:
        assert text in output, output


def test_unknown_template_keyword(tmp_path):
    proc = run_cli("serve", "--out", tmp_path / "out", "--port", free_port(),
                   "--template", "{NoSuchKeyword}/{SOPInstanceUID}.dcm", timeout=60)
    _cli_error(proc, "NoSuchKeyword")


@pytest.mark.parametrize("aet", ["THIS_TITLE_IS_TOO_LONG", "BACK\\SLASH"])
def test_invalid_ae_title(tmp_path, aet):
    proc = run_cli("serve", "--out", tmp_path / "out", "--port", free_port(), "--aet", aet,
                   timeout=60)
    _cli_error(proc, "an AE title")
    assert not (tmp_path / "out").exists()


def test_output_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_cli("serve", "--out", tmp_path / "file" / "out", "--host", "127.0.0.1",
                   "--port", free_port(), timeout=60)
    _cli_error(proc, "cannot write to the output folder", "Not a directory")


def test_a_refused_permission_names_who_we_are_and_who_owns_the_folder(tmp_path):
    """In a container, "Permission denied" alone leaves the operator to find
    the two ids that must agree (tests run as root, whom no folder refuses:
    the line is built from the error as the start would get it)."""
    import errno

    from scp.net.server import _who

    folder = tmp_path / "data"
    folder.mkdir(mode=0o755)
    st = folder.stat()
    text = _who(PermissionError(errno.EACCES, "Permission denied", str(folder / ".sortscp-tmp")), folder)
    assert f"runs as uid {os.getuid()}, gid {os.getgid()}" in text
    assert f"{folder} is owned by uid {st.st_uid}, gid {st.st_gid}, mode drwxr-xr-x" in text
    assert _who(OSError(errno.ENOTDIR, "Not a directory"), folder) == ""


@pytest.mark.parametrize("events", [False, True], ids=["plain", "with a hook"])
def test_port_in_use(tmp_path, events):
    """One clear error; with the events pipeline on, no false 'events not
    delivered' warning before it (its stop used to run twice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        hook = ("--on-stored", "true") if events else ()
        proc = run_cli("serve", "--out", tmp_path / "out", "--host", "127.0.0.1", "--port", port, *hook,
                       timeout=60)
    _cli_error(proc, f"cannot listen on 127.0.0.1:{port}", "Address already in use")
    assert "not delivered" not in proc.stdout + proc.stderr, proc.stderr
    assert "stopped:" not in proc.stdout + proc.stderr, proc.stderr  # it never started


def test_a_second_server_on_one_output_folder_is_refused(tmp_path):
    """Two servers on one folder (the image started twice on one volume):
    from two containers, each took the other's live processes for dead ones
    (process IDs are per namespace) and settled their instances' claims, so
    senders got 0xA700. The second one is refused, whichever namespace it is
    in (the lock is the folder's), and the first serves on."""
    first = ServeProcess(tmp_path / "out")
    try:
        assert store_one(first.port, ct("1.2.826.0.1.3680043.10.16.6")) == SUCCESS, first.log()
        proc = run_cli("serve", "--out", tmp_path / "out", "--host", "127.0.0.1", "--port", free_port(),
                       timeout=60)
        _cli_error(proc, f"another server (pid {first.proc.pid}) files into {tmp_path / 'out'}",
                   "one server per output folder")
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert store_one(first.port, ct("1.2.826.0.1.3680043.10.16.7")) == SUCCESS, first.log()
    finally:
        assert first.terminate() == 0, first.log()
    again = ServeProcess(tmp_path / "out")  # the folder is free again once the first has stopped
    try:
        assert store_one(again.port, ct("1.2.826.0.1.3680043.10.16.8")) == SUCCESS, again.log()
    finally:
        assert again.terminate() == 0, again.log()
    assert len(layout_files(tmp_path / "out")) == 3


def _layout_digests(root: Path) -> dict[str, str]:
    return {os.fspath(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in layout_files(root)}


def test_folders_inside_or_around_a_served_folder_are_refused_or_left_alone(tmp_path):
    """The folder lock covers OUT, not what lies under it: a second server or
    a sort into ``OUT/sub`` was accepted (its files behind the index's
    back), so were a server or a sort into a folder that holds OUT (their
    index took OUT's files for their own), and ``sort --mode move PARENT
    PARENT`` moved the running server's files out of OUT. Now: refused at
    start (2 for serve, 75 for sort, nothing touched), the served folder left
    alone by a move's walk (one failed entry, exit 1), and a copy out of it
    still allowed."""
    parent = tmp_path / "parent"
    out = parent / "out"
    loose = parent / "loose"
    loose.mkdir(parents=True)
    for n in (1, 2):
        ct(f"1.2.826.0.1.3680043.10.16.{20 + n}").save_as(loose / f"f{n}.dcm", enforce_file_format=True)
    first = ServeProcess(out)
    try:
        assert store_one(first.port, ct("1.2.826.0.1.3680043.10.16.20")) == SUCCESS, first.log()
        served = _layout_digests(out)
        assert len(layout_files(out)) == 1
        inner = out / "inner"
        proc = run_cli("serve", "--out", inner, "--host", "127.0.0.1", "--port", free_port(), timeout=60)
        _cli_error(proc, f"{inner} is inside {out}, the output folder of a running sortscp "
                   f"(pid {first.proc.pid})", "give this server a folder outside it")
        assert not inner.exists()
        for args in ([loose, inner], [loose, inner, "--dry-run"],
                     [out, tmp_path / "elsewhere", "--mode", "move"],
                     [layout_files(out)[0].parent, tmp_path / "elsewhere", "--mode", "move"]):
            proc = run_cli("sort", *args, timeout=120)
            assert proc.returncode == 75, (args, proc.stdout, proc.stderr)
            assert "the output folder of a running sortscp" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr, proc.stderr
        assert not inner.exists() and not (tmp_path / "elsewhere").exists()
        assert _layout_digests(out) == served

        # a folder that holds a served one: its index would take the server's files for its own
        for folder in (parent, tmp_path):
            proc = run_cli("serve", "--out", folder, "--host", "127.0.0.1", "--port", free_port(), timeout=60)
            _cli_error(proc, f"{folder} holds {out}, the output folder of a running sortscp "
                       f"(pid {first.proc.pid})", "give this server a folder that holds no other's")
            for args in ([loose, folder], [loose, folder, "--dry-run"], [parent, folder, "--mode", "move"]):
                proc = run_cli("sort", *args, timeout=120)
                assert proc.returncode == 75, (args, proc.stdout, proc.stderr)
                assert f"holds {out}, the output folder of a running sortscp" in proc.stderr, proc.stderr
                assert "Traceback" not in proc.stderr, proc.stderr
            assert not (folder / ".sortscp").exists()
        assert sorted(p.name for p in loose.iterdir()) == ["f1.dcm", "f2.dcm"]
        assert _layout_digests(out) == served

        proc = run_cli("sort", parent, tmp_path / "moved", "--mode", "move", timeout=120)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert f"{out}: not moved: this folder is the output folder of a running sortscp" in (
            proc.stdout + proc.stderr), (proc.stdout, proc.stderr)
        assert _layout_digests(out) == served  # the server's files, all still where it filed them
        assert not loose.exists()  # (emptied folders are removed)
        moved = layout_files(tmp_path / "moved")
        assert sorted(p.name for p in moved) == [f"1.2.826.0.1.3680043.10.16.{20 + n}.dcm" for n in (1, 2)]

        proc = run_cli("sort", out, tmp_path / "copied", timeout=120)  # reading a served folder is fine
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        assert [p.name for p in layout_files(tmp_path / "copied")] == ["1.2.826.0.1.3680043.10.16.20.dcm"]
        assert store_one(first.port, ct("1.2.826.0.1.3680043.10.16.23")) == SUCCESS, first.log()
    finally:
        assert first.terminate() == 0, first.log()
    assert "Traceback" not in first.log()


def test_a_folder_that_holds_a_served_folder_through_a_bind_mount_is_refused(tmp_path):
    """A folder that holds a served OUT was found by the path the server has
    OUT open under, so a server whose OUT is reached through a bind mount (a
    container's volume, ``mount --bind``) was not seen: a server or a sort on
    the folder that really holds it was accepted, and its index took the
    served files for its own. Now each path is placed on its file system
    through the mounts: refused (2 for serve, 75 for sort), nothing made."""
    real = tmp_path / "archive"
    (real / "site").mkdir(parents=True)
    bound = tmp_path / "volume"
    bound.mkdir()
    _bind(real / "site", bound)
    try:
        server = ServeProcess(bound / "out")  # the server names its folder volume/out
        try:
            assert store_one(server.port, ct("1.2.826.0.1.3680043.10.16.40")) == SUCCESS, server.log()
            loose = tmp_path / "loose"
            loose.mkdir()
            ct("1.2.826.0.1.3680043.10.16.41").save_as(loose / "x.dcm", enforce_file_format=True)
            for folder in (real, real / "site"):
                proc = run_cli("serve", "--out", folder, "--host", "127.0.0.1", "--port", free_port(), timeout=60)
                _cli_error(proc, f"{folder} holds {bound / 'out'}, the output folder of a running sortscp "
                           f"(pid {server.proc.pid})")
                proc = run_cli("sort", loose, folder, timeout=120)
                assert proc.returncode == 75, (proc.stdout, proc.stderr)
                assert f"holds {bound / 'out'}, the output folder of a running sortscp" in proc.stderr, proc.stderr
                assert not (folder / ".sortscp").exists()
            proc = run_cli("sort", loose, tmp_path / "elsewhere", timeout=120)  # beside it: fine
            assert proc.returncode == 0, (proc.stdout, proc.stderr)
            assert [p.name for p in layout_files(real / "site" / "out")] == ["1.2.826.0.1.3680043.10.16.40.dcm"]
        finally:
            assert server.terminate() == 0, server.log()
    finally:
        subprocess.run(["umount", "-l", str(bound)], check=False)


def _bind(source: Path, target: Path) -> None:
    """``mount --bind source target``, or the test is skipped where that cannot be done."""
    mount = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mount.stderr.strip()}")


@pytest.mark.parametrize("mode", ["move", "copy"])
def test_a_sort_in_place_through_a_bind_mount_of_dst_is_a_sort_in_place(tmp_path, mode):
    """``sort --mode move B D`` where B is a bind mount of D is a sort in
    place; the move was refused (75), its hold on SRC colliding with its own
    on DST, and, as a copy did, the walk then met the files the run had just
    filed into the layout's folders (a batch of 64 files at a time) and sorted them again (a second row each).
    Now it runs as ``sort D D`` does: one row per entry."""
    dst, bound = tmp_path / "d", tmp_path / "b"
    (dst / "AA").mkdir(parents=True)  # (walked before the layout's folders it is filed into)
    bound.mkdir()
    for n in range(4):
        ds = ct(f"1.2.826.0.1.3680043.10.16.5{n}")
        ds.PatientID = f"P{n % 2}"
        ds.save_as(dst / f"f{n}.dcm", enforce_file_format=True)
    proc = run_cli("sort", dst, dst, "--mode", "move", timeout=120)  # the layout, made in place
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    for n in range(300):
        ds = ct(f"1.2.826.0.1.3680043.10.16.{600 + n}")
        ds.PatientID = f"P{n % 2}"
        ds.save_as(dst / "AA" / f"f{n}.dcm", enforce_file_format=True)
    _bind(dst, bound)
    try:
        proc = run_cli("sort", bound, dst, "--mode", mode, "--workers", "1", timeout=120)
    finally:
        subprocess.run(["umount", "-l", str(bound)], check=False)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "300 new, 0 replaced, 4 already in place, 0 kept as ~N, 0 skipped" in proc.stdout + proc.stderr, (
        proc.stdout, proc.stderr)
    filed = [p for p in dst.rglob("*.dcm") if p.parent.name != "AA"]
    assert sorted(p.name for p in filed) == sorted(
        [f"1.2.826.0.1.3680043.10.16.5{n}.dcm" for n in range(4)] + [f"1.2.826.0.1.3680043.10.16.{600 + n}.dcm" for n in range(300)])
    assert len(list((dst / "AA").glob("*.dcm"))) == (300 if mode == "copy" else 0)  # (a move's: gone)


def test_an_output_folder_that_is_a_mount_point_is_not_said_to_hold_itself(tmp_path):
    """OUT the root of a file system (a volume, a disk): a second server on it
    and a sort into it were refused as "OUT holds OUT"; they are refused as
    for any served folder."""
    out = tmp_path / "out"
    out.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(out)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        server = ServeProcess(out)
        try:
            assert store_one(server.port, ct("1.2.826.0.1.3680043.10.16.70")) == SUCCESS, server.log()
            proc = run_cli("serve", "--out", out, "--host", "127.0.0.1", "--port", free_port(), timeout=60)
            _cli_error(proc, "one server per output folder")
            assert "holds" not in proc.stdout + proc.stderr
            loose = tmp_path / "loose"
            loose.mkdir()
            ct("1.2.826.0.1.3680043.10.16.71").save_as(loose / "x.dcm", enforce_file_format=True)
            proc = run_cli("sort", loose, out, timeout=120)
            assert proc.returncode == 75 and "a running server (sortscp serve) holds the instance index" in \
                proc.stderr, (proc.stdout, proc.stderr)
        finally:
            assert server.terminate() == 0, server.log()
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


def test_a_folder_served_from_another_mount_namespace_under_a_name_of_ours_is_not_refused(tmp_path):
    """A server in another mount namespace (a container) serves ``X/inner``,
    which there is a bind mount of an unrelated folder U; here ``X/inner`` is
    an empty folder. A sort into X was refused, its path taken at its word;
    now the server's folder is placed through its mounts: X is free, U is held."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    x, u = tmp_path / "x", tmp_path / "u"
    (x / "inner").mkdir(parents=True)
    u.mkdir()
    port = free_port()
    log_path = tmp_path / "serve.log"
    script = (f'mount --bind "$1" "$2" && exec {sys.executable} -m scp serve --out "$2" --host 127.0.0.1 '
              f"--port {port}")
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen([unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                                   str(u), str(x / "inner")], stdout=log_file, stderr=subprocess.STDOUT,
                                  env=cli_env(), start_new_session=True)
    try:
        wait_until(lambda: "listening on" in log_path.read_text() or server.poll() is not None, timeout=60,
                   what="the server in its own mount namespace")
        if server.poll() is not None:
            pytest.skip(f"cannot serve in a mount namespace of its own here: {log_path.read_text()[-500:]}")
        loose = tmp_path / "loose"
        loose.mkdir()
        ct("1.2.826.0.1.3680043.10.16.60").save_as(loose / "x.dcm", enforce_file_format=True)
        proc = run_cli("sort", loose, x, timeout=120)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        assert [p.name for p in layout_files(x)] == ["1.2.826.0.1.3680043.10.16.60.dcm"]
        proc = run_cli("sort", loose, tmp_path, timeout=120)  # the folder that holds U: refused, U named ours
        assert proc.returncode == 75 and f"holds {u}, the output folder of a running sortscp" in proc.stderr, (
            proc.stdout, proc.stderr)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _flock_holders(path: Path, kind: str) -> set[int]:
    """The PIDs of the ``flock`` locks of `kind` (READ, WRITE) on `path`, as ``/proc/locks`` lists them."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return {int(fields[4]) for fields in map(str.split, f) if fields[1] == "FLOCK"
                and fields[3] == kind and fields[5] == key}


def test_a_folder_a_move_is_emptying_is_refused_to_servers_sorts_and_other_moves(tmp_path):
    """A move held nothing on SRC, so a server started on SRC, or on a folder
    in it, while the move ran indexed files the move then took (its index
    listed instances that were gone), and a sort into such a folder had its
    output moved away behind its report. Now a move holds a shared lock on
    SRC for its run: a server on SRC or inside it is refused (2), a sort into
    it or a second move of it too (75), touching nothing; an operator's own
    shared lock on a folder refuses nothing; once the move ends, all start."""
    src, dst = tmp_path / "incoming", tmp_path / "sorted"
    (src / "deep").mkdir(parents=True)
    uids = [f"1.2.826.0.1.3680043.10.16.{300 + n}" for n in range(400)]
    for n, uid in enumerate(uids):
        ct(uid).save_as(src / ("deep" if n % 2 else "") / f"f{n}.dcm", enforce_file_format=True)
    loose = tmp_path / "loose"
    loose.mkdir()
    ct("1.2.826.0.1.3680043.10.16.299").save_as(loose / "x.dcm", enforce_file_format=True)
    move = subprocess.Popen([sys.executable, "-m", "scp", "sort", str(src), str(dst), "--mode", "move"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), start_new_session=True)
    try:
        wait_until(lambda: move.pid in _flock_holders(src, "READ") or move.poll() is not None,
                   timeout=60, what="the move's hold on SRC")
        assert move.poll() is None, "the move ended before its hold was seen"
        os.killpg(move.pid, signal.SIGSTOP)  # it and its workers: the move stays where it is
        left = sorted(p.relative_to(src) for p in src.rglob("*"))
        for out in (src, src / "deep", src / "new"):
            proc = run_cli("serve", "--out", out, "--host", "127.0.0.1", "--port", free_port(), timeout=60)
            where = "is the SRC of" if out == src else f"is inside {src}, the SRC of"
            _cli_error(proc, f"{out} {where} a running sortscp sort --mode move (pid {move.pid})",
                       "start it when the move has finished")
        for args in (["sort", loose, src / "new"], ["sort", loose, src],
                     ["sort", src, tmp_path / "other", "--mode", "move"],
                     ["sort", src / "deep", tmp_path / "other", "--mode", "move"],
                     ["sort", loose, src / "deep", "--dry-run"], ["reindex", src / "deep"]):
            proc = run_cli(*args, timeout=120)
            assert proc.returncode == 75, (args, proc.stdout, proc.stderr)
            folder = args[2] if args[0] == "sort" and "move" not in args else args[1]
            where = "is the SRC of" if folder == src else f"is inside {src}, the SRC of"
            assert f"{folder} {where} a running sortscp sort --mode move (pid {move.pid})" in proc.stderr, (
                args, proc.stderr)
            assert "Traceback" not in proc.stderr, proc.stderr
        assert sorted(p.relative_to(src) for p in src.rglob("*")) == left  # nothing made, nothing taken
        assert not (tmp_path / "other").exists() and [p.name for p in loose.iterdir()] == ["x.dcm"]
        os.killpg(move.pid, signal.SIGCONT)
        out, err = move.communicate(timeout=300)
        assert move.returncode == 0, (out, err)
    finally:
        if move.poll() is None:
            os.killpg(move.pid, signal.SIGCONT)
            os.killpg(move.pid, signal.SIGKILL)
            move.wait()
    assert sorted(p.name for p in layout_files(dst)) == sorted(f"{uid}.dcm" for uid in uids)
    assert not src.exists() or not any(p.is_file() for p in src.rglob("*"))

    # an operator's shared lock on a folder is not a move's; and the folder is free again
    src.mkdir(exist_ok=True)
    holder = subprocess.Popen(["flock", "-s", str(src), "sleep", "60"])
    try:
        wait_until(lambda: bool(_flock_holders(src, "READ")), timeout=20, what="flock -s")
        proc = run_cli("sort", loose, src / "new", timeout=120)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        assert [p.name for p in layout_files(src / "new")] == ["1.2.826.0.1.3680043.10.16.299.dcm"]
        # on the folder itself it collides with the folder's own lock: said as it is, not as a server
        held = f"{src} is held by a shared lock (pid {holder.pid}): a sortscp sort --mode move of it, or "
        _cli_error(run_cli("serve", "--out", src, "--host", "127.0.0.1", "--port", free_port(), timeout=60), held)
        proc = run_cli("sort", loose, src, timeout=120)
        assert proc.returncode == 75 and held in proc.stderr, (proc.stdout, proc.stderr)
    finally:
        holder.kill()
        holder.wait()
    server = ServeProcess(src / "served")
    try:
        assert store_one(server.port, ct("1.2.826.0.1.3680043.10.16.298")) == SUCCESS, server.log()
    finally:
        assert server.terminate() == 0, server.log()


def test_the_output_folder_made_again_while_serving_is_held_again(tmp_path):
    """OUT removed whole while serving is made again by the next instance; the
    server's lock stayed on the removed folder, so a second server started
    on the new one. It is held again within about a second."""
    first = ServeProcess(tmp_path / "out")
    try:
        assert store_one(first.port, ct("1.2.826.0.1.3680043.10.16.9")) == SUCCESS, first.log()
        shutil.rmtree(tmp_path / "out")
        assert store_one(first.port, ct("1.2.826.0.1.3680043.10.16.10")) == SUCCESS, first.log()
        wait_until(lambda: "made again while serving: holding the new one" in first.log(), timeout=20,
                   what="the new folder held")
        try:
            proc = run_cli("serve", "--out", tmp_path / "out", "--host", "127.0.0.1", "--port", free_port(),
                           timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("a second server started on the folder made again")
        _cli_error(proc, "another server", "one server per output folder")
        assert store_one(first.port, ct("1.2.826.0.1.3680043.10.16.11")) == SUCCESS, first.log()
    finally:
        assert first.terminate() == 0, first.log()


@pytest.mark.parametrize("name,value", [("SORTSCP_PORT", "abc"), ("SORTSCP_MAX_ASSOCIATIONS", "0"),
                                        ("SORTSCP_NETWORK_TIMEOUT", "soon"), ("SORTSCP_ON_DUPLICATE", "merge"),
                                        ("SORTSCP_WEBHOOK", "http://"), ("SORTSCP_WEBHOOK", "http://h:port/"),
                                        # (12: every real instance would then be refused as a drip of
                                        # fragments; more than 64 MiB: more than we read)
                                        ("SORTSCP_MAX_PDU", "12"), ("SORTSCP_MAX_PDU", "67108865")])
def test_bad_environment_values(tmp_path, name, value):
    env = dict(cli_env(), **{name: value})
    proc = run_cli("serve", "--out", tmp_path / "out", "--host", "127.0.0.1", env=env, timeout=60)
    _cli_error(proc, name)


SECONDS_OPTIONS = ("--acse-timeout", "--dimse-timeout", "--network-timeout", "--drain-timeout",
                   "--job-timeout", "--hook-timeout", "--series-stable-seconds", "--study-stable-seconds")


@pytest.mark.parametrize("value", ["1e10", "3000000", "inf", "nan"])
@pytest.mark.parametrize("option", SECONDS_OPTIONS)
def test_seconds_no_wait_can_hold_are_refused_at_start(tmp_path, option, value):
    """Past about 24.8 days a wait in milliseconds overflows: such a value used
    to start a server whose every connection, C-STORE or hook then failed with
    a traceback (or crash it at once). Refused before anything starts, by the
    option's name and by its environment variable's."""
    out = tmp_path / "out"
    proc = run_cli("serve", "--out", out, "--host", "127.0.0.1", "--port", free_port(),
                   option, value, timeout=60)
    _cli_error(proc, option)
    var = "SORTSCP_" + option.lstrip("-").replace("-", "_").upper()
    env = dict(cli_env(), **{var: value})
    proc = run_cli("serve", "--out", out, "--host", "127.0.0.1", "--port", free_port(), env=env, timeout=60)
    _cli_error(proc, var)
    assert not out.exists()


@pytest.mark.parametrize("value", ["1e10", "nan"])
def test_echo_timeout_no_wait_can_hold_is_refused(value):
    _cli_error(run_cli("echo", "127.0.0.1", "1", "--timeout", value, timeout=60), "--timeout")


def test_a_resend_whose_index_commit_meets_a_full_disk_leaves_one_file_once_space_is_back(tmpfs):
    """The resend (another patient: another folder) was filed, its index commit
    failed, and the settle after its worker's replacement failed on the same
    full disk: the old and the new file of one UID stayed side by side, while
    the server went on serving, until a restart."""
    mount = tmpfs("20m")
    out, filler = mount / "out", mount / "filler"
    server = ServeProcess(out, "--workers", "1")
    try:
        assoc = associate(server.port)
        size = len(encode(ct("1.2.826.0.1.3680043.10.9.0"), False, True)) + 1000
        doubled = None
        for i, slack in enumerate(range(0, 64 << 10, 1024)):
            uid = f"1.2.826.0.1.3680043.10.9.{i}"
            filler.unlink(missing_ok=True)
            first = ct(uid)
            first.PatientName = "Old^Name"
            assert assoc.send_c_store(first).Status == SUCCESS, server.log()
            _fill_to(mount, filler, size + slack)
            second = ct(uid)
            second.PatientName = "New^Name"
            status = getattr(assoc.send_c_store(second), "Status", None)
            assert status in (SUCCESS, OUT_OF_RESOURCES), f"{status}\n{server.log()}"
            if not assoc.is_established:
                assoc = associate(server.port)
            if status != SUCCESS and len([p for p in layout_files(out) if p.name == f"{uid}.dcm"]) > 1:
                doubled = uid
                break
        if doubled is None:
            pytest.skip("the disk never filled between a resend's file and its index row")
        filler.unlink()
        assert store_one(server.port, ct("1.2.826.0.1.3680043.10.9.999")) == SUCCESS, server.log()
        wait_until(lambda: len([p for p in layout_files(out) if p.name == f"{doubled}.dcm"]) == 1,
                   timeout=15, what="one file for the UID again, without a restart")
        assoc.release()
        assert "the instance index is settled again" in server.log()
        assert "Traceback" not in server.log()
    finally:
        server.kill()


def test_a_stop_on_a_full_disk_exits_0_without_a_traceback(tmpfs):
    """The index's clean close at SIGTERM raised sqlite3's 'database or disk
    is full' through the command line: exit 1, a traceback."""
    mount = tmpfs("5m")
    out, filler = mount / "out", mount / "filler"
    server = ServeProcess(out, "--workers", "1")
    try:
        for i in range(3):
            assert store_one(server.port, ct(f"1.2.826.0.1.3680043.10.10.{i}")) == SUCCESS, server.log()
        _fill_to(mount, filler, 0)
        assert store_one(server.port, ct("1.2.826.0.1.3680043.10.10.9")) == OUT_OF_RESOURCES, server.log()
        assert server.terminate() == 0, server.log()
        assert "Traceback" not in server.log()
        assert server.log().rstrip().endswith("stopped: 3 instances stored, 1 failed"), server.log()
    finally:
        server.kill()


def test_a_start_on_a_full_disk_is_one_line_and_exit_2(tmpfs):
    """Opening the index (its journal, the 'running' mark) on a disk that
    filled while the server was down: a traceback, exit 1."""
    mount = tmpfs("5m")
    out, filler = mount / "out", mount / "filler"
    server = ServeProcess(out, "--workers", "1")
    try:
        assert store_one(server.port, ct("1.2.826.0.1.3680043.10.10.20")) == SUCCESS, server.log()
        assert server.terminate() == 0, server.log()
    finally:
        server.kill()
    _fill_to(mount, filler, 0)
    r = run_cli("serve", "--out", out, "--host", "127.0.0.1", "--port", str(free_port()), "--workers", "1",
                timeout=60)
    errors = [line for line in r.stderr.splitlines() if " INFO " not in line]
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert "cannot open the instance index" in errors[0] and "full" in errors[0], r.stderr


def test_a_layout_folder_replaced_by_a_symbolic_link_is_not_written_through(serve_process, tmp_path):
    """The instance was filed where the link led, outside OUT, and answered
    Success; its index row named a path in OUT."""
    server = serve_process("--workers", "1")
    first = ct("1.2.826.0.1.3680043.10.11.1")
    assert store_one(server.port, first) == SUCCESS, server.log()
    (folder,) = {p.relative_to(server.out).parts[0] for p in layout_files(server.out)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(server.out / folder)
    (server.out / folder).symlink_to(elsewhere, target_is_directory=True)
    status = store_one(server.port, ct("1.2.826.0.1.3680043.10.11.2"))
    assert status == OUT_OF_RESOURCES, server.log()
    assert list(elsewhere.rglob("*")) == []
    assert "is a symbolic link" in server.log()


def test_a_locked_index_still_gives_an_answer_within_the_job_timeout(serve_process):
    """Another process holding a write transaction on the index (a backup):
    the worker was killed at --job-timeout, then the answer waited 30 s more
    for the index and was 0xC211, after the sender's own timeout."""
    server = serve_process("--workers", "1", "--job-timeout", "3")
    assert store_one(server.port, ct("1.2.826.0.1.3680043.10.12.1")) == SUCCESS, server.log()
    db = sqlite3.connect(server.out / ".sortscp" / "index.sqlite", isolation_level=None)
    answers = []
    try:
        db.execute("BEGIN IMMEDIATE")
        for n in (2, 3, 4):  # the later ones waited for the background settle: 30 s
            started = time.monotonic()
            status = store_one(server.port, ct(f"1.2.826.0.1.3680043.10.12.{n}"))
            answers.append((status, round(time.monotonic() - started, 1)))
        db.execute("ROLLBACK")
    finally:
        db.close()
    assert all(status == OUT_OF_RESOURCES and took < 3 + 4 for status, took in answers), \
        f"{answers}\n{server.log()}"
    assert store_one(server.port, ct("1.2.826.0.1.3680043.10.12.2")) == SUCCESS, server.log()


def _series_events(events: Path) -> list[tuple[str, int]]:
    if not events.exists():
        return []
    return [(e["series_instance_uid"], e["revision"]) for e in map(json.loads, events.read_text().splitlines())
            if e["event"] == "series_complete"]


@pytest.mark.parametrize("what", ["index", "state folder"])
def test_an_index_removed_while_serving_is_rebuilt_and_keeps_one_file_per_uid(serve_process, tmp_path, what):
    """An operator removes the index (or all of .sortscp) while the server runs:
    every later instance was answered 0xA700 (the workers could not rebuild an
    index the server's processes hold), or nothing completed any more. Now the
    index is rebuilt from the files, with one line, what had completed stays
    complete, and a corrected resend still replaces the old file."""
    events = tmp_path / "events.jsonl"
    server = serve_process("--workers", "1", "--series-stable-seconds", "1", "--study-stable-seconds", "1",
                           "--events", str(events))
    first = ct("1.2.826.0.1.3680043.10.13.1")
    assert store_one(server.port, first) == SUCCESS, server.log()
    wait_until(lambda: _series_events(events), timeout=30, what="the first series to complete")
    state = server.out / ".sortscp"
    if what == "index":
        for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
            (state / name).unlink(missing_ok=True)
    else:
        shutil.rmtree(state)
    second = ct("1.2.826.0.1.3680043.10.13.2")
    second.SeriesInstanceUID, second.SeriesNumber = "1.2.826.0.1.3680043.10.13.99", 2
    assert store_one(server.port, second) == SUCCESS, server.log()
    corrected = ct("1.2.826.0.1.3680043.10.13.1")
    corrected.PatientName = "Corrected^Name"  # another folder: the old file must go
    assert store_one(server.port, corrected) == SUCCESS, server.log()
    wait_until(lambda: len(_series_events(events)) >= 3, timeout=30, what="both series to complete")
    time.sleep(2.5)  # more polls: nothing completes twice
    done = _series_events(events)
    assert sorted(done) == sorted([(first.SeriesInstanceUID, 1), (second.SeriesInstanceUID, 1),
                                   (first.SeriesInstanceUID, 2)]), f"{done}\n{server.log()}"
    names = sorted(p.relative_to(server.out).as_posix() for p in layout_files(server.out))
    assert len(names) == 2 and sum(n.startswith("Corrected^Name_") for n in names) == 1, names
    assert "the instance index" in server.log() and "while serving" in server.log(), server.log()
    assert "Traceback" not in server.log()
    assert server.terminate() == 0, server.log()
    r = run_cli("reindex", server.out)
    assert r.returncode == 0 and "another file" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_a_sort_into_a_served_folder_whose_index_was_removed_is_still_refused(serve_process, tmp_path):
    """With its index removed by hand, a running server's folder looked like a
    plain one to ``sort``, which filed into it unknown to the index."""
    server = serve_process("--workers", "1")
    assert store_one(server.port, ct("1.2.826.0.1.3680043.10.16.1")) == SUCCESS, server.log()
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (server.out / ".sortscp" / name).unlink(missing_ok=True)
    src = tmp_path / "src"
    src.mkdir()
    ct("1.2.826.0.1.3680043.10.16.2").save_as(src / "a.dcm", enforce_file_format=True)
    for args in (("sort", "--dry-run", src, server.out), ("sort", src, server.out)):
        r = run_cli(*args)
        assert r.returncode == 75, f"{args}: {r.returncode}\n{r.stdout}{r.stderr}"
    assert len(layout_files(server.out)) == 1


def test_sort_and_reindex_are_refused_while_the_servers_state_folder_is_gone(serve_process, tmp_path):
    """``rm -rf OUT/.sortscp`` took the server's locks with it: until the server
    made them again (its watch, within a second), a sort or a reindex ran
    beside it. The server's main process is stopped here (SIGSTOP), so that
    moment lasts: the folder itself is held, and both are still refused."""
    server = serve_process("--workers", "1")
    assert store_one(server.port, ct("1.2.826.0.1.3680043.10.16.3")) == SUCCESS, server.log()
    src = tmp_path / "src"
    src.mkdir()
    ct("1.2.826.0.1.3680043.10.16.4").save_as(src / "a.dcm", enforce_file_format=True)
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        shutil.rmtree(server.out / ".sortscp")
        for args in (("reindex", server.out), ("sort", "--dry-run", src, server.out), ("sort", src, server.out)):
            r = run_cli(*args)
            assert r.returncode == 75, f"{args}: {r.returncode}\n{r.stdout}{r.stderr}"
            assert "running server" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert len(layout_files(server.out)) == 1
    assert (src / "a.dcm").is_file()  # the source is where it was
    assert store_one(server.port, ct("1.2.826.0.1.3680043.10.16.5")) == SUCCESS, server.log()


def test_sigusr1_to_the_whole_service_kills_no_worker(tmp_path):
    """``systemctl kill -s USR1`` signals every process of the service: the
    workers (and the forkserver) died of it, only the main process took it."""
    server = ServeProcess(tmp_path / "out", "--workers", "2", new_session=True)
    try:
        assert store_one(server.port, ct("1.2.826.0.1.3680043.10.17.1")) == SUCCESS, server.log()
        before = descendants(server.proc.pid)
        os.killpg(server.proc.pid, signal.SIGUSR1)
        wait_until(lambda: "received: nothing to do" in server.log(), timeout=10, what="the line")
        time.sleep(1)
        assert all(_running(pid) for pid in before), server.log()
        assert store_one(server.port, ct("1.2.826.0.1.3680043.10.17.2")) == SUCCESS, server.log()
        assert "died" not in server.log(), server.log()
    finally:
        assert server.terminate() == 0, server.log()


def test_an_index_damaged_while_serving_is_rebuilt_once_a_worker_needs_it(serve_process):
    """Its first bytes overwritten while serving: once a worker was replaced
    (a crash, the OOM killer), every instance was answered 0xA700 until a restart."""
    server = serve_process("--workers", "1")
    assert store_one(server.port, ct("1.2.826.0.1.3680043.10.14.1")) == SUCCESS, server.log()
    with open(server.out / ".sortscp" / "index.sqlite", "r+b") as f:
        f.write(bytes(100))
    kill_all(worker_pids(server.proc.pid))
    deadline = time.monotonic() + 15  # a sender's retries: the first may come before the repair
    for n in (2, 3, 4):
        while (status := store_one(server.port, ct(f"1.2.826.0.1.3680043.10.14.{n}"))) != SUCCESS:
            assert status == OUT_OF_RESOURCES and time.monotonic() < deadline, f"{status}\n{server.log()}"
            time.sleep(0.5)
    assert "damaged" in server.log(), server.log()
    assert (server.out / ".sortscp" / "index.sqlite.damaged").is_file()  # kept, as the README says
    assert server.terminate() == 0, server.log()
    r = run_cli("ls", server.out, "--json")
    listed = [s for study in json.loads(r.stdout)["studies"] for s in study["series"]]
    assert r.returncode == 0 and sum(s["instances"] for s in listed) == 4, r.stdout + r.stderr


def test_out_of_descriptors_an_association_is_still_answered_without_a_raw_traceback(serve_process):
    """At EMFILE the wake-up socket pair of a new association could not be
    made: its thread died with a raw traceback on stderr, and the peer heard
    nothing until its own timeout."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    server = serve_process("--workers", "1", "--max-associations", "100")
    nfd = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    subprocess.run([prlimit, f"--pid={server.proc.pid}", f"--nofile={nfd + 4}:"], check=True)  # the soft limit
    answers = []
    for n in range(4):
        ae = new_ae()
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", server.port, ae_title="SORTSCP")
        if assoc.is_established:
            answers.append(getattr(assoc.send_c_echo(), "Status", None))
            # a C-STORE too: the polling fallback knew no C-STORE of ours (a traceback, no answer)
            stored = getattr(assoc.send_c_store(ct(f"1.2.826.0.1.3680043.10.15.{n}")), "Status", None)
            assert stored in (SUCCESS, OUT_OF_RESOURCES), f"{stored}\n{server.log()}"
            assoc.release()
        else:
            answers.append("refused")
        assert time.monotonic() - started < 8, f"no answer for {time.monotonic() - started:.1f} s\n{server.log()}"
    subprocess.run([prlimit, f"--pid={server.proc.pid}", f"--nofile={nfd + 256}:"], check=True)
    assert echo_ok(server.port), server.log()
    raw = [line for line in server.log().splitlines() if line.startswith(("Exception in thread", "Traceback"))]
    assert raw == [], server.log()
    assert SUCCESS in answers, f"{answers}\n{server.log()}"


def test_out_of_descriptors_every_concurrent_c_store_is_answered_and_logged(serve_process):
    """Many associations at once on a server out of descriptors: each C-STORE
    is answered (Success, or 0xA700 so the sender retries) and each failure has
    its log line. The senders run sortscp's network threads: pynetdicom's own
    requestor reactor can take a response off its DIMSE queue between its
    checkpoint and ``get_msg`` ("Received unexpected C-STORE service message"),
    and its ``send_c_store`` then waits for a response that was received, which
    a fast 0xA700 made likely and was taken for a lost answer of the server's."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    from scp.net import _pynetdicom

    server = serve_process("--workers", "2", "--max-associations", "30")
    nfd = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    # enough for the associations' sockets, not for all their sinks and wake-ups
    subprocess.run([prlimit, f"--pid={server.proc.pid}", f"--nofile={nfd + 36}:"], check=True)
    senders, per_sender = 24, 3
    statuses: dict[int, list] = {}

    def send(k: int) -> None:
        ae = new_ae()
        ae.dimse_timeout = 10  # (the server answers in well under a second)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="SORTSCP")
        if not assoc.is_established:
            return
        got = statuses.setdefault(k, [])
        for i in range(per_sender):
            rsp = assoc.send_c_store(ct(f"1.2.826.0.1.3680043.10.16.{k}.{i}"))
            got.append(getattr(rsp, "Status", None))
            if not assoc.is_established:
                break
        if assoc.is_established:
            assoc.release()

    _pynetdicom.install_network_threads()
    try:
        threads = [threading.Thread(target=send, args=(k,)) for k in range(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(6 * STEP)
        assert not any(t.is_alive() for t in threads), server.log()
    finally:
        _pynetdicom.uninstall_network_threads()
    subprocess.run([prlimit, f"--pid={server.proc.pid}", f"--nofile={nfd + 256}:"], check=True)
    answered = [s for got in statuses.values() for s in got]
    assert answered and all(s in (SUCCESS, OUT_OF_RESOURCES) for s in answered), f"{statuses}\n{server.log()}"
    log = server.log()
    failures = log.count("C-STORE failed from FAULTSCU")
    assert failures >= answered.count(OUT_OF_RESOURCES) > 0, f"{statuses}\n{log}"
    raw = [line for line in log.splitlines() if line.startswith(("Exception in thread", "Traceback"))]
    assert raw == [], log

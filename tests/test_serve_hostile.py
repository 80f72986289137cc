"""The attacker's suite for ``sortscp serve``: black-box tests against the real
server in a child process, driven by well-behaved senders (pynetdicom's SCU)
and by hostile raw peers (:mod:`pdu`).

Each test asserts what a user would check: the status the sender got, the file
at its path (byte for byte) or its absence, nothing else in the layout, no
temporary files left, one log line with the reason, and a server that still
serves the next sender.

Conventions (of the fixed server; the helpers accept today's layout too):
the layout is ``{PatientName}_{PatientID}/{SeriesDescription}_{SeriesNumber}/
{SOPInstanceUID}.dcm``; server state lives under ``OUT/.sortscp/`` (temporary
files in ``OUT/.sortscp/tmp/``; today ``OUT/.sortscp-tmp``).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

import pdu
from conftest import run_cli
from localnet import descendants
from pdu import LAST, Peer
from serve_helpers import wait_until

SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700

CT = pydicom.data.get_testdata_file("CT_small.dcm")
RLE = pydicom.data.get_testdata_file("SC_rgb_rle.dcm")
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

FAST = ("--workers", "1")


# --- the output folder ------------------------------------------------------------


def layout_files(out: Path) -> list[Path]:
    """Every file under OUT, except under a top-level folder starting with ``.sortscp``."""
    if not out.is_dir():
        return []
    found = []
    for top in out.iterdir():
        if top.name.startswith(".sortscp"):
            continue
        if top.is_file():
            found.append(top)
        else:
            found += [p for p in top.rglob("*") if p.is_file()]
    return sorted(found)


def temp_files(out: Path) -> list[Path]:
    """Files in the temporary area: ``OUT/.sortscp/tmp`` (fixed) or ``OUT/.sortscp-tmp`` (today).
    The start-up probe is not a leftover of a transfer, but it is gone once written."""
    found = []
    for tmp in (out / ".sortscp" / "tmp", out / ".sortscp-tmp"):
        if tmp.is_dir():
            found += [p for p in tmp.rglob("*") if p.is_file()]
    return sorted(found)


def no_temp_files_within(out: Path, seconds: float = 5.0) -> list[Path]:
    """Poll (bounded) until the temporary area is empty; what is left after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        left = temp_files(out)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def layout_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_dir()
                  and not p.relative_to(out).parts[0].startswith(".sortscp"))


def expected_path(out: Path, name: str, pid: str, desc: str, number: str, uid: str) -> Path:
    return out / f"{name}_{pid}" / f"{desc}_{number}" / f"{uid}.dcm"


def dataset_bytes_of(path: Path) -> bytes:
    """The dataset part of a stored Part 10 file (after the File Meta)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not a Part 10 file"
    assert raw[132:136] == b"\x02\x00\x00\x00", f"{path}: File Meta does not start with its group length"
    length = struct.unpack("<I", raw[140:144])[0]
    return raw[144 + length:]


# --- datasets ---------------------------------------------------------------------


def encode_ds(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def ct_dataset(uid: str | None = None, **overrides) -> Dataset:
    """CT_small with a fresh SOPInstanceUID (or `uid`), no trailing padding."""
    ds = pydicom.dcmread(CT)
    del ds[0xFFFCFFFC]
    ds.SOPInstanceUID = uid or generate_uid()
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    return ds


def ct_bytes(uid: str | None = None, **overrides) -> tuple[str, bytes, Dataset]:
    ds = ct_dataset(uid, **overrides)
    return ds.SOPInstanceUID, encode_ds(ds), ds


def ct_path(out: Path, ds: Dataset) -> Path:
    return expected_path(out, str(ds.PatientName), ds.PatientID, "UNKNOWN", str(ds.SeriesNumber),
                         ds.SOPInstanceUID)


def log_lines(server, pattern: str) -> list[str]:
    return [line for line in server.log().splitlines() if re.search(pattern, line)]


# --- senders ----------------------------------------------------------------------


CT_CONTEXT = [(1, pdu.CT_IMAGE_STORAGE, [pdu.EXPLICIT_LE]), (3, pdu.VERIFICATION, [pdu.IMPLICIT_LE])]


def raw_store(port: int, uid: str, data: bytes, contexts=None, sop_class=pdu.CT_IMAGE_STORAGE,
              calling: str | bytes = "HOSTILE", timeout: float = 20.0) -> int:
    """One C-STORE over a raw association; the status, after a release."""
    with Peer(port, timeout=timeout) as peer:
        accepted = peer.associate(contexts or CT_CONTEXT, calling=calling)
        cid = accepted.accepted_ids()[0]
        status = peer.c_store(cid, sop_class, uid, data)
        peer.release()
        return status


def scu_store(port: int, ds: Dataset, calling: str = "GOODSCU", timeout: float = 20) -> int:
    """A well-behaved sender: pynetdicom's SCU, one association, one C-STORE."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(ds.SOPClassUID, "1.2.840.10008.1.2.1")
    if not getattr(ds, "file_meta", None):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    assoc = ae.associate("127.0.0.1", port, ae_title="SORTSCP")
    assert assoc.is_established, "a well-behaved sender could not associate"
    try:
        rsp = assoc.send_c_store(ds)
        assert "Status" in rsp, f"no C-STORE response: {rsp}"
        return int(rsp.Status)
    finally:
        assoc.release()


def still_serving(server) -> None:
    """Another, well-behaved sender still gets an instance stored."""
    ds = ct_dataset(PatientName="After^Attack", PatientID="OK1")
    assert scu_store(server.port, ds) == SUCCESS, server.log()
    path = ct_path(server.out, ds)
    assert path.is_file(), f"{path} missing; layout: {layout_files(server.out)}"
    assert dataset_bytes_of(path) == encode_ds(ds)


# --- /proc ------------------------------------------------------------------------


def proc_status(pid: int, key: str) -> int:
    """A kB value of /proc/PID/status (VmHWM, VmRSS), in bytes; 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


class PeakMemory:
    """Polls VmHWM of the server and every descendant while running; ``extra`` is the
    sum over processes of their peak above their start (a new process counts from
    the smallest start of the others, the size of an idle worker)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = {p: proc_status(p, "VmHWM") for p in [pid, *descendants(pid)]}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        for p in [self.pid, *descendants(self.pid)]:
            self.peak[p] = max(self.peak.get(p, 0), proc_status(p, "VmHWM"))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._poll()

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._poll()

    @property
    def extra(self) -> int:
        idle = min(v for v in self.base.values() if v) if self.base else 0
        return sum(max(0, peak - self.base.get(p, idle)) for p, peak in self.peak.items())


def workers_of(server_pid: int) -> list[int]:
    """The worker processes: below the forkserver (descendants that are not direct
    children of the server); with another start method, every descendant but the
    resource tracker."""
    below = descendants(server_pid)
    direct = set()
    for pid in below:
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except OSError:
            continue
        if ppid == server_pid:
            direct.add(pid)
    deeper = [p for p in below if p not in direct]
    if deeper:
        return deeper
    return [p for p in below if b"resource_tracker" not in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class Stopped:
    """SIGSTOP `pids` now; on exit SIGKILL them (they are this test's server's)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = list(pids)
        for p in self.pids:
            os.kill(p, signal.SIGSTOP)

    def add(self, pids: list[int]) -> None:
        for p in pids:
            if p not in self.pids:
                os.kill(p, signal.SIGSTOP)
                self.pids.append(p)

    def __enter__(self) -> Stopped:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.pids:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass


# =================================================================================
# 1. Complete before Success
# =================================================================================


def _cut_in_pixel_data() -> tuple[str, bytes]:
    uid, data, _ = ct_bytes()
    return uid, data[:-1000]


def _pn_overrun() -> tuple[str, bytes]:
    """Elements before PatientName, then a PN announcing 1000 bytes with 20 there."""
    ds = ct_dataset()
    head = Dataset()
    for elem in ds:
        if elem.tag < 0x00100010:
            head.add(elem)
    raw = encode_ds(head) + struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 1000) + b"Doe^John" * 2 + b"\0" * 4
    return ds.SOPInstanceUID, raw


def _unclosed_sequence() -> tuple[str, bytes]:
    """The complete CT, then (FFFA,FFFA) SQ of undefined length, one item of undefined
    length with one element, and no item or sequence delimiter."""
    uid, data, _ = ct_bytes()
    sq = struct.pack("<HH2sHI", 0xFFFA, 0xFFFA, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    elem = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 4) + b"ABCD"
    return uid, data + sq + item + elem


def rle_dataset(uid: str | None = None) -> tuple[str, bytes]:
    ds = pydicom.dcmread(RLE)
    ds.SOPInstanceUID = uid or generate_uid()
    return ds.SOPInstanceUID, encode_ds(ds)


def _encapsulated_no_delimiter() -> tuple[str, bytes]:
    uid, data = rle_dataset()
    delimiter = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    assert data.endswith(delimiter)
    return uid, data[: -len(delimiter)]


RLE_CONTEXT = [(1, pdu.SECONDARY_CAPTURE, [RLE_LOSSLESS]), (3, pdu.VERIFICATION, [pdu.IMPLICIT_LE])]

INCOMPLETE = {
    "cut-in-pixel-data": (_cut_in_pixel_data, CT_CONTEXT, pdu.CT_IMAGE_STORAGE),
    "pn-length-overruns": (_pn_overrun, CT_CONTEXT, pdu.CT_IMAGE_STORAGE),
    "sequence-never-closed": (_unclosed_sequence, CT_CONTEXT, pdu.CT_IMAGE_STORAGE),
    "encapsulated-no-delimiter": (_encapsulated_no_delimiter, RLE_CONTEXT, pdu.SECONDARY_CAPTURE),
}


@pytest.mark.parametrize("case", list(INCOMPLETE))
def test_incomplete_dataset_is_refused(serve_process, case):
    make, contexts, sop_class = INCOMPLETE[case]
    server = serve_process(*FAST)
    uid, data = make()
    status = raw_store(server.port, uid, data, contexts, sop_class)
    assert status == CANNOT_UNDERSTAND, f"{case}: status 0x{status:04X}\n{server.log()}"
    assert layout_files(server.out) == []
    assert no_temp_files_within(server.out) == []
    reason = [line for line in log_lines(server, re.escape(uid)) if re.search(r"(?i)c000|cannot understand", line)]
    assert len(reason) == 1, f"expected one log line naming {uid} and its status:\n{server.log()}"
    still_serving(server)


def test_incomplete_resend_does_not_replace_a_complete_copy(serve_process):
    server = serve_process(*FAST)
    uid, data, ds = ct_bytes()
    assert raw_store(server.port, uid, data) == SUCCESS, server.log()
    path = ct_path(server.out, ds)
    before = path.read_bytes()
    assert dataset_bytes_of(path) == data
    status = raw_store(server.port, uid, data[:-1000])
    assert status == CANNOT_UNDERSTAND, f"status 0x{status:04X}"
    assert path.read_bytes() == before, "an incomplete resend replaced the complete copy"
    assert layout_files(server.out) == [path]
    assert no_temp_files_within(server.out) == []


# =================================================================================
# 2. Deflate
# =================================================================================

BOMB_BYTES = 1_000_000_000


def _deflated(ds_head: bytes, zeros: int, cut: int = 0, corrupt: bool = False) -> bytes:
    """Raw deflate of `ds_head` + (7FE0,0010) OB of `zeros` zero bytes, streamed."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = [z.compress(ds_head + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, zeros))]
    block = bytes(1 << 20)
    left = zeros
    while left:
        n = min(left, len(block))
        out.append(z.compress(block[:n]))
        left -= n
    out.append(z.flush())
    data = b"".join(out)
    if corrupt:
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0x5A for b in data[mid : mid + 64]) + data[mid + 64 :]
    if cut:
        data = data[:cut]
    return data + (b"\0" if len(data) % 2 else b"")


def _bomb_head(uid: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = pdu.SECONDARY_CAPTURE
    ds.SOPInstanceUID = uid
    ds.PatientName = "Deflate^Bomb"
    ds.PatientID = "ZIP1"
    ds.SeriesDescription = "Bomb"
    ds.SeriesNumber = 9
    return encode_ds(ds)


DEFLATE_CONTEXT = [(1, pdu.SECONDARY_CAPTURE, [pdu.DEFLATED_LE]), (3, pdu.VERIFICATION, [pdu.IMPLICIT_LE])]


def test_deflate_bomb_does_not_inflate_into_memory(serve_process):
    server = serve_process(*FAST)
    uid = generate_uid()
    data = _deflated(_bomb_head(uid), BOMB_BYTES)
    assert len(data) < 4 << 20
    with PeakMemory(server.proc.pid) as mem, Peer(server.port, timeout=60) as peer:
        accepted = peer.associate(DEFLATE_CONTEXT)
        assert accepted.contexts[1] == (0, pdu.DEFLATED_LE)
        status = peer.c_store(1, pdu.SECONDARY_CAPTURE, uid, data, timeout=60)
        peer.release()
    assert mem.extra < 100 << 20, (
        f"server and workers grew by {mem.extra >> 20} MiB for a {len(data) >> 10} KiB "
        f"deflated dataset (status 0x{status:04X})"
    )
    if status == SUCCESS:  # stored as received: the deflated bytes, not inflated
        path = expected_path(server.out, "Deflate^Bomb", "ZIP1", "Bomb", "9", uid)
        assert layout_files(server.out) == [path]
        assert dataset_bytes_of(path) == data
    else:
        assert layout_files(server.out) == []
    assert no_temp_files_within(server.out) == []
    still_serving(server)


def test_a_deflate_bomb_of_a_repeated_small_element_is_refused_in_one_line(serve_process):
    """49 KB of deflate that inflate to 4 Mi empty elements: the association's
    thread walked them one header at a time (8 s of CPU, the GIL held) before
    the element limit refused them. Deflated data may bring so many headers
    per compressed byte: refused with 0xC000, one line, nothing stored."""
    server = serve_process(*FAST)
    uid = generate_uid()
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = z.compress(_bomb_head(uid) + b"\0\0\0\0UL\0\0" * (4 << 20)) + z.flush()
    data += b"\0" if len(data) % 2 else b""
    assert len(data) < 64 << 10
    status = raw_store(server.port, uid, data, DEFLATE_CONTEXT, pdu.SECONDARY_CAPTURE)
    assert status == CANNOT_UNDERSTAND, f"status 0x{status:04X}\n{server.log()}"
    assert len(log_lines(server, r"deflate bomb")) == 1, server.log()
    assert layout_files(server.out) == []
    assert no_temp_files_within(server.out) == []
    assert "Traceback" not in server.log()
    still_serving(server)


@pytest.mark.parametrize("damage", ["cut", "corrupt"])
def test_broken_deflate_stream_is_refused(serve_process, damage):
    server = serve_process(*FAST)
    uid = generate_uid()
    whole = _deflated(_bomb_head(uid) + encode_ds(Dataset()), 200_000)
    data = _deflated(_bomb_head(uid), 200_000, cut=len(whole) // 2) if damage == "cut" \
        else _deflated(_bomb_head(uid), 200_000, corrupt=True)
    status = raw_store(server.port, uid, data, DEFLATE_CONTEXT, pdu.SECONDARY_CAPTURE)
    assert status != SUCCESS and status >= 0xA000, f"{damage} deflate stream: status 0x{status:04X}"
    assert layout_files(server.out) == []
    assert no_temp_files_within(server.out) == []
    still_serving(server)


# =================================================================================
# 3. File Meta comes from the association
# =================================================================================


def _inline_meta(ds_bytes: bytes) -> bytes:
    """(0002,0000), a bogus (0002,0010) and (0002,0016) 'FORGED', in front of the dataset."""
    meta = (
        struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", 8) + b"1.2.3.4\0"
        + struct.pack("<HH2sH", 0x0002, 0x0016, b"AE", 6) + b"FORGED"
    )
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(meta)) + meta + ds_bytes


def test_file_meta_comes_from_the_association_not_the_dataset(serve_process):
    server = serve_process(*FAST)
    uid, data, ds = ct_bytes()
    status = raw_store(server.port, uid, _inline_meta(data), calling="REALAE")
    assert status == SUCCESS, f"status 0x{status:04X}\n{server.log()}"
    path = ct_path(server.out, ds)
    assert layout_files(server.out) == [path]
    stored = pydicom.dcmread(path)
    meta = stored.file_meta
    assert meta.TransferSyntaxUID == pdu.EXPLICIT_LE
    assert meta.get("SourceApplicationEntityTitle", "").strip() == "REALAE"
    assert meta.MediaStorageSOPInstanceUID == uid
    assert meta.MediaStorageSOPClassUID == pdu.CT_IMAGE_STORAGE
    assert stored.PixelData == ds.PixelData
    assert not [e for e in stored if e.tag.group == 0x0002], "group 0002 left in the dataset"
    assert no_temp_files_within(server.out) == []


def test_dataset_uid_other_than_the_command_uid_is_refused(serve_process):
    server = serve_process(*FAST)
    _, data, _ = ct_bytes()
    other = generate_uid()
    status = raw_store(server.port, other, data)
    assert status != SUCCESS and status & 0xF000 in (0xA000, 0xC000), f"status 0x{status:04X}"
    assert layout_files(server.out) == []
    assert no_temp_files_within(server.out) == []
    still_serving(server)


# =================================================================================
# 4. A C-STORE without a dataset
# =================================================================================


def test_c_store_without_dataset_is_refused_and_files_nothing_from_cwd(serve_process, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    shutil.copy(CT, cwd / "None")
    server = serve_process(*FAST, cwd=cwd)
    with Peer(server.port) as peer:
        cid = peer.associate(CT_CONTEXT).accepted_ids()[0]
        peer.send_command(cid, pdu.c_store_rq(pdu.CT_IMAGE_STORAGE, generate_uid(), has_dataset=False))
        status = peer.status()
        peer.release()
    filed = layout_files(server.out)
    assert status == CANNOT_UNDERSTAND, f"status 0x{status:04X}, layout {filed}\n{server.log()}"
    assert filed == [], "a file of the server's working directory was filed"
    assert (cwd / "None").is_file()
    still_serving(server)


def test_a_dataset_cut_by_an_early_last_bit_is_refused_in_one_line_and_nothing_sent_after_the_abort(
        serve_process):
    """The last-fragment bit set too early, then one more dataset fragment in
    the same write: the cut dataset is refused (0xC000) and the association
    aborted for the stray fragment; the response was then still sent on the
    aborted association, and pynetdicom's state machine logged two ERROR
    lines of its own ("Invalid event 'Evt9' ... 'Sta13'"). Tried five times:
    the order of the two depends on timing."""
    server = serve_process(*FAST)
    ds = ct_dataset()
    data = encode_ds(ds)
    for _ in range(5):
        with Peer(server.port) as peer:
            cid = peer.associate(CT_CONTEXT).accepted_ids()[0]
            command = pdu.c_store_rq(pdu.CT_IMAGE_STORAGE, ds.SOPInstanceUID)
            peer.send(pdu.p_data((cid, pdu.COMMAND | LAST, command)) + pdu.p_data((cid, LAST, data[:20000]))
                      + pdu.p_data((cid, 0, data[20000:])))
            try:
                while peer.read_pdu(5).kind != pdu.A_ABORT:
                    pass
            except (pdu.PeerClosed, OSError, TimeoutError):
                pass
    wait_until(lambda: len(log_lines(server, "aborting the association")) == 5, timeout=20, what="5 aborts")
    time.sleep(0.5)
    assert log_lines(server, r"\spynetdicom\.") == [], server.log()  # (pynetdicom's own loggers)
    assert len(log_lines(server, r"C-STORE failed .* -> status 0xC000")) <= 5, server.log()
    assert layout_files(server.out) == []
    still_serving(server)


# =================================================================================
# 5. One file per SOPInstanceUID in the whole tree
# =================================================================================


@pytest.mark.parametrize("changed", ["PatientName", "SeriesNumber"])
@pytest.mark.parametrize("policy", ["replace", "keep"])
def test_resend_with_corrected_header_keeps_one_file(serve_process, changed, policy):
    args = FAST + (() if policy == "replace" else ("--on-duplicate", "keep"))
    server = serve_process(*args)
    first = ct_dataset(PatientName="Wrong^Name", SeriesNumber=1)
    second = ct_dataset(first.SOPInstanceUID, PatientName="Wrong^Name", SeriesNumber=1)
    setattr(second, changed, "Right^Name" if changed == "PatientName" else 7)
    assert scu_store(server.port, first) == SUCCESS
    old = ct_path(server.out, first)
    assert old.is_file()
    status = scu_store(server.port, second)
    assert status == SUCCESS, f"status 0x{status:04X}"
    new = ct_path(server.out, second)
    if policy == "replace":
        assert layout_files(server.out) == [new], "the old copy is still there"
        assert dataset_bytes_of(new) == encode_ds(second)
        assert not old.parent.exists(), f"empty folder {old.parent} left behind"
        if changed == "PatientName":
            assert not old.parent.parent.exists()
    else:
        assert layout_files(server.out) == [old]
        assert dataset_bytes_of(old) == encode_ds(first)
    assert no_temp_files_within(server.out) == []


def test_concurrent_senders_of_one_uid_leave_one_file(serve_process):
    server = serve_process("--workers", "2")
    uid = generate_uid()
    results: dict[int, int] = {}
    barrier = threading.Barrier(4, timeout=20)

    def send(i: int) -> None:
        ds = ct_dataset(uid, PatientName=f"Race^{i}", PatientID=f"R{i}")
        ae = AE(ae_title=f"RACE{i}")
        ae.add_requested_context(ds.SOPClassUID, "1.2.840.10008.1.2.1")
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        assoc = ae.associate("127.0.0.1", server.port, ae_title="SORTSCP")
        try:
            barrier.wait()
            rsp = assoc.send_c_store(ds)
            results[i] = int(rsp.Status) if "Status" in rsp else -1
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: SUCCESS for i in range(4)}
    files = layout_files(server.out)
    assert len(files) == 1, f"{len(files)} files for one SOPInstanceUID: {files}"
    assert files[0].name == f"{uid}.dcm"
    assert no_temp_files_within(server.out) == []


def test_one_file_per_uid_survives_kill_and_restart(serve_process, tmp_path):
    out = tmp_path / "out"
    server = serve_process(*FAST, out=out)
    first = ct_dataset(PatientName="Before^Kill", SeriesNumber=1)
    assert scu_store(server.port, first) == SUCCESS
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    time.sleep(1)  # its workers notice that it is gone
    again = serve_process(*FAST, out=out)
    second = ct_dataset(first.SOPInstanceUID, PatientName="After^Kill", SeriesNumber=2)
    assert scu_store(again.port, second) == SUCCESS
    files = layout_files(out)
    assert files == [ct_path(out, second)], f"one UID, files: {files}"
    again.terminate()
    done = run_cli("reindex", out, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert layout_files(out) == [ct_path(out, second)]


# =================================================================================
# 6. Abandoned partial datasets
# =================================================================================


def _echo_instead_of_last_fragment(peer: Peer, cid: int, echo_cid: int) -> None:
    uid, data, _ = ct_bytes()
    peer.send_command(cid, pdu.c_store_rq(pdu.CT_IMAGE_STORAGE, uid))
    peer.send(pdu.p_data((cid, 0, data[:8000])))
    peer.send_command(echo_cid, pdu.c_echo_rq(2))


def _two_command_sets(peer: Peer, cid: int, echo_cid: int) -> None:
    uid, data, _ = ct_bytes()
    peer.send_command(cid, pdu.c_store_rq(pdu.CT_IMAGE_STORAGE, uid, 1))
    peer.send_command(cid, pdu.c_store_rq(pdu.CT_IMAGE_STORAGE, generate_uid(), 2))
    peer.send(pdu.p_data((cid, 0, data[:8000])))


def _unnegotiated_context(peer: Peer, cid: int, echo_cid: int) -> None:
    uid, data, _ = ct_bytes()
    peer.send_command(cid, pdu.c_store_rq(pdu.CT_IMAGE_STORAGE, uid))
    peer.send(pdu.p_data((cid, 0, data[:8000])))
    peer.send(pdu.p_data((99, LAST, data[8000:])))


ABANDONED = {
    "echo-instead-of-last-fragment": _echo_instead_of_last_fragment,
    "two-command-sets": _two_command_sets,
    "unnegotiated-context-id": _unnegotiated_context,
}


@pytest.mark.parametrize("ending", ["release", "close"])
@pytest.mark.parametrize("case", list(ABANDONED))
def test_abandoned_partial_dataset_leaves_nothing(serve_process, case, ending):
    server = serve_process(*FAST, "--network-timeout", "5", "--dimse-timeout", "5")
    with Peer(server.port, timeout=10) as peer:
        peer.associate(CT_CONTEXT)
        ABANDONED[case](peer, 1, 3)
        time.sleep(0.5)
        if ending == "release":
            peer.release(timeout=5)
    assert layout_files(server.out) == []
    left = no_temp_files_within(server.out, 8)
    assert left == [], f"temporary files left: {[p.name for p in left]}"
    still_serving(server)


# =================================================================================
# 7. No peer holds a slot
# =================================================================================


def _drip(port: int, data: bytes, interval: float, limit: float, result: dict, key) -> None:
    """Send `data` one byte per `interval`; record after how many seconds the server
    closed the connection (None: still open after `limit`)."""
    start = time.monotonic()
    try:
        with Peer(port, timeout=limit) as peer:
            for i in range(len(data)):
                if time.monotonic() - start > limit:
                    result[key] = None
                    return
                try:
                    peer.send(data[i : i + 1])
                except OSError:
                    break
                peer.sock.settimeout(interval)
                try:
                    chunk = peer.sock.recv(65536)
                    if not chunk:
                        break
                    # an answer (e.g. A-ABORT): wait for the close
                    left = peer.closed_within(max(0.1, limit - (time.monotonic() - start)))
                    if left is None:
                        result[key] = None
                        return
                    break
                except TimeoutError:
                    continue
                except OSError:
                    break
            else:
                left = peer.closed_within(max(0.1, limit - (time.monotonic() - start)))
                if left is None:
                    result[key] = None
                    return
        result[key] = time.monotonic() - start
    except OSError:
        result[key] = time.monotonic() - start


def test_slow_association_requests_do_not_hold_slots(serve_process):
    server = serve_process(*FAST, "--acse-timeout", "2", "--max-associations", "2")
    rq = pdu.associate_rq(CT_CONTEXT)
    result: dict = {}
    drippers = [threading.Thread(target=_drip, args=(server.port, rq, 0.5, 20, result, i))
                for i in range(2)]
    for t in drippers:
        t.start()
    time.sleep(0.5)
    ds = ct_dataset()
    try:
        status = scu_store(server.port, ds)  # while they drip
    except AssertionError as exc:
        status = exc
    for t in drippers:
        t.join(30)
    assert status == SUCCESS, f"a normal sender was turned away while two peers dripped ({status}); " \
        f"the drippers were closed after {result} s (None: still open after 20 s)"
    for i in range(2):
        assert result.get(i) is not None, f"dripping peer {i} still connected after 20 s"
        assert result[i] < 2 + 4, f"dripping peer {i} closed only after {result[i]:.1f} s"


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no thread count for process {pid}")


def _connect(port: int, host: str, reset: bool = False) -> socket.socket:
    """A TCP connection to the server on 127.0.0.1 from `host` (another loopback
    address is another peer); `reset`: closing it sends a reset."""
    s = socket.socket()
    s.bind((host, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return s


def _closed_by_server(socks: list[socket.socket], seconds: float) -> set[socket.socket]:
    """The sockets of `socks` the server closed (EOF or reset) within `seconds`."""
    closed: set[socket.socket] = set()
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        open_ = [s for s in socks if s not in closed]
        ready, _, _ = select.select(open_, [], [], min(left, 0.2)) if open_ else ([], [], [])
        for s in ready:
            try:
                data = s.recv(1)
            except OSError:
                data = b""
            if not data:
                closed.add(s)
    return closed


def test_a_flood_of_silent_connections_is_bounded_and_keeps_no_other_host_out(serve_process):
    """One host (127.0.0.2) opens far more connections than a sender would and
    sends nothing. Those past PENDING_PER_HOST are closed at once, without a
    thread; the server's threads stay bounded; a sender on another host
    (127.0.0.1) still stores; once the flood ends, the flooding host can
    associate again."""
    from scp.net.transport import PENDING_PER_HOST

    server = serve_process(*FAST, "--acse-timeout", "30")
    before = _threads(server.proc.pid)
    extra = 40
    flood: list[socket.socket] = []
    try:
        for _ in range(PENDING_PER_HOST + extra):
            flood.append(_connect(server.port, "127.0.0.2"))
        closed = _closed_by_server(flood, 5.0)
        assert len(closed) == extra, f"{len(closed)} of {len(flood)} connections closed\n{server.log()}"
        assert all(s in closed for s in flood[PENDING_PER_HOST:]), "the first connections should stay"
        during = _threads(server.proc.pid)
        assert during - before <= PENDING_PER_HOST + 4, f"{before} threads before the flood, {during} in it"
        ds = ct_dataset(PatientName="Other^Host", PatientID="FLOOD1")
        assert scu_store(server.port, ds) == SUCCESS, server.log()
        assert ct_path(server.out, ds).is_file()
        lines = [line for line in server.log().splitlines() if "waiting to send their A-ASSOCIATE-RQ" in line]
        assert 1 <= len(lines) <= 10, server.log()  # at most one line a second
        assert f"{PENDING_PER_HOST} from 127.0.0.2 already waiting" in lines[0], lines[0]
        assert "Traceback" not in server.log()
    finally:
        for s in flood:
            s.close()
    for _ in range(100):  # the server sees the flood closed (bounded: 10 s)
        if _threads(server.proc.pid) <= before + 2:
            break
        time.sleep(0.1)
    ds = ct_dataset(PatientName="Flooding^Host", PatientID="FLOOD2")
    ae = AE(ae_title="GOODSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(ds.SOPClassUID, "1.2.840.10008.1.2.1")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    assoc = ae.associate("127.0.0.1", server.port, ae_title="SORTSCP", bind_address=("127.0.0.2", 0))
    assert assoc.is_established, f"the flooding host is still turned away\n{server.log()}"
    try:
        assert int(assoc.send_c_store(ds).Status) == SUCCESS
    finally:
        assoc.release()
    assert ct_path(server.out, ds).is_file()


def test_waiting_connections_are_bounded_in_all_across_hosts(serve_process):
    """PENDING_PER_HOST silent connections from each of as many hosts as fill
    PENDING_TOTAL: the next one, from a host that has none waiting, is closed at
    once and the log says which bound it met."""
    from scp.net.transport import PENDING_PER_HOST, PENDING_TOTAL

    server = serve_process(*FAST, "--acse-timeout", "30")
    hosts = [f"127.0.1.{i}" for i in range(1, PENDING_TOTAL // PENDING_PER_HOST + 1)]
    waiting: list[socket.socket] = []
    try:
        for host in hosts:
            waiting += [_connect(server.port, host) for _ in range(PENDING_PER_HOST)]
        assert len(waiting) == PENDING_TOTAL
        assert _closed_by_server(waiting, 2.0) == set(), server.log()
        late = _connect(server.port, "127.0.2.1")
        waiting.append(late)
        assert _closed_by_server([late], 5.0) == {late}, "a connection past the total stayed open"
        lines = [line for line in server.log().splitlines() if "waiting to send their A-ASSOCIATE-RQ" in line]
        assert lines and f"{PENDING_TOTAL} in all already waiting" in lines[-1], server.log()
    finally:
        for s in waiting:
            s.close()


def test_a_burst_of_connections_is_taken_without_a_retry(serve_process):
    """64 connections at once (a PACS and a few modalities starting together, or
    a flood): each connect completes at once. With socketserver's listen backlog
    of 5, the kernel drops the SYNs past it and those senders wait a second (the
    SYN retransmission) before they are even connected."""
    server = serve_process(*FAST)
    took: list[float] = []
    socks: list[socket.socket] = []
    lock = threading.Lock()
    go = threading.Barrier(64)

    def connect() -> None:
        s = socket.socket()
        s.bind(("127.0.0.5", 0))
        s.settimeout(10)
        go.wait(10)
        start = time.monotonic()
        try:
            s.connect(("127.0.0.1", server.port))
        except OSError:
            s.close()
            return
        with lock:
            took.append(time.monotonic() - start)
            socks.append(s)

    threads = [threading.Thread(target=connect) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    try:
        assert len(took) == 64, f"{len(took)} of 64 connected"
        slow = sorted(t for t in took if t >= 0.9)
        assert not slow, f"{len(slow)} of 64 connects waited for a SYN retransmission: {slow}"
    finally:
        for s in socks:
            s.close()
    still_serving(server)


def test_slow_dataset_is_cut_off(serve_process):
    server = serve_process(*FAST, "--dimse-timeout", "3")
    uid, data, _ = ct_bytes()
    start = time.monotonic()
    cut_after = None
    with Peer(server.port, timeout=10) as peer:
        cid = peer.associate(CT_CONTEXT).accepted_ids()[0]
        peer.send_command(cid, pdu.c_store_rq(pdu.CT_IMAGE_STORAGE, uid))
        start = time.monotonic()
        for i in range(24):  # 12 s at most
            try:
                peer.send(pdu.p_data((cid, 0, data[i : i + 1])))
            except OSError:
                cut_after = time.monotonic() - start
                break
            if peer.closed_within(0.5) is not None:
                cut_after = time.monotonic() - start
                break
    assert cut_after is not None, "a peer sending one byte per 0.5 s was never cut off (12 s)"
    assert cut_after < 3 + 5, f"cut off only after {cut_after:.1f} s"
    assert layout_files(server.out) == []
    assert no_temp_files_within(server.out) == []
    still_serving(server)


def test_zero_length_abstract_syntax_is_closed_without_spinning(serve_process):
    server = serve_process(*FAST, "--acse-timeout", "3")
    items = (pdu.item(0x10, pdu.APPLICATION_CONTEXT.encode())
             + pdu.item(0x20, bytes([1, 0, 0, 0]) + pdu.item(0x30, b"") + pdu.item(0x40, pdu.EXPLICIT_LE.encode()))
             + pdu.user_information())
    with Peer(server.port) as peer:
        peer.send(pdu.associate_rq(raw_items=items))
        start = time.monotonic()
        try:
            answer = peer.read_pdu(8)
            answered = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 7: "A-ABORT"}.get(
                answer.kind, hex(answer.kind))
            if answer.kind == pdu.A_ASSOCIATE_AC:
                answered += f" {pdu.parse_ac(answer.body).contexts}"
        except (pdu.PeerClosed, OSError) as exc:
            answered = f"nothing ({type(exc).__name__})"
        took = peer.closed_within(max(0.1, 8 - (time.monotonic() - start)))
        time.sleep(0.5)
        pids = [server.proc.pid, *descendants(server.proc.pid)]
        before = cpu_seconds(pids)
        time.sleep(2)
        used = cpu_seconds(pids) - before
    assert took is not None and used < 0.5, (
        f"after a malformed A-ASSOCIATE-RQ: answered {answered}, connection "
        f"{'closed' if took is not None else 'still open after 8 s'}, "
        f"server used {used:.2f} s of CPU in 2 s\n{server.log()}"
    )
    still_serving(server)


def test_request_without_presentation_contexts_is_rejected(serve_process):
    server = serve_process(*FAST)
    with Peer(server.port) as peer:
        peer.send(pdu.associate_rq([]))
        answer = peer.read_pdu(10)
        assert answer.kind in (pdu.A_ASSOCIATE_RJ, pdu.A_ABORT), f"PDU type 0x{answer.kind:02x}"
        assert peer.closed_within(5) is not None, "socket left open"
    still_serving(server)


def test_huge_pdu_header_is_aborted_without_buffering(serve_process):
    server = serve_process(*FAST, "--max-pdu", "16384")
    with PeakMemory(server.proc.pid) as mem, Peer(server.port, timeout=10) as peer:
        peer.associate(CT_CONTEXT)
        peer.send(struct.pack(">BBI", pdu.P_DATA_TF, 0, 400_000_000))
        start = time.monotonic()
        chunk = bytes(1 << 20)
        sent = 0
        closed = None
        peer.sock.settimeout(2)
        while sent < 120 << 20 and time.monotonic() - start < 20:
            try:
                peer.sock.sendall(chunk)
                sent += len(chunk)
            except OSError:  # reset or timeout: the server stopped reading
                break
        closed = peer.closed_within(max(0.1, 10 - (time.monotonic() - start)))
        took = time.monotonic() - start
    assert closed is not None, f"a 400 MB PDU header (max PDU 16384) left the connection open " \
        f"({sent >> 20} MiB sent; server grew by {mem.extra >> 20} MiB)"
    assert took < 10, f"closed after {took:.1f} s"
    assert mem.extra < 50 << 20, f"server grew by {mem.extra >> 20} MiB buffering one PDU"
    still_serving(server)


def test_pdu_headers_alone_reserve_no_memory_with_an_unlimited_max_pdu(serve_process):
    """With --max-pdu 0 a P-DATA-TF may be 64 MiB long; a peer announcing one and
    sending nothing more must not make the server hold 64 MiB for it."""
    server = serve_process(*FAST, "--max-pdu", "0", "--max-associations", "4")
    peers = [Peer(server.port, timeout=10) for _ in range(4)]
    with PeakMemory(server.proc.pid) as mem:
        for peer in peers:
            peer.associate(CT_CONTEXT)
            peer.send(struct.pack(">BBI", pdu.P_DATA_TF, 0, (64 << 20) - 10))
        time.sleep(1.5)
    for peer in peers:
        peer.close()
    assert mem.extra < 32 << 20, f"4 six-byte PDU headers grew the server by {mem.extra >> 20} MiB"
    still_serving(server)


# =================================================================================
# 8. Hung worker, stop with a stuck worker, second SIGTERM
# =================================================================================


def test_hung_worker_fails_the_instance_and_is_replaced(serve_process):
    server = serve_process("--workers", "1", "--job-timeout", "3")
    workers = workers_of(server.proc.pid)
    assert workers, "no worker process found"
    with Stopped(workers):
        uid, data, _ = ct_bytes()
        start = time.monotonic()
        status = raw_store(server.port, uid, data, timeout=20)
        took = time.monotonic() - start
        assert status == OUT_OF_RESOURCES, f"status 0x{status:04X}"
        assert took < 3 + 7, f"answered after {took:.1f} s"
        assert layout_files(server.out) == []
        assert log_lines(server, re.escape(uid)), "no log line names the failed instance"
        # one line with the reason (the instance's), not a second one for the worker replaced
        lines = log_lines(server, r"WARNING|ERROR")
        assert len(lines) == 1 and "not finished within 3 s" in lines[0], server.log()
        still_serving(server)  # no SIGCONT: a new worker did it


def test_sigterm_with_a_stuck_worker_exits_after_the_drain(serve_process):
    server = serve_process("--workers", "1", "--drain-timeout", "2")
    with Stopped(workers_of(server.proc.pid)):
        uid, data, _ = ct_bytes()
        result: dict = {}

        def send() -> None:
            try:
                result["status"] = raw_store(server.port, uid, data, timeout=30)
            except (OSError, AssertionError, pdu.PeerClosed) as exc:  # cut off: fine
                result["error"] = exc

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(1.5)  # the job now sits with the stopped worker
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(2 + 10)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - start
        sender.join(5)
    assert code is not None, f"still running {took:.0f} s after SIGTERM with a stuck worker\n{server.log()}"
    assert result.get("status", OUT_OF_RESOURCES) != SUCCESS
    assert layout_files(server.out) == []


def test_second_sigterm_during_drain_exits_at_once(serve_process):
    server = serve_process(*FAST, "--drain-timeout", "60")
    with Peer(server.port, timeout=30) as peer:
        peer.associate(CT_CONTEXT)  # and holds it open
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "waiting up to" not in server.log() and "drain" not in server.log().lower() \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert server.proc.poll() is None, "exited before the drain (the peer is still associated)"
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(3)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a second SIGTERM during the drain did not stop the server within 3 s\n{server.log()}")
        assert time.monotonic() - start < 3


# =================================================================================
# 9. Output folder removed while running
# =================================================================================


def test_output_folder_removed_between_two_stores(serve_process):
    server = serve_process(*FAST)
    first, second = ct_dataset(), ct_dataset(PatientName="Second^One")
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(first.SOPClassUID, "1.2.840.10008.1.2.1")
    for ds in (first, second):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    assoc = ae.associate("127.0.0.1", server.port, ae_title="SORTSCP")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(first).Status) == SUCCESS
        shutil.rmtree(server.out)
        rsp = assoc.send_c_store(second)
        status = int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()
    assert status == SUCCESS, f"status {status}\n{server.log()}"
    path = ct_path(server.out, second)
    assert layout_files(server.out) == [path]
    assert dataset_bytes_of(path) == encode_ds(second)
    assert no_temp_files_within(server.out) == []


# =================================================================================
# 10. Logs cannot be forged
# =================================================================================

NEWLINE_ESCAPES = (r"\n", r"\x0a", r"\u000a", r"\012")
ESC_ESCAPES = (r"\x1b", r"\u001b", r"\033", r"\e")


def _assert_not_forged(log: str, marker: str) -> None:
    assert "\x1b" not in log, "a raw escape character reached the log"
    forged = [line for line in log.splitlines() if line.startswith(marker)]
    assert not forged, f"a forged log line: {forged}"


@pytest.mark.parametrize("title,escapes", [
    (b"EV\nFORGED 0xC0DE", NEWLINE_ESCAPES),
    (b"EV\x1b[31mRED", ESC_ESCAPES),
])
def test_calling_ae_title_cannot_forge_log_lines(serve_process, title, escapes):
    server = serve_process(*FAST)
    uid, data, _ = ct_bytes()
    try:
        raw_store(server.port, uid, data, calling=title)
    except (AssertionError, OSError, pdu.PeerClosed):
        pass  # rejected: fine, as long as the log is clean
    time.sleep(0.5)
    log = server.log()
    _assert_not_forged(log, "FORGED")
    assert any(e in log for e in escapes), f"the title does not appear escaped in the log:\n{log}"
    still_serving(server)


def _no_sop_uid(**overrides) -> bytes:
    ds = ct_dataset(**overrides)
    del ds.SOPInstanceUID
    return encode_ds(ds)


@pytest.mark.parametrize("where", ["PatientName-cut-dataset", "PatientName-no-SOPInstanceUID",
                                   "command-uid"])
def test_failure_message_cannot_forge_log_lines(serve_process, where):
    server = serve_process(*FAST)
    forged = "FORGED stored 1 instance"
    if where == "PatientName-cut-dataset":
        uid, data, _ = ct_bytes(PatientName=f"Doe\n{forged}")
        data = data[:-1000]
    elif where == "PatientName-no-SOPInstanceUID":
        uid, data = generate_uid(), _no_sop_uid(PatientName=f"Doe\n{forged}")
    else:  # the command's Affected SOP Instance UID, which failure lines name
        uid, data = f"1.2.3\n{forged}", _no_sop_uid()
    status = raw_store(server.port, uid, data)
    assert status != SUCCESS, f"{where}: status 0x{status:04X} (the dataset is not storable)"
    time.sleep(0.3)
    log = server.log()
    _assert_not_forged(log, "FORGED")
    assert log_lines(server, r"C-STORE|fail|refus"), f"no failure line:\n{log}"
    if where == "command-uid":
        assert any(e in log for e in NEWLINE_ESCAPES), f"the UID does not appear escaped:\n{log}"


def test_require_called_aet_rejection_is_logged(serve_process):
    server = serve_process(*FAST, "--require-called-aet")
    with Peer(server.port) as peer:
        peer.send(pdu.associate_rq(CT_CONTEXT, calling="SOMEONE", called="NOTUS"))
        answer = peer.read_pdu(10)
        assert answer.kind == pdu.A_ASSOCIATE_RJ, f"PDU type 0x{answer.kind:02x}"
    deadline = time.monotonic() + 5
    while not log_lines(server, "rejected") and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = log_lines(server, "rejected")
    assert len(lines) == 1, f"expected one 'rejected' line:\n{server.log()}"
    assert "SOMEONE" in lines[0] and "NOTUS" in lines[0], lines[0]
    still_serving(server)

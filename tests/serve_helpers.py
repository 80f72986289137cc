"""Helpers for the ``serve`` tests: a real in-process server, a real SCU, byte checks."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

from scp.config import ServeConfig
from scp.dicom.header import read_header
from scp.layout import DEFAULT_TEMPLATE, Template, relative_path
from scp.net import _pynetdicom
from scp.net.server import Server
from scp.store.index import STATE_DIRNAME
from scp.store.tmp import TMP_DIRNAME

#: pynetdicom refuses to propose more presentation contexts in one association.
MAX_CONTEXTS = 128
CALLING_AET = "TESTSCU"


@contextlib.contextmanager
def running_server(out: Path, **options) -> Iterator[Server]:
    """A real ``Server`` on 127.0.0.1, on a port chosen by the system.

    ``Server.start`` installs its receiver and network threads for the whole
    process (``sortscp serve`` runs one server per process); they are undone
    here, so a later test in this process starts from pynetdicom's own code
    and not from a receiver that files into this test's folder."""
    cfg = replace(ServeConfig(out=out, host="127.0.0.1", port=0, workers=2), **options)
    server = Server(cfg)
    try:
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        _pynetdicom.uninstall_receiver()
        _pynetdicom.uninstall_network_threads()


def file_identity(path: Path) -> tuple[str, str, str]:
    """(SOP class, SOP instance, transfer syntax) from the File Meta, as a sender uses them."""
    meta, _ = split_dataset(path)
    return meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta: the dataset exactly as encoded."""
    _, offset = split_dataset(path)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def expected_path(path: Path, template: str = DEFAULT_TEMPLATE) -> PurePosixPath:
    """Where the layout engine files `path` (computed from the source header)."""
    t = Template.parse(template)
    return relative_path(read_header(path, t.keywords), t)


def send_files(
    port: int, files: Iterable[Path], calling: str = CALLING_AET, called: str = "SORTSCP"
) -> dict[Path, int]:
    """Send each file as it is on disk (File Meta stripped, dataset bytes unchanged)
    with pynetdicom's SCU; each association proposes each file's own SOP class with
    its own transfer syntax. Returns the status of every file (-1: no response)."""
    files = list(files)
    statuses: dict[Path, int] = {}
    groups: list[list[Path]] = []
    contexts: list[set] = []
    for f in files:
        sop_class, _, ts = file_identity(f)
        for group, cxs in zip(groups, contexts):
            if (sop_class, ts) in cxs or len(cxs) < MAX_CONTEXTS:
                group.append(f)
                cxs.add((sop_class, ts))
                break
        else:
            groups.append([f])
            contexts.append({(sop_class, ts)})
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for group, cxs in zip(groups, contexts):
            ae = AE(ae_title=calling)
            for sop_class, ts in sorted(cxs):
                ae.add_requested_context(sop_class, ts)
            assoc = ae.associate("127.0.0.1", port, ae_title=called)
            assert assoc.is_established, f"association to port {port} failed"
            try:
                for f in group:
                    rsp = assoc.send_c_store(f)
                    statuses[f] = rsp.Status if "Status" in rsp else -1
            finally:
                assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return statuses


def send_datasets(port: int, datasets: list[Dataset], calling: str = CALLING_AET) -> list[int]:
    """Send in-memory datasets (each with a File Meta transfer syntax) in one association."""
    return [status for status, _ in timed_stores(port, datasets, calling)]


def timed_stores(port: int, datasets: list[Dataset], calling: str = CALLING_AET) -> list[tuple[int, float]]:
    """As :func:`send_datasets`: (status, seconds of its round trip) of each C-STORE."""
    ae = AE(ae_title=calling)
    for pair in sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        ae.add_requested_context(*pair)
    assoc = ae.associate("127.0.0.1", port, ae_title="SORTSCP")
    assert assoc.is_established
    try:
        out = []
        for ds in datasets:
            start = time.perf_counter()
            rsp = assoc.send_c_store(ds)
            out.append((rsp.Status if "Status" in rsp else -1, time.perf_counter() - start))
        return out
    finally:
        assoc.release()


def layout_files(out: Path) -> list[Path]:
    """Every file in the layout (the temporary folder excluded)."""
    return sorted(
        p for p in out.rglob("*")
        if p.is_file() and not {TMP_DIRNAME, STATE_DIRNAME} & set(p.relative_to(out).parts)
    )


def tmp_area(out: Path) -> Path:
    """The temporary area of the output folder `out`."""
    return out / TMP_DIRNAME


def tmp_files(out: Path) -> list[str]:
    """Names of the files in the temporary area of `out`."""
    try:
        return sorted(os.listdir(tmp_area(out)))
    except FileNotFoundError:
        return []


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `predicate` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def ct_copies(n: int, patient: str = "Stream^Test") -> list[Dataset]:
    """`n` distinct instances of one new series in one new study (pydicom's
    CT_small, deep copies with new UIDs: ``Dataset.copy`` is shallow, so its
    copies would share one element dict and end up with one SOPInstanceUID)."""
    import copy

    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base.PatientName = patient
    base.SeriesInstanceUID = generate_uid()
    base.StudyInstanceUID = generate_uid()
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        out.append(ds)
    assert len({d.SOPInstanceUID for d in out}) == n
    return out


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of `pid`, in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", text, re.M).group(1))


def serve_env_process(env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen:
    """``python -m scp serve ARGS`` with exactly `env` (plus PYTHONPATH) in `cwd`."""
    log = open(cwd / "serve.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "scp", "serve", *args], cwd=cwd, env=env,
        stdout=log, stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM `proc` by its PID and wait for its exit code."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    return proc.wait(timeout)


def big_instance(path: Path, nbytes: int) -> Path:
    """A CT instance whose Pixel Data is `nbytes` long, written to `path`."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    frame = ds.Rows * ds.Columns * 2
    ds.NumberOfFrames = max(1, nbytes // frame)
    ds.PixelData = bytes(frame * ds.NumberOfFrames)
    ds.save_as(path, enforce_file_format=True)
    return path

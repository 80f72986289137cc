"""DCMTK's ``storescu`` sends a folder tree to ``sortscp serve``.

DCMTK re-encodes what it sends (group lengths, padding, and for ``+sd +r``
without ``-R`` the transfer syntax), so the reference for "the bytes sent" is
DCMTK's own ``storescp +B`` (bit-preserving: writes the dataset exactly as
received), fed the same tree by the same ``storescu`` command.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pydicom

from scp import IMPLEMENTATION_CLASS_UID

from conftest import CUT_SHORT, DCMTK_ENV, ServeProcess, free_port, readable_dicom_files, wait_for_port
from serve_helpers import dataset_bytes, expected_path, layout_files

STORESCU_AET = "STORESCU"  # storescu's default calling AE title
UNCOMPRESSED = {
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
}


def _unique_instances() -> list[Path]:
    """Readable test files, one per SOPInstanceUID; where several files hold the
    same instance, the one in the rarest transfer syntax (so that every syntax
    of the test data is in the tree)."""
    headers = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in readable_dicom_files() if f.name not in CUT_SHORT}
    rarity = Counter(ds.file_meta.TransferSyntaxUID for ds in headers.values())
    seen: set[str] = set()
    files = []
    for f, ds in sorted(headers.items(), key=lambda i: rarity[i[1].file_meta.TransferSyntaxUID]):
        if ds.SOPInstanceUID not in seen:
            seen.add(ds.SOPInstanceUID)
            files.append(f)
    return files


def _tree(files: list[Path], root: Path) -> Path:
    for i, f in enumerate(files):
        folder = root / f"d{i % 7}" / f"e{i % 3}"  # nested, so +r matters
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, folder / f"{i:04d}_{f.name}")
    return root


def _storescu(storescu: str, port: int, tree: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [storescu, *options, "-nh", "+sd", "+r", "127.0.0.1", str(port), str(tree)],
        capture_output=True, text=True, timeout=300, env=DCMTK_ENV,
    )


def _reference(storescu: str, storescp: str, tree: Path, out: Path, *options: str) -> dict[str, Path]:
    """Send `tree` to DCMTK's storescp +B; return its files by SOPInstanceUID."""
    return _reference_runs(storescu, storescp, [(tree, options)], out)


def _reference_runs(
    storescu: str, storescp: str, runs: list[tuple[Path, tuple[str, ...]]], out: Path
) -> dict[str, Path]:
    """Run storescu for each (tree, options) against DCMTK's storescp +B;
    return the files it stored by SOPInstanceUID."""
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [storescp, "+B", "+xa", "-aet", "SORTSCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        for tree, options in runs:
            _storescu(storescu, port, tree, *options)
    finally:
        proc.terminate()
        proc.wait(30)
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in out.iterdir() if p.is_file()}


def _check_against_reference(out: Path, files: list[Path], reference: dict[str, Path]) -> None:
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    stored = layout_files(out)
    assert len(stored) == len(reference), (
        f"sortscp stored {len(stored)} instances, DCMTK's storescp {len(reference)}")
    for uid, ref in reference.items():
        target = out / expected_path(by_uid[uid])
        assert target.is_file(), f"{by_uid[uid].name}: not at {target.relative_to(out)}"
        assert dataset_bytes(target) == dataset_bytes(ref), f"{by_uid[uid].name}: bytes differ"
        meta = pydicom.dcmread(target, stop_before_pixels=True).file_meta
        ref_meta = pydicom.dcmread(ref, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == ref_meta.TransferSyntaxUID, by_uid[uid].name
        assert meta.SourceApplicationEntityTitle == STORESCU_AET
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID


def test_storescu_scan_directories_fills_the_layout(
    tmp_path: Path, storescu: str, storescp: str
) -> None:
    """``storescu +sd +r`` (uncompressed contexts only) against serve on its defaults."""
    files = [f for f in _unique_instances()
             if pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
             in UNCOMPRESSED]
    tree = _tree(files, tmp_path / "tree")
    reference = _reference(storescu, storescp, tree, tmp_path / "dcmtk")
    server = ServeProcess(tmp_path / "out")
    try:
        result = _storescu(storescu, server.port, tree)
    finally:
        assert server.terminate() == 0, server.log_path.read_text()
    assert len(reference) > 100, "storescu should send most uncompressed test files"
    _check_against_reference(tmp_path / "out", files, reference)
    # storescu +sd +r proposes a fixed list of SOP classes; it cannot send the others
    failed = result.stderr.count("E: No presentation context for")
    assert failed == len(files) - len(reference), result.stderr


#: storescu's option that proposes a transfer syntax first ("-R" alone proposes
#: only uncompressed ones in DCMTK 3.6.7, whatever the file holds).
PROPOSE = {
    "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}


def test_storescu_required_contexts_preserves_compressed_transfer_syntaxes(
    tmp_path: Path, storescu: str, storescp: str
) -> None:
    """``storescu -R -x?`` per transfer syntax: JPEG baseline/extended/lossless,
    JPEG-LS, JPEG 2000, RLE, deflated, big endian are all stored as they came."""
    files = _unique_instances()
    by_ts: dict[str, list[Path]] = {}
    for f in files:
        ts = pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
        by_ts.setdefault(str(ts), []).append(f)
    assert set(by_ts) == set(PROPOSE), "the test data should cover every syntax of PROPOSE"
    trees = {ts: _tree(fs, tmp_path / "tree" / ts) for ts, fs in by_ts.items()}
    runs = [(tree, ("-R", PROPOSE[ts])) for ts, tree in trees.items()]
    reference = _reference_runs(storescu, storescp, runs, tmp_path / "dcmtk")
    server = ServeProcess(tmp_path / "out")
    try:
        results = [_storescu(storescu, server.port, tree, *options) for tree, options in runs]
    finally:
        assert server.terminate() == 0, server.log_path.read_text()
    for r in results:
        assert r.returncode == 0 and "Store Failed" not in r.stderr, r.args + [r.stderr]
    _check_against_reference(tmp_path / "out", files, reference)
    # storescu itself skips files whose dataset lacks SOP Class/Instance UID
    skipped = {Path(line.split("in file: ", 1)[1].split(", ignoring", 1)[0]).name.split("_", 1)[1]
               for r in results for line in r.stderr.splitlines() if "ignoring file" in line}
    assert len(skipped) <= 1, skipped
    assert len(reference) == len(files) - len(skipped)
    for f in files:
        if f.name in skipped:
            continue
        stored = pydicom.dcmread(tmp_path / "out" / expected_path(f), stop_before_pixels=True)
        source = pydicom.dcmread(f, stop_before_pixels=True)
        assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID, f.name

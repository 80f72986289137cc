"""Benchmark trees: many instances derived from a real pydicom test file.

Each tree is built once and cached in a folder (``<cache>/<name>``); a
``.complete`` marker says the build finished, so an interrupted build is
redone, never used half-made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

#: The source instance: a real CT image (128x128, 16-bit, explicit VR little endian).
SOURCE_FILE = "CT_small.dcm"
DEFAULT_CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "sortscp-bench"
_MARKER = ".complete"  # beside the tree, not in it: it is not an instance


@dataclass(frozen=True)
class TreeSpec:
    """A tree of `count` instances of `size` x `size` 16-bit pixels."""

    name: str
    count: int
    size: int
    patients: int
    series_per_patient: int

    @property
    def instance_bytes(self) -> int:
        return self.size * self.size * 2


SMALL = TreeSpec("small-5000x128", 5000, 128, patients=20, series_per_patient=5)
#: The same instances, ten times as many (memory and rate must stay flat).
LARGE = TreeSpec("small-50000x128", 50000, 128, patients=100, series_per_patient=5)
CT = TreeSpec("ct-500x512", 500, 512, patients=5, series_per_patient=2)
#: ``bench_serve.py --instances small``: the sort trees' ~37 KB instances, where the
#: per-instance work (association traffic, naming, flushes) outweighs the bytes.
SERVE_SMALL = TreeSpec("small-2000x128", 2000, 128, patients=5, series_per_patient=4)


def build_tree(spec: TreeSpec, cache: Path) -> Path:
    """The tree for `spec` under `cache` (built now unless already complete).

    Layout: ``P{patient}/S{series}/IM{n:04d}`` (no extension, as on a CD), with
    new Study/Series/SOP Instance UIDs, patient names and IDs.
    """
    root = cache / spec.name
    marker = cache / f"{spec.name}{_MARKER}"
    if marker.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file(SOURCE_FILE))
    ds.Rows = ds.Columns = spec.size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    pattern = bytes(range(256)) * (spec.instance_bytes // 256 + 1)
    ds.PixelData = pattern[: spec.instance_bytes]
    series = spec.patients * spec.series_per_patient
    per_series = -(-spec.count // series)
    n = 0
    for p in range(spec.patients):
        ds.PatientName = f"Bench^Patient{p:03d}"
        ds.PatientID = f"BENCH{p:05d}"
        ds.StudyInstanceUID = generate_uid()
        for s in range(spec.series_per_patient):
            ds.SeriesInstanceUID = generate_uid()
            ds.SeriesNumber = s + 1
            ds.SeriesDescription = f"Bench series {s + 1}"
            folder = root / f"P{p:03d}" / f"S{s + 1:02d}"
            folder.mkdir(parents=True)
            for i in range(per_series):
                if n == spec.count:
                    break
                uid = generate_uid()
                ds.SOPInstanceUID = uid
                ds.file_meta.MediaStorageSOPInstanceUID = uid
                ds.InstanceNumber = i + 1
                ds.save_as(folder / f"IM{i + 1:04d}", enforce_file_format=True)
                n += 1
    marker.touch()
    return root


def instance_files(root: Path) -> list[Path]:
    """The instances of a built tree."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def count_files(root: Path) -> int:
    """Regular files under `root`, ignoring sortscp's dot folders (temporary area, index, manifests)."""
    total = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        total += len(files)
    return total


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    """Environment that runs this checkout's ``python -m scp``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root()), env.get("PYTHONPATH")]))
    # Run as an installed package runs: with its modules' bytecode cached (pip
    # compiles it on install). With PYTHONDONTWRITEBYTECODE in the environment
    # every run would compile our modules again (~0.07 s of start-up); the
    # cache goes beside the trees, not into the checkout.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(DEFAULT_CACHE / "pycache")
    for key in [k for k in env if k.startswith("SORTSCP_")]:
        del env[key]
    return env


def sortscp_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "scp", *args]


def run_checked(cmd: list[str], **kwargs) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")

"""``sortscp sort SRC DST`` end to end, on a messy tree built from real DICOM files."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from scp import sort as batch
from scp.config import SortConfig
from scp.enums import Result as Status
from scp.store.index import STATE_DIRNAME
from scp.store.tmp import TMP_DIRNAME

from conftest import (
    CHARSET_FILES,
    TEST_FILES,
    cli_env,
    descendants,
    readable_dicom_files,
    run_cli,
)

pytestmark = pytest.mark.timeout(300)

TRUNCATED_NAMES = ("truncated", "too_short")  # how pydicom's test data names its cut files
SUMMARY = re.compile(
    r"(?P<new>\d+) new, (?P<replaced>\d+) replaced, (?P<already>\d+) already in place, "
    r"(?P<kept>\d+) kept as ~N, (?P<skipped>\d+) skipped \([^)]*\), (?P<failed>\d+) failed"
)
FIELDS = ["source", "destination", "outcome", "reason", "category", "source_b64"]
STORED = ("new", "replaced", "kept_as_copy")
WORKERS = "2"


# --- building the messy tree ---------------------------------------------------

def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _junk(src: Path) -> dict[str, bytes]:
    """Files that are not DICOM instances, by relative path."""
    ct = (TEST_FILES / "CT_small.dcm").read_bytes()
    return {
        "DICOMDIR": (TEST_FILES / "dicomdirtests" / "DICOMDIR").read_bytes(),
        "CD 1/DICOMDIR": (TEST_FILES / "dicomdirtests" / "DICOMDIR-implicit").read_bytes(),
        "notes.txt": b"Patient folders from the old PACS\n",
        "README": "Lisez-moi: données ün ïcødé\n".encode(),
        "photos/scan.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01" + bytes(200),
        "photos/scan.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200),
        "empty.dcm": b"",
        "empty folder/.keep": b"",
        "deep/a/b/cut in half.dcm": ct[: len(ct) // 2],
        "deep/a/b/c/fake.dcm": bytes(128) + b"DICM" + b"not really",
    }


def build_messy_tree(root: Path, dicom: list[Path]) -> dict[str, list[Path]]:
    """Copy `dicom` (and truncated and junk files) into an odd, nested tree."""
    shapes = [
        "CD 1/DICOM/{i:08d}/IM{i:06d}",
        "archive/deep/{a}/{b}/{c}/{d}/{e}/{f}/{g}/{i}.dcm",
        "ünïcödé names/患者 {i}.dcm",
        "with spaces/file name {i} .DCM",
        "flat/{i}",
        "{i}-no-extension",
    ]
    placed: dict[str, list[Path]] = {"dicom": [], "truncated": [], "junk": []}
    for i, f in enumerate(dicom):
        digits = f"{i:07d}"
        rel = shapes[i % len(shapes)].format(i=i, **dict(zip("abcdefg", digits)))
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
        truncated = any(t in f.name for t in TRUNCATED_NAMES)
        placed["truncated" if truncated else "dicom"].append(dst)
    for rel, data in _junk(root).items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        placed["truncated" if "cut" in rel else "junk"].append(dst)
    (root / "empty folder" / "nested empty").mkdir(parents=True)
    # the same instance twice (a real copy), and a different file with a stored UID
    ct = root / "copies/CT original"
    ct.parent.mkdir()
    shutil.copy2(TEST_FILES / "CT_small.dcm", ct)
    placed["dicom"].append(ct)
    twin = root / "copies/CT again.dcm"
    shutil.copy2(ct, twin)
    placed["dicom"].append(twin)
    ds = pydicom.dcmread(ct)
    ds.StudyDescription = "edited after export"
    edited = root / "copies/CT edited.dcm"
    ds.save_as(edited)
    placed["dicom"].append(edited)
    return placed


def clone(src: Path, dst: Path) -> None:
    """``cp -al``: the same files under new names (a cheap, independent tree)."""
    for folder, dirs, files in os.walk(src):
        out = dst / os.path.relpath(folder, src)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            os.link(os.path.join(folder, name), out / name)


class Tree:
    """A messy source tree and what it holds."""

    def __init__(self, root: Path, placed: dict[str, list[Path]]) -> None:
        self.root = root
        self.placed = placed

    def clone(self, dst: Path) -> Tree:
        clone(self.root, dst)
        moved = {k: [dst / p.relative_to(self.root) for p in v] for k, v in self.placed.items()}
        return Tree(dst, moved)

    @property
    def dicom(self) -> list[Path]:
        return self.placed["dicom"]

    @property
    def not_dicom(self) -> list[Path]:
        return self.placed["truncated"] + self.placed["junk"]

    def all_files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file() or p.is_symlink())


def _all_dicom_sources() -> list[Path]:
    return readable_dicom_files()


def _small(files: list[Path], limit: int = 200_000) -> list[Path]:
    return [f for f in files if f.stat().st_size <= limit]


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory) -> Tree:
    root = tmp_path_factory.mktemp("full") / "src"
    return Tree(root, build_messy_tree(root, _all_dicom_sources()))


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Tree:
    root = tmp_path_factory.mktemp("small") / "src"
    files = _small(_all_dicom_sources())
    charset = [f for f in files if f.parent == CHARSET_FILES]
    picked = files[::4] + [f for f in charset if f not in files[::4]]
    picked += [f for f in files if any(t in f.name for t in TRUNCATED_NAMES)]
    return Tree(root, build_messy_tree(root, list(dict.fromkeys(picked))))


# --- checking a sorted tree ----------------------------------------------------

def layout_files(dst: Path) -> list[Path]:
    return sorted(
        p for p in dst.rglob("*")
        if (p.is_file() or p.is_symlink())
        and not {TMP_DIRNAME, STATE_DIRNAME} & set(p.relative_to(dst).parts)
    )


def summary(out: str) -> dict[str, int]:
    found = SUMMARY.findall(out)
    assert found, out
    new, replaced, already, kept, skipped, failed = map(int, found[-1])
    return {"stored": new + replaced + kept, "already": already, "skipped": skipped,
            "failed": failed}


def instance_uid(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    uid = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
    return str(uid)


def check_layout(dst: Path, sources: list[Path], junk: list[Path]) -> list[Path]:
    """Every distinct DICOM content stored exactly once, under its UID, in the
    three-level layout; nothing else in DST. Returns the layout files."""
    stored = layout_files(dst)
    want = Counter(sha(p) for p in sources)
    got = Counter(sha(p) for p in stored)
    assert set(got) == set(want), (
        f"missing: {[str(p) for p in sources if sha(p) not in got][:5]}, "
        f"extra: {[str(p) for p in stored if sha(p) not in want][:5]}"
    )
    assert max(got.values()) == 1, [k for k, n in got.items() if n > 1]
    junk_hashes = {sha(p) for p in junk}
    for path in stored:
        rel = path.relative_to(dst)
        assert len(rel.parts) == 3, rel
        assert sha(path) not in junk_hashes, rel
        uid = instance_uid(path)
        assert re.fullmatch(re.escape(uid) + r"(~\d+)?\.dcm", rel.name), (rel, uid)
        assert path.resolve().is_relative_to(dst.resolve()) or path.is_symlink()
    return stored


# --- copy: the full messy tree -----------------------------------------------

@pytest.fixture(scope="module")
def copied(full_tree: Tree, tmp_path_factory):
    dst = tmp_path_factory.mktemp("copied") / "sorted out"
    report = dst.parent / "report.csv"
    r = run_cli("sort", full_tree.root, dst, "--workers", WORKERS, "--report", report)
    return full_tree, dst, report, r


def test_copy_sorts_everything_once_and_skips_non_dicom(copied) -> None:
    tree, dst, _, r = copied
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    stored = check_layout(dst, tree.dicom, tree.not_dicom)
    distinct = len({sha(p) for p in tree.dicom})
    assert summary(out) == {
        "stored": distinct, "already": len(tree.dicom) - distinct,
        "skipped": len(tree.not_dicom), "failed": 0,
    }, out
    assert len(stored) == distinct
    # the sources are all still there, untouched
    for p in tree.dicom + tree.not_dicom:
        assert p.exists(), p


def test_copy_keeps_timestamps(copied) -> None:
    tree, dst, _, _ = copied
    mtimes: dict[str, set[int]] = {}
    for p in tree.dicom:
        mtimes.setdefault(sha(p), set()).add(p.stat().st_mtime_ns)
    for path in layout_files(dst):
        assert path.stat().st_mtime_ns in mtimes[sha(path)], path
        assert path.stat().st_nlink == 1  # a copy, not a link


def test_charset_names_are_readable_folders(copied) -> None:
    tree, dst, _, _ = copied
    stored = {sha(p): p.relative_to(dst) for p in layout_files(dst)}
    checked = 0
    for path in sorted(CHARSET_FILES.glob("*.dcm")):
        name = pydicom.dcmread(path, stop_before_pixels=True).get("PatientName")
        if not name:
            continue
        expected = "=".join(g.rstrip("^").strip() for g in str(name).split("=")).rstrip("=")
        folder = stored[sha(path)].parts[0]
        assert "_".join(expected.split()) in folder, (path.name, folder, expected)
        checked += 1
    assert checked >= 15
    folders = {p.name for p in dst.iterdir()}
    for name in ("김희중", "やまだ^たろう", "Wang^XiaoDong=王^小東", "Διονυσιος", "Люкceмбypг",
                 "שרון^דבורה", "قباني^لنزار", "Hong^Gildong=洪^吉洞=홍^길동"):
        assert any(name in folder for folder in folders), (name, sorted(folders))


def test_same_uid_other_bytes_is_kept_beside(copied) -> None:
    tree, dst, _, _ = copied
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm", stop_before_pixels=True)
    uid = ct.SOPInstanceUID
    named = sorted(p.name for p in layout_files(dst) if p.name.startswith(uid))
    assert named == [f"{uid}.dcm", f"{uid}~2.dcm"], named
    folder = next(p.parent for p in layout_files(dst) if p.name == f"{uid}.dcm")
    contents = {sha(folder / n) for n in named}
    assert contents == {sha(TEST_FILES / "CT_small.dcm"), sha(tree.root / "copies/CT edited.dcm")}


def test_report_has_one_row_per_file(copied) -> None:
    tree, dst, report, _ = copied
    with open(report, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == FIELDS
    by_source = {row["source"]: row for row in rows}
    assert len(rows) == len(by_source) == len(tree.all_files())
    assert set(by_source) == {str(p) for p in tree.all_files()}
    for p in tree.dicom:
        row = by_source[str(p)]
        assert row["outcome"] in (*STORED, "already"), row
        assert Path(row["destination"]).read_bytes() == p.read_bytes(), row
    for p in tree.not_dicom:
        row = by_source[str(p)]
        assert row["outcome"] == "skipped" and row["reason"] and not row["destination"], row
    for p in tree.placed["truncated"]:
        assert "truncated" in by_source[str(p)]["reason"] or "cannot read" in by_source[str(p)]["reason"]
    assert "DICOMDIR" in by_source[str(tree.root / "DICOMDIR")]["reason"]
    assert {by_source[str(tree.root / n)]["outcome"] for n in ("copies/CT edited.dcm",
            "copies/CT original")} <= {"new", "kept_as_copy", "already"}


def test_rerun_is_idempotent(copied) -> None:
    tree, dst, _, _ = copied
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in layout_files(dst)}
    os.utime(dst / TMP_DIRNAME, ns=(0, 0))
    r = run_cli("sort", tree.root, dst, "--workers", WORKERS)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert summary(out) == {
        "stored": 0, "already": len(tree.dicom), "skipped": len(tree.not_dicom), "failed": 0,
    }, out
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in layout_files(dst)} == before
    assert (dst / TMP_DIRNAME).stat().st_mtime_ns == 0  # not even a temporary file
    assert os.listdir(dst / TMP_DIRNAME) == []


# --- the other modes ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["hardlink", "symlink", "move"])
def test_mode(small_tree: Tree, tmp_path: Path, mode: str) -> None:
    tree = small_tree.clone(tmp_path / "src")
    contents = {p: p.read_bytes() for p in tree.dicom + tree.not_dicom}
    inodes = {p.stat().st_ino: p for p in tree.dicom}
    dst = tmp_path / "dst"
    r = run_cli("sort", tree.root, dst, "--mode", mode, "--workers", WORKERS)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    distinct = len(set(map(sha, tree.dicom))) if mode != "move" else None
    stored = layout_files(dst)
    assert {hashlib.sha256(b).hexdigest() for p, b in contents.items() if p in tree.dicom} == {
        sha(p) for p in stored}
    assert len(stored) == len({sha(p) for p in stored})
    for p in tree.not_dicom:  # never touched, in any mode
        assert p.read_bytes() == contents[p], p
    if mode == "hardlink":
        assert len(stored) == distinct
        for path in stored:
            assert path.stat().st_ino in inodes, path
            assert not path.is_symlink()
    elif mode == "symlink":
        for path in stored:
            assert path.is_symlink(), path
            target = Path(os.readlink(path))
            assert target.is_absolute() and target in contents, target
            assert target.read_bytes() == contents[target]
    else:
        for p in tree.dicom:
            assert not p.exists(), f"{p} was stored but not removed"
        # the folders that moving emptied are gone; the others stay
        emptied = {d for p in tree.dicom for d in p.parents if d.is_relative_to(tree.root)
                   and not any(n.is_relative_to(d) for n in tree.not_dicom)} - {tree.root}
        assert emptied and not [d for d in emptied if d.exists()]
        empty_now = [d for d in tree.root.rglob("*") if d.is_dir() and not any(d.iterdir())]
        assert empty_now == [tree.root / "empty folder" / "nested empty"]
        assert tree.root.is_dir()
    # a second run has nothing to do
    r = run_cli("sort", tree.root, dst, "--mode", mode, "--workers", WORKERS)
    counts = summary(r.stdout + r.stderr)
    assert r.returncode == 0 and counts["stored"] == 0 and counts["failed"] == 0, r.stderr
    assert layout_files(dst) == stored


def test_dry_run_prints_the_plan_and_touches_nothing(small_tree: Tree, tmp_path: Path) -> None:
    tree = small_tree.clone(tmp_path / "src")
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tree.all_files()}
    dst = tmp_path / "dst"
    for mode in ("copy", "move"):
        r = run_cli("sort", tree.root, dst, "--dry-run", "--mode", mode, "--workers", WORKERS)
        assert r.returncode == 0, r.stdout + r.stderr
        plan = [line.split(" -> ") for line in r.stdout.splitlines() if " -> " in line]
        # one line per distinct content: a second copy of the same bytes is
        # "already" there once the first is placed, as in the real run
        assert {sha(Path(src)) for src, _ in plan} == {sha(p) for p in tree.dicom}, r.stdout
        assert len(plan) == len({sha(p) for p in tree.dicom}), r.stdout
        assert {src for src, _ in plan} <= set(map(str, tree.dicom)), r.stdout
        for src, planned in plan:
            assert Path(planned).is_relative_to(dst), planned
            assert Path(planned).name.startswith(instance_uid(Path(src))), (src, planned)
        counts = re.search(r"(\d+) planned \(dry run\).* (\d+) kept as ~N", r.stderr)
        assert counts and int(counts[1]) + int(counts[2]) == len(plan), r.stderr
        assert int(counts[2]) >= 1, r.stderr
        assert not dst.exists()
        assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tree.all_files()} == before


def test_json_lines_report(small_tree: Tree, tmp_path: Path) -> None:
    tree = small_tree.clone(tmp_path / "src")
    dst, report = tmp_path / "dst", tmp_path / "report.jsonl"
    r = run_cli("sort", tree.root, dst, "--report", report, "--workers", WORKERS)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(tree.all_files())
    assert all(list(row) == FIELDS for row in rows)
    outcomes = Counter(row["outcome"] for row in rows)
    assert outcomes["skipped"] == len(tree.not_dicom)
    assert sum(outcomes[k] for k in (*STORED, "already")) == len(tree.dicom)
    assert any("患者" in row["source"] for row in rows)  # written as text, not escaped


def test_a_source_left_aside_by_a_killed_move_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """README: a move killed between renaming a source aside and removing it
    leaves it as ``.sortscp-leaving-*``; the next run finds it in place and
    removes it (here its copy is in DST, as that run had made it)."""
    ct = (TEST_FILES / "CT_small.dcm").read_bytes()
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "CD").mkdir(parents=True)
    (src / "CD" / "IM1").write_bytes(ct)
    first = run_cli("sort", src, dst, "--mode", "copy", "--workers", WORKERS)
    assert first.returncode == 0, first.stderr
    (placed,) = [p for p in dst.rglob("*.dcm")]
    aside = src / "CD" / ".sortscp-leaving-4000000-0badcafe"
    os.rename(src / "CD" / "IM1", aside)  # what the kill left
    again = run_cli("sort", src, dst, "--mode", "move", "--workers", WORKERS)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 already in place" in again.stderr, again.stderr
    assert not aside.exists()
    assert [p for p in dst.rglob("*.dcm")] == [placed] and placed.read_bytes() == ct


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_a_report_path_holding_a_file_of_src_is_refused_and_the_file_kept(
    small_tree: Tree, tmp_path: Path, suffix: str
) -> None:
    tree = small_tree.clone(tmp_path / "src")
    victim = tree.root / f"ct{suffix}"  # a DICOM file that happens to be named like a report
    shutil.copyfile(tree.dicom[0], victim)
    before = victim.read_bytes()
    dst = tmp_path / "dst"
    for mode in ("copy", "move"):
        r = run_cli("sort", tree.root, dst, "--report", victim, "--mode", mode, "--workers", WORKERS)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "is not a sortscp report; refusing to overwrite it" in r.stderr and "Traceback" not in r.stderr
        assert victim.read_bytes() == before
        assert not dst.exists()  # refused before anything was touched
    # a report of an earlier run at that path is written over, as always
    report = tmp_path / f"report{suffix}"
    for _ in range(2):
        r = run_cli("sort", tree.root, dst, "--report", report, "--workers", WORKERS)
        assert r.returncode == 0, r.stderr
    assert report.stat().st_size > 0


# --- failures and usage errors ------------------------------------------------------

def test_a_failure_gives_exit_1_and_the_rest_is_sorted(small_tree: Tree, tmp_path: Path) -> None:
    tree = small_tree.clone(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    # a plain file sits where the patient folder of CT_small must go
    blocked = dst / "CompressedSamples^CT1_1CT1"
    blocked.write_text("in the way")
    report = tmp_path / "r.csv"
    r = run_cli("sort", tree.root, dst, "--report", report, "--workers", WORKERS)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    counts = summary(out)
    ct_sources = [p for p in tree.dicom if sha(p) in {sha(TEST_FILES / "CT_small.dcm"),
                                                       sha(tree.root / "copies/CT edited.dcm")}]
    assert counts["failed"] == len(ct_sources) >= 3, out
    assert "failed:" in out and "CompressedSamples^CT1_1CT1" in out, out
    rows = list(csv.DictReader(open(report, newline="", encoding="utf-8")))
    failed = [row for row in rows if row["outcome"] == "failed"]
    assert {row["source"] for row in failed} == set(map(str, ct_sources))
    assert all("cannot create" in row["reason"] for row in failed), failed
    assert blocked.read_text() == "in the way"
    others = [p for p in tree.dicom if p not in ct_sources]
    blocked.unlink()
    check_layout(dst, others, tree.not_dicom)  # everything else is in place


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/missing", "{tmp}/dst"], "does not exist"),
        (["{tmp}/src", "{tmp}/src/file"], "{tmp}/src/file"),
        (["{tmp}/src", "{tmp}/dst", "--mode", "teleport"], "teleport"),
        (["{tmp}/src", "{tmp}/dst", "--workers", "0"], "from 1 to 256"),
        (["{tmp}/src", "{tmp}/dst", "--report", "{tmp}/no/such/folder/r.csv"], "r.csv"),
    ],
)
def test_usage_errors_exit_2_before_touching_dst(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "file").write_bytes((TEST_FILES / "CT_small.dcm").read_bytes())
    r = run_cli("sort", *(a.format(tmp=tmp_path) for a in args))
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 2, out
    assert message.format(tmp=tmp_path) in out.replace("'", "").replace('"', ""), out
    assert not (tmp_path / "dst").exists(), out
    assert os.listdir(tmp_path / "src") == ["file"]


@pytest.mark.parametrize("args", [
    ["sort", "{src}", ""], ["sort", "", "{tmp}/dst"], ["sort", "{src}", " "],
    ["ls", ""], ["reindex", ""], ["serve", "--out", "", "--port", "0"],
], ids=["sort DST", "sort SRC", "sort DST blank", "ls", "reindex", "serve --out"])
def test_an_empty_folder_argument_is_refused_not_read_as_the_working_folder(
        tmp_path: Path, args: list[str]) -> None:
    """``sortscp sort "$SRC" "$DST"`` with DST unset sorted SRC into the
    working folder (and ``serve -o "$OUT"`` served into it)."""
    src, here = tmp_path / "src", tmp_path / "here"
    src.mkdir()
    here.mkdir()
    (src / "ct.dcm").write_bytes((TEST_FILES / "CT_small.dcm").read_bytes())
    r = run_cli(*(a.format(tmp=tmp_path, src=src) for a in args), cwd=here, timeout=30)
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 2 and "is empty" in out, out
    assert os.listdir(here) == [] and os.listdir(src) == ["ct.dcm"], out


# --- interrupted runs ----------------------------------------------------------------

N_INSTANCES = 1500


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Tree:
    """Many small unique instances (MR_small with new UIDs), some folders deep."""
    root = tmp_path_factory.mktemp("many") / "src"
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    files = []
    for i in range(N_INSTANCES):
        uid = f"1.2.826.0.1.3680043.8.498.77.{i}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SeriesNumber = i % 7
        buf = io.BytesIO()
        ds.save_as(buf)
        path = root / f"batch {i % 13}" / f"{i % 5}" / f"IM{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        files.append(path)
    (root / "batch 0" / "notes.txt").write_text("not dicom")
    return Tree(root, {"dicom": files, "truncated": [], "junk": [root / "batch 0" / "notes.txt"]})


def start_sort(*args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "scp", "sort", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
        start_new_session=True,  # its own process group: workers included
    )


def wait_for_files(dst: Path, count: int, proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        n = sum(1 for _ in dst.rglob("*.dcm")) if dst.exists() else 0
        if n >= count:
            return n
        time.sleep(0.01)
    raise AssertionError(f"the sort did not get going (exit {proc.poll()}): {proc.communicate()}")


def check_no_partial_final_files(dst: Path, sources: dict[str, bytes]) -> None:
    for path in layout_files(dst):
        uid = path.name.removesuffix(".dcm")
        assert path.read_bytes() == sources[uid], f"{path} is not a complete copy"


@pytest.mark.parametrize(
    ("how", "mode"),
    [("SIGKILL", "copy"), ("SIGKILL", "move"), ("SIGINT", "copy")],
)
def test_resume_after_interruption(many: Tree, tmp_path: Path, how: str, mode: str) -> None:
    tree = many.clone(tmp_path / "src")
    by_uid = {f"1.2.826.0.1.3680043.8.498.77.{i}": p.read_bytes() for i, p in enumerate(many.dicom)}
    dst = tmp_path / "dst"
    proc = start_sort(tree.root, dst, "--mode", mode, "--workers", "1", "--fsync", "always")
    try:
        wait_for_files(dst, 20, proc)
        assert proc.poll() is None, "finished before it could be interrupted"
        if how == "SIGKILL":
            os.killpg(proc.pid, signal.SIGKILL)  # the whole job dies at once, mid-write
            proc.wait(30)
            assert proc.returncode == -signal.SIGKILL
        else:
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 130, err
            assert "interrupted" in err and "run the same command again" in err, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    done = layout_files(dst)
    assert 0 < len(done) < N_INSTANCES, len(done)
    check_no_partial_final_files(dst, by_uid)
    if mode == "move":  # nothing lost: every instance is in SRC or complete in DST
        left = {p.name for p in tree.all_files()}
        in_dst = {p.name.removesuffix(".dcm") for p in done}
        missing = [uid for i, uid in enumerate(by_uid) if uid not in in_dst and not tree.dicom[i].exists()]
        assert missing == [], missing[:5]
        assert "notes.txt" in left

    r = run_cli("sort", tree.root, dst, "--mode", mode, "--workers", WORKERS)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    counts = summary(out)
    assert counts["failed"] == 0 and counts["skipped"] == 1, out
    if mode == "copy":
        assert counts["already"] >= len(done) and counts["stored"] == N_INSTANCES - counts["already"]
    final = layout_files(dst)
    assert sorted(p.name for p in final) == sorted(f"{uid}.dcm" for uid in by_uid)
    check_no_partial_final_files(dst, by_uid)
    tmp = dst / TMP_DIRNAME
    leftovers = sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []
    assert leftovers == [], f"the re-run left the killed run's temporary files: {leftovers}"
    if mode == "move":
        assert [p for p in tree.all_files() if p.name != "notes.txt"] == []


def _kill_the_worker(tree: Tree, dst: Path, mode: str, stop: bool = False) -> tuple[int, str, list[dict]]:
    """``sort --workers 1`` of `tree` into `dst`, its worker killed (and, with
    `stop`, the run stopped with SIGTERM at that moment) once 20 files are in
    place: exit status, standard error, report rows."""
    report = dst.parent / "r.csv"
    proc = start_sort(tree.root, dst, "--mode", mode, "--workers", "1", "--report", report)
    try:
        wait_for_files(dst, 20, proc)
        assert proc.poll() is None, "finished before a worker could be killed"
        workers = descendants(proc.pid)
        assert workers, "no worker process"
        if stop:
            os.kill(proc.pid, signal.SIGTERM)  # the user stops the run as its worker dies
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return proc.returncode, err, list(csv.DictReader(open(report, newline="", encoding="utf-8")))


@pytest.mark.parametrize("mode", ["move", "copy"])
def test_a_worker_killed_mid_batch_loses_no_entry_of_the_report(many: Tree, tmp_path: Path, mode: str) -> None:
    """Found by an independent attack: with a worker killed (the OOM killer, a
    user), every file of its batch was reported `failed`, "never touched",
    while a move had already linked many of them at their names in DST (the
    sources are removed at the batch's end). The batch is sorted again, file
    by file, in a new worker: the run ends as if nothing had happened."""
    tree = many.clone(tmp_path / "src")
    by_uid = {f"1.2.826.0.1.3680043.8.498.77.{i}": p.read_bytes() for i, p in enumerate(many.dicom)}
    dst = tmp_path / "dst"
    code, err, rows = _kill_the_worker(tree, dst, mode)
    assert code == 0, err
    assert "a worker died during a batch" in err and "Traceback" not in err, err
    outcomes = Counter(r["outcome"] for r in rows)
    assert outcomes["failed"] == 0, [r for r in rows if r["outcome"] == "failed"][:3]
    # (a move killed while it removed its batch's sources: those are gone, their copies in place)
    moved_by_the_dead = [r for r in rows if r["category"] == "gone"]
    assert all("its worker died just after it moved the file" in r["reason"] for r in moved_by_the_dead)
    assert mode == "move" or not moved_by_the_dead
    # (what the dead worker had placed is found in place: a copy, the same bytes; a move's link)
    placed = outcomes["new"] + outcomes["replaced"] + outcomes["already"]
    assert placed + len(moved_by_the_dead) == N_INSTANCES, outcomes
    final = layout_files(dst)
    assert sorted(p.name for p in final) == sorted(f"{uid}.dcm" for uid in by_uid)
    check_no_partial_final_files(dst, by_uid)
    left = [p for p in tree.all_files() if p.name != "notes.txt"]
    aside = [p for p in left if p.name.startswith(".sortscp-leaving-")]  # the next run removes them
    assert len(left) - len(aside) == (0 if mode == "move" else N_INSTANCES)
    assert len(aside) <= len(moved_by_the_dead)
    # (an aside name is the moved file itself, a link of its copy in DST until the next run removes it)
    sources = {os.stat(p).st_ino for p in left if p not in aside}
    assert not [p for p in final if os.stat(p).st_ino in sources]  # copies, not links to a source


def test_a_worker_killed_as_the_run_is_stopped_leaves_no_failed_row(many: Tree, tmp_path: Path) -> None:
    """Found by an independent attack: a worker that died as the user stopped
    the run left every file of its batch `failed`, most of them already in
    DST. Its batch was in flight, so it is sorted again before the run stops."""
    tree = many.clone(tmp_path / "src")
    by_uid = {f"1.2.826.0.1.3680043.8.498.77.{i}": p.read_bytes() for i, p in enumerate(many.dicom)}
    dst = tmp_path / "dst"
    code, err, rows = _kill_the_worker(tree, dst, "move", stop=True)
    assert code == 143, err
    assert not [r for r in rows if r["outcome"] == "failed"], [r for r in rows if r["outcome"] == "failed"][:3]
    check_no_partial_final_files(dst, by_uid)
    in_dst = {p.name.removesuffix(".dcm") for p in layout_files(dst)}
    left = [p for p in tree.all_files() if p.name != "notes.txt" and not p.name.startswith(".sortscp-leaving-")]
    assert len(in_dst) + len(left) >= N_INSTANCES  # nothing lost (a source may be in both until the rerun)
    assert all(r["destination"] for r in rows if r["outcome"] in ("new", "replaced", "already"))


# --- sorting in place ------------------------------------------------------------------

def test_move_into_a_folder_inside_src(small_tree: Tree, tmp_path: Path) -> None:
    tree = small_tree.clone(tmp_path / "src")
    contents = {sha(p) for p in tree.dicom}
    dst = tree.root / "sorted"
    r = run_cli("sort", tree.root, dst, "--mode", "move", "--workers", WORKERS)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert summary(out)["skipped"] == len(tree.not_dicom), out
    assert {sha(p) for p in layout_files(dst)} == contents
    outside = [p for p in tree.all_files() if not p.is_relative_to(dst)]
    assert sorted(outside) == sorted(tree.not_dicom)
    assert (tree.root / "empty folder" / "nested empty").is_dir()
    # again: its own output is not reprocessed
    r = run_cli("sort", tree.root, dst, "--mode", "move", "--workers", WORKERS)
    assert summary(r.stdout + r.stderr) == {
        "stored": 0, "already": 0, "skipped": len(tree.not_dicom), "failed": 0}, r.stderr


@pytest.mark.parametrize("mode", ["move", "copy"])
def test_resort_in_place_with_a_new_template(small_tree: Tree, tmp_path: Path, mode: str) -> None:
    tree = small_tree.clone(tmp_path / "src")
    contents = {sha(p) for p in tree.dicom}
    here = tmp_path / "library"
    r = run_cli("sort", tree.root, here, "--workers", WORKERS)
    assert r.returncode == 0, r.stderr
    first = layout_files(here)
    (here / "keep me (empty)").mkdir()
    template = "{PatientID}/{Modality}/{SOPInstanceUID}.dcm"
    r = run_cli("sort", here, here, "--mode", mode, "--template", template, "--workers", WORKERS)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    counts = summary(out)
    # every file of the old layout was processed once; none of the new ones
    assert counts["stored"] + counts["already"] == len(first) and counts["failed"] == 0, out
    now = layout_files(here)
    if mode == "move":
        assert {sha(p) for p in now} == contents and len(now) == len(contents)
        assert all(len(p.relative_to(here).parts) == 3 for p in now)
        old_folders = {p.parent.parent for p in first}
        new_top = {p.relative_to(here).parts[0] for p in now}
        for folder in old_folders:
            assert not folder.exists() or folder.name in new_top, folder
    else:
        assert set(first) <= set(now) and len(now) == 2 * len(first)
    assert (here / "keep me (empty)").is_dir()
    # and once more: all in place
    r = run_cli("sort", here, here, "--mode", mode, "--template", template, "--workers", WORKERS)
    counts = summary(r.stdout + r.stderr)
    assert counts["stored"] == 0 and counts["failed"] == 0, r.stderr


# --- the walk and the pool --------------------------------------------------------------

def test_walk_is_lazy(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "1").write_text("x")
    walk = batch.iter_files(tmp_path)
    assert next(walk) == str(tmp_path / "a" / "1")
    (tmp_path / "b" / "2").write_text("added after the walk began")
    assert list(walk) == [str(tmp_path / "b" / "1"), str(tmp_path / "b" / "2")]


def test_walk_skips_dst_inside_src_and_temp_folders(tmp_path: Path) -> None:
    for rel in ("a/1", "out/P/S/x.dcm", f"{TMP_DIRNAME}/w.part", f"a/{TMP_DIRNAME}/w.part"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    os.symlink(tmp_path / "a" / "1", tmp_path / "link")
    assert list(batch.iter_files(tmp_path, tmp_path / "out")) == [str(tmp_path / "a" / "1")]


def test_jobs_in_flight_are_bounded(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    for i in range(40):
        (src / f"{i:02d}").mkdir(parents=True)
        for j in range(25):
            (src / f"{i:02d}" / f"{j}.txt").write_text("not dicom")
    pulled = 0
    most_ahead = 0
    done = 0
    real_iter = batch.iter_entries

    def counting(*args, **kwargs):
        nonlocal pulled, most_ahead
        for entry in real_iter(*args, **kwargs):
            pulled += 1
            most_ahead = max(most_ahead, pulled - done)
            yield entry

    def on_progress(outcome) -> None:
        nonlocal done
        done += 1
        assert outcome.result is Status.SKIPPED

    monkeypatch.setattr(batch, "iter_entries", counting)
    cfg = SortConfig(src=src, dst=tmp_path / "dst", workers=1)
    report = batch.sort_tree(cfg, on_progress)
    assert report.counts[Status.SKIPPED] == 1000 == done == pulled
    bound = (1 * batch.INFLIGHT_PER_WORKER + 1) * batch.BATCH_SIZE
    assert most_ahead <= bound < 1000, most_ahead


# --- progress -------------------------------------------------------------------------

def test_pipe_gets_plain_output(small_tree: Tree, tmp_path: Path) -> None:
    tree = small_tree.clone(tmp_path / "src")
    r = run_cli("sort", tree.root, tmp_path / "dst", "--workers", WORKERS)
    assert r.returncode == 0, r.stderr
    assert "\x1b[" not in r.stderr and "\x1b[" not in r.stdout, repr(r.stderr)
    assert r.stderr.strip().splitlines()[-1].startswith("done: "), r.stderr
    summary(r.stderr)


def test_terminal_gets_a_progress_bar(small_tree: Tree, tmp_path: Path) -> None:
    tree = small_tree.clone(tmp_path / "src")
    primary, secondary = pty.openpty()
    env = cli_env() | {"TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "scp", "sort", str(tree.root), str(tmp_path / "dst"),
         "--workers", WORKERS],
        stdin=secondary, stdout=secondary, stderr=secondary, env=env, close_fds=True,
    )
    os.close(secondary)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([primary], [], [], 60)
            if not ready:
                break
            try:
                data = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(60) == 0
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "sorting" in text and "\x1b[" in text, text[-2000:]
    assert "━" in text or "━" in text, text[-2000:]
    summary(text)


def test_a_source_that_became_a_fifo_is_skipped_without_blocking(tmp_path: Path) -> None:
    """A file swapped for a FIFO between the walk and its worker: the worker's
    open must not wait for a writer (it did, for ever); skipped as special."""
    import threading

    from scp.sort_jobs import sort_file

    src = tmp_path / "src"
    src.mkdir()
    fifo = src / "was a file.dcm"
    os.mkfifo(fifo)
    cfg = SortConfig(src=src, dst=tmp_path / "dst", workers=1)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(sort_file(str(fifo), cfg)), daemon=True)
    worker.start()
    worker.join(10)
    assert got, "the worker blocked on the FIFO"
    assert (got[0].result, got[0].category) == (Status.SKIPPED, "special"), got[0]
    assert fifo.is_fifo(), "the FIFO was touched"
    assert not any((tmp_path / "dst").rglob("*.dcm")), "something was filed"


def _walk_peak(src: Path, monkeypatch, limit: int) -> tuple[int, int, list[str], int]:
    """Walk `src` with `limit`: how many files, a sum of their path hashes (no
    list of them, which would be counted too), the paths under 'sub', and the
    peak of memory allocated meanwhile."""
    import tracemalloc
    import zlib

    monkeypatch.setattr(batch, "SORTED_FOLDER_LIMIT", limit, raising=False)
    count = digest = 0
    sub: list[str] = []
    tracemalloc.start()
    try:
        for entry in batch.iter_entries(src):
            assert not isinstance(entry, batch.Outcome), entry
            count += 1
            digest += zlib.crc32(entry[0].encode())
            if os.sep + "sub" + os.sep in entry[0]:
                sub.append(entry[0])
        return count, digest, sub, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_huge_flat_folder_is_walked_in_bounded_memory(tmp_path: Path, monkeypatch) -> None:
    """An old flat archive can hold a million files in one folder: listing
    and sorting it whole held every entry in memory (172 MiB at 400,000).
    Past the limit, the walk reads the folder as it goes; every file still
    comes once, and a folder under the limit still comes in name order."""
    import zlib

    src = tmp_path / "flat"
    src.mkdir()
    names = [f"IM{i:06d}" for i in range(8_000)]
    for name in reversed(names):
        os.close(os.open(src / name, os.O_WRONLY | os.O_CREAT, 0o644))
    (src / "sub").mkdir()
    for name in ("b", "a", "c"):
        (src / "sub" / name).touch()
    expected = [str(src / n) for n in names] + [str(src / "sub" / n) for n in "abc"]
    total = sum(zlib.crc32(p.encode()) for p in expected)
    *whole, whole_peak = _walk_peak(src, monkeypatch, 100_000)
    *streamed, streamed_peak = _walk_peak(src, monkeypatch, 400)
    assert whole == streamed == [len(expected), total, expected[-3:]]
    assert streamed_peak * 4 < whole_peak, (streamed_peak, whole_peak)


def _bare_implicit(path: Path, uid: str) -> bytes:
    """The dataset of `path` alone, implicit VR little endian: no preamble, no
    ``DICM``, no File Meta (as some old archives and CDs hold them)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = uid
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    return buf.getvalue()


def test_datasets_without_the_part10_prefix_are_sorted_and_other_files_skipped(tmp_path: Path) -> None:
    """Files without 'DICM' are sorted if they are datasets that identify
    themselves (implicit and explicit VR, little and big endian); everything
    else a CD or an old archive holds is skipped as not DICOM, untouched."""
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.csv"
    bare = {
        "old/IMG0001": _bare_implicit(TEST_FILES / "CT_small.dcm", "1.2.826.0.1.3680043.8.498.77"),
        "old/IMG0002": (TEST_FILES / "ExplVR_LitEndNoMeta.dcm").read_bytes(),
        "old/IMG0003": (TEST_FILES / "ExplVR_BigEndNoMeta.dcm").read_bytes(),
    }
    junk = {
        "viewer/viewer.exe": b"MZ\x90\x00\x03" + bytes(300),
        "viewer/libview.so": b"\x7fELF\x02\x01\x01" + bytes(300),
        "viewer/index.html": b"<html><body>CD viewer</body></html>\n",
        "old/zeros": bytes(300),  # group 0000: read by pydicom, which finds no UIDs
        "old/looks like group 8": bytes.fromhex("08001800") + b"garbage that is no dataset at all",
        "AUTORUN.INF": b"[autorun]\r\nopen=viewer.exe\r\n",
    }
    for rel, data in {**bare, **junk}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    r = run_cli("sort", src, dst, "--workers", WORKERS, "--report", report)
    assert r.returncode == 0, r.stderr
    rows = {row["source"]: row for row in csv.DictReader(report.open(encoding="utf-8"))}
    assert len(rows) == len(bare) + len(junk)
    # pydicom's two explicit VR files share one SOPInstanceUID: the second is kept as '~2'
    assert [rows[str(src / rel)]["outcome"] for rel in sorted(bare)] == ["new", "new", "kept_as_copy"]
    for rel, data in bare.items():
        row = rows[str(src / rel)]
        assert Path(row["destination"]).read_bytes() == data
        uid = pydicom.dcmread(io.BytesIO(data), force=True).SOPInstanceUID
        assert Path(row["destination"]).name in (f"{uid}.dcm", f"{uid}~2.dcm"), row
    for rel, data in junk.items():
        row = rows[str(src / rel)]
        assert (row["outcome"], row["category"]) == ("skipped", "not_dicom"), row
        assert (src / rel).read_bytes() == data


def test_two_uids_made_safe_to_one_name_are_both_kept_and_not_called_one_instance(tmp_path: Path) -> None:
    """Found by an independent attack: "1.2/3" and "1.2_3" are one name once
    made safe for a path; the second was reported as "another file with this
    SOPInstanceUID", which someone cleaning up copies would believe."""
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.csv"
    src.mkdir()
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with pytest.warns(UserWarning):  # pydicom: not a valid UI value
        for name, uid in (("a.dcm", "1.2/3"), ("b.dcm", "1.2_3")):
            base.SOPInstanceUID = base.file_meta.MediaStorageSOPInstanceUID = uid
            base.save_as(src / name, enforce_file_format=True)
    r = run_cli("sort", src, dst, "--report", report)
    assert r.returncode == 0, r.stderr
    rows = {row["source"]: row for row in csv.DictReader(open(report, newline="", encoding="utf-8"))}
    outcomes = sorted((row["outcome"], row["destination"].rsplit("/", 1)[-1]) for row in rows.values())
    assert outcomes == [("kept_as_copy", "1.2_3~2.dcm"), ("new", "1.2_3.dcm")], rows
    (copy,) = [row for row in rows.values() if row["outcome"] == "kept_as_copy"]
    assert "made safe for a path" in copy["reason"]
    uids = {pydicom.dcmread(dst / row["destination"]).SOPInstanceUID for row in rows.values()}
    assert uids == {"1.2/3", "1.2_3"}

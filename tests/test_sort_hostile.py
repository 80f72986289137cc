"""``sortscp sort`` against careless users and hostile trees, black box.

Every test runs the command line of this checkout as a child process on real
DICOM files (pydicom's test data) and checks what a user would check: the exit
status (the output is in every assertion message), the files at their layout
path byte for byte, the sources kept or removed, and the ``--report`` rows.

The tests are written against the conventions of the fixed ``sort``:

* report rows: ``source, destination, outcome, reason, category``; outcome is
  ``new | replaced | already | kept_as_copy | planned | skipped | failed``;
  a ``skipped`` row has a category ``not_dicom | truncated | symlink | special``;
* exit status 0 (all DICOM in place), 1 (any failure), 2 (usage), 75 (DST is
  locked by another sort), 130 (SIGINT), 143 (SIGTERM);
* sort state under ``DST/.sortscp/`` (temporary files in ``DST/.sortscp/tmp/``).

Nothing here imports ``scp``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import cli_env, run_cli, unprivileged_prefix

pytestmark = pytest.mark.timeout(300)

WORKERS = "2"
STATE_PREFIX = ".sortscp"  # DST/.sortscp/ (today DST/.sortscp-tmp)
OUTCOMES = {"new", "replaced", "already", "kept_as_copy", "planned", "skipped", "failed"}
SKIP_CATEGORIES = {"not_dicom", "truncated", "symlink", "special"}
UID_ROOT = "1.2.826.0.1.3680043.8.498.4242"


# --- real files -------------------------------------------------------------------

def _testdata(name: str) -> Path:
    return Path(get_testdata_file(name))


CT = _testdata("CT_small.dcm")
MR = _testdata("MR_small.dcm")
RT = _testdata("rtplan.dcm")


def sha(data: bytes | Path) -> str:
    if isinstance(data, Path):
        data = data.read_bytes()
    return hashlib.sha256(data).hexdigest()


def dicom_bytes(path: Path, uid: str | None = None, **changes) -> bytes:
    """The bytes of `path` saved by pydicom, with a new SOP Instance UID and
    other elements changed."""
    ds = pydicom.dcmread(path)
    if uid is not None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def clone(src: Path, dst: Path) -> None:
    """``cp -al``: the same files under new names (a cheap, independent tree)."""
    for folder, _, files in os.walk(src):
        out = dst / os.path.relpath(folder, src)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            os.link(os.path.join(folder, name), out / name)


# --- reading what sort did --------------------------------------------------------

def layout_files(dst: Path) -> list[Path]:
    """Files and links of the layout: everything not under a top-level ``.sortscp*``."""
    found = []
    if not dst.exists():
        return found
    for entry in sorted(dst.iterdir()):
        if entry.name.startswith(STATE_PREFIX):
            continue
        if entry.is_symlink() or entry.is_file():
            found.append(entry)
        elif entry.is_dir():
            found += [p for p in sorted(entry.rglob("*")) if p.is_symlink() or p.is_file()]
    return found


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def read_rows(report: Path) -> list[dict[str, str]]:
    """The rows of a ``--report`` file (CSV or JSON lines), each with a
    ``category`` (empty when the run did not write one)."""
    if report.suffix.lower() == ".csv":
        with open(report, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    for row in rows:
        row.setdefault("category", "")
        row["category"] = row["category"] or ""
    return rows


def by_source(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    found = {row["source"]: row for row in rows}
    assert len(found) == len(rows), f"a source has more than one row: {rows}"
    return found


def _clip(text: str, keep: int = 2000) -> str:
    if len(text) <= 2 * keep:
        return text
    return f"{text[:keep]}\n[... {len(text) - 2 * keep} characters ...]\n{text[-keep:]}"


def show(r: subprocess.CompletedProcess | tuple) -> str:
    """Exit status and output of a run, for an assertion message."""
    code, out, err = r if isinstance(r, tuple) else (r.returncode, r.stdout, r.stderr)
    return f"exit {code}\n--- stdout\n{_clip(out or '')}\n--- stderr\n{_clip(err or '')}"


def done_line(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in (r.stdout + "\n" + r.stderr).splitlines()
             if line.startswith(("done:", "planned:"))]
    assert lines, f"no summary line\n{show(r)}"
    return lines[-1]


def count_near(line: str, n: int, word: str) -> bool:
    """Does the summary `line` say `n` next to `word` (``6 link`` or ``link: 6``)?"""
    w = re.escape(word)
    return bool(re.search(rf"\b{n}\b[^,;:\d]*{w}|{w}[^,;\d]*\b{n}\b", line))


def check_ok(r: subprocess.CompletedProcess, code: int = 0) -> None:
    assert r.returncode == code, show(r)
    assert "Traceback" not in r.stderr, show(r)


# --- a tree of many small instances -----------------------------------------------

N_MANY = 2000


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> tuple[Path, dict[str, bytes], dict[str, str]]:
    """N_MANY distinct instances (MR_small with new UIDs) in nested folders.
    Returns (root, relative path -> bytes, relative path -> UID)."""
    root = tmp_path_factory.mktemp("many") / "src"
    ds = pydicom.dcmread(MR)
    contents, uids = {}, {}
    for i in range(N_MANY):
        uid = f"{UID_ROOT}.5.{i}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SeriesNumber = i % 7
        buf = io.BytesIO()
        ds.save_as(buf)
        rel = f"batch {i % 11}/{i % 3}/IM{i:05d}"
        write(root / rel, buf.getvalue())
        contents[rel], uids[rel] = buf.getvalue(), uid
    return root, contents, uids


def start_sort(*args: object, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "scp", "sort", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or cli_env(),
        start_new_session=True,  # its own process group: workers included
    )


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.communicate(timeout=30)
    except (subprocess.TimeoutExpired, ValueError, OSError):  # pipes already read
        proc.wait(30)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def count_dcm(dst: Path) -> int:
    return sum(1 for _ in dst.rglob("*.dcm")) if dst.exists() else 0


def wait_for_files(dst: Path, count: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if count_dcm(dst) >= count:
            return
        time.sleep(0.01)
    out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
    raise AssertionError(f"the sort did not get going: {show((proc.returncode, out, err))}")


# === 1. a second run in another mode over links from the first ========================

def _three_instances(src: Path) -> dict[Path, bytes]:
    files = {
        src / "a" / "ct.dcm": CT.read_bytes(),
        src / "a" / "mr.dcm": MR.read_bytes(),
        src / "b" / "plan": RT.read_bytes(),
        src / "b" / "mr again.dcm": dicom_bytes(MR, f"{UID_ROOT}.1.1"),
    }
    for path, data in files.items():
        write(path, data)
    return files


def _check_nothing_lost(sources: dict[Path, bytes], dst: Path, r) -> None:
    regular_in_dst = {sha(p) for p in layout_files(dst) if not p.is_symlink() and p.is_file()}
    for path, data in sources.items():
        at_source = path.exists() and not path.is_symlink() and path.read_bytes() == data
        assert at_source or sha(data) in regular_in_dst, (
            f"{path} is lost: not at its source, not a regular file in DST\n{show(r)}")
    dangling = [p for p in layout_files(dst) if p.is_symlink() and not p.exists()]
    assert dangling == [], f"dangling links in DST: {dangling}\n{show(r)}"


@pytest.mark.parametrize(("first", "second"), [
    ("symlink", "move"), ("symlink", "copy"), ("hardlink", "move")])
def test_second_mode_over_first_loses_nothing(tmp_path: Path, first: str, second: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    sources = _three_instances(src)
    r = run_cli("sort", src, dst, "--mode", first, "--workers", WORKERS)
    check_ok(r)
    report = tmp_path / "second.jsonl"
    r = run_cli("sort", src, dst, "--mode", second, "--workers", WORKERS, "--report", report)
    check_ok(r)
    _check_nothing_lost(sources, dst, r)
    stored = layout_files(dst)
    assert sorted(sha(p) for p in stored) == sorted(sha(d) for d in sources.values()), show(r)
    if second == "copy":
        # copy means copies: the links of the first run became regular files
        links = [p for p in stored if p.is_symlink()]
        assert links == [], f"copy left links in DST: {links}\n{show(r)}"
        rows = read_rows(report)
        assert not [row for row in rows if row["outcome"] == "already"], rows
        for path, data in sources.items():
            assert path.read_bytes() == data  # copy leaves the sources
    if second == "move":
        for p in stored:
            assert not p.is_symlink() and p.is_file(), f"{p} is not a regular file\n{show(r)}"


# === 2. a fragment is not an instance ==============================================

def _cuts() -> list[tuple[str, int]]:
    size = CT.stat().st_size
    pixel_start = size - 128 * 128 * 2  # CT_small: 128x128, 16 bits, the last element
    return [("300 bytes", 300), ("1000 bytes", 1000), ("header only", pixel_start - 20),
            ("in the pixel data", pixel_start + 5000), ("one byte short", size - 1)]


@pytest.mark.parametrize("mode", ["copy", "move"])
@pytest.mark.parametrize(("what", "cut"), _cuts(), ids=[c[0] for c in _cuts()])
def test_a_fragment_is_skipped_as_truncated(tmp_path: Path, mode: str, what: str, cut: int) -> None:
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.jsonl"
    fragment = CT.read_bytes()[:cut]
    path = write(src / "CT fragment.dcm", fragment)
    r = run_cli("sort", src, dst, "--mode", mode, "--workers", WORKERS, "--report", report)
    check_ok(r)
    assert layout_files(dst) == [], f"a fragment ({what}) was filed\n{show(r)}"
    assert path.read_bytes() == fragment, f"the fragment was touched\n{show(r)}"
    row = by_source(read_rows(report))[str(path)]
    assert (row["outcome"], row["category"]) == ("skipped", "truncated"), (row, show(r))
    assert not row["destination"], row


# === 3. every entry accounted for ==================================================

def make_socket_file(path: Path) -> None:
    """A UNIX socket file at `path` (bound at a short path, then renamed: the
    socket address limit is 108 bytes)."""
    short = tempfile.mkdtemp(prefix="s", dir="/tmp")
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.path.join(short, "s"))
        s.close()
        os.rename(os.path.join(short, "s"), path)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_every_entry_is_accounted_for(tmp_path: Path) -> None:
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.jsonl"
    write(src / "real.dcm", CT.read_bytes())
    write(src / "sub" / "b.dcm", MR.read_bytes())
    links = ["link to file", "link to folder", "dangling", "loop a", "loop b", "sub/up"]
    os.symlink("real.dcm", src / "link to file")
    os.symlink("sub", src / "link to folder")
    os.symlink("no such file", src / "dangling")
    os.symlink("loop b", src / "loop a")
    os.symlink("loop a", src / "loop b")
    os.symlink("..", src / "sub" / "up")
    os.mkfifo(src / "fifo")
    make_socket_file(src / "sock")
    special = ["fifo", "sock"]

    r = run_cli("sort", src, dst, "--workers", WORKERS, "--report", report, timeout=120)
    check_ok(r)
    rows = by_source(read_rows(report))
    for rel in links:
        row = rows.get(str(src / rel))
        assert row and (row["outcome"], row["category"]) == ("skipped", "symlink"), (
            rel, row, show(r))
    for rel in special:
        row = rows.get(str(src / rel))
        assert row and (row["outcome"], row["category"]) == ("skipped", "special"), (
            rel, row, show(r))
    for rel in ("real.dcm", "sub/b.dcm"):
        assert rows[str(src / rel)]["outcome"] == "new", rows[str(src / rel)]
    assert len(rows) == 2 + len(links) + len(special), rows
    line = done_line(r)
    assert count_near(line, 2, "new"), line
    assert count_near(line, len(links), "link"), line
    assert count_near(line, len(special), "special"), line
    assert sorted(sha(p) for p in layout_files(dst)) == sorted([sha(CT), sha(MR)])
    assert all(not p.is_symlink() for p in layout_files(dst))


def test_a_tree_of_only_links_is_not_an_empty_run(tmp_path: Path) -> None:
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.csv"
    outside = write(tmp_path / "outside" / "ct.dcm", CT.read_bytes())
    src.mkdir()
    for name in ("one", "two", "three"):
        os.symlink(outside, src / name)
    r = run_cli("sort", src, dst, "--workers", WORKERS, "--report", report)
    check_ok(r)
    line = done_line(r)
    assert any(int(n) for n in re.findall(r"\d+", line)), f"says nothing happened: {line}"
    assert count_near(line, 3, "link"), line
    rows = read_rows(report)
    assert sorted((row["source"], row["outcome"], row["category"]) for row in rows) == sorted(
        (str(src / n), "skipped", "symlink") for n in ("one", "two", "three")), rows


def test_follow_symlinks_sorts_each_target_once_and_survives_loops(tmp_path: Path) -> None:
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.jsonl"
    outside = tmp_path / "outside"
    targets = {
        write(outside / "a.dcm", CT.read_bytes()): CT.read_bytes(),
        write(outside / "folder" / "b.dcm", MR.read_bytes()): MR.read_bytes(),
        write(outside / "folder" / "c", RT.read_bytes()): RT.read_bytes(),
    }
    os.symlink("..", outside / "folder" / "up")  # a loop through the linked folder
    src.mkdir()
    os.symlink(outside / "a.dcm", src / "x")
    os.symlink(outside / "a.dcm", src / "y")  # the same target twice
    os.symlink(outside / "folder", src / "dir")
    os.symlink(".", src / "self")
    os.symlink("loop b", src / "loop a")
    os.symlink("loop a", src / "loop b")
    os.symlink("nowhere", src / "dangling")
    r = run_cli("sort", src, dst, "--follow-symlinks", "--workers", WORKERS, "--report", report,
                timeout=120)
    check_ok(r)
    stored = layout_files(dst)
    got = Counter(sha(p) for p in stored)
    assert set(got) == {sha(d) for d in targets.values()}, show(r)
    assert max(got.values()) == 1, f"a target stored twice: {stored}\n{show(r)}"
    assert len(stored) == 3 and not any(p.is_symlink() for p in stored), stored
    assert not [p for p in stored if "~" in p.name], stored
    for path, data in targets.items():
        assert path.read_bytes() == data
    rows = read_rows(report)
    assert not [row for row in rows if row["outcome"] == "failed"], rows
    assert {row["outcome"] for row in rows} <= OUTCOMES, rows


@pytest.mark.parametrize("linked", ["file", "folder"])
def test_follow_symlinks_move_removes_a_file_of_src_first_reached_through_a_link(
    tmp_path: Path, linked: str,
) -> None:
    """A link in SRC to a file of SRC, met before the file: the link's target
    was copied (a file reached through a link is never removed), and the file
    itself was then passed over as 'the same file as one sorted already', so a
    move left it in SRC."""
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.jsonl"
    real = write(src / "z" / "IM0001", CT.read_bytes())
    if linked == "file":
        os.symlink(real, src / "a link")
    else:
        os.symlink(real.parent, src / "a link")
    r = run_cli("sort", "--mode", "move", "--follow-symlinks", "--workers", WORKERS,
                "--report", report, src, dst)
    check_ok(r)
    [stored] = layout_files(dst)
    assert stored.read_bytes() == CT.read_bytes() and not stored.is_symlink()
    assert not real.exists(), show(r)
    rows = by_source(read_rows(report))
    assert rows[str(real)]["outcome"] == "already", rows
    via = src / "a link" if linked == "file" else src / "a link" / "IM0001"
    assert rows[str(via)]["outcome"] == "new", rows

def sort_as(prefix: list[str], src: Path, dst: Path, report: Path) -> subprocess.CompletedProcess:
    """``sortscp sort SRC DST --report REPORT`` run under `prefix` (see
    :func:`unprivileged_prefix`)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "scp", "sort", str(src), str(dst),
         "--workers", WORKERS, "--report", str(report)],
        check=False, capture_output=True, text=True, timeout=120, env=cli_env())


def test_a_move_from_a_folder_it_may_not_change_counts_each_entry_once(tmp_path: Path) -> None:
    """Three files of one SOPInstanceUID with other bytes, in a folder the user
    may not write: every copy is made, no source can be removed. The summary
    said "-1 new": the copy renamed to ~N after the walk was taken off "new",
    where a failed entry was never counted."""
    prefix = unprivileged_prefix()
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.csv"
    names = ("MR2_J2KI.dcm", "MR2_J2KR.dcm", "MR2_UNCI.dcm")
    for name in names:
        write(src / name, Path(get_testdata_file(name)).read_bytes())
    before = {name: sha(src / name) for name in names}
    os.chmod(src, 0o555)
    try:
        r = subprocess.run(
            [*prefix, sys.executable, "-m", "scp", "sort", "--mode", "move", str(src), str(dst),
             "--workers", WORKERS, "--report", str(report)],
            check=False, capture_output=True, text=True, timeout=120, env=cli_env())
    finally:
        os.chmod(src, 0o755)
    check_ok(r, 1)
    assert {name: sha(src / name) for name in names} == before  # every source stays
    rows = read_rows(report)
    assert [row["outcome"] for row in rows] == ["failed"] * 3, (rows, show(r))
    assert "done: 0 new, 0 replaced, 0 already in place, 0 kept as ~N" in r.stdout + r.stderr, show(r)
    assert "3 failed" in r.stdout + r.stderr, show(r)
    # every copy is made, byte for byte (only the sources could not be removed)
    assert sorted(sha(p) for p in layout_files(dst)) == sorted(before.values()), show(r)


def test_an_unreadable_folder_is_a_failure(tmp_path: Path) -> None:
    prefix = unprivileged_prefix()
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.jsonl"
    write(src / "ok" / "ct.dcm", CT.read_bytes())
    write(src / "locked" / "mr.dcm", MR.read_bytes())
    os.chmod(src / "locked", 0)
    try:
        r = sort_as(prefix, src, dst, report)
    finally:
        os.chmod(src / "locked", 0o755)
    check_ok(r, 1)
    assert [sha(p) for p in layout_files(dst)] == [sha(CT)], show(r)
    rows = read_rows(report)
    failed = [row for row in rows if row["outcome"] == "failed"]
    assert [row["source"] for row in failed] == [str(src / "locked")], (rows, show(r))
    assert failed[0]["reason"], failed
    assert str(src / "locked") in r.stderr, show(r)


@pytest.mark.parametrize("held", [False, True], ids=["free-name", "name-held-by-other-bytes"])
def test_a_copy_refused_by_its_folder_names_the_source_not_a_temporary_file(
    tmp_path: Path, held: bool,
) -> None:
    """A copy is written to a temporary file in DST, then linked to its name.
    When that link is refused, the reason must name what the user has: the
    source and the name it was going to; the temporary file is gone by then."""
    prefix = unprivileged_prefix()
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.jsonl"
    source = write(src / "IM0001", CT.read_bytes())
    check_ok(run_cli("sort", src, dst, "--workers", WORKERS))
    [final] = layout_files(dst)
    if held:  # the slow path: another file of this UID holds the name, the copy goes to '~2'
        final.write_bytes(CT.read_bytes() + b"\0\0")
    else:  # the batch path
        final.unlink()
    before = {p: p.read_bytes() for p in layout_files(dst)}
    os.chmod(final.parent, 0o555)
    try:
        r = sort_as(prefix, src, dst, report)
    finally:
        os.chmod(final.parent, 0o755)
    check_ok(r, 1)
    [row] = read_rows(report)
    assert row["outcome"] == "failed", row
    target = final.with_name(f"{final.stem}~2{final.suffix}") if held else final
    assert row["reason"] == f"Permission denied: {source} -> {target}", row
    assert ".sortscp" not in r.stderr, show(r)
    assert {p: p.read_bytes() for p in layout_files(dst)} == before
    assert source.read_bytes() == CT.read_bytes()
    assert not [p for p in dst.rglob("*.part")], list(dst.rglob("*"))


def test_a_path_too_long_is_a_failure(tmp_path: Path) -> None:
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.jsonl"
    write(src / "ct.dcm", CT.read_bytes())
    name = "d" * 200
    depth = 4200 // (len(name) + 1) + 1
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open("mr.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, MR.read_bytes())
        os.close(out)
    finally:
        os.close(fd)
    assert len(str(src)) + depth * (len(name) + 1) > 4096
    try:
        r = run_cli("sort", src, dst, "--workers", WORKERS, "--report", report, timeout=120)
        check_ok(r, 1)
        assert [sha(p) for p in layout_files(dst)] == [sha(CT)], show(r)
        failed = [row for row in read_rows(report) if row["outcome"] == "failed"]
        assert failed and all(row["source"].startswith(str(src / name)) for row in failed), (
            failed, show(r))
        assert all(row["reason"] for row in failed), failed
    finally:
        shutil.rmtree(src)  # fd-based: copes with the long path


# === 4. any file name ================================================================

@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_names_are_moved_and_reported(tmp_path: Path, suffix: str) -> None:
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / f"r{suffix}"
    src.mkdir()
    bsrc = os.fsencode(src)
    contents = {}
    for i in range(128):
        name = bytes([0x80 + i]) + b"\xfe.dcm"  # never valid UTF-8
        data = dicom_bytes(RT, f"{UID_ROOT}.4.{i}")
        fd = os.open(os.path.join(bsrc, name), os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        os.close(fd)
        contents[name] = data
    r = run_cli("sort", src, dst, "--mode", "move", "--workers", WORKERS, "--report", report)
    check_ok(r)
    assert os.listdir(bsrc) == [], f"not moved: {os.listdir(bsrc)[:5]}\n{show(r)}"
    assert sorted(sha(p) for p in layout_files(dst)) == sorted(map(sha, contents.values()))
    rows = read_rows(report)  # the report is valid UTF-8 text
    assert len(rows) == 128 and len({row["source"] for row in rows}) == 128, show(r)
    assert {row["outcome"] for row in rows} == {"new"}, rows[:3]


# === 5. two runs at once =============================================================

def test_two_runs_at_once_lose_nothing(many, tmp_path: Path) -> None:
    root, contents, uids = many
    src, dst = tmp_path / "src", tmp_path / "dst"
    clone(root, src)
    reports = [tmp_path / "r1.jsonl", tmp_path / "r2.jsonl"]
    procs = [start_sort(src, dst, "--mode", "move", "--workers", "1", "--report", rep)
             for rep in reports]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_group(proc)
    both = "\n\n".join(map(show, results))
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 75]), both
    for code, out, err in results:
        assert "Traceback" not in err, both
        if code == 75:
            assert len(err.strip().splitlines()) == 1, both
            # (refused at DST's lock, or, first, at the first one's hold on SRC: one move at a time)
            assert "another sortscp sort (or a server starting on it) is writing into" in err or \
                f"{src} is the SRC of a running sortscp sort --mode move (pid " in err, both
    stored = layout_files(dst)
    names = Counter(p.name for p in stored)
    assert sorted(names) == sorted(f"{u}.dcm" for u in uids.values()), (
        f"missing: {sorted({f'{u}.dcm' for u in uids.values()} - set(names))[:5]}, "
        f"extra: {sorted(set(names) - {f'{u}.dcm' for u in uids.values()})[:5]}\n{both}")
    assert max(names.values()) == 1, both
    by_uid = {uids[rel]: data for rel, data in contents.items()}
    bad = [p for p in stored if p.read_bytes() != by_uid[p.name.removesuffix(".dcm")]]
    assert bad == [], bad[:5]
    assert all_files(src) == [], f"left in SRC: {all_files(src)[:5]}\n{both}"
    for rep, (code, _, _) in zip(reports, results):
        if code == 0:
            failed = [row for row in read_rows(rep) if row["outcome"] == "failed"]
            assert failed == [], f"{len(failed)} failed rows, e.g. {failed[:3]}"


# === 6. same tree, same names ========================================================

def test_same_tree_gives_same_names(tmp_path: Path) -> None:
    src = tmp_path / "src"
    uid = uid_of(CT)
    variants = {}
    filler = 0
    for k in range(6):
        data = dicom_bytes(CT, InstanceNumber=100 + k)  # same UID, same folders, other bytes
        variants[sha(data)] = write(src / f"group {k}" / f"variant {k}.dcm", data)
        for _ in range(40):  # spread the claimants over batches and workers
            write(src / f"group {k}" / f"filler {filler:03d}", dicom_bytes(RT, f"{UID_ROOT}.6.{filler}"))
            filler += 1
    assert len(variants) == 6
    mappings = []
    for run in range(4):
        dst = tmp_path / f"dst{run}"
        r = run_cli("sort", src, dst, "--workers", WORKERS)
        check_ok(r)
        mapping = {sha(p): p.name for p in layout_files(dst) if p.name.startswith(uid)}
        assert sorted(mapping.values()) == sorted(
            [f"{uid}.dcm"] + [f"{uid}~{n}.dcm" for n in range(2, 7)]), (mapping, show(r))
        assert set(mapping) == set(variants)
        mappings.append(mapping)
    assert all(m == mappings[0] for m in mappings), (
        "the same tree got different names:\n" + "\n".join(
            " ".join(f"{variants[d].parent.name}->{m[d].removeprefix(uid)}" for d in sorted(m))
            for m in mappings))


# === 7. --dry-run tells the truth ====================================================

def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_mtime_ns, p.lstat().st_size)
            for p in [root, *sorted(root.rglob("*"))]}


def test_dry_run_after_a_copy_tells_the_truth(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "ct.dcm", CT.read_bytes())
    write(src / "mr.dcm", MR.read_bytes())
    write(src / "plan", RT.read_bytes())
    check_ok(run_cli("sort", src, dst, "--workers", WORKERS))
    before = snapshot(dst)

    report = tmp_path / "dry1.jsonl"
    r = run_cli("sort", src, dst, "--dry-run", "--workers", WORKERS, "--report", report)
    check_ok(r)
    rows = read_rows(report)
    assert sorted((row["source"], row["outcome"]) for row in rows) == sorted(
        (str(src / n), "already") for n in ("ct.dcm", "mr.dcm", "plan")), (rows, show(r))
    assert " -> " not in r.stdout, f"plans work that is done\n{show(r)}"
    assert snapshot(dst) == before

    # a different file claiming CT's UID: the real run would keep it as ~2
    write(src / "ct edited.dcm", dicom_bytes(CT, InstanceNumber=99))
    report = tmp_path / "dry2.jsonl"
    r = run_cli("sort", src, dst, "--dry-run", "--workers", WORKERS, "--report", report)
    check_ok(r)
    rows = by_source(read_rows(report))
    edited = rows[str(src / "ct edited.dcm")]
    assert edited["outcome"] == "kept_as_copy", (edited, show(r))
    assert edited["destination"].endswith(f"{uid_of(CT)}~2.dcm"), edited
    assert Path(edited["destination"]).parent == Path(rows[str(src / "ct.dcm")]["destination"]).parent
    assert [row["outcome"] for s, row in rows.items() if s != str(src / "ct edited.dcm")] == [
        "already"] * 3, rows
    assert snapshot(dst) == before


def test_sources_replaced_while_a_move_runs_are_never_lost(many, tmp_path: Path) -> None:
    """Another process writes corrected versions over the sources (a new file
    renamed over each name, as a receiver does) while a move runs. Every
    version must end up in SRC or DST: a move removed a source by its path
    after linking it, so a version put there meanwhile went with it (1-45 of
    3,000 lost in a run)."""
    root, contents, uids = many
    src, dst, stage = tmp_path / "src", tmp_path / "dst", tmp_path / "stage"
    clone(root, src)
    corrected = {}
    for rel in contents:
        ds = pydicom.dcmread(io.BytesIO(contents[rel]))
        ds.ImageComments = "corrected"
        buf = io.BytesIO()
        ds.save_as(buf)
        data = buf.getvalue()
        corrected[rel] = data
        write(stage / rel.replace("/", "_"), data)
    proc = start_sort(src, dst, "--mode", "move", "--workers", WORKERS)
    replaced: list[str] = []
    rng = random.Random(11)
    order = list(contents)
    rng.shuffle(order)
    try:
        for rel in order:
            if proc.poll() is not None:
                break
            if (src / rel).exists():
                os.replace(stage / rel.replace("/", "_"), src / rel)
                replaced.append(rel)
            time.sleep(0.001)  # spread over the run
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode in (0, 1), show((proc.returncode, out, err))
    assert "Traceback" not in err, err
    assert len(replaced) > 10, "the sort finished before the writer could race it"
    present = Counter(sha(p) for p in all_files(src) + layout_files(dst))
    lost = [rel for rel in replaced if present[sha(corrected[rel])] == 0]
    assert lost == [], f"{len(lost)} of {len(replaced)} replaced versions lost: {lost[:5]}"


# === 8. stopping =====================================================================

@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_stops_cleanly_and_a_rerun_finishes(
        many, tmp_path: Path, signum: signal.Signals, code: int) -> None:
    """SIGHUP (a closed terminal or SSH session) stops as SIGTERM does; it
    killed the sort on the spot, its workers too, leaving temporary files."""
    root, contents, uids = many
    src, dst = tmp_path / "src", tmp_path / "dst"
    clone(root, src)
    proc = start_sort(src, dst, "--workers", "1", "--fsync", "always")
    try:
        wait_for_files(dst, 20, proc)
        assert proc.poll() is None, "finished before it could be stopped"
        os.killpg(proc.pid, signum)  # the whole group, as a terminal or `kill -- -PGID` does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    result = (proc.returncode, out, err)
    assert proc.returncode == code, show(result)
    assert "interrupted" in err and "run the same command again" in err, show(result)
    assert "leaked semaphore" not in err and "Traceback" not in err, show(result)
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = group_alive(proc.pid)
    parts = [p for p in dst.rglob("*") if p.name.endswith(".part")]
    if survivors:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not survivors, "workers still running 10 s after the sort exited"
    assert parts == [], f"temporary files left after exit: {parts[:5]}"
    assert 0 < len(layout_files(dst)) < N_MANY

    r = run_cli("sort", src, dst, "--workers", WORKERS)
    check_ok(r)
    by_uid = {uids[rel]: data for rel, data in contents.items()}
    stored = layout_files(dst)
    assert sorted(p.name for p in stored) == sorted(f"{u}.dcm" for u in by_uid), show(r)
    assert all(p.read_bytes() == by_uid[p.name.removesuffix(".dcm")] for p in stored)


def test_sigkill_at_random_moments_loses_nothing(many, tmp_path: Path) -> None:
    root, contents, uids = many
    src, dst = tmp_path / "src", tmp_path / "dst"
    clone(root, src)
    digests = {rel: sha(data) for rel, data in contents.items()}
    rng = random.Random(20240601)
    killed_mid_run = 0
    for attempt in range(5):
        before = count_dcm(dst)
        proc = start_sort(src, dst, "--mode", "move", "--workers", "1")
        delay = rng.uniform(0, 0.1)  # after it has begun to move files (the lean path moves fast)
        try:
            wait_for_files(dst, before + 5, proc, timeout=60)
            time.sleep(delay)
            if proc.poll() is None:
                killed_mid_run += 1
        except AssertionError:  # it finished (or failed) first
            pass
        kill_group(proc)
        in_dst = {p.name.removesuffix(".dcm"): p for p in layout_files(dst)}
        for rel, digest in digests.items():
            at_source = (src / rel).exists() and sha(src / rel) == digest
            placed = in_dst.get(uids[rel])
            at_dst = placed is not None and sha(placed) == digest
            assert at_source or at_dst, (
                f"attempt {attempt} (killed after {delay:.2f} s): {rel} lost "
                f"(source {'present' if (src / rel).exists() else 'gone'}, destination "
                f"{'incomplete' if placed else 'absent'})")
        for path in in_dst.values():
            assert sha(path) in digests.values(), f"{path} is not a complete copy"

    assert killed_mid_run >= 3, f"only {killed_mid_run} of 5 runs were killed while working"

    r = run_cli("sort", src, dst, "--mode", "move", "--workers", WORKERS)
    check_ok(r)
    stored = layout_files(dst)
    assert sorted(p.name for p in stored) == sorted(f"{u}.dcm" for u in uids.values()), show(r)
    assert sorted(sha(p) for p in stored) == sorted(digests.values())
    assert all_files(src) == [], all_files(src)[:5]


# === 9. templates ====================================================================

@pytest.mark.parametrize(("template", "folder"), [
    ("{PatientName:.3}/{SOPInstanceUID}.dcm", "Com"),
    ("{PatientName:_<30}/{SOPInstanceUID}.dcm", "CompressedSamples^CT1_________"),
    ("{PatientID}/{SOPInstanceUID}.dcm", "1CT1"),
    ("{00100020}/{SOPInstanceUID}.dcm", "1CT1"),
    ("{0010,0020}/{SOPInstanceUID}.dcm", "1CT1"),
])
def test_template_specs_and_tag_numbers(tmp_path: Path, template: str, folder: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "ct", CT.read_bytes())
    r = run_cli("sort", src, dst, "--template", template, "--workers", WORKERS)
    check_ok(r)
    assert [p.relative_to(dst) for p in layout_files(dst)] == [
        Path(folder) / f"{uid_of(CT)}.dcm"], show(r)
    assert (dst / folder / f"{uid_of(CT)}.dcm").read_bytes() == CT.read_bytes()


def test_an_invalid_spec_is_a_one_line_usage_error(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "ct", CT.read_bytes())
    r = run_cli("sort", src, dst, "--template", "{PatientName:Q}/{SOPInstanceUID}.dcm")
    assert r.returncode == 2, show(r)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "Q" in lines[0], show(r)
    assert not dst.exists()


def test_help_shows_the_default_template_unbroken() -> None:
    r = run_cli("sort", "--help", env=cli_env() | {"COLUMNS": "80"})
    check_ok(r)
    assert "{SOPInstanceUID}" in r.stdout, r.stdout
    assert "{PatientName}_{PatientID}/{SeriesDescription}_{SeriesNumber}/{SOPInstanceUID}.dcm" in (
        r.stdout), r.stdout


# === 10. counts =====================================================================

def test_a_report_with_an_unknown_extension_is_refused(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "ct", CT.read_bytes())
    r = run_cli("sort", src, dst, "--report", tmp_path / "out.txt")
    assert r.returncode == 2, show(r)
    assert ".txt" in r.stdout + r.stderr, show(r)
    assert not dst.exists() and not (tmp_path / "out.txt").exists(), show(r)
    assert os.listdir(src) == ["ct"]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".ndjson", ".CSV"])
def test_report_extensions_that_are_accepted(tmp_path: Path, suffix: str) -> None:
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / f"r{suffix}"
    write(src / "ct", CT.read_bytes())
    r = run_cli("sort", src, dst, "--report", report)
    check_ok(r)
    rows = read_rows(report)
    assert [(row["source"], row["outcome"]) for row in rows] == [(str(src / "ct"), "new")], rows


def _tree_of_every_kind(src: Path) -> None:
    write(src / "new-ct.dcm", CT.read_bytes())
    write(src / "same-ct-again.dcm", CT.read_bytes())  # already in place
    write(src / "edited-ct.dcm", dicom_bytes(CT, InstanceNumber=77))  # kept as ~2
    write(src / "new-mr.dcm", MR.read_bytes())
    write(src / "notes-file.txt", b"not a DICOM file\n")
    write(src / "cut-mr.dcm", MR.read_bytes()[:1000])
    target = write(src.parent / "outside" / "link-target", CT.read_bytes())
    os.symlink(target, src / "link-file")  # to a name not in SRC: one line mentions it
    os.mkfifo(src / "fifo-file")


def test_debug_log_has_one_line_per_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree_of_every_kind(src)
    names = sorted(os.listdir(src))
    r = run_cli("sort", src, dst, "--log-level", "DEBUG", "--workers", WORKERS, timeout=120)
    check_ok(r)
    lines = (r.stdout + r.stderr).splitlines()
    counts = {name: sum(1 for line in lines if name in line) for name in names}
    assert counts == dict.fromkeys(names, 1), (counts, show(r))


def test_summary_separates_every_kind(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree_of_every_kind(src)
    r = run_cli("sort", src, dst, "--workers", WORKERS, timeout=120)
    check_ok(r)
    line = done_line(r)
    for word in ("new", "already in place", "kept", "skipped", "failed",
                 "not DICOM", "truncated", "link", "special"):
        assert word in line, f"{word!r} not in the summary: {line}"
    assert count_near(line, 2, "new"), line
    assert count_near(line, 1, "already in place"), line
    assert count_near(line, 1, "not DICOM") and count_near(line, 1, "truncated"), line
    assert count_near(line, 1, "link") and count_near(line, 1, "special"), line
    assert count_near(line, 0, "failed"), line


# === names held by what is not a file, fragments without a UID, the lock, the terminal ====

def _layout_path_of(source: Path, tmp_path: Path) -> str:
    """Where sort files `source` (relative to DST), learnt from a scratch run."""
    scratch_src, scratch_dst = tmp_path / "scratch-src", tmp_path / "scratch-dst"
    write(scratch_src / source.name, source.read_bytes())
    r = run_cli("sort", scratch_src, scratch_dst, "--mode", "copy")
    check_ok(r)
    (placed,) = layout_files(scratch_dst)
    return str(placed.relative_to(scratch_dst))


@pytest.mark.parametrize("holder", ["folder", "fifo"])
def test_a_destination_name_held_by_a_folder_or_a_fifo_is_passed_over(tmp_path: Path, holder: str) -> None:
    """The run neither stops (it did: exit 2, rows lost) nor blocks on the
    FIFO (it did: for ever): the instance takes the next name, every source
    gets its row, and what held the name is left alone."""
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.csv"
    rel = _layout_path_of(CT, tmp_path)
    ct, mr = write(src / "ct.dcm", CT.read_bytes()), write(src / "mr.dcm", MR.read_bytes())
    held = dst / rel
    held.parent.mkdir(parents=True)
    if holder == "folder":
        held.mkdir()
    else:
        os.mkfifo(held)
    r = run_cli("sort", src, dst, "--mode", "copy", "--workers", WORKERS, "--report", report, timeout=60)
    check_ok(r)
    rows = by_source(read_rows(report))
    assert set(rows) == {str(ct), str(mr)}, show(r)
    row = rows[str(ct)]
    assert row["outcome"] == "kept_as_copy" and row["destination"].endswith("~2.dcm"), (row, show(r))
    assert Path(row["destination"]).read_bytes() == CT.read_bytes()
    assert held.is_dir() if holder == "folder" else held.is_fifo()


def _cut_before_its_uids() -> bytes:
    """CT_small cut at the element boundary before its SOP Class UID: its File
    Meta names the instance, its dataset does not."""
    data = CT.read_bytes()
    start = data.find(b"\x08\x00\x16\x00UI")  # (0008,0016) UI, explicit VR little endian
    assert start > 132, "CT_small is not what this test expects"
    return data[:start]


@pytest.mark.parametrize("what", ["preamble and DICM only", "cut before its UIDs"])
def test_a_file_without_its_own_sop_instance_uid_is_not_filed(tmp_path: Path, what: str) -> None:
    """It was filed, as UNKNOWN.dcm or under the File Meta's UID (taking the
    complete instance's name)."""
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.jsonl"
    data = b"\0" * 128 + b"DICM" if what.startswith("preamble") else _cut_before_its_uids()
    path = write(src / "fragment.dcm", data)
    r = run_cli("sort", src, dst, "--mode", "move", "--report", report)
    check_ok(r)
    assert layout_files(dst) == [], show(r)
    assert path.read_bytes() == data
    row = by_source(read_rows(report))[str(path)]
    assert (row["outcome"], row["category"]) == ("skipped", "not_dicom"), (row, show(r))


def test_a_run_refused_at_the_lock_leaves_the_running_runs_report_alone(tmp_path: Path) -> None:
    """Another sort holds DST (its lock taken here as a sort takes it): a second
    run with the same --report exits 75 and neither empties nor removes it (it
    did both), and one with a new --report creates nothing."""
    import fcntl

    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "ct.dcm", CT.read_bytes())
    (dst / STATE_PREFIX).mkdir(parents=True)
    lock = os.open(dst / STATE_PREFIX / "sort.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        running = write(tmp_path / "running.csv", b"source,destination,outcome\n/a,/b,new\n")
        r = run_cli("sort", src, dst, "--report", running)
        check_ok(r, 75)
        assert running.read_bytes() == b"source,destination,outcome\n/a,/b,new\n", show(r)
        fresh = tmp_path / "fresh.csv"
        check_ok(run_cli("sort", src, dst, "--report", fresh), 75)
        assert not fresh.exists()
        planned = run_cli("sort", src, dst, "--dry-run")  # says what the real run would: refused
        check_ok(planned, 75)
        assert "->" not in planned.stdout, show(planned)
    finally:
        os.close(lock)
    check_ok(run_cli("sort", src, dst, "--dry-run"))  # the lock let go: planned (and only looked)
    assert layout_files(dst) == []


def test_a_lock_held_by_the_workers_of_a_sort_that_died_says_so(tmp_path: Path) -> None:
    """Found by an independent attack: a sort killed while its workers were
    stopped (SIGSTOP) left them holding its lock (they inherited it); the next
    run named the dead sort's pid as the one running. It says now that the
    pid has exited and how to find what holds the lock."""
    import fcntl

    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "ct.dcm", CT.read_bytes())
    (dst / STATE_PREFIX).mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = os.open(dst / STATE_PREFIX / "sort.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, as a worker still holds it
        os.pwrite(lock, str(gone.pid).encode(), 0)  # written by the sort that took it
        r = run_cli("sort", src, dst)
        check_ok(r, 75)
        assert f"pid {gone.pid} took it and has exited" in r.stderr, show(r)
        assert "fuser -v" in r.stderr and "sort.lock" in r.stderr, show(r)
    finally:
        os.close(lock)
    check_ok(run_cli("sort", src, dst))


def test_control_characters_in_a_name_never_reach_the_terminal(tmp_path: Path) -> None:
    """A file name with a newline and an escape sequence, in the lines a dry run
    prints: escaped, so it can neither forge a line nor clear the screen."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "evil\nfailed: /etc/passwd: forged\x1b[2J.dcm", CT.read_bytes())
    r = run_cli("sort", src, dst, "--dry-run")
    check_ok(r)
    assert "\x1b" not in r.stdout + r.stderr, show(r)
    assert not any(line.startswith("failed: /etc/passwd") for line in (r.stdout + r.stderr).splitlines()), show(r)
    assert "evil\\nfailed: /etc/passwd: forged\\x1b[2J.dcm ->" in r.stdout, show(r)


def test_a_second_instance_under_the_longest_name_gets_a_name_that_fits(tmp_path: Path) -> None:
    """A file name cut to 255 bytes is taken by another instance with the same
    UID: the one kept beside it (``~2``) is cut again to fit. It was not: every
    run (and rerun) failed with "File name too long", exit 1."""
    src, dst, report = tmp_path / "src", tmp_path / "dst", tmp_path / "r.csv"
    uid = f"{UID_ROOT}.255"
    first = write(src / "a.dcm", dicom_bytes(CT, uid))
    second = write(src / "b.dcm", dicom_bytes(CT, uid, StudyDescription="other bytes"))
    r = run_cli("sort", src, dst, "--mode", "copy", "--workers", WORKERS, "--report", report,
                "--template", "{PatientID}/{SOPInstanceUID}_{PatientName:_<300}.dcm")
    check_ok(r)
    placed = layout_files(dst)
    assert len(placed) == 2, show(r)
    assert all(len(p.name.encode()) <= 255 and p.name.endswith(".dcm") for p in placed), placed
    assert sorted(sha(p) for p in placed) == sorted([sha(first), sha(second)]), show(r)
    outcomes = sorted(row["outcome"] for row in read_rows(report))
    assert outcomes == ["kept_as_copy", "new"], show(r)


def test_a_report_to_a_fifo_is_not_rewritten_and_the_run_ends(tmp_path: Path) -> None:
    """A name that got its '~2' after the walk made the report be rewritten:
    it reopened the FIFO to read it back and waited for ever (and would then
    have replaced the FIFO by a regular file)."""
    src, dst, fifo = tmp_path / "src", tmp_path / "dst", tmp_path / "report.csv"
    uid = f"{UID_ROOT}.66"
    write(src / "a.dcm", dicom_bytes(CT, uid))
    write(src / "b.dcm", dicom_bytes(CT, uid, StudyDescription="other bytes"))
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(open(fifo, encoding="utf-8")), daemon=True)
    reader.start()
    r = run_cli("sort", src, dst, "--mode", "copy", "--workers", WORKERS, "--report", fifo, timeout=60)
    reader.join(10)
    check_ok(r)
    assert fifo.is_fifo()
    rows = list(csv.DictReader(io.StringIO("".join(got))))
    assert sorted(row["source"] for row in rows) == [str(src / "a.dcm"), str(src / "b.dcm")], got
    assert sorted(p.name for p in layout_files(dst)) == [f"{uid}.dcm", f"{uid}~2.dcm"]
    # A row streamed before its file got '~2' names the plain name, which now
    # holds the other file: the README promises a warning line for each.
    stale = [row for row in rows if Path(row["destination"]).read_bytes() != Path(row["source"]).read_bytes()]
    assert bool(stale) == ("is not a regular file" in r.stderr), (stale, show(r))


def test_a_report_that_fills_its_disk_stops_the_run_with_exit_1_and_loses_nothing(tmp_path: Path) -> None:
    """It stopped with 'error: [Errno 28] No space left on device' (which
    file?) and exit 2, the status of a usage error."""
    src, dst, small = tmp_path / "src", tmp_path / "dst", tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        sources = {}
        for i in range(300):
            sources[f"f{i:03}.dcm"] = dicom_bytes(MR, f"{UID_ROOT}.67.{i}")
            write(src / f"f{i:03}.dcm", sources[f"f{i:03}.dcm"])
        r = run_cli("sort", src, dst, "--mode", "move", "--workers", WORKERS, "--report", small / "r.csv",
                    timeout=120)
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
    assert r.returncode == 1, show(r)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write the report" in errors[0] and "r.csv" in errors[0], show(r)
    assert "Traceback" not in r.stderr
    present = Counter(sha(p) for p in all_files(src) + layout_files(dst))
    assert all(present[sha(data)] == 1 for data in sources.values()), show(r)


def test_src_inside_dst_does_not_sort_its_own_output_again(many, tmp_path: Path) -> None:
    """DST/P1 sorted into DST with a template that files into DST/P1/zz_MR, a
    folder the walk enters late: the run's own new files were walked as
    entries of SRC and counted 'already in place' (3,576 rows for 2,000)."""
    root, contents, uids = many
    dst = tmp_path / "out"
    src = dst / pydicom.dcmread(MR).PatientID  # the layout's first folder
    clone(root, src)
    (src / "zz_MR").mkdir()
    report = tmp_path / "r.csv"
    r = run_cli("sort", src, dst, "--workers", WORKERS, "--report", report,
                "-t", "{PatientID}/zz_{Modality}/{SOPInstanceUID}.dcm")
    check_ok(r)
    rows = read_rows(report)
    assert len(rows) == len(contents), f"{len(rows)} rows for {len(contents)} entries\n{show(r)}"
    assert Counter(row["outcome"] for row in rows) == {"new": len(contents)}, show(r)
    assert count_near(done_line(r), len(contents), "new"), show(r)


def test_a_plain_name_freed_during_the_walk_is_taken_not_passed_for_a_copy(tmp_path: Path) -> None:
    """In place: the walk meets an instance whose plain name is held by a
    misnamed file of the old layout (another UID), then moves that file away.
    The instance got '~2' anyway, with the reason "another file with this
    SOPInstanceUID and other bytes holds the name" (none did), and a rerun
    moved it again."""
    tree = tmp_path / "tree"
    uid, other = f"{UID_ROOT}.68.1", f"{UID_ROOT}.68.2"
    template = "{PatientID}/{SOPInstanceUID}.dcm"
    pid = pydicom.dcmread(MR).PatientID
    misnamed = write(tree / pid / f"{uid}.dcm", dicom_bytes(MR, other))
    instance = write(tree / "0_old" / "x.dcm", dicom_bytes(MR, uid))  # walked before PatientID 4MR1
    data = {uid: instance.read_bytes(), other: misnamed.read_bytes()}
    plan, done = tmp_path / "plan.jsonl", tmp_path / "done.jsonl"
    dry = run_cli("sort", "-t", template, "--mode", "move", "--workers", WORKERS, "--dry-run",
                  "--report", plan, tree, tree)
    check_ok(dry)
    r = run_cli("sort", "-t", template, "--mode", "move", "--workers", WORKERS, "--report", done,
                tree, tree)
    check_ok(r)
    # the dry run plans what the run then does (it planned '~2': the name is held while nothing moves)
    assert {(row["source"], row["destination"]) for row in read_rows(plan)} == {
        (row["source"], row["destination"]) for row in read_rows(done)}, (show(dry), show(r))
    assert sorted(p.name for p in layout_files(tree)) == sorted([f"{uid}.dcm", f"{other}.dcm"]), show(r)
    assert all((tree / pid / f"{u}.dcm").read_bytes() == d for u, d in data.items())
    before = {p: p.stat().st_mtime_ns for p in layout_files(tree)}
    again = run_cli("sort", "-t", template, "--mode", "move", "--workers", WORKERS, tree, tree)
    check_ok(again)
    assert {p: p.stat().st_mtime_ns for p in layout_files(tree)} == before, show(again)
    assert count_near(done_line(again), 2, "already in place"), show(again)


@pytest.mark.parametrize("mode", ["move", "hardlink"])
def test_in_place_a_second_hard_link_of_a_sorted_file_gets_its_row(
    many, tmp_path: Path, mode: str,
) -> None:
    """In place, the walk passes over files changed during the run (its own
    output). Linking or moving a file changes its inode, so a second hard link
    of it met later was passed over as well: no report row, left where it was,
    exit 0."""
    root, contents, _ = many
    tree, report = tmp_path / "tree", tmp_path / "r.jsonl"
    clone(root, tree / "a")  # walked first; its first batches are done before 'zz' is listed
    firsts = sorted(contents)[:5]
    links = []
    for i, rel in enumerate(firsts):
        links.append(tree / "zz" / f"copy{i}")
        links[-1].parent.mkdir(exist_ok=True)
        os.link(tree / "a" / rel, links[-1])
    r = run_cli("sort", "--mode", mode, "--workers", WORKERS, "--report", report, tree, tree)
    check_ok(r)
    rows = by_source(read_rows(report))
    assert len(rows) == len(contents) + len(links), show(r)
    # hardlink: the name holds this very file; move: the name was another link
    # of the source and is now the file itself (its only name).
    seen = "already" if mode == "hardlink" else "replaced"
    for link, rel in zip(links, firsts):
        row = rows[str(link)]
        assert row["outcome"] == seen, row
        assert (tree / row["destination"]).read_bytes() == contents[rel]
        assert link.exists() == (mode == "hardlink"), row
    placed = [p for p in layout_files(tree) if p.relative_to(tree).parts[0] not in ("a", "zz")]
    assert Counter(sha(p) for p in placed) == Counter(sha(d) for d in contents.values()), show(r)
    assert Counter(row["outcome"] for row in rows.values()) == {
        "new": len(contents), seen: len(links)}, show(r)

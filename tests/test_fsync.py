"""``--fsync {always,never}`` reaches the code that flushes, for ``sort`` and ``serve``.

A flush leaves no trace on disk, so the tests count them: every flush sortscp
makes goes through :mod:`scp.store.fsops`, which counts them per process, and
``sort`` reports its workers' count (``--log-level INFO``). ``never`` must
make none and still place every file, byte for byte; ``always`` must flush.
The README's option tables and ``--help`` must say the same.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from scp.config import ServeConfig, SortConfig
from scp.dicom.meta import PREAMBLE
from scp.enums import Duplicate, Fsync, Mode, Result
from scp.jobs import store_received
from scp.sort import sort_tree
from scp.sort_jobs import sort_files
from scp.store.fsops import flush_count
from scp.store.tmp import new_tmp

from conftest import REPO, TEST_FILES, cli_env, run_cli

FILES = [TEST_FILES / name for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")]
FLUSHES = re.compile(r"--fsync (always|never): (\d+) flushes to disk")


def source_tree(root: Path) -> dict[str, bytes]:
    """A small tree of real instances, in two folders; name -> bytes."""
    contents = {}
    for i, f in enumerate(FILES):
        path = root / f"d{i % 2}" / f"IM{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, path)
        contents[f.name] = f.read_bytes()
    return contents


def stored(dst: Path) -> list[bytes]:
    return sorted(p.read_bytes() for p in dst.rglob("*.dcm"))


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("fsync", list(Fsync))
def test_sort_flushes_only_with_always_and_places_every_file(
    tmp_path: Path, mode: Mode, fsync: Fsync
) -> None:
    contents = source_tree(tmp_path / "src")
    cfg = SortConfig(src=tmp_path / "src", dst=tmp_path / "dst", mode=mode, workers=1, fsync=fsync)
    before = flush_count()
    outcomes = sort_files(sorted(map(str, (tmp_path / "src").rglob("IM*"))), cfg)
    flushes = flush_count() - before
    assert [o.result for o in outcomes] == [Result.NEW] * len(FILES), outcomes
    assert stored(cfg.dst) == sorted(contents.values())
    if fsync is Fsync.NEVER:
        assert flushes == 0
    else:
        assert flushes > 0
    if mode is Mode.MOVE:
        assert not list((tmp_path / "src").rglob("IM*")), "a moved source is still there"


@pytest.mark.parametrize("fsync", list(Fsync))
def test_sort_tree_reports_its_workers_flushes(tmp_path: Path, fsync: Fsync) -> None:
    source_tree(tmp_path / "src")
    cfg = SortConfig(src=tmp_path / "src", dst=tmp_path / "dst", mode=Mode.COPY, workers=2,
                     fsync=fsync)
    report = sort_tree(cfg)
    assert report.counts[Result.NEW] == len(FILES)
    assert (report.flushes == 0) is (fsync is Fsync.NEVER), report.flushes


@pytest.mark.parametrize(("how", "expected"), [
    ((), "always"), (("--fsync", "never"), "never"), (("--fsync", "always"), "always"),
    ("env:never", "never"), ("env:always", "always"),
])
def test_the_command_line_and_its_variable_reach_the_workers(
    tmp_path: Path, how: tuple[str, ...] | str, expected: str
) -> None:
    contents = source_tree(tmp_path / "src")
    env = cli_env()
    args: tuple[str, ...] = ()
    if isinstance(how, str):
        env["SORTSCP_FSYNC"] = how.removeprefix("env:")
    else:
        args = how
    r = run_cli("sort", tmp_path / "src", tmp_path / "dst", "--workers", "2",
                "--log-level", "INFO", *args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    found = FLUSHES.search(r.stderr)
    assert found, r.stderr
    assert found.group(1) == expected
    assert (int(found.group(2)) == 0) is (expected == "never"), r.stderr
    assert stored(tmp_path / "dst") == sorted(contents.values())


def test_a_bad_value_is_one_usage_error(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    for command in (("sort", tmp_path / "src", tmp_path / "dst"), ("serve", "--port", "0")):
        r = run_cli(*command, "--fsync", "sometimes")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "sometimes" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "dst").exists()


def _received(out: Path, source: Path) -> Path:
    """A received file as the network thread leaves it: File Meta, then the dataset
    (here simply a Part 10 file, which is both)."""
    tmp = new_tmp(out)
    data = source.read_bytes()
    assert data[128:132] == PREAMBLE[-4:]
    tmp.write_bytes(data)
    return tmp


@pytest.mark.parametrize("fsync", list(Fsync))
def test_serve_stores_and_flushes_only_with_always(tmp_path: Path, fsync: Fsync) -> None:
    out = tmp_path / "out"
    cfg = ServeConfig(out=out, workers=1, fsync=fsync)
    received = _received(out, FILES[0])
    before = flush_count()
    outcome = store_received(str(received), "SENDER", cfg)
    flushes = flush_count() - before
    assert outcome.result is Result.STORED, outcome
    assert (out / outcome.destination).read_bytes() == FILES[0].read_bytes()
    if fsync is Fsync.NEVER:
        assert flushes == 0
    else:
        assert flushes >= 2  # the file, and the folder that holds its new name


@pytest.mark.parametrize("policy", ["replace", "keep"])
def test_a_resend_answered_by_the_file_already_there_flushes_that_file(tmp_path: Path, policy: str) -> None:
    """The same instance again (or, with ``keep``, any copy of it) gets
    Success for the file already in place, which it does not write. That
    file's writer may have died between its link and its flushes (a worker
    killed at its deadline; its sender got 0xA700 and sends again), so the
    resend's Success flushes it and its folder, as a new file's does: the
    received file, then the one there and its folder."""
    out = tmp_path / "out"
    cfg = ServeConfig(out=out, workers=1, fsync=Fsync.ALWAYS, on_duplicate=Duplicate(policy))
    first = store_received(str(_received(out, FILES[0])), "SENDER", cfg)
    again = _received(out, FILES[0])
    if policy == "keep":  # other bytes of the same instance at the same path: the first copy is kept
        ds = pydicom.dcmread(FILES[0])
        ds.StudyDate = "19990101"
        ds.save_as(again, enforce_file_format=True)
    before = flush_count()
    outcome = store_received(str(again), "SENDER", cfg)
    flushes = flush_count() - before
    assert outcome.destination == first.destination
    assert (out / outcome.destination).read_bytes() == FILES[0].read_bytes()
    assert flushes >= 3, flushes


_FSYNCED = re.compile(r"^\d+\s+f(?:data)?sync\(\d+<(.*)>\)\s+=\s+0$")


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-qq", "-o", "/dev/null", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _strace_works(), reason="needs strace (allowed to trace)")
@pytest.mark.parametrize("policy", ["replace", "keep"])
def test_the_file_and_folder_a_resend_is_answered_by_are_the_ones_flushed(tmp_path: Path, policy: str) -> None:
    """The test above counts flushes; this one traces them (``strace -y``
    names each flushed descriptor's file): after the resend, the file at the
    instance's path and the folder holding its name are among them."""
    out = tmp_path / "out"
    script = f"""
import os, sys
from pathlib import Path
import pydicom
from scp.config import ServeConfig
from scp.enums import Duplicate, Fsync
from scp.jobs import store_received
from scp.store.tmp import new_tmp
out, source = Path({str(out)!r}), Path({str(FILES[0])!r})
def received(data):
    tmp = new_tmp(out)
    tmp.write_bytes(data)
    return str(tmp)
cfg = ServeConfig(out=out, workers=1, fsync=Fsync.ALWAYS, on_duplicate=Duplicate({policy!r}))
first = store_received(received(source.read_bytes()), "SENDER", cfg)
data = source.read_bytes()
if {policy!r} == "keep":  # other bytes of the same instance: the first copy is kept
    ds = pydicom.dcmread(source)
    ds.StudyDate = "19990101"
    path = new_tmp(out)
    ds.save_as(path, enforce_file_format=True)
    again = str(path)
else:
    again = received(data)
os.write(2, b"RESEND\\n")
outcome = store_received(again, "SENDER", cfg)
print(outcome.destination, first.destination)
"""
    trace = tmp_path / "trace.txt"
    proc = subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=fsync,fdatasync,write", "-o", str(trace),
                           sys.executable, "-c", script], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    destination, first = proc.stdout.split()
    assert destination == first
    lines = trace.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "write(2<" in line and "RESEND" in line)
    flushed = {m.group(1) for m in map(_FSYNCED.match, lines[start:]) if m}
    final = out / destination
    assert str(final) in flushed, flushed
    assert str(final.parent) in flushed, flushed
    assert final.read_bytes() == FILES[0].read_bytes()


def test_serve_config_defaults_to_always() -> None:
    assert ServeConfig().fsync is Fsync.ALWAYS
    assert SortConfig(src=Path("a"), dst=Path("b")).fsync is Fsync.ALWAYS


def _readme_row(option: str, section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    part = text.split(section, 1)[1].split("\n### ", 1)[0]
    for line in part.splitlines():
        if line.startswith(f"| `{option}"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no {option} row under {section!r} in the README")


@pytest.mark.parametrize("command", ["serve", "sort"])
def test_help_and_readme_agree(command: str) -> None:
    r = run_cli(command, "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "--fsync <always|never>" in text, text
    assert "SORTSCP_FSYNC" in text and "default: always" in text, text
    row = _readme_row("--fsync", f"### `sortscp {command}")
    assert "SORTSCP_FSYNC" in " ".join(row) and "`always`" in row, row
    assert "`always`" in row[-1] and "`never`" in row[-1], row

"""Output folders that other tools or hands changed between runs of the server.

The files are the truth, and a fragment or a file moved by hand is no copy of
an instance: the index rebuild does not take a fragment for the instance, the
``keep`` policy never keeps one over a complete resend, a replace removes the
earlier copy only if the file there is still that instance, and a failure to
file or to put an index in place leaves nothing of ours behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from test_serve_hostile import ct_dataset, ct_path, layout_files, log_lines, scu_store

from scp.net.status import OUT_OF_RESOURCES, SUCCESS
from scp.store.tmp import INDEX_FILENAME, STATE_DIRNAME

from conftest import run_cli


def _part10(ds) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_reindex_does_not_take_a_fragment_for_the_instance(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ds = ct_dataset()
    whole = _part10(ds)
    complete = out / "P" / "S" / "whole.dcm"
    fragment = out / "P" / "S" / "newer-fragment.dcm"
    complete.parent.mkdir(parents=True)
    complete.write_bytes(whole)
    fragment.write_bytes(whole[:3000])  # an interrupted copy, newer than the whole one
    os.utime(complete, (1_000_000_000, 1_000_000_000))
    proc = run_cli("reindex", out, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "newer-fragment.dcm: not indexed" in output and "Traceback" not in output, output
    assert "1 instances indexed from 2 files" in output, output
    listing = run_cli("ls", out, "--json", timeout=60)
    assert listing.returncode == 0, listing.stderr
    (study,) = json.loads(listing.stdout)["studies"]
    assert [s["instances"] for s in study["series"]] == [1], study


def test_keep_never_keeps_a_fragment_over_a_complete_resend(serve_process, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ds = ct_dataset(PatientName="Frag^Ment", PatientID="F1")
    at_its_path = ct_path(out, ds)
    elsewhere = out / "Other" / "Folder" / "partial.dcm"
    for fragment in (at_its_path, elsewhere):  # before the server's first start: no index yet
        fragment.parent.mkdir(parents=True, exist_ok=True)
        fragment.write_bytes(_part10(ds)[:3000])
    server = serve_process("--workers", "1", "--on-duplicate", "keep", out=out)
    assert scu_store(server.port, ds) == SUCCESS, server.log()
    stored = pydicom.dcmread(at_its_path)
    assert stored.SOPInstanceUID == ds.SOPInstanceUID and stored.PixelData == ds.PixelData, server.log()
    assert elsewhere.stat().st_size == 3000  # not ours to remove: never indexed
    assert "kept the first copy" not in server.log()


def test_a_replace_removes_the_earlier_copy_only_if_it_is_still_that_instance(
    serve_process, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    x, y = ct_dataset(PatientName="X^X", PatientID="X1"), ct_dataset(PatientName="Y^Y", PatientID="Y1")
    server = serve_process("--workers", "1", out=out)
    assert scu_store(server.port, x) == SUCCESS and scu_store(server.port, y) == SUCCESS
    assert server.terminate() == 0
    x_path, y_path = ct_path(out, x), ct_path(out, y)
    y_bytes = y_path.read_bytes()
    x_path.unlink()
    shutil.move(y_path, x_path)  # by hand, no reindex: the index still says X is there
    server = serve_process("--workers", "1", out=out)
    corrected = ct_dataset(x.SOPInstanceUID, PatientName="X^Corrected", PatientID="X1")
    assert scu_store(server.port, corrected) == SUCCESS, server.log()
    assert ct_path(out, corrected).is_file()
    assert x_path.read_bytes() == y_bytes, "instance Y, moved there by hand, was removed"
    assert len(log_lines(server, r"not removed as the earlier copy of")) == 1, server.log()


def test_a_name_held_by_a_folder_fails_the_instance_and_leaves_nothing(serve_process, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ds = ct_dataset(uid=generate_uid())
    blocker = ct_path(out, ds)
    (blocker / "sub").mkdir(parents=True)
    server = serve_process("--workers", "1", out=out)
    assert scu_store(server.port, ds) == OUT_OF_RESOURCES, server.log()
    assert sorted(p.name for p in blocker.parent.iterdir()) == [blocker.name], list(blocker.parent.iterdir())
    assert layout_files(out) == []
    assert len(log_lines(server, rf"cannot replace .*{ds.SOPInstanceUID}\.dcm: Is a directory")) == 1, server.log()


def test_reindex_with_a_folder_at_the_index_name_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / STATE_DIRNAME / INDEX_FILENAME).mkdir(parents=True)
    proc = run_cli("reindex", out, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "Traceback" not in output and "cannot put the rebuilt index in place" in output, output
    assert sorted(p.name for p in (out / STATE_DIRNAME).iterdir() if "rebuild" in p.name) == []


def test_a_resend_of_an_instance_moved_by_hand_says_the_index_lost_it(serve_process, tmp_path: Path) -> None:
    """Moved to another folder by hand while the server was stopped, then sent
    again: the new file is filed, the moved copy stays (the index cannot know
    where it went), and one line says so, with the command that finds it."""
    out = tmp_path / "out"
    x = ct_dataset(PatientName="X^X", PatientID="X1")
    server = serve_process("--workers", "1", out=out)
    assert scu_store(server.port, x) == SUCCESS
    assert server.terminate() == 0
    where = ct_path(out, x)
    moved = out / "Moved^ByHand" / where.name
    moved.parent.mkdir()
    shutil.move(where, moved)
    server = serve_process("--workers", "1", out=out)
    assert scu_store(server.port, x) == SUCCESS, server.log()
    assert where.is_file() and moved.is_file()
    (line,) = log_lines(server, r"which holds no file any more")
    assert "WARNING" in line and where.relative_to(out).as_posix() in line and "reindex" in line, line
    assert server.terminate() == 0
    r = run_cli("reindex", out)
    assert "another file" in r.stdout + r.stderr, r.stdout + r.stderr  # where reindex finds the copy

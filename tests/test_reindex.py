"""``sortscp reindex OUT`` and the instance index as users meet it: files moved
by other tools, a running server holding the index, sort into a served tree."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from test_serve_hostile import ct_dataset, ct_path, layout_files, scu_store

from scp.store.index import SqliteIndex, index_path

from conftest import cli_env, run_cli

FAST = ("--workers", "1")


def _rows(out: Path) -> dict[str, str]:
    index = SqliteIndex(out)
    try:
        return {r.sop_instance_uid: r.path for r in index.all_instances()}
    finally:
        index.close()


def test_reindex_follows_files_moved_by_other_tools(serve_process, tmp_path):
    out = tmp_path / "out"
    server = serve_process(*FAST, out=out)
    first = ct_dataset(generate_uid(), PatientName="Moved^ByHand", SeriesNumber=1)
    assert scu_store(server.port, first) == 0
    assert server.terminate() == 0
    old = ct_path(out, first)
    moved = out / "elsewhere" / old.name
    moved.parent.mkdir()
    shutil.move(old, moved)  # a user tidies up by hand
    done = run_cli("reindex", out, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 instances indexed" in done.stdout
    assert _rows(out) == {first.SOPInstanceUID: f"elsewhere/{old.name}"}
    # the resend of a corrected header replaces the moved copy: still one file
    again = serve_process(*FAST, out=out)
    second = ct_dataset(first.SOPInstanceUID, PatientName="Moved^ByHand", SeriesNumber=2)
    assert scu_store(again.port, second) == 0
    assert layout_files(out) == [ct_path(out, second)]


def test_reindex_refuses_while_a_server_holds_the_index(serve_process, tmp_path):
    out = tmp_path / "out"
    server = serve_process(*FAST, out=out)
    assert scu_store(server.port, ct_dataset(generate_uid())) == 0
    done = run_cli("reindex", out, timeout=60)
    assert done.returncode == 75, done.stdout + done.stderr
    assert "stop it first" in done.stderr
    assert "Traceback" not in done.stderr
    assert scu_store(server.port, ct_dataset(generate_uid())) == 0  # the server is unharmed


def test_reindex_of_a_folder_that_does_not_exist_is_one_clear_line(tmp_path):
    done = run_cli("reindex", tmp_path / "nowhere", timeout=60)
    assert done.returncode == 1
    assert "is not a folder" in done.stderr and "Traceback" not in done.stderr


def test_sort_into_a_served_tree_keeps_its_index_current(serve_process, tmp_path):
    out = tmp_path / "out"
    server = serve_process(*FAST, out=out)
    served = ct_dataset(generate_uid(), PatientName="Served^One")
    assert scu_store(server.port, served) == 0
    assert server.terminate() == 0
    src = tmp_path / "src"
    src.mkdir()
    extra = ct_dataset(generate_uid(), PatientName="Sorted^In")
    extra.save_as(src / "extra.dcm", enforce_file_format=True)
    done = run_cli("sort", src, out, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert index_path(out).is_file()
    assert set(_rows(out)) == {served.SOPInstanceUID, extra.SOPInstanceUID}


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes, but the state of the running tools."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).parts[0].startswith(".sortscp")}


def test_sort_into_a_folder_a_server_files_into_is_refused_and_touches_nothing(serve_process, tmp_path):
    """sort beside a running server left the server's index without the sorted
    files (a warning only), and nothing repaired it: after a restart, a
    corrected resend of a sorted UID was filed and the sorted copy stayed (two
    files for one instance), and `ls` undercounted."""
    out, src, report = tmp_path / "out", tmp_path / "src", tmp_path / "r.csv"
    server = serve_process(*FAST, out=out)
    assert scu_store(server.port, ct_dataset(generate_uid(), PatientName="Served^One")) == 0
    src.mkdir()
    uid = generate_uid()
    ct_dataset(uid, PatientName="Old^Name").save_as(src / "IM1", enforce_file_format=True)
    before, sources = _tree(out), _tree(src)
    for mode in ("copy", "move", "hardlink"):
        refused = run_cli("sort", "--mode", mode, "--report", report, src, out, timeout=120)
        assert refused.returncode == 75, refused.stdout + refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "running server" in lines[0] and str(out) in lines[0], lines
        assert _tree(out) == before and _tree(src) == sources
        assert not report.exists()
    refused = run_cli("sort", "--mode", "move", out, out, timeout=120)  # in place, a new layout
    assert refused.returncode == 75 and _tree(out) == before
    planned = run_cli("sort", "--dry-run", src, out, timeout=120)  # as the real run would be
    assert planned.returncode == 75 and "running server" in planned.stderr, planned.stdout + planned.stderr
    assert "->" not in planned.stdout
    # Stopped, the same sort runs and the index knows the file: a corrected
    # resend through the next server replaces it.
    assert server.terminate() == 0
    done = run_cli("sort", src, out, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "instance index of" in done.stderr and "rebuilt: 2 instances" in done.stderr
    server = serve_process(*FAST, out=out)
    assert scu_store(server.port, ct_dataset(uid, PatientName="New^Name")) == 0
    assert server.terminate() == 0
    files = [p for p in layout_files(out) if p.name.startswith(uid)]
    assert len(files) == 1 and "New^Name" in str(files[0]), files
    assert len(_rows(out)) == 2 == len(layout_files(out))


@pytest.mark.parametrize("served", [True, False], ids=["a serve output folder", "a new folder"])
def test_a_server_started_while_a_sort_fills_its_folder_refuses_to_start(serve_process, tmp_path, served):
    """The other way round: a server started while a sort fills its folder
    would build its index before the sort's last files and file beside them,
    so it does not start (exit 2, one line), even on a new folder, where no
    index held the sort off."""
    out, src = tmp_path / "out", tmp_path / "src"
    if served:
        server = serve_process(*FAST, out=out)  # OUT becomes a serve output folder
        assert server.terminate() == 0
    src.mkdir()
    ds = ct_dataset(generate_uid())
    for i in range(800):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SeriesInstanceUID}.{i}"
        ds.save_as(src / f"IM{i}", enforce_file_format=True)
    sort = subprocess.Popen([sys.executable, "-m", "scp", "sort", "--workers", "1", str(src), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not layout_files(out) and sort.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(sort.pid, signal.SIGSTOP)  # while it places the files
        assert sort.poll() is None and len(layout_files(out)) < 800, "stopped too late"
        refused = run_cli("serve", "--out", out, "--port", "0", timeout=30)
        not_now = run_cli("reindex", out, timeout=30)
    finally:
        os.killpg(sort.pid, signal.SIGCONT)
    _, err = sort.communicate(timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"(pid {sort.pid}: a sort into it" in lines[0], lines
    assert not_now.returncode == 75 and f"(pid {sort.pid}: a sort into it" in not_now.stderr, not_now.stderr
    assert sort.returncode == 0, err
    if served:
        assert "rebuilt: 800 instances" in err
    else:
        assert not index_path(out).exists()  # the refused server made none
        server = serve_process(*FAST, out=out)
        assert "created the instance index" in server.log()
        assert server.terminate() == 0
    assert len(_rows(out)) == 800 == len(layout_files(out))


def test_a_sort_killed_in_a_served_folder_leaves_the_next_server_rebuilding_the_index(serve_process, tmp_path):
    """A sort into a serve output folder rebuilds the index at its end; one
    killed before (SIGKILL, a reboot, Ctrl-C) never did, and the next server
    took an index without the files it had placed: a corrected resend of one
    of them was filed beside it (two files for one instance)."""
    out, src = tmp_path / "out", tmp_path / "src"
    server = serve_process(*FAST, out=out)
    assert scu_store(server.port, ct_dataset(generate_uid(), PatientName="Served^One")) == 0
    assert server.terminate() == 0
    src.mkdir()
    ds = ct_dataset(generate_uid(), PatientName="Sorted^Before")
    for i in range(400):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SeriesInstanceUID}.{i}"
        ds.save_as(src / f"IM{i}", enforce_file_format=True)
    sort = subprocess.Popen([sys.executable, "-m", "scp", "sort", "--workers", "1", str(src), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env(),
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while len(layout_files(out)) < 3 and sort.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(sort.pid, signal.SIGKILL)
    sort.wait(30)
    placed = [p for p in layout_files(out) if "Sorted^Before" in str(p)]
    assert 0 < len(placed) < 400, "killed too late"
    server = serve_process(*FAST, out=out)
    assert "a sort into this folder did not finish" in server.log()
    uid = placed[0].stem
    assert scu_store(server.port, ct_dataset(uid, PatientName="Sorted^After")) == 0
    assert server.terminate() == 0
    files = [p for p in layout_files(out) if p.name == f"{uid}.dcm"]
    assert len(files) == 1 and "Sorted^After" in str(files[0]), files
    assert len(_rows(out)) == len(layout_files(out)) == len(placed) + 1
    # rebuilt once: the next server takes the index as it is
    again = serve_process(*FAST, out=out)
    assert "did not finish" not in again.log()


def test_a_file_whose_name_is_not_utf8_is_listed_not_indexed_and_the_server_starts(serve_process, tmp_path):
    """One such file (copied in from a Latin-1 CD by another tool) made every
    rebuild fail with a traceback: reindex, a sort's end, and a server's start."""
    out = tmp_path / "out"
    odd = ct_dataset(generate_uid(), PatientName="Latin^One")
    folder = out / "CD"
    folder.mkdir(parents=True)
    odd.save_as(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.dcm"), enforce_file_format=True)
    done = run_cli("reindex", out, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output
    assert "not valid UTF-8" in output and "0 instances indexed from 1 files" in output, output
    assert not [p for p in (out / ".sortscp").iterdir() if "rebuild" in p.name]
    (out / ".sortscp" / "index.sqlite").unlink()  # the server builds it again, at its start
    server = serve_process(*FAST, out=out)
    fresh = ct_dataset(generate_uid())
    assert scu_store(server.port, fresh) == 0, server.log()
    assert ct_path(out, fresh).is_file()
    assert os.fsencode(folder) + b"/caf\xe9.dcm" in [os.fsencode(p) for p in folder.iterdir()]


@pytest.mark.parametrize("command", ["reindex", "ls"])
def test_a_file_as_out_is_a_usage_error(tmp_path, command):
    """README: `reindex` and `ls` exit 2 when OUT is a file, not a folder."""
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a folder")
    done = run_cli(command, afile, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "is not a folder" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert afile.read_bytes() == b"not a folder"


def test_sort_into_a_served_tree_names_the_files_it_put_beside_another_copy(serve_process, tmp_path):
    """Found by an independent attack: a sort into a serve output folder filed
    a copy of an instance the tree held under another patient as `new`, and
    its rebuild of the index said nothing (`reindex` lists such files)."""
    out, src = tmp_path / "out", tmp_path / "src"
    server = serve_process(*FAST, out=out)
    uid = generate_uid()
    served = ct_dataset(uid, PatientName="Alpha^Served")
    assert scu_store(server.port, served) == 0
    assert server.terminate() == 0
    src.mkdir()
    ct_dataset(uid, PatientName="Beta^Sorted").save_as(src / "IM1", enforce_file_format=True)
    done = run_cli("sort", src, out, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(str(p.relative_to(out)) for p in layout_files(out))
    assert len(files) == 2 and all(f.endswith(f"{uid}.dcm") for f in files), files
    indexed = _rows(out)[uid]
    other = next(f for f in files if f != indexed)
    assert f"sort: {other}: another file of SOPInstanceUID {uid} (indexed: {indexed})" in done.stderr, \
        done.stderr
    assert "rebuilt: 1 instances, 1 duplicates" in done.stderr, done.stderr

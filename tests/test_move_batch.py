"""Moves of one batch share their folder flushes: every source stays until its
destination is linked and flushed, and a source that cannot be removed is
reported as failed, never lost."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path, PurePosixPath

import pytest

from scp.config import SortConfig
from scp.enums import Mode, Placement
from scp.enums import Result as Status
from scp.errors import SourceChanged
from scp.sort_jobs import sort_files
from scp.store.fsops import identity, same_file
from scp.store.place import PENDING, PLACED, TAKEN, MoveBatch, SortBatch, place
from scp.store.tmp import TMP_DIRNAME

from conftest import TEST_FILES, run_cli

CT = TEST_FILES / "CT_small.dcm"
MR = TEST_FILES / "MR_small.dcm"


def test_sources_stay_until_finish(tmp_path: Path) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    sources = [shutil.copy2(f, src_dir / f.name) for f in (CT, MR)]
    dst = tmp_path / "dst"
    batch = MoveBatch()
    placed = []
    for i, s in enumerate(map(Path, sources)):
        final, placement = place(s, dst, PurePosixPath(f"P/S/{i}.dcm"), Mode.MOVE, batch=batch)
        assert placement is Placement.STORED
        assert s.exists(), "a source was removed before the batch was flushed"
        placed.append(final)
    assert batch.finish() == {}
    assert not any(Path(s).exists() for s in sources)
    assert [p.read_bytes() for p in placed] == [CT.read_bytes(), MR.read_bytes()]


def test_a_source_that_cannot_be_removed_is_reported(tmp_path: Path) -> None:
    src = Path(shutil.copy2(CT, tmp_path / "ct.dcm"))
    batch = MoveBatch()
    final, _ = place(src, tmp_path / "dst", PurePosixPath("P/S/1.dcm"), Mode.MOVE, batch=batch)
    src.unlink()  # gone before finish: its removal fails
    failed = batch.finish()
    assert list(failed) == [str(src)]
    assert final.read_bytes() == CT.read_bytes()


def test_sort_files_moves_a_batch_and_reports_each_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    paths = [shutil.copy2(CT, src / "a" / "IM1"), shutil.copy2(MR, src / "b" / "IM1"),
             shutil.copy2(CT, src / "b" / "IM2")]
    (src / "b" / "notes.txt").write_text("not DICOM")
    cfg = SortConfig(src=src, dst=tmp_path / "dst", mode=Mode.MOVE, workers=1)
    cfg.dst.mkdir()
    outcomes = sort_files([*map(str, paths), str(src / "b" / "notes.txt")], cfg)
    # (the second CT: the first one's name in DST is still a hard link of its source, which
    # a write would change, so the move makes it a file of its own)
    assert [o.result for o in outcomes] == [
        Status.STORED, Status.STORED, Status.REPLACED, Status.SKIPPED
    ], outcomes
    assert not any(Path(p).exists() for p in paths)
    assert (src / "b" / "notes.txt").exists()
    stored = sorted(p.read_bytes() for p in cfg.dst.rglob("*.dcm"))
    assert stored == sorted([CT.read_bytes(), MR.read_bytes()])


def test_copies_of_a_batch_get_their_names_only_when_finished(tmp_path: Path) -> None:
    """A copy has no final name before finish() flushed it; a name taken
    meanwhile is not overwritten; nothing temporary is left."""
    src = tmp_path / "src"
    src.mkdir()
    paths = [Path(shutil.copy2(f, src / f.name)) for f in (CT, MR)]
    dst = tmp_path / "dst"
    batch = SortBatch(dst, Mode.COPY, durable=True)
    finals = [dst / "P" / "S" / f"{i}.dcm" for i in range(2)]
    for p, final in zip(paths, finals):
        fd = os.open(p, os.O_RDONLY)
        try:
            assert batch.claim(p, fd, os.fstat(fd), final) == PENDING
        finally:
            os.close(fd)
        assert not final.exists(), "a copy had its final name before the batch was flushed"
    finals[1].parent.mkdir(parents=True, exist_ok=True)
    finals[1].write_bytes(b"taken meanwhile")
    done = batch.finish()
    assert done == {str(paths[0]): PLACED, str(paths[1]): TAKEN}
    assert finals[0].read_bytes() == CT.read_bytes()
    assert finals[0].stat().st_mtime_ns == CT.stat().st_mtime_ns
    assert finals[1].read_bytes() == b"taken meanwhile"  # a link never overwrites
    tmp = dst / TMP_DIRNAME
    assert not tmp.exists() or list(tmp.iterdir()) == []
    left = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert left == ["P/S/0.dcm", "P/S/1.dcm"]


# --- a source replaced or written to while it is sorted (another process:
# a receiver dropping a corrected instance into the same folder) -----------------


def _replace_with(path: Path, data: bytes) -> None:
    """What a writer does: a new file renamed over the name (a new inode)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _opened(path: Path) -> tuple[int, os.stat_result]:
    fd = os.open(path, os.O_RDONLY)
    return fd, os.fstat(fd)


@pytest.mark.parametrize("mode", [Mode.MOVE, Mode.HARDLINK])
def test_a_source_replaced_after_its_header_was_read_is_not_linked(tmp_path: Path, mode: Mode) -> None:
    """The name was given by the header read; the link took whatever file had
    the path by then, so another instance was filed under the first one's
    patient and UID (and, moving, its source removed)."""
    src = Path(shutil.copy2(CT, tmp_path / "in.dcm"))
    final = tmp_path / "dst" / "P" / "S" / "1.dcm"
    batch = SortBatch(tmp_path / "dst", mode, durable=False)
    fd, st = _opened(src)
    try:
        _replace_with(src, MR.read_bytes())
        with pytest.raises(SourceChanged):
            batch.claim(src, fd, st, final)
    finally:
        os.close(fd)
    assert batch.finish() == {}
    assert not final.exists()
    assert src.read_bytes() == MR.read_bytes()


def _rewrite_keeping_mtime(path: Path) -> bytes:
    """What a second writer does with ``rsync --inplace -t`` or ``touch -r``:
    the file rewritten in place as another patient's instance of the same
    size, its modification time put back. Returns the new bytes."""
    old = path.read_bytes()
    assert old.count(b"CompressedSamples^CT1") == 1
    new = old.replace(b"CompressedSamples^CT1", b"SomeoneElse^Patient22")
    assert len(new) == len(old)
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert same_file(os.stat(path), identity(st))  # size and times as they were
    return new


@pytest.mark.parametrize("path", ["free name", "taken name"])
@pytest.mark.parametrize("when", ["before its link", "before its removal"])
def test_a_source_rewritten_with_its_modification_time_put_back_is_neither_filed_nor_removed(
    tmp_path: Path, path: str, when: str,
) -> None:
    """Size, inode and modification time said nothing had changed: the source
    was removed, and its name in DST (its hard link) held another patient's
    instance under the first one's path and name. The change time, which no
    writer can put back, tells."""
    src = Path(shutil.copy2(CT, tmp_path / "in.dcm"))
    dst = tmp_path / "dst"
    fd, st = _opened(src)
    os.close(fd)
    if when == "before its link":
        new = _rewrite_keeping_mtime(src)
    if path == "free name":
        final = dst / "P" / "S" / "1.dcm"
        fast = SortBatch(dst, Mode.MOVE, durable=False)
        fd = os.open(src, os.O_RDONLY)
        try:
            if when == "before its link":
                with pytest.raises(SourceChanged):
                    fast.claim(src, fd, st, final)
            else:
                assert fast.claim(src, fd, st, final) == PLACED
        finally:
            os.close(fd)
        if when == "before its removal":
            new = _rewrite_keeping_mtime(src)
        done = fast.finish()
    else:  # place(), as for a name another file holds: ~2
        (dst / "P" / "S").mkdir(parents=True)
        shutil.copy2(MR, dst / "P" / "S" / "1.dcm")
        batch = MoveBatch(durable=False)
        if when == "before its link":
            with pytest.raises(SourceChanged):
                place(src, dst, PurePosixPath("P/S/1.dcm"), Mode.MOVE, batch=batch, expect=identity(st))
        else:
            final, placement = place(src, dst, PurePosixPath("P/S/1.dcm"), Mode.MOVE, batch=batch,
                                     expect=identity(st))
            assert placement is Placement.STORED_AS_COPY
            new = _rewrite_keeping_mtime(src)
        done = batch.finish()
    assert src.read_bytes() == new  # the source stays, as the writer left it
    if when == "before its removal":
        assert list(done) == [str(src)] and isinstance(done[str(src)], SourceChanged), done
        assert done[str(src)].unfiled
    else:
        assert done == {}
    held = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.dcm") if TMP_DIRNAME not in p.parts)
    assert held == ([] if path == "free name" else ["P/S/1.dcm"]), held  # nothing filed
    if path == "taken name":
        assert (dst / "P" / "S" / "1.dcm").read_bytes() == MR.read_bytes()


@pytest.fixture
def namer(monkeypatch: pytest.MonkeyPatch):
    """What a sort's batch sets: the name a file's header gives it now."""
    import functools

    from scp.layout import DEFAULT_TEMPLATE, Template
    from scp.sort_jobs import _name_now
    from scp.store import fsops

    name_now = functools.partial(_name_now, template=Template.parse(DEFAULT_TEMPLATE))
    monkeypatch.setattr(fsops, "NAMER", name_now)
    return name_now


@pytest.mark.parametrize("sibling", ["linked", "linked and removed", "none"])
def test_a_rewrite_with_the_time_put_back_is_seen_whatever_another_name_of_the_file_did(
    tmp_path: Path, namer, sibling: str,
) -> None:
    """The change time moves for a write and also for a link or an unlink of
    another name of the file (a `cp -al` tree's sibling, moved by another
    worker meanwhile). A link count that had changed was taken to explain a
    changed change time: a rewrite that came with a sibling's link was filed
    under the old header's name, the old bytes nowhere. Now a moved change
    time means the header is read again: the name it gives must be the one
    the move files it under."""
    src = tmp_path / "src"
    src.mkdir()
    b = Path(shutil.copy2(CT, src / "b.dcm"))
    rel = namer(str(b))
    read = identity(os.stat(b), rel)
    new = _rewrite_keeping_mtime(b)
    assert namer(str(b)) != rel
    if sibling != "none":
        os.link(b, src / "a.dcm")
        if sibling == "linked and removed":
            os.unlink(src / "a.dcm")
    batch = MoveBatch(durable=False)
    with pytest.raises(SourceChanged):
        place(b, tmp_path / "dst", PurePosixPath(rel), Mode.MOVE, batch=batch, expect=read)
    assert batch.finish() == {}
    assert b.read_bytes() == new
    assert not (tmp_path / "dst").exists() or list((tmp_path / "dst").rglob("*.dcm")) == []


@pytest.mark.parametrize("meanwhile", ["a sibling moved", "chmod"])
def test_a_change_time_moved_by_no_write_does_not_fail_the_move(tmp_path: Path, namer, meanwhile: str) -> None:
    """A `cp -al` tree's other name of the file linked into DST and removed
    (the link count back where it was), or a `chmod`: only the change time
    moved, the bytes did not. Such moves failed "changed while it was being
    sorted" (and, for the sibling, removed the link it had made in DST)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    b = Path(shutil.copy2(CT, src / "b.dcm"))
    rel = namer(str(b))
    read = identity(os.stat(b), rel)
    if meanwhile == "chmod":
        os.chmod(b, 0o600)
    else:
        os.link(b, src / "a.dcm")
        os.link(src / "a.dcm", tmp_path / "elsewhere.dcm")  # a's move, to another tree
        os.unlink(src / "a.dcm")
    assert os.stat(b).st_ctime_ns != read[4]
    batch = MoveBatch(durable=False)
    final, placement = place(b, dst, PurePosixPath(rel), Mode.MOVE, batch=batch, expect=read)
    assert placement is Placement.STORED
    assert batch.finish() == {}
    assert not b.exists() and final.read_bytes() == CT.read_bytes()


def test_names_of_one_file_named_after_the_walk_are_all_moved(tmp_path: Path) -> None:
    """Two names of one file (`cp -al`), other bytes at their plain name, so
    both are named after the walk: the first's link and removal moved the
    change time with the link count back where it was, and the second was
    failed "changed", its own link in DST (the first's file) removed, so the
    first's row named a file that was not there."""
    src, dst, first = tmp_path / "src", tmp_path / "dst", tmp_path / "first"
    src.mkdir()
    first.mkdir()
    shutil.copy2(CT, src / "a.dcm")
    os.link(src / "a.dcm", src / "b.dcm")
    other = bytearray(CT.read_bytes())
    other[-1] ^= 0xFF
    (first / "x.dcm").write_bytes(bytes(other))
    assert run_cli("sort", "--mode", "copy", first, dst).returncode == 0
    report = tmp_path / "r.csv"
    proc = run_cli("sort", "--mode", "move", "--workers", "1", "--report", report, src, dst)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(src.iterdir()) == []
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(row["outcome"] != "failed" for row in rows), rows
    for row in rows:
        assert Path(row["destination"]).is_file(), row
    held = sorted(p.read_bytes() == CT.read_bytes() for p in dst.rglob("*.dcm") if TMP_DIRNAME not in p.parts)
    assert held == [False, True], held  # the other bytes, and one copy of the file


@pytest.mark.parametrize("change", ["replaced", "appended to"])
def test_a_moved_source_changed_before_its_removal_is_kept(tmp_path: Path, change: str) -> None:
    """Its removal waits for the batch's flush; a new version put at its path
    meanwhile was removed with it, and its bytes were in neither tree."""
    src = Path(shutil.copy2(CT, tmp_path / "in.dcm"))
    final = tmp_path / "dst" / "P" / "S" / "1.dcm"
    batch = SortBatch(tmp_path / "dst", Mode.MOVE, durable=False)
    fd, st = _opened(src)
    try:
        assert batch.claim(src, fd, st, final) == PLACED
    finally:
        os.close(fd)
    if change == "replaced":
        _replace_with(src, MR.read_bytes())
        expect_src = MR.read_bytes()
    else:
        with open(src, "ab") as f:
            f.write(b"\0" * 16)
        expect_src = CT.read_bytes() + b"\0" * 16
    done = batch.finish()
    assert list(done) == [str(src)] and isinstance(done[str(src)], SourceChanged), done
    assert src.read_bytes() == expect_src
    if change == "replaced":  # the file read stays in DST: its only name
        assert final.read_bytes() == CT.read_bytes() and not done[str(src)].unfiled
    else:  # its link in DST was the same file, changed too: never filed as the instance
        assert not final.exists() and done[str(src)].unfiled


@pytest.mark.parametrize("when", ["before the copy", "before the removal"])
def test_the_slow_path_keeps_a_source_changed_while_it_is_moved(tmp_path: Path, when: str) -> None:
    """place() (a taken name, another file system) copied and removed by path:
    bytes appended between the copy and the removal were lost."""
    src = Path(shutil.copy2(CT, tmp_path / "in.dcm"))
    read = identity(os.stat(src))
    tail = b"\xe0\x7f\x10\x00OB\x00\x00" + (16).to_bytes(4, "little") + b"P" * 16
    dst = tmp_path / "dst"
    if when == "before the copy":
        with open(src, "ab") as f:
            f.write(tail)
        with pytest.raises(SourceChanged):
            place(src, dst, PurePosixPath("P/S/1.dcm"), Mode.COPY, expect=read)
        assert list(dst.rglob("*.dcm")) == []
        assert src.read_bytes() == CT.read_bytes() + tail
        return
    batch = MoveBatch(durable=False)
    final, _ = place(src, dst, PurePosixPath("P/S/1.dcm"), Mode.MOVE, batch=batch, expect=read)
    with open(src, "ab") as f:  # a hard link: the same file, so it grew at `final` too
        f.write(tail)
    done = batch.finish()
    assert isinstance(done.get(str(src)), SourceChanged), done
    assert src.read_bytes() == CT.read_bytes() + tail


def test_a_source_is_removed_through_a_name_of_its_own_and_a_new_version_put_back(tmp_path: Path) -> None:
    """The check and the removal act on one file: the name is renamed aside
    first (a rename over the source between a check by name and an unlink by
    name lost the new version), and nothing is left under the aside name."""
    from scp.store.fsops import remove_source

    src = Path(shutil.copy2(CT, tmp_path / "in.dcm"))
    remove_source(src, identity(os.stat(src)))
    assert sorted(tmp_path.iterdir()) == []
    src = Path(shutil.copy2(CT, tmp_path / "in.dcm"))
    read = identity(os.stat(src))
    _replace_with(src, MR.read_bytes())  # the new version arrives before the removal
    with pytest.raises(SourceChanged):
        remove_source(src, read)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.dcm"]
    assert src.read_bytes() == MR.read_bytes()


def _swap_for_link(folder: Path, outside: Path) -> None:
    """What a hostile user who can write to SRC does mid-run: the folder goes, a link to `outside` takes its name."""
    folder.rename(folder.with_name(folder.name + ".real"))
    folder.symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize("mode", [Mode.MOVE, Mode.COPY])
def test_a_folder_swapped_for_a_link_before_its_files_are_read_is_not_followed(tmp_path: Path, mode: Mode) -> None:
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "d").mkdir(parents=True)
    outside.mkdir()
    listed = str(shutil.copy2(CT, src / "d" / "IM1"))  # what the walk listed
    shutil.copy2(MR, outside / "IM1")  # never part of SRC
    _swap_for_link(src / "d", outside)
    cfg = SortConfig(src=src, dst=tmp_path / "dst", mode=mode, workers=1)
    (outcome,) = sort_files([listed], cfg)
    assert outcome.result is Status.SKIPPED and outcome.category == "symlink", outcome
    assert (outside / "IM1").read_bytes() == MR.read_bytes()
    assert not cfg.dst.exists() or list(cfg.dst.rglob("*.dcm")) == []


@pytest.mark.parametrize("mode", [Mode.MOVE, Mode.COPY])
def test_a_file_whose_folder_was_removed_since_the_walk_is_gone_not_a_link(tmp_path: Path, mode: Mode) -> None:
    """Another move over an overlapping tree took the file and pruned its
    folder: reported as a folder swapped for a symbolic link."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    listed = str(shutil.copy2(CT, src / "d" / "IM1"))
    os.rename(listed, tmp_path / "taken.dcm")
    (src / "d").rmdir()
    cfg = SortConfig(src=src, dst=tmp_path / "dst", mode=mode, workers=1)
    (outcome,) = sort_files([listed], cfg)
    assert outcome.result is Status.SKIPPED and outcome.category == "gone", outcome
    assert (tmp_path / "taken.dcm").read_bytes() == CT.read_bytes()


def test_a_folder_swapped_for_a_link_before_its_sources_are_removed_removes_nothing(tmp_path: Path) -> None:
    from scp.store import fsops

    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "d").mkdir(parents=True)
    outside.mkdir()
    source = Path(shutil.copy2(CT, src / "d" / "IM1"))
    read = identity(os.stat(source))
    batch = MoveBatch()
    fsops.SOURCES = fsops.SourceTree(src)
    try:
        final, _ = place(source, tmp_path / "dst", PurePosixPath("P/S/1.dcm"), Mode.MOVE, batch=batch,
                         expect=read)
        _swap_for_link(src / "d", outside)
        os.link(src / "d.real" / "IM1", outside / "IM1")  # the same file, now also reached through the link
        failed = batch.finish()
    finally:
        fsops.SOURCES = None
    assert list(failed) == [str(source)] and isinstance(failed[str(source)], SourceChanged), failed
    assert (outside / "IM1").read_bytes() == CT.read_bytes()  # nothing removed through the link
    # and its link in DST, which a write to that file would change, is not filed
    assert not final.exists() and (src / "d.real" / "IM1").read_bytes() == CT.read_bytes()


def _twins_in_one_batch(tmp_path: Path) -> tuple[Path, Path, Path, SortBatch, MoveBatch]:
    """Two sources with the same bytes: the first linked at its name by the
    fast path, the twin placed after it (not yet finished): both sources,
    the name, the two batches."""
    src = tmp_path / "src"
    src.mkdir()
    first, twin = (Path(shutil.copy2(CT, src / name)) for name in ("a.dcm", "b.dcm"))
    dst = tmp_path / "dst"
    final = dst / "P" / "S" / "1.dcm"
    fast, batch = SortBatch(dst, Mode.MOVE, durable=False), MoveBatch(durable=False)
    fd, st = _opened(first)
    try:
        assert fast.claim(first, fd, st, final) == PLACED
    finally:
        os.close(fd)
    name, placement = place(twin, dst, PurePosixPath("P/S/1.dcm"), Mode.MOVE, batch=batch,
                            expect=identity(os.stat(twin)))
    assert (name, placement) == (final, Placement.REPLACED)
    return first, twin, final, fast, batch


def test_a_twin_is_not_removed_on_the_strength_of_a_link_its_source_still_shares(tmp_path: Path) -> None:
    """Two sources with the same bytes in one batch: the first gets its name
    as a hard link, the second found those bytes there and was removed as
    `already`. The first's source was then cut short before its own removal:
    it stayed, "changed", and its link in DST (the same file) held the
    fragment, filed as the instance; the bytes of both were nowhere. The
    second now makes that name a file of its own before it is removed."""
    first, twin, final, fast, batch = _twins_in_one_batch(tmp_path)
    os.truncate(first, CT.stat().st_size // 2)  # a writer cuts the first source short
    done = fast.finish()
    assert isinstance(done.get(str(first)), SourceChanged) and not done[str(first)].unfiled, done
    assert batch.finish() == {}
    assert not twin.exists()
    assert final.read_bytes() == CT.read_bytes()  # the twin's bytes: filed, whole
    assert first.stat().st_size == CT.stat().st_size // 2 and final.stat().st_nlink == 1


def test_a_move_changed_after_its_link_leaves_no_fragment_filed(tmp_path: Path) -> None:
    """The same through sort_files: a source cut short after its header was
    read (here: before its batch is sorted, so its link takes the cut file)
    is refused, and nothing of it is in DST."""
    src = tmp_path / "src"
    src.mkdir()
    source = Path(shutil.copy2(CT, src / "a.dcm"))
    dst = tmp_path / "dst"
    fast = SortBatch(dst, Mode.MOVE, durable=False)
    final = dst / "P" / "S" / "1.dcm"
    fd, st = _opened(source)
    try:
        assert fast.claim(source, fd, st, final) == PLACED
    finally:
        os.close(fd)
    with open(source, "r+b") as f:
        f.truncate(1000)
    done = fast.finish()
    assert done[str(source)].unfiled and "not filed" in str(done[str(source)])
    assert list(dst.rglob("*.dcm")) == [] and source.stat().st_size == 1000


def test_a_copy_rewritten_with_its_time_put_back_is_refused(tmp_path: Path) -> None:
    """A writer that puts the modification time back (``touch -r``, ``rsync
    --inplace -t``) while a file is copied (a move to another file system):
    size and time were the same, so the source was removed and DST held the
    old bytes. The change time, which no one can set back, tells."""
    from scp.store.place import _copy_into

    source = Path(shutil.copy2(CT, tmp_path / "a.dcm"))
    fd, st = _opened(source)
    out = os.open(tmp_path / "copy.part", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(source, "r+b") as f:
            f.seek(1000)
            f.write(b"\x55" * 64)
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert same_file(os.stat(source), identity(st))  # size and time as read
        with pytest.raises(SourceChanged):
            _copy_into(fd, out, st)
    finally:
        os.close(out)
        os.close(fd)


def test_a_move_does_not_take_a_file_shared_with_one_outside_dst_for_its_copy(tmp_path: Path) -> None:
    """A `hardlink` sort left DST's file a hard link of a working copy outside
    DST; a move of the same bytes was `already` against it and removed its
    source, so the next edit of the working copy changed the archive, and
    the moved bytes were nowhere. The move now gives the name a file of its own."""
    work, incoming, dst = tmp_path / "work", tmp_path / "incoming", tmp_path / "dst"
    work.mkdir()
    incoming.mkdir()
    shutil.copy2(CT, work / "x.dcm")
    shutil.copy2(CT, incoming / "y.dcm")
    assert run_cli("sort", "--mode", "hardlink", work, dst).returncode == 0
    report = tmp_path / "r.csv"
    proc = run_cli("sort", "--mode", "move", "--report", report, incoming, dst)
    assert proc.returncode == 0, proc.stderr
    assert ",replaced," in report.read_text(), report.read_text()
    assert not (incoming / "y.dcm").exists()
    with open(work / "x.dcm", "r+b") as f:  # the working copy edited in place
        f.seek(2000)
        f.write(b"\x00" * 32)
    (filed,) = [p for p in dst.rglob("*.dcm")]
    assert filed.read_bytes() == CT.read_bytes()


def test_twins_named_after_the_walk_get_a_copy_of_their_own_not_a_failure(tmp_path: Path) -> None:
    """Other bytes hold the instance's plain name, so its two copies in SRC
    take ``~2`` after the walk. The first was a hard link of a working copy
    outside SRC, so the name's file had another name: the second was failed
    ("holds another file now"), though the name held its very bytes. It now
    gives the name a copy of its own, as a move does when it finds the name
    shared during the walk."""
    src, dst, work = tmp_path / "src", tmp_path / "dst", tmp_path / "work"
    src.mkdir()
    work.mkdir()
    shutil.copy2(CT, src / "a.dcm")
    os.link(src / "a.dcm", work / "w.dcm")
    shutil.copy2(CT, src / "b.dcm")
    other = bytearray(CT.read_bytes())
    other[-1] ^= 0xFF  # the same instance UID, other pixel bytes
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy2(CT, first / "x.dcm")
    assert run_cli("sort", "--mode", "copy", first, dst).returncode == 0
    (plain,) = dst.rglob("*.dcm")
    plain.write_bytes(bytes(other))
    report = tmp_path / "r.csv"
    proc = run_cli("sort", "--mode", "move", "--workers", "1", "--report", report, src, dst)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(src.iterdir()) == []
    with open(report, newline="") as f:
        rows = sorted(row["outcome"] for row in csv.DictReader(f))
    assert rows == ["kept_as_copy", "replaced"], report.read_text()
    assert plain.read_bytes() == bytes(other)
    (twin,) = [p for p in dst.rglob("*.dcm") if p != plain and TMP_DIRNAME not in p.parts]
    assert twin.name.endswith("~2.dcm") and twin.read_bytes() == CT.read_bytes()
    assert twin.stat().st_nlink == 1  # its own: the working copy's next edit does not change it
    assert (work / "w.dcm").read_bytes() == CT.read_bytes()


def test_a_path_too_long_only_as_an_absolute_one_fails_with_its_reason(tmp_path: Path) -> None:
    """SRC given as a relative path whose files are within PATH_MAX that way
    but not as absolute paths: the check of their folders took the error for
    a folder swapped for a link ("skipped", exit 0), and the file was not
    filed. It fails (exit 1) with the system's reason, as with an absolute SRC."""
    deep = tmp_path / "s"
    parts = ["s"]
    while (room := 4095 - len("/IM1") - len("/".join(parts)) - 1) > 0:
        parts.append("d" * min(200, room))
    rel = Path(*parts)
    # (made piecewise, relative to the folder below: each call's path stays short)
    here = os.open(tmp_path, os.O_RDONLY)
    try:
        for part in rel.parts:
            os.mkdir(part, dir_fd=here)
            nxt = os.open(part, os.O_RDONLY, dir_fd=here)
            os.close(here)
            here = nxt
        with open(os.open("IM1", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=here), "wb") as f:
            f.write(CT.read_bytes())
    finally:
        os.close(here)
    assert len(os.fspath(rel / "IM1")) < 4096 <= len(os.fspath(tmp_path / rel / "IM1"))
    proc = run_cli("sort", rel.parts[0], tmp_path / "dst", cwd=tmp_path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "File name too long" in proc.stdout + proc.stderr, (proc.stdout, proc.stderr)
    assert "symbolic link" not in proc.stdout + proc.stderr
    assert deep.exists()


def test_a_twin_that_makes_the_name_its_own_leaves_a_copy_that_backs_both_sources(tmp_path: Path) -> None:
    """The first source's name in DST is still its hard link when a twin (of
    another worker, or later in the batch) finds it: had the twin put its own
    link there, the first source would be removed on the strength of bytes
    that the twin's source still shares, and a write to the twin then took
    them from DST too (the attack's mutation campaign lost such files). The
    twin puts a copy of its own there, which backs the first one's removal."""
    first, twin, final, fast, batch = _twins_in_one_batch(tmp_path)
    assert final.stat().st_nlink == 1 and final.stat().st_ino not in (first.stat().st_ino, twin.stat().st_ino)
    assert fast.finish() == {} and not first.exists()  # the copy backs it: the same bytes, its own file
    with open(twin, "ab") as f:  # the twin written to before its own removal
        f.write(b"\0" * 16)
    done = batch.finish()
    assert isinstance(done.get(str(twin)), SourceChanged), done
    assert twin.read_bytes() == CT.read_bytes() + b"\0" * 16
    assert final.read_bytes() == CT.read_bytes()  # the first source's bytes, still filed


def test_a_source_whose_name_in_dst_no_longer_holds_its_bytes_is_kept(tmp_path: Path) -> None:
    """A source is removed only while its name in DST still backs it: here
    that name was given other bytes (a file no other name shares) before
    the removal; the source stays, "run again"."""
    source = Path(shutil.copy2(CT, tmp_path / "a.dcm"))
    dst = tmp_path / "dst"
    batch = MoveBatch(durable=False)
    final, _ = place(source, dst, PurePosixPath("P/S/1.dcm"), Mode.MOVE, batch=batch,
                     expect=identity(os.stat(source)))
    other = final.with_name("other")
    other.write_bytes(MR.read_bytes())
    os.replace(other, final)
    done = batch.finish()
    assert "holds another file now" in str(done.get(str(source))), done
    assert source.read_bytes() == CT.read_bytes()

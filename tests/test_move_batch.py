"""Moves of one batch share their folder flushes: every source stays until its
destination is linked and flushed, and a source that cannot be removed is
reported as failed, never lost."""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

from scp.config import SortConfig
from scp.enums import Mode, Placement
from scp.enums import Result as Status
from scp.sort_jobs import sort_files
from scp.store.place import PENDING, PLACED, TAKEN, MoveBatch, SortBatch, place
from scp.store.tmp import TMP_DIRNAME

from conftest import TEST_FILES

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
    assert [o.result for o in outcomes] == [
        Status.STORED, Status.STORED, Status.ALREADY, Status.SKIPPED
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

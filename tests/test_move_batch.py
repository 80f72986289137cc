"""Moves of one batch share their folder flushes: every source stays until its
destination is linked and flushed, and a source that cannot be removed is
reported as failed, never lost."""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

from scp.config import SortConfig
from scp.enums import Mode, Placement
from scp.enums import Result as Status
from scp.jobs import sort_files
from scp.store.place import MoveBatch, place

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

"""``sortscp serve``: real associations from pynetdicom's SCU to a real server on 127.0.0.1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from conftest import readable_dicom_files, run_cli
from serve_helpers import (
    CALLING_AET,
    dataset_bytes,
    expected_path,
    file_identity,
    layout_files,
    running_server,
    send_files,
)

from scp import IMPLEMENTATION_CLASS_UID
from scp.handlers import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from scp.writer import TMP_DIRNAME

FILES = readable_dicom_files()


def _rounds(files: list[Path]) -> list[list[Path]]:
    """Split `files` so that no SOPInstanceUID is sent twice in one round (several
    test files hold the same instance in different transfer syntaxes)."""
    rounds: list[list[Path]] = []
    seen: list[set[str]] = []
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                  .SOPInstanceUID)
        for files_in_round, uids in zip(rounds, seen):
            if uid not in uids:
                files_in_round.append(f)
                uids.add(uid)
                break
        else:
            rounds.append([f])
            seen.append({uid})
    return rounds


def assert_stored(out: Path, source: Path, calling: str = CALLING_AET) -> None:
    """The file received from `source` is at its expected path, with the dataset
    bytes as sent and our File Meta."""
    target = out / expected_path(source)
    assert target.is_file(), f"{source.name}: nothing at {target.relative_to(out)}"
    assert dataset_bytes(target) == dataset_bytes(source), f"{source.name}: dataset bytes differ"
    meta = pydicom.dcmread(target, stop_before_pixels=True).file_meta
    sop_class, sop_instance, ts = file_identity(source)
    assert meta.TransferSyntaxUID == ts, source.name
    assert meta.MediaStorageSOPClassUID == sop_class, source.name
    assert meta.MediaStorageSOPInstanceUID == sop_instance, source.name
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID, source.name
    assert meta.SourceApplicationEntityTitle == calling, source.name


def test_every_readable_test_file_is_stored_byte_equal(tmp_path: Path) -> None:
    assert len(FILES) > 100, "pydicom's test files and pydicom-data should be installed"
    rounds = _rounds(FILES)
    out = tmp_path / "out"
    with running_server(out) as server:
        for files in rounds:
            statuses = send_files(server.address[1], files)
            failed = {f.name: hex(s) for f, s in statuses.items() if s != SUCCESS}
            assert not failed, f"not stored: {failed}"
            for f in files:
                assert_stored(out, f)
            stored = layout_files(out)
            expected = {out / expected_path(f) for f in files}
            assert set(stored) == expected, "one file per instance, nothing else"
            for folder in [p for p in out.iterdir() if p.name != TMP_DIRNAME]:
                shutil.rmtree(folder)

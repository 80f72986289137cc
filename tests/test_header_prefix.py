"""The header reader parses a bounded prefix in memory; it must read exactly what
pydicom's header-only read of the whole file reads, whatever the header's
length, and leave the stream where that read leaves it (the completeness check
goes on from there)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from scp.dicom.header import HEADER_PREFIX, IDENTITY_KEYWORDS, read_header
from scp.errors import NotDicomError
from scp.layout import DEFAULT_TEMPLATE, Template

from conftest import readable_dicom_files

KEYWORDS = Template.parse(DEFAULT_TEMPLATE).keywords
COMPARED = (*KEYWORDS, *IDENTITY_KEYWORDS, "SpecificCharacterSet")


def _values(ds: pydicom.Dataset) -> dict[str, object]:
    return {k: (str(ds[k].value) if k in ds else None) for k in COMPARED}


def _expected(path: Path) -> dict[str, object]:
    full = pydicom.dcmread(
        path, force=True, stop_before_pixels=True, specific_tags=[*KEYWORDS, *IDENTITY_KEYWORDS]
    )
    values = _values(full)
    meta = full.file_meta
    if values["SOPInstanceUID"] in (None, "") and "MediaStorageSOPInstanceUID" in meta:
        values["SOPInstanceUID"] = str(meta.MediaStorageSOPInstanceUID)
    if values["SOPClassUID"] in (None, "") and "MediaStorageSOPClassUID" in meta:
        values["SOPClassUID"] = str(meta.MediaStorageSOPClassUID)
    return values


def test_same_values_as_a_whole_file_read_for_every_test_file() -> None:
    files = readable_dicom_files()
    assert len(files) > 50, "pydicom's test files were not found"
    mismatches, refused, compared = [], [], 0
    for path in files:
        try:
            got = _values(read_header(path, KEYWORDS))
        except NotDicomError as exc:
            refused.append((path.name, str(exc)))
            continue
        compared += 1
        if got != _expected(path):
            mismatches.append((path.name, got, _expected(path)))
    assert not mismatches, mismatches[:5]
    # every file pydicom reads as an instance is compared: the reader refuses none
    assert compared == len(files), refused


def _long_header_file(tmp_path: Path, filler: int) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Long^Header"
    ds.private_block(0x0009, "SORTSCP TEST", create=True).add_new(0x10, "OB", b"\x01" * filler)
    path = tmp_path / f"long-{filler}.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("filler", [HEADER_PREFIX - 700, HEADER_PREFIX, 3 * HEADER_PREFIX])
def test_a_header_longer_than_the_prefix_is_read_from_the_file(tmp_path: Path, filler: int) -> None:
    path = _long_header_file(tmp_path, filler)
    ds = read_header(path, KEYWORDS)
    assert str(ds.PatientName) == "Long^Header"
    assert _values(ds) == _expected(path)


def test_a_stream_is_read_from_its_current_position(tmp_path: Path) -> None:
    path = _long_header_file(tmp_path, 2 * HEADER_PREFIX)
    stream = io.BytesIO(b"JUNK" + path.read_bytes())
    stream.seek(4)
    assert _values(read_header(stream, KEYWORDS)) == _expected(path)


def test_a_file_cut_inside_a_long_header_reads_as_before(tmp_path: Path) -> None:
    path = _long_header_file(tmp_path, 2 * HEADER_PREFIX)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[: HEADER_PREFIX + 100])
    try:
        got = _values(read_header(cut, KEYWORDS))
    except NotDicomError:
        got = None
    try:
        expected = _expected(cut)
    except Exception:
        expected = None
    assert got == expected

"""The lean header reader gives the paths pydicom's header read gives, for every
bundled file and several templates; it refuses what the old reader refuses."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from scp.dicom.header import (
    HEADER_PREFIX,
    IDENTITY_KEYWORDS,
    _read_fast,
    check_complete,
    dataset_from_elements,
    read_header,
    wanted_tags,
)
from scp.dicom.walk import walk_file
from scp.errors import NotDicomError, TruncatedError
from scp.layout import DEFAULT_TEMPLATE, Template, relative_path

from conftest import CHARSET_FILES, readable_dicom_files

TEMPLATES = [
    Template.parse(DEFAULT_TEMPLATE),
    Template.parse("{StudyDate}/{Modality}_{SeriesNumber:04}/{AccessionNumber}_{SOPInstanceUID}.dcm"),
    Template.parse("{StudyInstanceUID}/{SeriesInstanceUID}/{InstanceNumber}_{SOPInstanceUID}.dcm"),
]
TRUNCATED = {"MR_truncated.dcm", "rtplan_truncated.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"}
FILES = readable_dicom_files()


def pydicom_read(path: Path, keywords) -> pydicom.Dataset:
    """What a whole-file pydicom header read gives, SOP identity filled from the
    File Meta as the reader contract says."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=[*keywords, *IDENTITY_KEYWORDS])
    if ds.file_meta.get("MediaStorageSOPClassUID") == "1.2.840.10008.1.3.10":
        raise NotDicomError("DICOMDIR")
    for k, m in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                 ("SOPClassUID", "MediaStorageSOPClassUID")):
        if not ds.get(k) and ds.file_meta.get(m):
            setattr(ds, k, ds.file_meta.get(m))
    return ds


def _path(read, path: Path, t: Template):
    try:
        return str(relative_path(read(path, t.keywords), t))
    except NotDicomError:
        return NotDicomError


def test_same_paths_as_pydicom_for_every_bundled_file_and_template() -> None:
    compared = refused = 0
    mismatches = []
    for path in FILES:
        for t in TEMPLATES:
            lean, ref = _path(read_header, path, t), _path(pydicom_read, path, t)
            if lean != ref:
                mismatches.append((path.name, t.text, lean, ref))
            elif lean is NotDicomError:
                refused += 1
            else:
                compared += 1
    assert not mismatches, mismatches[:5]
    assert compared >= 3 * 200 and refused == 0, (compared, refused)


def test_the_fast_path_reads_almost_every_file() -> None:
    keywords = TEMPLATES[0].keywords
    tags = wanted_tags([*keywords, *IDENTITY_KEYWORDS])
    fast = 0
    for path in FILES:
        with open(path, "rb") as f:
            head = f.read(HEADER_PREFIX)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ds = _read_fast(f, 0, head, tags, False)
                except NotDicomError:
                    ds = None
        fast += ds is not None
    assert fast >= len(FILES) - 10, (fast, len(FILES))


def test_charset_files_decode_the_same_names() -> None:
    keywords = ("PatientName", "PatientID", "SOPInstanceUID")
    files = [p for p in sorted(CHARSET_FILES.glob("*.dcm")) if p in set(FILES)]
    assert len(files) >= 15
    for path in files:
        lean, ref = read_header(path, keywords), pydicom_read(path, keywords)
        assert str(lean.get("PatientName")) == str(ref.get("PatientName")), path.name
        assert lean.original_character_set == ref.original_character_set, path.name
        for t in TEMPLATES[:1]:
            assert relative_path(lean, t) == relative_path(ref, t), path.name


def test_every_file_is_complete_except_the_truncated_ones() -> None:
    keywords = TEMPLATES[0].keywords
    checked = 0
    for path in FILES:
        outcomes = []
        with open(path, "rb") as f:
            try:
                check_complete(f, read_header(f, keywords))
                outcomes.append(None)
            except TruncatedError as exc:
                outcomes.append(type(exc))
        try:
            read_header(path, keywords, check=True)
            outcomes.append(None)
        except TruncatedError as exc:
            outcomes.append(type(exc))
        expected = TruncatedError if path.name in TRUNCATED else None
        assert outcomes == [expected, expected], path.name
        checked += 1
    assert checked == len(FILES) > 200


def test_keywords_and_tag_numbers_are_accepted() -> None:
    path = get_testdata_file("CT_small.dcm")
    ds = read_header(path, [0x00100020, "PatientName"])
    assert ds.PatientID == pydicom.dcmread(path).PatientID
    assert wanted_tags(["PatientID", 0x00100020]) == (0x00100020,)
    with pytest.raises(ValueError):
        wanted_tags(["NoSuchKeyword"])


def test_dicomdir_and_non_dicom_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NotDicomError, match="DICOMDIR"):
        read_header(get_testdata_file("DICOMDIR"), ["PatientName"])
    for name, data in [("empty", b""), ("text", b"hello\n" * 100), ("jpeg", b"\xff\xd8\xff\xe0" + b"\0" * 200)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(NotDicomError):
            read_header(tmp_path / name, ["PatientName"])


def test_identity_comes_from_the_file_meta_unless_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    path = tmp_path / "no-uid.dcm"
    ds.save_as(path)
    assert read_header(path, ["PatientName"]).SOPInstanceUID == uid
    with pytest.raises(NotDicomError, match="no SOP Instance UID"):
        read_header(path, ["PatientName"], identity_from_meta=False)


def test_a_header_longer_than_the_prefix_and_a_stream_offset(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Long^Header"
    ds.private_block(0x0009, "SORTSCP TEST", create=True).add_new(0x10, "OB", b"\x01" * 3 * HEADER_PREFIX)
    path = tmp_path / "long.dcm"
    ds.save_as(path)
    t = TEMPLATES[0]
    assert relative_path(read_header(path, t.keywords), t) == relative_path(pydicom_read(path, t.keywords), t)
    stream = io.BytesIO(b"JUNK" + path.read_bytes())
    stream.seek(4)
    got = read_header(stream, t.keywords, check=True)
    assert str(got.PatientName) == "Long^Header"


def test_a_dataset_built_from_walker_elements_names_the_file_the_same() -> None:
    path = get_testdata_file("CT_small.dcm")
    t = TEMPLATES[1]
    with open(path, "rb") as f:
        ref = read_header(f, t.keywords)
        offset = 144 + ref.file_meta.FileMetaInformationGroupLength
        w = walk_file(f, offset, implicit=False, little=True,
                      wanted=wanted_tags([*t.keywords, *IDENTITY_KEYWORDS]))
    ds = dataset_from_elements(w.elements, False, True, file_meta=ref.file_meta)
    assert relative_path(ds, t) == relative_path(ref, t)


def test_a_deflated_bomb_header_reads_in_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc
    import zlib

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    plain = io.BytesIO()
    ds.save_as(plain, enforce_file_format=True)
    plain = plain.getvalue()[144 + ds.file_meta.FileMetaInformationGroupLength :]
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    del ds.file_meta.FileMetaInformationGroupLength
    body = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(body, ds.file_meta)
    meta = body.getvalue()
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [z.compress(plain + b"\xe0\x7f\x10\x00OB\0\0" + (256 << 20).to_bytes(4, "little"))]
    zeros = bytes(1 << 20)
    parts += [z.compress(zeros) for _ in range(256)] + [z.flush()]
    path = tmp_path / "bomb.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + meta + b"".join(parts))
    tracemalloc.start()
    try:
        got = read_header(path, TEMPLATES[0].keywords, check=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert str(got.PatientName) == str(ds.PatientName)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(TruncatedError, match="deflate"):
        read_header(path, TEMPLATES[0].keywords, check=True)

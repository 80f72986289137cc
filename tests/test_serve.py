"""``sortscp serve``: real associations from pynetdicom's SCU to a real server on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import pydicom
import pytest

from scp import IMPLEMENTATION_CLASS_UID
from scp.net.status import CANNOT_UNDERSTAND, DATA_SET_MISMATCH, OUT_OF_RESOURCES, SUCCESS
from scp.store.tmp import TMP_DIRNAME

from conftest import CUT_SHORT, names_its_instance, readable_dicom_files, storable_dicom_files
from serve_helpers import (
    CALLING_AET,
    dataset_bytes,
    expected_path,
    file_identity,
    layout_files,
    running_server,
    send_files,
)

ALL_FILES = readable_dicom_files()
FILES = storable_dicom_files()
MISMATCHED = [f for f in ALL_FILES if f.name not in CUT_SHORT and not names_its_instance(f)]


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


UMASK = os.umask(0o022)
os.umask(UMASK)


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
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode == 0o666 & ~UMASK, f"{source.name}: mode {mode:o}, readable by other users?"


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


def test_file_whose_meta_names_another_instance_is_refused(tmp_path: Path, caplog) -> None:
    """Its command (UIDs from the File Meta) and its dataset disagree on the
    instance: refused as DCMTK's storescp does (0xA900), nothing filed, one log
    line with the reason; the sender learns of it instead of a misnamed file."""
    assert MISMATCHED, "pydicom's test files include some whose File Meta disagrees with the dataset"
    out = tmp_path / "out"
    with running_server(out) as server:
        statuses = send_files(server.address[1], MISMATCHED)
    assert {f.name: s for f, s in statuses.items()} == {f.name: DATA_SET_MISMATCH for f in MISMATCHED}
    assert layout_files(out) == []
    lines = [r.getMessage() for r in caplog.records if "0xA900" in r.getMessage()]
    assert len(lines) == len(MISMATCHED), lines  # one line per refused instance
    for f in MISMATCHED:
        uid = file_identity(f)[1]
        assert any(uid in line and "is not the command's" in line for line in lines), (f.name, lines)


def test_test_file_that_is_cut_short_is_refused(tmp_path: Path, caplog) -> None:
    cut = [f for f in ALL_FILES if f.name in CUT_SHORT]
    assert len(cut) == len(CUT_SHORT)
    out = tmp_path / "out"
    with running_server(out) as server:
        statuses = send_files(server.address[1], cut)
    assert {f.name: s for f, s in statuses.items()} == {f.name: CANNOT_UNDERSTAND for f in cut}
    assert layout_files(out) == []
    lines = [r.getMessage() for r in caplog.records if "0xC000" in r.getMessage()]
    assert len(lines) == len(cut) and all(re.search(r"declares|cut|delimiter|ends", line) for line in lines), lines


# --- duplicates ----------------------------------------------------------------


def _variant(src: Path, dst: Path, **changes: str) -> Path:
    """A copy of `src` with some header values changed (same SOPInstanceUID)."""
    ds = pydicom.dcmread(src)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture
def ct_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two files with the same SOPInstanceUID and path but different bytes."""
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("CT_small.dcm"))
    return (
        _variant(src, tmp_path / "first.dcm", StudyDescription="first"),
        _variant(src, tmp_path / "second.dcm", StudyDescription="second"),
    )


def test_duplicate_replaces_by_default(tmp_path: Path, ct_pair) -> None:
    first, second = ct_pair
    out = tmp_path / "out"
    with running_server(out) as server:
        assert send_files(server.address[1], [first]) == {first: SUCCESS}
        assert send_files(server.address[1], [second]) == {second: SUCCESS}
    assert layout_files(out) == [out / expected_path(first)]
    assert_stored(out, second)
    assert not list((out / TMP_DIRNAME).iterdir()), "temporary files left behind"


def test_duplicate_keep_leaves_the_first(tmp_path: Path, ct_pair) -> None:
    from scp.enums import Duplicate

    first, second = ct_pair
    out = tmp_path / "out"
    with running_server(out, on_duplicate=Duplicate.KEEP) as server:
        assert send_files(server.address[1], [first]) == {first: SUCCESS}
        assert send_files(server.address[1], [second]) == {second: SUCCESS}
    assert layout_files(out) == [out / expected_path(first)]
    assert_stored(out, first)


def test_identical_duplicate_is_a_no_op(tmp_path: Path, ct_pair) -> None:
    first, _ = ct_pair
    out = tmp_path / "out"
    with running_server(out) as server:
        assert send_files(server.address[1], [first]) == {first: SUCCESS}
        target = out / expected_path(first)
        inode = target.stat().st_ino
        assert send_files(server.address[1], [first]) == {first: SUCCESS}
    assert layout_files(out) == [target]
    assert target.stat().st_ino == inode, "identical bytes must not rewrite the file"
    assert_stored(out, first)


# --- SOP classes ---------------------------------------------------------------

PRIVATE_SOP_CLASS = "1.3.6.1.4.1.9590.100.1.2.424242"
#: Retired: Ultrasound Image Storage (Retired), Nuclear Medicine Image Storage (Retired).
RETIRED_SOP_CLASSES = ["1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.5"]


@pytest.mark.parametrize("sop_class", [PRIVATE_SOP_CLASS, *RETIRED_SOP_CLASSES])
def test_private_and_retired_sop_classes_are_stored(tmp_path: Path, sop_class: str) -> None:
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("MR_small.dcm"))
    ds = pydicom.dcmread(src)
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.save_as(tmp_path / "private.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    with running_server(out) as server:
        statuses = send_files(server.address[1], [tmp_path / "private.dcm"])
    assert list(statuses.values()) == [SUCCESS]
    assert_stored(out, tmp_path / "private.dcm")


#: Storage classes that pynetdicom's own unrestricted storage refuses (named in
#: ``pynetdicom.sop_class``, missing from its list of storage classes).
OTHER_STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.38.1": "Hanging Protocol Storage",
    "1.2.840.10008.5.1.4.39.1": "Color Palette Storage",
    "1.2.840.10008.5.1.4.43.1": "Generic Implant Template Storage",
    "1.2.840.10008.5.1.4.1.1.200.1": "CT Defined Procedure Protocol Storage",
    "1.2.840.10008.5.1.4.1.1.201.1": "Inventory Storage",
}
#: Services sortscp does not provide: pynetdicom's unrestricted storage accepted
#: the first four (its keyword differs from pydicom's), then failed their C-FIND.
NOT_STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.31": "Modality Worklist FIND",
    "1.2.840.10008.5.1.4.32.1": "General Purpose Worklist FIND",
    "1.2.840.10008.5.1.4.39.2": "Color Palette FIND",
    "1.2.840.10008.5.1.4.2": "Storage Management",
    "1.2.840.10008.5.1.4.1.2.2.1": "Study Root FIND",
    "1.2.840.10008.5.1.4.1.2.2.2": "Study Root MOVE",
    "1.2.840.10008.5.1.4.1.2.2.3": "Study Root GET",
    "1.2.840.10008.3.1.2.3.3": "Modality Performed Procedure Step",
    "1.2.840.10008.1.20.1": "Storage Commitment Push Model",
    "1.2.840.10008.1.3.10": "Media Storage Directory Storage (DICOMDIR)",
    "1.2.840.10008.1.2.1": "a transfer syntax, not a SOP class",
}


def test_only_storage_and_verification_contexts_are_accepted(tmp_path: Path, caplog) -> None:
    """A modality that asks one node for worklist, storage and commitment at once
    is told which it gets: every storage class (those pynetdicom's unrestricted
    storage misses too), Verification, nothing else; an instance of such a class
    is then stored."""
    from pydicom.data import get_testdata_file
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

    proposed = [CTImageStorage, Verification, PRIVATE_SOP_CLASS, *OTHER_STORAGE_CLASSES, *NOT_STORAGE_CLASSES]
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    src.SOPClassUID = src.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.38.1"
    out = tmp_path / "out"
    with running_server(out) as server:
        ae = AE(ae_title=CALLING_AET)
        for uid in proposed:
            ae.add_requested_context(uid, src.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", server.address[1], ae_title="SORTSCP")
        assert assoc.is_established
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
            status = assoc.send_c_store(src).Status
        finally:
            assoc.release()
    assert accepted == {CTImageStorage, Verification, PRIVATE_SOP_CLASS, *OTHER_STORAGE_CLASSES}
    assert rejected == dict.fromkeys(NOT_STORAGE_CLASSES, 0x03)  # abstract syntax not supported
    assert status == SUCCESS
    stored = layout_files(out)
    assert len(stored) == 1 and stored[0].name == f"{src.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(stored[0]).SOPClassUID == "1.2.840.10008.5.1.4.38.1"
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


# --- failures ------------------------------------------------------------------


def test_unwritable_folder_fails_with_out_of_resources_and_serving_goes_on(
    tmp_path: Path,
) -> None:
    from pydicom.data import get_testdata_file

    blocked = Path(get_testdata_file("CT_small.dcm"))
    other = Path(get_testdata_file("MR_small.dcm"))
    out = tmp_path / "out"
    with running_server(out) as server:
        patient_folder = out / expected_path(blocked).parts[0]
        patient_folder.write_bytes(b"a regular file where a folder is needed")
        assert send_files(server.address[1], [blocked]) == {blocked: OUT_OF_RESOURCES}
        assert send_files(server.address[1], [other]) == {other: SUCCESS}
        assert server.handlers.failed == 1
    assert_stored(out, other)
    assert patient_folder.read_bytes().startswith(b"a regular file")
    assert not list((out / TMP_DIRNAME).iterdir()), "temporary files left behind"


def test_removed_output_folder_is_made_again_for_the_next_association(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    ct = Path(get_testdata_file("CT_small.dcm"))
    mr = Path(get_testdata_file("MR_small.dcm"))
    out = tmp_path / "out"
    with running_server(out) as server:
        assert send_files(server.address[1], [ct]) == {ct: SUCCESS}
        shutil.rmtree(out)
        assert send_files(server.address[1], [mr]) == {mr: SUCCESS}
    assert layout_files(out) == [out / expected_path(mr)]
    assert_stored(out, mr)


def _with_dataset(src: Path, dst: Path, data: bytes) -> Path:
    """`src`'s preamble and File Meta followed by `data` as the dataset."""
    head = src.read_bytes()[: src.stat().st_size - len(dataset_bytes(src))]
    dst.write_bytes(head + data)
    return dst


def _garbage(data: bytes) -> bytes:
    return bytes(range(256)) * 8


def _cut_in_first_value(data: bytes) -> bytes:
    # explicit VR LE: (0008,0005) CS len ... ; keep the tag and a huge length, no value
    return b"\x08\x00\x05\x00CS\x40\x00ISO"


def _cut_before_instance_uid(data: bytes) -> bytes:
    # inside the value of the element before (0008,0018) SOP Instance UID
    return data[: data.index(b"\x08\x00\x18\x00UI") - 5]


@pytest.mark.parametrize("damage", [_garbage, _cut_in_first_value, _cut_before_instance_uid])
def test_unreadable_header_fails_with_cannot_understand(tmp_path: Path, damage) -> None:
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("CT_small.dcm"))
    broken = _with_dataset(src, tmp_path / "broken.dcm", damage(dataset_bytes(src)))
    good = Path(get_testdata_file("MR_small.dcm"))
    out = tmp_path / "out"
    with running_server(out) as server:
        status = send_files(server.address[1], [broken])[broken]
        assert status == CANNOT_UNDERSTAND, hex(status)
        assert send_files(server.address[1], [good]) == {good: SUCCESS}
    assert layout_files(out) == [out / expected_path(good)]
    assert not list((out / TMP_DIRNAME).iterdir()), "temporary files left behind"

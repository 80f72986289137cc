"""sort names a file from the raw header values (no pydicom dataset) exactly as
from pydicom's conversion of them: for every bundled file and several templates,
and for generated values of every string VR, character set and format spec."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from scp import _datadict
from scp.dicom.header import dataset_from_elements, read_header
from scp.dicom.raw import HEADER_PREFIX, IDENTITY_KEYWORDS, read_file_start, read_raw, wanted_tags
from scp.errors import NotDicomError
from scp.layout import DEFAULT_TEMPLATE, Template, relative_path, relative_path_raw
from scp.sort_jobs import _sort_name

from conftest import REPO, cli_env, readable_dicom_files

TEMPLATES = [
    Template.parse(DEFAULT_TEMPLATE),
    Template.parse("{StudyDate}/{Modality}_{SeriesNumber:04}/{AccessionNumber}_{SOPInstanceUID}.dcm"),
    Template.parse("{PatientName:.6}_{PatientID:>12}/{InstanceNumber:x<4}_{SliceThickness:.1f}_"
                   "{StudyTime}/{ReferringPhysicianName}_{SOPInstanceUID}.dcm"),
]
FILES = readable_dicom_files()


def _reference(path: Path, t: Template) -> str | type:
    """What sort named a file before: read_header(check=True), then relative_path."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return str(relative_path(read_header(f, t.keywords, check=True), t))
    except NotDicomError as exc:
        return type(exc)


def _sorted_name(path: Path, t: Template) -> str | type:
    fd = os.open(path, os.O_RDONLY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return str(_sort_name(fd, os.fstat(fd), t))
    except NotDicomError as exc:
        return type(exc)
    finally:
        os.close(fd)


def test_sort_names_every_bundled_file_as_the_pydicom_read_does() -> None:
    mismatches, raw_named = [], 0
    for path in FILES:
        for t in TEMPLATES:
            ours, ref = _sorted_name(path, t), _reference(path, t)
            if ours != ref:
                mismatches.append((path.name, t.text, ours, ref))
            with open(path, "rb") as f:
                head = f.read(HEADER_PREFIX)
                try:
                    raw = read_raw(f, 0, head, wanted_tags([*t.keywords, *IDENTITY_KEYWORDS]), True)
                except Exception:
                    raw = None
            raw_named += raw is not None and relative_path_raw(raw.elements, t) is not None
    assert not mismatches, mismatches[:5]
    # most files take the raw path (the others: other character sets, VR switches ...)
    assert raw_named >= 0.6 * len(FILES) * len(TEMPLATES), (raw_named, len(FILES))


#: A keyword of each string VR (and its tag's VR in the dictionary).
KEYWORDS = {
    "PN": "PatientName", "LO": "PatientID", "SH": "StationName", "CS": "Modality",
    "UI": "StudyInstanceUID", "IS": "SeriesNumber", "DS": "SliceThickness", "DA": "StudyDate",
    "TM": "StudyTime", "DT": "AcquisitionDateTime", "AS": "PatientAge", "AE": "RetrieveAETitle",
    "ST": "InstitutionAddress", "LT": "AdditionalPatientHistory", "UT": "PixelDataProviderURL",
}
ALPHABET = [b" ", b" ", b"\0", b"\\", b"^", b"=", b"0", b"7", b"1", b"A", b"z", b".", b"+", b"-",
            b"e", b"/", b"_", b"\t", b"\xe9", b"~", b"9", b"5"]
SPECS = ["", "", "04", ".3", ">6", "x<5", "+", ",", "e", ".1f", "X"]
CHARSETS = [None, b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 87", b"", b"ISO_IR 13"]


def _value(rng: random.Random, vr: str) -> bytes:
    if rng.random() < (0.6 if vr in ("IS", "DS") else 0.25):  # numbers, the common case for IS/DS
        return rng.choice([b"1", b"0012 ", b" -3", b"+5", b"1.50", b".5", b"1e3", b"2\\3",
                           b"12345678901234567", b"1_0", b"7 \\ ", b"4.0"])
    return b"".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 9)))


def test_raw_values_render_as_pydicom_converts_them() -> None:
    rng = random.Random(20261201)
    compared: dict[str, int] = dict.fromkeys(KEYWORDS, 0)
    mismatches = []
    for _ in range(4000):
        vr = rng.choice(list(KEYWORDS))
        keyword = KEYWORDS[vr]
        spec = rng.choice(SPECS)
        t = Template.parse(f"{{{keyword}{':' + spec if spec else ''}}}/{{SOPInstanceUID}}.dcm")
        implicit = rng.random() < 0.3
        tag = _datadict.tag_for_keyword(keyword)
        assert tag is not None
        elements: dict[int, tuple[str | None, bytes]] = {
            tag: (None if implicit else vr, _value(rng, vr)),
            0x00080018: (None if implicit else "UI", b"1.2.3\0"),
        }
        charset = rng.choice(CHARSETS)
        if charset is not None:
            elements[0x00080005] = (None if implicit else "CS", charset)
        ours = relative_path_raw(elements, t)
        if ours is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = relative_path(dataset_from_elements(elements, implicit, True), t)
        compared[vr] += 1
        if ours != ref:
            mismatches.append((vr, spec, implicit, charset, elements[tag][1], str(ours), str(ref)))
    assert not mismatches, mismatches[:5]
    assert min(compared.values()) >= 50, compared  # every VR takes the raw path often


def test_the_dictionary_is_pydicoms() -> None:
    from pydicom import datadict

    for tag, entry in list(datadict.DicomDictionary.items())[::7]:
        keyword = entry[4]
        assert _datadict.tag_for_keyword(keyword) == datadict.tag_for_keyword(keyword)
        assert _datadict.keyword_for_tag(tag) == datadict.keyword_for_tag(tag)
        assert _datadict.dictionary_vr(tag) == datadict.dictionary_VR(tag)
    assert _datadict.keyword_for_tag(0x60003000) == "OverlayData"  # a repeating group: pydicom's
    assert _datadict.tag_for_keyword("NotAKeyword") is None


@pytest.mark.parametrize("filler", [HEADER_PREFIX - 700, HEADER_PREFIX, 3 * HEADER_PREFIX])
@pytest.mark.parametrize("cut", [False, True])
def test_a_header_longer_than_the_prefix_is_named_the_same(
    tmp_path: Path, filler: int, cut: bool
) -> None:
    """Past the first pread, the rest of the header is read from the file (or
    found missing), as read_header does."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Long^Header"
    ds.private_block(0x0009, "SORTSCP TEST", create=True).add_new(0x10, "OB", b"\x01" * filler)
    path = tmp_path / "long.dcm"
    ds.save_as(path)
    if cut:
        path.write_bytes(path.read_bytes()[: HEADER_PREFIX + 100])
    t = Template.parse(DEFAULT_TEMPLATE)
    ours = _sorted_name(path, t)
    assert ours == _reference(path, t)
    if not cut:
        assert isinstance(ours, str) and ours.startswith("Long^Header_")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_file_start(fd, os.fstat(fd).st_size) == path.read_bytes()[:HEADER_PREFIX]
    finally:
        os.close(fd)


def test_sort_of_ordinary_files_never_imports_pydicom(tmp_path: Path) -> None:
    """The start-up promise: a sort of plain files names them without pydicom."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.dcm").write_bytes(next(p for p in FILES if p.name == "CT_small.dcm").read_bytes())
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from scp.config import SortConfig\n"
        "from scp.sort import sort_tree\n"
        f"r = sort_tree(SortConfig(src=Path({str(src)!r}), dst=Path({str(tmp_path / 'dst')!r}), workers=1))\n"
        "assert r.exit_code == 0, r.summary()\n"
        "print('pydicom' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=cli_env(), cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout
    assert len(list((tmp_path / "dst").rglob("*.dcm"))) == 1


@pytest.mark.parametrize("charset", [b"ISO_IR 100", b"ISO 2022 IR 87"])
def test_a_value_that_is_not_plain_ascii_goes_to_pydicom(charset: bytes) -> None:
    t = Template.parse(DEFAULT_TEMPLATE)
    elements: dict[int, tuple[str | None, bytes]] = {
        0x00080005: ("CS", charset), 0x00100010: ("PN", b"M\xfcller^Hans"),
        0x00080018: ("UI", b"1.2.3"),
    }
    assert relative_path_raw(elements, t) is None

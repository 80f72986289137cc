"""The layout engine: template parsing, value rendering, sanitizing, and the
guarantee that every path stays inside the destination, whatever the header holds."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path, PurePosixPath

import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from scp.dicom.header import read_header
from scp.errors import TemplateError
from scp.layout import (
    DEFAULT_TEMPLATE,
    MAX_COMPONENT_BYTES,
    PLACEHOLDER,
    UID_CHARS,
    UNSAFE_CHARS,
    Template,
    relative_path,
    render_value,
    sanitize_component,
    split_extension,
)

from conftest import CHARSET_FILES, run_cli

DEFAULT = Template.parse(DEFAULT_TEMPLATE)
UID = "1.2.826.0.1.3680043.8.498.1"


def dataset(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def assert_safe_component(name: str) -> None:
    """What every path component must satisfy, on Linux, macOS and Windows."""
    assert name, "empty component"
    assert name not in (".", ".."), name
    assert not name.startswith("."), name
    assert not name.endswith((".", " ")), name
    assert len(name.encode("utf-8")) <= MAX_COMPONENT_BYTES, (len(name.encode()), name)
    assert not set(name) & UNSAFE_CHARS, name
    assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in name), ascii(name)
    assert not any(c.isspace() for c in name), ascii(name)
    assert name.split(".")[0].upper() not in ("CON", "PRN", "AUX", "NUL", "COM1", "LPT1")


# --- sanitize_component ------------------------------------------------------

SANITIZE_CASES = [
    # (raw text, expected component)
    ("Doe^John", "Doe^John"),
    ("Head First", "Head_First"),
    ("tab\there", "tab_here"),
    ("new\nline\r", "new_line_"),
    ("two  spaces", "two__spaces"),
    ("\u00a0nbsp\u3000ideographic", "_nbsp_ideographic"),
    ("a/b", "a_b"),
    ("a\\b", "a_b"),
    ("C:", "C_"),
    ("what?*", "what__"),
    ('say "hi"', "say__hi_"),
    ("<tag>", "_tag_"),
    ("pipe|d", "pipe_d"),
    ("nul\x00byte", "nul_byte"),
    ("bell\x07esc\x1bdel\x7f", "bell_esc_del_"),
    ("", PLACEHOLDER),
    (".", "_"),
    ("..", "__"),
    ("...", "_._"),
    ("../../etc/passwd", "_._.._etc_passwd"),
    (".hidden", "_hidden"),
    ("trailing.", "trailing_"),
    ("trailing ", "trailing_"),
    ("CON", "_CON"),
    ("con", "_con"),
    ("nul.dcm", "_nul.dcm"),
    ("COM1", "_COM1"),
    ("LPT9.txt", "_LPT9.txt"),
    ("CONIN$", "_CONIN$"),
    ("CONSOLE", "CONSOLE"),
    ("COM10", "COM10"),
    ("Jérôme", "Jérôme"),
    ("e\u0301", "\u00e9"),  # NFC: one character, as macOS and Linux will agree on
    ("김희중", "김희중"),
]


@pytest.mark.parametrize(("raw", "expected"), SANITIZE_CASES)
def test_sanitize_component(raw: str, expected: str) -> None:
    got = sanitize_component(raw)
    assert got == expected
    assert_safe_component(got)


LONG_CASES = [
    ("ascii", "x" * 300),
    ("two-byte", "é" * 200),
    ("three-byte", "山" * 120),
    ("four-byte", "\U0001f600" * 80),
    ("mixed", "a山é\U0001f600" * 40),
    ("just over", "y" * (MAX_COMPONENT_BYTES + 1)),
]


@pytest.mark.parametrize(("label", "text"), LONG_CASES, ids=[c[0] for c in LONG_CASES])
def test_long_component_is_cut_on_a_character_and_stays_unique(label: str, text: str) -> None:
    a = sanitize_component(text)
    b = sanitize_component(text + "z")  # same first 255 bytes, different value
    for name in (a, b):
        assert_safe_component(name)
        # a prefix of the original (cut between characters), then ~hash
        prefix = name.rsplit("~", 1)[0]
        assert text.startswith(prefix) and prefix, (label, name)
    assert a != b


def test_long_component_keeps_its_extension() -> None:
    name = sanitize_component("1." * 200 + "dcm")
    assert name.endswith(".dcm")
    assert len(name.encode("utf-8")) <= MAX_COMPONENT_BYTES
    assert sanitize_component("1." * 200 + "dcm") == name  # deterministic
    assert sanitize_component("2." * 200 + "dcm") != name


def test_component_of_exactly_255_bytes_is_kept() -> None:
    text = "a" * 253 + "é"
    assert len(text.encode()) == MAX_COMPONENT_BYTES
    assert sanitize_component(text) == text


# --- render_value ------------------------------------------------------------

RENDER_CASES = [
    # (dataset values, keyword, spec, expected)
    ({"PatientName": "Doe^John^^^"}, "PatientName", "", "Doe^John"),
    ({"PatientName": "Doe^John^^^=^^"}, "PatientName", "", "Doe^John"),
    ({"PatientName": " Doe ^John "}, "PatientName", "", "Doe ^John"),
    ({"PatientName": "Yamada^Tarou=山田^太郎"}, "PatientName", "", "Yamada^Tarou=山田^太郎"),
    ({"PatientName": ""}, "PatientName", "", PLACEHOLDER),
    ({"PatientName": None}, "PatientName", "", PLACEHOLDER),
    ({}, "PatientName", "", PLACEHOLDER),
    ({"PatientID": "  "}, "PatientID", "", PLACEHOLDER),
    ({"SeriesNumber": 7}, "SeriesNumber", "04", "0007"),
    ({"SeriesNumber": "7"}, "SeriesNumber", "04", "0007"),
    ({"SeriesNumber": "12"}, "SeriesNumber", "0>5", "00012"),
    ({"SeriesNumber": "12"}, "SeriesNumber", ">5", "12"),  # padding spaces are trimmed
    ({"SeriesNumber": None}, "SeriesNumber", "04", PLACEHOLDER),
    ({"SliceThickness": "2.5"}, "SliceThickness", ".2f", "2.50"),
    ({"StudyDate": "20240131"}, "StudyDate", "", "20240131"),
    ({"SeriesDescription": "abc"}, "SeriesDescription", ".2", "ab"),
    ({"SeriesDescription": "not a number"}, "SeriesDescription", "04", "not a number"),
    ({"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}, "ImageType", "", "ORIGINAL-PRIMARY-AXIAL"),
    ({"ImageType": ["ORIGINAL", "", "AXIAL"]}, "ImageType", "", "ORIGINAL-AXIAL"),
    ({"PatientName": ["Doe^John", "Roe^Jane^^"]}, "PatientName", "", "Doe^John-Roe^Jane"),
]


@pytest.mark.parametrize(("values", "keyword", "spec", "expected"), RENDER_CASES)
def test_render_value(values: dict, keyword: str, spec: str, expected: str) -> None:
    assert render_value(dataset(**values), keyword, spec) == expected


def test_missing_values_still_give_a_full_path() -> None:
    rel = relative_path(Dataset(), DEFAULT)
    assert rel == PurePosixPath("UNKNOWN_UNKNOWN/UNKNOWN_UNKNOWN/UNKNOWN.dcm")


def test_default_layout() -> None:
    ds = dataset(
        PatientName="Doe^John", PatientID="ID 1", SeriesDescription="T1 axial / post",
        SeriesNumber=3, SOPInstanceUID=UID,
    )
    assert relative_path(ds, DEFAULT) == PurePosixPath(
        f"Doe^John_ID_1/T1_axial___post_3/{UID}.dcm"
    )


def test_format_spec_in_template() -> None:
    t = Template.parse("{PatientID}/{SeriesNumber:04}_{Modality}/{SOPInstanceUID}.dcm")
    ds = dataset(PatientID="P", SeriesNumber="5", Modality="MR", SOPInstanceUID=UID)
    assert relative_path(ds, t) == PurePosixPath(f"P/0005_MR/{UID}.dcm")
    assert t.keywords == ("PatientID", "SeriesNumber", "Modality", "SOPInstanceUID")


def test_literal_text_in_template_is_sanitized_too() -> None:
    t = Template.parse("in box: {PatientID}/{SOPInstanceUID}.dcm")
    assert relative_path(dataset(PatientID="1", SOPInstanceUID=UID), t).parts[0] == "in_box__1"


# --- template errors ---------------------------------------------------------

BAD_TEMPLATES = [
    ("", "empty"),
    ("   ", "empty"),
    ("{PatientNme}/{SOPInstanceUID}.dcm", "unknown DICOM keyword 'PatientNme'"),
    ("{patientname}/{SOPInstanceUID}.dcm", "unknown DICOM keyword"),
    ("{PatientName.family_name}/{SOPInstanceUID}.dcm", "unknown DICOM keyword"),
    ("{0}/{SOPInstanceUID}.dcm", "unknown DICOM keyword"),
    ("{}/{SOPInstanceUID}.dcm", "empty '{}'"),
    ("{PatientName/{SOPInstanceUID}.dcm", "malformed"),
    ("PatientName}/{SOPInstanceUID}.dcm", "malformed"),
    ("{PatientName!r}/{SOPInstanceUID}.dcm", "conversions"),
    ("{PatientName}//{SOPInstanceUID}.dcm", "empty path component"),
    ("{PatientName}/", "empty path component"),
    ("/{PatientName}/{SOPInstanceUID}.dcm", "relative"),
    ("{PatientName}/../{SOPInstanceUID}.dcm", "'..'"),
    ("./{SOPInstanceUID}.dcm", "'.'"),
    ("{PatientName}/{SeriesNumber}.dcm", "{SOPInstanceUID}"),
    ("{SOPInstanceUID}/{PatientName}.dcm", "{SOPInstanceUID}"),
    ("{ReferencedImageSequence}/{SOPInstanceUID}.dcm", "sequence"),
    ("{SeriesNumber:zz}/{SOPInstanceUID}.dcm", "invalid format spec"),
    ("{SeriesNumber:{PatientID}}/{SOPInstanceUID}.dcm", "nested"),
]


@pytest.mark.parametrize(("text", "message"), BAD_TEMPLATES)
def test_bad_template_is_a_template_error(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=None) as info:
        Template.parse(text)
    assert message.lower() in str(info.value).lower()


@pytest.mark.parametrize(
    ("text", "message"),
    [BAD_TEMPLATES[2], BAD_TEMPLATES[7], BAD_TEMPLATES[12], BAD_TEMPLATES[15], BAD_TEMPLATES[17]],
)
def test_bad_template_is_a_usage_error_before_anything_is_touched(
    tmp_path: Path, text: str, message: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.dcm").write_bytes((CHARSET_FILES / "chrFren.dcm").read_bytes())
    dst = tmp_path / "dst"
    report = tmp_path / "report.csv"
    r = run_cli("sort", src, dst, "--template", text, "--report", report)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "template" in out.lower() and message.lower() in " ".join(out.lower().split()), out
    assert not dst.exists() and not report.exists(), out
    assert sorted(os.listdir(src)) == ["a.dcm"]


# --- property-based: whatever the header holds, the path stays inside -----------

FIELDS = ("PatientName", "PatientID", "SeriesDescription", "SeriesNumber", "SOPInstanceUID")
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)
HOSTILE = st.sampled_from(
    ["", ".", "..", "../..", "/", "/etc/passwd", "\\..\\", "\x00", " ", "CON", ".sortscp-tmp",
     "a" * 400, "山" * 100 + "/..", "~", "-", "*", "\ud800"]
)
VALUES = st.one_of(ANY_TEXT, HOSTILE, st.lists(st.one_of(ANY_TEXT, HOSTILE), max_size=3).map("/".join))


def raw_dataset(values: dict[str, str]) -> Dataset:
    """A dataset as read from a file: raw (undecoded, unvalidated) UTF-8 values
    with their dictionary VRs, decoded only when the layout asks for them."""
    ds = Dataset()
    ds.add_new("SpecificCharacterSet", "CS", "ISO_IR 192")
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        raw = value.encode("utf-8", "surrogatepass")
        ds[tag] = RawDataElement(
            Tag(tag), dictionary_VR(tag), len(raw), raw, 0, False, True
        )
    return ds


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({k: VALUES for k in FIELDS}))
def test_any_header_values_give_a_safe_relative_path(values: dict) -> None:
    ds = raw_dataset(values)
    rel = relative_path(ds, DEFAULT)
    assert not rel.is_absolute()
    assert len(rel.parts) == 3
    for part in rel.parts:
        assert_safe_component(part)
        assert part not in ("", ".", "..") and "/" not in part
    root = Path("/srv/dst")
    assert (root / rel).resolve().is_relative_to(root.resolve())
    assert rel.name.endswith(".dcm")


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT)
def test_any_text_gives_a_safe_component(text: str) -> None:
    assert_safe_component(sanitize_component(text))


@settings(max_examples=100, deadline=None)
@given(st.lists(ANY_TEXT.filter(bool), min_size=2, max_size=2, unique=True))
def test_values_that_differ_only_past_255_bytes_differ(pair: list[str]) -> None:
    assume(sanitize_component(pair[0]) != sanitize_component(pair[1]))
    a, b = ("x" * 300 + pair[0]), ("x" * 300 + pair[1])
    assert sanitize_component(a) != sanitize_component(b)


@pytest.mark.filterwarnings("ignore")
def test_resolved_destination_stays_inside_a_real_root(tmp_path: Path) -> None:
    """Also with a real folder on disk, symlinks resolved."""
    ds = Dataset()
    ds.add_new("PatientName", "PN", "../../../../../../tmp/x")
    ds.add_new("PatientID", "LO", "/..")
    ds.add_new("SeriesDescription", "LO", "..")
    ds.add_new("SOPInstanceUID", "UI", "../..")
    rel = relative_path(ds, DEFAULT)
    assert (tmp_path / rel).resolve().is_relative_to(tmp_path.resolve()), rel


# --- character sets ----------------------------------------------------------

def _charset_files_with_names() -> list[Path]:
    files = []
    for path in sorted(CHARSET_FILES.glob("*.dcm")):
        if pydicom.dcmread(path, stop_before_pixels=True).get("PatientName"):
            files.append(path)
    return files


CHARSET_WITH_NAMES = _charset_files_with_names()


def test_charset_files_cover_the_scripts() -> None:
    names = {p.name for p in CHARSET_WITH_NAMES}
    for expected in ("chrKoreanMulti.dcm", "chrJapMulti.dcm", "chrX1.dcm", "chrGreek.dcm",
                     "chrRuss.dcm", "chrHbrw.dcm", "chrArab.dcm"):
        assert expected in names


@pytest.mark.parametrize("path", CHARSET_WITH_NAMES, ids=lambda p: p.name)
def test_charset_names_decode_into_the_patient_folder(path: Path) -> None:
    expected = str(pydicom.dcmread(path).PatientName)
    expected = "=".join(g.rstrip("^").strip() for g in expected.split("=")).rstrip("=")
    expected = unicodedata.normalize("NFC", "_".join(expected.split()))
    ds = read_header(path, DEFAULT.keywords)  # what sort and serve both read
    folder = relative_path(ds, DEFAULT).parts[0]
    assert expected in folder, (folder, expected)
    assert any(ord(c) > 127 for c in folder) or path.name in ("chrI2.dcm",), folder


@pytest.mark.parametrize("text", ["{PatientID}/{SOPInstanceUID:.6}.dcm",
                                  "{PatientID}/{InstanceNumber}{SOPInstanceUID}.dcm",
                                  "{PatientID}/{SOPInstanceUID}{InstanceNumber}.dcm"])
def test_a_file_name_that_could_give_two_instances_one_name_is_refused(text):
    """Found by an independent attack: with {SOPInstanceUID:.6}, serve filed
    1.2.3.4.5.1 and 1.2.3.4.5.2 at one name, the second replacing the first."""
    with pytest.raises(TemplateError, match="whole"):
        Template.parse(text)


def test_a_file_name_with_the_uid_whole_beside_a_literal_is_accepted():
    assert Template.parse("{PatientID}/{InstanceNumber:04}_{SOPInstanceUID}.dcm").keywords == (
        "PatientID", "InstanceNumber", "SOPInstanceUID")


@pytest.mark.parametrize("text", [
    "{PatientID}/{SOPInstanceUID}-{AccessionNumber}.dcm",
    "{PatientID}/{SOPInstanceUID}.{AccessionNumber}.dcm",
    "{PatientID}/{AccessionNumber}-{SOPInstanceUID}.dcm",
    "{PatientID}/{SOPInstanceUID}1{InstanceNumber}",
    "{PatientID}/{AccessionNumber}_{SOPInstanceUID}-{InstanceNumber}.dcm",
    # fields on both sides: a value may hold the delimiter ("A B" is "A_B")
    "{AccessionNumber}_{SOPInstanceUID}_{StudyID}.dcm",
    # the Kelvin sign is K once the name is normalized (NFC): a letter of a UID
    "{PatientID}/{SOPInstanceUID}\u212a{AccessionNumber}.dcm",
])
def test_a_file_name_whose_uid_a_neighbour_could_run_into_is_refused(text):
    """Found by an independent attack: with ``{SOPInstanceUID}-{AccessionNumber}.dcm``,
    UID 1.2.3 with accession 4-A and UID 1.2.3-4 with accession A were both
    1.2.3-4-A.dcm; serve answered Success to both, and the second replaced the
    first. A UID holds letters, digits, '.' and '-' (serve refuses any other)."""
    with pytest.raises(TemplateError, match="no UID holds"):
        Template.parse(text)


@pytest.mark.parametrize("text", [
    "{PatientID}/{SOPInstanceUID}_{AccessionNumber}.dcm",
    "{PatientID}/{AccessionNumber} {SOPInstanceUID}.dcm",
    "{PatientID}/IM-{SOPInstanceUID}.dcm",  # literals alone around it: nothing can run into it
    "{PatientID}/{SOPInstanceUID}",
])
def test_a_file_name_whose_uid_is_delimited_is_accepted(text):
    assert "SOPInstanceUID" in Template.parse(text).keywords


def test_two_instances_never_share_a_name_under_any_accepted_delimiter():
    """The rule's promise, checked on values built to collide: UID 1.2.3 with
    accession 4-A and UID 1.2.3-4 with accession A, whatever delimiter the
    template accepts."""
    for sep in "_ ~+#,@=":
        template = Template.parse(f"{{SOPInstanceUID}}{sep}{{AccessionNumber}}.dcm")
        names = set()
        for uid, accession in (("1.2.3", f"4{sep}A"), (f"1.2.3{sep}4", "A"), ("1.2.3-4", "A"),
                               ("1.2.3", "4-A")):
            if not set(uid) <= UID_CHARS:
                continue  # not a UID serve files
            ds = Dataset()
            ds.SOPInstanceUID, ds.AccessionNumber = uid, accession
            names.add((uid, accession, str(relative_path(ds, template))))
        assert len({n for *_, n in names}) == len(names) == 3, (sep, names)


@pytest.mark.parametrize("spec", ["0>99999999999", "0>4097", ".5000", "_<100000000"])
def test_a_format_spec_wider_than_a_path_is_refused_with_one_line(tmp_path: Path, spec: str) -> None:
    """Found by an independent attack: ``{SeriesNumber:0>99999999999}`` ended
    sort and serve with a MemoryError traceback (exit 1); a width of 10**7 was
    taken and formatted a 10 MB string for every file."""
    text = f"{{SeriesNumber:{spec}}}/{{SOPInstanceUID}}.dcm"
    with pytest.raises(TemplateError, match="above 4096"):
        Template.parse(text)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a.dcm").write_bytes((CHARSET_FILES / "chrFren.dcm").read_bytes())
    r = run_cli("sort", src, dst, "--template", text)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "above 4096" in " ".join(r.stderr.split()), r.stderr
    assert not dst.exists()
    assert Template.parse("{SeriesNumber:0>4096}/{SOPInstanceUID}.dcm")  # (then shortened, as any long name)


def test_the_copy_suffix_of_a_name_without_extension_goes_after_the_uid() -> None:
    """Found by an independent attack: with ``{PatientID}/{SOPInstanceUID}``, the
    second copy of 1.2.840.99.7 was 1.2.840.99~2.7, a name that no longer
    starts with its UID."""
    assert split_extension("1.2.840.99.7") == ("1.2.840.99.7", "")
    assert split_extension("1.2.826.0.3_5") == ("1.2.826.0.3_5", "")  # {SOPInstanceUID}_{InstanceNumber}
    assert split_extension("1.2.840.99.7.dcm") == ("1.2.840.99.7", ".dcm")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("text", ["99999999999999999999", "100000000000000000000 ", "007", "+7", "1e3"])
def test_a_number_is_named_by_its_text_as_in_the_header(text: str) -> None:
    """An over-long IS (pydicom keeps it as a float, printed 1e+20) names its
    folder with the digits the header has, in both readers (``sort``'s lean one
    hands such a value to pydicom)."""
    ds = raw_dataset({"PatientName": "A", "PatientID": "1", "SeriesDescription": "S",
                      "SeriesNumber": text, "SOPInstanceUID": "1.2.3"})
    rel = relative_path(ds, DEFAULT)
    assert rel.parts[1] == f"S_{text.strip()}", rel

"""The layout engine: one pure function turns a DICOM header into a safe relative path.

Nothing in this module touches the file system. ``serve`` and ``sort`` both call
:func:`relative_path`, so receiving a set of instances and re-sorting the same
files give the same tree.

Rules applied to every path component (each is tested):

* a missing or empty value renders as :data:`PLACEHOLDER`;
* Person Names are decoded with the dataset's SpecificCharacterSet; empty
  trailing name components are dropped (``Doe^John^^`` -> ``Doe^John``);
* whitespace becomes ``_``; ``/ \\ : * ? " < > |`` and control characters
  (NUL included) become ``_``;
* a component never starts with ``.`` nor ends with ``.`` or a space, so it
  is never empty, ``.``, ``..`` or hidden; Windows device names (``CON``,
  ``NUL``, ``COM1`` ...) get a leading ``_``;
* a component longer than 255 bytes (UTF-8) is cut on a character boundary
  and made unique with ``~`` and 12 hex digits of its SHA-256, keeping a short
  extension such as ``.dcm``.

Examples
--------
>>> from pydicom import Dataset
>>> ds = Dataset()
>>> ds.PatientName = "Doe^John"
>>> ds.PatientID = "12/34"
>>> ds.SeriesNumber = 3
>>> ds.SOPInstanceUID = "1.2.3"
>>> str(relative_path(ds, Template.parse(DEFAULT_TEMPLATE)))
'Doe^John_12_34/UNKNOWN_3/1.2.3.dcm'
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, cast

from scp import DEFAULT_TEMPLATE as DEFAULT_TEMPLATE  # the layout's default, re-exported
from scp._datadict import dictionary_vr, keyword_for_tag, tag_for_keyword
from scp.errors import TemplateError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: What a missing or empty value renders as.
PLACEHOLDER = "UNKNOWN"

#: Longest path component, in UTF-8 bytes (ext4, XFS, APFS, NTFS all allow 255).
MAX_COMPONENT_BYTES = 255

#: Characters that are unsafe in a path component on Linux, macOS or Windows.
UNSAFE_CHARS = frozenset('/\\:*?"<>|')

#: Joins the values of a multi-valued element (DICOM's own ``\\`` is unsafe).
MULTI_VALUE_SEPARATOR = "-"

_WINDOWS_DEVICE_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"]
)
_HASH_DIGITS = 12
#: ASCII whitespace, control characters and UNSAFE_CHARS -> "_".
_ASCII_UNSAFE = str.maketrans(
    {c: "_" for c in [*map(chr, range(0x21)), "\x7f", *UNSAFE_CHARS]}
)
#: Longest extension (in UTF-8 bytes, without its dot) kept at the end of a cut or suffixed name.
_MAX_KEPT_EXTENSION = 16


@dataclass(frozen=True)
class Field:
    """One ``{Keyword:spec}`` placeholder of a template."""

    keyword: str
    spec: str = ""


Part = str | Field


@dataclass(frozen=True)
class Template:
    """A parsed path template: components separated by ``/``, each a run of
    literal text and :class:`Field` s.

    Parse once with :meth:`parse`; the object is immutable and picklable, so it
    travels inside the config to the worker processes.

    Examples
    --------
    >>> t = Template.parse("{PatientID}/{StudyDate}/{SOPInstanceUID}.dcm")
    >>> t.keywords
    ('PatientID', 'StudyDate', 'SOPInstanceUID')
    """

    text: str
    components: tuple[tuple[Part, ...], ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        """Parse and validate `text`; raise :class:`TemplateError` with a clear
        message if it is malformed or names an unknown keyword."""
        if not text or not text.strip():
            raise TemplateError("the template is empty")
        if text.startswith("/"):
            raise TemplateError(f"the template must be a relative path: {text!r}")
        try:
            pieces = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise TemplateError(f"malformed template {text!r}: {exc}") from None

        components: list[list[Part]] = [[]]
        for literal, name, spec, conversion in pieces:
            for i, chunk in enumerate(literal.split("/")):
                if i:
                    components.append([])
                if chunk:
                    components[-1].append(chunk)
            if name is None:
                continue
            components[-1].append(_parse_field(text, name, spec or "", conversion))

        for parts in components:
            if not parts:
                raise TemplateError(f"the template has an empty path component: {text!r}")
            if all(isinstance(p, str) for p in parts) and "".join(map(str, parts)) in (".", ".."):
                raise TemplateError(f"the template may not contain '.' or '..': {text!r}")
        last = components[-1]
        uids = [i for i, p in enumerate(last) if isinstance(p, Field) and p.keyword == "SOPInstanceUID"]
        if not uids:
            raise TemplateError(
                "the file name (last component) must contain {SOPInstanceUID}, so that "
                f"two instances never share a name: {text!r}"
            )
        # ... whole, and not run together with another field: {SOPInstanceUID:.6}
        # or {InstanceNumber}{SOPInstanceUID} gives two instances one name.
        if not any(
            not cast(Field, last[i]).spec
            and not (i > 0 and isinstance(last[i - 1], Field))
            and not (i + 1 < len(last) and isinstance(last[i + 1], Field))
            for i in uids
        ):
            raise TemplateError(
                "the file name must contain {SOPInstanceUID} whole (no format spec) and apart "
                f"from other fields (a literal between them), so that two instances never share a name: {text!r}"
            )
        # ... and where another field shares the file name, the literal between
        # them holds a character no UID has: with "-", UID 1.2.3 and "4-A", or
        # UID 1.2.3-4 and "A", would both be "1.2.3-4-A".
        if not any(_delimited(last, i) for i in uids):
            raise TemplateError(
                "where other fields share the file name with {SOPInstanceUID}, they must all be on "
                "one side of it, and the text between must hold a character that no UID holds (not a "
                "letter, digit, '.' or '-'; e.g. '_'), so that two instances never share a name: "
                f"{text!r}"
            )
        return cls(text, tuple(tuple(parts) for parts in components))

    @property
    def keywords(self) -> tuple[str, ...]:
        """The DICOM keywords the template needs, in order, without repeats."""
        seen: dict[str, None] = {}
        for parts in self.components:
            for p in parts:
                if isinstance(p, Field):
                    seen.setdefault(p.keyword)
        return tuple(seen)

    def __str__(self) -> str:
        return self.text


#: The characters of a UID that names a file (``serve`` refuses any other).
UID_CHARS = frozenset(string.ascii_letters + string.digits + ".-")
#: The widest a format spec may pad or cut a value: no path is longer (a
#: longer name is shortened to :data:`MAX_COMPONENT_BYTES` with a digest).
MAX_SPEC_WIDTH = 4096
_SPEC_NUMBERS = re.compile(r"[0-9]+")


def _delimited(parts: tuple[Part, ...] | list[Part], i: int) -> bool:
    """Whether the UID at ``parts[i]`` can be told from the fields beside it:
    fields on one side of it only (values may hold any character, the
    delimiter too), and the literal between holds a character that no UID
    holds, as it is in the file name (normalized: the Kelvin sign is K)."""
    sides = [(parts[:i], parts[i - 1] if i else ""),
             (parts[i + 1:], parts[i + 1] if i + 1 < len(parts) else "")]
    with_fields = [(side, literal) for side, literal in sides if any(isinstance(p, Field) for p in side)]
    if len(with_fields) > 1:
        return False
    return all(not isinstance(literal, Field) and not set(unicodedata.normalize("NFC", literal)) <= UID_CHARS
               for _, literal in with_fields)


def _parse_field(text: str, name: str, spec: str, conversion: str | None) -> Field:
    if conversion:
        raise TemplateError(f"conversions like '!{conversion}' are not supported: {text!r}")
    if not name:
        raise TemplateError(f"empty '{{}}' in template {text!r}: name a DICOM keyword")
    name = _keyword_of_tag_number(name, text)
    tag = tag_for_keyword(name) if name.isidentifier() else None
    if tag is None:
        raise TemplateError(f"unknown DICOM keyword {name!r} in template {text!r}")
    if dictionary_vr(tag) == "SQ":
        raise TemplateError(f"{name!r} is a sequence and cannot name a folder")
    if spec:
        if "{" in spec:
            raise TemplateError(f"nested fields are not supported: {text!r}")
        if any(int(n) > MAX_SPEC_WIDTH for n in _SPEC_NUMBERS.findall(spec)):
            raise TemplateError(
                f"format spec {spec!r} for {name} in {text!r}: a width or precision above "
                f"{MAX_SPEC_WIDTH} (no path can be longer)"
            )
        for sample in (1, 1.5, "x"):
            try:
                format(sample, spec)
                break
            except (ValueError, TypeError):
                continue
        else:
            raise TemplateError(f"invalid format spec {spec!r} for {name} in {text!r}")
    return Field(name, spec)


#: A tag number as dcm4che writes it: ``00100020``, ``0010,0020`` or ``(0010,0020)``.
_TAG_NUMBER = re.compile(r"\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?")


def _keyword_of_tag_number(name: str, text: str) -> str:
    """The keyword of a field written as a tag number (e.g. ``0010,0020`` ->
    ``PatientID``); any other name is returned as it is."""
    match = _TAG_NUMBER.fullmatch(name)
    if match is None:
        return name
    tag = int(match.group(1) + match.group(2), 16)
    keyword = keyword_for_tag(tag)
    if not keyword:
        raise TemplateError(
            f"tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) in template {text!r} is not in the "
            "DICOM dictionary (private and unknown tags cannot name a folder)"
        )
    return keyword


def render_value(ds: Dataset, keyword: str, spec: str = "") -> str:
    """Return the text of `keyword` in `ds`, before sanitizing.

    Person Names are decoded with the dataset's SpecificCharacterSet; a missing
    or empty value, or one that cannot be decoded, gives :data:`PLACEHOLDER`.
    """
    try:
        elem = ds.data_element(keyword)
        value = None if elem is None else elem.value
        text = _value_text(value, spec)
    except Exception:  # a broken value must never stop an instance from being filed
        return PLACEHOLDER
    return text if text else PLACEHOLDER


def _value_text(value: Any, spec: str) -> str:
    if value is None:
        return ""
    if isinstance(value, _PN):
        return _name_text(value, spec)
    if isinstance(value, list | tuple):
        return _multi_text(value, spec)
    if not isinstance(value, str | int | float | bytes):  # pydicom's own containers
        from pydicom.multival import MultiValue
        from pydicom.valuerep import PersonName

        if isinstance(value, MultiValue):
            return _multi_text(value, spec)
        if isinstance(value, PersonName):
            return _name_text(value, spec)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace").strip("\x00 ")
    if spec:
        return _format(value, spec).strip()
    # pydicom's IS of an integer too long for a float's digits (ISfloat) prints
    # as 1e+20; the text it was read from is the header's value
    original = getattr(value, "original_string", None)
    return (original if isinstance(original, str) else str(value)).strip()


def _multi_text(values: Any, spec: str) -> str:
    texts = (_value_text(v, spec) for v in values)
    return MULTI_VALUE_SEPARATOR.join(t for t in texts if t)


def _name_text(value: Any, spec: str) -> str:
    """A Person Name: empty trailing components and groups dropped."""
    groups = [g.rstrip("^").strip() for g in str(value).split("=")]
    while groups and not groups[-1]:
        groups.pop()
    text = "=".join(groups)
    return _format(text, spec).strip() if spec and text else text


def _format(value: Any, spec: str) -> str:
    """`value` formatted with `spec`: as a number when it reads as one and the
    spec suits numbers (``{SeriesNumber:04}``), else as text (``{PatientName:.3}``)."""
    if isinstance(value, str):
        value = value.strip()
    candidates = [value]
    if isinstance(value, str):
        for convert in (int, float):
            try:
                candidates.append(convert(value.strip()))
            except ValueError:
                pass
    for candidate in candidates:
        try:
            return format(candidate, spec)
        except (ValueError, TypeError):
            continue
    return str(value)


def sanitize_component(text: str) -> str:
    """Make `text` a safe, non-empty path component on Linux, macOS and Windows.

    Examples
    --------
    >>> sanitize_component("../etc/passwd")
    '_._etc_passwd'
    >>> sanitize_component("Head  First.")
    'Head__First_'
    >>> sanitize_component("")
    'UNKNOWN'
    """
    if text.isascii():  # the same rules, in one C call (whitespace and controls are all < 0x21)
        name = text.translate(_ASCII_UNSAFE)
    else:
        text = unicodedata.normalize("NFC", text)
        out = []
        for ch in text:
            if ch.isspace():
                out.append("_")
            elif ch in UNSAFE_CHARS or unicodedata.category(ch) in ("Cc", "Cs"):
                out.append("_")
            else:
                out.append(ch)
        name = "".join(out)
    if not name:
        return PLACEHOLDER
    if name.startswith("."):
        name = "_" + name[1:]
    if name.endswith("."):
        name = name[:-1] + "_"
    if name.split(".", 1)[0].upper() in _WINDOWS_DEVICE_NAMES:
        name = "_" + name
    return _shorten(name)


def _shorten(name: str) -> str:
    raw = name.encode("utf-8")
    if len(raw) <= MAX_COMPONENT_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:_HASH_DIGITS]
    stem, ext = split_extension(name)
    return fit_component(stem, f"~{digest}{ext}")


def split_extension(name: str) -> tuple[str, str]:
    """``(stem, ".ext")``, or ``(name, "")`` if `name` has no short extension
    to keep at the end of a cut or suffixed name: letters and digits, not
    digits alone (the last part of a UID, in a template without extension:
    its ``~2`` goes after the whole name, never inside the UID).

    >>> split_extension("1.2.3.dcm"), split_extension("x." + "e" * 20), split_extension("1.2.3")
    (('1.2.3', '.dcm'), ('x.eeeeeeeeeeeeeeeeeeee', ''), ('1.2.3', ''))
    >>> split_extension("1.2.3_5")
    ('1.2.3_5', '')
    """
    stem, dot, ext = name.rpartition(".")
    if dot and stem and ext.isalnum() and not ext.isdigit() and 0 < len(ext.encode("utf-8")) <= _MAX_KEPT_EXTENSION:
        return stem, dot + ext
    return name, ""


def fit_component(stem: str, tail: str) -> str:
    """``stem + tail``, with `stem` cut on a character boundary so that the
    name fits in :data:`MAX_COMPONENT_BYTES` (a ``~2`` added to a name that was
    already the longest allowed must not make it one the file system refuses).

    >>> fit_component("a" * 255, "~2.dcm") == "a" * 249 + "~2.dcm"
    True
    """
    budget = MAX_COMPONENT_BYTES - len(tail.encode("utf-8"))
    if budget < 1:
        raise ValueError(f"{tail!r} leaves no room for a name")
    return stem.encode("utf-8")[:budget].decode("utf-8", "ignore") + tail


def render_component(ds: Dataset, parts: tuple[Part, ...]) -> str:
    """Render and sanitize one path component."""
    text = "".join(
        p if isinstance(p, str) else render_value(ds, p.keyword, p.spec) for p in parts
    )
    return sanitize_component(text)


def relative_path(ds: Dataset, template: Template) -> PurePosixPath:
    """Return the path, relative to the output folder, where `ds` is filed.

    Whatever the header holds, the result is relative, has no ``..`` and no
    empty components: it always stays inside the output folder.
    """
    return PurePosixPath(*(render_component(ds, parts) for parts in template.components))


# --- raw values: the lean header reader's, named without pydicom ------------------

#: (0008,0005) Specific Character Set.
_CHARSET = 0x00080005
#: Single character sets in which printable ASCII bytes decode to themselves
#: (ISO 2022 code extensions and JIS X 0201, where ``\`` and ``~`` may be other
#: characters, are left to pydicom).
_ASCII_CHARSETS = frozenset(
    b"ISO_IR " + n for n in (b"6", b"100", b"101", b"109", b"110", b"126", b"127", b"138",
                             b"144", b"148", b"166", b"192", b"203")
) | {b""}
_PRINTABLE = bytes(range(0x20, 0x7F))
_IS_TEXT = re.compile(r" *[+-]?[0-9]{1,15} *")
_DS_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")
#: How pydicom splits and strips the text of each string VR.
_SPLIT_RSTRIP = frozenset({"SH", "LO", "UC"})  # split on "\", each item rstrip("\0 ")
_SINGLE = frozenset({"ST", "LT", "UT"})  # one value, rstrip("\0 ")
_MULTI = frozenset({"CS", "AS", "DA", "TM", "DT", "UI"})  # rstrip(" \0"), then split


class _NeedsPydicom(Exception):
    """A raw value that only pydicom's conversion names correctly."""


class _PN(str):
    """A Person Name decoded from printable ASCII (pydicom's ``str(PersonName)``)."""


class _IS(int):
    """An IS value: an int that prints as its text, as pydicom's ``IS``."""

    text: str

    def __str__(self) -> str:
        return self.text


class _DS(float):
    """A DS value: a float that prints as its text, as pydicom's ``DSfloat``."""

    text: str

    def __str__(self) -> str:
        return self.text


def _number(kind: type[_IS] | type[_DS], item: str, pattern: re.Pattern[str]) -> Any:
    if not item.strip():
        return item  # pydicom keeps an empty item as the text it is
    if pattern.fullmatch(item if kind is _IS else item.strip()) is None:
        raise _NeedsPydicom
    value = kind(item)
    value.text = item.strip()
    return value


def raw_value(vr: str, value: bytes) -> Any:
    """The value pydicom's conversion gives for a string VR, for printable
    ASCII bytes, as plain Python values that :func:`render_value` renders the
    same: ``str`` (or a list of them), a Person Name, an ``IS`` or ``DS``
    number that prints as its text. Raises :class:`_NeedsPydicom` for any other
    VR or byte.

    >>> raw_value("LO", b"A\\\\B "), raw_value("UI", b"1.2.3\\0"), str(raw_value("IS", b" 7 "))
    (['A', 'B'], '1.2.3', '7')
    """
    if not value:
        if vr == "PN":
            return _PN("")
        if vr in ("IS", "DS"):
            return None
        if vr in _SPLIT_RSTRIP or vr in _SINGLE or vr in _MULTI or vr == "AE":
            return ""
        raise _NeedsPydicom
    body = value.rstrip(b"\0")
    if body.translate(None, _PRINTABLE):
        raise _NeedsPydicom  # control characters, NULs inside, or not ASCII
    text = value.decode("ascii")
    items: list[Any]
    if vr == "PN":
        items = [_PN(x) for x in value.rstrip(b"\0 ").decode("ascii").split("\\")]
    elif vr in _SPLIT_RSTRIP:
        items = [x.rstrip("\0 ") for x in text.split("\\")]
    elif vr in _SINGLE:
        return text.rstrip("\0 ")
    elif vr in _MULTI:
        items = text.rstrip("\0 ").split("\\")
    elif vr == "AE":
        if body != value:
            raise _NeedsPydicom  # pydicom keeps the NULs of an AE
        items = [x.strip() for x in text.split("\\")]
    elif vr == "IS":
        items = [_number(_IS, x, _IS_TEXT) for x in text.rstrip(" \0").split("\\")]
    elif vr == "DS":
        items = [_number(_DS, x, _DS_TEXT) for x in text.strip().rstrip(" \0").split("\\")]
    else:
        raise _NeedsPydicom
    return items[0] if len(items) == 1 else items


def _field_tag(keyword: str) -> tuple[int, str]:
    """The tag and dictionary VR of a template keyword (cached)."""
    found = _FIELD_TAGS.get(keyword)
    if found is None:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise _NeedsPydicom
        found = _FIELD_TAGS[keyword] = (tag, dictionary_vr(tag))
    return found


_FIELD_TAGS: dict[str, tuple[int, str]] = {}


#: What :func:`_raw_field` returns for a keyword the header does not have.
_ABSENT = object()


def _plain_charset(values: Mapping[int, tuple[str | None, bytes]]) -> bool:
    """Whether the header's character set lets printable ASCII bytes stand for themselves."""
    charset = values.get(_CHARSET)
    return charset is None or charset[1].rstrip(b"\0 ") in _ASCII_CHARSETS


def _raw_field(values: Mapping[int, tuple[str | None, bytes]], keyword: str) -> Any:
    """:func:`raw_value` of `keyword` in `values`, or :data:`_ABSENT`; raises
    :class:`_NeedsPydicom` where pydicom may read the value as another VR."""
    tag, dict_vr = _field_tag(keyword)
    elem = values.get(tag)
    if elem is None:
        return _ABSENT
    vr = elem[0] or dict_vr  # implicit VR: the dictionary's, as pydicom
    if vr == "UN" or " " in vr:
        raise _NeedsPydicom
    return raw_value(vr, elem[1])


def relative_path_raw(
    values: Mapping[int, tuple[str | None, bytes]], template: Template
) -> PurePosixPath | None:
    """:func:`relative_path` of a header given as raw top-level values (tag ->
    (VR, or None for implicit VR; value bytes), as the lean header reader keeps
    them), without building a pydicom dataset: the same path, or None when a
    value needs pydicom's conversion (bytes that are not printable ASCII, a
    character set that is not a plain ASCII-compatible one, a numeric VR, an
    unusual number; then build the dataset and call :func:`relative_path`).

    >>> t = Template.parse("{PatientName}/{SeriesNumber:03}/{SOPInstanceUID}.dcm")
    >>> str(relative_path_raw({0x00100010: ("PN", b"Doe^John^^ "), 0x00200011: ("IS", b"7 "),
    ...                        0x00080018: ("UI", b"1.2.3\\0")}, t))
    'Doe^John/007/1.2.3.dcm'
    """
    if not _plain_charset(values):
        return None
    try:
        components = []
        for parts in template.components:
            texts = []
            for p in parts:
                if isinstance(p, str):
                    texts.append(p)
                    continue
                value = _raw_field(values, p.keyword)
                if value is _ABSENT:
                    texts.append(PLACEHOLDER)
                    continue
                try:
                    text = _value_text(value, p.spec)
                except Exception:
                    text = ""
                texts.append(text if text else PLACEHOLDER)
            components.append(sanitize_component("".join(texts)))
    except _NeedsPydicom:
        return None
    return PurePosixPath(*components)


def raw_texts(
    values: Mapping[int, tuple[str | None, bytes]], keywords: tuple[str, ...]
) -> dict[str, str | None] | None:
    """What ``str()`` of each keyword's value gives once pydicom has read it
    (None for an absent or empty value), from raw top-level values as
    :func:`relative_path_raw` takes them; None when a value needs pydicom's
    conversion (as there, and for a value with several items).

    >>> raw_texts({0x00100010: ("PN", b"Doe^John "), 0x00200011: (None, b" 7")},
    ...           ("PatientName", "SeriesNumber", "Modality"))
    {'PatientName': 'Doe^John', 'SeriesNumber': '7', 'Modality': None}
    """
    if not _plain_charset(values):
        return None
    texts: dict[str, str | None] = {}
    try:
        for keyword in keywords:
            value = _raw_field(values, keyword)
            if value is _ABSENT:
                texts[keyword] = None
                continue
            if isinstance(value, list):
                return None  # pydicom's text of a MultiValue: left to pydicom
            texts[keyword] = None if value is None or value == "" else str(value)
    except _NeedsPydicom:
        return None
    return texts

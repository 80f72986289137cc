"""The lean header reader's fast path, on raw bytes, without pydicom.

:func:`read_raw` reads the preamble and the File Meta (group 0002, explicit VR
little endian, measured by its group length and checked element by element),
then runs :class:`~scp.dicom.walk.DatasetWalker` over the dataset, keeping only
the wanted top-level values and SpecificCharacterSet, and returns them raw: a
:class:`RawHeader`. :mod:`scp.dicom.header` builds pydicom's dataset from it;
``sort`` names a file from it directly (:func:`scp.layout.relative_path_raw`),
so a sort of ordinary files never imports pydicom (0.17 s of start-up here).

It answers None wherever pydicom must read the header (see
:mod:`scp.dicom.header` for the list), and raises what the fast path of
:func:`scp.dicom.header.read_header` raises.

>>> from pydicom.data import get_testdata_file
>>> with open(get_testdata_file("CT_small.dcm"), "rb") as f:
...     head = f.read(HEADER_PREFIX)
...     raw = read_raw(f, 0, head, wanted_tags(["PatientName"]), check=True)
>>> raw.elements[0x00100010], raw.implicit, raw.little
(('PN', b'CompressedSamples^CT1 '), False, True)
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from scp._datadict import tag_for_keyword
from scp.dicom.meta import GROUP_LENGTH_HEADER, PREAMBLE
from scp.dicom.walk import EXPLICIT_VR_LENGTH_32, DatasetWalker

__all__ = [
    "RawHeader", "read_raw", "parse_meta", "wanted_tags", "has_dicm_prefix", "vr_switch",
    "Refused", "HEADER_PREFIX", "IDENTITY_KEYWORDS", "FIRST_PIXEL_TAG", "DICOMDIR_UID",
]

#: Tags read on top of the template's: they identify the instance.
IDENTITY_KEYWORDS = ("SOPClassUID", "SOPInstanceUID")
#: Bytes read in one go and parsed in memory.
HEADER_PREFIX = 64 * 1024
#: Tags at or past this one are never read as header values (pixel data and after).
FIRST_PIXEL_TAG = 0x7FE00008
#: Media Storage Directory Storage: a DICOMDIR, an index rather than an instance.
DICOMDIR_UID = "1.2.840.10008.1.3.10"

_META_START = len(PREAMBLE)
_TRANSFER_SYNTAX = 0x00020010
_MEDIA_SOP_CLASS = 0x00020002
_MEDIA_SOP_INSTANCE = 0x00020003
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_DICOMDIR = DICOMDIR_UID.encode()
_EXPL_LE = struct.Struct("<HH2sH").unpack_from
_UL_LE = struct.Struct("<L").unpack_from
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split()
)
#: Transfer syntax -> (implicit, little, deflated); any other is read as
#: explicit VR little endian, as pydicom reads it.
ENCODINGS = {
    "1.2.840.10008.1.2": (True, True, False),  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": (False, True, False),  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": (False, False, False),  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99": (False, True, True),  # Deflated Explicit VR Little Endian
}

#: A File Meta element: (VR, value, offset of the value in the stream).
MetaElement = tuple[str, bytes, int]


class Refused(Exception):
    """The fast path read the header and it is not an instance (a DICOMDIR,
    no SOP Instance UID): no need to ask pydicom."""


@dataclass(frozen=True, slots=True)
class RawHeader:
    """What the fast path read: raw values, nothing converted."""

    #: The wanted top-level values (before the pixel data) and SpecificCharacterSet,
    #: by tag: (VR, or None for implicit VR; value); the SOP identity filled from the File Meta.
    elements: dict[int, tuple[str | None, bytes]]
    implicit: bool
    little: bool
    deflated: bool
    #: The File Meta elements, by tag.
    meta: dict[int, MetaElement]
    #: Where each kept value starts, in dataset bytes (inflated bytes if deflated).
    value_offsets: dict[int, int]
    #: Where the dataset starts in the stream.
    dataset_start: int
    #: Where the walk ended in the stream: the end of the dataset (not for deflated data).
    end: int


def wanted_tags(keywords: Iterable[str | int]) -> tuple[int, ...]:
    """Tag numbers of `keywords` (DICOM keywords, or tag numbers as ints), in
    order, without repeats.

    >>> [hex(t) for t in wanted_tags(["PatientName", 0x00100020, "PatientName"])]
    ['0x100010', '0x100020']
    """
    tags: dict[int, None] = {}
    for k in keywords:
        if isinstance(k, int):
            tag = int(k)
            if not 0 <= tag <= 0xFFFFFFFF:
                raise ValueError(f"not a DICOM tag: {k!r}")
        else:
            found = tag_for_keyword(k)
            if found is None:
                raise ValueError(f"unknown DICOM keyword {k!r}")
            tag = found
        tags.setdefault(tag)
    return tuple(tags)


def has_dicm_prefix(head: bytes) -> bool:
    """True if `head` (the first 132 bytes or more) carries the Part 10 ``DICM``."""
    return head[_META_START - 4 : _META_START] == PREAMBLE[-4:]


def vr_switch(first: bytes, implicit: bool) -> bool:
    """True if a dataset starting with `first` (its first 6 bytes) reads, to
    pydicom, as the other VR encoding than `implicit` says (pydicom then
    switches for the whole dataset, and only pydicom reads it right).

    >>> vr_switch(b"\\x08\\x00\\x16\\x00UI", implicit=True), vr_switch(b"\\x08\\x00\\x16\\x00UI", implicit=False)
    (True, False)
    """
    return len(first) >= 6 and (not (0x40 < first[4] < 0x5B and 0x40 < first[5] < 0x5B)) != implicit


def parse_meta(head: bytes, start: int) -> tuple[dict[int, MetaElement], int] | None:
    """The File Meta's raw elements and where the dataset starts in `head`, if
    the File Meta is regular: a group length first, then group 0002 elements
    that end exactly where it says, and no group 0002 element after. `start`
    is where `head` starts in its stream (for the value offsets)."""
    if head[_META_START : _META_START + 8] != GROUP_LENGTH_HEADER or len(head) < 144:
        return None
    end = 144 + _UL_LE(head, 140)[0]
    if end > len(head):
        return None
    raw: dict[int, MetaElement] = {}
    i = _META_START
    while i < end:
        if end - i < 8:
            return None
        g, e, vr, length = _EXPL_LE(head, i)
        if g != 2:
            return None
        if vr in _LONG_VRS:
            if end - i < 12:
                return None
            length = _UL_LE(head, i + 8)[0]
            hl = 12
        elif vr in _SHORT_VRS:
            hl = 8
        else:
            return None
        j = i + hl + length
        if j > end:
            return None
        raw[0x00020000 | e] = (vr.decode("ascii"), head[i + hl : j], start + i + hl)
        i = j
    if len(head) >= end + 2 and head[end : end + 2] == b"\x02\x00":
        return None  # pydicom reads on into the File Meta
    return raw, end


def _private_syntaxes() -> Iterable[str]:
    """Private transfer syntaxes registered with pydicom (none unless pydicom is
    loaded and someone registered one)."""
    uid = sys.modules.get("pydicom.uid")
    return getattr(uid, "PrivateTransferSyntaxes", ()) if uid is not None else ()


def read_raw(
    src: BinaryIO | None, start: int, head: bytes, tags: tuple[int, ...], check: bool,
    identity_from_meta: bool = True, *, size: int | None = None,
) -> RawHeader | None:
    """The header from `head` (the first :data:`HEADER_PREFIX` bytes of `src`
    from `start`, or fewer at the end of the stream) and, if the header is
    longer, the rest of `src`; None where pydicom must read it.

    With `check`, the whole dataset is walked (:class:`~scp.errors.TruncatedError`
    if it is cut short); `size` is then the stream's size if known (else `src`
    is asked). `src` may be None if `head` holds the rest of the stream
    (shorter than the prefix) and `size` is given. `src` is not moved back.

    Raises :class:`Refused` (not an instance), :class:`~scp.errors.NotDicomError`
    and :class:`~scp.errors.TruncatedError`; any other exception means "ask pydicom".
    """
    if not has_dicm_prefix(head):
        return None
    parsed = parse_meta(head, start)
    if parsed is None:
        return None
    meta, data_start = parsed
    ts_elem = meta.get(_TRANSFER_SYNTAX)
    if ts_elem is None or len(head) <= data_start:
        return None
    ts = ts_elem[1].decode("ascii", "replace").strip("\0 ")
    if ts in _private_syntaxes():
        return None
    implicit, little, deflated = ENCODINGS.get(ts, (False, True, False))
    first = head[data_start : data_start + 6]
    if deflated:
        first = zlib.decompressobj(-zlib.MAX_WBITS).decompress(head[data_start:], 6)
    if vr_switch(first, implicit):
        return None  # pydicom would switch VR for the whole dataset

    dataset_size = None
    if check and not deflated:
        if size is None:
            assert src is not None
            size = src.seek(0, os.SEEK_END)
        dataset_size = size - start - data_start
    walker = DatasetWalker(
        implicit=implicit, little=little, deflated=deflated,
        wanted=[t for t in tags if t < FIRST_PIXEL_TAG], size=dataset_size,
    )
    # Walked to the end, never stopped at the first tag past the wanted ones: a
    # wanted tag out of order further on changes what pydicom reads (it files
    # the instance elsewhere), and only a walk to the end sees it. Large values
    # after the wanted tags (the pixels) are skipped with a seek, not read.
    walker.feed(memoryview(head)[data_start:])
    if len(head) == HEADER_PREFIX:  # a header longer than the prefix
        assert src is not None
        src.seek(start + len(head))
        while True:
            skip = walker.skip
            if skip:
                src.seek(skip, os.SEEK_CUR)
                walker.skipped(skip)
            chunk = src.read(HEADER_PREFIX)
            if not chunk:
                break
            walker.feed(chunk)
    walker.close()
    if walker.irregular_in_header:
        return None
    elements = {t: v for t, v in walker.elements.items() if t < FIRST_PIXEL_TAG}
    _identify_raw(elements, meta, identity_from_meta)
    return RawHeader(
        elements, implicit, little, deflated, meta, walker.value_offsets,
        start + data_start, start + data_start + walker.position,
    )


def _raw_text(value: bytes | None) -> bytes:
    return (value or b"").strip(b"\0 ")


def _identify_raw(
    elements: dict[int, tuple[str | None, bytes]],
    meta: dict[int, MetaElement],
    identity_from_meta: bool,
) -> None:
    """Refuse a DICOMDIR, fill a missing SOP identity from the File Meta (as
    :func:`scp.dicom.header.read_header` does on the dataset)."""
    media_class = meta.get(_MEDIA_SOP_CLASS)
    media_instance = meta.get(_MEDIA_SOP_INSTANCE)
    if media_class is not None and _raw_text(media_class[1]) == _DICOMDIR:
        raise Refused("a DICOMDIR (media index), not an instance")
    for tag, media in ((_SOP_INSTANCE_UID, media_instance), (_SOP_CLASS_UID, media_class)):
        if _raw_text(elements.get(tag, (None, b""))[1]):
            continue
        if tag == _SOP_INSTANCE_UID and not identity_from_meta:
            raise Refused("the dataset has no SOP Instance UID")
        if media is not None and _raw_text(media[1]):
            elements[tag] = ("UI", bytes(media[1]))
    if _raw_text(elements.get(_SOP_CLASS_UID, (None, b""))[1]) == _DICOMDIR:
        raise Refused("a DICOMDIR (media index), not an instance")


def read_file_start(fd: int, size: int) -> bytes:
    """The first :data:`HEADER_PREFIX` bytes of the file open as `fd`, whose
    ``fstat`` gave `size` (fewer bytes if it is shorter): one ``pread`` for
    a file that fits, more only after a short read."""
    head = os.pread(fd, HEADER_PREFIX, 0)
    while len(head) < HEADER_PREFIX and len(head) < size:
        more = os.pread(fd, HEADER_PREFIX - len(head), len(head))
        if not more:
            break
        head += more
    return head

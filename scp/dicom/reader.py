"""Read just enough of a DICOM header to name the file.

One reader serves bytes received from the network and files on disk: it takes
a binary stream or a path, and opens a file only when it was given a path.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterable
from io import BytesIO
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from scp.errors import NotDicomError, TruncatedError

#: Tags read on top of the template's: they identify the instance.
IDENTITY_KEYWORDS = ("SOPClassUID", "SOPInstanceUID")

#: Media Storage Directory Storage: a DICOMDIR, an index rather than an instance.
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

_PREAMBLE = 128
_MAGIC = b"DICM"

#: Bytes read in one go and parsed in memory. Headers are almost always
#: shorter; a longer one is parsed again from the stream itself.
HEADER_PREFIX = 64 * 1024
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})

#: Explicit VRs whose length field is 4 bytes (after 2 reserved bytes).
_LONG_VRS = frozenset(
    b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split()
)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_PIXEL_DATA = (0x7FE0, 0x0010)
#: Elements after the pixel data we look at before trusting the rest.
_MAX_TRAILING_ELEMENTS = 256
#: Top-level elements walked when the header parse itself reached the end of the file.
_MAX_WALKED_ELEMENTS = 100_000
#: Fragments of encapsulated pixel data we follow (one per frame, usually).
_MAX_FRAGMENTS = 1_000_000


def has_dicm_prefix(head: bytes) -> bool:
    """True if `head` (the first 132 bytes or more) carries the Part 10 ``DICM``."""
    return head[_PREAMBLE : _PREAMBLE + 4] == _MAGIC


def read_header(
    src: BinaryIO | str | os.PathLike[str],
    keywords: Iterable[str],
    *,
    identity_from_meta: bool = True,
) -> Dataset:
    """Read the tags in `keywords` (and the SOP identity) from a DICOM header.

    Pixel data and every other tag are skipped; SpecificCharacterSet always comes
    along, so names decode correctly. A missing SOPInstanceUID or SOPClassUID is
    filled from the File Meta, as a C-STORE's Affected SOP Instance UID is,
    unless `identity_from_meta` is false: then a dataset without its own
    SOPInstanceUID is refused (received bytes that do not parse as a dataset
    often read as one long unknown element and nothing else).

    Files without the Part 10 ``DICM`` prefix are read only if they parse as a
    dataset that identifies itself with valid SOP Class and Instance UIDs.

    Raises
    ------
    NotDicomError
        If `src` is not a DICOM instance (text, JPEG, empty, truncated header)
        or is a DICOMDIR.
    """
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            return read_header(f, keywords, identity_from_meta=identity_from_meta)

    start = src.tell()
    head = src.read(HEADER_PREFIX)
    has_meta = has_dicm_prefix(head)
    wanted = list(dict.fromkeys([*keywords, *IDENTITY_KEYWORDS]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = _read_dataset(src, start, head, wanted, force=not has_meta)
            if not identity_from_meta and not ds.get("SOPInstanceUID"):
                raise NotDicomError("the dataset has no SOP Instance UID")
            _identify(ds)
    except NotDicomError:
        raise
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise NotDicomError(f"cannot read the DICOM header: {exc}") from None
    except Exception as exc:  # pydicom raises many kinds on arbitrary bytes
        raise NotDicomError(f"cannot read the DICOM header: {type(exc).__name__}: {exc}") from None
    if not has_meta and not _looks_like_instance(ds):
        raise NotDicomError("not a DICOM file (no DICM prefix and no SOP identity)")
    return ds


def _read_dataset(
    src: BinaryIO, start: int, head: bytes, wanted: list[str], *, force: bool
) -> Dataset:
    """``dcmread(src, stop_before_pixels=True, specific_tags=wanted)``, parsed
    from `head` (the first bytes of `src`) when it holds the whole header.

    Parsing bytes in memory spares pydicom's many ``tell``/``seek`` calls on
    the file object. `head` holds the whole header when the parse stopped at the
    pixel data or `head` is the whole file; otherwise the same parse runs on
    `src`. Either way `src` is left where the parse stopped, as ``dcmread``
    leaves it.
    """
    tags = [Tag(k) for k in wanted]
    at_pixels = False

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal at_pixels
        at_pixels = tag in _PIXEL_TAGS
        return at_pixels

    buffer = BytesIO(head)
    try:
        ds = read_partial(buffer, stop, force=force, specific_tags=tags)
    except Exception:
        if len(head) < HEADER_PREFIX:  # the whole file was there: a real error
            raise
    else:
        if at_pixels or len(head) < HEADER_PREFIX:
            src.seek(start + buffer.tell())
            return ds
    src.seek(start)  # a header longer than `head`
    return read_partial(src, stop, force=force, specific_tags=tags)


def _identify(ds: Dataset) -> None:
    """Fill the SOP identity from the File Meta where the dataset lacks it, and
    refuse a DICOMDIR."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        if meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS:
            raise NotDicomError("a DICOMDIR (media index), not an instance")
        if not ds.get("SOPInstanceUID") and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        if not ds.get("SOPClassUID") and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
    if ds.get("SOPClassUID") == DICOMDIR_SOP_CLASS:
        raise NotDicomError("a DICOMDIR (media index), not an instance")


def _looks_like_instance(ds: Dataset) -> bool:
    try:
        uids = [UID(str(ds.get(k) or "")) for k in IDENTITY_KEYWORDS]
    except Exception:
        return False
    return all(uid and uid.is_valid for uid in uids)



def check_complete(src: BinaryIO, ds: Dataset) -> None:
    """Raise :class:`NotDicomError` if the file behind `ds` is cut short.

    Call it right after :func:`read_header` read `ds` from `src`: the stream
    then stands where the header reading stopped (before the pixel data, or at
    the end). Only element headers are read from there on, never a value: the
    declared lengths of the pixel data (or the fragments of encapsulated pixel
    data) and of any element after it must fit in the file. A header that
    itself ran past the end of the file is caught too.

    Examples
    --------
    >>> from pydicom.data import get_testdata_file
    >>> with open(get_testdata_file("MR_truncated.dcm"), "rb") as f:
    ...     check_complete(f, read_header(f, ["PatientName"]))
    Traceback (most recent call last):
    ...
    scp.errors.TruncatedError: truncated: ...
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return  # the stream is compressed as a whole; its positions mean nothing here
    pos = src.tell()
    size = src.seek(0, os.SEEK_END)
    try:
        if pos > size:
            raise TruncatedError(
                f"truncated: the header runs past the end of the file ({size} bytes)"
            )
        start = _dataset_start(ds)
        if start is not None and start >= size:
            raise TruncatedError(
                f"truncated: the file ({size} bytes) ends before its dataset begins "
                f"(File Meta up to byte {start})"
            )
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            return
        if pos >= size and start is not None:
            # The header parse reached the end of the file: pydicom accepts a last
            # value shorter than its length says, so walk the elements themselves.
            _check_elements(src, start, size, bool(implicit), bool(little), _MAX_WALKED_ELEMENTS)
            return
        _check_elements(src, pos, size, bool(implicit), bool(little))
    finally:
        src.seek(pos)


def _dataset_start(ds: Dataset) -> int | None:
    """Where the dataset of a Part 10 file starts (after its File Meta), if known."""
    meta = getattr(ds, "file_meta", None)
    length = meta.get("FileMetaInformationGroupLength") if meta is not None else None
    try:
        return _PREAMBLE + len(_MAGIC) + 12 + int(length) if length is not None else None
    except (TypeError, ValueError):
        return None


def _check_elements(
    f: BinaryIO, pos: int, size: int, implicit: bool, little: bool,
    limit: int = _MAX_TRAILING_ELEMENTS,
) -> None:
    endian = "<" if little else ">"
    for _ in range(limit):
        if pos >= size:
            return
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            _truncated_unless_padding(head + f.read(), size)
            return
        tag = struct.unpack(endian + "HH", head[:4])
        if implicit or tag[0] == 0xFFFE:
            (length,) = struct.unpack(endian + "L", head[4:])
            pos += 8
        else:
            vr = head[4:6]
            if not vr.isalpha():
                return  # not an element header we understand: don't guess
            if vr in _LONG_VRS:
                extra = f.read(4)
                if len(extra) < 4:
                    raise TruncatedError(f"truncated: element {_fmt(tag)} is cut off")
                (length,) = struct.unpack(endian + "L", extra)
                pos += 12
            else:
                (length,) = struct.unpack(endian + "H", head[6:])
                pos += 8
        if length == _UNDEFINED_LENGTH:
            if tag != _PIXEL_DATA:
                return  # a sequence of undefined length: too costly to follow
            pos = _skip_fragments(f, pos, size, endian)
            continue
        pos += length
        if pos > size:
            raise TruncatedError(
                f"truncated: element {_fmt(tag)} declares {length} bytes, "
                f"the file ends {pos - size} bytes short"
            )


def _skip_fragments(f: BinaryIO, pos: int, size: int, endian: str) -> int:
    """Follow the items of encapsulated pixel data; return the position after
    its sequence delimiter."""
    for _ in range(_MAX_FRAGMENTS):
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            raise TruncatedError("truncated: the encapsulated pixel data is cut off")
        group, element, length = struct.unpack(endian + "HHL", head)
        pos += 8
        if (group, element) == _SEQUENCE_DELIMITER:
            return pos
        if (group, element) != _ITEM or length == _UNDEFINED_LENGTH:
            return size  # not the layout we expect: don't guess
        pos += length
        if pos > size:
            raise TruncatedError(
                f"truncated: a pixel data fragment declares {length} bytes, "
                f"the file ends {pos - size} bytes short"
            )
    return size


def _truncated_unless_padding(rest: bytes, size: int) -> None:
    if rest.strip(b"\0"):
        raise TruncatedError(f"truncated: the file ends inside an element header ({size} bytes)")


def _fmt(tag: tuple[int, int]) -> str:
    return f"({tag[0]:04X},{tag[1]:04X})"

"""Read just enough of a DICOM header to name the file.

One reader serves bytes received from the network and files on disk: it takes
a binary stream or a path, and opens a file only when it was given a path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from scp.errors import NotDicomError

#: Tags read on top of the template's: they identify the instance.
IDENTITY_KEYWORDS = ("SOPClassUID", "SOPInstanceUID")

#: Media Storage Directory Storage: a DICOMDIR, an index rather than an instance.
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

_PREAMBLE = 128
_MAGIC = b"DICM"


def has_dicm_prefix(head: bytes) -> bool:
    """True if `head` (the first 132 bytes or more) carries the Part 10 ``DICM``."""
    return head[_PREAMBLE : _PREAMBLE + 4] == _MAGIC


def read_header(src: BinaryIO | str | os.PathLike[str], keywords: Iterable[str]) -> Dataset:
    """Read the tags in `keywords` (and the SOP identity) from a DICOM header.

    Pixel data and every other tag are skipped; SpecificCharacterSet always comes
    along, so names decode correctly. A missing SOPInstanceUID or SOPClassUID is
    filled from the File Meta, as a C-STORE's Affected SOP Instance UID is.

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
            return read_header(f, keywords)

    start = src.tell()
    head = src.read(_PREAMBLE + 4)
    src.seek(start)
    has_meta = has_dicm_prefix(head)
    wanted = list(dict.fromkeys([*keywords, *IDENTITY_KEYWORDS]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(src, stop_before_pixels=True, specific_tags=wanted, force=not has_meta)
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


"""The DICOM data dictionary, without importing pydicom.

``import pydicom`` costs about 0.17 s here (its configuration imports the pixel
handlers, numpy and requests), while naming a file needs only a keyword's tag
and VR. So this module loads pydicom's own dictionary table
(``pydicom/_dicom_dict.py``, a module of plain literals that imports nothing)
as a standalone module: the same table, read in a few milliseconds. Anything
it cannot answer (a repeating-group tag such as ``60xx,3000``) and any failure
to load the table go to :mod:`pydicom.datadict` itself, so the answers are
always pydicom's.

>>> tag_for_keyword("PatientName") == 0x00100010, dictionary_vr(0x00100010)
(True, 'PN')
>>> keyword_for_tag(0x00200011), tag_for_keyword("NoSuchKeyword") is None
('SeriesNumber', True)
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

__all__ = ["tag_for_keyword", "keyword_for_tag", "dictionary_vr"]

#: (VR, VM, name, retired, keyword) by tag, as in pydicom.
Entry = tuple[str, str, str, str, str]


@cache
def _tables() -> tuple[dict[int, Entry], dict[str, int]]:
    """pydicom's DicomDictionary and its keyword -> tag table (built as pydicom
    builds ``keyword_dict``: a later tag of a keyword wins)."""
    table: dict[int, Entry] | None = None
    try:
        spec = importlib.util.find_spec("pydicom")  # finds the package, imports nothing
        locations = spec.submodule_search_locations if spec is not None else None
        if locations:
            path = os.path.join(list(locations)[0], "_dicom_dict.py")
            standalone = importlib.util.spec_from_file_location("_sortscp_dicom_dict", path)
            if standalone is not None and standalone.loader is not None:
                module = importlib.util.module_from_spec(standalone)
                standalone.loader.exec_module(module)
                table = module.DicomDictionary
                if not isinstance(table, dict) or not table:
                    table = None
    except Exception:
        table = None
    if table is None:
        from pydicom.datadict import DicomDictionary

        table = DicomDictionary
    return table, {entry[4]: tag for tag, entry in table.items()}


def tag_for_keyword(keyword: str) -> int | None:
    """The tag of `keyword`, or None (as :func:`pydicom.datadict.tag_for_keyword`)."""
    return _tables()[1].get(keyword)


def keyword_for_tag(tag: int) -> str:
    """The keyword of `tag`, or ``""`` (as :func:`pydicom.datadict.keyword_for_tag`)."""
    entry = _tables()[0].get(tag)
    if entry is not None:
        return entry[4]
    from pydicom.datadict import keyword_for_tag as pydicom_keyword_for_tag

    return pydicom_keyword_for_tag(tag)


def dictionary_vr(tag: int) -> str:
    """The VR of `tag` (as :func:`pydicom.datadict.dictionary_VR`; ``KeyError``
    if it is not in the dictionary)."""
    entry = _tables()[0].get(tag)
    if entry is not None:
        return entry[0]
    from pydicom.datadict import dictionary_VR

    return dictionary_VR(tag)

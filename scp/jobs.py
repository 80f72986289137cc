"""Worker entry points: top-level, picklable, each returning :class:`Outcome` s.

``serve``'s job (:func:`store_received`) and the instance facts: they read the
header with :func:`scp.dicom.header.read_header`, name the file with
:func:`scp.layout.relative_path` and create it with :mod:`scp.store`. pydicom
and the instance index are imported here, up front: ``serve``'s forkserver
preloads this module once for all its workers. ``sort``'s jobs live in
:mod:`scp.sort_jobs`, which imports neither.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from scp.config import ServeConfig
from scp.dicom.header import (
    IDENTITY_KEYWORDS,
    check_complete,
    dataset_from_elements,
    read_header,
    wanted_tags,
)
from scp.dicom.meta import PREAMBLE
from scp.dicom.walk import SOP_CLASS_UID, encoding_of
from scp.enums import Duplicate, Fsync, Placement, Result
from scp.errors import DatasetMismatch, NotDicomError
from scp.layout import Template, raw_texts, relative_path, relative_path_raw
from scp.log import safe
from scp.report import Outcome
from scp.store.index import (
    IndexInUseError,
    IndexStaleError,
    SqliteIndex,
    damaged,
    is_damage,
    rebuild,
    repair_in_use,
)
from scp.store.instance import commit_instance

__all__ = [
    "ReceivedHeader", "header_tags", "store_received", "FACT_KEYWORDS", "instance_facts",
    "identity_facts", "worker_index",
]

log = logging.getLogger(__name__)

_STORED = {
    Placement.STORED: (Result.STORED, ""),
    Placement.STORED_AS_COPY: (
        Result.STORED,
        "another file with this SOPInstanceUID and other bytes is already stored; kept both",
    ),
    Placement.REPLACED: (Result.STORED, "replaced an earlier file with other bytes"),
    Placement.IDENTICAL: (Result.ALREADY, ""),
    Placement.KEPT_EXISTING: (Result.ALREADY, "kept the first file received; other bytes dropped"),
}


# --- serve ------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedHeader:
    """The header values the network thread kept while the dataset arrived
    (:meth:`scp.net.sink.IncomingDataset.header`), so that the worker does not
    read the file's header again: the raw top-level values of
    :func:`header_tags`, as :func:`scp.dicom.header.read_header` would have
    read them."""

    elements: dict[int, tuple[str | None, bytes]]
    implicit: bool
    little: bool
    transfer_syntax: str
    #: the command's Affected SOP Class UID (a dataset without its own gets it, as from the File Meta)
    sop_class_uid: str
    #: the command's Affected SOP Instance UID (the File Meta's)
    sop_instance_uid: str
    #: where the dataset starts in the file (the length of our File Meta)
    dataset_offset: int


def header_tags(cfg: ServeConfig) -> tuple[int, ...]:
    """The tags :func:`store_received` reads: the template's and the index's."""
    return wanted_tags((*cfg.template.keywords, *FACT_KEYWORDS, *IDENTITY_KEYWORDS))


def store_received(received: str, calling_aet: str, cfg: ServeConfig,
                   header: ReceivedHeader | None = None) -> Outcome:
    """File one instance received by the SCP.

    `received` is the complete temporary file the network thread wrote while
    the dataset arrived (:mod:`scp.net.sink`): our File Meta, then the dataset
    exactly as sent, already checked complete and naming the command's
    instance. It is flushed and linked into the layout as it is (the dataset
    is written once), through the instance index so that the tree keeps one
    file per SOPInstanceUID (:mod:`scp.store.instance`). Its header is read
    from the file only if the network thread could not keep it (`header`).
    Exceptions propagate: the handler maps each to a DIMSE status.
    """
    if header is not None:
        size = os.stat(received).st_size
        offset = header.dataset_offset
        rel, uid, facts = named_from_header(header, cfg.template, size, calling_aet)
        expected = header.sop_instance_uid
    else:
        with open(received, "rb") as src:
            ds = read_header(src, (*cfg.template.keywords, *FACT_KEYWORDS), identity_from_meta=False)
            if encoding_of(str(ds.file_meta.get("TransferSyntaxUID", ""))) is None:
                # a private transfer syntax: the network thread could not walk it;
                # walked here in the encoding pydicom read its header with
                check_complete(src, ds)
            size = os.fstat(src.fileno()).st_size
        offset = _dataset_offset(ds)
        _same_class(ds)
        uid = str(ds.get("SOPInstanceUID") or "")
        expected = str(ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
        if not uid:
            raise DatasetMismatch(f"the dataset has no SOP Instance UID (the command says {expected})")
        rel = relative_path(ds, cfg.template)
        facts = instance_facts(ds, size, calling_aet)
    # The name and the index row follow the UID read here. The network thread
    # checked the dataset against the command with its own reader; pydicom,
    # which reads what it did not keep, can see another UID in the same bytes
    # (a VR encoding switched mid-dataset, a private transfer syntax): such a
    # file would replace another instance's under a Success for this one.
    if uid.rstrip("\0 ") != expected.rstrip("\0 "):
        raise DatasetMismatch(
            f"the dataset's SOP Instance UID {uid!r} (as its header is read to file it) "
            f"is not the command's {expected!r}"
        )
    try:
        done = commit_instance(
            Path(received), cfg.out, rel, uid, facts, worker_index(cfg.out), on_conflict=cfg.on_duplicate,
            durable=cfg.fsync is Fsync.ALWAYS, holds=holds_instance,
        )
    except Exception as exc:
        if is_damage(exc):  # the next instance opens it again: waits for its rebuild, not this failure
            forget_index(cfg.out)
        raise
    result, note = _STORED[done.placement]
    if done.not_removed is not None:
        log.warning(
            "%s: not removed as the earlier copy of %s: it holds something else now "
            "(files moved by hand? run sortscp reindex)", safe(done.not_removed), safe(uid),
            extra={"event": "obsolete_kept", "path": done.not_removed, "sop_instance": uid},
        )
    if done.missing is not None:
        log.warning(
            "the index had %s at %s, which holds no file any more (moved or removed by hand?); "
            "filed at %s: run sortscp reindex to find any copy of it elsewhere", safe(uid),
            safe(done.missing), safe(str(rel)),
            extra={"event": "indexed_file_missing", "path": done.missing, "sop_instance": uid},
        )
    if done.other is not None:
        if done.placement is Placement.KEPT_EXISTING:
            note = f"kept the first copy received, at {done.other}; this one (for {rel}) dropped"
        elif cfg.on_duplicate is Duplicate.BOTH:
            note = f"an earlier copy stays at {done.other}"
        else:
            note = f"replaced the earlier copy at {done.other} (removed)"
    nbytes = size - offset  # the dataset, as received
    if done.size is not None:  # the file there is an earlier copy: its size
        facts = {**facts, "size": done.size}
    mine = done.placement is not Placement.KEPT_EXISTING  # (kept: the file there is the first copy)
    return Outcome(result, received, str(done.final.relative_to(cfg.out)), note, nbytes,
                   facts=facts if mine else None, placement=done.placement.value)


#: Header values kept in the instance index (besides the template's).
FACT_KEYWORDS = (
    "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientName", "PatientID",
    "StudyDate", "SeriesDescription", "SeriesNumber", "Modality",
)


def named_from_header(header: ReceivedHeader, template: Template, size: int,
                      calling_aet: str) -> tuple[PurePosixPath, str, dict[str, Any]]:
    """Where the received instance goes, its SOP Instance UID and its index
    facts, from the values the network thread kept: straight from the raw
    bytes for plain values (:func:`~scp.layout.relative_path_raw`,
    :func:`~scp.layout.raw_texts`), else through a pydicom dataset. Both give
    the same (``tests/test_sink_header.py`` compares them on every bundled file)."""
    elements = _with_sop_class(header)
    rel = relative_path_raw(elements, template)
    if rel is not None:
        texts = raw_texts(elements, _RAW_KEYWORDS)
        if texts is not None and texts["SOPInstanceUID"]:
            facts = _facts(texts.get, size, header.transfer_syntax, calling_aet)
            return rel, str(texts["SOPInstanceUID"]), facts
    ds = _dataset_from_header(header, elements)
    return relative_path(ds, template), str(ds.SOPInstanceUID), instance_facts(ds, size, calling_aet)


def instance_facts(ds: Dataset, size: int, calling_aet: str | None = None) -> dict[str, Any]:
    """The index's facts of an instance read with :data:`FACT_KEYWORDS`."""
    def text(keyword: str) -> str | None:
        try:
            value = ds.get(keyword)
            if isinstance(value, MultiValue):  # as the header holds it ('1.2.3\\1.2.4'), not a Python list
                value = "\\".join(map(str, value))
            return None if value is None or value == "" else str(value)
        except Exception:  # noqa: BLE001 - a value pydicom cannot convert (IS "inf", FD of 4 bytes):
            return None  # unknown, as the layout renders it; it must not refuse the instance

    meta = getattr(ds, "file_meta", None)
    if calling_aet is None and meta is not None:
        calling_aet = str(meta.get("SourceApplicationEntityTitle", "")).strip() or None
    syntax = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
    return _facts(text, size, syntax, calling_aet)


def _facts(text: Callable[[str], str | None], size: int, transfer_syntax: str | None,
           calling_aet: str | None) -> dict[str, Any]:
    """The index's facts, each header value as ``text(keyword)`` gives it.
    The digest is left unknown: computing it would cost every C-STORE a read
    of the file; the manifest of a completed series computes it."""
    return {
        "size": size,
        "digest": None,
        "sop_class_uid": text("SOPClassUID"),
        "transfer_syntax_uid": transfer_syntax,
        "study_instance_uid": text("StudyInstanceUID"),
        "series_instance_uid": text("SeriesInstanceUID"),
        "patient_name": text("PatientName"),
        "patient_id": text("PatientID"),
        "study_date": text("StudyDate"),
        "series_description": text("SeriesDescription"),
        "series_number": text("SeriesNumber"),
        "modality": text("Modality"),
        "calling_aet": calling_aet,
    }


def holds_instance(path: Path, uid: str) -> bool:
    """Whether the file at `path` is (still) an instance `uid`, or is gone:
    asked before a replaced copy is removed (only then: a header read)."""
    try:
        ds = read_header(path, ())
    except FileNotFoundError:
        return True
    except (NotDicomError, OSError):
        return False
    return str(ds.get("SOPInstanceUID", "")).rstrip("\0 ") == uid.rstrip("\0 ")


def identity_facts(path: Path) -> dict[str, Any] | None:
    """What :func:`scp.store.index.rebuild` needs of a file of the tree."""
    with open(path, "rb") as f:  # checked complete: a fragment is not the instance
        ds = read_header(f, FACT_KEYWORDS, check=True)
        size = os.fstat(f.fileno()).st_size
    return {"sop_instance_uid": str(ds.SOPInstanceUID), **instance_facts(ds, size)}


#: The index of each output root, opened once per process (never across fork).
_INDEXES: dict[tuple[int, Path], SqliteIndex] = {}


def worker_index(root: Path) -> SqliteIndex:
    """This process's connection to the index of `root` (opened on first use;
    the server's main process created and recovered it before any worker ran)."""
    key = (os.getpid(), Path(root))
    index = _INDEXES.get(key)
    if index is not None and index.moved_away():  # removed while we ran (by hand, with the folder), or rebuilt since
        index.close()
        index = None
    if index is None:
        for stale in [k for k in _INDEXES if k[0] != key[0]]:
            del _INDEXES[stale]  # inherited through fork: never used here
        index = _INDEXES[key] = _open_or_rebuild(Path(root))
    return index


#: Output roots whose index this process found damaged: opened again only once it is not.
_DAMAGED_SEEN: set[Path] = set()


def forget_index(root: Path) -> None:
    """Close this process's connection to the index of `root`, found damaged:
    the next instance waits for its rebuild (:func:`_open_or_rebuild`)."""
    _DAMAGED_SEEN.add(Path(root))
    index = _INDEXES.pop((os.getpid(), Path(root)), None)
    if index is not None:
        with contextlib.suppress(Exception):
            index.close()


#: Seconds a worker that finds the index gone waits for the server's main
#: process to rebuild it (its watch looks once a second) before it does.
MAIN_REPAIR_WAIT = 5.0


def _open_or_rebuild(root: Path, attempts: int = 50) -> SqliteIndex:
    """Open the index of `root`. If it is gone or damaged (the folder, or the
    index alone, was removed while the server ran), the server's main process
    rebuilds it (:meth:`~scp.store.index.SqliteIndex.repair`, which keeps its
    series' completion state): wait for that, up to :data:`MAIN_REPAIR_WAIT`;
    then rebuild it from what the tree holds now, under its own lock if no one
    holds it, else as :func:`~scp.store.index.repair_in_use` does. Another
    process may be doing the same: then wait for its rebuild."""
    patience = time.monotonic() + MAIN_REPAIR_WAIT

    def wait_for_repair() -> None:
        while time.monotonic() < patience and damaged(root):
            time.sleep(0.05)

    if root in _DAMAGED_SEEN:  # (a connection may open it and fail only at the first write)
        _DAMAGED_SEEN.discard(root)
        wait_for_repair()
    for _ in range(attempts):
        try:
            return SqliteIndex(root)
        except IndexStaleError:
            if time.monotonic() < patience:
                wait_for_repair()
                continue
            try:
                rebuild(root, identity_facts)
            except IndexInUseError:  # the server's processes hold it shared, on a file none of them reaches
                try:
                    repair_in_use(root, identity_facts)
                except IndexInUseError:
                    time.sleep(0.1)
        except IndexInUseError:
            time.sleep(0.1)
    return SqliteIndex(root)


#: What :func:`named_from_header` reads as text.
_RAW_KEYWORDS = (*FACT_KEYWORDS, "SOPInstanceUID")


def _same_class(ds: Dataset) -> None:
    """A dataset read by pydicom names the SOP Class of its File Meta (the
    command's), or none."""
    try:
        value = ds.get("SOPClassUID")
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert
        value = None
    found = str(value or "").rstrip("\0 ")
    expected = str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if found and found != expected.rstrip("\0 "):
        raise DatasetMismatch(f"the dataset's SOP Class UID {found!r} is not the command's {expected!r}")


def _with_sop_class(header: ReceivedHeader) -> dict[int, tuple[str | None, bytes]]:
    """The kept values; a dataset without its own SOP Class UID gets the command's."""
    elements = header.elements
    if not elements.get(SOP_CLASS_UID, (None, b""))[1].strip(b"\0 ") and header.sop_class_uid:
        elements = {**elements, SOP_CLASS_UID: ("UI", header.sop_class_uid.encode("ascii"))}
    return elements


def _dataset_from_header(header: ReceivedHeader,
                         elements: dict[int, tuple[str | None, bytes]] | None = None) -> Dataset:
    """The kept values as a pydicom dataset (`elements`: those of
    :func:`_with_sop_class`, if already at hand)."""
    if elements is None:
        elements = _with_sop_class(header)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = UID(header.transfer_syntax)
    return dataset_from_elements(elements, header.implicit, header.little, file_meta=meta)


def _dataset_offset(ds: Dataset) -> int:
    """Where the dataset starts in a Part 10 file: after the preamble, ``DICM``,
    the group length element (12 bytes) and the File Meta group it measures."""
    length = ds.file_meta.get("FileMetaInformationGroupLength")
    if length is None:
        raise NotDicomError("the received File Meta has no group length")
    return len(PREAMBLE) + 12 + int(length)

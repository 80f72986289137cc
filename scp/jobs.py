"""Worker entry points: top-level, picklable, each returning :class:`Outcome` s.

Both read the header with :func:`scp.dicom.header.read_header`, name the file with
:func:`scp.layout.relative_path` and create it with :mod:`scp.store`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset

from scp.config import ServeConfig, SortConfig
from scp.dicom.header import check_complete, read_header
from scp.dicom.meta import PREAMBLE
from scp.enums import Duplicate, Mode, Placement, Result
from scp.errors import NotDicomError, SortscpError, TruncatedError
from scp.layout import relative_path
from scp.report import Outcome
from scp.store.commit import commit_file
from scp.store.place import MoveBatch, place

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


def store_received(received: str, calling_aet: str, cfg: ServeConfig) -> Outcome:
    """File one instance received by the SCP.

    `received` is the complete temporary file the network thread wrote while
    the dataset arrived (:mod:`scp.net.sink`): our File Meta, then the dataset
    exactly as sent. It is flushed and linked into the layout as it is: the
    dataset is written once. Exceptions propagate: the handler maps each to a
    DIMSE status.
    """
    with open(received, "rb") as src:
        ds = read_header(src, cfg.template.keywords, identity_from_meta=False)
        size = os.fstat(src.fileno()).st_size - _dataset_offset(ds)  # the dataset, as received
    rel = relative_path(ds, cfg.template)
    final, placement = commit_file(Path(received), cfg.out, rel, on_conflict=cfg.on_duplicate)
    result, note = _STORED[placement]
    return Outcome(result, received, str(final.relative_to(cfg.out)), note, size)


def _dataset_offset(ds: Dataset) -> int:
    """Where the dataset starts in a Part 10 file: after the preamble, ``DICM``,
    the group length element (12 bytes) and the File Meta group it measures."""
    length = ds.file_meta.get("FileMetaInformationGroupLength")
    if length is None:
        raise NotDicomError("the received File Meta has no group length")
    return len(PREAMBLE) + 12 + int(length)


# --- sort -------------------------------------------------------------------


def sort_file(path: str, cfg: SortConfig, batch: MoveBatch | None = None) -> Outcome:
    """Put one file of the source tree into the layout (or plan it, with --dry-run).

    A file that is not a DICOM instance (text, image, DICOMDIR, empty, or cut
    short: see :func:`scp.dicom.header.check_complete`) is skipped and left where it
    was; any other problem is reported as a failure with its reason, never raised.
    """
    try:
        with open(path, "rb") as f:
            ds = read_header(f, cfg.template.keywords)
            check_complete(f, ds)
            size = os.fstat(f.fileno()).st_size
        rel = relative_path(ds, cfg.template)
        if cfg.dry_run:
            return Outcome(Result.PLANNED, path, str(rel), "", size)
        final, placement = place(
            Path(path), cfg.dst, rel, cfg.mode, on_conflict=Duplicate.BOTH, durable=cfg.fsync,
            batch=batch,
        )
    except TruncatedError as exc:
        reason = str(exc)
        return Outcome(Result.SKIPPED, path, "", reason if reason.startswith("truncated") else f"truncated: {reason}")
    except NotDicomError as exc:
        return Outcome(Result.SKIPPED, path, "", str(exc))
    except (SortscpError, OSError) as exc:
        return Outcome(Result.FAILED, path, "", _reason(exc))
    except Exception as exc:  # never lose track of a file: report it
        return Outcome(Result.FAILED, path, "", f"{type(exc).__name__}: {exc}")
    result, note = _STORED[placement]
    return Outcome(result, path, str(final.relative_to(cfg.dst)), note, size)


def sort_files(paths: Sequence[str], cfg: SortConfig) -> list[Outcome]:
    """:func:`sort_file` for a batch of paths: one round trip to a worker per batch.

    Moves between separate trees share their folder flushes (see
    :class:`~scp.store.place.MoveBatch`). When one tree holds the other, a source
    may be a destination name of the same batch, so each move then completes
    on its own, in order.
    """
    if cfg.mode is not Mode.MOVE or cfg.dry_run or _nested(cfg):
        return [sort_file(p, cfg) for p in paths]
    batch = MoveBatch()
    outcomes = [sort_file(p, cfg, batch) for p in paths]
    failed = batch.finish()
    return [
        Outcome(Result.FAILED, o.source, "", _reason(failed[key]))
        if (key := os.fspath(Path(o.source))) in failed else o
        for o in outcomes
    ]


def _nested(cfg: SortConfig) -> bool:
    """True if SRC and DST are the same folder or one lies inside the other."""
    src, dst = os.path.realpath(cfg.src), os.path.realpath(cfg.dst)
    return src == dst or dst.startswith(src.rstrip(os.sep) + os.sep) or src.startswith(
        dst.rstrip(os.sep) + os.sep
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__

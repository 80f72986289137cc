"""Worker entry points: top-level, picklable, each returning :class:`Outcome` s.

Both read the header with :func:`scp.reader.read_header`, name the file with
:func:`scp.layout.relative_path` and create it with :mod:`scp.writer`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset

from scp import IMPLEMENTATION_CLASS_UID
from scp.config import ServeConfig, SortConfig
from scp.errors import NotDicomError, SortscpError
from scp.layout import relative_path
from scp.meta import PREAMBLE, file_meta_bytes
from scp.reader import check_complete, read_header
from scp.report import Outcome, Status
from scp.writer import Mode, MoveBatch, OnConflict, Placement, commit_file, place, write_atomic

_STORED = {
    Placement.STORED: (Status.STORED, ""),
    Placement.STORED_AS_COPY: (
        Status.STORED,
        "another file with this SOPInstanceUID and other bytes is already stored; kept both",
    ),
    Placement.REPLACED: (Status.STORED, "replaced an earlier file with other bytes"),
    Placement.IDENTICAL: (Status.ALREADY, ""),
    Placement.KEPT_EXISTING: (Status.ALREADY, "kept the first file received; other bytes dropped"),
}


# --- serve ------------------------------------------------------------------


def store_received(received: str, calling_aet: str, cfg: ServeConfig) -> Outcome:
    """File one instance received by the SCP.

    `received` is the Part 10 file pynetdicom wrote while the dataset arrived:
    the File Meta, then the dataset exactly as sent. Normally it already carries
    our File Meta (:mod:`scp.receive` writes it on the way in), and the file is
    flushed and linked into the layout as it is. Otherwise a new file is
    written: our File Meta, then the same dataset bytes, copied in the kernel.
    Exceptions propagate: the handler maps each to a DIMSE status.
    """
    with open(received, "rb") as src:
        ds = read_header(src, cfg.template.keywords, identity_from_meta=False)
        rel = relative_path(ds, cfg.template)
        on_conflict = cfg.on_duplicate.on_conflict
        offset = _dataset_offset(ds)
        size = os.fstat(src.fileno()).st_size - offset  # the dataset, as received
        if ds.file_meta.get("ImplementationClassUID") == IMPLEMENTATION_CLASS_UID:
            final, placement = commit_file(Path(received), cfg.out, rel, on_conflict=on_conflict)
        else:
            head = file_meta_bytes(
                ds.file_meta.MediaStorageSOPClassUID,
                ds.file_meta.MediaStorageSOPInstanceUID,
                ds.file_meta.TransferSyntaxUID,
                calling_aet,
            )

            def fill(dst: BinaryIO) -> None:
                dst.write(head)
                dst.flush()
                _copy_range(src, dst, offset, size)

            final, placement = write_atomic(cfg.out, rel, fill, on_conflict=on_conflict)
    status, note = _STORED[placement]
    return Outcome(status, received, str(final.relative_to(cfg.out)), note, size)


def _dataset_offset(ds: Dataset) -> int:
    """Where the dataset starts in a Part 10 file: after the preamble, ``DICM``,
    the group length element (12 bytes) and the File Meta group it measures."""
    length = ds.file_meta.get("FileMetaInformationGroupLength")
    if length is None:
        raise NotDicomError("the received File Meta has no group length")
    return len(PREAMBLE) + 12 + int(length)


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, size: int) -> None:
    """Copy `size` bytes of `src` from `offset` to the end of `dst`, in the kernel
    where it can, so a large instance never passes through our memory."""
    in_fd, out_fd = src.fileno(), dst.fileno()
    try:
        while size > 0:
            n = os.copy_file_range(in_fd, out_fd, size, offset)
            if n == 0:
                raise NotDicomError("the received file is shorter than announced")
            offset += n
            size -= n
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _NO_COPY_RANGE:
            raise
        src.seek(offset)
        while size > 0:
            chunk = src.read(min(size, 1 << 20))
            if not chunk:
                raise NotDicomError("the received file is shorter than announced") from None
            dst.write(chunk)
            size -= len(chunk)


_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


# --- sort -------------------------------------------------------------------


def sort_file(path: str, cfg: SortConfig, batch: MoveBatch | None = None) -> Outcome:
    """Put one file of the source tree into the layout (or plan it, with --dry-run).

    A file that is not a DICOM instance (text, image, DICOMDIR, empty, or cut
    short: see :func:`scp.reader.check_complete`) is skipped and left where it
    was; any other problem is reported as a failure with its reason, never raised.
    """
    try:
        with open(path, "rb") as f:
            ds = read_header(f, cfg.template.keywords)
            check_complete(f, ds)
            size = os.fstat(f.fileno()).st_size
        rel = relative_path(ds, cfg.template)
        if cfg.dry_run:
            return Outcome(Status.PLANNED, path, str(rel), "", size)
        final, placement = place(
            Path(path), cfg.dst, rel, cfg.mode, on_conflict=OnConflict.BOTH, durable=cfg.fsync,
            batch=batch,
        )
    except NotDicomError as exc:
        return Outcome(Status.SKIPPED, path, "", str(exc))
    except (SortscpError, OSError) as exc:
        return Outcome(Status.FAILED, path, "", _reason(exc))
    except Exception as exc:  # never lose track of a file: report it
        return Outcome(Status.FAILED, path, "", f"{type(exc).__name__}: {exc}")
    status, note = _STORED[placement]
    return Outcome(status, path, str(final.relative_to(cfg.dst)), note, size)


def sort_files(paths: Sequence[str], cfg: SortConfig) -> list[Outcome]:
    """:func:`sort_file` for a batch of paths: one round trip to a worker per batch.

    Moves between separate trees share their folder flushes (see
    :class:`~scp.writer.MoveBatch`). When one tree holds the other, a source
    may be a destination name of the same batch, so each move then completes
    on its own, in order.
    """
    if cfg.mode is not Mode.MOVE or cfg.dry_run or _nested(cfg):
        return [sort_file(p, cfg) for p in paths]
    batch = MoveBatch()
    outcomes = [sort_file(p, cfg, batch) for p in paths]
    failed = batch.finish()
    return [
        Outcome(Status.FAILED, o.source, "", _reason(failed[key]))
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

"""``sort``'s worker jobs: top-level, picklable, each returning :class:`Outcome` s.

A worker reads an ordinary file's header raw (:func:`scp.dicom.raw.read_raw`)
and names it from the raw values (:func:`scp.layout.relative_path_raw`): the
same path as :func:`scp.dicom.header.read_header` and
:func:`scp.layout.relative_path` give, without building a pydicom dataset;
pydicom reads only what the raw path does not take. Nothing here imports
pydicom (nor the instance index) at start, so ``sortscp sort`` starts, and
forks its workers, without them (``serve``'s jobs, in :mod:`scp.jobs`, import
them up front: its forkserver preloads them once for every worker).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from scp.config import SortConfig
from scp.dicom.raw import HEADER_PREFIX, IDENTITY_KEYWORDS, Refused, read_file_start, read_raw, wanted_tags
from scp.enums import Duplicate, Fsync, Mode, Placement, Result, SkipCategory
from scp.errors import NotDicomError, SortscpError, SourceChanged, TruncatedError
from scp.layout import relative_path, relative_path_raw
from scp.report import Outcome
from scp.store import fsops
from scp.store.commit import candidates, destination
from scp.store.fsops import Identity, SourceTree, flush_count, identity
from scp.store.place import (
    PENDING,
    PLACED,
    TAKEN,
    MoveBatch,
    SortBatch,
    needs_own_copy,
    place,
    place_at,
    place_identical,
    rename_within,
)

if TYPE_CHECKING:
    from scp.layout import Template

#: Why a file is kept as ``~N``. The name may be held by another instance
#: whose UID, made safe for a path, is the same text ("1.2/3" and "1.2_3"): a
#: sort never overwrites either.
COPY_REASON = ("other bytes hold the name (a file of this SOPInstanceUID, or of one that is the "
               "same once made safe for a path); kept both")

#: What each placement of a sort is called in the report, and why (by mode).
_SORTED = {
    Placement.STORED: (Result.NEW, ""),
    Placement.STORED_AS_COPY: (Result.KEPT_AS_COPY, COPY_REASON),
    Placement.IDENTICAL: (Result.ALREADY, ""),
}
_REPLACED_WHY = {
    Mode.COPY: "a link or a hard link of the source held the name; now a copy",
    Mode.MOVE: "a link, or a file another name shares (a hard link), held the name; now the file itself",
    Mode.HARDLINK: "a symbolic link held the name; now a hard link",
    Mode.SYMLINK: "replaced what held the name",
}


@dataclass(frozen=True)
class Deferred:
    """A file whose name holds other bytes: it is named after the walk
    (:func:`sort_claims`), so that ``~N`` never depends on scheduling."""

    source: str
    rel: str
    via_link: bool = False
    #: :func:`~scp.store.fsops.identity` of the file read (None for the
    #: second of two files a dry run planned at one name).
    expect: Identity | None = None


#: One file to sort: its path in SRC and whether it was reached through a symbolic link.
Item = tuple[str, bool]


def sort_file(
    path: str, cfg: SortConfig, batch: MoveBatch | None = None, via_link: bool = False,
    fast: SortBatch | None = None,
) -> Outcome | Deferred | _Pending:
    """Put one file of the source tree into the layout (or plan it, with --dry-run).

    A file that is not a DICOM instance (text, image, DICOMDIR, empty) or is a
    fragment (cut short, :class:`~scp.errors.TruncatedError`: see :mod:`scp.dicom.walk`) is skipped and left where it
    was; one that vanished since it was listed is skipped as ``gone``; any other
    problem is a failure with its reason, never raised. A file reached through a
    symbolic link (``--follow-symlinks``) is read through it and never removed:
    a move copies it, hardlink and symlink modes link its target.

    With `fast` (not for links followed), a file whose final name is free is
    placed by :meth:`SortBatch.claim`: a copy is then :class:`_Pending` until
    :meth:`SortBatch.finish` names it; any other case goes through
    :func:`~scp.store.place.place`.
    """
    mode, target = cfg.mode, path
    if via_link:
        target = os.path.realpath(path)
        if mode is Mode.MOVE:
            mode = Mode.COPY
        fast = None
    try:
        if not via_link and fsops.SOURCES is not None and not fsops.SOURCES.reaches(path):
            return _through_swapped_link(path)
        # (O_NONBLOCK: a FIFO put in its place since the walk must not block the worker)
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):  # as open() refuses it
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), target)
            if not stat.S_ISREG(st.st_mode):
                return special_file(path, st.st_mode)
            size = st.st_size
            rel = _sort_name(fd, st, cfg.template)  # header and completeness: one pass
            if fast is not None:
                final = destination(cfg.dst, rel)
                claimed = fast.claim(Path(target), fd, st, final, str(rel))
                if claimed == PENDING:
                    return _Pending(path, str(rel), size)
                if claimed == PLACED:
                    return Outcome(Result.NEW, path, str(rel), "", size)
        finally:
            os.close(fd)
        final, placement = place(
            Path(target), cfg.dst, rel, mode, on_conflict=Duplicate.BOTH,
            durable=cfg.fsync is Fsync.ALWAYS, batch=batch, defer=True, dry_run=cfg.dry_run,
            expect=identity(st, str(rel)),
        )
    except TruncatedError as exc:
        return Outcome(Result.SKIPPED, path, "", f"truncated: {exc}", category=SkipCategory.TRUNCATED.value)
    except NotDicomError as exc:
        return Outcome(Result.SKIPPED, path, "", str(exc), category=SkipCategory.NOT_DICOM.value)
    except (SortscpError, OSError) as exc:
        if isinstance(exc, FileNotFoundError) and not os.path.lexists(target):
            return gone(path)
        return Outcome(Result.FAILED, path, "", failure_reason(exc))
    except Exception as exc:  # never lose track of a file: report it
        return Outcome(Result.FAILED, path, "", f"{type(exc).__name__}: {exc}")
    if placement is Placement.DEFERRED:
        return Deferred(path, str(rel), via_link, identity(st, str(rel)))
    dest = str(final.relative_to(cfg.dst))
    if placement is Placement.REPLACED:
        result, note = Result.REPLACED, _REPLACED_WHY[mode]
    else:
        result, note = _SORTED[placement]
    if via_link:
        note = "; ".join(filter(None, [note, f"through a symbolic link to {target}"]))
    if cfg.dry_run and result in (Result.NEW, Result.REPLACED):
        result = Result.PLANNED
    return Outcome(result, path, dest, note, size)


def _through_swapped_link(path: str) -> Outcome:
    if not os.path.lexists(path):  # (its folder is gone: another process moved it and pruned the folder)
        return gone(path)
    return Outcome(Result.SKIPPED, path, "", "a folder on its path became a symbolic link during the run; "
                   "not followed (see --follow-symlinks)", category=SkipCategory.SYMLINK.value)


#: The tags a sort reads, by template text.
_SORT_TAGS: dict[str, tuple[int, ...]] = {}


def _sort_name(fd: int, st: os.stat_result, template: Template) -> PurePosixPath:
    """Where the file open as `fd` (its ``fstat`` `st`) goes, its completeness
    checked in the same pass: what ``read_header(f, template.keywords,
    check=True)`` and :func:`~scp.layout.relative_path` give, raising what they
    raise. An ordinary file is read with one ``pread`` and named from its raw
    values; pydicom reads (and names) only what the raw path does not take."""
    tags = _SORT_TAGS.get(template.text)
    if tags is None:
        tags = _SORT_TAGS[template.text] = wanted_tags([*template.keywords, *IDENTITY_KEYWORDS])
    head = read_file_start(fd, st.st_size)
    src: BinaryIO | None = None
    if len(head) >= HEADER_PREFIX:  # a large file: the header may go on past the prefix
        src = open(fd, "rb", buffering=HEADER_PREFIX, closefd=False)
    try:
        try:
            # (the dataset's own SOP Instance UID: a fragment cut before it, or a
            # File Meta alone, is not filed under the File Meta's)
            raw = read_raw(src, 0, head, tags, True, identity_from_meta=False,
                           size=None if src is not None else len(head))
        except Refused as exc:
            raise NotDicomError(*exc.args) from None
        except NotDicomError:
            raise
        except Exception:
            raw = None  # read_header's fast path gives way to pydicom here too
        if raw is not None:
            rel = relative_path_raw(raw.elements, template)
            if rel is not None:
                return rel
        from scp.dicom.header import dataset_from_raw, read_header

        ds = None
        if raw is not None:
            try:
                ds = dataset_from_raw(raw)
            except Exception:
                ds = None
        if ds is None:  # pydicom reads it, from the start
            if src is None:
                src = open(fd, "rb", buffering=HEADER_PREFIX, closefd=False)
            src.seek(0)
            ds = read_header(src, template.keywords, check=True, identity_from_meta=False)
        return relative_path(ds, template)
    finally:
        if src is not None:
            src.close()  # not the descriptor (closefd=False)


def _name_by(cfg: SortConfig) -> None:
    """What a move's checks ask when only a source's change time moved: the
    name its header gives it now, by this sort's template."""
    fsops.NAMER = functools.partial(_name_now, template=cfg.template)


def _name_now(path: str, template: Template) -> str:
    """The name (relative to DST) the header of the file at `path` gives it
    now (:data:`~scp.store.fsops.NAMER`); raises if it gives none."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotDicomError("not a regular file")
        return str(_sort_name(fd, st, template))
    finally:
        os.close(fd)


def gone(path: str) -> Outcome:
    return Outcome(
        Result.SKIPPED, path, "", "removed by someone else before it was sorted",
        category=SkipCategory.GONE.value,
    )


@dataclass(frozen=True)
class _Pending:
    """A copy waiting in the temporary area for :meth:`SortBatch.finish`."""

    source: str
    rel: str
    nbytes: int


def sort_files(items: Sequence[Item], cfg: SortConfig) -> list[Outcome | Deferred]:
    """:func:`sort_file` for a batch of paths: one round trip to a worker per batch.

    Between separate trees, files whose final name is free take the fast path
    (:class:`~scp.store.place.SortBatch`: the batch shares its flushes), the
    others :func:`~scp.store.place.place`, moves sharing their folder flushes
    (:class:`~scp.store.place.MoveBatch`). When one tree holds the other, a
    source may be a destination name of the same batch, so each file then
    completes on its own, in order, through :func:`~scp.store.place.place`.
    """
    items = [(p, False) if isinstance(p, str) else p for p in items]
    if fsops.SOURCES is None or fsops.SOURCES.root != os.path.abspath(cfg.src):
        fsops.SOURCES = SourceTree(cfg.src)
    fsops.SOURCES.seen.clear()
    _name_by(cfg)
    durable = cfg.fsync is Fsync.ALWAYS
    if cfg.dry_run or _nested(cfg):
        return [_settled(sort_file(p, cfg, via_link=v)) for p, v in items]
    fast = SortBatch(cfg.dst, cfg.mode, durable)
    batch = MoveBatch(durable) if cfg.mode is Mode.MOVE else None
    sorted_ = [sort_file(p, cfg, batch, v, fast) for p, v in items]
    done = fast.finish()
    outcomes = [_named(o, done, cfg, batch) for o in sorted_]
    failed = batch.finish() if batch is not None else {}
    if not failed:
        return outcomes
    return [
        _unremoved(o, failed[key])
        if isinstance(o, Outcome) and (key := os.fspath(Path(o.source))) in failed else o
        for o in outcomes
    ]


def sort_batch(items: Sequence[Item], cfg: SortConfig) -> tuple[list[Outcome | Deferred], int]:
    """:func:`sort_files`, and how many flushes to disk it made (the run's
    report counts them: ``--fsync never`` makes none)."""
    before = flush_count()
    outcomes = sort_files(items, cfg)
    return outcomes, flush_count() - before


def _settled(o: Outcome | Deferred | _Pending) -> Outcome | Deferred:
    assert not isinstance(o, _Pending), "a copy is pending only with a SortBatch"
    return o


def _named(
    o: Outcome | Deferred | _Pending, done: dict[str, str | Exception], cfg: SortConfig,
    batch: MoveBatch | None,
) -> Outcome | Deferred:
    """What became of `o` once the fast batch finished."""
    if not done and not isinstance(o, _Pending):
        return o  # nothing of the batch waited for finish() (links, no failed removal)
    key = os.fspath(Path(o.source))  # as SortBatch names it
    if isinstance(o, _Pending):
        result = done.get(key)
        if result == PLACED:
            return Outcome(Result.NEW, o.source, o.rel, "", o.nbytes)
        if result == TAKEN:  # another file took the name meanwhile: decide as usual
            return _settled(sort_file(o.source, cfg, batch))
        if isinstance(result, FileNotFoundError) and not os.path.lexists(o.source):
            return gone(o.source)
        exc = result if isinstance(result, Exception) else OSError("not placed")
        return Outcome(Result.FAILED, o.source, "", failure_reason(exc))
    if isinstance(o, Outcome) and isinstance(done.get(key), (OSError, SourceChanged)):  # a move's source stayed
        return _unremoved(o, done[key])  # type: ignore[arg-type]
    return o


def _unremoved(o: Outcome, exc: OSError | SourceChanged) -> Outcome:
    if isinstance(exc, FileNotFoundError):  # someone else removed it: it is in place
        return o
    # (its copy is in place: the row names it, and a rename of it to ~N after the walk finds it;
    # unless that was the source's own file, a hard link, removed with it: nothing is filed)
    unfiled = isinstance(exc, SourceChanged) and exc.unfiled
    return Outcome(Result.FAILED, o.source, "" if unfiled else o.destination, failure_reason(exc))


def sort_claims(
    rel: str,
    claims: Sequence[Deferred],
    cfg: SortConfig,
    started_ns: int | None,
    planned_at_name: str | None = None,
    *,
    plain_leaving: bool = False,
) -> tuple[list[Outcome], str | None]:
    """Name the files of one final name that other bytes held during the walk.

    The rule (deterministic whatever the scheduling and the batches): a file
    already in DST before the run keeps its name; the distinct contents that
    this run brings to the name (the one this run put at the plain name
    during the walk included) are ordered by SHA-256, and take, in that order,
    the plain name if this run gave it or it is free by now (a misnamed file
    held it during the walk and was moved away), then the free ``~2``, ``~3`` ...
    Identical files share one name. If the walk gave the plain name to a file
    that does not come first, that file is renamed to its ``~N`` (a second
    link first, so its bytes are never without a name) and the first one takes
    the plain name.

    `started_ns` is the file system's clock when the run began: a plain name
    changed since was given by this run. In a dry run, `planned_at_name` is the
    source the walk planned at the plain name, and `plain_leaving` says that
    the file at the plain name is planned to move to its own name (so the plan
    gives the plain name as the run would). Returns the outcomes and, if the
    plain name's file was renamed, its new name relative to DST.
    """
    _name_by(cfg)
    root = cfg.dst
    final = destination(root, PurePosixPath(rel))
    taken = list(itertools.takewhile(os.path.lexists, candidates(final, Duplicate.BOTH)))
    ours_digest = None
    if cfg.dry_run:
        if planned_at_name is not None:
            ours_digest = _digest(planned_at_name)
    elif taken and started_ns is not None:
        st = os.lstat(final)
        if st.st_ctime_ns >= started_ns and stat.S_ISREG(st.st_mode):
            ours_digest = _held_digest(final)
    held: dict[str, Path] = {}
    for name in taken:
        if name == final and (ours_digest is not None or plain_leaving):
            continue
        d = _held_digest(name)
        if d is not None:
            held.setdefault(d, name)
    outcomes: list[Outcome] = []
    groups: dict[str, list[Deferred]] = {}
    for claim in claims:
        try:
            d = _digest(claim.source)
        except OSError as exc:
            outcomes.append(Outcome(Result.FAILED, claim.source, "", failure_reason(exc)))
            continue
        if d is None:
            outcomes.append(gone(claim.source))
            continue
        groups.setdefault(d, []).append(claim)
    order = sorted(set(groups) - set(held) | ({ours_digest} if ours_digest else set()))
    free = (c for c in candidates(final, Duplicate.BOTH) if c != final and c not in taken)
    names: dict[str, Path] = {}
    # The plain name goes to the first in order if this run gave it, or if it
    # is free by now (its holder during the walk, misnamed, moved away since).
    plain_free = not taken or plain_leaving
    for i, d in enumerate(order):
        names[d] = final if (i == 0 and (ours_digest is not None or plain_free)) else next(free)
    renamed = None
    if ours_digest is not None and names[ours_digest] != final:
        renamed = names[ours_digest]
        if not cfg.dry_run:
            rename_within(final, renamed, cfg.fsync is Fsync.ALWAYS)
    if ours_digest is not None:
        held[ours_digest] = names[ours_digest]
    for d, group in sorted(groups.items()):
        if d in held:
            for claim in group:
                outcomes.append(_claimed(claim, held[d], Placement.IDENTICAL, cfg))
            continue
        name = names[d]
        first, *rest = group
        outcomes.append(_claimed(first, name, None, cfg, replace=name == final and not plain_free))
        for claim in rest:
            outcomes.append(_claimed(claim, name, Placement.IDENTICAL, cfg))
    return outcomes, (str(renamed.relative_to(root)) if renamed is not None else None)


def _claimed(
    claim: Deferred, name: Path, placement: Placement | None, cfg: SortConfig,
    replace: bool = False,
) -> Outcome:
    """Put one deferred file at the `name` :func:`sort_claims` chose for it."""
    mode, target = cfg.mode, claim.source
    if claim.via_link:
        target = os.path.realpath(claim.source)
        mode = Mode.COPY if mode is Mode.MOVE else mode
    elif fsops.SOURCES is not None and not fsops.SOURCES.reaches(claim.source):
        return _through_swapped_link(claim.source)
    dest = str(name.relative_to(cfg.dst))
    try:
        size = os.path.getsize(target)
        durable = cfg.fsync is Fsync.ALWAYS
        if placement is Placement.IDENTICAL:
            if not cfg.dry_run and needs_own_copy(Path(target), name, mode):
                place_at(Path(target), cfg.dst, name, mode, durable=durable, replace=True,
                         expect=claim.expect, own_copy=True)
                return Outcome(Result.REPLACED, claim.source, dest, _REPLACED_WHY[mode], size)
            if not cfg.dry_run:
                place_identical(Path(target), name, mode, durable, expect=claim.expect)
            return Outcome(Result.ALREADY, claim.source, dest, "", size)
        if not cfg.dry_run:
            place_at(Path(target), cfg.dst, name, mode, durable=durable, replace=replace,
                     expect=claim.expect)
    except (SortscpError, OSError) as exc:
        if isinstance(exc, FileNotFoundError) and not os.path.lexists(target):
            return gone(claim.source)
        return Outcome(Result.FAILED, claim.source, "", failure_reason(exc))
    if name.name == PurePosixPath(claim.rel).name:
        return Outcome(Result.PLANNED if cfg.dry_run else Result.NEW, claim.source, dest, "", size)
    result, note = _SORTED[Placement.STORED_AS_COPY]
    return Outcome(result, claim.source, dest, note, size)


def _digest(path: str) -> str | None:
    """SHA-256 of a file's bytes; None if it is gone (or a dangling link).

    Raises OSError for what is not a regular file (never blocks on a FIFO)
    or cannot be read."""
    h = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _held_digest(name: Path) -> str | None:
    """What holds a taken name in DST, as :func:`_digest` gives it; a folder,
    a FIFO or an unreadable file holds it too, matching nothing this run brings."""
    try:
        return _digest(os.fspath(name))
    except OSError as exc:
        return f"unreadable:{name}:{exc.errno}"


def special_file(path: str, mode: int) -> Outcome:
    """The outcome of an entry that is a FIFO, a socket or a device (or
    anything else than a regular file and a folder): skipped, named."""
    if stat.S_ISFIFO(mode):
        what = "a FIFO (named pipe)"
    elif stat.S_ISSOCK(mode):
        what = "a socket"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        what = "a device"
    else:
        what = "not a regular file"
    return Outcome(Result.SKIPPED, path, "", what, category=SkipCategory.SPECIAL.value)


def _nested(cfg: SortConfig) -> bool:
    """True if SRC and DST are the same folder or one lies inside the other."""
    src, dst = os.path.realpath(cfg.src), os.path.realpath(cfg.dst)
    return src == dst or dst.startswith(src.rstrip(os.sep) + os.sep) or src.startswith(
        dst.rstrip(os.sep) + os.sep
    )


def failure_reason(exc: BaseException) -> str:
    """The system's words and the paths: both of a link or rename (the
    second, in DST, is often the one at fault).

    >>> failure_reason(PermissionError(13, "Permission denied", "/src/a.dcm", None, "/dst/P/S/1.2.dcm"))
    'Permission denied: /src/a.dcm -> /dst/P/S/1.2.dcm'
    """
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename and exc.filename2:
            return f"{exc.strerror}: {exc.filename} -> {exc.filename2}"
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__

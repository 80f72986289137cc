"""The only code that creates files under an output root.

Every file is first written under a temporary name in ``<root>/.sortscp-tmp``
(same file system, outside the layout), then given its final name in one step
(a hard link, which never overwrites, or ``os.replace``). A half-written file
never carries a final name, whatever happens to the process.

When the final name is already taken:

* identical bytes: nothing to do (``Placement.IDENTICAL``);
* different bytes: :class:`OnConflict` decides (replace it atomically, keep
  the existing file, or keep both, the newcomer as ``<stem>~2<ext>``,
  ``<stem>~3<ext>`` ...).
"""

from __future__ import annotations

import enum
import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from scp.errors import OutsideRootError, StoreError
from scp.pool import pid_alive

#: Folder (inside the output root) that holds files being written.
TMP_DIRNAME = ".sortscp-tmp"

_CHUNK = 1 << 20


class OnConflict(str, enum.Enum):
    """What to do when the final name holds different bytes."""

    REPLACE = "replace"  #: the newcomer atomically replaces the existing file
    KEEP = "keep"  #: the existing file stays, the newcomer is dropped
    BOTH = "both"  #: the newcomer is stored beside it as <stem>~N<ext>


class Mode(str, enum.Enum):
    """How ``sort`` puts a source file into the layout."""

    COPY = "copy"
    MOVE = "move"
    HARDLINK = "hardlink"
    SYMLINK = "symlink"


class Placement(str, enum.Enum):
    """What happened at the final name."""

    STORED = "stored"  #: a new file now carries the final name
    STORED_AS_COPY = "stored_as_copy"  #: name taken by other bytes: stored as <stem>~N<ext>
    REPLACED = "replaced"  #: different bytes were atomically replaced
    IDENTICAL = "identical"  #: the same bytes were already there
    KEPT_EXISTING = "kept_existing"  #: different bytes were there and were kept


def tmp_prefix(kind: str) -> str:
    """Start of a temporary file name: its kind and the PID of the process writing it,
    so that the files of a process that died can be recognised (:func:`remove_orphans`)."""
    return f"{kind}-{os.getpid()}-"


_TMP_OWNER = re.compile(r"^[a-z]-(\d+)-")


def remove_orphans(tmp: Path, older_than: float | None = None) -> int:
    """Remove temporary files in `tmp` whose writing process is gone (the PID in
    their name), and, with `older_than`, any file there not modified for that
    many seconds (e.g. one without a PID in its name).

    Returns how many were removed. Without `older_than`, the files of running
    processes are never touched.
    """
    cutoff = None if older_than is None else time.time() - older_than
    removed = 0
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return 0
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            match = _TMP_OWNER.match(entry.name)
            orphan = match is not None and not pid_alive(int(match.group(1)))
            if orphan or (cutoff is not None and entry.stat().st_mtime < cutoff):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def tmp_dir(root: Path) -> Path:
    """The folder for files being written under `root` (created if needed)."""
    path = root / TMP_DIRNAME
    path.mkdir(parents=True, exist_ok=True)
    return path


def destination(root: Path, rel: PurePosixPath) -> Path:
    """``root / rel``, refusing anything that would not stay inside `root`."""
    parts = rel.parts
    if (
        not parts
        or rel.is_absolute()
        or any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts)
        or parts[0] == TMP_DIRNAME
    ):
        raise OutsideRootError(f"refusing a path outside the output folder: {str(rel)!r}")
    return root.joinpath(*parts)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Permissions of the files we create (temporary files start as 0600).
_NEW_FILE_MODE = 0o666 & ~_umask()


def write_atomic(
    root: Path,
    rel: PurePosixPath,
    fill: Callable[[BinaryIO], None],
    *,
    on_conflict: OnConflict = OnConflict.REPLACE,
    durable: bool = True,
) -> tuple[Path, Placement]:
    """Write a new file at ``root / rel`` through a temporary file.

    `fill` writes the content into the open temporary file. With `durable`, the
    file and its folder are flushed to disk before this returns.
    Returns the final path (which differs from ``root / rel`` only for
    :attr:`OnConflict.BOTH`) and what happened.
    """
    final = destination(root, rel)
    tmp = _new_tmp(root)
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fchmod(f.fileno(), _NEW_FILE_MODE)
            if durable:
                os.fsync(f.fileno())
        _ensure_parent(root, final, durable)
        return _commit(tmp, final, on_conflict, durable, keep_source=False)
    finally:
        _unlink_quietly(tmp)


def commit_file(
    src: Path,
    root: Path,
    rel: PurePosixPath,
    *,
    on_conflict: OnConflict = OnConflict.REPLACE,
) -> tuple[Path, Placement]:
    """Give the complete temporary file `src` (in ``<root>/.sortscp-tmp``) its
    final name ``root / rel``, durably: the file and its folder are flushed to
    disk before this returns. `src` keeps its temporary name too (its writer
    removes it); its permissions become those of a new file (umask)."""
    final = destination(root, rel)
    os.chmod(src, _NEW_FILE_MODE)
    _fsync_path(src)
    _ensure_parent(root, final, True)
    return _commit(src, final, on_conflict, True, keep_source=True)


def place(
    src: Path,
    root: Path,
    rel: PurePosixPath,
    mode: Mode,
    *,
    on_conflict: OnConflict = OnConflict.BOTH,
    durable: bool = False,
    batch: MoveBatch | None = None,
) -> tuple[Path, Placement]:
    """Put the file `src` at ``root / rel`` by copy, move, hard or symbolic link.

    ``copy`` keeps timestamps and permissions (as ``shutil.copy2``). ``move``
    removes `src` only once its content is at a final name in the layout and
    flushed to disk; it never removes a file that *is* its own destination.
    With a `batch`, a move leaves flushing and removing `src` to
    :meth:`MoveBatch.finish`.
    """
    final = destination(root, rel)
    _ensure_parent(root, final, durable or mode is Mode.MOVE)
    if mode is Mode.COPY:
        return _place_copy(src, root, final, on_conflict, durable)
    if mode is Mode.HARDLINK:
        return _commit(src, final, on_conflict, durable, keep_source=True)
    if mode is Mode.SYMLINK:
        return _place_symlink(src, final, on_conflict)
    return _place_move(src, root, final, on_conflict, batch)


def _place_copy(
    src: Path, root: Path, final: Path, on_conflict: OnConflict, durable: bool
) -> tuple[Path, Placement]:
    existing = _find_identical(src, final, on_conflict)
    if existing is not None:  # a re-run: compare, don't copy again
        return existing, Placement.IDENTICAL
    tmp = _new_tmp(root)
    try:
        shutil.copyfile(src, tmp)
        shutil.copystat(src, tmp)
        if durable:
            _fsync_path(tmp)
        return _commit(tmp, final, on_conflict, durable, keep_source=False)
    finally:
        _unlink_quietly(tmp)


def _place_move(
    src: Path, root: Path, final: Path, on_conflict: OnConflict, batch: MoveBatch | None = None
) -> tuple[Path, Placement]:
    if _same_entry(src, final):
        return final, Placement.IDENTICAL  # already its own destination
    try:
        path, placement = _commit(src, final, on_conflict, batch is None, keep_source=True)
    except StoreError as exc:
        if not isinstance(exc.__cause__, OSError) or exc.__cause__.errno != errno.EXDEV:
            raise
        path, placement = _place_copy(src, root, final, on_conflict, durable=True)
    # The destination now holds these bytes under another name (a new hard link,
    # a copy, or the same bytes stored earlier): the source name can go. Never
    # when the source *is* that name (e.g. ``<uid>~2.dcm`` sorted in place).
    if placement is not Placement.KEPT_EXISTING and not _same_entry(src, path):
        if placement is Placement.IDENTICAL and not os.path.samefile(src, path):
            _fsync_path(path)  # stored by an earlier copy that may not be on disk yet
        if batch is not None:
            batch.remove_after_flush(src, path.parent)
            return path, placement
        os.unlink(src)
        _fsync_dir(src.parent)
    return path, placement


class MoveBatch:
    """Moves of a batch of files that share their folder flushes.

    Each move links its file into the layout at once; :meth:`finish` then
    flushes every destination folder once, and only then removes the sources
    and flushes their folders once. A source is still removed only after its
    destination is on disk, with one flush per folder instead of two per file.
    If the process dies before :meth:`finish`, the sources stay; the next run
    finds them already in place and removes them then.
    """

    def __init__(self) -> None:
        self._flush: dict[Path, None] = {}
        self._sources: list[Path] = []

    def remove_after_flush(self, src: Path, dst_folder: Path) -> None:
        self._flush.setdefault(dst_folder)
        self._sources.append(src)

    def finish(self) -> dict[str, OSError]:
        """Flush, remove the sources; return the sources that could not be removed."""
        for folder in self._flush:
            _fsync_dir(folder)
        failed: dict[str, OSError] = {}
        emptied: dict[Path, None] = {}
        for src in self._sources:
            try:
                os.unlink(src)
            except OSError as exc:
                failed[os.fspath(src)] = exc
                continue
            emptied.setdefault(src.parent)
        for folder in emptied:
            _fsync_dir(folder)
        self._flush.clear()
        self._sources.clear()
        return failed


def _same_entry(a: Path, b: Path) -> bool:
    """True if `a` and `b` are the same directory entry (not merely two hard
    links to one file)."""
    try:
        return (
            a.name == b.name
            and os.path.samefile(a, b)
            and os.path.samefile(a.parent, b.parent)
        )
    except OSError:
        return False


def _place_symlink(src: Path, final: Path, on_conflict: OnConflict) -> tuple[Path, Placement]:
    target = os.path.abspath(src)

    def identical(candidate: Path) -> bool:
        if os.path.islink(candidate) and os.readlink(candidate) == target:
            return True
        return _same_content(src, candidate)

    return _claim(
        final, on_conflict, False,
        create=lambda path: os.symlink(target, path),
        identical=identical,
        replace=lambda path: _replace_with(lambda tmp: os.symlink(target, tmp), path),
    )


def _commit(
    src: Path, final: Path, on_conflict: OnConflict, durable: bool, *, keep_source: bool
) -> tuple[Path, Placement]:
    """Give the complete file `src` the name `final` (a hard link); with
    `keep_source` false, `src` may be renamed onto a name it replaces."""
    if keep_source:
        replace = lambda path: _replace_with(lambda tmp: os.link(src, tmp), path)  # noqa: E731
    else:
        replace = lambda path: os.replace(src, path)  # noqa: E731
    return _claim(
        final, on_conflict, durable,
        create=lambda path: os.link(src, path),
        identical=lambda path: _same_content(src, path),
        replace=replace,
    )


def _claim(
    final: Path,
    on_conflict: OnConflict,
    durable: bool,
    *,
    create: Callable[[Path], None],
    identical: Callable[[Path], bool],
    replace: Callable[[Path], None],
) -> tuple[Path, Placement]:
    """Create the final name with `create` (a link, which fails if the name
    exists, so a different file is never overwritten by accident); when the name
    is taken, `identical` decides whether there is anything to do and
    `on_conflict` what."""
    for candidate in _candidates(final, on_conflict):
        try:
            create(candidate)
        except FileExistsError:
            if identical(candidate):
                return candidate, Placement.IDENTICAL
            if on_conflict is OnConflict.KEEP:
                return candidate, Placement.KEPT_EXISTING
            if on_conflict is OnConflict.REPLACE:
                replace(candidate)
                return candidate, _done(candidate, Placement.REPLACED, durable)
            continue  # OnConflict.BOTH: try the next free name
        except OSError as exc:
            raise StoreError(f"cannot create {candidate}: {os.strerror(exc.errno or 0)}") from exc
        return candidate, _done(candidate, _stored(candidate, final), durable)
    raise AssertionError("unreachable")  # pragma: no cover


def _replace_with(make: Callable[[Path], None], final: Path) -> None:
    """Atomically replace `final` by what `make` creates at a temporary name beside it."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.link")
    _unlink_quietly(tmp)
    make(tmp)
    os.replace(tmp, final)


def _find_identical(src: Path, final: Path, on_conflict: OnConflict) -> Path | None:
    """The name among `final` and its ``~N`` siblings that already holds the bytes
    of `src`, looking only as far as the names are taken."""
    for candidate in _candidates(final, on_conflict):
        if not os.path.lexists(candidate):
            return None
        if _same_content(src, candidate):
            return candidate
        if on_conflict is not OnConflict.BOTH:
            return None
    return None  # pragma: no cover - _candidates is endless for BOTH


def fs_clock_ns(root: Path) -> int:
    """The output file system's idea of "now" (ns): the change time of a file
    created and removed at once in ``<root>/.sortscp-tmp``.

    Every file created later under `root` has a change time at or after it,
    whatever the granularity of the file system's clock.
    """
    tmp = _new_tmp(root)
    try:
        return os.stat(tmp).st_ctime_ns
    finally:
        _unlink_quietly(tmp)


def _candidates(final: Path, on_conflict: OnConflict):
    yield final
    if on_conflict is OnConflict.BOTH:
        stem, ext = _split_ext(final.name)
        n = 2
        while True:
            yield final.with_name(f"{stem}~{n}{ext}")
            n += 1


def _split_ext(name: str) -> tuple[str, str]:
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


def _stored(candidate: Path, final: Path) -> Placement:
    return Placement.STORED if candidate == final else Placement.STORED_AS_COPY


def _done(path: Path, placement: Placement, durable: bool) -> Placement:
    if durable:
        _fsync_dir(path.parent)
    return placement


def _new_tmp(root: Path) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=tmp_prefix("w"), suffix=".part", dir=tmp_dir(root))
    except OSError as exc:
        raise StoreError(f"cannot write under {root}: {exc.strerror}") from exc
    os.close(fd)
    return Path(name)


def _ensure_parent(root: Path, final: Path, durable: bool) -> None:
    parent = final.parent
    if parent.is_dir():
        return
    missing = []
    while parent != root and not parent.is_dir():
        missing.append(parent)
        parent = parent.parent
    folder = root
    try:
        root.mkdir(parents=True, exist_ok=True)
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                if not folder.is_dir():
                    raise
            if durable:
                _fsync_dir(folder.parent)
    except OSError as exc:
        raise StoreError(f"cannot create folder {folder}: {exc.strerror}") from exc


def _same_content(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                ca, cb = fa.read(_CHUNK), fb.read(_CHUNK)
                if ca != cb:
                    return False
                if not ca:
                    return True
    except OSError:
        return False


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_path(path)
    except OSError:  # some file systems cannot fsync a folder; the data is synced
        pass


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

"""``sort``'s placements: copy, move, hard or symbolic link into the layout,
each ending in the commit of :mod:`scp.store.commit`."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path, PurePosixPath

from scp.enums import Duplicate, Mode, Placement
from scp.errors import StoreError
from scp.store.commit import candidates, claim, commit, destination, replace_with
from scp.store.fsops import ensure_parent, fsync_dir, fsync_path, same_content
from scp.store.tmp import new_tmp, unlink_quietly


def place(
    src: Path,
    root: Path,
    rel: PurePosixPath,
    mode: Mode,
    *,
    on_conflict: Duplicate = Duplicate.BOTH,
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
    ensure_parent(root, final, durable or mode is Mode.MOVE)
    if mode is Mode.COPY:
        return _place_copy(src, root, final, on_conflict, durable)
    if mode is Mode.HARDLINK:
        return commit(src, final, on_conflict, durable, keep_source=True)
    if mode is Mode.SYMLINK:
        return _place_symlink(src, final, on_conflict)
    return _place_move(src, root, final, on_conflict, batch)


def _place_copy(
    src: Path, root: Path, final: Path, on_conflict: Duplicate, durable: bool
) -> tuple[Path, Placement]:
    existing = _find_identical(src, final, on_conflict)
    if existing is not None:  # a re-run: compare, don't copy again
        return existing, Placement.IDENTICAL
    tmp = new_tmp(root)
    try:
        shutil.copyfile(src, tmp)
        shutil.copystat(src, tmp)
        if durable:
            fsync_path(tmp)
        return commit(tmp, final, on_conflict, durable, keep_source=False)
    finally:
        unlink_quietly(tmp)


def _place_move(
    src: Path, root: Path, final: Path, on_conflict: Duplicate, batch: MoveBatch | None = None
) -> tuple[Path, Placement]:
    if _same_entry(src, final):
        return final, Placement.IDENTICAL  # already its own destination
    try:
        path, placement = commit(src, final, on_conflict, batch is None, keep_source=True)
    except StoreError as exc:
        if not isinstance(exc.__cause__, OSError) or exc.__cause__.errno != errno.EXDEV:
            raise
        path, placement = _place_copy(src, root, final, on_conflict, durable=True)
    # The destination now holds these bytes under another name (a new hard link,
    # a copy, or the same bytes stored earlier): the source name can go. Never
    # when the source *is* that name (e.g. ``<uid>~2.dcm`` sorted in place).
    if placement is not Placement.KEPT_EXISTING and not _same_entry(src, path):
        if placement is Placement.IDENTICAL and not os.path.samefile(src, path):
            fsync_path(path)  # stored by an earlier copy that may not be on disk yet
        if batch is not None:
            batch.remove_after_flush(src, path.parent)
            return path, placement
        os.unlink(src)
        fsync_dir(src.parent)
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
            fsync_dir(folder)
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
            fsync_dir(folder)
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


def _place_symlink(src: Path, final: Path, on_conflict: Duplicate) -> tuple[Path, Placement]:
    target = os.path.abspath(src)

    def identical(candidate: Path) -> bool:
        if os.path.islink(candidate) and os.readlink(candidate) == target:
            return True
        return same_content(src, candidate)

    return claim(
        final, on_conflict, False,
        create=lambda path: os.symlink(target, path),
        identical=identical,
        replace=lambda path: replace_with(lambda tmp: os.symlink(target, tmp), path),
    )


def _find_identical(src: Path, final: Path, on_conflict: Duplicate) -> Path | None:
    """The name among `final` and its ``~N`` siblings that already holds the bytes
    of `src`, looking only as far as the names are taken."""
    for candidate in candidates(final, on_conflict):
        if not os.path.lexists(candidate):
            return None
        if same_content(src, candidate):
            return candidate
        if on_conflict is not Duplicate.BOTH:
            return None
    return None  # pragma: no cover - candidates is endless for BOTH

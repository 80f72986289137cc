"""The commit: how a complete file gets its final name under an output root.

Every file is first written under a temporary name in the temporary area
(:mod:`scp.store.tmp`: same file system, outside the layout), then given its
final name in one step (a hard link, which never overwrites, or
``os.replace``). A half-written file never carries a final name, whatever
happens to the process.

When the final name is already taken:

* the same instance: nothing to do (``Placement.IDENTICAL``). The same
  dataset bytes with the same SOP Class, SOP Instance and transfer syntax in
  the File Meta (:func:`same_instance`): a study a modality sent and a router
  forwarded again carries another Source AE Title there, but it is the same
  instance;
* different bytes: the :class:`~scp.enums.Duplicate` policy decides (replace it
  atomically, keep the existing file, or keep both, the newcomer as
  ``<stem>~2<ext>``, ``<stem>~3<ext>`` ...).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from scp.dicom.meta import meta_end, meta_values
from scp.enums import Duplicate, Placement
from scp.errors import FolderGone, OutsideRootError, StoreError
from scp.layout import fit_component, split_extension
from scp.store.fsops import (
    FOLDER_ATTEMPTS,
    NEW_FILE_MODE,
    ensure_parent,
    fsync_dir,
    fsync_fd,
    fsync_path,
    same_content,
    same_rest,
)
from scp.store.tmp import TMP_DIRNAME, new_tmp, tmp_prefix, unlink_quietly


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


def write_atomic(
    root: Path,
    rel: PurePosixPath,
    fill: Callable[[BinaryIO], None],
    *,
    on_conflict: Duplicate = Duplicate.REPLACE,
    durable: bool = True,
) -> tuple[Path, Placement]:
    """Write a new file at ``root / rel`` through a temporary file.

    `fill` writes the content into the open temporary file. With `durable`, the
    file and its folder are flushed to disk before this returns.
    Returns the final path (which differs from ``root / rel`` only for
    :attr:`Duplicate.BOTH`) and what happened.
    """
    final = destination(root, rel)
    tmp = new_tmp(root)
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fchmod(f.fileno(), NEW_FILE_MODE)
            if durable:
                fsync_fd(f.fileno())
        return _into_folder(root, final, durable, lambda: commit(
            tmp, final, on_conflict, durable, keep_source=False))
    finally:
        unlink_quietly(tmp)


def commit_file(
    src: Path,
    root: Path,
    rel: PurePosixPath,
    *,
    on_conflict: Duplicate = Duplicate.REPLACE,
    durable: bool = True,
) -> tuple[Path, Placement]:
    """Give the complete temporary file `src` (in ``<root>/.sortscp-tmp``) its
    final name ``root / rel``; with `durable` (``--fsync always``) the file and
    its folder are flushed to disk before this returns. `src` keeps its
    temporary name too (its writer removes it); its permissions become those
    of a new file (umask)."""
    final = destination(root, rel)
    os.chmod(src, NEW_FILE_MODE)
    if durable:
        fsync_path(src)
    return _into_folder(root, final, durable, lambda: commit(
        src, final, on_conflict, durable, keep_source=True))


def _into_folder(
    root: Path, final: Path, durable: bool, name: Callable[[], tuple[Path, Placement]]
) -> tuple[Path, Placement]:
    """Create the folder of `final` and `name` the file into it; when another
    process prunes that folder in between (it removes the folders a moved
    instance left empty), make it again and name again."""
    for attempt in range(FOLDER_ATTEMPTS):
        ensure_parent(root, final, durable)
        try:
            return name()
        except FolderGone:
            if attempt == FOLDER_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def commit(
    src: Path, final: Path, on_conflict: Duplicate, durable: bool, *, keep_source: bool
) -> tuple[Path, Placement]:
    """Give the complete file `src` the name `final` (a hard link); with
    `keep_source` false, `src` may be renamed onto a name it replaces."""
    if keep_source:
        # (the second name in the temporary area: one a killed process leaves is swept there)
        replace = lambda path: replace_with(lambda tmp: os.link(src, tmp), path, beside=src.parent)  # noqa: E731
    else:
        replace = lambda path: os.replace(src, path)  # noqa: E731
    return claim(
        final, on_conflict, durable,
        create=lambda path: os.link(src, path),
        identical=lambda path: same_instance(src, path),
        replace=replace,
    )


#: The File Meta elements that say what the dataset is (SOP Class, SOP
#: Instance, transfer syntax); the others say who wrote or sent the file.
_WHAT_IT_IS = (0x0002, 0x0003, 0x0010)
#: Bytes read to find a File Meta group (ours are a few hundred).
_META_READ = 1 << 16


def same_instance(a: Path, b: Path) -> bool:
    """Whether the Part 10 files `a` and `b` hold the same instance: the same
    dataset bytes, and the same SOP Class, SOP Instance and transfer syntax in
    their File Meta, whatever else it says (the sender's AE title, the writer's
    implementation). Files without a File Meta group length are compared whole."""
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            ha, hb = fa.read(_META_READ), fb.read(_META_READ)
            ea, eb = meta_end(ha), meta_end(hb)
            if ea is None or eb is None:
                return same_content(a, b)
            va, vb = meta_values(ha[:ea]), meta_values(hb[:eb])
            if any(va.get(k) != vb.get(k) for k in _WHAT_IT_IS):
                return False
            if os.fstat(fa.fileno()).st_size - ea != os.fstat(fb.fileno()).st_size - eb:
                return False
            fa.seek(ea)
            fb.seek(eb)
            return same_rest(fa, fb)
    except ValueError:  # not a Part 10 header
        return same_content(a, b)
    except OSError:
        return False


def claim(
    final: Path,
    on_conflict: Duplicate,
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
    for candidate in candidates(final, on_conflict):
        try:
            create(candidate)
        except FileExistsError:
            if identical(candidate):
                return candidate, _kept(candidate, Placement.IDENTICAL, durable)
            if on_conflict is Duplicate.KEEP:
                return candidate, _kept(candidate, Placement.KEPT_EXISTING, durable)
            if on_conflict is Duplicate.REPLACE:
                replace(candidate)
                return candidate, _done(candidate, Placement.REPLACED, durable)
            continue  # Duplicate.BOTH: try the next free name
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and not candidate.parent.is_dir():
                raise FolderGone(f"cannot create {candidate}: its folder was removed") from exc
            raise StoreError(f"cannot create {candidate}: {os.strerror(exc.errno or 0)}") from exc
        return candidate, _done(candidate, _stored(candidate, final), durable)
    raise AssertionError("unreachable")  # pragma: no cover


def replace_with(make: Callable[[Path], None], final: Path, beside: Path | None = None) -> None:
    """Atomically replace `final` by what `make` creates at a temporary name
    beside it, or in the temporary area `beside` (on the same file system),
    where :func:`~scp.store.tmp.remove_orphans` finds it if the process dies
    before the rename (beside `final`, it would stay in the layout)."""
    if beside is not None:
        tmp = beside / f"{tmp_prefix('l')}{os.urandom(6).hex()}.link"
    else:
        tmp = final.with_name(fit_component(f".{final.name}", f".{os.getpid()}.link"))
    unlink_quietly(tmp)
    make(tmp)
    try:
        os.replace(tmp, final)
    except OSError as exc:  # e.g. `final` is a folder: nothing of ours stays beside it
        unlink_quietly(tmp)
        raise StoreError(f"cannot replace {final}: {os.strerror(exc.errno or 0)}") from exc
    except BaseException:
        unlink_quietly(tmp)
        raise


def candidates(final: Path, on_conflict: Duplicate):
    yield final
    if on_conflict is Duplicate.BOTH:
        stem, ext = split_extension(final.name)
        n = 2
        while True:
            yield final.with_name(fit_component(stem, f"~{n}{ext}"))
            n += 1


def _stored(candidate: Path, final: Path) -> Placement:
    return Placement.STORED if candidate == final else Placement.STORED_AS_COPY


def _kept(path: Path, placement: Placement, durable: bool) -> Placement:
    """The file already at `path` stands for the one being committed: with
    `durable`, it and its folder are flushed first, as a new file is. Its
    writer may have died between its link and its flushes (a worker killed
    at its deadline: its sender got a failure and sends again), and the
    Success for this one promises that file."""
    if durable:
        fsync_path(path)
        fsync_dir(path.parent)
    return placement


def _done(path: Path, placement: Placement, durable: bool) -> Placement:
    if durable:
        fsync_dir(path.parent)
    return placement

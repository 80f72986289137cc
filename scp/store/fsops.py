"""Small file-system primitives shared by the commit and the sort placements:
flushes, content comparison, folder creation, the permissions of new files.

Every flush to disk that sortscp makes goes through :func:`fsync_fd`, which
counts them (:func:`flush_count`): ``--fsync never`` must make none, and the
tests check that it does not.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from scp.errors import SourceChanged, StoreError

CHUNK = 1 << 20

#: What says a file is still the one read: device, inode, size, modification
#: time, change time, and (for a sort) the name its header gave it, relative
#: to DST ("" if none: see :func:`untouched`).
Identity = tuple[int, int, int, int, int, str]


def identity(st: os.stat_result, rel: str = "") -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, rel)


def same_file(st: os.stat_result, ident: Identity) -> bool:
    """Whether `st` is the file `ident` describes, its size and modification
    time as they were: what a check made just after our own link or rename of
    it can ask (either changes its change time)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == ident[:4]


#: For a sort: the name (relative to DST) the header of the file at a path
#: gives it now; raises if it gives none (set per batch by the sort's jobs).
NAMER: Callable[[str], str] | None = None


def untouched(st: os.stat_result, ident: Identity, path: str | os.PathLike[str]) -> bool:
    """Whether the file at `path` (its ``stat`` `st`) is still the one
    `ident` describes, not written since. A write changes the change time,
    also when the writer puts the modification time back (``touch -r``,
    ``rsync --inplace -t``). So do a link or an unlink of another of its
    names (a ``cp -al`` tree's sibling moved meanwhile), a ``chmod``, a
    ``chown``: when only the change time moved, the file's header is read
    again, and it is untouched if it still gives the file its name
    (:data:`NAMER`). Asked just before each step of ours that moves the
    change time itself (a link, a rename)."""
    if not same_file(st, ident):
        return False
    if st.st_ctime_ns == ident[4]:
        return True
    return named_as(path, ident)


def named_as(path: str | os.PathLike[str], ident: Identity) -> bool:
    """Whether the header of the file at `path` gives it the name `ident` records."""
    if not ident[5] or NAMER is None:
        return False
    try:
        return NAMER(os.fspath(path)) == ident[5]
    except Exception:  # not DICOM now, cut short, gone: not the file read
        return False


def rebased(st: os.stat_result, ident: Identity | None) -> Identity:
    """`st`'s identity, with the name `ident` records: after a step of ours
    that moved the change time (what a later check compares)."""
    return identity(st, ident[5] if ident is not None else "")


class SourceTree:
    """The tree a sort reads (SRC): a file of it is read and removed only
    while no folder between SRC and the file is a symbolic link. A folder
    swapped for a link during the run (to a folder outside SRC) would
    otherwise bring outside files into DST, and a move would remove them.

    The first time in a batch a folder is asked about, its real path is
    checked and its identity noted; after that (a read, a removal), it must
    still be that folder: one ``lstat``, as a link put in its place, or in
    place of a folder above it, leads elsewhere. The name-based system call
    after a check leaves a window of microseconds."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(root)
        self.real = os.path.realpath(root)
        #: folder -> its (device, inode) when first checked in this batch; None: refused
        self.seen: dict[str, tuple[int, int] | None] = {}

    def reaches(self, path: str | os.PathLike[str]) -> bool:
        """Whether `path` (a file under SRC) is reached without a link in its folders."""
        folder = os.path.dirname(os.path.abspath(path))
        rel = os.path.relpath(folder, self.root)
        if rel == ".." or rel.startswith(".." + os.sep):
            return True  # not under SRC (a link's target, read on purpose): not ours to judge
        try:
            st = os.lstat(folder)
        except (FileNotFoundError, NotADirectoryError):
            return False  # (any other error, such as a path too long, is the caller's to report)
        ident = (st.st_dev, st.st_ino)
        if folder not in self.seen:
            real = rel == "." or os.path.realpath(folder) == os.path.join(self.real, rel)
            self.seen[folder] = ident if real and stat.S_ISDIR(st.st_mode) else None
        return self.seen[folder] == ident


#: The tree the sort running in this process reads (set per batch by the sort's
#: jobs; None elsewhere: ``serve`` removes no sources).
SOURCES: SourceTree | None = None


#: The name a move's source has while it is removed (then its worker's pid).
LEAVING_PREFIX = ".sortscp-leaving-"


def remove_source(
    path: Path, expect: Identity | None, placed: Path | None = None, backing: Identity | None = None,
) -> None:
    """Remove the source `path` of a move, if it is still the file `expect`
    describes; else :class:`~scp.errors.SourceChanged` and it stays.

    `placed` is the move's name in DST, and `backing` the identity of the
    file the move left there (default `expect`: the source's own hard
    link). The source is removed only while that name still backs it: the
    same file, the source's own or one no other name shares; or else (a
    twin of this run made it a copy of its own meanwhile) a file no other
    name shares with the source's bytes. Otherwise it stays
    (:class:`~scp.errors.SourceChanged`, "run again").

    A move within one file system makes `placed` a hard link of the source:
    until the source's name is removed, a write to the source writes that
    file too. So when the source stays, changed, its link in DST is removed
    as well (:func:`unfile`): DST never keeps, as the instance, bytes that
    changed after their header was read, and no other move takes that shared
    file for a copy of its own (see :func:`~scp.store.place.scan`).

    Checking the name and then unlinking it would remove a new version
    another process renames over `path` in between. So the name is first
    renamed aside (atomic: what is checked is what is removed); a file found
    not to be ours there goes back to its name, never over a newer one (it
    keeps the aside name then, named in the error). A move killed in between
    leaves the source under ``.sortscp-leaving-*`` beside it: a rerun finds
    it already in place and removes it."""
    try:
        _remove_source(path, expect, placed, backing or expect)
    except SourceChanged as exc:
        if placed is not None and expect is not None and unfile(placed, expect):
            exc.unfiled = True
            exc.args = (f"{exc.args[0]} (its link in DST, the same file, is removed: not filed)",)
        raise


def unfile(placed: Path, expect: Identity) -> bool:
    """Remove the name `placed` (in DST) if it is a hard link of the file
    `expect` describes that has another name too (never a file's last name);
    whether it did."""
    try:
        st = os.lstat(placed)
        if (st.st_dev, st.st_ino) != expect[:2] or st.st_nlink < 2 or not stat.S_ISREG(st.st_mode):
            return False
        os.unlink(placed)
    except OSError:
        return False
    return True


def _backs(placed: Path, backing: Identity | None, source: Path, expect: Identity) -> bool:
    """Whether the file at `placed` is a copy that lets the source (renamed
    `source` now, the file `expect`) go: see :func:`remove_source`."""
    try:
        st = os.lstat(placed)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    own = (st.st_dev, st.st_ino) == expect[:2]
    if backing is not None and same_file(st, backing) and (own or st.st_nlink == 1):
        return True
    # (rare: a twin of this run gave the name a copy of its own since)
    return not own and st.st_nlink == 1 and same_content(source, placed)


def _remove_source(path: Path, expect: Identity | None, placed: Path | None, backing: Identity | None) -> None:
    if SOURCES is not None and not SOURCES.reaches(path):
        raise SourceChanged(f"{path}: a folder on its path became a symbolic link during the run; "
                            "nothing is removed through it")
    if expect is None:
        os.unlink(path)
        return
    aside = path.with_name(f"{LEAVING_PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
    try:
        before = os.lstat(path)  # (the rename changes the change time: look first)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    if not same_file(before, expect) or (
        before.st_ctime_ns != expect[4] and not _unchanged_since(path, expect, placed)
    ):
        if placed is not None and backing is not None and backing[:2] == expect[:2] and not _is(placed, expect):
            raise SourceChanged(f"{path}: its name in DST ({placed}) holds another file now; left in place, "
                                "run again")
        raise source_changed(path)
    try:
        os.rename(path, aside)
    except OSError as exc:  # (said of the source, as its unlink would)
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    try:
        ours = same_file(os.lstat(aside), expect)
    except OSError:
        ours = False
    backed = not ours or placed is None or _backs(placed, backing, aside, expect)
    if ours and backed:
        os.unlink(aside)
        return
    try:
        os.link(aside, path, follow_symlinks=False)
    except FileExistsError:
        raise SourceChanged(
            f"{path} changed while it was being sorted and was taken again since; "
            f"the version it had is left as {aside.name}, run again"
        ) from None
    except OSError:
        os.rename(aside, path)  # (not a file one can link: put it back as it was)
    else:
        os.unlink(aside)
    if not backed:
        raise SourceChanged(f"{path}: its name in DST ({placed}) holds another file now; left in place, run again")
    raise source_changed(path)


def _is(path: Path, ident: Identity) -> bool:
    """Whether the entry at `path` is the file `ident` describes."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ident[:2]


def _unchanged_since(path: Path, expect: Identity, placed: Path | None) -> bool:
    """Only the change time of the source `path` moved since `expect`: may it
    go? If `placed` is its own hard link, it holds the source's bytes whatever
    they are: their header must still give them its name. A copy must hold
    the same bytes."""
    if placed is None:
        return False
    if _is(placed, expect):
        return named_as(path, expect)
    return same_content(path, placed)  # (False if it is gone)


def source_changed(path: Path) -> SourceChanged:
    return SourceChanged(f"{path} changed while it was being sorted; left in place, run again")


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Permissions of the files we create (temporary files start as 0600).
NEW_FILE_MODE = 0o666 & ~umask()


#: How often a folder that a concurrent prune removed under us (the last file
#: of another folder left it when a resend moved an instance) is made again
#: before the store fails.
FOLDER_ATTEMPTS = 10


def ensure_parent(root: Path, final: Path, durable: bool) -> None:
    """Create the missing folders above `final` (flushing each new entry with
    `durable`). A folder that another process prunes while we create the next
    one is made again; a file or link where a folder should be is an error
    (a folder of the layout replaced by a symbolic link would file the
    instance outside `root`)."""
    for _ in range(FOLDER_ATTEMPTS):
        _refuse_links(root, final.parent)  # before any folder is made through one
        if final.parent.is_dir() or _make_parents(root, final.parent, durable):
            return
    raise StoreError(f"cannot create folder {final.parent}: it was removed while it was made")


def _refuse_links(root: Path, folder: Path) -> None:
    """Raise :class:`~scp.errors.StoreError` if a folder between `root` (which
    may itself be a link) and `folder` is a symbolic link."""
    while folder != root and root in folder.parents:
        if os.path.islink(folder):
            raise StoreError(f"{folder} is a symbolic link: nothing is filed through one (it may lead out of {root})")
        folder = folder.parent


def _make_parents(root: Path, parent: Path, durable: bool) -> bool:
    """False if a concurrent prune removed a folder we made or found."""
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
                    if os.path.lexists(folder):
                        raise
                    return False
            except FileNotFoundError:
                if folder.parent.is_dir() or os.path.lexists(folder.parent):
                    raise
                return False
            if durable:
                fsync_dir(folder.parent)
    except OSError as exc:
        raise StoreError(f"cannot create folder {folder}: {exc.strerror}") from exc
    return True


def same_content(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return same_rest(fa, fb)
    except OSError:
        return False


def same_rest(fa: BinaryIO, fb: BinaryIO) -> bool:
    """Whether two open files hold the same bytes from where each is now to its end."""
    while True:
        ca, cb = fa.read(CHUNK), fb.read(CHUNK)
        if ca != cb:
            return False
        if not ca:
            return True


_flushes = 0


def flush_count() -> int:
    """How many flushes (``fsync``, ``syncfs``) this process has made so far."""
    return _flushes


def fsync_fd(fd: int) -> None:
    """``fsync(fd)``: the one place a file's data and entry go to disk."""
    global _flushes
    _flushes += 1
    os.fsync(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


_syncfs: Any = None


def sync_filesystem(path: Path) -> bool:
    """Flush everything written to the file system that holds `path` (Linux
    ``syncfs``): one disk flush for a whole batch of files instead of one per
    file and folder. Returns False where ``syncfs`` is not available; the
    caller then flushes each file with :func:`fsync_path`."""
    global _flushes, _syncfs
    if _syncfs is None:
        try:
            import ctypes

            _syncfs = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):
            _syncfs = False
    if not _syncfs:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        _flushes += 1
        if _syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fspath(path))
    finally:
        os.close(fd)
    return True


def fsync_dir(path: Path) -> None:
    try:
        fsync_path(path)
    except OSError:  # some file systems cannot fsync a folder; the data is synced
        pass

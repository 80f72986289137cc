"""``sort``'s placements: copy, move, hard or symbolic link into the layout,
each ending in the commit of :mod:`scp.store.commit`."""

from __future__ import annotations

import errno
import itertools
import os
import stat
from pathlib import Path, PurePosixPath

from scp.enums import Duplicate, Mode, Placement
from scp.errors import SourceChanged, StoreError
from scp.store.commit import candidates, destination
from scp.store.fsops import (
    CHUNK,
    Identity,
    ensure_parent,
    fsync_dir,
    fsync_path,
    identity,
    rebased,
    remove_source,
    same_content,
    same_file,
    source_changed,
    sync_filesystem,
    untouched,
)
from scp.store.tmp import new_tmp, tmp_dir, tmp_prefix, unlink_quietly

#: What a sort may find at a name that holds the bytes it brings: as the mode
#: makes it; to replace (a link, the source's own hard link); for a move, a
#: file another name shares, to replace by a copy of its own.
_IDENTICAL, _STALE, _SHARED = "identical", "stale", "shared"


def place(
    src: Path,
    root: Path,
    rel: PurePosixPath,
    mode: Mode,
    *,
    on_conflict: Duplicate = Duplicate.BOTH,
    durable: bool = True,
    batch: MoveBatch | None = None,
    defer: bool = False,
    dry_run: bool = False,
    expect: Identity | None = None,
) -> tuple[Path, Placement]:
    """Put the file `src` at ``root / rel`` by copy, move, hard or symbolic link.

    `expect` is the :func:`~scp.store.fsops.identity` of the file whose header
    named it ``rel``: what is placed must still be that file, and a move
    removes `src` only while it is (else :class:`~scp.errors.SourceChanged`).

    ``copy`` keeps timestamps and permissions (as ``shutil.copy2``). ``move``
    removes `src` only once a regular file with its bytes is at a final name in
    the layout and, with `durable` (``--fsync always``), flushed to disk; it
    never removes a file that *is* its own destination. With a `batch`, a move
    leaves flushing and removing `src` to :meth:`MoveBatch.finish`.

    A name (``root / rel`` or one of its ``~N`` siblings) that already holds the
    bytes of `src` is ``IDENTICAL`` only if it is what `mode` would make: for
    copy and move a regular file that is not the source's own inode (a
    symbolic link there, or a hard link to the source, is replaced by a real
    file: ``REPLACED``); for hardlink anything but a symbolic link.

    When other bytes hold ``root / rel``: with `defer`, nothing is done and
    ``DEFERRED`` is returned (the caller names the file after the walk, see
    :func:`place_at`); otherwise the file is kept beside as ``<stem>~N<ext>``.
    With `dry_run`, the answer is computed the same way and nothing is touched.
    """
    final = destination(root, rel)
    if _same_entry(src, final):
        return final, Placement.IDENTICAL  # already its own destination (sorting in place)
    if on_conflict is not Duplicate.BOTH:
        raise ValueError("sort keeps both files: on_conflict must be Duplicate.BOTH")
    for attempt in range(2):  # a second look if another process took the name meanwhile
        found = scan(src, final, mode)
        if found is not None:
            name, kind = found
            if dry_run:
                return name, Placement.IDENTICAL if kind == _IDENTICAL else Placement.REPLACED
            if kind == _IDENTICAL:
                _finish_move(src, name, mode, batch, identical=True, durable=durable, expect=expect)
                return name, Placement.IDENTICAL
            place_at(src, root, name, mode, durable=durable, replace=True, batch=batch, expect=expect,
                     own_copy=kind == _SHARED)
            return name, Placement.REPLACED
        free = next(c for c in candidates(final, Duplicate.BOTH) if not os.path.lexists(c))
        if free != final and defer:
            return final, Placement.DEFERRED
        if dry_run:
            return free, Placement.STORED if free == final else Placement.STORED_AS_COPY
        ensure_parent(root, free, durable)
        try:
            place_at(src, root, free, mode, durable=durable, replace=False, batch=batch, expect=expect)
        except FileExistsError:
            if attempt:
                raise
            continue
        return free, Placement.STORED if free == final else Placement.STORED_AS_COPY
    raise AssertionError("unreachable")  # pragma: no cover


def scan(src: Path, final: Path, mode: Mode) -> tuple[Path, str] | None:
    """The name among `final` and its taken ``~N`` siblings that holds the bytes
    of `src`, and whether it is as `mode` wants it (``identical``) or must be
    replaced by a real file (``stale``); None if no taken name holds them."""
    for candidate in candidates(final, Duplicate.BOTH):
        if not os.path.lexists(candidate):
            return None
        if _same_entry(src, candidate):
            return candidate, _IDENTICAL  # its own destination, e.g. sorting in place
        if mode is Mode.SYMLINK:
            if os.path.islink(candidate) and os.readlink(candidate) == os.path.abspath(src):
                return candidate, _IDENTICAL
        if not same_content(src, candidate):
            continue
        link = os.path.islink(candidate)
        if mode is Mode.COPY:
            own_inode = not link and _same_inode(src, candidate)
            return candidate, _STALE if link or own_inode else _IDENTICAL
        if mode is Mode.MOVE:
            # Removing the source needs a real copy of its own: not a link, nor a
            # file another name shares (the source itself; a move of this run
            # whose source is not removed yet; a file outside DST that a
            # hardlink sort put there), whose next write would change it. That
            # one is replaced by a copy: a link of this source would be shared
            # in turn until its removal, and back no other source meanwhile.
            if link or _same_inode(src, candidate):
                return candidate, _STALE
            return candidate, _SHARED if needs_own_copy(src, candidate, mode) else _IDENTICAL
        if mode is Mode.HARDLINK:
            return candidate, _STALE if link else _IDENTICAL
        return candidate, _IDENTICAL
    return None  # pragma: no cover - candidates is endless


def place_at(
    src: Path, root: Path, name: Path, mode: Mode, *, durable: bool, replace: bool,
    batch: MoveBatch | None = None, expect: Identity | None = None, own_copy: bool = False,
) -> None:
    """Give `name` the content of `src` as `mode` makes it: create it (a link,
    which never overwrites: ``FileExistsError`` if taken) or, with `replace`,
    atomically replace what is there. A move then removes `src` (see
    :func:`place`, and its `expect`); with `own_copy`, it puts a copy there,
    not a link of `src`."""
    ensure_parent(root, name, durable)
    if mode is Mode.MOVE and replace and _same_inode(src, name) and not os.path.islink(name):
        _finish_move(src, name, mode, batch, identical=False, durable=durable,
                     expect=expect)  # the file itself
        return
    direct = not replace and mode is not Mode.COPY
    if direct:  # one link, no temporary name
        try:
            expect = _make(src, name, mode, expect)
        except OSError as exc:
            if exc.errno != errno.EXDEV or mode is not Mode.MOVE:
                raise
            direct = False
    if not direct:
        tmp = new_tmp(root)
        linked = False  # tmp is a hard link of the source
        try:
            unlink_quietly(tmp)
            try:
                expect = _make(src, tmp, Mode.COPY if own_copy else mode, expect)
            except OSError as exc:
                if exc.errno != errno.EXDEV or mode is not Mode.MOVE:
                    raise
                expect = _make(src, tmp, Mode.COPY, expect)
            if mode in (Mode.COPY, Mode.MOVE) and durable:
                fsync_path(tmp)
            if expect is not None and mode is not Mode.SYMLINK:
                made = os.lstat(tmp)
                linked = (made.st_dev, made.st_ino) == expect[:2]
                if linked and not untouched(made, expect, tmp):
                    raise source_changed(src)
            if replace:
                os.replace(tmp, name)
            else:
                os.link(tmp, name, follow_symlinks=False)
        except OSError as exc:
            raise _as_source(exc, tmp, src) from None
        finally:
            unlink_quietly(tmp)
        if linked:  # the rename (or link and unlink) moved its change time: what the removal compares
            now = os.lstat(name)
            if expect is not None and same_file(now, expect):
                expect = rebased(now, expect)
    if durable and batch is None and mode is not Mode.MOVE:
        fsync_dir(name.parent)
    _finish_move(src, name, mode, batch, identical=False, durable=durable, expect=expect)


def _as_source(exc: OSError, tmp: Path, src: Path) -> OSError:
    """`exc` as the user should read it: a temporary copy is gone by the time
    its error is reported, so an error that names it names `src` instead
    ("Operation not permitted: SRC -> DST/P/S/1.2.dcm")."""
    if exc.filename is not None and os.fspath(exc.filename) == os.fspath(tmp):
        exc.filename = os.fspath(src)
    return exc


def place_identical(
    src: Path, name: Path, mode: Mode, durable: bool = True, expect: Identity | None = None,
) -> None:
    """`name` already holds the bytes of `src` as a real file: a move removes `src`
    (while it is still the file `expect` describes)."""
    _finish_move(src, name, mode, None, identical=True, durable=durable, expect=expect)


def rename_within(old: Path, new: Path, durable: bool = True) -> None:
    """Give the file at `old` the free name `new` too (a hard link of the entry
    itself, so a symbolic link stays one), flushed; `old` keeps it until replaced."""
    os.link(old, new, follow_symlinks=False)
    if durable:
        fsync_dir(new.parent)


def _make(src: Path, path: Path, mode: Mode, expect: Identity | None) -> Identity | None:
    """Make the new entry `path` for `src` as `mode` does; return the identity
    of the file it was made from. A file other than `expect` (replaced or
    written to since its header was read) is refused: nothing is left at
    `path`, and :class:`~scp.errors.SourceChanged` is raised."""
    if mode is Mode.SYMLINK:
        os.symlink(os.path.abspath(src), path)
        return expect
    if mode is Mode.COPY:
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if expect is not None and not untouched(st, expect, src):
                raise source_changed(src)
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _copy_into(fd, out, st)
            except BaseException:
                os.close(out)
                unlink_quietly(path)
                raise
            os.close(out)
        finally:
            os.close(fd)
        return rebased(st, expect)
    _check_source(src, expect)
    os.link(src, path)
    return _check_link(src, path, expect)


def _check_source(src: Path, expect: Identity | None) -> None:
    """Before a link of `src` (which changes its change time): still the
    file `expect` describes, not written since (:func:`~scp.store.fsops.untouched`)?
    Else :class:`~scp.errors.SourceChanged`."""
    if expect is not None and not untouched(os.lstat(src), expect, src):
        raise source_changed(src)


def _check_link(src: Path, link: Path, expect: Identity | None) -> Identity:
    """The identity of the file the new hard link `link` to `src` took (its
    change time and link count as the link left them: what a later removal
    compares). If it is not the file `expect` describes (a rename over `src`
    since it was read, or a write to it), the link is removed and
    :class:`~scp.errors.SourceChanged` raised."""
    st = os.lstat(link)
    if expect is not None and not same_file(st, expect):
        unlink_quietly(link)
        raise source_changed(src)
    return rebased(st, expect)


def _finish_move(
    src: Path, name: Path, mode: Mode, batch: MoveBatch | None, *, identical: bool,
    durable: bool, expect: Identity | None = None,
) -> None:
    """For a move: remove `src` now that `name` holds its bytes as a regular
    file (flushed first, if `durable`), unless `src` *is* that entry, and only
    while `src` is still the file `expect` describes."""
    if mode is not Mode.MOVE or _same_entry(src, name):
        return
    if durable and identical and not _same_inode(src, name):
        fsync_path(name)  # stored by an earlier copy that may not be on disk yet
    backing = identity(os.lstat(name))  # what must still be there when the source goes
    if batch is not None:
        batch.remove_after_flush(src, name, expect, backing)
        return
    if durable:
        fsync_dir(name.parent)
    remove_source(src, expect, name, backing)
    if durable:
        fsync_dir(src.parent)


def needs_own_copy(src: Path, name: Path, mode: Mode) -> bool:
    """Whether a move of `src` must give `name`, which holds its bytes, a copy
    of its own before the source goes: the file there has another name too
    (a twin's source not removed yet, a working copy outside DST that a
    hardlink sort linked), whose next write would change it (see :func:`scan`)."""
    return (mode is Mode.MOVE and not os.path.islink(name) and not _same_inode(src, name)
            and _shared(name))


def _shared(path: Path) -> bool:
    """Whether the file at `path` has another name too (a hard link)."""
    try:
        return os.lstat(path).st_nlink > 1
    except OSError:
        return False


def _same_inode(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class MoveBatch:
    """Moves of a batch of files that share their folder flushes.

    Each move links its file into the layout at once; :meth:`finish` then
    flushes every destination folder once, and only then removes the sources
    and flushes their folders once. A source is still removed only after its
    destination is on disk, with one flush per folder instead of two per file.
    If the process dies before :meth:`finish`, the sources stay; the next run
    finds them already in place and removes them then.
    """

    def __init__(self, durable: bool = True) -> None:
        self.durable = durable
        self._flush: dict[Path, None] = {}
        self._sources: list[tuple[Path, Identity | None, Path, Identity | None]] = []

    def remove_after_flush(self, src: Path, placed: Path, expect: Identity | None = None,
                           backing: Identity | None = None) -> None:
        """Remove `src` in :meth:`finish`, once the folder of its name `placed`
        is flushed (see :func:`~scp.store.fsops.remove_source`)."""
        self._flush.setdefault(placed.parent)
        self._sources.append((src, expect, placed, backing))

    def finish(self) -> dict[str, OSError | SourceChanged]:
        """Flush, remove the sources (each while it is still the file placed);
        return the sources that could not be removed."""
        if self.durable:
            for folder in self._flush:
                fsync_dir(folder)
        failed: dict[str, OSError | SourceChanged] = {}
        emptied: dict[Path, None] = {}
        for src, expect, placed, backing in self._sources:
            try:
                remove_source(src, expect, placed, backing)
            except (OSError, SourceChanged) as exc:
                failed[os.fspath(src)] = exc
                continue
            emptied.setdefault(src.parent)
        if self.durable:
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


#: Results of :meth:`SortBatch.claim`: the name is taken (use :func:`place`),
#: the entry is made, or (copy) the file waits in the temporary area for
#: :meth:`SortBatch.finish`.
TAKEN, PLACED, PENDING = "taken", "placed", "pending"
_COPY_FALLBACK = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM})
_tmp_seq = itertools.count()


class SortBatch:
    """The fast path of one worker batch: files whose final name is free.

    Each file gets its final name with as few system calls as its mode needs:
    hardlink and move one ``link``, symlink one ``symlink``, copy one
    ``copy_file_range`` from the descriptor the header was read from into a
    temporary file, then one ``link`` to the final name. No name is examined
    before it is claimed (a link never overwrites: a taken name is left to
    :func:`place`, which decides); a folder is created when a link finds it
    missing, and remembered. With `durable` (``--fsync always``),
    :meth:`finish` flushes the copies' data with one ``syncfs`` before any of
    them gets its final name, the new entries with another, and only then
    removes the sources of moves (and flushes their folders): the same promises
    as :func:`place`, with two disk flushes per batch instead of two per file.
    """

    def __init__(self, root: Path, mode: Mode, durable: bool) -> None:
        self.root, self.mode, self.durable = root, mode, durable
        self._folders: set[Path] = set()
        self._copies: list[tuple[str, Path, Path]] = []  # source, temporary file, final
        self._moved: list[tuple[Path, Identity, Path]] = []  # source, as linked, its name
        self._made: dict[Path, None] = {}  # folders that got new entries
        self._tmp: Path | None = None

    def claim(self, src: Path, fd: int, st: os.stat_result, final: Path, rel: str = "") -> str:
        """Put `src` (open as `fd`, its ``fstat`` `st`) at `final` if that name
        is free: :data:`PLACED`, :data:`PENDING` (a copy, named by
        :meth:`finish`) or :data:`TAKEN` (nothing done). Raises ``OSError``."""
        if self.mode is Mode.COPY:
            if os.path.lexists(final):
                return TAKEN
            while True:
                tmp = self._new_tmp()
                try:
                    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                except FileExistsError:  # left by a process of the same PID: another name
                    continue
                except OSError as exc:
                    raise _as_source(exc, tmp, src) from None
                try:
                    _copy_into(fd, out, st)
                except BaseException:
                    unlink_quietly(tmp)
                    raise
                finally:
                    os.close(out)
                break
            self._copies.append((os.fspath(src), tmp, final))
            return PENDING
        read = identity(st, rel)
        if self.mode is not Mode.SYMLINK:
            _check_source(src, read)
        try:
            self._entry(src, final)
        except FileExistsError:
            return TAKEN
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            return TAKEN  # another file system: place() copies
        if self.mode is not Mode.SYMLINK:
            made = _check_link(src, final, read)
            if self.mode is Mode.MOVE:
                self._moved.append((src, made, final))
        return PLACED

    def finish(self) -> dict[str, str | Exception]:
        """Name the pending copies, flush, remove the sources of moves.

        Returns, by source path: for each pending copy :data:`PLACED`,
        :data:`TAKEN` (another file took the name meanwhile: its temporary copy
        is gone, use :func:`place`) or the error that stopped it; for a
        move whose source could not be removed, that ``OSError``.
        """
        results: dict[str, str | Exception] = {}
        try:
            if self._copies:
                if self.durable and not sync_filesystem(self.root):
                    for _, tmp, _ in self._copies:
                        fsync_path(tmp)
                for source, tmp, final in self._copies:
                    try:
                        self._entry(tmp, final)
                        results[source] = PLACED
                    except FileExistsError:
                        results[source] = TAKEN
                    except OSError as exc:
                        results[source] = _as_source(exc, tmp, Path(source))
                    except StoreError as exc:
                        results[source] = exc
            if self.durable and self._made and not sync_filesystem(self.root):
                for folder in self._made:
                    fsync_dir(folder)
            emptied: dict[Path, None] = {}
            for src, read, final in self._moved:
                try:
                    remove_source(src, read, final)
                except (OSError, SourceChanged) as exc:
                    results[os.fspath(src)] = exc
                    continue
                emptied.setdefault(src.parent)
            if self.durable:
                for folder in emptied:
                    fsync_dir(folder)
        finally:
            for _, tmp, _ in self._copies:
                unlink_quietly(tmp)
            self._copies.clear()
            self._moved.clear()
            self._made.clear()
        return results

    def _entry(self, src: Path, final: Path) -> None:
        """Make the entry `final` for `src` as the mode does (a link, or a
        symbolic link), creating its folder if it is missing."""
        for attempt in (0, 1):
            try:
                if self.mode is Mode.SYMLINK:
                    os.symlink(os.path.abspath(src), final)
                else:
                    os.link(src, final)
            except (FileNotFoundError, NotADirectoryError):
                parent = final.parent
                if attempt or parent in self._folders:
                    raise  # the folder is there: the source is gone
                # Not flushed one by one: finish() flushes the new folders with
                # the new entries, before anything of the batch is reported.
                ensure_parent(self.root, final, durable=False)
                self._folders.add(parent)
                folder = parent
                while folder != self.root and self.root in folder.parents:
                    self._made.setdefault(folder.parent)  # (for the fsync fallback)
                    folder = folder.parent
                continue
            self._made.setdefault(final.parent)
            return

    def _new_tmp(self) -> Path:
        if self._tmp is None:
            self._tmp = tmp_dir(self.root)
        return self._tmp / f"{tmp_prefix('w')}f{next(_tmp_seq)}.part"


def _copy_into(fd: int, out: int, st: os.stat_result) -> None:
    """Copy the file open as `fd` (``fstat`` `st`) into the new, empty file open
    as `out`, with its permissions, timestamps and extended attributes (as
    ``shutil.copy2``)."""
    done, size = 0, st.st_size
    try:
        while done < size:
            n = os.copy_file_range(fd, out, size - done, done, done)
            if n == 0:
                break
            done += n
    except OSError as exc:
        if exc.errno not in _COPY_FALLBACK:
            raise
        os.lseek(fd, done, os.SEEK_SET)
        os.lseek(out, done, os.SEEK_SET)
        while chunk := os.read(fd, CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EPERM):
            raise
        names = []
    for name in names:
        try:
            os.setxattr(out, name, os.getxattr(fd, name))
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENODATA, errno.EINVAL):
                raise
    os.chmod(out, stat.S_IMODE(st.st_mode))
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = os.fstat(fd)  # (the change time too: a writer can put the modification time back)
    if (now.st_ctime_ns, now.st_mtime_ns, now.st_size) != (st.st_ctime_ns, st.st_mtime_ns, st.st_size):
        raise SourceChanged("the file was written to while it was being copied; left in place, run again")

"""The temporary area of an output root: where every file is written before it
gets its final name, and how the leftovers of a process that died are found.

A temporary file's name carries the PID of the process writing it
(:func:`tmp_prefix`), so :func:`remove_orphans` can tell the files of a dead
process from those being written right now.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from scp._process import UNKNOWN_START, pid_alive, start_time
from scp.errors import DestinationLockedError, StoreError

#: Folder (inside the output root) that holds files being written.
TMP_DIRNAME = ".sortscp-tmp"
#: Folder (inside the output root) that holds sortscp's state: the instance
#: index, sort's lock; and the index's file and lock in it. The same names as
#: :mod:`scp.store.index` (which imports no other module of ours but
#: :mod:`scp.errors` and :mod:`scp._process`), here so that ``sort`` need not
#: import the index to know them (``tests/test_index.py`` checks they agree).
STATE_DIRNAME = ".sortscp"
INDEX_FILENAME = "index.sqlite"
INDEX_LOCK_FILENAME = "index.lock"
#: The lock a sort holds on its DST for its whole run (in the state folder).
SORT_LOCK_FILENAME = "sort.lock"


class NotOwnFolder(StoreError):
    """``ROOT/.sortscp-tmp`` or ``ROOT/.sortscp`` is not a folder of ROOT's own
    (a symbolic link, a file): sortscp writes and removes files there, so
    following it would write into, and clean, a folder outside ROOT."""


def own_folder(root: Path, name: str) -> Path:
    """``root/name``, one of sortscp's own folders in an output root, made if
    missing (with `root`). Raises :class:`NotOwnFolder` if that name is taken
    by anything but a real folder: a symbolic link (even to a folder), a file."""
    path = root / name
    try:
        os.mkdir(path)
    except FileNotFoundError:
        root.mkdir(parents=True, exist_ok=True)
        return own_folder(root, name)
    except FileExistsError:
        pass
    mode = os.lstat(path).st_mode
    if stat.S_ISDIR(mode):
        return path
    if stat.S_ISLNK(mode):
        what = f"a symbolic link (to {os.readlink(path)!r}), not a folder"
    else:
        what = "not a folder"
    raise NotOwnFolder(
        f"{path} is {what}; sortscp writes and removes files there, so it will not use it: "
        "remove it, and sortscp makes the folder again"
    )


class SortRunning(DestinationLockedError):
    """Another process holds the sort lock of `root` (:func:`take_sort_lock`);
    `pid` as it wrote it. Its text is what ``serve`` and ``reindex`` say."""

    def __init__(self, root: Path, pid: str) -> None:
        super().__init__(f"another sortscp process holds {root} "
                         f"({lock_taker(root, pid, 'a sort into it, or a server starting on it')})")
        self.pid = pid


def lock_taker(root: Path, pid: str, what: str = "") -> str:
    """``pid N`` (``: what`` it is), the process that took the sort lock of
    `root`; or, if it has exited, what holds the lock then (a process it
    started: the lock outlives its taker in them, e.g. a stopped worker)."""
    if pid.isdigit() and not pid_alive(int(pid)):
        return (f"pid {pid} took it and has exited; a process it started still holds it, a "
                f"stopped or stuck worker: `fuser -v {root / STATE_DIRNAME / SORT_LOCK_FILENAME}` names it")
    return f"pid {pid}: {what}" if what else f"pid {pid}"


def take_sort_lock(root: Path) -> int:
    """Take ``ROOT/.sortscp/sort.lock`` (``flock``, not waiting) and write our
    PID in it; return its descriptor (the lock lasts while it is open). A sort
    holds it for its run; a server takes it for its start, so that it never
    builds its index while a sort still fills the folder. Raises
    :class:`SortRunning` if another process holds it."""
    state = own_folder(root, STATE_DIRNAME)
    fd = os.open(
        state / SORT_LOCK_FILENAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise SortRunning(root, pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class ServerRunning(DestinationLockedError):
    """A running server holds the output folder (:func:`hold_served`)."""


def _folder_lock(root: Path, how: int) -> int | None:
    """``flock`` `how` (not waiting) on the folder `root` itself; its
    descriptor, or None where the file system takes no lock on a folder (the
    other locks, in ``.sortscp``, still apply). Raises BlockingIOError if it is held."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # (a network file system without locks on folders)
        os.close(fd)
        return None
    return fd


def hold_served(root: Path) -> int | None:
    """A server's hold on its output folder for its whole run, taken under
    the sort lock: an exclusive ``flock`` on the folder itself (its
    descriptor, to keep open; None where the file system takes none).

    One server per output folder: a second one, from another container
    above all, cannot tell the first one's processes from dead ones (process
    IDs are per PID namespace), and would settle their instances' claims as
    a dead process's. And the index's own lock lives in ``.sortscp``, which
    an operator can remove; this one cannot be removed while the folder
    exists, so :func:`take_unserved` refuses a sort or a reindex even in the
    moment before the server makes its state folder again. Raises
    :class:`ServerRunning` if another server holds it."""
    # (not a sort nor a reindex that holds it: they hold the sort lock, which we have)
    return _hold_folder(root, "another server{holder} files into {root}: one server per output folder "
                        "(stop it, or give this one another --out)")


class SharedHold(ServerRunning):
    """The folder is held by a shared ``flock`` alone: a move of it
    (:func:`hold_moved`), or another program's ``flock -s``; no server."""


def _hold_folder(root: Path, refused: str) -> int | None:
    """The folder's exclusive ``flock`` (:func:`_folder_lock`); held already:
    :class:`ServerRunning`, `refused` filled in with the holder and `root`
    (:class:`SharedHold` if only shared locks hold it)."""
    try:
        return _folder_lock(root, fcntl.LOCK_EX)
    except BlockingIOError:  # (0 or None: in another PID namespace, a container)
        try:
            probe = _folder_lock(root, fcntl.LOCK_SH)  # (taken: only shared locks hold it, seen or not)
        except BlockingIOError:
            probe = None
        else:
            if probe is not None:
                os.close(probe)
                shared = lock_holder(root, "READ") or 0
                raise SharedHold(
                    f"{root} is held by a shared lock{holder_text(shared)}: a sortscp sort --mode move of "
                    "it, or another program's flock -s; try again when it has finished") from None
        holder = holder_text(lock_holder(root) or 0)
        raise ServerRunning(refused.format(holder=holder, root=root)) from None


def take_unserved(root: Path) -> int | None:
    """For a sort into `root` or a reindex of it, under its sort lock:
    the folder's ``flock`` taken exclusively for the run (None where the file
    system takes none). Raises :class:`ServerRunning` if a server holds it
    (:func:`hold_served`)."""
    return _hold_folder(root, "a running server (sortscp serve){holder} files into {root}: stop it first")


def held_folder(folder: str | Path) -> int | None:
    """If `folder` is an output folder that a running server, sort or reindex
    holds (:func:`hold_served`, :func:`take_unserved`), the holder's PID (0:
    in another PID namespace, a container); None otherwise. Only looks."""
    if not os.path.isdir(os.path.join(folder, STATE_DIRNAME)):
        return None  # (one stat: never an output folder of ours)
    return lock_holder(Path(folder), "WRITE")  # (not a move's shared hold on it: being_moved)


def held_around(path: Path) -> tuple[Path, int] | None:
    """The nearest folder above `path` (links resolved; not `path` itself)
    that a running server, sort or reindex holds (:func:`held_folder`), and
    its holder's PID. The folder locks cover a folder, not what lies under
    it: a second server or a sort into ``OUT/sub``, or a move out of it,
    would add files to a served tree, or take them from it, behind its
    index's back. Only looks."""
    for folder in Path(os.path.realpath(path)).parents:
        pid = held_folder(folder)
        if pid is not None:
            return folder, pid
    return None


def held_below(path: Path) -> tuple[Path, int] | None:
    """A folder under `path` (not `path` itself) that a running server, sort
    or reindex holds (:func:`held_folder`), and its holder's PID (the folder
    as that process names it): a server or a sort whose folder holds it
    would index its files as their own, and file into it. Found from the
    holders of ``flock`` locks (``/proc/locks``) and the folders they have
    open (``/proc/PID/fd``), each placed on its file system through the
    holder's mounts and ours (``mountinfo``), so a folder reached through a
    bind mount, or served from a container, is seen; a holder whose
    descriptors cannot be read (another user's) is not. Only looks."""
    real = os.path.realpath(path)
    own_mounts = _mounts("self")
    ours = _on_file_system(real, own_mounts)
    below = real.rstrip(os.sep) + os.sep
    held: dict[int, set[str]] = {}
    for key, pid in _flocks("WRITE").items():
        held.setdefault(pid, set()).add(key)
    for pid, keys in held.items():
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        # A path names the same folder for it as for us only in our own mount namespace;
        # else (a container) it is placed on its file system through its mounts.
        same_mounts = _mount_namespace(str(pid)) == _mount_namespace("self")
        their_mounts: list[_Mount] | None = None
        for fd in fds:
            link = os.path.join(fd_dir, fd)  # (opened, it is the holder's file, whatever its name here)
            try:
                target = os.readlink(link)
                if not target.startswith(os.sep) or _lock_key(os.stat(link)) not in keys:
                    continue
            except OSError:
                continue
            theirs = None
            if not (same_mounts and target.startswith(below)):
                if their_mounts is None:
                    their_mounts = _mounts(str(pid))
                theirs = _on_file_system(target, their_mounts)
                if ours is None or theirs is None or theirs[0] != ours[0] or theirs[1] == ours[1] or \
                        not _under(theirs[1], ours[1]):
                    continue  # (not below: elsewhere, or `path` itself, also as a file system's root)
            if os.path.isdir(os.path.join(link, STATE_DIRNAME)):
                if not same_mounts and theirs is not None:  # (ours for it, if a mount of ours shows it)
                    target = _our_name(theirs, own_mounts) or f"{target} (as pid {pid} names it)"
                return Path(target), pid
    return None


def _mount_namespace(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


#: A mount as ``mountinfo`` lists it: its device (major:minor), the folder of
#: that file system it shows (its root), and where it is mounted.
_Mount = tuple[str, str, str]


def _mounts(pid: str) -> list[_Mount]:
    """The mounts process `pid` (or ``self``) sees, in the order they were
    made (``/proc/PID/mountinfo``; empty if that cannot be read)."""
    try:
        with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [(fields[2], _unescape(fields[3]), _unescape(fields[4]))
            for fields in map(str.split, lines) if len(fields) >= 5]


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _on_file_system(real: str, mounts: list[_Mount]) -> tuple[str, str] | None:
    """Where the resolved path `real`, named through `mounts`, lies: its file
    system's device and its path from that file system's root (the mount that
    holds it: the longest mount point above it, the last one mounted there).
    None if no mount holds it (its mounts could not be read)."""
    best: _Mount | None = None
    for mount in mounts:
        if _under(real, mount[2]) and (best is None or len(mount[2]) >= len(best[2])):
            best = mount
    if best is None:
        return None
    dev, root, point = best
    return dev, os.path.normpath(os.path.join(root, real[len(point):].lstrip("/")))


def _our_name(place: tuple[str, str], mounts: list[_Mount]) -> str | None:
    """A path through `mounts` for `place` (:func:`_on_file_system`): a mount
    of that file system whose root holds it; None if none does."""
    dev, inside = place
    for mount_dev, root, point in mounts:
        if mount_dev == dev and _under(inside, root):
            return os.path.join(point, inside[len(root):].lstrip("/")).rstrip("/") or "/"
    return None


def _unescape(field: str) -> str:
    """A path of ``mountinfo`` as written: space, tab, newline and backslash are octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _lock_key(st: os.stat_result) -> str:
    """How ``/proc/locks`` names the file `st` describes: major:minor:inode."""
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"


def _flocks(kind: str = "") -> dict[str, int]:
    """The ``flock`` locks held now (not waited for), by file
    (:func:`_lock_key`): the PID of a holder. Of one `kind` only if given:
    ``WRITE``, the exclusive ones (a server's, a sort's or a reindex's on its
    folder), or ``READ``, the shared ones (a move's on its SRC, a server's on
    its index lock). Empty if ``/proc/locks`` cannot be read."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    held: dict[str, int] = {}
    for line in lines:
        fields = line.split()
        if "->" in fields or "FLOCK" not in fields or (kind and kind not in fields):
            continue  # (a "->" line waits for the lock: it holds nothing)
        for at, field in enumerate(fields):
            if _LOCK_KEY.fullmatch(field) and fields[at - 1].isdigit():
                held.setdefault(field, int(fields[at - 1]))
                break
    return held


#: A lock's file in ``/proc/locks``: major:minor:inode.
_LOCK_KEY = re.compile(r"[0-9a-f]+:[0-9a-f]+:\d+")


def hold_moved(src: Path) -> int | None:
    """A move's hold on its SRC for its whole run: a shared ``flock`` on the
    folder itself (its descriptor, to keep open; None where the file system
    takes none). It takes nothing from anyone: it is how a server or a sort
    starting on SRC, or on a folder in it, sees that a move is emptying it
    (:func:`being_moved`). Raises BlockingIOError if a server, sort or
    reindex holds SRC (refused before, by the caller: a race)."""
    return _folder_lock(src, fcntl.LOCK_SH)


def being_moved(path: Path) -> tuple[Path, int] | None:
    """`path`, or the nearest folder above it (links resolved), that a running
    ``sortscp sort --mode move`` is emptying (:func:`hold_moved`), and that
    move's PID: a server or a sort filing there would have its files taken
    from under its index. Only a shared lock whose holder runs sortscp counts
    (an operator's own ``flock -s`` on a folder does not), and one whose
    holder is outside our PID namespace (PID 0: a container's host, whose
    command line cannot be read); a holder whose command line cannot be read
    otherwise (another user's) is not seen. Only looks."""
    held = _flocks("READ")
    if not held:
        return None
    real = Path(os.path.realpath(path))
    for folder in (real, *real.parents):
        try:
            pid = held.get(_lock_key(os.stat(folder)))
        except OSError:
            continue
        if pid is not None and (pid == 0 or _runs_a_move(pid)):  # (0: outside our PID namespace)
            return folder, pid
    return None


def moved_under(path: Path, show: Callable[[str], str] = str) -> str | None:
    """``PATH is the SRC of a running sortscp sort --mode move (pid N)`` (or
    ``is inside FOLDER, the SRC of``; paths as `show` writes them) while a
    move empties `path` or a folder above it (:func:`being_moved`); None
    otherwise. Only looks."""
    moving = being_moved(path)
    if moving is None:
        return None
    folder, pid = moving
    where = ("is the SRC of" if folder == Path(os.path.realpath(path))
             else f"is inside {show(os.fspath(folder))}, the SRC of")
    who = holder_text(pid) if pid else " (or what else holds a shared lock on it from outside this container)"
    return f"{show(os.fspath(path))} {where} a running sortscp sort --mode move{who}"


def _runs_a_move(pid: int) -> bool:
    """Whether process `pid` is a ``sortscp sort`` (or one of its workers,
    which share its command line)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    program = [a for a in argv if a.endswith(b"sortscp") or a == b"scp"]
    return bool(program) and b"sort" in argv


def holder_text(pid: int) -> str:
    """``" (pid N)"``, or nothing for a holder in another PID namespace."""
    return f" (pid {pid})" if pid else ""


def lock_holder(path: Path, kind: str = "") -> int | None:
    """The PID of a process holding a ``flock`` on `path` (of `kind`, as
    :func:`_flocks`), read from ``/proc/locks`` (None: no one, or no way to
    tell). Only looks: a dry run asks it, and must not hold anything a
    starting server or sort would then find taken."""
    try:
        key = _lock_key(os.stat(path))
    except OSError:
        return None
    return _flocks(kind).get(key)


def tmp_prefix(kind: str) -> str:
    """Start of a temporary file name: its kind, and the PID and start time of
    the process writing it, so that the files of a process that died can be
    recognised (:func:`remove_orphans`): also when another process has its
    PID since (in a container, the server is PID 1 every time)."""
    pid = os.getpid()
    owner = _OWNER.get(pid)
    if owner is None:
        started = start_time(pid)
        owner = _OWNER[pid] = f"{pid}.{started}" if started not in (None, UNKNOWN_START) else str(pid)
    return f"{kind}-{owner}-"


#: "pid.start" of this process (by PID: a forked child has its own).
_OWNER: dict[int, str] = {}
#: The writer in a temporary file's name: its PID and, if known, its start time
#: (names written before the start time was added have the PID alone).
_TMP_OWNER = re.compile(r"^[a-z]-(\d+)(?:\.(\d+))?-")


def _writer_gone(match: re.Match[str]) -> bool:
    started = start_time(int(match.group(1)))
    if started is None:
        return True
    return match.group(2) is not None and started != UNKNOWN_START and started != int(match.group(2))


def remove_orphans(tmp: Path, older_than: float | None = None) -> int:
    """Remove temporary files in `tmp` whose writing process is gone (the PID in
    their name), and, with `older_than`, any file there not modified for that
    many seconds (e.g. one without a PID in its name).

    Returns how many were removed. Without `older_than`, the files of running
    processes are never touched. A `tmp` that is a symbolic link is not
    followed (nothing is removed): it is not ours to clean.
    """
    cutoff = None if older_than is None else time.time() - older_than
    removed = 0
    try:
        dir_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        with os.scandir(dir_fd) as it:
            entries = list(it)
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                match = _TMP_OWNER.match(entry.name)
                orphan = match is not None and _writer_gone(match)
                if orphan or (cutoff is not None and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                    os.unlink(entry.name, dir_fd=dir_fd)
                    removed += 1
            except OSError:
                continue
    finally:
        os.close(dir_fd)
    return removed


def tmp_dir(root: Path) -> Path:
    """The folder for files being written under `root` (created if needed;
    :class:`NotOwnFolder` if the name is a symbolic link or a file)."""
    return own_folder(root, TMP_DIRNAME)


def open_tmp(folder: str | os.PathLike[str], kind: str, suffix: str) -> tuple[BinaryIO, str]:
    """A new file in `folder` (a temporary area, made again if it was removed),
    open for writing, and its name: ``<kind>-<pid>.<start>-<random><suffix>``.

    Cheaper than :func:`tempfile.NamedTemporaryFile` (one ``open``, no wrapper):
    the network thread opens one per instance received."""
    for _ in range(100):
        name = os.path.join(folder, f"{tmp_prefix(kind)}{os.urandom(6).hex()}{suffix}")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # a name left by an earlier process with our PID
            continue
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            continue
        return os.fdopen(fd, "wb"), name
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(folder))


def new_tmp(root: Path) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=tmp_prefix("w"), suffix=".part", dir=tmp_dir(root))
    except OSError as exc:
        raise StoreError(f"cannot write under {root}: {exc.strerror}") from exc
    os.close(fd)
    return Path(name)


def fs_clock_ns(root: Path) -> int:
    """The output file system's idea of "now" (ns): the change time of a file
    created and removed at once in ``<root>/.sortscp-tmp``.

    Every file created later under `root` has a change time at or after it,
    whatever the granularity of the file system's clock.
    """
    tmp = new_tmp(root)
    try:
        return os.stat(tmp).st_ctime_ns
    finally:
        unlink_quietly(tmp)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

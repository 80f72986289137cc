"""``sortscp sort``: re-sort an existing tree into the layout, in parallel.

The source tree is walked lazily (a million files are never listed into
memory); every entry is accounted for: regular files go in batches to the
worker pool with a bounded number in flight, links (unless followed), special
files and unreadable folders become report rows at once. Each worker reads
only the header and places the file with :func:`scp.store.place.place`. Files
whose name holds other bytes are named after the walk
(:func:`scp.sort_jobs.sort_claims`), so ``~N`` never depends on scheduling. The
parent holds a lock on DST, collects :class:`Outcome` s into a
:class:`Report`, writes the optional per-file report and advances the
progress callback. SIGINT, SIGTERM and SIGHUP drain the work in flight and stop.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import errno
import itertools
import json
import logging
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

from scp.config import SortConfig, stop_signals
from scp.enums import Mode, Result, SkipCategory
from scp.errors import DestinationLockedError, Interrupted, ReportError, SortscpError
from scp.log import safe
from scp.pool import SORT_JOBS, WorkerPool
from scp.report import Outcome, Report
from scp.sort_jobs import COPY_REASON, Deferred, Item, failure_reason, sort_batch, sort_claims, special_file
from scp.store import fsops
from scp.store.fsops import SourceTree, flush_count, same_content
from scp.store.tmp import (
    INDEX_FILENAME,
    INDEX_LOCK_FILENAME,
    SORT_LOCK_FILENAME,
    STATE_DIRNAME,
    TMP_DIRNAME,
    NotOwnFolder,
    ServerRunning,
    SharedHold,
    SortRunning,
    fs_clock_ns,
    held_around,
    held_below,
    held_folder,
    hold_moved,
    holder_text,
    lock_holder,
    lock_taker,
    moved_under,
    remove_orphans,
    take_sort_lock,
    take_unserved,
    tmp_dir,
)

log = logging.getLogger(__name__)

#: Paths sent to a worker in one round trip.
BATCH_SIZE = 64
#: Folders with more entries than this are walked in the file system's order,
#: not sorted by name (see :class:`_Listing`): about 45 MB of names at most.
SORTED_FOLDER_LIMIT = 100_000
#: Batches in flight per worker: enough to keep every worker busy, no more.
INFLIGHT_PER_WORKER = 4
#: Report file name endings, and whether each is JSON lines.
REPORT_FORMATS = {".csv": False, ".json": True, ".jsonl": True, ".ndjson": True}
#: How often the parent looks at the stop flag while it waits for workers.
POLL_SECONDS = 0.2

ProgressFn = Callable[[Outcome], None]
Entry = Item | Outcome
_OUR_FOLDERS = frozenset({TMP_DIRNAME, STATE_DIRNAME})


def text(path: str) -> str:
    """`path` as valid UTF-8 text: undecodable bytes (carried as surrogates)
    become ``\\xNN``. Used for the report, the log and the terminal."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown(path: str) -> str:
    """`path` for a line on the terminal: as :func:`text`, with control
    characters (a newline, an escape sequence in a file name) escaped too, so a
    name can neither forge a line nor drive the terminal.

    >>> shown("a\\nfailed: forged\\x1b[2J")
    'a\\\\nfailed: forged\\\\x1b[2J'
    """
    return safe(text(path), backslashes=False)


# --- the walk ---------------------------------------------------------------------


def iter_entries(
    src: Path,
    skip: Path | None = None,
    *,
    changed_before_ns: int | None = None,
    follow_symlinks: bool = False,
    changed: list[Item] | None = None,
    leave_held: bool = False,
) -> Iterator[Entry]:
    """Every entry under `src`, lazily, depth first, in a stable order (names
    sorted, except in a folder too large to sort: see :class:`_Listing`).

    Regular files come as ``(path, via_link)`` items to sort; everything else as
    an :class:`Outcome`: symbolic links not followed, FIFOs, sockets and devices
    are ``skipped`` (category ``symlink`` / ``special``), a folder that cannot
    be read (permissions, a path too long) is ``failed``. `skip` (the
    destination, when it lies inside `src`) and our own folders are not
    entered. With `follow_symlinks`, links to files and folders are followed
    once each: the (st_dev, st_ino) of every folder entered and every file
    yielded is remembered, so loops end and a target is sorted once; one
    that is in `src` itself as well, met there after a link led to it, comes
    again as itself (so that a move removes it).
    With `changed_before_ns`, files whose inode changed after that moment (our
    own output, when sorting a tree in place) are passed over: appended to
    `changed`, if given, for the caller to sort those that are not its output.
    With `leave_held` (a move), a folder that another running server, sort or
    reindex holds as its output folder is not entered: it is ``failed``.
    """
    skip_real = os.path.realpath(skip) if skip is not None else None
    skip_inode = os.stat(skip_real).st_ino if skip_real and os.path.isdir(skip_real) else None
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    # Folders and files seen so far only through links: met as themselves later,
    # they are walked or sorted again, so that a move removes the files.
    by_link: set[tuple[int, int]] = set()
    if follow_symlinks:
        st = os.stat(src)
        seen_dirs.add((st.st_dev, st.st_ino))
    stack: list[tuple[str, bool]] = [(os.fspath(src), False)]
    while stack:
        folder, via_link = stack.pop()
        if leave_held:
            pid = held_folder(folder)
            if pid is not None and pid != os.getpid():  # (ours: DST, sorted in place)
                yield Outcome(Result.FAILED, folder, "", "not moved: this folder is the output folder of "
                              f"a running sortscp{holder_text(pid)} (stop it first)")
                continue
        try:
            entries = _Listing(folder)
        except OSError as exc:
            yield Outcome(Result.FAILED, folder, "", f"cannot read this folder: {exc.strerror}")
            continue
        subfolders = []
        for entry in entries:
            try:
                if entry.is_symlink():
                    if not follow_symlinks:
                        yield _link_skipped(entry.path)
                        continue
                    found = _follow(entry.path, seen_dirs, seen_files, by_link)
                    if isinstance(found, Outcome):
                        yield found
                    elif found == "dir":
                        subfolders.append((entry.path, True))
                    else:
                        yield (entry.path, True)
                elif entry.is_dir(follow_symlinks=False):
                    if entry.name in _OUR_FOLDERS:
                        continue
                    if (
                        skip_real is not None
                        and entry.inode() == skip_inode  # free: realpath only on a match
                        and os.path.realpath(entry.path) == skip_real
                    ):
                        continue
                    if follow_symlinks:
                        st = entry.stat(follow_symlinks=False)
                        key = (st.st_dev, st.st_ino)
                        if key in seen_dirs:
                            if via_link or key not in by_link:
                                continue
                            by_link.discard(key)  # walked through a link: again, as itself
                        else:
                            seen_dirs.add(key)
                            if via_link:
                                by_link.add(key)
                    subfolders.append((entry.path, via_link))
                elif entry.is_file(follow_symlinks=False):
                    if changed_before_ns is not None or follow_symlinks:
                        st = entry.stat(follow_symlinks=False)
                        if changed_before_ns is not None and st.st_ctime_ns >= changed_before_ns:
                            if changed is not None:
                                changed.append((entry.path, via_link))
                            continue
                        if follow_symlinks:
                            key = (st.st_dev, st.st_ino)
                            if key in seen_files:
                                if via_link or key not in by_link:
                                    yield _seen(entry.path)
                                    continue
                                # The file itself, sorted through a link already: it is sorted
                                # again as itself (in place now), so that a move removes it.
                                by_link.discard(key)
                            else:
                                seen_files.add(key)
                                if via_link:
                                    by_link.add(key)
                    yield (entry.path, via_link)
                else:
                    yield special_file(entry.path, entry.stat(follow_symlinks=False).st_mode)
            except FileNotFoundError:
                yield Outcome(Result.SKIPPED, entry.path, "", "removed by someone else before it "
                              "was sorted", category=SkipCategory.GONE.value)
            except OSError as exc:
                yield Outcome(Result.FAILED, entry.path, "", f"cannot look at it: {exc.strerror}")
        if entries.error is not None:
            yield Outcome(Result.FAILED, folder, "",
                          f"cannot read all of this folder: {entries.error.strerror}")
        stack.extend(reversed(subfolders))


class _Listing:
    """The entries of one folder, sorted by name if there are at most
    :data:`SORTED_FOLDER_LIMIT`; beyond, in the order the file system lists
    them, read as they are walked, so the memory of a walk stays flat however
    many files one folder holds. An error met while reading the rest is kept
    in :attr:`error`; one met before raises."""

    def __init__(self, folder: str) -> None:
        self.error: OSError | None = None
        it = os.scandir(folder)
        try:
            self._first = list(itertools.islice(it, SORTED_FOLDER_LIMIT + 1))
        except BaseException:
            it.close()
            raise
        self._rest: Iterator[os.DirEntry[str]] | None = it
        if len(self._first) <= SORTED_FOLDER_LIMIT:
            it.close()
            self._rest = None
            self._first.sort(key=lambda e: e.name)

    def __iter__(self) -> Iterator[os.DirEntry[str]]:
        first, self._first = self._first, []
        yield from first
        del first
        if self._rest is not None:
            with self._rest:  # type: ignore[attr-defined]
                try:
                    yield from self._rest
                except OSError as exc:
                    self.error = exc


def _link_skipped(path: str) -> Outcome:
    target = os.readlink(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        what = f"a dangling symbolic link (to {target})"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            what = f"a symbolic link loop (to {target})"
        else:
            what = f"a symbolic link (to {target}) that cannot be followed: {exc.strerror}"
    else:
        kind = "folder" if stat.S_ISDIR(st.st_mode) else "file"
        what = f"a symbolic link to a {kind} ({target}); not followed (see --follow-symlinks)"
    return Outcome(Result.SKIPPED, path, "", what, category=SkipCategory.SYMLINK.value)


def _follow(
    path: str, seen_dirs: set[tuple[int, int]], seen_files: set[tuple[int, int]],
    by_link: set[tuple[int, int]],
) -> str | Outcome:
    """Where a followed link leads: ``"dir"`` or ``"file"`` to walk or sort, or
    the Outcome that says why not (dangling, a loop, seen already, special)."""
    try:
        st = os.stat(path)
    except OSError:
        return _link_skipped(path)
    key = (st.st_dev, st.st_ino)
    if stat.S_ISDIR(st.st_mode):
        if key in seen_dirs:
            return Outcome(Result.SKIPPED, path, "", f"a symbolic link to a folder walked "
                           f"already ({os.readlink(path)})", category=SkipCategory.SYMLINK.value)
        seen_dirs.add(key)
        by_link.add(key)
        return "dir"
    if stat.S_ISREG(st.st_mode):
        if key in seen_files:
            return _seen(path)
        seen_files.add(key)
        by_link.add(key)
        return "file"
    return special_file(path, st.st_mode)


def _seen(path: str) -> Outcome:
    return Outcome(Result.SKIPPED, path, "", "the same file as one sorted already under "
                   "another name", category=SkipCategory.SYMLINK.value)



def iter_files(
    src: Path, skip: Path | None = None, *, changed_before_ns: int | None = None
) -> Iterator[str]:
    """The regular files :func:`iter_entries` yields (links not followed)."""
    for entry in iter_entries(src, skip, changed_before_ns=changed_before_ns):
        if isinstance(entry, tuple):
            yield entry[0]


def count_entries(
    src: Path, skip: Path | None = None, follow_symlinks: bool = False, leave_held: bool = False
) -> int:
    """How many entries :func:`iter_entries` will yield (for a progress total)."""
    return sum(1 for _ in iter_entries(src, skip, follow_symlinks=follow_symlinks, leave_held=leave_held))


def _dst_inside_src(cfg: SortConfig) -> bool:
    return _inside(cfg.dst, cfg.src)


def _inside(inner: Path, outer: Path) -> bool:
    """True if `inner` is `outer` or a folder under it (links resolved)."""
    a, b = os.path.realpath(inner), os.path.realpath(outer)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


# --- the lock and the signals ---------------------------------------------------------


def lock_destination(dst: Path) -> int:
    """Take DST for this run (:func:`~scp.store.tmp.take_sort_lock`); its descriptor.

    Raises :class:`DestinationLockedError` if another sort (or a server
    starting on DST) holds it.
    """
    try:
        return take_sort_lock(dst)
    except SortRunning as exc:
        raise DestinationLockedError(_sort_running(dst, exc.pid)) from None


class _Stop:
    """Set by SIGINT, SIGTERM or SIGHUP; a second signal raises KeyboardInterrupt (stop now)."""

    signum: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


@contextmanager
def _signals(stop: _Stop) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, stop) for s in stop_signals()}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# --- the run ----------------------------------------------------------------------


def sort_tree(
    cfg: SortConfig,
    on_progress: ProgressFn | None = None,
    on_total: Callable[[int], None] | None = None,
    on_rename: Callable[[str, str], None] | None = None,
) -> Report:
    """Sort every entry under ``cfg.src`` into ``cfg.dst``; return the :class:`Report`.

    `on_progress` is called with each :class:`Outcome`; `on_total`, if given, is
    called once with the number of entries, counted by a background thread while
    the sorting has already begun; `on_rename(old, new)` when a file placed at a
    plain name during the walk moves to its ``~N`` (see :func:`scp.sort_jobs.sort_claims`).

    Raises :class:`DestinationLockedError` if another sort writes into DST, and
    :class:`Interrupted` after a stop signal once the work in flight is done.
    """
    in_place = _same_folder(cfg.src, cfg.dst)
    if in_place and os.path.realpath(cfg.src) != os.path.realpath(cfg.dst):
        # One folder under two names (a bind mount of DST): sorted by DST's name, which
        # every check of a run in place compares paths with.
        cfg = dataclasses.replace(cfg, src=cfg.dst)
    report = Report()
    parent_flushes = flush_count()  # ours (the names given after the walk), beside the workers'
    skip = cfg.dst if _dst_inside_src(cfg) and not in_place else None
    emptied: set[str] = set()
    deferred: dict[str, list[Deferred]] = {}
    planned: dict[str, str] = {}  # dry run: plain name -> the source planned there
    # A dry run of a move within one tree: the files planned to leave their name
    # (hashed), whose names are then free for the plan (as in the real run).
    nested = _inside(cfg.src, cfg.dst) or _dst_inside_src(cfg)
    leaving: set[int] | None = set() if cfg.dry_run and cfg.mode is Mode.MOVE and nested else None
    stop = _Stop()

    with ExitStack() as stack:
        # The claims decided after the walk read and remove sources here, in the parent.
        fsops.SOURCES = SourceTree(cfg.src)
        stack.callback(setattr, fsops, "SOURCES", None)
        # The report file first: a bad --report path fails before DST is touched.
        writer = stack.enter_context(_ReportWriter(cfg.report, cfg.dst)) if cfg.report else None
        changed_before_ns = started_ns = None
        index_lock = None
        try:
            _refuse_held_around(cfg)
        except DestinationLockedError:
            if writer is not None:
                writer.discard()
            raise
        if cfg.dry_run:
            _refused_as_the_run_would_be(cfg.dst)
        else:
            try:
                lock = lock_destination(cfg.dst)
                stack.callback(os.close, lock)
                tmp_dir(cfg.dst)  # a real folder of DST's own, not a link out of it
                held = _take_unserved(cfg.dst)
                if held is not None:
                    stack.callback(os.close, held)
                if cfg.mode is Mode.MOVE and not in_place:
                    moved = _hold_moved(cfg.src)  # (in place: DST's own hold covers it)
                    if moved is not None:
                        stack.callback(os.close, moved)
                index_lock = _lock_served_index(cfg.dst)
            except (DestinationLockedError, NotOwnFolder):
                if writer is not None:
                    writer.discard()
                raise
            if index_lock is not None:
                stack.callback(os.close, index_lock)
            started_ns = os.fstat(lock).st_ctime_ns  # the file system's clock, now
            removed = remove_orphans(cfg.dst / TMP_DIRNAME)  # left by an interrupted run
            if removed:
                log.info("removed %d temporary files left by an interrupted run", removed)
            if _inside(cfg.src, cfg.dst):  # SRC = DST, or a folder of DST
                # Our own output can appear in the tree being walked: pass over every
                # file changed after this moment, measured by the file system's clock.
                changed_before_ns = fs_clock_ns(cfg.dst)
        if writer is not None:
            writer.begin()  # (only now: a run refused at the lock leaves the report alone)
        # In place: the files the walk passed over as changed during the run, and
        # (hashed) every name this run made. Those of the first not in the second
        # (a second hard link of a moved file, a file chmod-ed meanwhile) are
        # sorted after the walk, so each entry of SRC gets its row.
        changed: list[Item] = []
        made: set[int] = set()
        dst_real = os.path.realpath(cfg.dst)

        def name_key(rel: str) -> int:
            """How `made` and `leaving` hold the name `rel` of DST."""
            return hash(os.path.join(dst_real, rel))
        entries = iter_entries(
            cfg.src, skip, changed_before_ns=changed_before_ns,
            follow_symlinks=cfg.follow_symlinks, changed=changed, leave_held=cfg.mode is Mode.MOVE,
        )
        pool = WorkerPool(cfg.workers, fork=True, preload=SORT_JOBS)  # before any thread of ours starts
        if on_total is not None:
            threading.Thread(
                target=lambda: on_total(
                    count_entries(cfg.src, skip, cfg.follow_symlinks, cfg.mode is Mode.MOVE)),
                name="count", daemon=True,
            ).start()
        stack.enter_context(_signals(stop))
        pending: dict[Future, list[Item]] = {}
        debug = log.isEnabledFor(logging.DEBUG)
        # What a name this run made was counted as, when not new (a copy placed
        # whose source could not be removed is "failed"): a rename of it to ~N
        # after the walk moves that count, not "new"'s.
        counted_as: dict[str, Result] = {}

        def emit(outcome: Outcome) -> None:
            report.add(outcome)
            if outcome.destination and outcome.result in (Result.FAILED, Result.REPLACED):
                counted_as[outcome.destination] = outcome.result  # (rare: not one entry per file)
            if changed_before_ns is not None and outcome.result in _MADE:
                made.add(name_key(outcome.destination))
            if writer:
                writer.write(outcome)
            if debug:  # the line costs more than the rest of emit(): build it only if logged
                log.debug("%s", _log_line(outcome, cfg.dst))
            if cfg.mode is Mode.MOVE and outcome.result in (
                Result.NEW, Result.REPLACED, Result.ALREADY, Result.KEPT_AS_COPY
            ):
                emptied.add(os.path.dirname(outcome.source))
            if on_progress:
                on_progress(outcome)

        def take(result: Outcome | Deferred) -> None:
            if isinstance(result, Deferred):
                deferred.setdefault(result.rel, []).append(result)
                return
            if cfg.dry_run and result.result is Result.PLANNED:
                if leaving is not None:
                    here = hash(os.path.realpath(result.source))
                    if here != name_key(result.destination):
                        leaving.add(here)
                first = planned.setdefault(result.destination, result.source)
                if first != result.source:  # two files of this run planned at one name
                    if not same_content(Path(first), Path(result.source)):
                        deferred.setdefault(result.destination, []).append(
                            Deferred(result.source, result.destination))
                        return
                    result = Outcome(Result.ALREADY, result.source, result.destination,
                                     f"the same bytes as {text(first)}, planned there",
                                     result.nbytes)
            emit(result)

        def collect(future: Future) -> None:
            try:
                results, flushes = future.result()
                report.flushes += flushes
            except Exception as exc:  # a worker died: its batch again, file by file
                results = again(pending[future], exc)
            for result in results:
                take(result)

        def again(items: list[Item], exc: BaseException) -> list[Outcome | Deferred]:
            """The files of a batch whose worker died (killed, out of memory),
            each sorted again on its own: the dead worker may have placed some
            (a move links each file at its name before it removes the
            sources), which the new run finds there; a file that kills its
            worker fails alone."""
            log.warning("a worker died during a batch of %d files (%r): sorting them again one by one",
                        len(items), exc)
            results: list[Outcome | Deferred] = []
            for item in items:  # (after a stop too: they were in flight, and a batch is short)
                try:
                    one, flushes = pool.submit(sort_batch, [item], cfg).result()
                    report.flushes += flushes
                    results.extend(_after_death(o, cfg) for o in one)
                except Exception as exc:
                    results.append(Outcome(Result.FAILED, item[0], "", f"worker failed: {exc!r}"))
            return results

        def finish_batches() -> None:
            """Wait for the batches in flight (after a stop: only those started)."""
            if stop.signum is not None:
                for f in list(pending):
                    if f.cancel():
                        del pending[f]
            _drain(pending, collect, None)

        try:
            limit = pool.workers * INFLIGHT_PER_WORKER
            batch: list[Item] = []
            for entry in itertools_chain(entries, stop):
                if isinstance(entry, Outcome):
                    take(entry)
                    continue
                batch.append(entry)
                if len(batch) < BATCH_SIZE:
                    continue
                _submit(pool, pending, batch, cfg)
                batch = []
                _drain(pending, collect, stop, keep=limit - 1)
            if batch and stop.signum is None:
                _submit(pool, pending, batch, cfg)
            finish_batches()
            others = [item for item in changed
                      if hash(os.path.realpath(item[0])) not in made]
            changed.clear()
            for start in range(0, len(others), BATCH_SIZE):
                if stop.signum is not None:
                    break
                _submit(pool, pending, others[start:start + BATCH_SIZE], cfg)
                _drain(pending, collect, stop, keep=limit - 1)
            finish_batches()
            if stop.signum is None:
                for rel in sorted(deferred):
                    if stop.signum is not None:
                        break
                    try:
                        outcomes, renamed = sort_claims(
                            rel, deferred[rel], cfg, started_ns, planned.get(rel),
                            plain_leaving=leaving is not None
                            and name_key(rel) in leaving)
                    except (OSError, SortscpError) as exc:  # that name only: the run goes on
                        why = f"cannot name it at {rel}: {failure_reason(exc)}"
                        outcomes = [Outcome(Result.FAILED, c.source, "", why) for c in deferred[rel]]
                        renamed = None
                    if renamed is not None:
                        _renamed(rel, renamed, report, writer, cfg, on_rename, counted_as.get(rel))
                    for outcome in outcomes:
                        emit(outcome)
        finally:
            pool.close(wait=True)
            if not cfg.dry_run:
                remove_orphans(cfg.dst / TMP_DIRNAME)  # those of our workers, if any died
        if index_lock is not None and stop.signum is None:
            report.indexed, report.index_duplicates = _rebuild_index(cfg.dst, index_lock)

    if cfg.mode is Mode.MOVE and not cfg.dry_run:
        _remove_emptied(emptied, cfg.src, cfg.dst)
    report.flushes += flush_count() - parent_flushes
    log.info("--fsync %s: %d flushes to disk", cfg.fsync.value, report.flushes)
    if stop.signum is not None:
        raise Interrupted(stop.signum)
    return report


def _after_death(o: Outcome | Deferred, cfg: SortConfig) -> Outcome | Deferred:
    """A file sorted again after its worker died: a move's source that is
    gone was, most likely, moved by the dead worker (it removes a source only
    once its copy is in place, flushed)."""
    if cfg.mode is Mode.MOVE and isinstance(o, Outcome) and o.category == SkipCategory.GONE.value:
        return dataclasses.replace(o, reason="its worker died just after it moved the file (its copy is "
                                            "in DST; a .sortscp-leaving-* name left beside it is removed "
                                            "by the next run), or someone else removed it")
    return o


def _refused_as_the_run_would_be(dst: Path) -> None:
    """A dry run says what the real run would: refused (75) while another sort
    or a running server holds DST. It only looks (:func:`lock_holder`)."""
    state = dst / STATE_DIRNAME
    pid = lock_holder(state / SORT_LOCK_FILENAME)
    if pid is not None:
        raise DestinationLockedError(_sort_running(dst, str(pid)))
    if lock_holder(state / INDEX_LOCK_FILENAME) is not None or lock_holder(dst) is not None:
        # (a server holds both: the index's lock, and DST itself even while its state folder is gone)
        raise DestinationLockedError(_SERVER_RUNNING.format(dst=dst))


def _refuse_held_around(cfg: SortConfig) -> None:
    """Refused (75), before anything is touched: DST inside the output folder
    of a running server (or of another sort or a reindex), whose index would
    not know the files put there, or holding one, whose files this sort's
    index would take for its own; and a move out of such a folder, or out of
    a folder inside one, which would take files from under its index.
    (Folders of SRC that such a process holds are left alone by the walk.)"""
    around = held_around(cfg.dst)
    if around is not None:
        raise DestinationLockedError(
            f"{shown(os.fspath(cfg.dst))} is inside {shown(os.fspath(around[0]))}, the output folder "
            f"of a running sortscp{holder_text(around[1])}: sort into a folder outside it, or send "
            "the files to that server (storescu +sd +r ...)")
    below = held_below(cfg.dst)
    if below is not None:
        raise DestinationLockedError(
            f"{shown(os.fspath(cfg.dst))} holds {shown(os.fspath(below[0]))}, the output folder of a "
            f"running sortscp{holder_text(below[1])}, whose files this sort would index and file "
            "among its own: sort into a folder that holds no other's")
    moving = moved_under(cfg.dst, shown)
    if moving is not None:
        raise DestinationLockedError(f"{moving}, which would take what this sort files there with it: "
                                     "sort when it has finished, or into another folder")
    if cfg.mode is not Mode.MOVE:
        return
    moving = moved_under(cfg.src, shown)
    if moving is not None:
        raise DestinationLockedError(f"{moving}: one move at a time; run this one when it has finished")
    same = os.path.realpath(cfg.src) == os.path.realpath(cfg.dst)
    pid = None if same else held_folder(cfg.src)  # (DST itself: refused at its own lock)
    around = (cfg.src, pid) if pid is not None else held_around(cfg.src)
    if around is not None:
        raise DestinationLockedError(_move_from_served(around[0], holder_text(around[1])))


def _sort_running(dst: Path, pid: str) -> str:
    return (f"another sortscp sort (or a server starting on it) is writing into {shown(os.fspath(dst))} "
            f"({lock_taker(dst, pid)}); try again when it has finished")


_SERVER_RUNNING = ("a running server (sortscp serve) holds the instance index of {dst}: stop it "
                   "first, or send these files to it (storescu +sd +r ...)")


def _same_folder(a: Path, b: Path) -> bool:
    """`a` and `b` are one folder (also through a bind mount, which paths do not show)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _hold_moved(src: Path) -> int | None:
    """A move's hold on SRC for the run (:func:`~scp.store.tmp.hold_moved`):
    a server or a sort starting on it, or in it, sees it and is refused."""
    try:
        return hold_moved(src)
    except BlockingIOError:  # (a server started on it since it was looked at)
        raise DestinationLockedError(_move_from_served(src)) from None


def _move_from_served(folder: Path, holder: str = "") -> str:
    return (f"--mode move would take the files of {shown(os.fspath(folder))}, the output folder of a "
            f"running sortscp{holder}, from under its index: stop it first, or --mode copy")


def _take_unserved(dst: Path) -> int | None:
    """DST's folder lock for the run (:func:`~scp.store.tmp.take_unserved`):
    a running server holds it, even while its ``.sortscp`` folder is gone."""
    try:
        return take_unserved(dst)
    except SharedHold as exc:
        raise DestinationLockedError(str(exc)) from None
    except ServerRunning:
        raise DestinationLockedError(_SERVER_RUNNING.format(dst=dst)) from None


def _lock_served_index(dst: Path) -> int | None:
    """If DST is (or was) a serve output folder, take its instance index for
    the run (the lock's file descriptor): a server that files into DST while
    the run adds files beside its index would keep its index without them,
    and so no longer one file per SOPInstanceUID. A running server holds it:
    :class:`DestinationLockedError` (the run touches nothing)."""
    state = dst / STATE_DIRNAME
    if not ((state / INDEX_FILENAME).is_file() or (state / INDEX_LOCK_FILENAME).is_file()):
        # not a serve output folder (and the index module is not even imported); the
        # lock alone: a server whose index was removed by hand, which it rebuilds
        return None
    from scp.store.index import IndexInUseError, lock_index, mark_behind

    try:
        fd = lock_index(dst)
    except IndexInUseError:
        raise DestinationLockedError(_SERVER_RUNNING.format(dst=dst)) from None
    # The run ends with a rebuild; until then (and if it never ends) the next server rebuilds it.
    mark_behind(dst, "a sort into this folder did not finish (the index may not name its files)")
    return fd


def _rebuild_index(dst: Path, locked: int) -> tuple[int, list[tuple[str, str, str]]]:
    """The index of DST (held by this run) rebuilt from the files, so that
    serve keeps one file per SOPInstanceUID with what the run added: how many
    instances it holds, and the files that hold an instance another file
    holds (the run may have put a copy beside one of another folder)."""
    from scp.jobs import identity_facts
    from scp.store.index import rebuild

    summary = rebuild(dst, identity_facts, locked=locked)
    return summary.instances, summary.duplicates


#: The outcomes that give a file a new name in DST.
_MADE = (Result.NEW, Result.REPLACED, Result.KEPT_AS_COPY)


def itertools_chain(entries: Iterator[Entry], stop: _Stop) -> Iterator[Entry]:
    """`entries` until a stop is asked for."""
    for entry in entries:
        if stop.signum is not None:
            return
        yield entry


def _submit(pool: WorkerPool, pending: dict[Future, list[Item]], batch: list[Item],
            cfg: SortConfig) -> None:
    pending[pool.submit(sort_batch, batch, cfg)] = batch


def _drain(
    pending: dict[Future, list[Item]], collect: Callable[[Future], None],
    stop: _Stop | None, keep: int = 0,
) -> None:
    """Collect finished batches until at most `keep` are in flight (or a stop is
    asked for: then the caller cancels and drains the rest)."""
    while len(pending) > keep:
        if stop is not None and stop.signum is not None:
            return
        done, _ = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
        for f in done:
            collect(f)
            del pending[f]


def _renamed(
    rel: str, renamed: str, report: Report, writer: _ReportWriter | None, cfg: SortConfig,
    on_rename: Callable[[str, str], None] | None, counted: Result | None = None,
) -> None:
    """The file the walk put (or planned) at `rel` now has the name `renamed`;
    its entry was counted as `counted` (None: new, or planned)."""
    if counted is None:
        report.recount(Result.PLANNED if cfg.dry_run else Result.NEW, Result.KEPT_AS_COPY)
    elif counted is Result.REPLACED:
        report.recount(Result.REPLACED, Result.KEPT_AS_COPY)
    # (a failed entry stays failed: its source is still there, its copy renamed)
    if writer is not None:
        writer.amend(rel, renamed)
    log.debug("renamed %s to %s: a file with a smaller SHA-256 claims the plain name",
              text(os.fspath(cfg.dst / rel)), text(os.fspath(cfg.dst / renamed)))
    if on_rename is not None:
        on_rename(rel, renamed)


def _log_line(o: Outcome, dst: Path) -> str:
    line = f"{o.result.value}: {text(o.source)}"
    if o.destination:
        line += f" -> {text(os.fspath(dst / o.destination))}"
    if o.category:
        line += f" [{o.category}]"
    if o.reason:
        line += f" ({text(o.reason)})"
    return line


def _remove_emptied(folders: set[str], src: Path, dst: Path) -> None:
    """Remove the source folders that moving emptied, and their parents that
    became empty in turn, up to (not including) `src` and `dst` themselves.

    Only folders that held a moved file are candidates, so a folder that was
    empty before the run stays. Sorting in place (``SRC == DST``), the folders
    of the old layout go once they are empty.
    """
    stop = {os.path.realpath(src), os.path.realpath(dst)}
    src_prefix = os.path.realpath(src).rstrip(os.sep) + os.sep
    for folder in sorted(folders, key=len, reverse=True):
        while True:
            real = os.path.realpath(folder)
            if real in stop or not real.startswith(src_prefix):
                break
            try:
                os.rmdir(folder)  # fails unless empty: nothing but empty folders goes
            except OSError:
                break
            folder = os.path.dirname(folder)


class _ReportWriter:
    """One row per entry: source, destination, outcome, reason, category,
    source_b64 (CSV or JSON lines).

    Every value is valid UTF-8: a path with bytes that are not UTF-8 is written
    with ``\\xNN`` escapes in ``source``, and its exact bytes, base64-encoded, in
    ``source_b64`` (empty for every other path).
    """

    FIELDS = ("source", "destination", "outcome", "reason", "category", "source_b64")

    def __init__(self, path: Path, dst: Path) -> None:
        self.path = path
        self.dst = dst
        self.json = REPORT_FORMATS.get(path.suffix.lower(), False)
        self._file: IO[str] | None = None
        self._created = False
        self._amend: dict[str, tuple[str, int]] = {}
        self._rows = 0

    def __enter__(self) -> _ReportWriter:
        """Open it, not emptied yet (:meth:`begin`): a run refused at DST's lock
        must leave the report of the run that holds it alone."""
        self._created = not os.path.lexists(self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self._file = open(fd, "w", encoding="utf-8", newline="")
        return self

    def begin(self) -> None:
        """The run goes ahead: empty the file and write the header."""
        assert self._file is not None
        if stat.S_ISREG(os.fstat(self._file.fileno()).st_mode):  # (not a pipe)
            self._file.truncate(0)
        if not self.json:
            self._csv = csv.writer(self._file)
            self._csv.writerow(self.FIELDS)

    def _row(self, o: Outcome) -> tuple[str, ...]:
        destination = os.fspath(self.dst / o.destination) if o.destination else ""
        raw = ""
        if text(o.source) != o.source:
            raw = base64.b64encode(os.fsencode(o.source)).decode("ascii")
        return (text(o.source), text(destination), o.result.value, text(o.reason),
                o.category, raw)

    def write(self, o: Outcome) -> None:
        row = self._row(o)
        self._rows += 1
        assert self._file is not None
        try:
            if self.json:
                self._file.write(json.dumps(dict(zip(self.FIELDS, row)), ensure_ascii=False) + "\n")
            else:
                self._csv.writerow(row)
        except OSError as exc:  # a full disk: the run cannot account for its entries any more
            raise ReportError(f"cannot write the report {self.path}: {exc.strerror or exc}") from None

    def amend(self, old_rel: str, new_rel: str) -> None:
        """Rows written so far with the destination `old_rel` get `new_rel`
        (applied at close: the file is rewritten once, only if a rename happened)."""
        old, new = (text(os.fspath(self.dst / r)) for r in (old_rel, new_rel))
        self._amend[old] = (new, self._rows)

    def discard(self) -> None:
        """Close it, untouched, and remove it if this run created it (the run
        was refused before it began)."""
        assert self._file is not None
        self._file.close()
        if self._created:
            os.unlink(self.path)
        self._file = None

    def __exit__(self, *exc: object) -> None:
        if self._file is None:
            return
        regular = stat.S_ISREG(os.fstat(self._file.fileno()).st_mode)
        try:
            self._file.close()
        except OSError as exc:  # the last rows did not fit
            raise ReportError(f"cannot write the report {self.path}: {exc.strerror or exc}") from None
        if self._amend and not regular:
            # A pipe or FIFO cannot be rewritten (and reopening one to read it
            # blocked the run for ever): its rows stay as streamed.
            log.warning("the report %s is not a regular file: the rows written before %d name(s) got "
                        "their '~N' after the walk still give the plain name", self.path, len(self._amend))
            for old, (new, _) in self._amend.items():
                log.warning("report: %s is now %s", old, new)
        elif self._amend:
            self._rewrite()

    def _rewrite(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".report-", dir=folder)
        with open(self.path, encoding="utf-8", newline="") as old, \
                os.fdopen(fd, "w", encoding="utf-8", newline="") as new:
            if self.json:
                for i, line in enumerate(old):
                    row = json.loads(line)
                    self._fix(row, i)
                    new.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                out = csv.writer(new)
                for i, values in enumerate(csv.reader(old)):
                    if i:
                        row = dict(zip(self.FIELDS, values))
                        self._fix(row, i - 1)
                        values = [row[k] for k in self.FIELDS]
                    out.writerow(values)
        os.replace(tmp, self.path)

    def _fix(self, row: dict[str, str], index: int) -> None:
        new, upto = self._amend.get(row["destination"], (None, 0))
        if new is None or index >= upto:
            return
        row["destination"] = new
        if row["outcome"] in (Result.NEW.value, Result.PLANNED.value, Result.REPLACED.value):
            row["outcome"] = Result.KEPT_AS_COPY.value
            row["reason"] = COPY_REASON


def report_clobbers(path: Path) -> str | None:
    """Why `--report PATH` must not be written, or None: an existing file
    that is not empty and not a report of ours (a DICOM file of SRC, say,
    which the run would empty before it reads it) is never overwritten."""
    fields = _ReportWriter.FIELDS
    starts = (",".join(fields[:3]).encode(), f'{{"{fields[0]}": '.encode())  # CSV header, JSON line
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return None
        with open(path, "rb") as f:
            head = f.read(max(map(len, starts)))
    except OSError:
        return None  # opening it for the report says what is wrong
    if head.startswith(starts):
        return None
    return "the file exists and is not a sortscp report; refusing to overwrite it (choose another path)"

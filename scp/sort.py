"""``sortscp sort``: re-sort an existing tree into the layout, in parallel.

The source tree is walked lazily (a million files are never listed into
memory); batches of paths go to the worker pool with a bounded number in
flight; each worker reads only the header and places the file with
:func:`scp.store.place.place`. The parent collects :class:`Outcome` s into a
:class:`Report`, writes the optional per-file report and advances the
progress callback.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import ExitStack
from pathlib import Path
from typing import IO

from scp.config import SortConfig
from scp.enums import Mode, Result
from scp.jobs import sort_files
from scp.pool import WorkerPool
from scp.report import Outcome, Report
from scp.store.tmp import TMP_DIRNAME, fs_clock_ns, remove_orphans

log = logging.getLogger(__name__)

#: Paths sent to a worker in one round trip.
BATCH_SIZE = 32
#: Batches in flight per worker: enough to keep every worker busy, no more.
INFLIGHT_PER_WORKER = 4

ProgressFn = Callable[[Outcome], None]


def iter_files(
    src: Path, skip: Path | None = None, *, changed_before_ns: int | None = None
) -> Iterator[str]:
    """Yield the regular files under `src`, lazily, in a stable order.

    `skip` (the destination, when it lies inside `src`) and our temporary
    folders are not entered. Symbolic links are not followed. With
    `changed_before_ns`, files whose inode changed after that moment (our own
    output, when sorting a tree in place) are passed over.
    """
    skip_real = os.path.realpath(skip) if skip is not None else None
    skip_inode = os.stat(skip_real).st_ino if skip_real and os.path.isdir(skip_real) else None
    stack = [os.fspath(src)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot read folder %s: %s", folder, exc.strerror)
            continue
        subfolders = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name == TMP_DIRNAME:
                        continue
                    if (
                        skip_real is not None
                        and entry.inode() == skip_inode  # free: realpath only on a match
                        and os.path.realpath(entry.path) == skip_real
                    ):
                        continue
                    subfolders.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    if changed_before_ns is not None:
                        if entry.stat(follow_symlinks=False).st_ctime_ns >= changed_before_ns:
                            continue
                    yield entry.path
            except OSError:
                continue
        stack.extend(reversed(subfolders))


def count_files(src: Path, skip: Path | None = None) -> int:
    """How many files :func:`iter_files` will yield (for a progress total)."""
    return sum(1 for _ in iter_files(src, skip))


def _dst_inside_src(cfg: SortConfig) -> bool:
    src, dst = os.path.realpath(cfg.src), os.path.realpath(cfg.dst)
    return dst == src or dst.startswith(src.rstrip(os.sep) + os.sep)


def sort_tree(
    cfg: SortConfig,
    on_progress: ProgressFn | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Report:
    """Sort every file under ``cfg.src`` into ``cfg.dst``; return the :class:`Report`.

    `on_progress` is called with each :class:`Outcome`; `on_total`, if given, is
    called once with the number of files, counted by a background thread while
    the sorting has already begun.
    """
    report = Report()
    in_place = os.path.realpath(cfg.src) == os.path.realpath(cfg.dst)
    skip = cfg.dst if _dst_inside_src(cfg) and not in_place else None
    emptied: set[str] = set()

    with ExitStack() as stack:
        # The report file first: a bad --report path fails before DST is touched.
        writer = stack.enter_context(_ReportWriter(cfg.report, cfg.dst)) if cfg.report else None
        changed_before_ns = None
        if not cfg.dry_run:
            cfg.dst.mkdir(parents=True, exist_ok=True)
            removed = remove_orphans(cfg.dst / TMP_DIRNAME)  # left by an interrupted run
            if removed:
                log.info("removed %d temporary files left by an interrupted run", removed)
            if in_place:
                # Our own output appears in the tree being walked: pass over every
                # file changed after this moment, measured by the file system's clock.
                changed_before_ns = fs_clock_ns(cfg.dst)
        paths = iter_files(cfg.src, skip, changed_before_ns=changed_before_ns)
        if on_total is not None:
            threading.Thread(
                target=lambda: on_total(count_files(cfg.src, skip)), name="count", daemon=True
            ).start()
        pool = stack.enter_context(WorkerPool(cfg.workers))
        pending: dict[Future, list[str]] = {}

        def collect(future: Future) -> None:
            try:
                outcomes = future.result()
            except Exception as exc:  # a worker died: every file of the batch failed
                outcomes = [
                    Outcome(Result.FAILED, p, "", f"worker failed: {exc!r}")
                    for p in pending[future]
                ]
            for outcome in outcomes:
                report.add(outcome)
                if writer:
                    writer.write(outcome)
                if cfg.mode is Mode.MOVE and outcome.result in (Result.STORED, Result.ALREADY):
                    emptied.add(os.path.dirname(outcome.source))
                if on_progress:
                    on_progress(outcome)

        limit = pool.workers * INFLIGHT_PER_WORKER
        while True:
            batch = list(itertools.islice(paths, BATCH_SIZE))
            if not batch:
                break
            future = pool.submit(sort_files, batch, cfg)
            pending[future] = batch
            for f in _completed(pending, keep=limit - 1):
                collect(f)
        for f in _completed(pending):
            collect(f)

    if cfg.mode is Mode.MOVE and not cfg.dry_run:
        _remove_emptied(emptied, cfg.src, cfg.dst)
    return report


def _completed(pending: dict[Future, list[str]], keep: int = 0) -> Iterator[Future]:
    """Yield futures as they finish (removing each from `pending` once the caller
    is done with it) until at most `keep` are left."""
    while len(pending) > keep:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for f in done:
            yield f
            del pending[f]


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
    """One row per file: source, destination, outcome, reason (CSV or JSON lines)."""

    FIELDS = ("source", "destination", "outcome", "reason")

    def __init__(self, path: Path, dst: Path) -> None:
        self.path = path
        self.dst = dst
        self.json = path.suffix.lower() in (".json", ".jsonl", ".ndjson")
        self._file: IO[str] | None = None

    def __enter__(self) -> _ReportWriter:
        self._file = open(self.path, "w", encoding="utf-8", newline="")
        if not self.json:
            self._csv = csv.writer(self._file)
            self._csv.writerow(self.FIELDS)
        return self

    def write(self, o: Outcome) -> None:
        destination = os.fspath(self.dst / o.destination) if o.destination else ""
        row = (o.source, destination, o.result.value, o.reason)
        assert self._file is not None
        if self.json:
            self._file.write(json.dumps(dict(zip(self.FIELDS, row)), ensure_ascii=False) + "\n")
        else:
            self._csv.writerow(row)

    def __exit__(self, *exc: object) -> None:
        assert self._file is not None
        self._file.close()

"""The embedded instance index: one row per SOPInstanceUID in the whole tree.

``<root>/.sortscp/index.sqlite`` (SQLite, WAL) is the cross-process place where
a worker *claims* a SOPInstanceUID before it puts a file into the layout, so
that the tree keeps **one file per SOPInstanceUID** even when an instance is
resent under another path (a corrected PatientName), by several worker
processes at once. It also keeps per-series and per-study state (arrivals,
completed revision) for series-complete events and for ``ls``.

The files stay the truth. The index can always be rebuilt from the tree
(:func:`rebuild`), and is, when it is missing or behind (:func:`check`).
This module imports only the standard library, :mod:`scp.errors` and :mod:`scp._process`; it reads
files (sizes, digests) but never creates, renames or removes a layout file:
that is the caller's job (see :mod:`scp.store._prune` for removal).

Schema (version :data:`SCHEMA_VERSION`)
---------------------------------------

``meta(key PRIMARY KEY, value)``
    ``schema_version``; ``generation`` (1 for a fresh index, +1 at every
    rebuild); ``built_at``; ``clean`` (``1`` once the last user closed it
    with ``close(clean=True)``, ``0`` from :meth:`SqliteIndex.mark_running`);
    ``boot_id`` (the kernel boot id when it was last marked running).

``instances`` (WITHOUT ROWID), one row per SOPInstanceUID
    ``sop_instance_uid PRIMARY KEY``, ``path`` (the committed file, relative
    POSIX; NULL while the first claim of a new UID is pending), ``state``
    (``'ok'`` or ``'pending'``), ``size``, ``digest`` (sha256 hex, NULL =
    unknown), ``sop_class_uid``, ``transfer_syntax_uid``,
    ``study_instance_uid``, ``series_instance_uid``, ``patient_name``,
    ``patient_id``, ``study_date``, ``series_description``, ``series_number``,
    ``modality``, ``calling_aet``, ``received`` (unix time); and the intent
    while ``state = 'pending'``: ``pending_path`` (the new path),
    ``owner`` (``pid.starttime.seq`` of the claimer), ``pid``, ``since``,
    ``intent`` (JSON of the new facts). Indexes on ``series_instance_uid`` and ``study_instance_uid``.

``series`` / ``studies``
    ``series_instance_uid`` / ``study_instance_uid PRIMARY KEY``; series:
    ``study_instance_uid``, ``folder`` (relative folder of its latest
    instance), ``series_description``, ``series_number``, ``modality``;
    studies: ``patient_name``, ``patient_id``, ``study_date``; both:
    ``first_arrival``, ``last_arrival``, ``instances`` (committed rows),
    ``arrivals`` (commits into it, ever), ``revision`` (starts at 1, +1 at the
    first change after each completion), ``completed_revision`` (0 = never),
    ``completed_at``. A partial index on ``last_arrival WHERE
    completed_revision < revision`` makes :meth:`stable_series` cost what the
    open series cost. A series/study row is deleted when its count drops to 0.

``obsolete(path PRIMARY KEY, sop_instance_uid, owner, since)`` (WITHOUT ROWID)
    Files that a commit superseded and that are not yet confirmed removed. A
    path is never both here and an ``instances.path``.

Crash-consistency protocol
--------------------------

For one instance the committing process does:

1. ``claim = index.begin(uid, new_relpath, facts)``. New UID (the common
   case): one autocommit ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` writes
   the row as ``'pending'`` (path NULL, intent = new path, owner). Known UID:
   one ``BEGIN IMMEDIATE`` transaction reads the row and turns it into
   ``'pending'`` with the intent; ``claim.old`` is the committed row, so the
   caller decides (identical digest / ``keep`` -> :meth:`abort`; ``replace``
   -> go on). A UID pending by another *live* process (or whose obsolete file
   it is about to remove is the new path) is waited for, polling with backoff,
   up to ``timeout`` seconds, then :class:`ClaimTimeoutError` (-> 0xA700). A
   UID pending by a *dead* process is resolved on the spot exactly as
   :meth:`recover` would, then claimed.
2. The caller links the new file into place (atomic rename/link) and fsyncs it
   and its folder.
3. ``old = index.commit(claim)``: one ``BEGIN IMMEDIATE`` transaction, guarded
   by the owner token, sets the row to the new path, ``'ok'``, updates the
   series/study counters, and, if the path changed, records the old path in
   ``obsolete``. The caller unlinks ``old``, prunes empty folders, then calls
   ``index.obsolete_removed(old)``.
4. ``index.abort(claim)`` on any failure (or keep/identical): the row goes back
   to what ``claim.old`` was (deleted for a new UID).

``index.recover(root)`` at start-up: every ``'pending'`` row whose owner is dead
(``/proc/<pid>/stat`` gone, a zombie, or its start time differs: a reused pid)
is settled from the files: if ``pending_path`` holds the intended file (size,
and sha256 when the digest is known) the commit is finished (old path ->
``obsolete``); otherwise the intent is dropped (row back to the old path if
that file exists, else the row is deleted; a stray other version of the UID at
the new path becomes obsolete). It returns every obsolete path whose owner is
dead and whose file still exists (and forgets those already gone): the caller
removes them and confirms each. A SIGKILL at any point leaves either no trace
(before 1), an intent (1-3: settled by the file at the new path, which is
complete or absent because linking is atomic), or an obsolete entry (3-4),
so after ``recover`` + removals the tree and the index agree exactly.

Why ``synchronous=NORMAL`` is enough
------------------------------------

In WAL mode with NORMAL, a commit is atomic and survives a *process* crash
(the WAL is in the OS page cache), but an *OS* crash or power loss may drop
the last transactions (never corrupt the file). The files are made durable by
their own fsync before the sender is told Success, so nothing acknowledged is
lost; only the index may lag. That case is detected: :meth:`mark_running`
writes ``clean=0`` and the boot id with a synced (FULL) transaction, and the
last ``close(clean=True)`` writes ``clean=1`` synced. :func:`check` reports the
index *behind* when ``clean=0`` and the boot id differs (the machine went down
while it was in use), so it is rebuilt from the files. A process crash (same
boot) needs only :meth:`recover`. A FULL fsync per instance would cost a
disk flush per commit for no gain.

What :func:`check` reports as needing a rebuild: the file missing, unreadable
(not SQLite, no ``meta``), another schema version, not closed cleanly across
a reboot, or marked behind by a ``sort`` into the folder that has not rebuilt it
(:func:`mark_behind`). What it does *not* detect: files added, removed or moved under the
root by other tools (``cp``, ``rm``, a ``sort`` run without the index) --
run ``sortscp reindex OUT``; and (by design, cheaply) it never walks the tree.

Connections and threads
-----------------------

One :class:`SqliteIndex` per process: open it in the worker, never pass it
across ``fork`` (every method raises :class:`InstanceIndexError` if called in
another pid than the one that opened it). Within a process one object may be
shared by threads: the connection is opened with ``check_same_thread=False``
and every method holds the object's lock. Every opener holds a shared
``flock`` on ``.sortscp/index.lock``; :func:`rebuild` needs it exclusive, so it
never replaces the file under an open connection (which WAL would not
survive).

Cost
----

Measured 2026-12-01 on the shared 2-core VM (ext4, SQLite 3.40.1, Python
3.11.7, load average ~4 from other work) with ``benchmarks/bench_index.py``
(5,000 instances, no files, median of 3 runs), begin + commit per instance:

* new UID, 1 process: 0.11 ms;
* new UID, 4 processes at once: 0.11 ms of wall time per instance overall
  (about 9,000 instances/s together), 0.36 ms per instance in each process
  (they share the write lock and 2 cores);
* known UID moved to a new path (replace), 1 process: 0.14 ms.

That is one autocommit INSERT and one ``BEGIN IMMEDIATE`` transaction of
three statements, no fsync (WAL + NORMAL), against a file fsync + folder fsync
per instance the store already pays (milliseconds).

The server's duties
-------------------

At start-up, :func:`open_index` (check, rebuild if needed, recover,
mark_running); remove the returned obsolete paths and confirm each. After a
worker process died (the pool is rebuilt), call :meth:`SqliteIndex.recover`
again: a claimer that met the dead worker's intent settled it on the spot, and
the obsolete file that may leave is only removed by a recover. At shutdown,
after the workers exited, ``close(clean=True)``.

An index removed or damaged while a server runs (by hand) cannot be rebuilt
under the exclusive lock, which the server's own processes hold shared for
good. No connection reaches such a file, so :func:`repair_in_use` (its own
lock) puts a new one at its name. The server's main process does it
(:meth:`SqliteIndex.repair`, from a watch thread once a second: completion
state carried over from its old connection, none recorded there meanwhile);
a worker that finds the index gone before an instance
(:meth:`SqliteIndex.moved_away`) waits for that, and rebuilds itself only if
it does not come.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import re
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

from scp._process import UNKNOWN_START, start_time
from scp.errors import InstanceIndexError

#: Folder (inside the output root) that holds sortscp's state: the instance
#: index, sort's lock.
STATE_DIRNAME = ".sortscp"
INDEX_FILENAME = "index.sqlite"
LOCK_FILENAME = "index.lock"
SCHEMA_VERSION = 1

#: Seconds a claimer waits for a UID another live process holds.
DEFAULT_CLAIM_TIMEOUT = 30.0
#: SQLite busy timeout (seconds) for the write lock.
BUSY_TIMEOUT = 30.0

#: The facts of an instance (keys of the ``facts`` mapping given to begin).
FACT_FIELDS = (
    "size",
    "digest",
    "sop_class_uid",
    "transfer_syntax_uid",
    "study_instance_uid",
    "series_instance_uid",
    "patient_name",
    "patient_id",
    "study_date",
    "series_description",
    "series_number",
    "modality",
    "calling_aet",
)
_FACTS = frozenset(FACT_FIELDS)
_ROW_FIELDS = ("sop_instance_uid", "path", "state") + FACT_FIELDS + ("received", "pending_path", "owner")


class ClaimTimeoutError(InstanceIndexError):
    """Another live process held the UID longer than the claim timeout."""


class ClaimLostError(InstanceIndexError):
    """The claim was settled by someone else (it was taken for dead)."""


class IndexStaleError(InstanceIndexError):
    """The index file is missing, unreadable or of another schema: rebuild it."""


class IndexInUseError(InstanceIndexError):
    """A rebuild holds the index, or a rebuild was asked while it is open."""


# --------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class InstanceRow:
    """One row of ``instances``."""

    sop_instance_uid: str
    path: str | None
    state: str
    size: int | None = None
    digest: str | None = None
    sop_class_uid: str | None = None
    transfer_syntax_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    study_date: str | None = None
    series_description: str | None = None
    series_number: Any = None
    modality: str | None = None
    calling_aet: str | None = None
    received: float | None = None
    pending_path: str | None = None
    owner: str | None = None

    def facts(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in FACT_FIELDS}


@dataclasses.dataclass(frozen=True)
class Claim:
    """What :meth:`InstanceIndex.begin` hands back: give it to commit or abort."""

    sop_instance_uid: str
    path: str
    facts: Mapping[str, Any]
    old: InstanceRow | None  #: the committed row before this claim (None: new UID)
    owner: str


@dataclasses.dataclass(frozen=True)
class SeriesState:
    series_instance_uid: str
    study_instance_uid: str | None
    folder: str | None
    series_description: str | None
    series_number: Any
    modality: str | None
    first_arrival: float | None
    last_arrival: float | None
    instances: int
    arrivals: int
    revision: int
    completed_revision: int
    completed_at: float | None
    patient_name: str | None = None
    patient_id: str | None = None
    study_date: str | None = None

    @property
    def complete(self) -> bool:
        return self.completed_revision >= self.revision


@dataclasses.dataclass(frozen=True)
class StudyState:
    study_instance_uid: str
    patient_name: str | None
    patient_id: str | None
    study_date: str | None
    first_arrival: float | None
    last_arrival: float | None
    instances: int
    arrivals: int
    revision: int
    completed_revision: int
    completed_at: float | None
    series: int = 0

    @property
    def complete(self) -> bool:
        return self.completed_revision >= self.revision


@dataclasses.dataclass
class RebuildSummary:
    files_seen: int = 0
    instances: int = 0
    #: (sop_instance_uid, kept relpath, other relpath): other files of a UID, not indexed
    duplicates: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    #: (relpath, reason): .dcm files read_identity could not read
    unreadable: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    generation: int = 1
    carried_completion: bool = False  #: completion state taken over from the old index


# --------------------------------------------------------------------------- interface


@runtime_checkable
class InstanceIndex(Protocol):
    """What the server needs from an instance index (SQLite now, PostgreSQL later)."""

    def begin(self, uid: str, relpath: str, facts: Mapping[str, Any], *, timeout: float = ...) -> Claim: ...
    def commit(self, claim: Claim, *, now: float | None = None) -> str | None: ...
    def abort(self, claim: Claim) -> None: ...
    def obsolete_removed(self, relpath: str) -> None: ...
    def recover(self, *, wait: float | None = None) -> list[str]: ...
    def record_placed(self, uid: str, relpath: str, facts: Mapping[str, Any], *, now: float | None = None) -> str | None: ...
    def lookup(self, uid: str) -> InstanceRow | None: ...
    def series_state(self, series_uid: str) -> SeriesState | None: ...
    def study_state(self, study_uid: str) -> StudyState | None: ...
    def stable_series(self, older_than: float, *, now: float | None = None) -> list[SeriesState]: ...
    def stable_studies(self, older_than: float, *, now: float | None = None) -> list[StudyState]: ...
    def mark_series_complete(self, series_uid: str, revision: int, *, arrivals: int | None = None) -> bool: ...
    def mark_study_complete(self, study_uid: str, revision: int, *, arrivals: int | None = None) -> bool: ...
    def instances_of_series(self, series_uid: str, study_uid: str | None = None) -> list[InstanceRow]: ...
    def series_list(self, study_uid: str | None = None) -> list[SeriesState]: ...
    def studies_of_series(self) -> dict[str, dict[str | None, int]]: ...
    def forget_empty_series(self, series_uid: str, revision: int) -> bool: ...
    def forget_empty_study(self, study_uid: str, revision: int) -> bool: ...
    def studies(self) -> list[StudyState]: ...
    def mark_running(self) -> None: ...
    def close(self, *, clean: bool = False) -> None: ...


# --------------------------------------------------------------------------- helpers


def state_dir(root: Path | str) -> Path:
    return Path(root) / STATE_DIRNAME


def index_path(root: Path | str) -> Path:
    return state_dir(root) / INDEX_FILENAME


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def owner_alive(owner: str | None) -> bool:
    """True if the process named by an owner token (``pid.start.seq``) runs."""
    if not owner:
        return False
    try:
        pid_s, start_s, _ = owner.split(".", 2)
        pid, start = int(pid_s), int(start_s)
    except ValueError:
        return False
    now_start = start_time(pid)
    if now_start is None:
        return False
    return UNKNOWN_START in (now_start, start) or now_start == start


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_rel(relpath: str) -> str:
    rel = PurePosixPath(relpath)
    if not relpath or rel.is_absolute() or ".." in rel.parts or str(rel) != relpath:
        raise ValueError(f"not a normalized relative POSIX path: {relpath!r}")
    return relpath


def _folder(relpath: str) -> str:
    parent = str(PurePosixPath(relpath).parent)
    return "" if parent == "." else parent


def _leave(cur: sqlite3.Cursor, table: str, key: str, value: str, now: float) -> None:
    """An instance (its row already gone or moved on) leaves series or study
    `value`: one change more, one instance less, the row showing the latest
    of those left (:data:`_LATEST_LEFT`)."""
    cur.execute(_LEAVE.format(table=table, key=key), {"now": now, "uid": value})
    latest = cur.execute(_LATEST_LEFT[table], {"uid": value}).fetchone()
    if latest is None:
        return  # none left: the row keeps what it showed (ls lists a series of 0)
    if table == "series":
        latest = (_folder(latest[0]), *latest[1:])
    cur.execute(_SHOW_LATEST[table], (*latest, value))


def _check_facts(facts: Mapping[str, Any]) -> None:
    unknown = set(facts) - _FACTS
    if unknown:
        raise ValueError(f"unknown instance facts: {sorted(unknown)}")


#: The instances of a study, whatever series row names it: a series UID a
#: sender gave instances of two studies (its row names the last one's). In the
#: schema, and made at open in an index made before it.
_STUDY_INDEX = "instances_study ON instances(study_instance_uid)"

_SCHEMA = f"""
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
CREATE TABLE instances(
    sop_instance_uid TEXT PRIMARY KEY,
    path TEXT,
    state TEXT NOT NULL,
    size INTEGER, digest TEXT,
    sop_class_uid TEXT, transfer_syntax_uid TEXT,
    study_instance_uid TEXT, series_instance_uid TEXT,
    patient_name TEXT, patient_id TEXT, study_date TEXT,
    series_description TEXT, series_number, modality TEXT,
    calling_aet TEXT, received REAL,
    pending_path TEXT, owner TEXT, pid INTEGER, since REAL, intent TEXT
) WITHOUT ROWID;
CREATE INDEX instances_series ON instances(series_instance_uid);
CREATE INDEX {_STUDY_INDEX};
CREATE INDEX instances_pending ON instances(state) WHERE state <> 'ok';
CREATE TABLE series(
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT, folder TEXT,
    series_description TEXT, series_number, modality TEXT,
    first_arrival REAL, last_arrival REAL,
    instances INTEGER NOT NULL DEFAULT 0, arrivals INTEGER NOT NULL DEFAULT 0,
    revision INTEGER NOT NULL DEFAULT 1, completed_revision INTEGER NOT NULL DEFAULT 0,
    completed_at REAL
);
CREATE INDEX series_study ON series(study_instance_uid);
CREATE INDEX series_open ON series(last_arrival) WHERE completed_revision < revision;
CREATE TABLE studies(
    study_instance_uid TEXT PRIMARY KEY,
    patient_name TEXT, patient_id TEXT, study_date TEXT,
    first_arrival REAL, last_arrival REAL,
    instances INTEGER NOT NULL DEFAULT 0, arrivals INTEGER NOT NULL DEFAULT 0,
    revision INTEGER NOT NULL DEFAULT 1, completed_revision INTEGER NOT NULL DEFAULT 0,
    completed_at REAL
);
CREATE INDEX studies_open ON studies(last_arrival) WHERE completed_revision < revision;
CREATE TABLE obsolete(
    path TEXT PRIMARY KEY, sop_instance_uid TEXT, owner TEXT, since REAL
) WITHOUT ROWID;
"""

_BUMP = "CASE WHEN completed_revision >= revision THEN revision + 1 ELSE revision END"

#: An arrival's time is the latest one's, but for a latest one more than a
#: minute ahead of it: that one was wrong (a file dated in the future, from a
#: sender's clock, taken as its arrival by a rebuild; the clock set back), and
#: kept as the maximum it held the series from completing for as long.
def _latest(arrival: str) -> str:
    """The SQL of the new ``last_arrival`` once `arrival` (an expression) arrived."""
    return (f"CASE WHEN last_arrival > {arrival} + 60 THEN {arrival}"
            f" ELSE max(coalesce(last_arrival, 0), {arrival}) END")


_LATEST = _latest("excluded.last_arrival")

_SERIES_UPSERT = f"""
INSERT INTO series(series_instance_uid, study_instance_uid, folder, series_description,
                   series_number, modality, first_arrival, last_arrival, instances, arrivals)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)
ON CONFLICT(series_instance_uid) DO UPDATE SET
    study_instance_uid = excluded.study_instance_uid, folder = excluded.folder,
    series_description = excluded.series_description, series_number = excluded.series_number,
    modality = excluded.modality,
    first_arrival = min(first_arrival, excluded.first_arrival),
    last_arrival = {_LATEST},
    instances = instances + excluded.instances, arrivals = arrivals + 1,
    revision = {_BUMP}
"""

#: An instance leaves a series (study): a change like an arrival, so it
#: restarts the stable time too (a series whose instances are being resent
#: into another one, one by one, completes once they are done, not after each).
_LEAVE = (
    "UPDATE {table} SET instances = instances - 1, arrivals = arrivals + 1,"
    " last_arrival = " + _latest(":now") + ","
    " revision = " + _BUMP + " WHERE {key} = :uid"
)

#: ... and what the series (study) row shows is then taken from the instance
#: of it that arrived last among those left, not kept from the one that left:
#: its folder may have been pruned since (an instance resent into another
#: series), its description was the old header's.
_LATEST_LEFT = {
    "series": ("SELECT path, series_description, series_number, modality FROM instances"
               " WHERE series_instance_uid = :uid AND state = 'ok' AND path IS NOT NULL"
               " ORDER BY received DESC LIMIT 1"),
    # (through its series: instances has no index by study)
    "studies": ("SELECT patient_name, patient_id, study_date FROM instances"
                " WHERE series_instance_uid IN"
                " (SELECT series_instance_uid FROM series WHERE study_instance_uid = :uid)"
                " AND study_instance_uid = :uid AND state = 'ok' AND path IS NOT NULL"
                " ORDER BY received DESC LIMIT 1"),
}
_SHOW_LATEST = {
    "series": "UPDATE series SET folder = ?, series_description = ?, series_number = ?, modality = ?"
              " WHERE series_instance_uid = ?",
    "studies": "UPDATE studies SET patient_name = ?, patient_id = ?, study_date = ?"
               " WHERE study_instance_uid = ?",
}

_STUDY_UPSERT = f"""
INSERT INTO studies(study_instance_uid, patient_name, patient_id, study_date,
                    first_arrival, last_arrival, instances, arrivals)
VALUES (?, ?, ?, ?, ?, ?, ?, 1)
ON CONFLICT(study_instance_uid) DO UPDATE SET
    patient_name = excluded.patient_name, patient_id = excluded.patient_id,
    study_date = excluded.study_date,
    first_arrival = min(first_arrival, excluded.first_arrival),
    last_arrival = {_LATEST},
    instances = instances + excluded.instances, arrivals = arrivals + 1,
    revision = {_BUMP}
"""

_INSERT_NEW = (
    "INSERT INTO instances(sop_instance_uid, path, state, "
    + ", ".join(FACT_FIELDS)
    + ", pending_path, owner, pid, since, intent) VALUES (?, NULL, 'pending', "
    + ", ".join("?" * len(FACT_FIELDS))
    + ", ?, ?, ?, ?, ?) ON CONFLICT(sop_instance_uid) DO NOTHING RETURNING 1"
)

_SET_OK = (
    "UPDATE instances SET path = ?, state = 'ok', "
    + ", ".join(f"{k} = ?" for k in FACT_FIELDS)
    + ", received = ?, pending_path = NULL, owner = NULL, pid = NULL, since = NULL, intent = NULL"
    " WHERE sop_instance_uid = ?"
)

_SELECT_ROW = "SELECT " + ", ".join(_ROW_FIELDS) + ", intent FROM instances WHERE sop_instance_uid = ?"

_SERIES_COLS = (
    "series_instance_uid, study_instance_uid, folder, series_description, series_number, modality, "
    "first_arrival, last_arrival, instances, arrivals, revision, completed_revision, completed_at"
)
_STUDY_COLS = (
    "study_instance_uid, patient_name, patient_id, study_date, first_arrival, last_arrival, "
    "instances, arrivals, revision, completed_revision, completed_at"
)


def _row(values) -> tuple[InstanceRow, dict | None]:
    *fields, intent = values
    return InstanceRow(*fields), (json.loads(intent) if intent else None)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    _use_wal(conn)
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _open_lock(path: Path, read_only: bool) -> int | None:
    """The lock file's descriptor (created if missing); read-only: only if it
    is there (a copied index may have none, and nothing can rebuild it then)."""
    if not read_only:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that writes nothing beside the index.

    With a ``-wal`` file there (a server has the index open, or died), the
    reader needs it and its ``-shm``: ``mode=ro`` reads through them. Without
    one (the index was closed; everything is in the file), ``immutable`` reads
    the file alone, because ``mode=ro`` would create a ``-wal`` and ``-shm``
    and leave them behind, owned by whoever ran ``ls``, where they could
    stop the server's own user from opening the index, and fails outright
    in a folder it cannot write."""
    wal = path.with_name(path.name + "-wal")
    mode = "mode=ro" if wal.exists() else "immutable=1"
    return sqlite3.connect(_uri(path, mode), uri=True, timeout=BUSY_TIMEOUT,
                           isolation_level=None, check_same_thread=False)


def _uri(path: Path, query: str) -> str:
    """SQLite's URI of `path` ('#', '?' and '%' in a folder name quoted)."""
    return f"file:{urllib.parse.quote(str(path))}?{query}"


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL unless the file already is (WAL is persistent).

    Switching needs an exclusive lock, and SQLite may answer "database is
    locked" at once, without its busy handler, when several processes open a
    new index together; so retry for up to BUSY_TIMEOUT."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    delay = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            transient = "locked" in str(exc) or "busy" in str(exc)
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def _read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


# --------------------------------------------------------------------------- check / rebuild


def check(root: Path | str) -> str | None:
    """Why the index of `root` must be rebuilt, or None if it can be used
    (after :meth:`SqliteIndex.recover`). See the module docstring."""
    path = index_path(root)
    if not path.is_file():
        return "missing"
    try:
        conn = sqlite3.connect(_uri(path, "mode=ro"), uri=True, timeout=BUSY_TIMEOUT)
        try:
            meta = _read_meta(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"unreadable ({exc})"
    if meta.get("schema_version") != str(SCHEMA_VERSION):
        return f"schema version {meta.get('schema_version')}, expected {SCHEMA_VERSION}"
    if meta.get("clean") != "1" and meta.get("boot_id") != boot_id():
        return "not closed cleanly before a reboot (its last transactions may be lost)"
    if meta.get(BEHIND_KEY):
        return meta[BEHIND_KEY]
    return None


#: The ``meta`` key of :func:`mark_behind`.
BEHIND_KEY = "behind"


def mark_behind(root: Path | str, why: str) -> None:
    """Record in the index of `root`, which the caller holds (:func:`lock_index`),
    that files are about to change under it: :func:`check` answers `why` (so
    a server rebuilds it at its start) until a rebuild has put a new index in
    place. ``sort`` into a serve output folder marks it before it places a
    file: a run that is interrupted (or killed) never rebuilds it."""
    try:
        conn = sqlite3.connect(index_path(root), timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (BEHIND_KEY, why))
        finally:
            conn.close()
    except sqlite3.Error:  # unreadable: check() asks for a rebuild already
        pass


def _walk(root: Path, suffix: str | None) -> Iterator[tuple[str, os.stat_result]]:
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(root / rel if rel else root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue  # .sortscp, .sortscp-tmp ...: never layout (layout names never start with '.')
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(child)
                    continue
                if suffix is not None and not entry.name.lower().endswith(suffix):
                    continue
                st = entry.stat()  # follows a symlink (sort --mode symlink)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield child, st
        stack.extend(reversed(subdirs))


def _write_rebuilt(
    tmp: Path, final: Path, best: Mapping[str, tuple[float, str, Mapping[str, Any], int]], root: Path,
    digests: bool, summary: RebuildSummary,
) -> None:
    """Write the index :func:`rebuild` found (`best`: each UID's file) to
    `tmp`, flushed, its completion state carried over from `final`."""
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.executescript(_SCHEMA)
        conn.execute("BEGIN")
        rows = []
        now = time.time()
        for uid, (mtime, rel, ident, size) in best.items():
            facts = {k: ident.get(k) for k in FACT_FIELDS}
            facts["size"] = size
            if digests:
                try:
                    facts["digest"] = sha256_file(root / rel)
                except OSError:
                    facts["digest"] = None
            # (a file dated in the future did not arrive then: its series would wait for that date)
            rows.append((uid, rel, *(facts[k] for k in FACT_FIELDS), min(mtime, now)))
        conn.executemany(
            "INSERT INTO instances(sop_instance_uid, path, state, " + ", ".join(FACT_FIELDS) + ", received) "
            "VALUES (?, ?, 'ok', " + ", ".join("?" * len(FACT_FIELDS)) + ", ?)",
            rows,
        )
        summary.instances = len(rows)
        # the descriptive columns come from the latest instance of each series/study
        latest = (
            "SELECT *, rtrim(rtrim(path, replace(path, '/', '')), '/') AS folder,"
            " min(received) OVER w AS first, max(received) OVER w AS last, count(*) OVER w AS n,"
            " row_number() OVER (PARTITION BY {k} ORDER BY received DESC, path DESC) AS rn"
            " FROM instances WHERE {k} IS NOT NULL WINDOW w AS (PARTITION BY {k})"
        )
        conn.execute(
            "INSERT INTO series(series_instance_uid, study_instance_uid, folder, series_description,"
            " series_number, modality, first_arrival, last_arrival, instances, arrivals)"
            " SELECT series_instance_uid, study_instance_uid, folder, series_description, series_number,"
            " modality, first, last, n, n FROM (" + latest.format(k="series_instance_uid") + ") WHERE rn = 1"
        )
        conn.execute(
            "INSERT INTO studies(study_instance_uid, patient_name, patient_id, study_date,"
            " first_arrival, last_arrival, instances, arrivals)"
            " SELECT study_instance_uid, patient_name, patient_id, study_date, first, last, n, n"
            " FROM (" + latest.format(k="study_instance_uid") + ") WHERE rn = 1"
        )
        conn.execute("COMMIT")  # ATTACH cannot run inside a transaction
        generation = 1
        old_meta = _old_meta(final)
        if old_meta is not None:
            try:
                generation = int(old_meta.get("generation", "0")) + 1
            except ValueError:
                pass
            summary.carried_completion = _carry_completion(conn, final)
        _carry_manifests(conn, state_dir(root))
        summary.generation = generation
        meta = {
            "schema_version": str(SCHEMA_VERSION),
            "generation": str(generation),
            "built_at": repr(time.time()),
            "clean": "1",
            "boot_id": boot_id(),
        }
        conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
    finally:
        conn.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rebuild(
    root: Path | str,
    read_identity: Callable[[Path], Mapping[str, Any] | None],
    *,
    digests: bool = False,
    suffix: str | None = ".dcm",
    locked: int | None = None,
    carry_from: Path | None = None,
) -> RebuildSummary:
    """Build the index of `root` afresh from the files and put it in place.

    Walks the layout (skipping dot folders such as ``.sortscp*``); for each
    file ending in `suffix` (None: every file) calls ``read_identity(path)``,
    which returns a mapping with ``sop_instance_uid`` and any of
    :data:`FACT_FIELDS` (or None / raises: the file is reported unreadable).
    ``received`` is the file's mtime (now, for one dated in the future); with `digests` the sha256 of each file
    is computed (else it is taken from read_identity, or left unknown). When
    several files claim one UID the newest (mtime, then path) is indexed and
    the others are reported in ``duplicates``. Series/study completion state
    is carried over from the old index when it is readable (a series whose
    count changed gets a new revision). Needs the index closed everywhere
    (:class:`IndexInUseError` otherwise), or `locked`: the caller holds it
    with :func:`lock_index` (and keeps holding it). `carry_from`: the old
    index to carry the completion state from, if not the file at its name
    (a copy :meth:`SqliteIndex.snapshot` made of one removed by hand).
    """
    root = Path(root)
    sdir = state_dir(root)
    final = sdir / INDEX_FILENAME
    lock_fd = lock_index(root) if locked is None else locked
    try:
        # (and the copy a repair carries the completion state from, of one killed
        # meanwhile: the manifests hold that state too, see _carry_manifests)
        keep = carry_from.name if carry_from is not None else None
        for leftover in [*sdir.glob(INDEX_FILENAME + ".rebuild-*"), *sdir.glob(INDEX_FILENAME + ".carry-*")]:
            if keep is None or not leftover.name.startswith(keep):
                leftover.unlink(missing_ok=True)
        tmp = sdir / f"{INDEX_FILENAME}.rebuild-{os.getpid()}"
        summary = RebuildSummary()
        best: dict[str, tuple[float, str, Mapping[str, Any], int]] = {}
        dup_paths: dict[str, list[str]] = {}
        for rel, st in _walk(root, suffix):
            summary.files_seen += 1
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:  # a name another tool gave (a Latin-1 CD): the index holds text
                summary.unreadable.append((rel, "its path is not valid UTF-8; rename it to index it"))
                continue
            try:
                ident = read_identity(root / rel)
            except Exception as exc:  # the reader's problem is the file's: report it
                summary.unreadable.append((rel, f"{type(exc).__name__}: {exc}"))
                continue
            if not ident or not ident.get("sop_instance_uid"):
                summary.unreadable.append((rel, "no SOPInstanceUID"))
                continue
            uid = str(ident["sop_instance_uid"])
            cand = (st.st_mtime, rel, ident, st.st_size)
            prev = best.get(uid)
            if prev is None:
                best[uid] = cand
                continue
            dup_paths.setdefault(uid, [prev[1]]).append(rel)
            if (cand[0], cand[1]) > (prev[0], prev[1]):
                best[uid] = cand
        summary.duplicates = sorted(
            (uid, best[uid][1], other) for uid, paths in dup_paths.items() for other in paths if other != best[uid][1]
        )

        try:
            _write_rebuilt(tmp, carry_from or final, best, root, digests, summary)
        except BaseException:  # a stop signal too: leave nothing of ours
            tmp.unlink(missing_ok=True)
            raise
        # The old file goes first, then its WAL and shared memory (a stale WAL
        # next to the new file would be replayed into it), then the new one
        # takes the name. A crash in between leaves no index: rebuilt again.
        try:
            for name in (INDEX_FILENAME, INDEX_FILENAME + "-wal", INDEX_FILENAME + "-shm"):
                (sdir / name).unlink(missing_ok=True)
            os.rename(tmp, final)
        except OSError as exc:  # e.g. a folder at the index's name: leave nothing of ours
            tmp.unlink(missing_ok=True)
            raise InstanceIndexError(
                f"cannot put the rebuilt index in place at {exc.filename or final}: "
                f"{exc.strerror or exc}"
            ) from None
        dfd = os.open(sdir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return summary
    finally:
        if locked is None:
            os.close(lock_fd)


def _in_use(root: Path | str) -> str:
    return (f"the index of {root} is held by another process (a server on that folder, a sort into it"
            " or a reindex of it): stop it first, or try again once it is done")


def lock_index(root: Path | str) -> int:
    """Take the index of `root` for this process alone (the lock that every
    process holding the index open shares): the file descriptor of the lock,
    to close to let go. Raises :class:`IndexInUseError` if another process
    (a server, a rebuild) holds it."""
    sdir = state_dir(Path(root))
    sdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(sdir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise IndexInUseError(_in_use(root)) from None
    return fd


def _old_meta(final: Path) -> dict[str, str] | None:
    if not final.is_file():
        return None
    try:
        conn = sqlite3.connect(final, timeout=BUSY_TIMEOUT)
        try:
            return _read_meta(conn)
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def _carry_completion(conn: sqlite3.Connection, final: Path) -> bool:
    try:
        conn.execute("ATTACH DATABASE ? AS old", (str(final),))
    except sqlite3.Error:
        return False
    try:
        for table, key in (("series", "series_instance_uid"), ("studies", "study_instance_uid")):
            # Changed: one of its instances is new, gone, moved in or out, or has
            # another path or size than the old index had (a count alone misses
            # one file removed and another added: its manifest then named both wrong).
            conn.execute(
                f"WITH changed(uid) AS ("
                f" SELECT n.{key} FROM main.instances AS n"
                f"  LEFT JOIN old.instances AS o ON o.sop_instance_uid = n.sop_instance_uid"
                f"  WHERE o.sop_instance_uid IS NULL OR o.state <> 'ok' OR o.path IS NOT n.path"
                f"   OR o.size IS NOT n.size OR o.{key} IS NOT n.{key}"
                f" UNION SELECT o.{key} FROM old.instances AS o"
                f"  LEFT JOIN main.instances AS n ON n.sop_instance_uid = o.sop_instance_uid"
                f"  WHERE o.state = 'ok' AND (n.sop_instance_uid IS NULL OR n.{key} IS NOT o.{key}))"
                f" UPDATE main.{table} AS n SET"
                f" revision = CASE WHEN o.instances = n.instances"
                f"   AND n.{key} NOT IN (SELECT uid FROM changed WHERE uid IS NOT NULL) THEN o.revision"
                f"  WHEN o.completed_revision >= o.revision THEN o.revision + 1 ELSE o.revision END,"
                f" completed_revision = o.completed_revision, completed_at = o.completed_at"
                f" FROM old.{table} AS o WHERE o.{key} = n.{key}"
            )
            # One that completed and has no file left keeps a row at 0 instances (at
            # a new revision): the completion watcher then removes its manifest,
            # which names files that are gone, and says so (series_emptied).
            cols = [row[1] for row in conn.execute(f"PRAGMA main.table_info({table})")]
            picked = ", ".join(
                "0" if c == "instances" else
                "CASE WHEN o.instances > 0 AND o.completed_revision >= o.revision THEN o.revision + 1"
                " ELSE o.revision END" if c == "revision" else f"o.{c}"
                for c in cols
            )
            conn.execute(
                f"INSERT INTO main.{table}({', '.join(cols)}) SELECT {picked} FROM old.{table} AS o"
                f" WHERE o.completed_revision > 0 AND NOT EXISTS"
                f" (SELECT 1 FROM main.{table} AS n WHERE n.{key} = o.{key})"
            )
        return True
    except sqlite3.Error:
        return False
    finally:
        conn.execute("DETACH DATABASE old")


#: The key of a claim's intent that holds the inode of the file at its name when it was made.
_HELD = "~held_inode"

#: Where the completion watcher writes manifests, in the state folder (the
#: names of :mod:`scp.events.manifest`, which imports this module).
MANIFEST_FOLDERS = {"series": "series", "studies": "studies"}
_PLAIN_UID = re.compile(r"[0-9][0-9.]{0,63}")
#: The highest revision taken from a manifest (a hand-edited one may say anything).
_MAX_REVISION = 1 << 31


def manifest_name(uid: str) -> str:
    """The file name of the manifest of the series or study `uid`: a UID of
    the standard's form as it is; anything else (a sender's odd UID: other
    characters, over 64) made safe, cut short, and given a digest of the
    whole, so two such UIDs never share a manifest and none makes a name too
    long for the file system.

    >>> manifest_name("1.2.3")
    '1.2.3.json'
    >>> manifest_name("X/5") != manifest_name("X_5"), len(manifest_name("1." * 200)) < 100
    (True, True)
    """
    if _PLAIN_UID.fullmatch(uid):
        return f"{uid}.json"
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in uid)[:64]
    return f"{safe}~{hashlib.sha256(uid.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}.json"


def _listed(path: Path, key: str, uid: str, members: str, fields: tuple[str, ...]) -> tuple[int, set] | None:
    """The revision of the manifest at `path` and what it lists of each member
    (`fields` of each entry of its `members`), if it is the manifest of `uid`
    and reads as one: anything else (damaged, hand-edited, of other types)
    is passed over, as if there were none."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        revision, listed = data[key] == uid and data["revision"], data[members]
        if type(revision) is not int or not 0 < revision < _MAX_REVISION or not isinstance(listed, list):
            return None
        then = set()
        for entry in listed:
            values = tuple(entry[f] for f in fields)
            if not all(v is None or type(v) in (str, int) for v in values):
                return None
            then.add(values)
        return revision, then
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None


def _carry_manifests(conn: sqlite3.Connection, sdir: Path) -> None:
    """Completion state from the manifests, for the series and studies the old
    index did not hand over (it was removed, or the process that carried it
    over was killed): the manifests are what completed, at which revision. A
    series whose manifest lists exactly its instances now (UIDs, paths and
    sizes) stays complete at that revision; one that changed since completes
    again, at the next revision (never again at one already given, nor at a
    lower one). A study likewise, from how many of its instances, and how many
    bytes, each of its series holds. Only
    the file at the manifest's own name counts (not a copy beside it, nor a
    write cut short), and only if it reads as a manifest."""
    # (folder, table, key, the manifest's list, what it lists of each member, the
    # same of its members now, in the index): series first, whose revisions studies compare
    kinds = (
        ("series", "series", "series_instance_uid", "instances", ("sop_instance_uid", "path", "size"),
         "SELECT sop_instance_uid, path, size FROM instances WHERE series_instance_uid = ?"),
        # (a study by its own instances of each series, not the series' revision, which
        # another study's instances of a series UID the two share move on too)
        ("studies", "studies", "study_instance_uid", "series", ("series_instance_uid", "instance_count", "total_bytes"),
         "SELECT series_instance_uid, count(*), coalesce(sum(size), 0) FROM instances"
         " WHERE study_instance_uid = ? AND path IS NOT NULL GROUP BY series_instance_uid"),
    )
    conn.execute("BEGIN")
    try:
        for folder, table, key, members, fields, members_now in kinds:
            uids = [r[0] for r in conn.execute(f"SELECT {key} FROM {table} WHERE completed_revision = 0")]
            for uid in uids:
                if not isinstance(uid, str):
                    continue
                found = _listed(sdir / MANIFEST_FOLDERS[folder] / manifest_name(uid), key, uid, members, fields)
                if found is None:
                    continue
                revision, then = found
                now = {tuple(r) for r in conn.execute(members_now, (uid,))}
                conn.execute(
                    f"UPDATE {table} SET completed_revision = ?, revision = ? WHERE {key} = ?",
                    (revision, revision if now == then else revision + 1, uid),
                )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


#: Taken by :func:`repair_in_use` (the index's own lock is shared by a server's processes then).
REPAIR_LOCK_FILENAME = "repair.lock"
#: What SQLite says of a file that is not, or no longer, an index (not of one that is busy).
_DAMAGED = ("not a database", "malformed", "no such table")


def is_damage(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) is SQLite saying the index
    file is no index any more, not that it is busy."""
    while exc is not None:
        if isinstance(exc, sqlite3.DatabaseError) and any(d in str(exc) for d in _DAMAGED):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


def damaged(root: Path | str) -> str | None:
    """Why the index of `root` is gone or cannot be read as one (removed, or
    its file damaged), None if it is there and readable (a busy one is)."""
    why = check(root)
    if why == "missing":
        return "removed"
    if why is not None and why.startswith("unreadable") and any(d in why for d in _DAMAGED):
        return f"damaged: {why}"
    return None


def repair_in_use(
    root: Path | str, read_identity: Callable[[Path], Mapping[str, Any] | None], *, wait: float = 30.0,
    carry_from: Path | None = None,
) -> RebuildSummary | None:
    """Rebuild the index of `root` from the files when it was removed or
    damaged (:func:`damaged`) while a server's processes hold it shared, which
    keeps :func:`rebuild`'s exclusive lock from them for good. None of them can
    reach a removed or damaged file, so a new one at its name takes nothing
    from them; each opens it again once it sees the change
    (:meth:`SqliteIndex.moved_away`). One process at a time, under a lock of
    its own; None if the index was usable again once it had that lock (another
    process repaired it). See :meth:`SqliteIndex.repair`. Series and study completion state is carried over
    from `carry_from` (see :func:`rebuild`); without it, it goes with a removed
    file."""
    sdir = state_dir(Path(root))
    sdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(sdir / REPAIR_LOCK_FILENAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise IndexInUseError(f"the index of {root} is being rebuilt by another process") from None
                time.sleep(0.05)
        why = damaged(root)
        if why is None:
            return None
        if why != "removed":
            # Out of the way first: a process whose connection still reads it (the
            # WAL holds the pages) would commit there while the files are walked,
            # and those rows would not be in the new index; it sees it "removed"
            # now, and waits for this lock.
            final = sdir / INDEX_FILENAME
            with contextlib.suppress(FileNotFoundError):
                os.replace(final, final.with_name(INDEX_FILENAME + ".damaged"))
        return rebuild(root, read_identity, locked=fd, carry_from=carry_from)
    finally:
        os.close(fd)


def create_empty(root: Path | str) -> None:
    """A fresh empty index for an empty (or new) tree: a rebuild of nothing."""
    rebuild(root, lambda path: None, suffix="\0never")


# --------------------------------------------------------------------------- SqliteIndex


class SqliteIndex:
    """The SQLite implementation of :class:`InstanceIndex` for one output root."""

    _seq = itertools.count(1)

    def __init__(
        self, root: Path | str, *, claim_timeout: float = DEFAULT_CLAIM_TIMEOUT, read_only: bool = False
    ) -> None:
        """Open the index of `root`; with `read_only` (``sortscp ls``), create
        and change nothing there, not even the lock file, so that a read-only
        or another user's folder can be read (see :func:`_connect_read_only`)."""
        self.root = Path(root)
        self.claim_timeout = claim_timeout
        self._pid = os.getpid()
        start = start_time(self._pid)
        self._start = UNKNOWN_START if start is None else start
        self._lock = threading.Lock()
        self._read_only = read_only
        self._open()

    def _open(self) -> None:
        sdir = state_dir(self.root)
        path = sdir / INDEX_FILENAME
        read_only = self._read_only
        if not path.is_file():
            raise IndexStaleError(f"no index at {path}: rebuild it")
        self._lock_fd: int | None = _open_lock(sdir / LOCK_FILENAME, read_only)
        try:
            try:
                if self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IndexInUseError(_in_use(self.root)) from None
            conn = _connect_read_only(path) if read_only else _connect(path)
            self._conn: sqlite3.Connection | None = conn  # None: closed
            try:
                meta = _read_meta(conn)
                st = os.stat(path)
            except (sqlite3.Error, OSError) as exc:
                conn.close()
                raise IndexStaleError(f"unreadable index {path}: {exc}") from exc
            if meta.get("schema_version") != str(SCHEMA_VERSION):
                conn.close()
                raise IndexStaleError(f"index {path} has schema {meta.get('schema_version')}, not {SCHEMA_VERSION}")
            if not read_only:  # (an index made before the series of a study were looked up by it)
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(f"CREATE INDEX IF NOT EXISTS {_STUDY_INDEX}")
        except BaseException:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise
        self._ident = (st.st_dev, st.st_ino)
        self.generation = int(meta.get("generation", "1"))

    def moved_away(self) -> str | None:
        """Why this connection no longer reaches the index at its path: the
        file was ``"removed"`` (by hand, or with its folder) or another took
        its name (``"replaced"``: :meth:`repair` put a new one there);
        None if it still does (one ``stat``)."""
        try:
            st = os.stat(index_path(self.root))
        except OSError:
            return "removed"
        return None if (st.st_dev, st.st_ino) == self._ident else "replaced"

    def _snapshot(self, dest: Path) -> bool:
        """Copy what this connection reaches into a new SQLite file `dest`
        (its file may have been removed from under it: the copy is read
        through the connection, WAL included). False if it cannot be read."""
        try:
            target = sqlite3.connect(dest)
            try:
                self._c().backup(target)
            finally:
                target.close()
            return True
        except (sqlite3.Error, OSError, InstanceIndexError):
            Path(dest).unlink(missing_ok=True)
            return False

    def _reopen(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
        self._open()

    def readable(self) -> bool:
        """Whether this connection still reads the index as one (False: SQLite
        says it is damaged; a busy index is readable)."""
        with self._lock:
            try:
                _read_meta(self._c())
            except sqlite3.Error as exc:
                return not is_damage(exc)
            except InstanceIndexError:
                return True  # closed: nothing to watch
            return True

    def reopen(self) -> None:
        """Let go of this connection and its shared lock and open the index at
        its path again (no clean close is recorded: other processes use it)."""
        with self._lock:
            self._reopen()

    def repair(self, read_identity: Callable[[Path], Mapping[str, Any] | None]) -> RebuildSummary | None:
        """:func:`repair_in_use` of this root, then :meth:`reopen`, as one step
        for this object's users (it holds their lock throughout): the completion
        state is carried over from what this connection still reads (a file
        removed by hand stays readable to a connection that had it open), and
        no completion is recorded in the old file meanwhile, to be lost with it.
        Made by the server's main process, whose events record completions."""
        with self._lock:
            sdir = state_dir(self.root)
            sdir.mkdir(parents=True, exist_ok=True)
            copy = sdir / f"{INDEX_FILENAME}.carry-{os.getpid()}"
            # The lock at its name held shared meanwhile (ours is on a lock file that
            # went with .sortscp, if it did): a sort or reindex is refused as before.
            guard = _open_lock(sdir / LOCK_FILENAME, False)
            assert guard is not None  # (None only read-only)
            try:
                with contextlib.suppress(OSError):
                    fcntl.flock(guard, fcntl.LOCK_SH | fcntl.LOCK_NB)
                try:
                    summary = repair_in_use(self.root, read_identity,
                                            carry_from=copy if self._snapshot(copy) else None)
                finally:
                    for made in (copy, copy.with_name(copy.name + "-journal")):
                        made.unlink(missing_ok=True)
                self._reopen()
            finally:
                os.close(guard)
            return summary

    # ---- plumbing

    def _owner(self) -> str:
        return f"{self._pid}.{self._start}.{next(self._seq)}"

    def _c(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:
            raise InstanceIndexError("an index connection was carried across fork: open one per process")
        if self._conn is None:
            raise InstanceIndexError(f"the index of {self.root} is closed")
        return self._conn

    def _tx(self):
        return _Immediate(self._c())

    # ---- claim protocol

    def begin(
        self, uid: str, relpath: str, facts: Mapping[str, Any], *, timeout: float | None = None
    ) -> Claim:
        """Claim `uid` for a file about to be put at `relpath` (step 1).
        ``claim.old`` is the committed row (None: a new UID)."""
        _check_rel(relpath)
        _check_facts(facts)
        facts = dict(facts)
        timeout = self.claim_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = 0.001
        intent = json.dumps(facts)
        while True:
            with self._lock:
                claim = self._try_claim(uid, relpath, facts, intent)
            if claim is not None:
                return claim
            if time.monotonic() >= deadline:
                raise ClaimTimeoutError(f"{uid} is held by another process for more than {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _try_claim(self, uid: str, relpath: str, facts: dict, intent: str) -> Claim | None:
        """One attempt: the claim, or None if a live process holds the UID."""
        conn = self._c()
        while True:
            owner = self._owner()
            now = time.time()
            got = conn.execute(
                _INSERT_NEW,
                (uid, *(facts.get(k) for k in FACT_FIELDS), relpath, owner, self._pid, now, intent),
            ).fetchall()
            if got:  # a new UID: the common case, one statement
                if not conn.execute("SELECT 1 FROM obsolete WHERE path = ?", (relpath,)).fetchall():
                    return Claim(uid, relpath, facts, None, owner)
                with self._tx() as cur:  # rare: an obsolete file of this UID is where we go
                    if self._take_obsolete(cur, relpath, owner):
                        return Claim(uid, relpath, facts, None, owner)
                    cur.execute("DELETE FROM instances WHERE sop_instance_uid = ? AND owner = ?", (uid, owner))
                return None
            with self._tx() as cur:
                found = cur.execute(_SELECT_ROW, (uid,)).fetchone()
                if found is None:
                    continue  # removed meanwhile: the fast path again
                row, row_intent = _row(found)
                if row.state == "pending":
                    if owner_alive(row.owner):
                        return None
                    settled = self._settle(cur, row, row_intent)
                    if settled is None:
                        continue
                    row = settled
                if not self._take_obsolete(cur, relpath, owner):
                    return None
                cur.execute(
                    "UPDATE instances SET state = 'pending', pending_path = ?, owner = ?, pid = ?,"
                    " since = ?, intent = ? WHERE sop_instance_uid = ?",
                    (relpath, owner, self._pid, now, self._held_intent(facts, intent, row, relpath), uid),
                )
                return Claim(uid, relpath, facts, row, owner)

    def _held_intent(self, facts: dict, intent: str, row: InstanceRow, relpath: str) -> str:
        """The claim's intent, with the inode of the committed file when the
        claim goes to its very name: a replace puts another inode there, so
        after the claimer's death the recovery knows whether it did (the
        file's ctime cannot tell: the file system's clock lags ours by up to
        a tick, and a file replaced just after the claim can look older)."""
        if row.path != relpath:
            return intent
        try:
            st = (self.root / relpath).lstat()
        except OSError:
            return intent
        return json.dumps({**facts, _HELD: st.st_ino})

    def _take_obsolete(self, cur: sqlite3.Cursor, relpath: str, owner: str) -> bool:
        """If `relpath` is an obsolete file, make the claim `owner` its owner
        (so no recover removes what the claim links there). False if a live
        process is about to remove it (wait for it)."""
        ob = cur.execute("SELECT owner FROM obsolete WHERE path = ?", (relpath,)).fetchone()
        if ob is None:
            return True
        if owner_alive(ob[0]):
            return False
        cur.execute("UPDATE obsolete SET owner = ? WHERE path = ?", (owner, relpath))
        return True

    def commit(self, claim: Claim, *, now: float | None = None) -> str | None:
        """The file is in place at ``claim.path`` (step 3): make it the row.
        Returns the old path the caller must remove (then obsolete_removed)."""
        now = time.time() if now is None else now
        with self._lock, self._tx() as cur:
            return self._apply(cur, claim.sop_instance_uid, claim.old, claim.path, claim.facts, now, claim.owner)

    def abort(self, claim: Claim) -> None:
        """Give the claim up (step 4): the row is as before ``begin``."""
        with self._lock, self._tx() as cur:
            cur.execute("UPDATE obsolete SET owner = '' WHERE path = ? AND owner = ?", (claim.path, claim.owner))
            if claim.old is None:
                cur.execute(
                    "DELETE FROM instances WHERE sop_instance_uid = ? AND owner = ?", (claim.sop_instance_uid, claim.owner)
                )
            else:
                cur.execute(
                    "UPDATE instances SET state = 'ok', pending_path = NULL, owner = NULL, pid = NULL,"
                    " since = NULL, intent = NULL WHERE sop_instance_uid = ? AND owner = ?",
                    (claim.sop_instance_uid, claim.owner),
                )

    def obsolete_removed(self, relpath: str) -> None:
        """The caller removed the obsolete file `relpath` (or found it gone)."""
        with self._lock:
            self._c().execute("DELETE FROM obsolete WHERE path = ?", (relpath,))

    def record_placed(
        self, uid: str, relpath: str, facts: Mapping[str, Any], *, now: float | None = None,
        timeout: float | None = None,
    ) -> str | None:
        """One-shot upsert for a file already placed without the claim protocol
        (``sort``). The index then names `relpath`; returns the path it named
        before, if another (that file stays: ``sort`` keeps both)."""
        claim = self.begin(uid, relpath, facts, timeout=timeout)
        try:
            old = self.commit(claim, now=now)
        except BaseException:
            self.abort(claim)
            raise
        if old is not None:
            with self._lock:
                self._c().execute("DELETE FROM obsolete WHERE path = ?", (old,))
        return old

    def _apply(
        self, cur: sqlite3.Cursor, uid: str, old: InstanceRow | None, new_path: str,
        facts: Mapping[str, Any], now: float, owner: str | None,
    ) -> str | None:
        args = (new_path, *(facts.get(k) for k in FACT_FIELDS), now, uid)
        if owner is None:
            cur.execute(_SET_OK, args)
        else:
            cur.execute(_SET_OK + " AND owner = ? AND state = 'pending'", (*args, owner))
        if cur.rowcount != 1:
            raise ClaimLostError(f"the claim of {uid} was settled by another process")
        counted = old if old is not None and old.path is not None else None  # (a row with a file)
        folder = _folder(new_path)
        series, study = facts.get("series_instance_uid"), facts.get("study_instance_uid")
        for key, table, old_uid, new_uid in (
            ("series_instance_uid", "series", counted.series_instance_uid if counted is not None else None, series),
            ("study_instance_uid", "studies", counted.study_instance_uid if counted is not None else None, study),
        ):
            if counted is not None and old_uid is not None and old_uid != new_uid:
                _leave(cur, table, key, old_uid, now)
            if new_uid is None:
                continue
            delta = 0 if counted is not None and old_uid == new_uid else 1
            if table == "series":
                cur.execute(
                    _SERIES_UPSERT,
                    (series, study, folder, facts.get("series_description"), facts.get("series_number"),
                     facts.get("modality"), now, now, delta),
                )
            else:
                cur.execute(
                    _STUDY_UPSERT,
                    (study, facts.get("patient_name"), facts.get("patient_id"), facts.get("study_date"),
                     now, now, delta),
                )
        cur.execute("DELETE FROM obsolete WHERE path = ?", (new_path,))
        if counted is not None and counted.path != new_path:
            cur.execute(
                "INSERT OR REPLACE INTO obsolete(path, sop_instance_uid, owner, since) VALUES (?, ?, ?, ?)",
                (counted.path, uid, owner or "", now),
            )
            return counted.path
        return None

    def _untouched_since_claim(self, cur: sqlite3.Cursor, row: InstanceRow) -> bool:
        """True if the committed file of `row` is the same size and its inode
        unchanged (ctime) since the pending claim was made: the claim's owner
        never replaced it."""
        found = cur.execute("SELECT since, intent FROM instances WHERE sop_instance_uid = ?",
                            (row.sop_instance_uid,)).fetchone()
        try:
            st = (self.root / str(row.path)).lstat()
        except OSError:
            return False
        if not found or found[0] is None or st.st_size != row.size:
            return False
        try:
            held = json.loads(found[1] or "{}").get(_HELD)
        except (ValueError, AttributeError):
            held = None
        if held is not None:  # (see _held_intent)
            return bool(held == st.st_ino)
        return bool(st.st_ctime < found[0])

    def _file_matches(self, relpath: str | None, facts: Mapping[str, Any]) -> bool:
        if relpath is None:
            return False
        path = self.root / relpath
        try:
            st = path.stat()
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        if facts.get("size") is not None and st.st_size != facts["size"]:
            return False
        if facts.get("digest"):
            try:
                return sha256_file(path) == facts["digest"]
            except OSError:
                return False
        return True

    def _settle(self, cur: sqlite3.Cursor, row: InstanceRow, intent: dict | None) -> InstanceRow | None:
        """Settle the intent of a dead owner from the files (inside a transaction).
        Returns the committed row it leaves, or None if the row is gone."""
        uid, new = row.sop_instance_uid, row.pending_path
        intent = intent or {}
        old = None if row.path is None else dataclasses.replace(row, state="ok", pending_path=None, owner=None)
        if new is not None and new == row.path and self._untouched_since_claim(cur, row):
            new = None  # an identical resend: its file is the committed one; no new arrival, no new revision
        if new is not None and self._file_matches(new, intent):
            try:
                mtime = (self.root / new).stat().st_mtime
            except OSError:
                mtime = time.time()
            self._apply(cur, uid, old, new, intent, mtime, row.owner)
            found = cur.execute(_SELECT_ROW, (uid,)).fetchone()
            return _row(found)[0]
        stray = new if new is not None and new != row.path and (self.root / new).exists() else None
        if old is not None and row.path is not None and (self.root / row.path).exists():
            cur.execute(
                "UPDATE instances SET state = 'ok', pending_path = NULL, owner = NULL, pid = NULL,"
                " since = NULL, intent = NULL WHERE sop_instance_uid = ?",
                (uid,),
            )
            if stray is not None:
                self._add_obsolete(cur, stray, uid, row.owner)
            return old
        if stray is not None:
            # neither the intended file nor the old one: a file of this UID is
            # at the new path (another version): it is what the tree holds
            facts = dict(intent)
            p = self.root / stray
            st = p.stat()
            facts["size"] = st.st_size
            facts["digest"] = sha256_file(p) if intent.get("digest") else None
            self._apply(cur, uid, None, stray, facts, st.st_mtime, row.owner)
            if old is not None:
                self._uncount(cur, old)
            return _row(cur.execute(_SELECT_ROW, (uid,)).fetchone())[0]
        cur.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (uid,))
        if old is not None:
            self._uncount(cur, old)
        return None

    def _uncount(self, cur: sqlite3.Cursor, old: InstanceRow) -> None:
        for key, table, value in (
            ("series_instance_uid", "series", old.series_instance_uid),
            ("study_instance_uid", "studies", old.study_instance_uid),
        ):
            if value is None:
                continue
            _leave(cur, table, key, value, time.time())

    def _add_obsolete(self, cur: sqlite3.Cursor, relpath: str, uid: str, owner: str | None) -> None:
        cur.execute(
            "INSERT OR REPLACE INTO obsolete(path, sop_instance_uid, owner, since) VALUES (?, ?, ?, ?)",
            (relpath, uid, owner or "", time.time()),
        )

    def recover(self, *, wait: float | None = None) -> list[str]:
        """Settle the intents of dead processes; return the obsolete paths
        (of dead owners, file still there) the caller must remove and confirm.
        `wait`: seconds to wait for another process's lock on the index
        (default :data:`BUSY_TIMEOUT`)."""
        # (bounded too while another thread of this process waits for the index)
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            raise InstanceIndexError("the index is busy: another thread of this process waits for it")
        try:
            conn = self._c()
            if wait is None:
                return self._recover(conn)
            conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
            try:
                return self._recover(conn)
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        finally:
            self._lock.release()

    def _recover(self, conn: sqlite3.Connection) -> list[str]:
        """The body of :meth:`recover` (its lock held)."""
        pending = [r[0] for r in conn.execute("SELECT sop_instance_uid FROM instances WHERE state <> 'ok'")]
        for uid in pending:
            with self._tx() as cur:
                found = cur.execute(_SELECT_ROW, (uid,)).fetchone()
                if found is None:
                    continue
                row, intent = _row(found)
                if row.state == "pending" and not owner_alive(row.owner):
                    self._settle(cur, row, intent)
        out = []
        with self._tx() as cur:
            for path, owner in cur.execute("SELECT path, owner FROM obsolete").fetchall():
                if owner_alive(owner):
                    continue  # a live process is removing it (or linking there)
                current = cur.execute("SELECT 1 FROM instances WHERE path = ?", (path,)).fetchone()
                if current is not None or not (self.root / path).exists():
                    cur.execute("DELETE FROM obsolete WHERE path = ?", (path,))
                else:
                    cur.execute("UPDATE obsolete SET owner = ? WHERE path = ?", (self._owner(), path))
                    out.append(path)
        return sorted(out)

    # ---- run state

    def mark_running(self) -> None:
        """This run uses the index: ``clean=0`` + boot id, synced (see docstring)."""
        with self._lock:
            conn = self._c()
            conn.execute("PRAGMA synchronous=FULL")
            try:
                with _Immediate(conn) as cur:
                    cur.executemany(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                        [("clean", "0"), ("boot_id", boot_id())],
                    )
            finally:
                conn.execute("PRAGMA synchronous=NORMAL")

    def close(self, *, clean: bool = False) -> None:
        """Close; with `clean` (the run's main process, after its workers), and
        if no other process has the index open, record a clean close, synced."""
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            try:
                if clean and os.getpid() == self._pid and self._lock_fd is not None:
                    try:
                        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        pass  # another user still has it: it will close it
                    else:
                        conn.execute("PRAGMA synchronous=FULL")
                        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('clean', '1')")
                        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
                self._conn = None
                if self._lock_fd is not None:
                    os.close(self._lock_fd)

    def __enter__(self) -> SqliteIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- queries

    def lookup(self, uid: str) -> InstanceRow | None:
        with self._lock:
            found = self._c().execute(_SELECT_ROW, (uid,)).fetchone()
        return None if found is None else _row(found)[0]

    def instances_of_series(self, series_uid: str, study_uid: str | None = None) -> list[InstanceRow]:
        """The committed rows of a series (for a manifest), by path; only
        those of study `study_uid` if given (a series UID a sender gave
        instances of two studies is part of both)."""
        where, args = "WHERE series_instance_uid = ? AND path IS NOT NULL", [series_uid]
        if study_uid is not None:
            where, args = where + " AND study_instance_uid = ?", [series_uid, study_uid]
        with self._lock:
            rows = self._c().execute(
                _SELECT_ROW.replace("WHERE sop_instance_uid = ?", where + " ORDER BY path"), args,
            ).fetchall()
        return [_row(r)[0] for r in rows]

    def all_instances(self) -> list[InstanceRow]:
        with self._lock:
            rows = self._c().execute(
                _SELECT_ROW.replace(" WHERE sop_instance_uid = ?", " ORDER BY sop_instance_uid")
            ).fetchall()
        return [_row(r)[0] for r in rows]

    def obsolete_paths(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._c().execute("SELECT path FROM obsolete ORDER BY path")]

    def series_state(self, series_uid: str) -> SeriesState | None:
        got = self._series("WHERE s.series_instance_uid = ?", (series_uid,))
        return got[0] if got else None

    def study_state(self, study_uid: str) -> StudyState | None:
        got = self._studies("WHERE study_instance_uid = ?", (study_uid,))
        return got[0] if got else None

    def stable_series(self, older_than: float, *, now: float | None = None) -> list[SeriesState]:
        """Series not complete at their current revision whose last arrival is
        more than `older_than` seconds ago, oldest first."""
        cutoff = (time.time() if now is None else now) - older_than
        return self._series(
            "WHERE s.completed_revision < s.revision AND s.last_arrival <= ? ORDER BY s.last_arrival", (cutoff,)
        )

    def stable_studies(self, older_than: float, *, now: float | None = None) -> list[StudyState]:
        cutoff = (time.time() if now is None else now) - older_than
        return self._studies(
            "WHERE completed_revision < revision AND last_arrival <= ? ORDER BY last_arrival", (cutoff,)
        )

    def mark_series_complete(self, series_uid: str, revision: int, *, arrivals: int | None = None) -> bool:
        """Flip `series_uid` to complete at `revision`; True only for the one
        caller that flips it (and, with `arrivals`, only if nothing arrived
        since the caller read that count)."""
        return self._mark("series", "series_instance_uid", series_uid, revision, arrivals)

    def mark_study_complete(self, study_uid: str, revision: int, *, arrivals: int | None = None) -> bool:
        return self._mark("studies", "study_instance_uid", study_uid, revision, arrivals)

    def _mark(self, table: str, key: str, uid: str, revision: int, arrivals: int | None, *,
              empty: bool = False) -> bool:
        sql = (
            f"UPDATE {table} SET completed_revision = ?, completed_at = ?"
            f" WHERE {key} = ? AND revision = ? AND completed_revision < ?"
        )
        args: tuple = (revision, time.time(), uid, revision, revision)
        if arrivals is not None:
            sql += " AND arrivals = ?"
            args += (arrivals,)
        if empty:
            sql += " AND instances <= 0"
        with self._lock:
            return self._c().execute(sql, args).rowcount == 1

    def series_list(self, study_uid: str | None = None) -> list[SeriesState]:
        """Every series (of one study) that has instances, with its study's patient, for ``ls``."""
        if study_uid is None:
            return self._series(
                "WHERE s.instances > 0 ORDER BY t.patient_name, t.patient_id, t.study_date, s.folder", ()
            )
        # (the series its instances name: a series UID a sender gave two studies is in both)
        return self._series("WHERE s.series_instance_uid IN (SELECT series_instance_uid FROM instances"
                            " WHERE study_instance_uid = ? AND path IS NOT NULL) AND s.instances > 0"
                            " ORDER BY s.folder", (study_uid,))

    def studies_of_series(self) -> dict[str, dict[str | None, int]]:
        """For ``ls``: each series' studies, with how many of its instances each holds."""
        with self._lock:
            rows = self._c().execute(
                "SELECT series_instance_uid, study_instance_uid, count(*) FROM instances"
                " WHERE path IS NOT NULL GROUP BY series_instance_uid, study_instance_uid").fetchall()
        found: dict[str, dict[str | None, int]] = {}
        for series, study, n in rows:
            found.setdefault(series, {})[study] = n
        return found

    def studies(self) -> list[StudyState]:
        """Every study that has instances, with its series count, for ``ls``."""
        return self._studies("WHERE instances > 0 ORDER BY patient_name, patient_id, study_date", ())

    def forget_empty_series(self, series_uid: str, revision: int) -> bool:
        """Settle the row of `series_uid` if it has no instance left (each was
        sent again as part of another series) and is still at `revision`: it
        is marked done at that revision, left out of listings, and an instance
        that comes later gives it the next revision (never one given before).
        True if this call settled it: the completion watcher calls it once it
        has removed the series' manifest."""
        return self._mark("series", "series_instance_uid", series_uid, revision, None, empty=True)

    def forget_empty_study(self, study_uid: str, revision: int) -> bool:
        return self._mark("studies", "study_instance_uid", study_uid, revision, None, empty=True)


    def _series(self, where: str, args: tuple) -> list[SeriesState]:
        cols = ", ".join("s." + c.strip() for c in _SERIES_COLS.split(","))
        sql = (
            f"SELECT {cols}, t.patient_name, t.patient_id, t.study_date FROM series AS s"
            f" LEFT JOIN studies AS t ON t.study_instance_uid = s.study_instance_uid {where}"
        )
        with self._lock:
            return [SeriesState(*r) for r in self._c().execute(sql, args)]

    def _studies(self, where: str, args: tuple) -> list[StudyState]:
        sql = (
            f"SELECT {_STUDY_COLS}, (SELECT count(*) FROM series AS s"
            f" WHERE s.study_instance_uid = studies.study_instance_uid AND s.instances > 0) FROM studies {where}"
        )
        with self._lock:
            return [StudyState(*r) for r in self._c().execute(sql, args)]


class _Immediate:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception)."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Cursor:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn.cursor()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


@dataclasses.dataclass
class OpenReport:
    rebuilt: str | None  #: why it was rebuilt (None: it was not)
    summary: RebuildSummary | None
    obsolete: list[str]  #: paths the caller must remove, then confirm with obsolete_removed


def open_index(
    root: Path | str,
    read_identity: Callable[[Path], Mapping[str, Any] | None],
    *,
    digests: bool = False,
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
) -> tuple[SqliteIndex, OpenReport]:
    """Start-up of a run's main process: rebuild if :func:`check` says so,
    open, :meth:`~SqliteIndex.recover`, :meth:`~SqliteIndex.mark_running`."""
    reason = check(root)
    summary = rebuild(root, read_identity, digests=digests) if reason else None
    index = SqliteIndex(root, claim_timeout=claim_timeout)
    try:
        obsolete = index.recover()
        index.mark_running()
    except BaseException:
        index.close()
        raise
    return index, OpenReport(reason, summary, obsolete)

"""pynetdicom event handlers: C-STORE, C-ECHO and the association log line.

Handlers return statuses; no exception ever reaches the network. Each failure
is mapped on purpose to a status the sender understands as "not stored, try
again" (or "this dataset cannot be read").
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from pynetdicom import evt

from scp.config import ServeConfig
from scp.enums import Result
from scp.errors import (
    DatasetMismatch,
    IndexCommitFailed,
    InstanceIndexError,
    NoDataset,
    NotDicomError,
    NotStorageContext,
    ReceiveFailed,
    StoreError,
)
from scp.events.pipeline import Pipeline
from scp.jobs import store_received
from scp.log import safe
from scp.net import _pynetdicom
from scp.net.status import (
    CANNOT_UNDERSTAND,
    DATA_SET_MISMATCH,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
)
from scp.pool import JobTimeout, WorkerPool
from scp.store.index import SqliteIndex
from scp.store.instance import settle
from scp.store.tmp import TMP_DIRNAME, remove_orphans

log = logging.getLogger(__name__)

#: Seconds the settle after a worker died may wait for the index while its
#: sender waits for the answer; beyond, it is retried in the background.
SETTLE_WAIT_SECONDS = 1.0
#: Seconds between those retries.
SETTLE_RETRY_SECONDS = 1.0



def status_for(exc: BaseException) -> int:
    """The C-STORE status for a failure to store an instance: the one place
    where failures become statuses.

    >>> hex(status_for(NotDicomError("no header"))), hex(status_for(OSError(28, "No space")))
    ('0xc000', '0xa700')
    """
    if isinstance(exc, DatasetMismatch):
        return DATA_SET_MISMATCH
    if isinstance(exc, NotStorageContext):
        return SOP_CLASS_NOT_SUPPORTED
    if isinstance(exc, NotDicomError):  # includes NoDataset and truncated datasets
        return CANNOT_UNDERSTAND
    return OUT_OF_RESOURCES  # StoreError, OSError, a dead worker, anything else


@dataclass
class _AssocStats:
    started: float = field(default_factory=time.monotonic)
    stored: int = 0  # new files (a resend with other bytes included)
    already: int = 0  # answered Success, the tree already held it (identical, or kept)
    failed: int = 0
    nbytes: int = 0


class StoreHandlers:
    """The handlers of one running server, bound to its pool and config."""

    #: The server's events pipeline (set by the server; None: no events).
    pipeline: Pipeline | None = None

    def __init__(self, pool: WorkerPool, cfg: ServeConfig, index: SqliteIndex | None = None) -> None:
        self.pool = pool
        self.cfg = cfg
        self.index = index
        self._stats: dict[int, _AssocStats] = {}
        #: Associations whose connection closed before they were established (the
        #: close comes from the network thread, the establishment from the
        #: association's: a peer that resets as soon as it reads the A-ASSOCIATE-AC).
        self._closed_early: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self.stored = 0
        self.already = 0  #: Success for an instance already there (a resend; --on-duplicate keep)
        self.failed = 0
        self._settler: threading.Thread | None = None
        self._settle_error: str | None = None
        self._closed = threading.Event()

    def bindings(self) -> list[tuple]:
        return [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_CONN_CLOSE, self.on_close),
        ]

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_store(self, event: evt.Event) -> int:
        started = time.perf_counter()
        assoc = event.assoc
        calling = assoc.requestor.ae_title
        # get, not setdefault: if the connection already closed, re-adding an
        # entry here would never be removed
        stats = self._stats.get(id(assoc)) or _AssocStats()
        sop_uid = str(event.request.AffectedSOPInstanceUID)  # type: ignore[union-attr]
        log.debug("received %s from %s; filing it", safe(sop_uid), safe(calling))
        try:
            context = str(event.context.abstract_syntax)
            if not _pynetdicom.is_storage_class(context):
                raise NotStorageContext(f"a C-STORE on presentation context {event.context.context_id}, "
                                        f"whose abstract syntax {context} is no storage class")
            sink = _pynetdicom.dataset_sink(event.request)
            if sink is None:
                raise NoDataset("the C-STORE request carries no dataset")
            if sink.error is not None:
                raise ReceiveFailed(
                    f"cannot write the incoming dataset: {sink.error.strerror or sink.error}"
                ) from sink.error
            if sink.problem is not None:
                raise sink.problem
            outcome = self.pool.run(
                store_received, sink.name, calling, self.cfg, sink.header(), timeout=self.cfg.job_timeout
            )
        except Exception as exc:
            # what dead workers (or one replaced after a failed index commit) were writing
            if isinstance(exc, (BrokenProcessPool, JobTimeout, IndexCommitFailed)):
                self.after_worker_death()
            status = status_for(exc)
            stats.failed += 1
            with self._lock:
                self.failed += 1
            reason = _describe(exc)
            log.error(
                "C-STORE failed from %s (%s): SOP Instance %s: %s -> status 0x%04X",
                safe(calling),
                _peer(assoc),
                safe(sop_uid),
                safe(reason),
                status,
                extra={"event": "store_failed", "calling_aet": calling, "sop_instance": sop_uid,
                       "reason": reason, "status": status},
            )
            if self.pipeline is not None:
                self.pipeline.failed(calling, status, time.perf_counter() - started)
            return status
        already = outcome.result is Result.ALREADY
        if already:
            stats.already += 1
        else:
            stats.stored += 1
        stats.nbytes += outcome.nbytes
        with self._lock:
            if already:
                self.already += 1
            else:
                self.stored += 1
        if outcome.reason:
            log.info(
                "%s: %s", safe(outcome.destination), outcome.reason,
                extra={"event": "duplicate", "calling_aet": calling, "sop_instance": sop_uid,
                       "path": outcome.destination, "reason": outcome.reason},
            )
        log.debug(
            "stored %s from %s -> %s (%d bytes, %s)",
            safe(sop_uid), safe(calling), safe(outcome.destination), outcome.nbytes,
            "already there" if outcome.result is Result.ALREADY else "new",
        )
        if self.pipeline is not None:  # non-blocking: counters and a bounded queue
            self.pipeline.stored(
                calling, sop_uid, outcome.destination, outcome.nbytes,
                sop_class_uid=str(event.request.AffectedSOPClassUID),  # type: ignore[union-attr]
                transfer_syntax_uid=str(event.context.transfer_syntax),
                seconds=time.perf_counter() - started, facts=outcome.facts, placement=outcome.placement,
            )
        return SUCCESS

    def after_worker_death(self) -> None:
        """A worker died: new workers, its temporary files removed, its index
        intents settled (and the files they superseded removed). The sender
        waits for this answer: the settle waits for the index at most
        :data:`SETTLE_WAIT_SECONDS` here; one that cannot be made now (a full
        disk, another process holding the index) is retried in the background
        until it is, so no second file of a UID stays in the tree."""
        self.pool.recover()
        remove_orphans(self.cfg.out / TMP_DIRNAME)
        if self.index is not None and not self._settle(SETTLE_WAIT_SECONDS):
            with self._lock:
                if self._settler is None or not self._settler.is_alive():
                    self._settler = threading.Thread(target=self._settle_later, name="sortscp-settle",
                                                     daemon=True)
                    self._settler.start()

    def _settle(self, wait: float | None) -> bool:
        assert self.index is not None
        try:
            settle(self.index, self.cfg.out, wait=wait)
        except (InstanceIndexError, OSError, sqlite3.Error) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if reason != self._settle_error:  # once per reason, not every retry
                self._settle_error = reason
                log.error("cannot settle the instance index after a worker died (%s); trying again every %g s",
                          safe(reason), SETTLE_RETRY_SECONDS, extra={"event": "index_unsettled", "reason": reason})
            return False
        if self._settle_error is not None:
            self._settle_error = None
            log.info("the instance index is settled again")
        return True

    def _settle_later(self) -> None:
        while not self._closed.wait(SETTLE_RETRY_SECONDS):
            if self._settle(None):
                return

    def close(self) -> None:
        """Stop retrying a settle (before the index closes); the next start settles."""
        self._closed.set()
        if self._settler is not None:
            self._settler.join(SETTLE_WAIT_SECONDS + 1)

    def on_established(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            early = assoc in self._closed_early
            if early:
                self._closed_early.discard(assoc)
            else:
                self._stats[id(assoc)] = _AssocStats()
        if self.pipeline is not None:
            self.pipeline.association_opened()
        if early:  # its close came first and found nothing to count or tell: now
            self._log_closed(assoc, _AssocStats())

    def on_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        _discard_partial_dataset(assoc)
        try:
            remove_orphans(self.cfg.out / TMP_DIRNAME)  # left by processes that died (cheap: a scandir)
        except OSError:  # e.g. out of descriptors: the sweeper and the next close do it
            pass
        with self._lock:
            stats = self._stats.pop(id(assoc), None)
            if stats is None:  # rejected, closed before association, or not established yet
                self._closed_early.add(assoc)
                return
        self._log_closed(assoc, stats)

    def _log_closed(self, assoc, stats: _AssocStats) -> None:  # type: ignore[no-untyped-def]
        """Count the association closed and give its line."""
        if self.pipeline is not None:
            self.pipeline.association_closed()
        calling = assoc.requestor.ae_title
        seconds = time.monotonic() - stats.started
        state = "released" if assoc.is_released and not assoc.is_aborted else "aborted"
        already = f", {stats.already} already there" if stats.already else ""
        log.info(
            "association from %s (%s) %s: %d stored%s, %d failed, %d bytes, %.2f s",
            safe(calling), _peer(assoc), state, stats.stored, already, stats.failed, stats.nbytes,
            seconds,
            extra={"event": "association", "calling_aet": calling, "peer": _peer(assoc),
                   "state": state, "stored": stats.stored, "already": stats.already,
                   "failed": stats.failed, "bytes": stats.nbytes, "seconds": round(seconds, 3)},
        )


def _peer(assoc) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


#: What an OS error means for the instance, said plainly before the system's words.
_OS_MEANING = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the output file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "a file or folder vanished",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files",
    errno.EIO: "an input/output error on the disk",
}
#: The same for SQLite's words (it gives no errno).
_SQLITE_MEANING = {
    "disk is full": "the disk is full",
    "locked": "another process holds the index",
    "readonly": "the output file system is read-only",
    "disk I/O error": "an input/output error on the disk",
}


def _describe(exc: BaseException) -> str:
    """The reason a failure line gives: what happened, then the system's words.

    >>> _describe(OSError(28, "No space left on device", "/out/x.dcm"))
    'the disk is full (No space left on device): /out/x.dcm'
    >>> _describe(sqlite3.OperationalError("database or disk is full"))
    'the instance index cannot be written: the disk is full (database or disk is full)'
    """
    if isinstance(exc, BrokenProcessPool):
        return "a worker process died while storing it"
    if isinstance(exc, OSError):
        return _describe_os(exc)
    if isinstance(exc, sqlite3.Error):  # from the index, in the worker
        text = str(exc)
        meaning = _sqlite_meaning(text)
        return f"the instance index cannot be written: {meaning} ({text})" if meaning \
            else f"the instance index cannot be written: {text}"
    if isinstance(exc, (StoreError, NotDicomError)):
        text = str(exc)
        cause = exc.__cause__
        if isinstance(cause, OSError) and (meaning := _OS_MEANING.get(cause.errno or 0)) \
                and meaning not in text:
            text += f" ({meaning})"
        elif isinstance(exc, InstanceIndexError) and (meaning := _sqlite_meaning(text)) \
                and meaning not in text:  # SQLite's words, from the worker
            text += f" ({meaning})"
        return text
    return f"{type(exc).__name__}: {exc}"


def _sqlite_meaning(text: str) -> str | None:
    return next((m for key, m in _SQLITE_MEANING.items() if key in text), None)


def _describe_os(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    meaning = _OS_MEANING.get(exc.errno or 0)
    if meaning:
        text = f"{meaning} ({text})"
    if exc.filename:
        text += f": {exc.filename}"
    return text


def _discard_partial_dataset(assoc) -> None:
    """Remove the temporary file of a dataset whose transfer never finished
    (the peer aborted mid-transfer); pynetdicom removes only complete ones."""
    sink = _pynetdicom.partial_dataset_file(assoc)
    if sink is not None and not sink.finished:
        sink.abandon("the association ended before its last fragment", _peer(assoc))

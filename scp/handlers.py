"""pynetdicom event handlers: C-STORE, C-ECHO and the association log line.

Handlers return statuses; no exception ever reaches the network. Each failure
is mapped on purpose to a status the sender understands as "not stored, try
again" (or "this dataset cannot be read").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from pynetdicom import evt

from scp.config import ServeConfig
from scp.errors import LayoutError, NotDicomError, StoreError
from scp.jobs import store_received
from scp.pool import WorkerPool
from scp.report import Status
from scp.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from scp.writer import TMP_DIRNAME, remove_orphans, tmp_dir

__all__ = ["CANNOT_UNDERSTAND", "OUT_OF_RESOURCES", "SUCCESS", "StoreHandlers", "status_for"]

log = logging.getLogger(__name__)

#: Sleep of pynetdicom's network thread between polls (its default: 1 ms).
DUL_POLL_SECONDS = 0.0005


def status_for(exc: BaseException) -> int:
    """The C-STORE status for a failure to store an instance."""
    if isinstance(exc, (NotDicomError, LayoutError)):
        return CANNOT_UNDERSTAND
    return OUT_OF_RESOURCES  # StoreError, OSError, a dead worker, anything else


@dataclass
class _AssocStats:
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    nbytes: int = 0


class StoreHandlers:
    """The handlers of one running server, bound to its pool and config."""

    def __init__(self, pool: WorkerPool, cfg: ServeConfig) -> None:
        self.pool = pool
        self.cfg = cfg
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self.stored = 0
        self.failed = 0

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
        assoc = event.assoc
        calling = assoc.requestor.ae_title
        # get, not setdefault: if the connection already closed, re-adding an
        # entry here would never be removed
        stats = self._stats.get(id(assoc)) or _AssocStats()
        received = str(event.dataset_path)
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        log.debug("received %s from %s; filing it", sop_uid, calling)
        try:
            outcome = self.pool.submit(store_received, received, calling, self.cfg).result()
        except Exception as exc:
            if isinstance(exc, BrokenProcessPool):  # what the dead workers were writing
                self.pool.recover()
                remove_orphans(self.cfg.out / TMP_DIRNAME)
            status = status_for(exc)
            stats.failed += 1
            with self._lock:
                self.failed += 1
            reason = _describe(exc)
            log.error(
                "C-STORE failed from %s (%s): SOP Instance %s: %s -> status 0x%04X",
                calling,
                _peer(assoc),
                sop_uid,
                reason,
                status,
                extra={"event": "store_failed", "calling_aet": calling, "sop_instance": sop_uid,
                       "reason": reason, "status": status},
            )
            return status
        stats.stored += 1
        stats.nbytes += outcome.nbytes
        with self._lock:
            self.stored += 1
        if outcome.reason:
            log.info(
                "%s: %s", outcome.destination, outcome.reason,
                extra={"event": "duplicate", "calling_aet": calling, "sop_instance": sop_uid,
                       "path": outcome.destination, "reason": outcome.reason},
            )
        log.debug(
            "stored %s from %s -> %s (%d bytes, %s)",
            sop_uid, calling, outcome.destination, outcome.nbytes,
            "already there" if outcome.status is Status.ALREADY else "new",
        )
        return SUCCESS

    def on_established(self, event: evt.Event) -> None:
        self._stats[id(event.assoc)] = _AssocStats()
        # pynetdicom's network thread sleeps between polls of the socket and of
        # its outgoing queue; its 1 ms default adds up to ~0.8 ms to every
        # C-STORE round trip (0.8 s per 1000 instances from a sender that waits
        # for each response). 0.5 ms costs ~3 % of a core per idle association.
        event.assoc.dul._run_loop_delay = DUL_POLL_SECONDS
        # pynetdicom writes incoming datasets into the temporary folder before
        # any handler runs; if the output folder was removed or replaced, make
        # it again so this association can store (the failure is logged once
        # per association, with the instances it then cannot store).
        try:
            tmp_dir(self.cfg.out)
        except OSError as exc:
            log.error("cannot create the temporary folder in %s: %s", self.cfg.out, exc.strerror,
                      extra={"event": "output_unwritable", "reason": exc.strerror})

    def on_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        _discard_partial_dataset(assoc)
        stats = self._stats.pop(id(assoc), None)
        if stats is None:  # rejected, or closed before association
            return
        calling = assoc.requestor.ae_title
        seconds = time.monotonic() - stats.started
        state = "aborted" if assoc.is_aborted else "released"
        log.info(
            "association from %s (%s) %s: %d stored, %d failed, %d bytes, %.2f s",
            calling, _peer(assoc), state, stats.stored, stats.failed, stats.nbytes, seconds,
            extra={"event": "association", "calling_aet": calling, "peer": _peer(assoc),
                   "state": state, "stored": stats.stored, "failed": stats.failed,
                   "bytes": stats.nbytes, "seconds": round(seconds, 3)},
        )


def _peer(assoc) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BrokenProcessPool):
        return "a worker process died while storing it"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, (StoreError, NotDicomError, LayoutError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _discard_partial_dataset(assoc) -> None:
    """Remove the temporary file of a dataset whose transfer never finished
    (the peer aborted mid-transfer); pynetdicom removes only complete ones."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    tmp = getattr(message, "_data_set_file", None)
    if tmp is None:
        return
    try:
        tmp.close()
        os.unlink(tmp.name)
    except OSError:
        pass

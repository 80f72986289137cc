"""``sortscp serve``: set up the AE, run it, stop it cleanly.

Stopping (SIGINT, SIGTERM or SIGHUP) closes the listening socket first, lets the
associations in flight finish (bounded by ``drain_timeout``; a second signal
cuts it short), closes the worker pool (killing workers that do not exit, so a
hung one cannot hold the stop), then aborts what is left. A stop takes at most
``drain_timeout`` plus a few seconds, whatever the workers and peers do.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from scp.config import ServeConfig, stop_signals
from scp.errors import InstanceIndexError, SortscpError
from scp.events.manifest import settle_staged_manifests
from scp.events.pipeline import Pipeline
from scp.jobs import header_tags, identity_facts
from scp.net import _pynetdicom, sink
from scp.net.access import ECHO_RESERVE, AccessControl, AllowRule
from scp.net.handlers import StoreHandlers
from scp.net.tls import server_tls_context
from scp.net.transport import start_server
from scp.pool import WorkerPool
from scp.store.index import SqliteIndex, damaged, index_path
from scp.store.instance import open_for_serving
from scp.store.tmp import (
    STATE_DIRNAME,
    TMP_DIRNAME,
    NotOwnFolder,
    ServerRunning,
    SortRunning,
    held_around,
    held_below,
    hold_served,
    holder_text,
    moved_under,
    own_folder,
    remove_orphans,
    take_sort_lock,
)

log = logging.getLogger(__name__)

#: Leftover temporary files older than this are removed when the server starts.
STALE_TMP_SECONDS = 3600
#: How often the temporary area is swept while serving.
SWEEP_SECONDS = 600


#: How often the drain looks at the associations still in flight.
DRAIN_POLL_SECONDS = 0.1
#: After a complete drain, how long idle workers get to exit before they are killed.
POOL_CLOSE_GRACE_SECONDS = 2.0
#: How long a stop waits for pynetdicom to abort the associations left.
AE_SHUTDOWN_SECONDS = 3.0
#: How long a stop waits for aborted associations to log their last line.
FINAL_LINES_SECONDS = 1.0


def _bounded(fn: Callable[[], object], seconds: float, what: str) -> None:
    """Run `fn` in a daemon thread; give up waiting on it after `seconds`
    (a peer that does not read must not hold up the stop)."""
    thread = threading.Thread(target=fn, name="stop", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        log.warning("stopping: gave up %s after %.0f s", what, seconds)


def _in_flight(assoc: object) -> bool:
    """True while an association's connection is open.

    A connection closed before it associated (a port probe, a health check)
    leaves its association thread waiting for the ACSE timeout; there is
    nothing to drain there, and waiting for it would stall every stop.
    """
    dul = getattr(assoc, "dul", None)
    return assoc.is_alive() and dul is not None and dul.is_alive()  # type: ignore[attr-defined]


class ServeError(SortscpError):
    """The server cannot start (folder not writable, port in use ...)."""


def prepare_output(out: Path) -> Path:
    """Create the output folder and its temporary folder; prove we can write there.

    Pynetdicom writes each incoming dataset into the temporary folder, on the
    same file system as the layout, so that the final step is a link, not a copy.
    Refused before anything is made inside another server's (or a sort's)
    output folder: that one's index would not know the files filed here.
    """
    around = held_around(out)
    if around is not None:
        raise ServeError(f"{out} is inside {around[0]}, the output folder of a running sortscp"
                         f"{holder_text(around[1])}: give this server a folder outside it")
    below = held_below(out)
    if below is not None:
        raise ServeError(f"{out} holds {below[0]}, the output folder of a running sortscp"
                         f"{holder_text(below[1])}: give this server a folder that holds no other's")
    moving = moved_under(out)
    if moving is not None:
        raise ServeError(f"{moving}, which would take what this server files from under its index: "
                         "start it when the move has finished, or give it another folder")
    try:
        tmp = own_folder(out, TMP_DIRNAME)
        own_folder(out, STATE_DIRNAME)
        with tempfile.NamedTemporaryFile(dir=tmp, prefix="probe-"):
            pass
    except NotOwnFolder as exc:
        raise ServeError(str(exc)) from None
    except OSError as exc:
        raise ServeError(f"cannot write to the output folder {out}: {exc.strerror}{_who(exc, out)}") from None
    _remove_stale(tmp)
    return tmp


def _who(exc: OSError, out: Path) -> str:
    """For a refused permission, who we are and who owns the folder (in a
    container above all, the two ids an operator must make agree)."""
    if exc.errno not in (errno.EACCES, errno.EPERM):
        return ""
    folder = Path(exc.filename) if exc.filename else out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = folder.stat()
    except OSError:
        return ""
    return (f" (this process runs as uid {os.getuid()}, gid {os.getgid()}; {folder} is owned by "
            f"uid {st.st_uid}, gid {st.st_gid}, mode {stat.filemode(st.st_mode)})")


def _remove_stale(tmp: Path) -> None:
    removed = remove_orphans(tmp, older_than=STALE_TMP_SECONDS)
    if removed:
        log.info("removed %d stale temporary files from %s", removed, tmp)


def build_ae(cfg: ServeConfig) -> AE:
    """An AE that accepts Verification and C-STORE of any storage SOP class.

    pynetdicom's unrestricted storage service accepts every storage SOP class,
    private and retired ones included, with the transfer syntax the sender
    proposes first; the dataset is stored without decoding, so any transfer
    syntax is fine. Datasets are received in chunks to a file, never held in
    memory whole.
    """
    _pynetdicom.configure_storage()
    sink.install(cfg.out, header_tags(cfg))  # a full disk fails the instance, not the association
    ae = AE(ae_title=cfg.aet)
    ae.add_supported_context(Verification)
    # (the limit for senders is AccessControl's; beyond it, a few for a C-ECHO alone)
    ae.maximum_associations = cfg.max_associations + ECHO_RESERVE
    # 0 means no limit to the peer, but what we read has one: announce that
    ae.maximum_pdu_size = cfg.max_pdu or _pynetdicom.UNLIMITED_PDATA_LIMIT
    ae.acse_timeout = cfg.acse_timeout
    ae.dimse_timeout = cfg.dimse_timeout
    ae.network_timeout = cfg.network_timeout
    ae.require_called_aet = cfg.require_called_aet
    return ae


class _Sweeper(threading.Thread):
    """Every `interval` seconds, remove from the temporary area what no one
    will finish: files of processes that are gone, and files untouched for
    :data:`STALE_TMP_SECONDS` (a file being received or filed is written or
    linked within seconds). A safety net: each path removes its own leftovers."""

    def __init__(self, tmp: Path, interval: float = SWEEP_SECONDS) -> None:
        super().__init__(name="sortscp-tmp-sweeper", daemon=True)
        self.tmp = tmp
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                _remove_stale(self.tmp)
            except Exception as exc:  # never let the safety net take the server down
                log.warning("sweeping %s failed: %s", self.tmp, exc)


#: Seconds between two checks that the server's index is still the file at its name.
INDEX_WATCH_SECONDS = 1.0


class _FolderHold:
    """The server's hold on its output folder (:func:`~scp.store.tmp.hold_served`),
    taken again on a folder made at its name when the one held was removed
    (OUT may be removed while serving: it is made again by the next
    instance); else a second server or a sort could start there."""

    def __init__(self, out: Path, fd: int | None) -> None:
        self.out = out
        self.fd = fd
        self._error: str | None = None

    def check(self) -> None:
        if self.fd is None:
            return  # (a file system without locks on folders)
        try:
            now = os.stat(self.out)
        except FileNotFoundError:
            return  # not made again yet
        held = os.fstat(self.fd)
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return
        try:
            new = hold_served(self.out)
        except ServerRunning as exc:
            if str(exc) != self._error:
                self._error = str(exc)
                log.error("the output folder %s was removed and made again while serving, and %s", self.out, exc)
            return
        if new is None:
            return
        os.close(self.fd)
        self.fd = new
        self._error = None
        log.warning("the output folder %s was removed and made again while serving: holding the new one",
                    self.out, extra={"event": "output_remade"})

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _IndexWatch(threading.Thread):
    """Every `interval` seconds, whether the index the server's own connection
    reaches (its events, its settles after a worker died, its clean stop) is
    still the one at its name, readable. Removed or damaged while serving
    (by hand; with ``.sortscp``): rebuilt from the files and opened again
    (:meth:`~scp.store.index.SqliteIndex.repair`), with one WARNING line. The
    workers check before each instance, and wait for this."""

    def __init__(self, index: SqliteIndex, out: Path, interval: float = INDEX_WATCH_SECONDS,
                 hold: _FolderHold | None = None) -> None:
        super().__init__(name="sortscp-index-watch", daemon=True)
        self.index = index
        self.out = out
        self.hold = hold  #: checked first, each round
        self.interval = interval
        self.stopped = threading.Event()
        self._error: str | None = None

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                if self.hold is not None:
                    self.hold.check()
                self.check()
            except Exception as exc:  # (a full disk, a folder that cannot be made): next round
                reason = f"{type(exc).__name__}: {exc}"
                if reason != self._error:
                    self._error = reason
                    log.error("the instance index of %s cannot be rebuilt or opened again (%s); "
                              "trying again every %g s", self.out, reason, self.interval)

    def check(self) -> str | None:
        """One round; what was done (None: nothing was needed)."""
        moved = self.index.moved_away()
        if moved is None and self.index.readable():
            return None  # (through its own connection: no file opened each second)
        why = damaged(self.out) if moved != "replaced" else None
        if moved is None and why is None:
            return None
        if why is not None:
            summary = self.index.repair(identity_facts)
        else:
            summary = None
            self.index.reopen()
        self.index.mark_running()
        self._error = None
        done = (f"rebuilt from the files ({summary.instances} instances)" if summary is not None
                else "opened again (a worker rebuilt it, or another file took its name)")
        log.warning("the instance index %s was %s while serving: %s", index_path(self.out),
                    why or moved, done, extra={"event": "index_rebuilt", "reason": why or moved})
        return done


def _open_index(out: Path) -> tuple[SqliteIndex, int | None]:
    """The instance index of `out`, rebuilt if missing or behind, settled;
    and the server's hold on `out` (:func:`~scp.store.tmp.hold_served`, to
    keep open while serving).

    Under sort's lock of `out`: a sort still filling the folder would place
    files after the index was built from it (even a first one, where no index
    held the sort off), and a sort started meanwhile sees the index and is
    refused."""
    try:
        sort_lock = take_sort_lock(out)
    except SortRunning as exc:
        raise ServeError(f"{exc}; start the server once it has finished") from None
    except OSError as exc:
        raise ServeError(f"cannot open the instance index of {out}: {exc}") from None
    held = None
    try:
        held = hold_served(out)
        index, rebuilt, removed = open_for_serving(out, identity_facts)
    except ServerRunning as exc:
        raise ServeError(str(exc)) from None
    except (InstanceIndexError, sqlite3.Error, OSError) as exc:  # e.g. "database or disk is full"
        if held is not None:
            os.close(held)
        raise ServeError(f"cannot open the instance index of {out}: {exc}") from None
    finally:
        os.close(sort_lock)
    if rebuilt:
        if rebuilt == "missing":  # a new output folder, or one from before the index
            log.info("created the instance index %s from the files there", index_path(out))
        else:
            log.info("instance index of %s rebuilt from the files (%s)", out, rebuilt)
    if removed:
        log.info("removed %d superseded files left by a process that died", removed)
    return index, held


#: Signals that logrotate's ``postrotate`` and other habits send to ask a daemon to
#: reopen its log files: there is nothing to reopen (the log is stderr, the
#: events file is reopened when it was rotated), so each is one line, not a death.
NOTED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def _noted(signum: int, _frame: object) -> None:
    log.info("%s received: nothing to do (the log goes to stderr; the events file is reopened once it "
             "is rotated); SIGTERM stops the server", signal.Signals(signum).name)


class Server:
    """A running Storage SCP: ``start()``, then ``stop()`` (or ``run()`` for both)."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.pool: WorkerPool | None = None
        self.ae: AE | None = None
        self.server: ThreadedAssociationServer | None = None
        self.handlers: StoreHandlers | None = None
        self.index: SqliteIndex | None = None
        self._sweeper: _Sweeper | None = None
        self._index_watch: _IndexWatch | None = None
        self._held: _FolderHold | None = None  #: the hold on the output folder
        self.pipeline: Pipeline | None = None
        self._stop = threading.Event()
        self._force = threading.Event()
        self._served = False  # start() completed: only then is there a "stopped" to report
        self._noted: list[signal.Signals] = []  #: NOTED_SIGNALS ignored by run() while starting

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return self.server.server_address[:2]

    def _completed_revision(self, kind: str, uid: str) -> int | None:
        """The revision at which the index has series (or study) `uid` complete."""
        assert self.index is not None
        state = self.index.series_state(uid) if kind == "series" else self.index.study_state(uid)
        return state.completed_revision if state is not None else None

    def start(self) -> None:
        cfg = self.cfg
        _pynetdicom.check()
        _pynetdicom.install_network_threads()
        access = AccessControl(
            [AllowRule.parse(rule) for rule in cfg.allow_aet],
            called_aet=cfg.aet if cfg.require_called_aet else None, limit=cfg.max_associations,
        )
        tls = server_tls_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.tls_cert else None
        prepare_output(cfg.out)
        self.index, held = _open_index(cfg.out)
        self._held = _FolderHold(cfg.out, held)
        published, partial = settle_staged_manifests(cfg.out, self._completed_revision)
        if published:
            log.info("put %d manifests at their names: a stop came between their completion and that", published)
        if partial:
            log.info("removed %d manifests a killed write left half-written", partial)
        self._sweeper = _Sweeper(cfg.out / TMP_DIRNAME)
        self._sweeper.start()
        self._index_watch = _IndexWatch(self.index, cfg.out, hold=self._held)
        self._index_watch.start()
        self.pool = WorkerPool(cfg.workers)
        self.pool.warm_up()
        self.handlers = StoreHandlers(self.pool, cfg, self.index)
        # events share the server's index: started after it is open, stopped before its clean close
        self.pipeline = Pipeline(cfg, self.index)
        try:
            self.pipeline.start()
        except OSError as exc:
            self.pipeline.stop()
            self.pool.close()
            self.index.close(clean=True)
            raise ServeError(exc.strerror or str(exc)) from None
        self.handlers.pipeline = self.pipeline
        # Every process of ours is started (they keep these ignored): one line from now
        # on, before the port listens (a signal sent once it accepts gets the line).
        for s in self._noted:
            signal.signal(s, _noted)
        self.ae = build_ae(cfg)
        try:
            self.server = start_server(
                self.ae, (cfg.host, cfg.port), self.handlers.bindings() + access.bindings(), tls
            )
        except OSError as exc:
            self.pipeline.stop()
            self.pool.close()
            self.index.close(clean=True)
            raise ServeError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from None
        host, port = self.address
        log.info(
            "listening on %s:%d%s as %s, filing into %s with %d workers",
            host, port, " (TLS)" if tls else "", cfg.aet, cfg.out.resolve(), self.pool.workers,
        )
        if access.rules:
            log.info("accepting calling AE titles: %s", ", ".join(map(str, access.rules)))
        self._served = True

    def request_stop(self, *_: object) -> None:
        """Ask the server to stop; asked again while stopping, stop at once
        (safe to call from a signal handler)."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        """Stop listening, drain in-flight associations (bounded, cut short by a
        second signal), close the worker pool (bounded, whatever the workers
        do), then abort what is left."""
        active: list = []
        threads: list = []
        if self.server is not None:
            self.server.shutdown()  # closes the listening socket; associations go on
            threads = list(self.server.active_associations)
            active = [a for a in threads if _in_flight(a)]
            if active:
                log.info(
                    "stopping: waiting up to %.0f s for %d association(s) in flight",
                    self.cfg.drain_timeout, len(active),
                )
            deadline = time.monotonic() + self.cfg.drain_timeout
            while active and not self._force.is_set() \
                    and (remaining := deadline - time.monotonic()) > 0:
                active[0].join(min(DRAIN_POLL_SECONDS, remaining))
                active = [a for a in active if _in_flight(a)]
            if self._force.is_set():
                log.warning("stopping now (second signal): %d association(s) cut off", len(active))
            elif active:
                log.warning("aborting %d association(s) still open after the drain", len(active))
        if self.pool is not None:
            # Idle workers exit at once; a hung one, or one whose association is
            # being cut off, is killed: its instance was never answered Success.
            self.pool.close(grace=0.0 if active else POOL_CLOSE_GRACE_SECONDS)
        if self.ae is not None:
            _bounded(self.ae.shutdown, AE_SHUTDOWN_SECONDS, "aborting the associations left")
        deadline = time.monotonic() + FINAL_LINES_SECONDS  # their last log lines come first
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.pipeline is not None:  # after the last instances: their events, bounded; before the index closes
            self.pipeline.stop()
            self.pipeline = None
        if self._sweeper is not None:
            self._sweeper.stopped.set()
        if self._index_watch is not None:
            self._index_watch.stopped.set()
            self._index_watch.join(INDEX_WATCH_SECONDS + 5)
        if self.handlers is not None:
            self.handlers.close()
        if self.index is not None:
            try:
                self.index.close(clean=True)  # after the workers: they had it open
            except (InstanceIndexError, sqlite3.Error, OSError) as exc:  # a full disk
                log.warning("cannot record the clean stop in the instance index (%s): the next start "
                            "checks it", exc)
            self.index = None
        if self._held is not None:
            self._held.close()
            self._held = None
        if self.handlers is not None and self._served:
            h = self.handlers
            already = f", {h.already} already there" if h.already else ""  # (as each association's line)
            log.info("stopped: %d instances stored%s, %d failed", h.stored, already, h.failed)

    def run(self, on_ready: Callable[[Server], None] | None = None) -> int:
        """Start, serve until SIGINT, SIGTERM or SIGHUP, stop. Returns the exit code."""
        # Handlers first: a supervisor may send SIGTERM as soon as the port accepts;
        # they stay through the stop, where a second signal cuts the drain short.
        previous = {s: signal.signal(s, self.request_stop) for s in stop_signals()}
        # Ignored while the processes are started, which keep that (the forkserver and its
        # workers, the resource tracker, the hook helper: ``systemctl kill -s USR1`` signals
        # them all); then one line in this process. (Hooks get the default back.)
        self._noted = [s for s in NOTED_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
        previous.update((s, signal.signal(s, signal.SIG_IGN)) for s in self._noted)
        try:
            try:
                self.start()  # (which gives them their line once its processes are started)
                if on_ready:
                    on_ready(self)
                self.wait()
            finally:
                self.stop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0

"""The events pipeline of one server: stored events, completion watcher, hooks, sinks, metrics.

The C-STORE handler calls :meth:`Pipeline.stored` / :meth:`Pipeline.failed`
after it knows the outcome; both only update counters and put a small tuple
on a bounded queue (``put_nowait``), so nothing here can delay a response.
Everything else runs in threads of its own:

* the **dispatcher** takes stored events in batches (woken by one, it waits
  :data:`DISPATCH_BATCH_SECONDS` for more), reads each instance's row from the
  index (by SOPInstanceUID: the study/series UIDs, patient ...),
  writes the ``stored`` events (``--events``, ``--webhook``) and queues the
  ``--on-stored`` hooks;
* the **watcher** polls :meth:`~scp.store.index.SqliteIndex.stable_series`
  and ``stable_studies`` (cheap: a partial index holds only the open ones);
  for each it reads the series' committed rows (serve's commit writes
  them), hashes their files, writes the manifest, then flips the completion in the index
  (:meth:`~scp.store.index.SqliteIndex.mark_series_complete` with the
  revision and arrival count it read) and fires the event and the hook only
  if that flip was its own.

Exactly once: the completion state lives in the index, not in memory. The
flip is one conditional UPDATE (``revision = r AND completed_revision < r AND
arrivals = n``), so of all pollers, before or after any restart, one caller
per revision sees it succeed, and only that caller fires. A series still
arriving when the server stops stays open in the index and completes after
the restart; an instance arriving after completion bumps the revision, so
the series completes again with revision + 1. The manifest is written before
the flip, so an event never names a manifest that is not there. What is not
covered: a crash (SIGKILL, power) in the milliseconds between the flip and
the start of the hook loses that one hook run (at most once, never twice).

The pipeline uses the server's open index when given one; else it opens its
own connection to ``OUT/.sortscp/index.sqlite`` once the file exists (until
then the watcher waits). Start it after the server's ``open_index`` (a
rebuild needs the index closed everywhere) and stop it before the server's
``close(clean=True)`` (which needs no other connection open).
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scp.config import ServeConfig
from scp.events.hooks import HookResult, HookRunner, command_argv
from scp.events.manifest import (
    discard_staged,
    file_digests,
    publish_json,
    series_manifest,
    series_manifest_path,
    stage_json,
    study_manifest,
    study_manifest_path,
)
from scp.events.metrics import Metrics
from scp.events.sinks import EventLog, Webhook, event_record
from scp.log import DropLog, safe
from scp.store.index import InstanceIndexError, SeriesState, SqliteIndex, StudyState, index_path

log = logging.getLogger(__name__)

#: Stored events waiting for the dispatcher; more are dropped (logged, counted).
QUEUE_SIZE = 10_000
#: Seconds the dispatcher, woken by a stored event, waits for more before it
#: handles them together (the delay of a stored event and its hook; see _dispatcher).
DISPATCH_BATCH_SECONDS = 0.05
#: Bound of :meth:`Pipeline.stop` for each stage (events, hooks, webhook).
STOP_SECONDS = 5.0
#: Why a stored event is dropped.
_QUEUE_FULL = f"{QUEUE_SIZE} waiting (hooks or event sinks too slow)"

#: Facts of an event that are not passed to hooks (lists, nested objects).
_NOT_ENV = {"instances", "series", "calling_aets"}


def hook_env(record: dict[str, Any]) -> dict[str, str]:
    """The ``SORTSCP_*`` variables of an event record; an unknown fact is set,
    empty (a hook under ``set -u`` can test it).

    >>> hook_env({"event": "stored", "path": "a/b.dcm", "size": 12, "study_date": None})
    {'SORTSCP_EVENT': 'stored', 'SORTSCP_PATH': 'a/b.dcm', 'SORTSCP_SIZE': '12', 'SORTSCP_STUDY_DATE': ''}
    """
    return {
        f"SORTSCP_{k.upper()}": "" if v is None else str(v).replace("\0", "")
        for k, v in record.items() if k not in _NOT_ENV
    }


@dataclass(frozen=True)
class _Stored:
    calling_aet: str
    sop_instance_uid: str
    destination: str
    nbytes: int
    sop_class_uid: str | None
    transfer_syntax_uid: str | None
    facts: Mapping[str, Any] | None = None  #: as its worker committed them (else read from the index)
    placement: str | None = None  #: what the store did (a Placement value)


class Pipeline:
    """Events, hooks and metrics of one server: :meth:`start`, then :meth:`stop`."""

    def __init__(self, cfg: ServeConfig, index: SqliteIndex | None = None) -> None:
        """`index`: the server's own open index to share (the pipeline does not
        close it); None: the pipeline opens its own connection once the file exists."""
        self.cfg = cfg
        self.out = Path(cfg.out)
        #: OUT resolved once (each stored event's absolute path is built on it: a
        #: resolve per event was two thirds of the dispatcher's work)
        self._out_abs = str(self.out.resolve())
        self.metrics = Metrics(self.out)
        self.metrics_address: tuple[str, int] | None = None
        self._argv = {
            name: command_argv(cmd, cfg.hook_shell)
            for name, cmd in (("on_stored", cfg.on_stored), ("on_series_complete", cfg.on_series_complete),
                              ("on_study_complete", cfg.on_study_complete)) if cmd
        }
        self.events: EventLog | None = None
        self.webhook: Webhook | None = None
        self.hooks: HookRunner | None = None
        #: stored events; a threading.Event is a watcher's marker (see _deliver_stored); None ends
        self._queue: queue.Queue[_Stored | threading.Event | None] = queue.Queue(QUEUE_SIZE)
        self._hurry = threading.Event()  #: ends the dispatcher's wait for more (a stop, a marker)
        self._drops = DropLog()  #: of stored events, when the queue is full
        self._dispatch = bool(self._argv.get("on_stored") or cfg.events or cfg.webhook)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._index: SqliteIndex | None = index
        self._own_index = index is None
        self._index_lock = threading.Lock()
        self._last_error = ""
        self._failing: dict[tuple[str, str], str] = {}  #: (what, uid) -> why it cannot complete yet
        self.poll_seconds = max(0.05, min(1.0, min(cfg.series_stable_seconds, cfg.study_stable_seconds) / 4))

    # ---- life cycle

    def start(self) -> None:
        cfg = self.cfg
        if cfg.metrics_port is not None:
            host = cfg.metrics_host or cfg.host
            try:
                self.metrics_address = self.metrics.serve(host, cfg.metrics_port)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot serve metrics on {host}:{cfg.metrics_port}: {exc.strerror}") from None
            log.info("metrics on http://%s:%d/metrics", *self.metrics_address)
        if cfg.events:
            try:
                self.events = EventLog(cfg.events)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot open the events file {cfg.events}: {exc.strerror}") from None
        if cfg.webhook:
            self.webhook = Webhook(cfg.webhook, on_drop=lambda why: self.metrics.webhook_dropped.inc(),
                                   on_post=self.metrics.webhook_posts.inc)
        if self._argv:
            self.hooks = HookRunner(cfg.hook_concurrency, cfg.hook_timeout, cwd=str(self.out),
                                    on_result=self._hook_done,
                                    on_drop=lambda hook, subject, why: self.metrics.hook_dropped.labels(hook).inc())
        if self._dispatch:
            self._spawn(self._dispatcher, "sortscp-events")
        self._spawn(self._watcher, "sortscp-watcher")

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop watching; deliver what is queued, all of it bounded by `timeout`
        s together (and the few seconds it takes to kill hooks still running),
        whatever hangs: a hook, the webhook, the events file.
        Once: a server that failed to start stops it again."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._hurry.set()
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if self._dispatch and self._threads:  # (none if the start failed first)
            try:
                self._queue.put(None, timeout=left())
            except queue.Full:
                pass
        for t in self._threads:
            t.join(left())
        self._drops.flush(log, "stored events", extra={"event": "events_dropped"})
        waiting = self._queue.qsize()
        if waiting:
            log.warning("stopping: %d stored event(s) not delivered", waiting)
        if self.hooks is not None:
            self.hooks.stop(left())
        if self.webhook is not None:
            self.webhook.stop(left())
        if self.events is not None:
            self.events.close(max(left(), 0.5))
        self.metrics.close()
        with self._index_lock:
            if self._index is not None and self._own_index:
                self._index.close()
            self._index = None

    # ---- called by the handlers (never blocks)

    def stored(self, calling_aet: str, sop_instance_uid: str, destination: str, nbytes: int, *,
               sop_class_uid: str | None = None, transfer_syntax_uid: str | None = None,
               seconds: float | None = None, facts: Mapping[str, Any] | None = None,
               placement: str | None = None) -> None:
        """An instance was committed at `destination` (relative to OUT) and answered Success;
        `facts`: its index facts as committed (None: the stored event reads them from the index);
        `placement`: what the store did there (a new file, a replacement, the same bytes again ...)."""
        self.metrics.stored(calling_aet, nbytes, seconds)
        if not self._dispatch or self._stop.is_set():
            return
        try:
            self._queue.put_nowait(_Stored(calling_aet, sop_instance_uid, destination, nbytes,
                                           sop_class_uid, transfer_syntax_uid, facts, placement or None))
        except queue.Full:
            self.metrics.events_dropped.inc()
            self._drops.warn(log, "dropped a stored event: %s", _QUEUE_FULL,
                             extra={"event": "events_dropped", "reason": _QUEUE_FULL})

    def failed(self, calling_aet: str, status: int, seconds: float | None = None) -> None:
        self.metrics.failed(calling_aet, status, seconds)

    def association_opened(self) -> None:
        self.metrics.associations.inc()
        self.metrics.associations_active.inc()

    def association_closed(self) -> None:
        self.metrics.associations_active.dec()

    # ---- the index

    def index(self) -> SqliteIndex | None:
        """Our connection to the index, opened once the file exists (None until then)."""
        with self._index_lock:
            if self._index is None and self._own_index and index_path(self.out).is_file():
                try:
                    self._index = SqliteIndex(self.out)
                except InstanceIndexError as exc:
                    self._note_error(f"cannot open the index yet: {exc}")
            return self._index

    def _note_error(self, text: str) -> None:
        if text != self._last_error:
            self._last_error = text
            log.warning("%s", text)

    # ---- emitting

    def _emit(self, *records: dict[str, Any]) -> None:
        """Write `records` to the events file (in one write) and the webhook.
        Neither blocks nor raises (both only queue): a series flipped complete
        always gets its hook."""
        if self.events is not None:
            self.events.write_many(list(records))
        if self.webhook is not None:
            for record in records:
                self.webhook.send(record)

    def _run_hook(self, hook: str, record: dict[str, Any], subject: str) -> None:
        argv = self._argv.get(hook)
        if argv is None or self.hooks is None:
            return
        self.hooks.submit(hook, argv, hook_env(record), subject)

    def _hook_done(self, result: HookResult, subject: str) -> None:
        self.metrics.hook_runs.labels(result.hook).inc()
        if result.ok:
            return
        self.metrics.hook_failures.labels(result.hook).inc()
        self._emit(event_record(
            "hook_failed", hook=result.hook, command=list(result.argv), subject=subject,
            returncode=result.returncode, timed_out=result.timed_out, error=result.error or None,
            seconds=round(result.seconds, 3), stderr_tail=result.stderr_tail[-500:] or None,
        ))

    # ---- dispatcher

    def _dispatcher(self) -> None:
        """Woken by a stored event, wait DISPATCH_BATCH_SECONDS for more, then handle
        all that came: one wake-up, one write to the events file and one to the
        hook helper for all of them (a thread's wake-up costs the server more
        CPU than an event's own work, and it competes with receiving for the GIL)."""
        while True:
            batch = [self._queue.get()]
            if batch[0] is not None and not self._stop.is_set():
                self._hurry.wait(DISPATCH_BATCH_SECONDS)  # a stop or a marker ends the wait
                self._hurry.clear()
            while batch[-1] is not None:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            records = []
            markers = []
            try:
                index = self.index()  # (once a batch)
            except Exception:  # never lose the thread
                log.exception("opening the index for stored events")
                index = None
            for item in batch:
                if isinstance(item, threading.Event):
                    markers.append(item)
                    continue
                if item is None:
                    continue
                try:
                    records.append((item.sop_instance_uid, self._stored_record(item, index)))
                except Exception:  # never lose the thread
                    log.exception("stored event of %s", item.sop_instance_uid)
            try:
                self._emit_stored(records)
            except Exception:
                log.exception("stored events")
            for marker in markers:
                marker.set()
            if batch[-1] is None:
                return

    def _deliver_stored(self) -> None:
        """Before a completion event: let the dispatcher deliver the stored events
        queued so far, so that an instance's `stored` always comes before the
        `series_complete` of its series (bounded wait; nothing to wait for at a stop)."""
        if not self._dispatch or self._stop.is_set():
            return
        marker = threading.Event()
        try:
            self._queue.put(marker, timeout=STOP_SECONDS)
        except queue.Full:
            return
        self._hurry.set()
        marker.wait(STOP_SECONDS)

    def _stored_record(self, item: _Stored, index: SqliteIndex | None) -> dict[str, Any]:
        # Its own facts, not the index row's: by the time this runs (a batch, up to
        # 50 ms later), another version of the instance may have replaced the row.
        facts: Mapping[str, Any] = item.facts or {}
        if item.facts is None and index is not None:
            try:
                row = index.lookup(item.sop_instance_uid)
            except InstanceIndexError as exc:
                row = None
                self._note_error(f"index lookup failed: {exc}")
            if row is not None and row.path == item.destination:
                facts = row.facts()
        return event_record(
            "stored", path=item.destination, abspath=os.path.join(self._out_abs, item.destination),
            placement=item.placement,
            out=self._out_abs, calling_aet=item.calling_aet, sop_instance_uid=item.sop_instance_uid,
            sop_class_uid=facts.get("sop_class_uid") or item.sop_class_uid,
            transfer_syntax_uid=facts.get("transfer_syntax_uid") or item.transfer_syntax_uid,
            series_instance_uid=facts.get("series_instance_uid"), study_instance_uid=facts.get("study_instance_uid"),
            patient_id=facts.get("patient_id"), patient_name=facts.get("patient_name"),
            study_date=facts.get("study_date"), modality=facts.get("modality"),
            size=facts.get("size") or item.nbytes,  # (no digest: the manifest computes it)
        )

    def _emit_stored(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        if not records:
            return
        self._emit(*(r for _, r in records))
        argv = self._argv.get("on_stored")
        if argv is not None and self.hooks is not None:
            self.hooks.submit_all([("on_stored", argv, hook_env(r), uid) for uid, r in records])

    # ---- watcher

    def _watcher(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception as exc:  # the index may be busy or being rebuilt: try again
                self._note_error(f"completion watcher: {type(exc).__name__}: {exc}")

    def poll(self) -> tuple[int, int]:
        """One round: complete every stable series, then every stable study
        whose series are all complete. Returns how many this call completed."""
        index = self.index()
        if index is None:
            return 0, 0
        n_series = n_studies = 0
        for s in index.stable_series(self.cfg.series_stable_seconds):
            if self._stop.is_set():
                break
            n_series += self._contained("series", s.series_instance_uid, self._complete_series, index, s)
        for t in index.stable_studies(self.cfg.study_stable_seconds):
            if self._stop.is_set():
                break
            n_studies += self._contained("study", t.study_instance_uid, self._complete_study, index, t)
        return n_series, n_studies

    def _contained(self, what: str, uid: str, complete: Callable[..., bool], *args: Any) -> bool:
        """`complete(*args)`, its failure kept to that one series or study (the
        others still complete; it is tried again each round) and logged once
        per reason, not every round."""
        try:
            done = complete(*args)
        except (OSError, InstanceIndexError) as exc:  # e.g. its manifest cannot be written
            reason = str(exc)
            if isinstance(exc, OSError) and exc.strerror:  # (not the random name of a temporary file)
                reason = f"{exc.strerror}: {exc.filename2 or os.path.dirname(str(exc.filename or ''))}"
            if self._failing.get((what, uid)) != reason:
                self._failing[(what, uid)] = reason
                log.warning("cannot complete %s %s yet (tried again every %g s): %s", what, safe(uid),
                            self.poll_seconds, safe(reason),
                            extra={"event": f"{what}_complete_failed", "reason": reason})
            return False
        self._failing.pop((what, uid), None)
        return done

    def _emptied(self, index: SqliteIndex, what: str, uid: str, revision: int, manifest: Path,
                 was_complete: bool, **facts: Any) -> bool:
        """A series or study left with no instance (each was sent again as part
        of another series or study): its manifest, which names files that are
        gone, is removed first, then its row. A pipeline that took up its
        completion hears of it (``series_emptied``/``study_emptied``); no hook runs."""
        manifest.unlink(missing_ok=True)
        forget = index.forget_empty_series if what == "series" else index.forget_empty_study
        if not forget(uid, revision) or not was_complete:
            return False  # something arrived meanwhile (it completes again), or it never completed
        log.info("%s %s emptied: its instances were sent again as part of others; its manifest is removed",
                 what, safe(uid), extra={"event": f"{what}_emptied", f"{what}_instance_uid": uid})
        self._deliver_stored()
        self._emit(event_record(f"{what}_emptied", **{f"{what}_instance_uid": uid}, revision=revision,
                                manifest=str(manifest.resolve()), out=self._out_abs, **facts))
        return False

    def _complete_series(self, index: SqliteIndex, s: SeriesState) -> bool:
        if s.instances <= 0:
            return self._emptied(index, "series", s.series_instance_uid, s.revision,
                                 series_manifest_path(self.out, s.series_instance_uid), s.completed_revision > 0,
                                 study_instance_uid=s.study_instance_uid)
        rows = index.instances_of_series(s.series_instance_uid)
        manifest = series_manifest(s, rows, file_digests(self.out, rows))
        path = series_manifest_path(self.out, s.series_instance_uid)
        if not self._flipped(path, manifest, lambda: index.mark_series_complete(
                s.series_instance_uid, s.revision, arrivals=s.arrivals)):
            return False  # something arrived meanwhile, or another poller flipped it
        self.metrics.series_completed.inc()
        log.info(
            "series %s complete: %d instances in %s (revision %d)",
            s.series_instance_uid, len(rows), s.folder, s.revision,
            extra={"event": "series_complete", "series_instance_uid": s.series_instance_uid,
                   "instances": len(rows), "folder": s.folder, "revision": s.revision},
        )
        record = event_record(
            "series_complete", series_instance_uid=s.series_instance_uid, study_instance_uid=s.study_instance_uid,
            patient_id=s.patient_id, patient_name=s.patient_name, study_date=s.study_date, modality=s.modality,
            series_description=s.series_description, series_number=s.series_number,
            revision=s.revision, instance_count=len(rows), series_folder=s.folder,
            manifest=str(path.resolve()), out=self._out_abs, calling_aets=manifest["calling_aets"],
        )
        self._deliver_stored()
        self._emit(record)
        self._run_hook("on_series_complete", record, s.series_instance_uid)
        return True

    @staticmethod
    def _flipped(path: Path, manifest: dict, flip: Callable[[], bool]) -> bool:
        """Stage the manifest, `flip` the completion in the index, and only
        then put the manifest at its name, so that a manifest there always
        tells a completion that happened (a rebuild of the index takes it
        for one). False, with the staged file removed, if another flipped
        it or something arrived meanwhile. One killed between the flip and
        the rename is put at its name by the next start
        (:func:`~scp.events.manifest.settle_staged_manifests`)."""
        staged = stage_json(path, manifest)
        try:
            if path.is_dir() and not path.is_symlink():  # (its name cannot be given: not flipped, tried again)
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            flipped = flip()
        except BaseException:
            discard_staged(staged)
            raise
        if not flipped:
            discard_staged(staged)
            return False
        try:
            publish_json(staged, path)
        except OSError as exc:  # (flipped: the event goes out; the next start renames it)
            log.error("manifest %s not put at its name: %s (the next start does it)",
                      safe(str(path)), safe(str(exc.strerror or exc)))
        return True

    def _complete_study(self, index: SqliteIndex, t: StudyState) -> bool:
        if t.instances <= 0:
            return self._emptied(index, "study", t.study_instance_uid, t.revision,
                                 study_manifest_path(self.out, t.study_instance_uid), t.completed_revision > 0)
        series = index.series_list(t.study_instance_uid)
        if not series or not all(s.complete for s in series):
            return False  # its series complete first (the next round)
        parts = [(s, index.instances_of_series(s.series_instance_uid, t.study_instance_uid)) for s in series]
        manifest = study_manifest(t, parts, self.out)
        path = study_manifest_path(self.out, t.study_instance_uid)
        if not self._flipped(path, manifest, lambda: index.mark_study_complete(
                t.study_instance_uid, t.revision, arrivals=t.arrivals)):
            return False
        self.metrics.studies_completed.inc()
        log.info(
            "study %s complete: %d series, %d instances (revision %d)",
            t.study_instance_uid, len(series), manifest["instance_count"], t.revision,
            extra={"event": "study_complete", "study_instance_uid": t.study_instance_uid,
                   "series": len(series), "instances": manifest["instance_count"], "revision": t.revision},
        )
        record = event_record(
            "study_complete", study_instance_uid=t.study_instance_uid, patient_id=t.patient_id,
            patient_name=t.patient_name, study_date=t.study_date, revision=t.revision,
            series_count=len(series), instance_count=manifest["instance_count"],
            manifest=str(path.resolve()), out=self._out_abs, calling_aets=manifest["calling_aets"],
        )
        self._deliver_stored()
        self._emit(record)
        self._run_hook("on_study_complete", record, t.study_instance_uid)
        return True


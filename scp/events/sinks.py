"""Where events go for machines: a JSON-lines file (``--events``) and a webhook (``--webhook``).

Every event is one JSON object with at least ``event`` (``stored``,
``series_complete``, ``study_complete``, ``hook_failed``) and ``time`` (ISO
8601, UTC). The file gets one line per event, flushed; the webhook gets the
same object as the body of a POST (``Content-Type: application/json``), from
a thread of its own with a bounded queue: a slow or dead URL only ever drops
events (each logged and counted), it never slows receiving.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import queue
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO, Any

from scp.log import DropLog

log = logging.getLogger(__name__)

#: Seconds one POST may take.
WEBHOOK_TIMEOUT = 5.0
#: Attempts per event, and the pause before the 2nd, 3rd ... (doubling).
WEBHOOK_ATTEMPTS = 3
WEBHOOK_BACKOFF = 0.5
#: Events waiting for the webhook; more are dropped.
WEBHOOK_QUEUE = 10_000
#: Writes (each of one or more events) waiting for the events file; more are dropped.
EVENTS_QUEUE = 10_000


def event_record(event: str, **facts: Any) -> dict[str, Any]:
    """An event as its JSON object: ``event``, ``time``, then the facts; one
    that is unknown (the instance has no StudyDate ...) is null, never left
    out, so every event of a kind has the same keys.

    >>> r = event_record("stored", path="a/b.dcm", size=None)
    >>> r["event"], r["path"], r["size"]
    ('stored', 'a/b.dcm', None)
    """
    record: dict[str, Any] = {"event": event, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
    record.update(facts)
    return record


class EventLog:
    """Appends one JSON line per event to a file (or stdout for ``-``), flushed.

    The writes are made by a thread of its own, from a bounded queue: a pipe
    or FIFO that nobody reads any more (a stuck log shipper), or a file on a
    hung disk, only ever drops events (logged, a line a second at most, with
    the count), never holds up the completion of series or the stop. A FIFO is
    opened without waiting for its reader: none is an error at the start.

    A regular file that was renamed or removed (logrotate, in its default
    ``create`` mode) is opened again under its name before the next write, as
    :class:`logging.handlers.WatchedFileHandler` does; ``copytruncate`` works
    as well, since the file is written with ``O_APPEND``.
    """

    def __init__(self, target: str, *, queue_size: int = EVENTS_QUEUE) -> None:
        self.target = target
        if target == "-":
            if sys.stdout is None:
                raise OSError(errno.EBADF, "standard output is closed")
            self._file: IO[str] | io.FileIO = sys.stdout
        else:
            self._file = _open_for_append(target)
        self._watched = self._identity() if self._file is not sys.stdout else None
        self._drop_log = DropLog()
        self._queue: queue.Queue[tuple[str, int] | None] = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._work, name="sortscp-events-file", daemon=True)
        self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        self.write_many([record])

    def write_many(self, records: list[dict[str, Any]]) -> None:
        """Queue one line per record, written in one write; never blocks."""
        text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
        try:
            self._queue.put_nowait((text, len(records)))
        except queue.Full:
            self._dropped(len(records), f"{self._queue.maxsize} writes already waiting")

    def _dropped(self, count: int, why: str) -> None:
        self._drop_log.warn(log, "cannot write %d event(s) to %s: %s", count, self.target, why,
                            extra={"event": "events_dropped", "target": self.target, "reason": why})

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            text, count = item
            try:
                if self._watched is not None:
                    self._reopen_if_rotated()
                if isinstance(self._file, io.FileIO):
                    _append_whole(self._file, text.encode("utf-8"))
                else:
                    self._file.write(text)
                    self._file.flush()
            except (OSError, ValueError) as exc:  # a full disk, a closed pipe
                self._dropped(count, str(exc))

    def _identity(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the open file if it is a regular file (the one
        kind that is rotated), else None."""
        st = os.fstat(self._file.fileno())
        return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None

    def _reopen_if_rotated(self) -> None:
        try:
            st = os.stat(self.target)
            if (st.st_dev, st.st_ino) == self._watched:
                return
        except FileNotFoundError:
            pass
        new = _open_for_append(self.target)  # an error: these events are dropped, logged
        old, self._file = self._file, new
        self._watched = self._identity()
        try:
            old.close()
        except OSError:
            pass
        log.info("reopened %s (it was renamed or removed)", self.target,
                 extra={"event": "events_reopened", "target": self.target})

    def close(self, timeout: float = 1.0) -> None:
        """Write what is queued for up to `timeout` s; then give up on the rest (one line)."""
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._drop_log.flush(log, f"events to {self.target}", extra={"event": "events_dropped"})
        if self._thread.is_alive():  # stuck in a write: leave it (a daemon) and its file
            left = sum(item[1] for item in list(self._queue.queue) if item is not None)
            log.warning("stopping: %s does not take events; %d event(s) not written", self.target, left,
                        extra={"event": "events_dropped", "target": self.target, "count": left})
            return
        if self._file is not sys.stdout:
            try:
                self._file.close()
            except OSError as exc:
                log.warning("closing %s: %s", self.target, exc)


def _append_whole(f: io.FileIO, data: bytes) -> None:
    """Append `data` (whole lines) to `f`, or nothing: a write that fails part
    way (the disk filled up) is cut back off a regular file, so no torn line
    is left for a reader's JSON parser, nor glued to the next one."""
    fd = f.fileno()
    st = os.fstat(fd)
    start = st.st_size if stat.S_ISREG(st.st_mode) else None
    view = memoryview(data)
    try:
        while view:
            n = f.write(view)
            if not n:  # (a blocking file never takes nothing; never spin on it)
                raise OSError(errno.EIO, "the file took no bytes")
            view = view[n:]
    except OSError:
        if start is not None:
            try:
                if os.fstat(fd).st_size > start:
                    os.ftruncate(fd, start)
            except OSError:
                pass
        raise


def _open_for_append(path: str) -> io.FileIO:
    """`path` opened to append bytes, unbuffered. A FIFO is opened without
    waiting for a reader (none: ENXIO, an error at the start), then written to
    blocking, by the writer thread."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise OSError(exc.errno, "it is a FIFO that no process reads") from None
        raise
    os.set_blocking(fd, True)
    return io.FileIO(fd, "a")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: urllib would follow a 301-303 with a GET,
    without the event, and then report what that GET got."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None  # the 3xx is then raised as an HTTPError


#: What posts the webhook's events: urllib's default handlers (proxies from
#: the environment included), redirects not followed.
_OPENER = urllib.request.build_opener(_NoRedirect)


class Webhook:
    """POSTs each event to `url` from one thread, with retries and backoff."""

    def __init__(self, url: str, *, on_drop: Callable[[str], None] | None = None,
                 on_post: Callable[[], None] | None = None, timeout: float = WEBHOOK_TIMEOUT,
                 attempts: int = WEBHOOK_ATTEMPTS, backoff: float = WEBHOOK_BACKOFF,
                 queue_size: int = WEBHOOK_QUEUE) -> None:
        self.url = url
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff
        self.on_drop, self.on_post = on_drop, on_post
        self._drop_log = DropLog()
        self._queue: queue.Queue[dict | None] = queue.Queue(queue_size)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="sortscp-webhook", daemon=True)
        self._thread.start()

    def send(self, record: dict[str, Any]) -> None:
        """Queue `record`; never blocks (a full queue drops it, logged)."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._drop(record, f"{self._queue.maxsize} events already waiting")

    def _drop(self, record: dict[str, Any], why: str) -> None:
        self._drop_log.warn(  # one line a second at most, with the count
            log, "webhook %s: dropped the %s event: %s", self.url, record.get("event"), why,
            extra={"event": "webhook_dropped", "url": self.url, "dropped": record.get("event"), "reason": why})
        if self.on_drop:
            self.on_drop(why)

    def _work(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            self._post(record)

    def _post(self, record: dict[str, Any]) -> None:
        body = json.dumps(record, ensure_ascii=False, default=str).encode()
        reason = ""
        for attempt in range(self.attempts):
            if attempt:
                if self._stopping.wait(self.backoff * 2 ** (attempt - 1)):
                    reason = f"stopping ({reason})"
                    break
            request = urllib.request.Request(
                self.url, data=body, method="POST",
                headers={"Content-Type": "application/json", "User-Agent": "sortscp"},
            )
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    response.read()
                if self.on_post:
                    self.on_post()
                return
            except urllib.error.HTTPError as exc:
                reason = f"HTTP {exc.code}"
                if 300 <= exc.code < 400:
                    where = exc.headers.get("Location") if exc.headers is not None else None
                    reason += f" (a redirect to {where}, not followed: give --webhook the final URL)"
                    break  # the same answer again
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    break  # the receiver refuses this event: retrying changes nothing
            except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections
                reason = str(getattr(exc, "reason", None) or exc)
        self._drop(record, f"after {attempt + 1} attempt(s): {reason}")

    def stop(self, timeout: float) -> None:
        """Post what is queued for up to `timeout` s, then drop the rest (one
        line); a POST still under way is abandoned (the thread is a daemon)."""
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        left = 0
        while True:
            try:
                if self._queue.get_nowait() is not None:
                    left += 1
            except queue.Empty:
                break
        self._drop_log.flush(log, f"webhook {self.url}: events", extra={"event": "webhook_dropped", "url": self.url})
        if left:
            log.warning("webhook %s: dropped %d event(s) still queued at the stop", self.url, left,
                        extra={"event": "webhook_dropped", "url": self.url, "count": left})
            if self.on_drop:
                for _ in range(left):
                    self.on_drop("stopping")
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("webhook %s: abandoned the event being posted at the stop", self.url,
                        extra={"event": "webhook_dropped", "url": self.url, "count": 1})

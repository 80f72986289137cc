"""Logging set-up: configured once, by the CLI (and in each worker process).

Every record passes :class:`EscapeFilter` on its way out, whoever wrote it:
control characters (newlines, escape sequences, NUL ...) are escaped, so no
peer-supplied text can forge a log line or colour a terminal. Our own messages
quote such text with :func:`safe`; pynetdicom's and pydicom's (which quote AE
titles and values as received) are escaped as a whole. A traceback is indented
below its line; a library's (bad input, already said in its line) is dropped
unless the level is DEBUG.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import threading
import time
from collections.abc import Mapping

from scp.enums import LogFormat

#: At most one line per this many seconds for a warning that can come once per
#: instance (a full queue dropping work), with the count since the line before.
DROP_LOG_SECONDS = 1.0


class DropLog:
    """The rate limit of such a warning: :meth:`warn` counts one drop and logs
    it when a line is due, with how many more came since the line before;
    :meth:`flush` logs, at the stop, what was counted since the last line, so
    every drop is in some line."""

    def __init__(self, seconds: float = DROP_LOG_SECONDS) -> None:
        self.seconds = seconds
        self._count = 0
        self._last = float("-inf")
        self._lock = threading.Lock()

    def warn(self, logger: logging.Logger, msg: str, *args: object, extra: Mapping[str, object]) -> None:
        """Count one drop; when a line is due, log ``msg % args`` with the count
        (this drop and those held back since the last line)."""
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self.seconds:
                return
            count, self._count, self._last = self._count, 0, now
        more = f" (and {count - 1} more since the last such line)" if count > 1 else ""
        logger.warning(msg + "%s", *args, more, extra={**extra, "count": count})

    def flush(self, logger: logging.Logger, what: str, extra: Mapping[str, object]) -> None:
        """At the stop: log the drops counted since the last line, if any."""
        with self._lock:
            count, self._count = self._count, 0
        if count:
            logger.warning("%s dropped: %d more since the last such line", what, count,
                           extra={**extra, "count": count})

#: Attributes every LogRecord has; anything else was passed with ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_text:
            doc["exception"] = record.exc_text
        elif record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


#: Loggers whose messages are ours: they quote peer text with :func:`safe` already.
OURS = "scp"


class EscapeFilter(logging.Filter):
    """Escape control characters in every record a handler emits (see the module)."""

    def __init__(self, keep_library_tracebacks: bool = False) -> None:
        super().__init__()
        self.keep_library_tracebacks = keep_library_tracebacks

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == OURS or record.name.startswith(OURS + ".")
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string: log what there is
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = escape_controls(message) if ours else safe(message)
        record.args = None
        if record.exc_info and not ours and not self.keep_library_tracebacks:
            record.exc_info = None
            record.exc_text = None
        elif record.exc_info or record.exc_text:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]
            record.exc_text = "\n".join("    " + escape_controls(line) for line in text.splitlines())
        record.stack_info = None
        return True


class EchoFilter(logging.Filter):
    """Drop the Python warning that repeats a message pydicom has just logged.

    pydicom's ``warn_and_log`` sends each complaint about a value to its
    logger *and* to :func:`warnings.warn`; with warnings captured as log
    records, every such line would appear twice. The logged record is kept (it
    names the logger), the warning that quotes it is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self._recent: collections.deque[str] = collections.deque(maxlen=32)
        self._lock = threading.Lock()  # (filters run outside the handler's lock)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pydicom" or record.name.startswith("pydicom."):
            if record.levelno == logging.WARNING and isinstance(record.msg, str) and not record.args:
                with self._lock:
                    self._recent.append(record.msg)
            return True
        if record.name == "py.warnings" and self._recent:
            text = record.getMessage()
            with self._lock:
                for i, message in enumerate(self._recent):
                    if message in text:
                        del self._recent[i]
                        return False
        return True


def setup_logging(level: str = "INFO", fmt: LogFormat = LogFormat.TEXT) -> None:
    """Send our logs to stderr at `level`; pynetdicom's stay at WARNING unless DEBUG.

    Python warnings (pydicom's about odd values, which quote them) become log
    records too, so they pass the same filter.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(EchoFilter())  # before the escape filter: it compares raw messages
    handler.addFilter(EscapeFilter(keep_library_tracebacks=level.upper() == "DEBUG"))
    if fmt is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    pynetdicom_level = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    logging.getLogger("pynetdicom").setLevel(pynetdicom_level)
    logging.captureWarnings(True)


def worker_setup() -> tuple[str, LogFormat]:
    """What a worker process needs to log as this process does (picklable)."""
    root = logging.getLogger()
    fmt = LogFormat.TEXT
    for handler in root.handlers:
        if isinstance(handler.formatter, JsonFormatter):
            fmt = LogFormat.JSON
    return logging.getLevelName(root.getEffectiveLevel()), fmt


def setup_worker_logging(setup: tuple[str, LogFormat]) -> None:
    """In a worker: log like the parent (:func:`worker_setup`), never raw.

    Without this a worker has no handler, and Python's last resort prints
    pydicom's warnings, peer-supplied values and all, straight to stderr.
    """
    level, fmt = setup
    setup_logging(level, fmt)


def escape_controls(text: str) -> str:
    r"""`text` with its control characters escaped and its backslashes kept
    (for text whose peer-supplied parts went through :func:`safe` already).

    >>> print(escape_controls("a\\b\x1b[0m\n"))
    a\b\x1b[0m\n
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def safe(value: object, *, backslashes: bool = True) -> str:
    """`value` as text fit for one log line: control characters (newlines,
    escape sequences, NUL ...) and backslashes are escaped, so a peer's AE
    title or a header value can neither forge a line nor colour the terminal.
    (Without `backslashes`, those are left as they are: for a path that
    already carries ``\\xNN`` escapes, see :func:`scp.sort.shown`.)

    >>> safe("EVIL\\n2026-01-01 INFO forged")
    'EVIL\\\\n2026-01-01 INFO forged'
    >>> safe("\\x1b[31mRED")
    '\\\\x1b[31mRED'
    >>> safe("Yamada^Tarou=山田^太郎")
    'Yamada^Tarou=山田^太郎'
    """
    text = str(value)
    if text.isprintable() and not (backslashes and "\\" in text):
        return text
    out = []
    for ch in text:
        if ch == "\\" and backslashes:
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)

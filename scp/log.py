"""Logging set-up: configured once, by the CLI."""

from __future__ import annotations

import json
import logging
import sys
import time

from scp.enums import LogFormat

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
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: str = "INFO", fmt: LogFormat = LogFormat.TEXT) -> None:
    """Send our logs to stderr at `level`; pynetdicom's stay at WARNING unless DEBUG."""
    handler = logging.StreamHandler(sys.stderr)
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


def safe(value: object) -> str:
    """`value` as text fit for one log line: control characters (newlines,
    escape sequences, NUL ...) and backslashes are escaped, so a peer's AE
    title or a header value can neither forge a line nor colour the terminal.

    >>> safe("EVIL\\n2026-01-01 INFO forged")
    'EVIL\\\\n2026-01-01 INFO forged'
    >>> safe("\\x1b[31mRED")
    '\\\\x1b[31mRED'
    >>> safe("Yamada^Tarou=山田^太郎")
    'Yamada^Tarou=山田^太郎'
    """
    text = str(value)
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)

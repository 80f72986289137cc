"""Log lines cannot be forged: whatever a record carries (a peer's AE title with a
newline, an escape sequence, a traceback quoting it), each record is one line at
column 0 followed only by indented lines."""

from __future__ import annotations

import io
import json
import logging

import pytest

from scp.enums import LogFormat
from scp.log import DropLog, EscapeFilter, JsonFormatter

FORGED = "EV\nFORGED 2026-01-01 INFO scp: stored\x1b[31m"


def _emit(logger_name: str, *, fmt: LogFormat = LogFormat.TEXT, debug: bool = False,
          exc: bool = False) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(EscapeFilter(keep_library_tracebacks=debug))
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON
                         else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        if exc:
            try:
                raise ValueError(f"Invalid 'Calling AE Title' value '{FORGED}'")
            except ValueError:
                logger.exception("Invalid 'Calling AE Title' value '%s'", FORGED)
        else:
            logger.error("Invalid 'Calling AE Title' value '%s'", FORGED)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return out.getvalue()


@pytest.mark.parametrize("name", ["pynetdicom.dul", "pydicom", "scp.net.handlers"])
@pytest.mark.parametrize("exc", [False, True])
def test_no_record_starts_a_forged_line(name, exc):
    text = _emit(name, exc=exc)
    assert "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("ERROR "), text
    assert all(line.startswith("    ") for line in lines[1:]), f"a line at column 0:\n{text}"
    assert r"EV\nFORGED" in lines[0] or r"EV\\nFORGED" in lines[0], text


def test_a_library_traceback_about_bad_input_only_at_debug():
    assert len(_emit("pynetdicom.dul", exc=True).splitlines()) == 1
    assert "Traceback" in _emit("pynetdicom.dul", exc=True, debug=True)
    assert "Traceback" in _emit("scp.net.server", exc=True)  # ours: a bug, keep it


def test_json_lines_stay_one_object_each():
    text = _emit("pynetdicom.dul", fmt=LogFormat.JSON, exc=True, debug=True)
    assert len(text.splitlines()) == 1, text
    doc = json.loads(text)
    assert "FORGED" in doc["message"] and "\n" not in doc["message"]
    assert "\x1b" not in doc["exception"] and "\n    " in doc["exception"]


def test_a_pydicom_complaint_is_one_line_not_two():
    """pydicom logs a complaint about a value and also warns it; with warnings
    captured as log records, the operator would read each twice."""
    import warnings

    from pydicom import config
    from pydicom.valuerep import validate_value

    from scp.log import setup_logging

    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO")
        root.handlers[0].setStream(out)  # type: ignore[attr-defined]
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            validate_value("UI", "1.2.x" * 20, config.WARN)  # pydicom's warn_and_log
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logging.captureWarnings(False)
    lines = [line for line in out.getvalue().splitlines() if "1.2.x" in line]
    assert len(lines) == 1, out.getvalue()


def test_the_echo_filter_takes_records_from_several_threads_at_once() -> None:
    """Network threads and workers' result threads log at the same time; the
    filter's memory of pydicom's lines must not break a logging call."""
    from scp.log import EchoFilter

    from conftest import in_threads

    echo = EchoFilter()

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)

    def work(t: int) -> None:
        for i in range(3000):
            echo.filter(record("pydicom", f"value {t}-{i % 40} is odd"))
            echo.filter(record("py.warnings", f"UserWarning: value {t}-{(i * 7) % 40} is odd"))

    errors = in_threads(work)
    assert errors == []


def test_a_drop_log_writes_one_line_per_period_and_every_drop_is_counted(caplog) -> None:
    """The one rate limit of the hooks', the webhook's and the stored events'
    drop lines: the first drop is logged at once, the next ones in the same
    period only counted, and the stop's flush logs what was held back."""
    logger = logging.getLogger("scp.test.drops")
    drops = DropLog(seconds=3600)
    with caplog.at_level(logging.WARNING, logger="scp.test.drops"):
        for i in range(1000):
            drops.warn(logger, "dropped %s: %s", f"uid{i}", "queue full", extra={"event": "x"})
        drops.flush(logger, "things", extra={"event": "x"})
        drops.flush(logger, "things", extra={"event": "x"})  # nothing held back any more
    lines = [(r.getMessage(), r.count, r.event) for r in caplog.records]
    assert lines == [("dropped uid0: queue full", 1, "x"),
                     ("things dropped: 999 more since the last such line", 999, "x")]

"""Frozen, picklable settings for ``serve`` and ``sort``. All defaults live here."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from scp import DEFAULT_TEMPLATE
from scp.enums import Duplicate, Fsync, Mode

if TYPE_CHECKING:  # imported when a config is made: the command line starts without pydicom
    from scp.layout import Template

DEFAULT_OUT = Path("sorted")
DEFAULT_AET = "SORTSCP"
#: Longest AE title (PS3.5 Table 6.2-1, AE value representation).
MAX_AET_LENGTH = 16
DEFAULT_PORT = 11112
DEFAULT_HOST = "0.0.0.0"
DEFAULT_MAX_ASSOCIATIONS = 16
#: Largest P-DATA PDU we accept. Bigger PDUs mean fewer round trips per instance.
DEFAULT_MAX_PDU = 1 << 20
#: The range of ``--max-pdu`` (besides 0): DCMTK's (4 KiB; fewer bytes a PDU give every
#: instance hundreds of fragments, which the receiver takes for a hostile peer's), up to the
#: largest PDU we read (64 MiB: what 0 announces).
MIN_MAX_PDU, MAX_MAX_PDU = 4096, 64 << 20
DEFAULT_ACSE_TIMEOUT = 30.0
DEFAULT_DIMSE_TIMEOUT = 60.0
DEFAULT_NETWORK_TIMEOUT = 60.0
#: How long a worker may take to file one instance before it is killed and replaced.
DEFAULT_JOB_TIMEOUT = 60.0
#: How long a stop waits for in-flight associations before aborting them.
DEFAULT_DRAIN_TIMEOUT = 30.0
#: The calling AE title ``sortscp echo`` uses unless told otherwise.
DEFAULT_ECHO_AET = "ECHOSCU"
#: Seconds ``sortscp echo`` waits for the connection and for each message.
DEFAULT_ECHO_TIMEOUT = 10.0
#: A series (study) is complete when nothing of it arrived for this long (Orthanc's StableAge).
DEFAULT_SERIES_STABLE_SECONDS = 60.0
DEFAULT_STUDY_STABLE_SECONDS = 60.0
#: Hook processes running at once, and the seconds before one is killed.
DEFAULT_HOOK_CONCURRENCY = 4
DEFAULT_HOOK_TIMEOUT = 60.0
#: The longest any option in seconds may be (a week): the waits they become
#: (``poll`` in milliseconds among them) must be able to hold them.
MAX_SECONDS = 7 * 24 * 3600.0
#: The most worker processes ``--workers`` may ask for: each costs a process
#: and its memory, and far more than the cores only adds switching.
MAX_WORKERS = 256
#: The signals that stop ``serve`` and ``sort`` cleanly (in flight work finishes;
#: a second one stops at once). SIGHUP: the terminal or SSH session went away.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The :data:`STOP_SIGNALS` this process may take over: not those it was
    started with ignored (``nohup`` ignores SIGHUP, a shell's background job
    SIGINT), which stay ignored, as in any Unix program."""
    return tuple(s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN)


def check_ae_title(title: str) -> str:
    """Return `title` if it is a valid AE title, else raise ``ValueError``.

    Examples
    --------
    >>> check_ae_title("SORTSCP")
    'SORTSCP'
    >>> check_ae_title("A" * 17)
    Traceback (most recent call last):
    ...
    ValueError: an AE title has 1 to 16 characters: 'AAAAAAAAAAAAAAAAA'
    """
    if not title.strip() or len(title) > MAX_AET_LENGTH:
        raise ValueError(f"an AE title has 1 to {MAX_AET_LENGTH} characters: {title!r}")
    if "\\" in title or any(not ch.isprintable() for ch in title) or not title.isascii():
        raise ValueError(f"an AE title is printable ASCII without '\\': {title!r}")
    return title


def default_workers() -> int:
    """One worker per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _default_template() -> Template:
    from scp.layout import Template

    return Template.parse(DEFAULT_TEMPLATE)


@dataclass(frozen=True)
class SortConfig:
    """Settings of one ``sortscp sort SRC DST`` run."""

    src: Path
    dst: Path
    template: Template = field(default_factory=_default_template)
    mode: Mode = Mode.COPY
    workers: int = field(default_factory=default_workers)
    dry_run: bool = False
    #: ``always``: what sort reports placed is on disk, and a move removes a
    #: source only once its copy is (flushed once per batch, not per file).
    fsync: Fsync = Fsync.ALWAYS
    report: Path | None = None
    follow_symlinks: bool = False


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the Storage SCP."""

    out: Path = DEFAULT_OUT
    aet: str = DEFAULT_AET
    port: int = DEFAULT_PORT
    host: str = DEFAULT_HOST
    template: Template = field(default_factory=_default_template)
    workers: int = field(default_factory=default_workers)
    on_duplicate: Duplicate = Duplicate.REPLACE
    max_associations: int = DEFAULT_MAX_ASSOCIATIONS
    max_pdu: int = DEFAULT_MAX_PDU
    acse_timeout: float = DEFAULT_ACSE_TIMEOUT
    dimse_timeout: float = DEFAULT_DIMSE_TIMEOUT
    network_timeout: float = DEFAULT_NETWORK_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    job_timeout: float = DEFAULT_JOB_TIMEOUT
    allow_aet: tuple[str, ...] = ()
    require_called_aet: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    #: ``always``: Success only once the file and its folder entry are on disk.
    fsync: Fsync = Fsync.ALWAYS
    # events, hooks and metrics (scp/events/; README "Events, hooks and metrics")
    on_stored: str | None = None
    on_series_complete: str | None = None
    on_study_complete: str | None = None
    hook_shell: bool = False
    hook_concurrency: int = DEFAULT_HOOK_CONCURRENCY
    hook_timeout: float = DEFAULT_HOOK_TIMEOUT
    series_stable_seconds: float = DEFAULT_SERIES_STABLE_SECONDS
    study_stable_seconds: float = DEFAULT_STUDY_STABLE_SECONDS
    events: str | None = None  #: a JSON-lines file, or "-" for stdout
    webhook: str | None = None
    metrics_port: int | None = None
    metrics_host: str | None = None  #: None: the same as `host`

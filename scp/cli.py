"""The ``sortscp`` command line: parse options, build a config, run, exit.

Start-up matters (``sortscp sort`` of a small tree, ``--help``): pydicom, rich
and the commands' own modules are imported when a command runs, not here.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional, cast

import typer

from scp import DEFAULT_TEMPLATE, __version__, config
from scp.config import ServeConfig, SortConfig, check_ae_title
from scp.enums import Duplicate, Fsync, LogFormat, Mode, Result
from scp.errors import SortscpError, TemplateError
from scp.log import safe, setup_logging
from scp.report import Outcome, Report

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from scp.layout import Template

app = typer.Typer(
    help="A DICOM Storage SCP that files every instance it receives, and a batch re-sorter.\n\n"
    f"Layout: {DEFAULT_TEMPLATE}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
log = logging.getLogger(__name__)


@cache
def _err() -> Console:
    """The standard error console (rich is imported on first use)."""
    from rich.console import Console

    return Console(stderr=True)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: In a pipe, ``sort`` prints a plain progress line at most this often.
PLAIN_PROGRESS_SECONDS = 5.0


def _template(text: str) -> Template:
    from scp.layout import Template

    try:
        return Template.parse(text)
    except TemplateError as exc:
        raise typer.BadParameter(str(exc)) from None


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise typer.BadParameter(f"choose one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def _folder(value: str | Path) -> Path:
    """A folder argument, never empty: ``""`` would mean the working folder
    (an unset ``$DST`` in a script). A path that exists must be a folder."""
    text = os.fspath(value)  # a default comes as a Path
    if not text.strip():
        raise typer.BadParameter("is empty (to mean this folder, say '.')")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{text!r} is not a folder")
    return path


def _existing_folder(text: str | Path) -> Path:
    path = _folder(text)
    if not path.is_dir():
        raise typer.BadParameter(f"folder {text!r} does not exist")
    if not os.access(path, os.R_OK | os.X_OK):
        raise typer.BadParameter(f"folder {text!r} cannot be read")
    return path


def _seconds(value: float) -> float:
    """A number of seconds: finite (``nan`` passes click's range check)."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a number of seconds")
    return value


def _workers(value: Optional[int]) -> Optional[int]:
    if value is not None and not 1 <= value <= config.MAX_WORKERS:
        raise typer.BadParameter(f"must be from 1 to {config.MAX_WORKERS}")
    return value


def _max_pdu(value: int) -> int:
    if value != 0 and not config.MIN_MAX_PDU <= value <= config.MAX_MAX_PDU:
        raise typer.BadParameter(f"must be 0 or from {config.MIN_MAX_PDU} to {config.MAX_MAX_PDU} bytes")
    return value


def _allow_list(values: Optional[list[str]]) -> list[str]:
    from scp.net.access import SecurityConfigError, split_allow_list

    try:
        return split_allow_list(values or ())
    except SecurityConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


def _ae_title(text: str) -> str:
    try:
        return check_ae_title(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sortscp {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """sortscp: a DICOM receiver that files what it receives."""


WorkersOpt = Annotated[
    Optional[int],
    typer.Option("--workers", "-w", callback=_workers, help=f"Worker processes, at most {config.MAX_WORKERS} [default: CPU count]."),
]
LogLevelOpt = Annotated[
    str, typer.Option("--log-level", callback=_log_level, help="DEBUG, INFO, WARNING or ERROR.")
]


def _serve_duplicate(value: str) -> str:
    if value not in (Duplicate.REPLACE.value, Duplicate.KEEP.value):
        raise typer.BadParameter(f"{value!r} is not one of 'replace', 'keep'")
    return value


def _hook_command(value: Optional[str]) -> Optional[str]:
    import shlex

    if value is not None:
        try:
            if not shlex.split(value):
                raise typer.BadParameter("an empty command")
        except ValueError as exc:
            raise typer.BadParameter(f"cannot split the command: {exc}") from None
    return value or None


def _webhook_url(value: Optional[str]) -> Optional[str]:
    if value:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise typer.BadParameter(f"not a URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise typer.BadParameter("an http:// or https:// URL with a host")
    return value or None


def _env(name: str) -> str:
    return f"SORTSCP_{name}"


@app.command()
def serve(
    out: Annotated[Path, typer.Option("--out", "-o", envvar=_env("OUT"), parser=_folder, metavar="<folder>", help="Output folder (one server per folder: a second one is refused).")] = config.DEFAULT_OUT,
    aet: Annotated[str, typer.Option("--aet", envvar=_env("AET"), callback=_ae_title, help="Our AE title.")] = config.DEFAULT_AET,
    port: Annotated[int, typer.Option("--port", "-p", envvar=_env("PORT"), min=0, max=65535, help="TCP port.")] = config.DEFAULT_PORT,
    host: Annotated[str, typer.Option("--host", envvar=_env("HOST"), help="Address to listen on.")] = config.DEFAULT_HOST,
    workers: Annotated[Optional[int], typer.Option("--workers", "-w", envvar=_env("WORKERS"), callback=_workers, help=f"Worker processes, at most {config.MAX_WORKERS} [default: CPU count].")] = None,
    template: Annotated[str, typer.Option("--template", "-t", envvar=_env("TEMPLATE"), parser=_template, metavar="TEMPLATE", help="Path template (same engine as `sort`).")] = DEFAULT_TEMPLATE,
    on_duplicate: Annotated[str, typer.Option("--on-duplicate", envvar=_env("ON_DUPLICATE"), callback=_serve_duplicate, metavar="[replace|keep]", help="Same SOPInstanceUID with other bytes: replace the stored file atomically, or keep the first. Identical bytes are always a no-op.")] = Duplicate.REPLACE.value,
    max_associations: Annotated[int, typer.Option("--max-associations", envvar=_env("MAX_ASSOCIATIONS"), min=1, help="Concurrent associations; more are rejected (local limit exceeded).")] = config.DEFAULT_MAX_ASSOCIATIONS,
    max_pdu: Annotated[int, typer.Option("--max-pdu", envvar=_env("MAX_PDU"), callback=_max_pdu, help="Maximum PDU size we receive, 4096 to 67108864 (0 = the largest, 64 MiB, which is what we then announce); a longer P-DATA PDU aborts the association.")] = config.DEFAULT_MAX_PDU,
    acse_timeout: Annotated[float, typer.Option("--acse-timeout", envvar=_env("ACSE_TIMEOUT"), min=0.1, max=config.MAX_SECONDS, callback=_seconds, help="Seconds a peer has, in total from its connection, to send its whole A-ASSOCIATE-RQ (and to answer ours).")] = config.DEFAULT_ACSE_TIMEOUT,
    dimse_timeout: Annotated[float, typer.Option("--dimse-timeout", envvar=_env("DIMSE_TIMEOUT"), min=0.1, max=config.MAX_SECONDS, callback=_seconds, help="Seconds to wait for DIMSE messages. A message still arriving must be complete within this plus 1 s per 64 KiB received (at least 64 KiB/s after this grace), or the association is aborted.")] = config.DEFAULT_DIMSE_TIMEOUT,
    network_timeout: Annotated[float, typer.Option("--network-timeout", envvar=_env("NETWORK_TIMEOUT"), min=0.1, max=config.MAX_SECONDS, callback=_seconds, help="Idle timeout: seconds without network activity before a connection is dropped.")] = config.DEFAULT_NETWORK_TIMEOUT,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", envvar=_env("DRAIN_TIMEOUT"), min=0, max=config.MAX_SECONDS, callback=_seconds, help="On SIGINT, SIGTERM or SIGHUP, seconds to let associations in flight finish.")] = config.DEFAULT_DRAIN_TIMEOUT,
    job_timeout: Annotated[float, typer.Option("--job-timeout", envvar=_env("JOB_TIMEOUT"), min=0.1, max=config.MAX_SECONDS, callback=_seconds, help="Seconds a worker may take to file one instance; past it the instance gets 0xA700 (out of resources) and the worker is replaced.")] = config.DEFAULT_JOB_TIMEOUT,
    allow_aet: Annotated[Optional[list[str]], typer.Option("--allow-aet", envvar=_env("ALLOW_AET"), callback=_allow_list, metavar="TITLE[@HOST]", help="Accept associations only from this calling AE title (optionally only from HOST); repeatable, or separated by spaces/commas in the variable. Default: anyone.")] = None,
    require_called_aet: Annotated[bool, typer.Option("--require-called-aet", envvar=_env("REQUIRE_CALLED_AET"), help="Reject associations addressed to another AE title than --aet.")] = False,
    tls_cert: Annotated[Optional[Path], typer.Option("--tls-cert", envvar=_env("TLS_CERT"), dir_okay=False, help="Serve DICOM over TLS with this PEM certificate (chain).")] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", envvar=_env("TLS_KEY"), dir_okay=False, help="PEM private key of --tls-cert (if not in the same file).")] = None,
    tls_ca: Annotated[Optional[Path], typer.Option("--tls-ca", envvar=_env("TLS_CA"), dir_okay=False, help="Require client certificates signed by these PEM CA certificates.")] = None,
    log_level: Annotated[str, typer.Option("--log-level", envvar=_env("LOG_LEVEL"), callback=_log_level, help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
    log_format: Annotated[LogFormat, typer.Option("--log-format", envvar=_env("LOG_FORMAT"), help="text, or json (one object per line, for containers).")] = LogFormat.TEXT,
    fsync: Annotated[Fsync, typer.Option("--fsync", envvar=_env("FSYNC"), help="always: answer Success only once the file and its folder entry are on disk. never: do not flush (the system writes back within seconds; a crash can lose instances already acknowledged), for storage that is safe already.")] = Fsync.ALWAYS,
    on_stored: Annotated[Optional[str], typer.Option("--on-stored", envvar=_env("ON_STORED"), callback=_hook_command, metavar="CMD", help="Run CMD after each instance is stored (facts in SORTSCP_* variables; never delays the response).")] = None,
    on_series_complete: Annotated[Optional[str], typer.Option("--on-series-complete", envvar=_env("ON_SERIES_COMPLETE"), callback=_hook_command, metavar="CMD", help="Run CMD when a series is complete (SORTSCP_MANIFEST names its manifest).")] = None,
    on_study_complete: Annotated[Optional[str], typer.Option("--on-study-complete", envvar=_env("ON_STUDY_COMPLETE"), callback=_hook_command, metavar="CMD", help="Run CMD when a study is complete.")] = None,
    hook_shell: Annotated[bool, typer.Option("--hook-shell", envvar=_env("HOOK_SHELL"), help="Run hook commands with /bin/sh -c (default: split like a shell, run without one).")] = False,
    hook_concurrency: Annotated[int, typer.Option("--hook-concurrency", envvar=_env("HOOK_CONCURRENCY"), min=1, help="Hook processes running at once.")] = config.DEFAULT_HOOK_CONCURRENCY,
    hook_timeout: Annotated[float, typer.Option("--hook-timeout", envvar=_env("HOOK_TIMEOUT"), min=0.1, max=config.MAX_SECONDS, callback=_seconds, help="Seconds before a hook's process group is killed.")] = config.DEFAULT_HOOK_TIMEOUT,
    series_stable_seconds: Annotated[float, typer.Option("--series-stable-seconds", envvar=_env("SERIES_STABLE_SECONDS"), min=0.1, max=config.MAX_SECONDS, callback=_seconds, help="A series is complete when nothing of it arrived for this long.")] = config.DEFAULT_SERIES_STABLE_SECONDS,
    study_stable_seconds: Annotated[float, typer.Option("--study-stable-seconds", envvar=_env("STUDY_STABLE_SECONDS"), min=0.1, max=config.MAX_SECONDS, callback=_seconds, help="A study is complete when nothing of it arrived for this long and its series are complete.")] = config.DEFAULT_STUDY_STABLE_SECONDS,
    events: Annotated[Optional[str], typer.Option("--events", envvar=_env("EVENTS"), metavar="FILE", help="Append one JSON line per event to FILE ('-': standard output).")] = None,
    webhook: Annotated[Optional[str], typer.Option("--webhook", envvar=_env("WEBHOOK"), callback=_webhook_url, metavar="URL", help="POST each event as JSON to URL (retries; drops, logged, when it cannot).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option("--metrics-port", envvar=_env("METRICS_PORT"), min=0, max=65535, help="Serve Prometheus metrics on this port (0: any free port). Default: off.")] = None,
    metrics_host: Annotated[Optional[str], typer.Option("--metrics-host", envvar=_env("METRICS_HOST"), help="Address of the metrics endpoint [default: --host].")] = None,
) -> None:
    """Run the Storage SCP: file every instance received with C-STORE.

    Exit status: 0 after a clean stop, 2 when it cannot start (bad option, port
    in use, output folder not writable, unusable TLS files).
    """
    from scp.net.server import Server

    if (tls_key or tls_ca) and not tls_cert:
        raise typer.BadParameter("--tls-key and --tls-ca need --tls-cert", param_hint="--tls-cert")
    setup_logging(log_level, log_format)
    cfg = ServeConfig(
        out=out, aet=aet, port=port, host=host, template=cast("Template", template),
        workers=workers or config.default_workers(), on_duplicate=Duplicate(on_duplicate),
        max_associations=max_associations, max_pdu=max_pdu, acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout, network_timeout=network_timeout, drain_timeout=drain_timeout,
        job_timeout=job_timeout, allow_aet=tuple(allow_aet or ()), require_called_aet=require_called_aet,
        tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, fsync=fsync,
        on_stored=on_stored, on_series_complete=on_series_complete, on_study_complete=on_study_complete,
        hook_shell=hook_shell, hook_concurrency=hook_concurrency, hook_timeout=hook_timeout,
        series_stable_seconds=series_stable_seconds, study_stable_seconds=study_stable_seconds,
        events=events, webhook=webhook, metrics_port=metrics_port, metrics_host=metrics_host,
    )
    try:
        code = Server(cfg).run()
    except SortscpError as exc:
        log.error("%s", exc)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


#: Exit status of ``sort`` when another sort holds the lock on DST (EX_TEMPFAIL).
EXIT_LOCKED = 75


def _one_line_usage_error(message: str) -> typer.Exit:
    _err().print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(2)


@app.command(
    epilog="\b\nThe default template (--template):\n  " + DEFAULT_TEMPLATE
    + "\n\b\nExit status: 0 every DICOM file is in place (the rest skipped, each with\n"
    "its reason), 1 an entry failed (listed in the report), 2 usage error,\n"
    "75 another sort is writing into DST or a running server holds its index\n"
    "(or DST is inside a served folder or holds one, or a move would take\n"
    "files from one; or DST or a move's SRC is in the SRC of a running move),\n"
    "130 interrupted (SIGINT), 143 SIGTERM, 129 SIGHUP.",
)
def sort(
    src: Annotated[Path, typer.Argument(parser=_existing_folder, metavar="SRC", help="Folder to read (walked recursively).")],
    dst: Annotated[Path, typer.Argument(parser=_folder, metavar="DST", help="Folder to fill with the layout (may be SRC itself).")],
    mode: Annotated[Mode, typer.Option("--mode", "-m", help="copy keeps timestamps; move removes a source only once a real file with its bytes is stored and flushed.")] = Mode.COPY,
    template: Annotated[str, typer.Option("--template", "-t", metavar="TEMPLATE", show_default=False, help="Path template of DICOM keywords or tag numbers ({00100020}, {0010,0020}), with optional format specs ({SeriesNumber:04}, {PatientName:.8}). The file name must contain {SOPInstanceUID}. Default: see below.")] = DEFAULT_TEMPLATE,
    workers: WorkersOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Print the plan (source -> destination), looking at DST as the real run does; touch nothing.")] = False,
    report: Annotated[Optional[Path], typer.Option("--report", dir_okay=False, help="Write one row per entry of SRC: source, destination, outcome, reason, category, source_b64. CSV (.csv), or JSON lines (.json, .jsonl, .ndjson).")] = None,
    fsync: Annotated[Fsync, typer.Option("--fsync", envvar=_env("FSYNC"), help="always: every file reported placed is on disk (flushed once per batch of files), and move removes a source only once its copy is. never: nothing is flushed: faster, but a crash soon after can lose copies, and with move the files themselves.")] = Fsync.ALWAYS,
    follow_symlinks: Annotated[bool, typer.Option("--follow-symlinks", help="Sort the files symbolic links point to (each target once; loops are detected). Without it, links are skipped and reported.")] = False,
    log_level: LogLevelOpt = "WARNING",
) -> None:
    """Re-sort an existing folder of DICOM files into the layout, in parallel."""
    if sys.stderr.isatty() and not dry_run:  # a progress bar (a thread): no fork for workers
        from scp.pool import SORT_JOBS, start_early

        start_early(SORT_JOBS)  # the forkserver imports while we do
    from rich.console import Console

    from scp.errors import DestinationLockedError, Interrupted, ReportError
    from scp.layout import Template
    from scp.sort import REPORT_FORMATS, report_clobbers, shown, sort_tree
    from scp.store.tmp import NotOwnFolder

    err = _err()
    try:
        parsed = Template.parse(template)
    except TemplateError as exc:
        raise _one_line_usage_error(f"invalid --template: {exc}") from None
    if report is not None and report.suffix.lower() not in REPORT_FORMATS:
        raise _one_line_usage_error(
            f"--report {report}: unknown extension {report.suffix or '(none)'!r}; "
            f"use one of {', '.join(REPORT_FORMATS)}"
        )
    if report is not None and (clobbers := report_clobbers(report)):
        raise _one_line_usage_error(f"--report {shown(str(report))}: {clobbers}")
    setup_logging(log_level)
    cfg = SortConfig(
        src=src, dst=dst, template=parsed, mode=mode,
        workers=workers or config.default_workers(), dry_run=dry_run, fsync=fsync, report=report,
        follow_symlinks=follow_symlinks,
    )
    out = Console()

    def plain(line: str) -> None:
        out.print(line, markup=False, highlight=False, soft_wrap=True)

    with _SortProgress(err, bar=err.is_terminal, quiet=dry_run) as progress:

        def on_outcome(o: Outcome) -> None:
            progress.advance(o)
            if o.result is Result.FAILED:
                progress.print(f"failed: {shown(o.source)}: {shown(o.reason)}")
            elif dry_run and o.result in (Result.PLANNED, Result.KEPT_AS_COPY):
                plain(f"{shown(o.source)} -> {shown(str(dst / o.destination))}")

        def on_rename(old: str, new: str) -> None:
            if dry_run:
                plain(f"(the file planned at {shown(str(dst / old))} goes to "
                      f"{shown(str(dst / new))}: a file with a smaller SHA-256 claims the name)")

        stopped = None
        try:
            result = sort_tree(
                cfg, on_outcome, on_total=progress.set_total if progress.bar else None,
                on_rename=on_rename,
            )
        except DestinationLockedError as exc:
            stopped = (EXIT_LOCKED, str(exc))
        except NotOwnFolder as exc:
            stopped = (2, f"error: {shown(str(exc))}")
        except ReportError as exc:  # what is done stays done; the rest waits for a rerun
            stopped = (1, f"error: {shown(str(exc))}; the run stopped: run the same command again to finish")
        except Interrupted as exc:
            stopped = (128 + exc.signum, _INTERRUPTED)
        except KeyboardInterrupt:
            stopped = (130, _INTERRUPTED)
        except OSError as exc:
            what = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else exc
            stopped = (2, f"error: {shown(str(what))}")
    if stopped is not None:
        err.print(stopped[1], markup=False, highlight=False, soft_wrap=True)
        _done.set()
        raise typer.Exit(stopped[0])
    err.print(
        f"{'planned' if dry_run else 'done'}: {result.summary()}",
        markup=False, highlight=False, soft_wrap=True,
    )
    if result.indexed is not None:
        for uid, kept, other in result.index_duplicates:
            err.print(f"sort: {_duplicate_line(uid, kept, other)}", markup=False, highlight=False,
                      soft_wrap=True)
        err.print(f"instance index of {dst} rebuilt: {result.indexed} instances"
                  + (f", {len(result.index_duplicates)} duplicates (another file of the same "
                     "SOPInstanceUID: the server replaces or keeps only the indexed one)"
                     if result.index_duplicates else ""),
                  markup=False, highlight=False, soft_wrap=True)
    _done.set()
    raise typer.Exit(result.exit_code)


_INTERRUPTED = (
    "interrupted: files already placed are complete; run the same command again to finish"
)


class _SortProgress:
    """A rich progress bar on a terminal; in a pipe, a plain line now and then."""

    def __init__(self, console: Console, bar: bool, quiet: bool = False) -> None:
        self.console = console
        self.bar = bar and not quiet
        self.plain = not bar and not quiet
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._lock = threading.Lock()
        self._report = Report()
        self._last_line = time.monotonic()

    def __enter__(self) -> _SortProgress:
        if self.bar:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                SpinnerColumn(), TextColumn("sorting"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("sort", total=None)
        return self

    def set_total(self, total: int) -> None:
        if self._progress is not None and self._task is not None:
            with self._lock:
                self._progress.update(self._task, total=total)

    def advance(self, outcome: Outcome) -> None:
        if self._progress is not None and self._task is not None:
            with self._lock:
                self._progress.advance(self._task)
        elif self.plain:
            self._report.add(outcome)
            now = time.monotonic()
            if now - self._last_line >= PLAIN_PROGRESS_SECONDS:
                self._last_line = now
                self.print(f"sorting: {self._report.total} files so far: {self._report.summary()}")

    def print(self, text: str) -> None:
        (self._progress.console if self._progress else self.console).print(
            text, markup=False, highlight=False, soft_wrap=True
        )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


@app.command("ls")
def ls(
    out: Annotated[Path, typer.Argument(envvar=_env("OUT"), parser=_folder, metavar="OUT", help="The output folder of `sortscp serve`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (studies, each with its series).")] = False,
) -> None:
    """List the studies and series received (from the index in OUT/.sortscp).

    Exit status: 0, or 1 when OUT has no index (it is created by `sortscp serve`);
    2 usage error (OUT is not a folder).
    """
    import json

    from scp.events.listing import NoIndex, listing

    try:
        studies = listing(out)
    except NoIndex as exc:
        _err().print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"out": str(out), "studies": studies}, ensure_ascii=False, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    from scp.log import escape_controls

    def cell(value: object) -> str:  # names come from senders: no escape sequence reaches the terminal
        return escape_controls(str(value)) if value else ""

    table = Table("patient", "patient ID", "study date", "series", "modality", "instances", "complete",
                  "last arrival")
    for t in studies:
        for s in t["series"]:
            done = f"yes (rev {s['revision']})" if s["complete"] else "no"
            table.add_row(cell(t["patient_name"]), cell(t["patient_id"]), cell(t["study_date"]),
                          cell(s["folder"] or s["series_description"] or s["series_instance_uid"]),
                          cell(s["modality"]), str(s["instances"]), done, cell(s["last_arrival"]))
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=200)  # a pipe: don't cut the table at 80 columns
    console.print(table, markup=False)
    n_series = sum(len(t["series"]) for t in studies)
    console.print(f"{len(studies)} studies, {n_series} series, {sum(t['instances'] for t in studies)} instances",
                  markup=False)


@app.command()
def echo(
    host: Annotated[str, typer.Argument(help="Peer host name or address.")],
    port: Annotated[int, typer.Argument(min=1, max=65535, help="Peer port.")],
    aet: Annotated[str, typer.Option("--aet", callback=_ae_title, help="Our (calling) AE title.")] = config.DEFAULT_ECHO_AET,
    called_aet: Annotated[str, typer.Option("--called-aet", callback=_ae_title, help="The peer's (called) AE title.")] = config.DEFAULT_AET,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, max=config.MAX_SECONDS, callback=_seconds, help="Seconds to wait for the connection and for each answer.")] = config.DEFAULT_ECHO_TIMEOUT,
) -> None:
    """Send a C-ECHO (DICOM ping).

    Exit status: 0 if the peer answered Success, 1 if it did not (nothing
    listening, association rejected, another status, no answer in time),
    2 for usage errors.
    """
    from scp.net.echo import echo as send_echo

    result = send_echo(host, port, aet=aet, called_aet=called_aet, timeout=timeout)
    typer.echo(f"echo: {result.message}", err=not result.ok)
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def reindex(
    out: Annotated[Path, typer.Argument(parser=_folder, metavar="OUT", help="The output folder whose instance index to rebuild.")],
    digests: Annotated[bool, typer.Option("--digests", help="Also record the sha256 of every file (reads them whole).")] = False,
) -> None:
    """Rebuild the instance index (OUT/.sortscp/index.sqlite) from the files.

    The files are the truth: run this after files were added, removed or moved
    under OUT by other tools. serve rebuilds it by itself when it is missing or
    was left behind by a crash. Where several files hold one SOPInstanceUID the
    newest is indexed and the others are listed.

    Exit status: 0 done; 1 OUT does not exist, files could not be read (a file
    cut short is not indexed) or the index cannot be put in place; 2 usage
    error (OUT is a file); 75 a running server holds the index (stop it
    first), a sort fills OUT, or a move empties it.
    """
    from scp.jobs import identity_facts
    from scp.store.index import IndexInUseError, InstanceIndexError, rebuild
    from scp.store.tmp import NotOwnFolder, ServerRunning, SortRunning, moved_under, take_sort_lock, take_unserved

    setup_logging("WARNING")  # pydicom's warnings about the files go through the escaping log
    if not out.is_dir():
        typer.echo(f"reindex: {out} is not a folder", err=True)
        raise typer.Exit(1)
    moving = moved_under(out)
    if moving is not None:
        typer.echo(f"reindex: {moving}, which takes the files away: reindex when it has finished", err=True)
        raise typer.Exit(EXIT_LOCKED)
    try:
        sort_lock = take_sort_lock(out)  # a sort filling OUT would place files after the walk
    except SortRunning as exc:
        typer.echo(f"reindex: {exc}; try again once it has finished", err=True)
        raise typer.Exit(EXIT_LOCKED) from None
    except NotOwnFolder as exc:
        typer.echo(f"reindex: {exc}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(f"reindex: cannot take {out}: {exc.strerror}: {exc.filename}", err=True)
        raise typer.Exit(1) from None
    try:
        held = take_unserved(out)  # (also while its .sortscp is gone)
    except ServerRunning as exc:
        os.close(sort_lock)
        typer.echo(f"reindex: {exc}", err=True)
        raise typer.Exit(EXIT_LOCKED) from None
    try:
        summary = rebuild(out, identity_facts, digests=digests)
    except IndexInUseError as exc:
        typer.echo(f"reindex: {exc}", err=True)
        raise typer.Exit(EXIT_LOCKED) from None
    except InstanceIndexError as exc:
        typer.echo(f"reindex: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        os.close(sort_lock)
        if held is not None:
            os.close(held)
    for uid, kept, other in summary.duplicates:
        typer.echo(f"reindex: {_duplicate_line(uid, kept, other)}", err=True)
    for rel, reason in summary.unreadable:
        typer.echo(f"reindex: {safe(rel)}: not indexed: {safe(reason)}", err=True)
    typer.echo(
        f"reindex: {summary.instances} instances indexed from {summary.files_seen} files, "
        f"{len(summary.duplicates)} duplicates, {len(summary.unreadable)} unreadable"
    )
    raise typer.Exit(1 if summary.unreadable else 0)


def _duplicate_line(uid: str, kept: str, other: str) -> str:
    """A file of the tree that holds an instance the index has in another file."""
    return f"{safe(other)}: another file of SOPInstanceUID {safe(uid)} (indexed: {safe(kept)})"


#: Set by ``sort`` once its work is done (workers joined, report and lock
#: closed): the process then ends without the interpreter's teardown of every
#: module typer and rich loaded.
_done = threading.Event()


def main() -> None:
    """The ``sortscp`` entry point (the console script and ``python -m scp``)."""
    try:
        app()
    except SystemExit as exc:
        if not _done.is_set():
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed pipe: nothing more can be said
                pass
        os._exit(code)

"""The events pipeline in-process, on a real index with real files (no server).

The index is filled through ``SqliteIndex.begin/commit`` exactly as the
server's workers do, with files copied into the layout; the arrival times are
set in the past so a series is stable at once. Real subprocesses for hooks,
a real ``http.server`` for the webhook, real HTTP scrapes of the metrics.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from scp.config import ServeConfig
from scp.events.hooks import HookRunner, command_argv, run_hook
from scp.events.manifest import series_manifest_path, study_manifest_path
from scp.events.pipeline import Pipeline
from scp.events.sinks import Webhook, event_record
from scp.log import DROP_LOG_SECONDS
from scp.store.index import SqliteIndex, create_empty, sha256_file

from conftest import cli_env, run_cli, unprivileged_prefix
from serve_helpers import wait_until

CT = Path(get_testdata_file("CT_small.dcm"))
PAST = 1000.0  #: seconds ago the instances "arrived": stable at once


def add_instance(index: SqliteIndex, out: Path, study: str, series: str, uid: str, *,
                 folder: str = "Doe^John_42/CT_1", ago: float = PAST, aet: str = "MODALITY",
                 patient_name: str = "Doe^John") -> str:
    """Put a real file at its layout path and commit its row, as a worker does
    (no digest: serve leaves it to the manifest)."""
    rel = f"{folder}/{uid}.dcm"
    dst = out / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CT, dst)
    facts = {
        "size": dst.stat().st_size, "digest": None, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1", "study_instance_uid": study, "series_instance_uid": series,
        "patient_name": patient_name, "patient_id": "42", "study_date": "20261201",
        "series_description": "CT", "series_number": 1, "modality": "CT", "calling_aet": aet,
    }
    claim = index.begin(uid, rel, facts)
    index.commit(claim, now=time.time() - ago)
    return rel


@pytest.fixture
def out(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    root.mkdir()
    create_empty(root)
    return root


@pytest.fixture
def index(out: Path):
    idx = SqliteIndex(out)
    yield idx
    idx.close()


def pipeline(out: Path, **options) -> Pipeline:
    cfg = replace(ServeConfig(out=out, host="127.0.0.1", series_stable_seconds=1, study_stable_seconds=1),
                  **options)
    p = Pipeline(cfg)
    p.start()
    return p


def lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- completion


def test_a_series_completes_once_with_a_manifest_of_exactly_its_instances(out: Path, index: SqliteIndex,
                                                                         tmp_path: Path) -> None:
    rels = [add_instance(index, out, "1.2.9", "1.2.9.1", f"1.2.9.1.{i}") for i in range(3)]
    add_instance(index, out, "1.2.9", "1.2.9.2", "1.2.9.2.1", folder="Doe^John_42/Scout_2", ago=0)  # still open
    events = tmp_path / "events.jsonl"
    p = pipeline(out, events=str(events))
    try:
        assert p.poll() == (1, 0)
        assert p.poll() == (0, 0)
    finally:
        p.stop()
    manifest = json.loads(series_manifest_path(out, "1.2.9.1").read_text())
    assert [i["path"] for i in manifest["instances"]] == sorted(rels)
    assert manifest["instance_count"] == 3 and manifest["revision"] == 1
    assert manifest["folder"] == "Doe^John_42/CT_1" and manifest["calling_aets"] == ["MODALITY"]
    assert all(i["digest"] == sha256_file(CT) and i["size"] == CT.stat().st_size for i in manifest["instances"])
    assert not series_manifest_path(out, "1.2.9.2").exists()
    done = [e for e in lines(events) if e["event"] == "series_complete"]
    assert [(e["series_instance_uid"], e["revision"], e["instance_count"]) for e in done] == [("1.2.9.1", 1, 3)]
    assert not list(series_manifest_path(out, "x").parent.glob(".tmp-*"))


def test_completion_is_once_across_a_restart_and_again_with_revision_2(out: Path, index: SqliteIndex,
                                                                      tmp_path: Path) -> None:
    for i in range(2):
        add_instance(index, out, "1.3.9", "1.3.9.1", f"1.3.9.1.{i}")
    events = tmp_path / "events.jsonl"
    first = pipeline(out, events=str(events))
    assert first.poll()[0] == 1
    first.stop()
    second = pipeline(out, events=str(events))  # a restart: the state is in the index
    try:
        assert second.poll()[0] == 0
        add_instance(index, out, "1.3.9", "1.3.9.1", "1.3.9.1.9")  # one more, later
        assert second.poll()[0] == 1
        assert second.poll()[0] == 0
    finally:
        second.stop()
    done = [(e["revision"], e["instance_count"]) for e in lines(events) if e["event"] == "series_complete"]
    assert done == [(1, 2), (2, 3)]
    assert json.loads(series_manifest_path(out, "1.3.9.1").read_text())["revision"] == 2


def test_two_pollers_at_once_complete_a_series_once(out: Path, index: SqliteIndex) -> None:
    for i in range(3):
        add_instance(index, out, "1.4.9", f"1.4.9.{i}", f"1.4.9.{i}.1", folder=f"P_1/S_{i}")
    a, b = pipeline(out), pipeline(out)
    try:
        results: list[tuple[int, int]] = []
        threads = [threading.Thread(target=lambda p=p: results.append(p.poll())) for p in (a, b, a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(r[0] for r in results) == 3
    finally:
        a.stop()
        b.stop()


def test_a_study_completes_after_its_series_with_a_manifest_of_them(out: Path, index: SqliteIndex,
                                                                   tmp_path: Path) -> None:
    add_instance(index, out, "1.5.9", "1.5.9.1", "1.5.9.1.1", folder="P_1/A_1")
    add_instance(index, out, "1.5.9", "1.5.9.2", "1.5.9.2.1", folder="P_1/B_2")
    add_instance(index, out, "1.5.9", "1.5.9.2", "1.5.9.2.2", folder="P_1/B_2")
    marker = tmp_path / "study-hook"
    p = pipeline(out, on_study_complete=f"sh -c 'env | grep ^SORTSCP_ > {marker}.part && mv {marker}.part {marker}'")
    try:
        p.poll()  # series first ...
        p.poll()  # ... then the study, in the same or the next round
        wait_until(marker.exists, what="the study hook")
    finally:
        p.stop()
    manifest = json.loads(study_manifest_path(out, "1.5.9").read_text())
    assert [(s["series_instance_uid"], s["instance_count"]) for s in manifest["series"]] == [
        ("1.5.9.1", 1), ("1.5.9.2", 2)]
    assert manifest["instance_count"] == 3 and manifest["revision"] == 1
    env = dict(line.split("=", 1) for line in marker.read_text().splitlines())
    assert env["SORTSCP_EVENT"] == "study_complete" and env["SORTSCP_STUDY_INSTANCE_UID"] == "1.5.9"
    assert Path(env["SORTSCP_MANIFEST"]) == study_manifest_path(out, "1.5.9").resolve()
    assert env["SORTSCP_REVISION"] == "1" and env["SORTSCP_SERIES_COUNT"] == "2"


def test_the_series_hook_gets_the_manifest_folder_and_revision(out: Path, index: SqliteIndex,
                                                              tmp_path: Path) -> None:
    add_instance(index, out, "1.6.9", "1.6.9.1", "1.6.9.1.1")
    marker = tmp_path / "series-hook"
    p = pipeline(out, on_series_complete=f'env | grep ^SORTSCP_ > "{marker}.part" && mv "{marker}.part" "{marker}"',
                 hook_shell=True)
    try:
        p.poll()
        wait_until(marker.exists, what="the series hook")
    finally:
        p.stop()
    env = dict(line.split("=", 1) for line in marker.read_text().splitlines())
    assert env["SORTSCP_EVENT"] == "series_complete"
    assert env["SORTSCP_SERIES_INSTANCE_UID"] == "1.6.9.1" and env["SORTSCP_STUDY_INSTANCE_UID"] == "1.6.9"
    assert env["SORTSCP_SERIES_FOLDER"] == "Doe^John_42/CT_1" and env["SORTSCP_REVISION"] == "1"
    assert json.loads(Path(env["SORTSCP_MANIFEST"]).read_text())["instance_count"] == 1


# --------------------------------------------------------------------------- stored events and hooks


def test_the_stored_hook_runs_per_instance_with_the_facts_of_its_row(out: Path, index: SqliteIndex,
                                                                    tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    p = pipeline(out, on_stored=f'sh -c \'f="{hooks}/$SORTSCP_SOP_INSTANCE_UID"; env | grep ^SORTSCP_ > "$f.part" && mv "$f.part" "$f"\'')
    rels = {}
    try:
        for i in range(5):
            uid = f"1.7.9.1.{i}"
            rels[uid] = add_instance(index, out, "1.7.9", "1.7.9.1", uid, ago=0)
            p.stored("MODALITY", uid, rels[uid], 100, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                     transfer_syntax_uid="1.2.840.10008.1.2.1", seconds=0.01)
        wait_until(lambda: len(list(hooks.glob("*[0-9]"))) == 5, what="5 hook runs")
        assert p.hooks is not None and p.hooks.wait_idle(10)
    finally:
        p.stop()
    for uid, rel in rels.items():
        env = dict(line.split("=", 1) for line in (hooks / uid).read_text().splitlines())
        assert env["SORTSCP_PATH"] == rel and Path(env["SORTSCP_ABSPATH"]) == (out / rel).resolve()
        assert env["SORTSCP_SERIES_INSTANCE_UID"] == "1.7.9.1" and env["SORTSCP_PATIENT_ID"] == "42"
        assert env["SORTSCP_CALLING_AET"] == "MODALITY" and env["SORTSCP_EVENT"] == "stored"
        assert env["SORTSCP_TRANSFER_SYNTAX_UID"] == "1.2.840.10008.1.2.1"
        assert env["SORTSCP_SIZE"] == str(CT.stat().st_size)
        assert "SORTSCP_DIGEST" not in env  # the manifest has it; reading each file would cost receiving


def test_no_shell_unless_asked(tmp_path: Path) -> None:
    """Without --hook-shell, `$X` and `;` are plain arguments, never shell syntax."""
    marker = tmp_path / "m"
    argv = command_argv(f"touch {marker} ;echo $HOME", shell=False)
    assert argv == ["touch", str(marker), ";echo", "$HOME"]
    r = run_hook("on_stored", argv, {}, 10, cwd=str(tmp_path))
    assert r.ok and marker.exists() and (tmp_path / ";echo").exists() and (tmp_path / "$HOME").exists()


def test_a_hook_runs_at_idle_priority_in_its_working_folder_and_its_stderr_tail_is_kept(tmp_path: Path) -> None:
    """Started by the runner's helper process: SCHED_IDLE from its first
    instruction, in the working folder given, its big stderr cut to its tail,
    its exit status."""
    code = ("import os, sys; sys.stderr.write('x' * 100000 + f' {os.sched_getscheduler(0)} {os.getcwd()}');"
            " sys.exit(4)")
    results: list = []
    runner = HookRunner(1, 30, cwd=str(tmp_path), on_result=lambda r, subject: results.append(r))
    try:
        assert runner._helper is not None  # noqa: SLF001 - the helper started
        assert runner.submit("on_stored", ["sh", "-c", f'{sys.executable} -c "{code}"'], {}, "uid")
        assert runner.wait_idle(30)
    finally:
        runner.stop(1)
    (r,) = results
    assert r.returncode == 4 and not r.ok and not r.timed_out
    assert r.stderr_tail.endswith(f" {os.SCHED_IDLE} {tmp_path}") and len(r.stderr_tail) <= 2000


def test_hooks_still_run_when_their_helper_process_dies(tmp_path: Path, caplog) -> None:
    results: list = []
    runner = HookRunner(1, 30, cwd=str(tmp_path), on_result=lambda r, subject: results.append(r))
    try:
        assert runner._helper is not None  # noqa: SLF001
        runner._helper.proc.kill()  # noqa: SLF001 - as the OOM killer would
        wait_until(lambda: "hook helper process ended" in caplog.text, what="the helper's end logged")
        assert runner.submit("on_stored", ["touch", "marker"], {}, "uid")
        assert runner.wait_idle(30)
    finally:
        runner.stop(1)
    assert [r.returncode for r in results] == [0] and (tmp_path / "marker").exists()


def test_a_run_in_flight_when_the_helper_dies_is_not_lost(tmp_path: Path, caplog) -> None:
    """The helper killed while it runs a hook: the run is started again from
    the server (at least once, reported once), and the next runs go there too."""
    results: list = []
    runner = HookRunner(2, 30, cwd=str(tmp_path), on_result=lambda r, subject: results.append((subject, r)))
    try:
        assert runner._helper is not None  # noqa: SLF001
        assert runner.submit("on_stored", ["sh", "-c", "echo x >> ran; sleep 0.5"], {}, "first")
        wait_until(lambda: (tmp_path / "ran").exists(), what="the hook started")
        runner._helper.proc.kill()  # noqa: SLF001
        wait_until(lambda: "hook helper process ended" in caplog.text, what="the helper's end logged")
        assert runner.submit("on_stored", ["touch", "second"], {}, "second")
        assert runner.wait_idle(30)
    finally:
        runner.stop(1)
    assert sorted(subject for subject, _ in results) == ["first", "second"]
    assert all(r.ok for _, r in results) and (tmp_path / "second").exists()


def test_a_hung_hook_is_killed_with_its_children_at_its_timeout(tmp_path: Path, caplog) -> None:
    pidfile = tmp_path / "child.pid"
    start = time.monotonic()
    r = run_hook("on_stored", ["sh", "-c", f"sleep 1000 & echo $! > {pidfile}; wait"], {}, 0.5)
    assert r.timed_out and not r.ok and time.monotonic() - start < 5
    child = int(pidfile.read_text())
    wait_until(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2],
             timeout=5, what="the hook's child killed")


def test_a_timed_out_hook_gets_sigterm_before_sigkill(tmp_path: Path) -> None:
    """The helper ignores SIGTERM (the server stops it by closing its stdin); the
    hooks it starts must not: one that traps SIGTERM ends on it at its timeout,
    and what it wrote on the way out is in its stderr tail."""
    results: list = []
    runner = HookRunner(1, 0.5, cwd=str(tmp_path), on_result=lambda r, subject: results.append(r))
    try:
        assert runner._helper is not None  # noqa: SLF001
        assert runner.submit("on_stored", ["sh", "-c", 'trap "echo got TERM >&2; exit 7" TERM; sleep 1000 & wait'],
                             {}, "uid")
        assert runner.wait_idle(30)
    finally:
        runner.stop(1)
    (r,) = results
    assert r.timed_out and not r.ok and r.returncode == 7 and r.stderr_tail == "got TERM"


def test_a_stored_event_names_the_version_it_was_sent_for_not_the_row_that_replaced_it(
        out: Path, index: SqliteIndex, tmp_path: Path) -> None:
    """The event is written up to 50 ms after the response; by then another
    version of the instance (a corrected SeriesInstanceUID, the same path) may
    have replaced its row. It carries the facts its worker committed."""
    events = tmp_path / "events.jsonl"
    rel = add_instance(index, out, "1.11.9", "1.11.9.1", "1.11.9.1.1", ago=0)
    first = index.lookup("1.11.9.1.1").facts()
    assert add_instance(index, out, "1.11.9", "1.11.9.2", "1.11.9.1.1", ago=0) == rel  # the second version
    p = pipeline(out, events=str(events))
    try:
        p.stored("MODALITY", "1.11.9.1.1", rel, 10, facts=first)
        wait_until(lambda: any(e["event"] == "stored" for e in lines(events)), what="the stored event")
    finally:
        p.stop()
    (event,) = [e for e in lines(events) if e["event"] == "stored"]
    assert event["series_instance_uid"] == "1.11.9.1" and event["study_instance_uid"] == "1.11.9"


def test_a_failing_hook_is_logged_in_one_line_with_its_stderr_and_becomes_an_event(
        out: Path, index: SqliteIndex, tmp_path: Path, caplog) -> None:
    events = tmp_path / "events.jsonl"
    p = pipeline(out, on_stored="sh -c 'echo something broke >&2; exit 3'", events=str(events))
    rel = add_instance(index, out, "1.8.9", "1.8.9.1", "1.8.9.1.1", ago=0)
    with caplog.at_level(logging.WARNING, logger="scp.events"):
        try:
            p.stored("MODALITY", "1.8.9.1.1", rel, 10)
            wait_until(lambda: any(e["event"] == "hook_failed" for e in lines(events)), what="hook_failed")
        finally:
            p.stop()
    failed = [r for r in caplog.records if "exited 3" in r.getMessage()]
    assert len(failed) == 1 and "something broke" in failed[0].getMessage()
    assert "\n" not in failed[0].getMessage()
    event = next(e for e in lines(events) if e["event"] == "hook_failed")
    assert event["returncode"] == 3 and event["hook"] == "on_stored" and "something broke" in event["stderr_tail"]
    scrape = p.metrics.registry.get_sample_value
    assert scrape("sortscp_hook_failures_total", {"hook": "on_stored"}) == 1
    assert scrape("sortscp_hook_runs_total", {"hook": "on_stored"}) == 1


def test_many_short_hooks_at_once_each_run_once_and_report_their_status(tmp_path: Path) -> None:
    """The helper watches every running hook in one loop: 300 runs submitted at
    once (8 at a time, ending in the same instants) each run exactly once, in
    its working folder, and report their own exit status."""
    results: list = []
    runner = HookRunner(8, 30, cwd=str(tmp_path), on_result=lambda r, subject: results.append((subject, r)))
    try:
        assert runner._helper is not None  # noqa: SLF001
        runs = [("on_stored", ["sh", "-c", f"echo > {i}.ran; exit {i % 7}"], {}, str(i)) for i in range(300)]
        assert runner.submit_all(runs) == 300
        assert runner.wait_idle(120)
    finally:
        runner.stop(1)
    assert sorted(int(subject) for subject, _ in results) == list(range(300))
    assert all(r.returncode == int(subject) % 7 and not r.timed_out for subject, r in results)
    assert sorted(int(f.stem) for f in tmp_path.glob("*.ran")) == list(range(300))


def test_a_full_hook_queue_drops_without_blocking_and_counts(tmp_path: Path, caplog) -> None:
    dropped: list[str] = []
    runner = HookRunner(1, 5, on_drop=lambda hook, subject, why: dropped.append(subject), queue_size=2)
    try:
        start = time.monotonic()
        accepted = [runner.submit("on_stored", ["sleep", "0.3"], {}, f"uid{i}") for i in range(20)]
        assert time.monotonic() - start < 0.5
        assert accepted.count(True) <= 3 and len(dropped) >= 17
    finally:
        runner.stop(0.1)


def test_a_flood_of_dropped_hook_runs_logs_a_line_a_second_and_counts_every_one(caplog) -> None:
    """A hung hook under a flood of instances: the log gets at most a line a
    second (not one per instance), and the counts in those lines add up to every
    run dropped."""
    dropped: list[str] = []
    runner = HookRunner(1, 30, on_drop=lambda hook, subject, why: dropped.append(subject), queue_size=2)
    with caplog.at_level(logging.WARNING, logger="scp.events.hooks"):
        try:
            start = time.monotonic()
            for i in range(5_000):
                runner.submit("on_stored", ["sleep", "1000"], {}, f"uid{i}")
            elapsed = time.monotonic() - start
        finally:
            runner.stop(0.1)
    full = [r for r in caplog.records if getattr(r, "reason", "").endswith("runs already waiting")]
    assert full and len(full) <= elapsed / DROP_LOG_SECONDS + 2
    assert dropped[0] in full[0].getMessage()  # the first drop is logged at once, by name
    held = [r for r in caplog.records if r.getMessage().startswith("hook runs dropped:")]
    cut_off = [r for r in caplog.records if getattr(r, "reason", "").startswith("the server stopped")]
    not_started = sum(sum(r.dropped.values()) for r in caplog.records if hasattr(r, "dropped"))
    logged = sum(r.count for r in full + held + cut_off)
    assert logged + not_started == len(dropped) >= 4_990


def test_stored_never_blocks_even_when_hooks_are_stuck(out: Path) -> None:
    p = pipeline(out, on_stored="sleep 1000", hook_concurrency=1, hook_timeout=30)
    try:
        start = time.monotonic()
        for i in range(20_000):  # more than every queue holds
            p.stored("MODALITY", f"1.9.{i}", f"a/{i}.dcm", 1)
        assert time.monotonic() - start < 5
        # What did not fit was dropped and counted: in the pipeline's queue, or
        # in the hooks' when the pipeline kept up (which one depends on timing;
        # the pipeline's thread may still be working through its queue).
        registry = p.metrics.registry

        def dropped() -> float:
            events = registry.get_sample_value("sortscp_events_dropped_total") or 0.0
            hooks = registry.get_sample_value("sortscp_hook_dropped_total", {"hook": "on_stored"}) or 0.0
            return events + hooks

        wait_until(lambda: dropped() > 0, timeout=30, what="a drop to be counted")
    finally:
        start = time.monotonic()
        p.stop(timeout=0.5)
        assert time.monotonic() - start < 15


# --------------------------------------------------------------------------- sinks


class _Collector(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook_server():
    _Collector.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", _Collector.received
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_webhook_receives_each_event_as_json(out: Path, index: SqliteIndex, webhook_server) -> None:
    url, received = webhook_server
    p = pipeline(out, webhook=url)
    try:
        rel = add_instance(index, out, "1.10.9", "1.10.9.1", "1.10.9.1.1")
        p.stored("MODALITY", "1.10.9.1.1", rel, 10)
        p.poll()
        wait_until(lambda: {e["event"] for e in received} >= {"stored", "series_complete"}, what="2 POSTs")
    finally:
        p.stop()
    stored = next(e for e in received if e["event"] == "stored")
    assert stored["path"] == rel and stored["series_instance_uid"] == "1.10.9.1"
    assert p.metrics.registry.get_sample_value("sortscp_webhook_posts_total") >= 2


def test_a_dead_webhook_drops_with_a_log_line_and_never_blocks(caplog) -> None:
    drops: list[str] = []
    hook = Webhook(f"http://127.0.0.1:{closed_port()}/", on_drop=drops.append, backoff=0.05)
    with caplog.at_level(logging.WARNING, logger="scp.events"):
        start = time.monotonic()
        for i in range(3):
            hook.send(event_record("stored", sop_instance_uid=str(i)))
        assert time.monotonic() - start < 0.1
        wait_until(lambda: len(drops) == 3, what="3 drops")
        hook.stop(1)
    # At most a line a second, each with its count: together they tell every drop.
    records = [r for r in caplog.records if getattr(r, "event", None) == "webhook_dropped"]
    assert "dropped the stored event" in records[0].getMessage() and "3 attempt(s)" in records[0].getMessage()
    assert sum(r.count for r in records) == 3


def test_events_to_stdout_one_json_line_each(out: Path, index: SqliteIndex, capsys) -> None:
    p = pipeline(out, events="-")
    try:
        rel = add_instance(index, out, "1.11.9", "1.11.9.1", "1.11.9.1.1")
        p.stored("MODALITY", "1.11.9.1.1", rel, 10)
        p.poll()
        p.poll()
        wait_until(lambda: p._queue.empty(), what="the dispatcher")
    finally:
        p.stop()
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in got] == ["stored", "series_complete", "study_complete"]


# --------------------------------------------------------------------------- metrics


def test_metrics_are_served_over_http(out: Path, tmp_path: Path) -> None:
    p = pipeline(out, metrics_port=0)
    try:
        p.association_opened()
        p.stored("CT_A", "1.2", "a/1.2.dcm", 1234, seconds=0.02)
        p.failed("CT_A", 0xA700, seconds=0.01)
        host, port = p.metrics_address
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    finally:
        p.stop()
    assert 'sortscp_instances_stored_total{calling_aet="CT_A"} 1.0' in text
    assert 'sortscp_instances_failed_total{calling_aet="CT_A",status="0xA700"} 1.0' in text
    assert 'sortscp_stored_bytes_total{calling_aet="CT_A"} 1234.0' in text
    assert "sortscp_associations_total 1.0" in text and "sortscp_associations_active 1.0" in text
    assert "sortscp_store_seconds_count 2.0" in text
    free = float(next(line.split()[1] for line in text.splitlines() if line.startswith("sortscp_output_free_bytes")))
    assert free == pytest.approx(shutil.disk_usage(out).free, rel=0.05)


def test_calling_aet_labels_are_bounded() -> None:
    from scp.events.metrics import MAX_AET_LABELS, Metrics

    m = Metrics(Path("."))
    for i in range(MAX_AET_LABELS + 50):
        m.stored(f"AE{i}", 1, None)
    assert m.registry.get_sample_value("sortscp_instances_stored_total", {"calling_aet": "other"}) == 50


# --------------------------------------------------------------------------- sortscp ls


def test_ls_lists_studies_and_series_as_a_table_and_json(out: Path, index: SqliteIndex) -> None:
    add_instance(index, out, "1.12.9", "1.12.9.1", "1.12.9.1.1", folder="Doe^John_42/CT_1")
    add_instance(index, out, "1.12.9", "1.12.9.1", "1.12.9.1.2", folder="Doe^John_42/CT_1")
    add_instance(index, out, "1.12.9", "1.12.9.2", "1.12.9.2.1", folder="Doe^John_42/Scout_2", ago=0)
    p = pipeline(out)
    p.poll()
    p.stop()
    table = run_cli("ls", out, env={**_env(), "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "Doe^John_42/CT_1" in table.stdout and "Doe^John_42/Scout_2" in table.stdout
    assert "yes (rev 1)" in table.stdout and "1 studies, 2 series, 3 instances" in table.stdout
    js = run_cli("ls", "--json", out)
    assert js.returncode == 0, js.stderr
    (study,) = json.loads(js.stdout)["studies"]
    assert study["patient_name"] == "Doe^John" and study["instances"] == 3
    assert [(s["folder"], s["instances"], s["complete"]) for s in study["series"]] == [
        ("Doe^John_42/CT_1", 2, True), ("Doe^John_42/Scout_2", 1, False)]


def test_ls_prints_no_control_characters_a_sender_put_in_a_name(out: Path, index: SqliteIndex) -> None:
    """A PatientName with an escape sequence and a newline (any sender can send
    one) must not reach the terminal as such: shown escaped, on its own row."""
    add_instance(index, out, "1.12.8", "1.12.8.1", "1.12.8.1.1", folder="EVIL_42/CT_1",
                 patient_name="EV\x1b[2J\x1b[31mIL\nFORGED")
    table = run_cli("ls", out, env={**_env(), "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout, repr(table.stdout)
    assert r"EV\x1b[2J\x1b[31mIL\nFORGED" in table.stdout, table.stdout
    js = run_cli("ls", "--json", out)  # JSON escapes them itself, and keeps the value
    assert json.loads(js.stdout)["studies"][0]["patient_name"] == "EV\x1b[2J\x1b[31mIL\nFORGED"


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("server", ["running", "stopped"])
def test_ls_changes_nothing_in_out(out: Path, server: str) -> None:
    """``ls`` reads: it created OUT/.sortscp/index.lock when it was missing (a
    copied index), and SQLite's -wal and -shm, left behind for the server's
    user to trip over, when the index was closed."""
    index = SqliteIndex(out)
    add_instance(index, out, "1.12.7", "1.12.7.1", "1.12.7.1.1")
    if server == "stopped":
        index.close(clean=True)
    (out / ".sortscp" / "index.lock").unlink()
    before = _tree(out)
    try:
        for args in (["ls", out], ["ls", "--json", out]):
            result = run_cli(*args, env={**cli_env(), "COLUMNS": "200"})
            assert result.returncode == 0 and "Doe^John_42/CT_1" in result.stdout, result.stderr
        after = _tree(out)
        if server == "running":  # a reader marks its place in the server's shared memory
            shm = ".sortscp/index.sqlite-shm"
            before[shm], after[shm] = before[shm][:2], after[shm][:2]
        assert after == before
    finally:
        index.close()


def test_ls_reads_an_index_in_a_folder_it_cannot_write(out: Path) -> None:
    """A read-only mount, or another user's OUT: it failed to open the lock
    file for writing ("cannot open the index ... Permission denied")."""
    prefix = unprivileged_prefix()
    index = SqliteIndex(out)
    add_instance(index, out, "1.12.6", "1.12.6.1", "1.12.6.1.1")
    index.close(clean=True)
    state = out / ".sortscp"
    for p in state.iterdir():
        p.chmod(0o444)
    state.chmod(0o555)
    try:
        result = subprocess.run([*prefix, sys.executable, "-m", "scp", "ls", "--json", str(out)],
                                capture_output=True, text=True, timeout=60, env=cli_env())
    finally:
        state.chmod(0o755)
    assert result.returncode == 0, result.stderr
    (study,) = json.loads(result.stdout)["studies"]
    assert study["study_instance_uid"] == "1.12.6" and study["instances"] == 1


def test_ls_without_an_index_says_so_and_exits_1(tmp_path: Path) -> None:
    result = run_cli("ls", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: no index at") and "Traceback" not in result.stderr


@pytest.mark.parametrize("damage", [b"garbage\n", b"SQLite format 3\x00" + b"\x00" * 84])
def test_ls_of_a_damaged_index_says_so_and_exits_1(tmp_path: Path, damage: bytes) -> None:
    """Not a database, or a header cut short: one line, no traceback (it used
    to print sqlite3's). `serve` rebuilds such an index from the tree."""
    (tmp_path / ".sortscp").mkdir()
    (tmp_path / ".sortscp" / "index.sqlite").write_bytes(damage)
    result = run_cli("ls", tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().startswith("error: cannot read the index of"), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _env() -> dict[str, str]:
    from conftest import cli_env

    return cli_env()


# --------------------------------------------------------------------------- sinks that stop taking events


def test_an_events_fifo_nobody_reads_holds_up_no_completion_and_no_stop(out: Path, index: SqliteIndex,
                                                                         tmp_path: Path) -> None:
    """A reader that opened the FIFO and stopped reading (a stuck log
    shipper): once the pipe was full, the write blocked under a lock, every
    later series stayed incomplete, its hook never ran, and the stop hung."""
    fifo, marks = tmp_path / "events.fifo", tmp_path / "marks"
    os.mkfifo(fifo)
    marks.mkdir()
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, never read
    try:
        p = pipeline(out, events=str(fifo), hook_shell=True,
                     on_series_complete=f'touch "{marks}/$SORTSCP_SERIES_INSTANCE_UID"')
        try:
            for i in range(3000):  # far more than a pipe holds (64 KiB)
                p.stored("MODALITY", f"1.14.{i}", f"a/{i}.dcm", 1)
            for s in range(4):
                add_instance(index, out, "1.14", f"1.14.{s}", f"1.14.{s}.1", folder=f"P/S_{s}")
            wait_until(lambda: p.poll()[0] == 0 and len(list(marks.iterdir())) == 4, timeout=30,
                       what="every series complete, its hook run")
        finally:
            start = time.monotonic()
            p.stop()
            took = time.monotonic() - start
        assert took < 10, f"the stop took {took:.1f} s"
        assert sorted(m.name for m in marks.iterdir()) == [f"1.14.{s}" for s in range(4)]
        assert all(s.complete for s in index.series_list())
    finally:
        os.close(reader)


def test_a_hung_hook_and_a_black_hole_webhook_stop_within_seconds(out: Path, index: SqliteIndex) -> None:
    """Each stage waited its own 5 s (and a POST under way 6 s more): 16 s in
    all, past docker stop's 10 s, whose SIGKILL leaves the index unclean."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # accepts, never answers
    try:
        p = pipeline(out, on_stored="sleep 600", webhook=f"http://127.0.0.1:{hole.getsockname()[1]}/")
        for i in range(5):
            p.stored("MODALITY", f"1.15.{i}", f"a/{i}.dcm", 1)
        time.sleep(0.5)  # the hooks started, the webhook is posting
        start = time.monotonic()
        p.stop()
        took = time.monotonic() - start
    finally:
        hole.close()
    assert took < 9, f"the stop took {took:.1f} s"


def test_events_to_a_fifo_without_a_reader_or_a_closed_stdout_is_a_start_error(tmp_path: Path) -> None:
    """Opening a FIFO nobody reads blocked the start for ever, deaf to
    SIGTERM; '--events -' with stdout closed lost every series hook later."""
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    for events, close_stdout in ((str(fifo), False), ("-", True)):
        argv = [sys.executable, "-m", "scp", "serve", "--out", str(tmp_path / "out"), "--host", "127.0.0.1",
                "--port", "0", "--events", events]
        r = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *argv] if close_stdout else argv,
                           capture_output=not close_stdout, stderr=subprocess.PIPE if close_stdout else None,
                           text=True, timeout=30, env=cli_env())
        assert r.returncode == 2, r.stderr
        lines_ = [line for line in r.stderr.splitlines() if " INFO " not in line]
        assert len(lines_) == 1 and "cannot open the events file" in lines_[0], r.stderr
        assert ("no process reads" if not close_stdout else "standard output is closed") in lines_[0]


def test_the_events_file_on_a_full_disk_holds_whole_lines_only(tmpfs) -> None:
    """A write cut short by a full file system left half a JSON line, to which
    the next write was glued once space came back."""
    from scp.events.sinks import EventLog

    mount = tmpfs("64k")
    filler, target = mount / "filler", mount / "events.jsonl"
    events = EventLog(str(target))
    try:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # the whole space, then all but ~3 events' worth
        try:
            while True:
                os.write(fd, b"\0" * 512)
        except OSError:
            pass
        finally:
            os.close(fd)
        os.truncate(filler, filler.stat().st_size - 4096)  # one page: 4 lines fit, the 5th only in part
        for n in range(20):
            events.write(event_record("stored", path=f"a/{n}.dcm", note="x" * 900))
            time.sleep(0.01)
    finally:
        events.close(timeout=5)  # (stopped while the disk is still full)
    text = target.read_text()
    assert text.endswith("\n"), text[-200:]
    records = [json.loads(line) for line in text.splitlines()]  # each line whole
    assert 1 <= len(records) < 20, [r["path"] for r in records]
    filler.unlink()  # space again, a new run appends
    events = EventLog(str(target))
    events.write(event_record("stored", path="after.dcm"))
    events.close(timeout=5)
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert records[-1]["path"] == "after.dcm", [r["path"] for r in records]

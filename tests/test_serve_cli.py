"""``python -m scp serve`` as a real process: options, environment, logs, signals."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from scp.net.status import SUCCESS
from scp.store.tmp import TMP_DIRNAME

from conftest import ServeProcess, cli_env, free_port, run_cli, storable_dicom_files, wait_for_port
from serve_helpers import (
    CALLING_AET,
    ct_copies,
    dataset_bytes,
    expected_path,
    layout_files,
    send_datasets,
    send_files,
    serve_env_process,
    stop,
    wait_until,
)

CT = Path(get_testdata_file("CT_small.dcm"))
MR = Path(get_testdata_file("MR_small.dcm"))

def _log(server: ServeProcess) -> str:
    """The server's output so far (also after it stopped)."""
    return server.log_path.read_text(errors="replace")


SERVE_OPTIONS = {
    "--out": "SORTSCP_OUT", "--aet": "SORTSCP_AET", "--port": "SORTSCP_PORT",
    "--host": "SORTSCP_HOST", "--workers": "SORTSCP_WORKERS", "--template": "SORTSCP_TEMPLATE",
    "--on-duplicate": "SORTSCP_ON_DUPLICATE", "--max-associations": "SORTSCP_MAX_ASSOCIATIONS",
    "--max-pdu": "SORTSCP_MAX_PDU", "--acse-timeout": "SORTSCP_ACSE_TIMEOUT",
    "--dimse-timeout": "SORTSCP_DIMSE_TIMEOUT", "--network-timeout": "SORTSCP_NETWORK_TIMEOUT",
    "--drain-timeout": "SORTSCP_DRAIN_TIMEOUT", "--log-level": "SORTSCP_LOG_LEVEL",
    "--log-format": "SORTSCP_LOG_FORMAT",
}


def test_help_lists_every_option_with_its_environment_variable_and_default() -> None:
    result = run_cli("serve", "--help")
    text = " ".join(result.stdout.split())  # undo line wrapping
    assert result.returncode == 0, result.stdout + result.stderr
    for option, var in SERVE_OPTIONS.items():
        assert option in text, f"{option} missing from --help:\n{text}"
        assert var in text, f"{var} missing from --help:\n{text}"
    for default in ("default: sorted", "default: SORTSCP", "default: 11112", "default: 0.0.0.0",
                    "default: replace"):
        assert default in text, f"{default!r} missing from --help:\n{text}"


def test_every_serve_option_can_come_from_its_environment_variable() -> None:
    """Not just the options listed above: every option the command has."""
    import typer.main

    from scp.cli import app

    serve = typer.main.get_command(app).commands["serve"]
    options = [p for p in serve.params if p.param_type_name == "option" and p.name != "help"]
    assert len(options) >= len(SERVE_OPTIONS)
    missing = {p.opts[0]: p.envvar for p in options if p.envvar != f"SORTSCP_{p.name.upper()}"}
    assert not missing, f"options without their SORTSCP_* variable: {missing}"


def test_a_command_line_option_wins_over_its_environment_variable(tmp_path: Path) -> None:
    port = free_port()
    env = dict(cli_env(), SORTSCP_AET="FROM_ENV", SORTSCP_PORT=str(port))
    proc = serve_env_process(env, tmp_path, "--aet", "FROM_CLI", "--host", "127.0.0.1")
    try:
        wait_for_port(port, proc=proc)
        assert send_files(port, [CT], called="FROM_CLI") == {CT: SUCCESS}
    finally:
        code = stop(proc)
    log = (tmp_path / "serve.log").read_text()
    assert code == 0, log
    assert f":{port} as FROM_CLI" in log, log


def test_serve_without_arguments_files_into_sorted_of_the_working_folder(tmp_path: Path) -> None:
    env = cli_env()
    port = free_port()
    if port != 11112:  # the default port may be taken on a test machine
        env["SORTSCP_PORT"] = str(port)
    proc = serve_env_process(env, tmp_path)
    try:
        wait_for_port(port, proc=proc)
        assert send_files(port, [CT]) == {CT: SUCCESS}
    finally:
        code = stop(proc)
    log = (tmp_path / "serve.log").read_text()
    assert code == 0, log
    assert f":{port} as SORTSCP" in log, log
    assert (tmp_path / "sorted" / expected_path(CT)).is_file(), log


def test_serve_configured_only_by_environment(tmp_path: Path) -> None:
    first = tmp_path / "first.dcm"
    ds = pydicom.dcmread(CT)
    ds.StudyDescription = "first"
    ds.save_as(first, enforce_file_format=True)
    port = free_port()
    out = tmp_path / "env-out"
    env = {
        **cli_env(), "SORTSCP_OUT": str(out), "SORTSCP_AET": "ENVSCP",
        "SORTSCP_PORT": str(port), "SORTSCP_HOST": "127.0.0.1", "SORTSCP_WORKERS": "1",
        "SORTSCP_TEMPLATE": "{PatientID}/{Modality}/{SOPInstanceUID}.dcm",
        "SORTSCP_ON_DUPLICATE": "keep", "SORTSCP_LOG_LEVEL": "DEBUG", "SORTSCP_LOG_FORMAT": "json",
    }
    proc = serve_env_process(env, tmp_path)
    try:
        wait_for_port(port, proc=proc)
        assert send_files(port, [first], called="ENVSCP") == {first: SUCCESS}
        assert send_files(port, [CT], called="ENVSCP") == {CT: SUCCESS}
    finally:
        code = stop(proc)
    log = (tmp_path / "serve.log").read_text()
    assert code == 0, log
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert any("as ENVSCP" in r["message"] and "1 workers" in r["message"] for r in records), log
    assert any(r["level"] == "DEBUG" and r["logger"] == "scp.net.handlers" for r in records), log
    target = out / expected_path(CT, "{PatientID}/{Modality}/{SOPInstanceUID}.dcm")
    assert layout_files(out) == [target]
    assert dataset_bytes(target) == dataset_bytes(first), "keep: the first received stays"


def test_deep_output_folder(tmp_path: Path) -> None:
    out = tmp_path / ("d" * 60) / ("e" * 60) / "out"
    out.parent.mkdir(parents=True)
    server = ServeProcess(out)
    try:
        assert send_files(server.port, [CT]) == {CT: SUCCESS}
    finally:
        assert server.terminate() == 0, _log(server)
    assert (out / expected_path(CT)).is_file()


def test_the_stop_line_counts_resends_as_already_there_as_each_association_does(tmp_path: Path) -> None:
    """One instance sent three times is one stored, two already there: in the
    line of each association and in the line of the stop, which an audit reads."""
    server = ServeProcess(tmp_path / "out")
    try:
        for _ in range(3):
            assert send_files(server.port, [CT]) == {CT: SUCCESS}
        # (each association's line is written at its close, after the sender saw its release)
        wait_until(lambda: _log(server).count("association from") == 3, what="the 3 association lines")
    finally:
        assert server.terminate() == 0, _log(server)
    lines = _log(server).rstrip().splitlines()
    assert sum("released: 1 stored, 0 failed" in line for line in lines) == 1, lines
    assert sum("released: 0 stored, 1 already there, 0 failed" in line for line in lines) == 2, lines
    assert lines[-1].endswith("stopped: 1 instances stored, 2 already there, 0 failed"), lines


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2], ids=["SIGUSR1", "SIGUSR2"])
def test_a_reopen_logs_signal_is_one_line_not_a_death(tmp_path: Path, signum: int) -> None:
    """logrotate's ``postrotate`` often sends SIGUSR1: it killed the server the
    default way (no log line, the index not closed cleanly)."""
    server = ServeProcess(tmp_path / "out")
    try:
        os.kill(server.proc.pid, signum)
        wait_until(lambda: "received: nothing to do" in _log(server), timeout=10, what="the line")
        assert server.proc.poll() is None, _log(server)
        assert send_files(server.port, [CT]) == {CT: SUCCESS}
    finally:
        assert server.terminate() == 0, _log(server)
    assert _log(server).rstrip().splitlines()[-1].endswith("stopped: 1 instances stored, 0 failed")


def test_sigterm_is_not_held_up_by_a_connection_that_never_associated(tmp_path: Path) -> None:
    # ServeProcess waits for the port with a bare connect/close, like a health check
    server = ServeProcess(tmp_path / "out", "--drain-timeout", "600", "--acse-timeout", "600")
    assert server.terminate(timeout=60) == 0, _log(server)
    assert "association(s) still open" not in _log(server)


# --- logs ----------------------------------------------------------------------


def _json_records(server: ServeProcess) -> list[dict]:
    return [json.loads(line) for line in _log(server).splitlines() if line.strip()]


def test_json_logs_one_line_per_association_failure_and_instance(serve_process) -> None:
    server = serve_process("--log-format", "json", "--log-level", "DEBUG")
    patient_folder = server.out / expected_path(CT).parts[0]
    patient_folder.write_bytes(b"occupied")  # storing CT_small must fail
    statuses = send_files(server.port, [CT, MR])
    assert statuses == {CT: 0xA700, MR: SUCCESS}

    def association_logged() -> bool:
        return any(r.get("event") == "association" for r in _json_records(server))

    wait_until(association_logged, what="the association log line")
    assert server.terminate() == 0, _log(server)
    records = _json_records(server)
    assoc = [r for r in records if r.get("event") == "association"]
    assert len(assoc) == 1, records
    line = assoc[0]
    assert line["level"] == "INFO"
    assert line["calling_aet"] == CALLING_AET
    assert line["peer"].startswith("127.0.0.1:")
    assert (line["stored"], line["failed"]) == (1, 1)
    assert line["bytes"] == len(dataset_bytes(MR))
    assert line["seconds"] >= 0
    failures = [r for r in records if r.get("event") == "store_failed"]
    assert len(failures) == 1, records
    assert failures[0]["level"] == "ERROR"
    assert failures[0]["status"] == 0xA700
    assert failures[0]["sop_instance"] == pydicom.dcmread(CT).SOPInstanceUID
    assert failures[0]["reason"], failures[0]
    stored = [r for r in records if r["level"] == "DEBUG" and r["message"].startswith("stored ")]
    assert len(stored) == 1 and str(expected_path(MR)) in stored[0]["message"], records


def test_text_logs_at_info_have_no_per_instance_lines(serve_process) -> None:
    server = serve_process()
    assert send_files(server.port, [CT, MR]) == {CT: SUCCESS, MR: SUCCESS}
    wait_until(lambda: "association from" in _log(server), what="the association log line")
    assert server.terminate() == 0, _log(server)
    lines = [ln for ln in _log(server).splitlines() if "association from" in ln]
    assert len(lines) == 1, _log(server)
    assert f"association from {CALLING_AET} (127.0.0.1:" in lines[0]
    assert "released: 2 stored, 0 failed" in lines[0]
    assert "stored 1." not in _log(server)


@pytest.mark.parametrize("policy", ["replace", "keep"])
def test_the_association_line_tells_a_resend_from_a_new_file(serve_process, policy) -> None:
    """An instance the tree holds already (the same bytes again; with keep, any
    bytes) is answered Success but is no new file: the line says so."""
    server = serve_process("--on-duplicate", policy)
    assert send_files(server.port, [CT, MR, CT]) == {CT: SUCCESS, MR: SUCCESS}
    wait_until(lambda: "association from" in _log(server), what="the association log line")
    assert server.terminate() == 0, _log(server)
    lines = [ln for ln in _log(server).splitlines() if "association from" in ln]
    assert len(lines) == 1 and "released: 2 stored, 1 already there, 0 failed" in lines[0], lines


# --- concurrency and shutdown ----------------------------------------------------


def test_concurrent_associations_all_succeed(serve_process) -> None:
    server = serve_process("--workers", "2")
    batches = [ct_copies(12, patient=f"Concurrent^{i}") for i in range(4)]
    results: dict[int, list[int]] = {}

    def send(i: int) -> None:
        results[i] = send_datasets(server.port, batches[i], calling=f"SCU{i}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert server.terminate() == 0, _log(server)
    assert {i: set(s) for i, s in results.items()} == {i: {SUCCESS} for i in range(4)}
    for i, batch in enumerate(batches):
        folder = server.out / f"Concurrent^{i}_{batch[0].PatientID}"
        names = {p.name for p in folder.rglob("*.dcm")}
        assert names == {f"{ds.SOPInstanceUID}.dcm" for ds in batch}, f"association {i}"
        for p in folder.rglob("*.dcm"):
            assert pydicom.dcmread(p).file_meta.SourceApplicationEntityTitle == f"SCU{i}"


@pytest.mark.parametrize(("signum", "group"), [
    (signal.SIGTERM, False),  # `kill PID`, docker stop
    (signal.SIGTERM, True),  # systemd: every process of the service at once
    (signal.SIGHUP, True),  # the terminal or SSH session closed: its process group
], ids=["SIGTERM", "SIGTERM to the group", "SIGHUP to the group"])
def test_a_stop_signal_during_a_transfer_finishes_the_association_and_exits_0(
        serve_process, signum: signal.Signals, group: bool) -> None:
    """SIGHUP killed the server on the spot, without a line, associations
    cut; SIGTERM to its workers too killed them, failing what was in flight."""
    server = serve_process("--workers", "2", new_session=group)
    datasets = ct_copies(80, patient="Sigterm^Test")
    statuses: list[int] = []
    done = threading.Event()
    from pynetdicom import AE

    def send() -> None:
        ae = AE(ae_title=CALLING_AET)
        ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", server.port)
        try:
            for ds in datasets:
                rsp = assoc.send_c_store(ds)
                statuses.append(rsp.Status if "Status" in rsp else -1)
        finally:
            assoc.release()
            done.set()

    sender = threading.Thread(target=send)
    sender.start()
    wait_until(lambda: len(statuses) >= 10, what="the first instances")
    (os.killpg if group else os.kill)(server.proc.pid, signum)
    code = server.proc.wait(120)
    sender.join(60)
    log = _log(server)
    assert code == 0, log
    assert done.is_set()
    assert statuses == [SUCCESS] * len(datasets), f"the association in flight should finish\n{log}"
    stored = datasets
    assert log.rstrip().splitlines()[-1].endswith(f"stopped: {len(datasets)} instances stored, 0 failed"), log
    files = layout_files(server.out)
    assert {p.name for p in files} == {f"{ds.SOPInstanceUID}.dcm" for ds in stored}
    for p in files:  # complete, readable instances only
        ds = pydicom.dcmread(p)
        assert len(ds.PixelData) == len(datasets[0].PixelData), p
    assert not [p for p in (server.out / TMP_DIRNAME).iterdir() if p.suffix == ".part"]
    # the listening socket is closed, so new senders are refused
    with pytest.raises(OSError):
        wait_for_port(server.port, timeout=0.5)


# --- serve and sort give the same tree -----------------------------------------------


def test_serve_and_sort_give_the_same_tree(tmp_path: Path, serve_process) -> None:
    seen: set[str] = set()
    files = []
    for f in storable_dicom_files():
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        if uid not in seen:
            seen.add(uid)
            files.append(f)
    server = serve_process()
    statuses = send_files(server.port, files)
    assert set(statuses.values()) == {SUCCESS}, {f.name: s for f, s in statuses.items() if s}
    assert server.terminate() == 0, _log(server)
    src = tmp_path / "src"
    src.mkdir()
    for i, f in enumerate(files):
        (src / f"{i:04d}_{f.name}").write_bytes(f.read_bytes())
    result = run_cli("sort", src, tmp_path / "sorted")
    assert result.returncode == 0, result.stdout + result.stderr
    served = {p.relative_to(server.out): p for p in layout_files(server.out)}
    sorted_ = {p.relative_to(tmp_path / "sorted"): p for p in layout_files(tmp_path / "sorted")}
    assert sorted(served) == sorted(sorted_)
    assert len(served) == len(files)
    for rel, p in served.items():
        assert dataset_bytes(p) == dataset_bytes(sorted_[rel]), rel
        assert pydicom.dcmread(p, stop_before_pixels=True).file_meta.SourceApplicationEntityTitle \
            == CALLING_AET

"""Events, hooks and metrics through real associations: ``python -m scp serve``
child processes fed by pynetdicom's SCU with real pydicom files.

Series completion, manifests, ``ls`` and the series/study UIDs of a stored
event come from the index rows serve commits with every instance. How much a
hung hook or a dead webhook slows receiving is measured in
``benchmarks/bench_serve.py --variant ...``; here only the statuses and generous bounds
(a hung hook never holds a C-STORE response for its timeout) are asserted.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import sqlite3
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from scp.events.manifest import series_manifest_path, study_manifest_path
from scp.events.sinks import WEBHOOK_TIMEOUT
from scp.store.index import index_path, sha256_file

from conftest import free_port, in_threads, run_cli
from serve_helpers import CALLING_AET, ct_copies, layout_files, send_datasets, timed_stores, wait_until

SUCCESS = 0x0000
STABLE = ("--series-stable-seconds", "1", "--study-stable-seconds", "1")


def assert_indexed(out: Path) -> None:
    assert index_path(out).is_file(), "serve commits every instance through the index"


def json_lines(text: str) -> list[dict]:
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "event" in record and "time" in record:
                found.append(record)
    return found


def events_of(path: Path, kind: str | None = None) -> list[dict]:
    if not path.exists():
        return []
    got = json_lines(path.read_text())
    return [e for e in got if kind is None or e["event"] == kind]


def test_the_stored_hook_writes_a_file_per_instance(serve_process, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    server = serve_process(
        "--hook-shell", "--on-stored",
        f'f="{marks}/$SORTSCP_SOP_INSTANCE_UID"; {{ env | grep ^SORTSCP_; echo "HOOK_CWD=$(pwd -P)"; }} > "$f.part"'
        ' && mv "$f.part" "$f"')
    datasets = ct_copies(4)
    assert send_datasets(server.port, datasets) == [SUCCESS] * 4
    wait_until(lambda: len(list(marks.glob("*[0-9]"))) == 4, what="4 hook files")
    for ds in datasets:
        env = dict(line.split("=", 1) for line in (marks / ds.SOPInstanceUID).read_text().splitlines())
        assert (server.out / env["SORTSCP_PATH"]).is_file()
        assert Path(env["SORTSCP_ABSPATH"]) == (server.out / env["SORTSCP_PATH"]).resolve()
        assert env["SORTSCP_CALLING_AET"] == CALLING_AET and env["SORTSCP_EVENT"] == "stored"
        assert Path(env["HOOK_CWD"]) == server.out.resolve()  # hooks run in OUT
        assert env["SORTSCP_SOP_CLASS_UID"] == ds.SOPClassUID
        assert env["SORTSCP_TRANSFER_SYNTAX_UID"] == ds.file_meta.TransferSyntaxUID
    assert_indexed(server.out)
    env = dict(line.split("=", 1) for line in (marks / datasets[0].SOPInstanceUID).read_text().splitlines())
    assert env["SORTSCP_SERIES_INSTANCE_UID"] == datasets[0].SeriesInstanceUID
    assert env["SORTSCP_STUDY_INSTANCE_UID"] == datasets[0].StudyInstanceUID
    assert env["SORTSCP_PATIENT_ID"] == str(datasets[0].PatientID)


def test_a_fact_an_instance_lacks_is_null_in_its_event_and_empty_for_its_hook(
    serve_process, tmp_path: Path
) -> None:
    marks, events = tmp_path / "marks", tmp_path / "events.jsonl"
    marks.mkdir()
    server = serve_process(
        "--events", events, "--hook-shell", "--on-stored",
        f'set -u; printf "%s" "$SORTSCP_STUDY_DATE" > "{marks}/$SORTSCP_SOP_INSTANCE_UID"')
    (ds,) = ct_copies(1)
    del ds.StudyDate
    assert send_datasets(server.port, [ds]) == [SUCCESS]
    wait_until(lambda: (marks / ds.SOPInstanceUID).exists() and events_of(events, "stored"), what="hook and event")
    assert (marks / ds.SOPInstanceUID).read_text() == ""  # set, empty: `set -u` did not stop it
    (event,) = events_of(events, "stored")
    assert "study_date" in event and event["study_date"] is None, event
    assert "hook_failed" not in server.log()


def test_a_series_over_two_associations_completes_once_with_exactly_its_instances(
        serve_process, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    hook_log = tmp_path / "series-hook.log"
    server = serve_process(*STABLE, "--events", str(events), "--hook-shell",
                           "--on-series-complete", f'echo "$SORTSCP_SERIES_INSTANCE_UID $SORTSCP_REVISION" >> "{hook_log}"')
    datasets = ct_copies(5)
    assert send_datasets(server.port, datasets[:3]) == [SUCCESS] * 3
    assert_indexed(server.out)
    assert send_datasets(server.port, datasets[3:]) == [SUCCESS] * 2
    wait_until(lambda: events_of(events, "study_complete"), timeout=30, what="the study to complete")
    time.sleep(2.5)  # several more polls: nothing completes twice
    series = datasets[0].SeriesInstanceUID
    done = events_of(events, "series_complete")
    assert [(e["series_instance_uid"], e["revision"], e["instance_count"]) for e in done] == [(series, 1, 5)]
    assert len(events_of(events, "study_complete")) == 1
    wait_until(lambda: hook_log.exists() and hook_log.read_text().endswith("\n"), what="the series hook")
    assert hook_log.read_text().split("\n") == [f"{series} 1", ""]
    manifest = json.loads(series_manifest_path(server.out, series).read_text())
    assert sorted(i["sop_instance_uid"] for i in manifest["instances"]) == sorted(d.SOPInstanceUID for d in datasets)
    assert all(i["digest"] == sha256_file(server.out / i["path"]) for i in manifest["instances"])
    assert manifest["calling_aets"] == [CALLING_AET] and manifest["instance_count"] == 5
    assert Path(done[0]["manifest"]) == series_manifest_path(server.out, series).resolve()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_restart_mid_series_completes_it_once_and_a_late_instance_gives_revision_2(
        serve_process, tmp_path: Path, how: str) -> None:
    events = tmp_path / "events.jsonl"
    args = ("--series-stable-seconds", "3", "--study-stable-seconds", "3", "--events", str(events))
    first = serve_process(*args)
    datasets = ct_copies(4)
    assert send_datasets(first.port, datasets[:2]) == [SUCCESS] * 2
    if how == "SIGTERM":
        assert first.terminate() == 0
    else:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    assert_indexed(first.out)
    assert events_of(events, "series_complete") == []  # stopped before it was stable
    second = serve_process(*args, out=first.out)
    assert send_datasets(second.port, datasets[2:3]) == [SUCCESS]
    wait_until(lambda: events_of(events, "series_complete"), timeout=30, what="the series to complete")
    time.sleep(1.5)
    done = events_of(events, "series_complete")
    assert [(e["revision"], e["instance_count"]) for e in done] == [(1, 3)]
    assert send_datasets(second.port, datasets[3:]) == [SUCCESS]  # later: a new revision
    wait_until(lambda: len(events_of(events, "series_complete")) == 2, timeout=30, what="revision 2")
    done = events_of(events, "series_complete")
    assert [(e["revision"], e["instance_count"]) for e in done] == [(1, 3), (2, 4)]
    manifest = json.loads(series_manifest_path(first.out, datasets[0].SeriesInstanceUID).read_text())
    assert manifest["revision"] == 2 and manifest["instance_count"] == 4


@pytest.mark.parametrize("resender", [CALLING_AET, "ROUTER"], ids=["same sender", "a router"])
def test_an_identical_resend_does_not_complete_a_series_again_and_a_new_instance_does(
        serve_process, tmp_path: Path, resender: str) -> None:
    """The same bytes sent again change nothing in the tree, so no new
    revision (it gave one, with the same instances, hook and manifest again),
    also when another AE sends them (a router forwarding a study: our File
    Meta names the sender, the instance is the same); a new instance still
    gives revision 2."""
    events = tmp_path / "events.jsonl"
    server = serve_process(*STABLE, "--events", str(events))
    datasets = ct_copies(3)
    assert send_datasets(server.port, datasets[:2]) == [SUCCESS] * 2
    wait_until(lambda: events_of(events, "series_complete"), timeout=30, what="the series to complete")
    manifest = series_manifest_path(server.out, datasets[0].SeriesInstanceUID)
    before = manifest.read_bytes()
    files = {f: f.stat().st_ino for f in layout_files(server.out)}
    assert send_datasets(server.port, datasets[:2], calling=resender) == [SUCCESS] * 2  # identical bytes again
    time.sleep(3.5)  # past the stable time, several polls
    assert [e["revision"] for e in events_of(events, "series_complete")] == [1], server.log()
    assert manifest.read_bytes() == before
    stored = events_of(events, "stored")
    assert [e["placement"] for e in stored] == ["stored"] * 2 + ["identical"] * 2
    # the size of the file at the path (the first copy: its File Meta names the first sender)
    assert [e["size"] for e in stored] == [(server.out / e["path"]).stat().st_size for e in stored]
    assert {f: f.stat().st_ino for f in layout_files(server.out)} == files  # not rewritten
    assert {pydicom.dcmread(f).file_meta.SourceApplicationEntityTitle for f in files} == {CALLING_AET}
    assert send_datasets(server.port, datasets[2:]) == [SUCCESS]
    wait_until(lambda: len(events_of(events, "series_complete")) == 2, timeout=30, what="revision 2")
    done = events_of(events, "series_complete")
    assert [(e["revision"], e["instance_count"]) for e in done] == [(1, 2), (2, 3)]


def test_an_index_rebuilt_from_the_files_keeps_what_the_manifests_say_completed(
        serve_process, tmp_path: Path) -> None:
    """The completion state lives in the index. One rebuilt from the files
    alone (removed while the server was stopped, or by a server killed as it
    repaired it) made every series complete again at revision 1, hooks and
    all, and a series that had reached revision 2 went back to 1. The
    manifests say what completed: a series they list exactly stays complete,
    one changed since completes again at the next revision."""
    events = tmp_path / "events.jsonl"
    server = serve_process(*STABLE, "--events", str(events))
    kept, changed = ct_copies(2), ct_copies(2)
    assert send_datasets(server.port, kept + changed) == [SUCCESS] * 4
    wait_until(lambda: len(events_of(events, "study_complete")) == 2, timeout=30, what="both studies")
    assert server.terminate() == 0, server.log()
    for f in (server.out / ".sortscp").glob("index.sqlite*"):
        f.unlink()
    lost = next(f for f in layout_files(server.out) if f.name == f"{changed[1].SOPInstanceUID}.dcm")
    lost.unlink()  # by hand, while it was stopped
    again = serve_process(*STABLE, "--events", str(events), out=server.out)
    wait_until(lambda: len(events_of(events, "study_complete")) == 3, timeout=30, what="the changed study")
    time.sleep(3.5)  # past the stable time, several polls: nothing else completes
    series = [(e["series_instance_uid"], e["revision"], e["instance_count"])
              for e in events_of(events, "series_complete")]
    a, b = kept[0].SeriesInstanceUID, changed[0].SeriesInstanceUID
    assert sorted(series) == sorted([(a, 1, 2), (b, 1, 2), (b, 2, 1)]), again.log()
    manifest = json.loads(series_manifest_path(server.out, b).read_text())
    assert manifest["revision"] == 2 and [i["sop_instance_uid"] for i in manifest["instances"]] == \
        [changed[0].SOPInstanceUID]
    # and the kept series, given one more instance, goes on at revision 2
    more = copy.deepcopy(kept[0])
    more.SOPInstanceUID = more.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    assert send_datasets(again.port, [more]) == [SUCCESS]
    wait_until(lambda: len(events_of(events, "series_complete")) == 4, timeout=30, what="revision 2")
    assert events_of(events, "series_complete")[-1]["revision"] == 2


def test_a_series_uid_a_sender_gives_two_studies_completes_each_study_with_its_own_instances(
        serve_process, tmp_path: Path) -> None:
    """A sender gives instances of two studies one SeriesInstanceUID (a
    mistake, or a corrected resend that moves part of a series). The series
    row names the last study only: the first study never completed (its
    series looked missing), and the last one's manifest and event counted the
    other study's instances. Now each study completes once, with its own
    instances, and ``ls`` shows the series under both, with each one's count."""
    events = tmp_path / "events.jsonl"
    server = serve_process(*STABLE, "--events", str(events))
    first, second = ct_copies(2), ct_copies(1)
    second[0].SeriesInstanceUID = first[0].SeriesInstanceUID
    assert send_datasets(server.port, first) == [SUCCESS] * 2
    wait_until(lambda: len(events_of(events, "study_complete")) == 1, timeout=30, what="the first study")
    assert send_datasets(server.port, second) == [SUCCESS]  # (the series' revision 2)
    studies = {first[0].StudyInstanceUID: 2, second[0].StudyInstanceUID: 1}
    wait_until(lambda: len(events_of(events, "study_complete")) == 2, timeout=30, what="both studies")
    done = {e["study_instance_uid"]: e for e in events_of(events, "study_complete")}
    assert {uid: e["instance_count"] for uid, e in done.items()} == studies
    for uid, n in studies.items():
        manifest = json.loads(study_manifest_path(server.out, uid).read_text())
        assert manifest["instance_count"] == n and [x["instance_count"] for x in manifest["series"]] == [n]
    assert [(e["revision"], e["instance_count"]) for e in events_of(events, "series_complete")] == [(1, 2), (2, 3)]
    listed = {t["study_instance_uid"]: t for t in json.loads(run_cli("ls", "--json", server.out).stdout)["studies"]}
    assert {uid: (t["instances"], t["complete"], [(x["series_instance_uid"], x["instances"]) for x in t["series"]])
            for uid, t in listed.items()} == {
        uid: (n, True, [(first[0].SeriesInstanceUID, n)]) for uid, n in studies.items()}
    time.sleep(2.5)  # past the stable time: nothing completes again
    assert len(events_of(events, "study_complete")) == 2, server.log()
    assert server.terminate() == 0, server.log()
    # the index lost: the next start rebuilds it, completions carried from the manifests,
    # each study by its own instances (the series' revision moved on with the second study)
    for f in index_path(server.out).parent.glob("index.sqlite*"):
        f.unlink()
    again = serve_process(*STABLE, "--events", str(events), out=server.out)
    wait_until(lambda: run_cli("ls", "--json", server.out).returncode == 0, timeout=30, what="the rebuilt index")
    time.sleep(3)
    assert len(events_of(events, "study_complete")) == 2 and len(events_of(events, "series_complete")) == 2, \
        again.log()
    assert again.terminate() == 0, again.log()


def _one_study_completed(serve_process, events: Path):
    """A server that completed a study of one series of 2 instances, stopped;
    it, and the series' and the study's manifest paths."""
    server = serve_process(*STABLE, "--events", str(events))
    sent = ct_copies(2)
    assert send_datasets(server.port, sent) == [SUCCESS] * 2
    wait_until(lambda: len(events_of(events, "study_complete")) == 1, timeout=30, what="the study")
    assert server.terminate() == 0, server.log()
    return (server, series_manifest_path(server.out, sent[0].SeriesInstanceUID),
            study_manifest_path(server.out, sent[0].StudyInstanceUID))


def test_manifests_a_killed_write_left_half_written_are_removed_at_the_next_start(
        serve_process, tmp_path: Path) -> None:
    """A manifest is written to ``.tmp-*.json`` beside its name, then renamed;
    a kill in between left that half-written file for ever (a pipeline that
    takes every ``*.json`` there, dot files too, would read it). The next
    server removes such files, and nothing else."""
    events = tmp_path / "events.jsonl"
    server, series, study = _one_study_completed(serve_process, events)
    kept = {p: p.read_bytes() for p in (series, study)}
    partial = [series.parent / ".tmp-k1ll3d.json", study.parent / ".tmp-0a9b8c.json"]
    for p in partial:
        p.write_bytes(kept[series][: len(kept[series]) // 2])
    notes = series.parent / ".tmp-notes.txt"  # not a manifest's name: not ours
    notes.write_text("an operator's")
    again = serve_process(*STABLE, "--events", str(events), out=server.out)
    wait_until(lambda: "removed 2 manifests a killed write left half-written" in again.log(), timeout=30,
               what="the line")
    assert not any(p.exists() for p in partial)
    assert {p: p.read_bytes() for p in kept} == kept and notes.read_text() == "an operator's"
    assert sorted(p.name for p in series.parent.iterdir()) == sorted([series.name, notes.name])
    time.sleep(2.5)  # past the stable time: nothing completes again
    assert len(events_of(events, "series_complete")) == 1, again.log()


def test_a_completion_the_index_never_took_is_not_taken_for_one_by_a_rebuild(
        serve_process, tmp_path: Path) -> None:
    """The manifest was written at its name before the completion was flipped
    in the index; when the flip waited (another process writing the index, as
    a backup tool does) and the server was killed, a rebuild (``reindex``)
    took that manifest for a completion: the series stayed complete in
    ``ls`` and its event and hook never came. Now a manifest gets its name
    only after the flip: the series completes after the restart, once."""
    events, ran = tmp_path / "events.jsonl", tmp_path / "hook.txt"
    args = (*STABLE, "--events", str(events), "--hook-shell",
            "--on-series-complete", f'echo "$SORTSCP_SERIES_INSTANCE_UID" >> {ran}')
    server = serve_process(*args, new_session=True)
    sent = ct_copies(2)
    assert send_datasets(server.port, sent) == [SUCCESS] * 2
    series = series_manifest_path(server.out, sent[0].SeriesInstanceUID)
    busy = sqlite3.connect(index_path(server.out), isolation_level=None, timeout=10)
    try:
        busy.execute("BEGIN IMMEDIATE")  # the flip waits (up to the index's busy timeout)
        wait_until(lambda: series.exists() or any(series.parent.glob(".tmp-*.json")), timeout=30,
                   what="the manifest written")
        time.sleep(0.5)  # (the flip waits)
        server.kill()
    finally:
        busy.close()
    proc = run_cli("reindex", server.out, timeout=120)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    again = serve_process(*args, out=server.out)
    wait_until(lambda: len(events_of(events, "series_complete")) == 1, timeout=30, what="the completion")
    wait_until(lambda: ran.exists() and ran.read_text().split() == [sent[0].SeriesInstanceUID], timeout=30,
               what="the hook")
    manifest = json.loads(series.read_text())
    assert manifest["revision"] == 1 and len(manifest["instances"]) == 2
    assert not any(series.parent.glob(".tmp-*.json"))
    time.sleep(2.5)  # past the stable time: nothing completes again
    assert len(events_of(events, "series_complete")) == 1, again.log()
    assert again.terminate() == 0, again.log()


def test_a_manifest_staged_when_its_completion_was_flipped_gets_its_name_at_the_next_start(
        serve_process, tmp_path: Path) -> None:
    """A kill between the flip and the manifest's rename leaves the manifest
    staged (``.tmp-*.json``); the next start puts it at its name (one INFO
    line), and removes one whose completion the index does not hold; no
    completion comes twice."""
    events = tmp_path / "events.jsonl"
    server, series, study = _one_study_completed(serve_process, events)
    done = series.read_bytes()
    staged = series.parent / ".tmp-fl1pped.json"
    series.rename(staged)  # flipped, not renamed yet
    later = json.loads(study.read_text())
    later["revision"] = 2  # staged, never flipped
    never = study.parent / ".tmp-n0tfl1p.json"
    never.write_text(json.dumps(later))
    kept = study.read_bytes()
    again = serve_process(*STABLE, "--events", str(events), out=server.out)
    wait_until(lambda: "put 1 manifests at their names" in again.log(), timeout=30, what="the line")
    assert "removed 1 manifests a killed write left half-written" in again.log()
    assert series.read_bytes() == done and study.read_bytes() == kept
    assert not staged.exists() and not never.exists()
    time.sleep(2.5)
    assert len(events_of(events, "series_complete")) == 1 and len(events_of(events, "study_complete")) == 1
    assert again.terminate() == 0, again.log()


def test_a_rebuild_takes_only_the_manifest_at_its_name_and_only_if_it_reads_as_one(
        serve_process, tmp_path: Path) -> None:
    """Beside a manifest lie what a killed write leaves (``.tmp-*.json``) and an
    operator's copy; a hand-edited manifest may say anything. Read in name
    order, a stale copy took a series back a revision (and it completed twice
    at one); a revision of 10**30 or a list where a value belongs stopped
    every start with a traceback. Now only the file at the manifest's name
    counts, and only if it reads as one; else the series is as without one."""
    events = tmp_path / "events.jsonl"
    server = serve_process(*STABLE, "--events", str(events))
    kept, hostile = ct_copies(2), ct_copies(2)
    assert send_datasets(server.port, kept + hostile) == [SUCCESS] * 4
    wait_until(lambda: len(events_of(events, "series_complete")) == 2, timeout=30, what="both series")
    more = copy.deepcopy(kept[0])
    more.SOPInstanceUID = more.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    assert send_datasets(server.port, [more]) == [SUCCESS]
    wait_until(lambda: len(events_of(events, "series_complete")) == 3, timeout=30, what="revision 2")
    assert server.terminate() == 0, server.log()
    a, b = kept[0].SeriesInstanceUID, hostile[0].SeriesInstanceUID
    good = series_manifest_path(server.out, a)
    stale = dict(json.loads(good.read_text()), revision=1)
    for name in (".tmp-k2j3h4.json", good.name.replace(".json", "-old.json")):
        (good.parent / name).write_text(json.dumps(stale))
    bad = series_manifest_path(server.out, b)
    bad.write_text(json.dumps(dict(json.loads(bad.read_text()), revision=10**30)))
    for f in (server.out / ".sortscp").glob("index.sqlite*"):
        f.unlink()
    again = serve_process(*STABLE, "--events", str(events), out=server.out)
    wait_until(lambda: len(events_of(events, "series_complete")) == 4, timeout=30, what="the hostile one")
    time.sleep(3.5)  # past the stable time, several polls: nothing else completes
    after = [(e["series_instance_uid"], e["revision"]) for e in events_of(events, "series_complete")[3:]]
    assert after == [(b, 1)], after  # as without a manifest; the kept one stays at revision 2
    assert json.loads(good.read_text())["revision"] == 2
    assert send_datasets(again.port, ct_copies(1)) == [SUCCESS]
    assert "Traceback" not in again.log()


@pytest.mark.parametrize("into", ["series", "study"], ids=["into a new series", "into a new study"])
def test_instances_all_resent_into_another_series_remove_the_old_manifest(
        serve_process, tmp_path: Path, into: str) -> None:
    """A corrected resend: the same SOP instances again, now in a new series
    (the operator renumbered it at the modality) or a new study (merged into
    the right patient's). The old series had completed; its manifest named
    files that the resend replaced. It is removed (so is the old study's when
    the study is left empty), the old series leaves ``ls``, an event says so,
    and what the instances now belong to completes with exactly them."""
    events, runs = tmp_path / "events.jsonl", tmp_path / "hook-runs"
    server = serve_process(*STABLE, "--events", str(events), "--hook-shell",
                           "--on-series-complete", f'echo "$SORTSCP_EVENT" >> "{runs}"',
                           "--on-study-complete", f'echo "$SORTSCP_EVENT" >> "{runs}"')
    old = ct_copies(2, patient="Resend^Test")
    assert send_datasets(server.port, old) == [SUCCESS] * 2
    wait_until(lambda: events_of(events, "study_complete"), timeout=30, what="the study to complete")
    old_series, old_study = old[0].SeriesInstanceUID, old[0].StudyInstanceUID
    old_manifests = [series_manifest_path(server.out, old_series), study_manifest_path(server.out, old_study)]
    assert all(m.is_file() for m in old_manifests)
    new = copy.deepcopy(old)
    new_series, new_study = generate_uid(), generate_uid() if into == "study" else old_study
    for ds in new:
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SeriesNumber = new_series, new_study, 2
    assert send_datasets(server.port, new) == [SUCCESS] * 2
    wait_until(lambda: len(events_of(events, "study_complete")) == 2, timeout=30, what="the study again")
    emptied = ["series_emptied"] + (["study_emptied"] if into == "study" else [])
    wait_until(lambda: [e["event"] for e in events_of(events) if e["event"].endswith("_emptied")] == emptied,
               timeout=30, what=f"{emptied} events")
    assert events_of(events, "series_emptied")[0]["series_instance_uid"] == old_series
    assert events_of(events, "series_emptied")[0]["manifest"] == str(old_manifests[0].resolve())
    assert not old_manifests[0].exists(), server.log()
    assert old_manifests[1].exists() == (into == "series")
    assert [e["series_instance_uid"] for e in events_of(events, "series_complete")] == [old_series, new_series]
    manifest = json.loads(series_manifest_path(server.out, new_series).read_text())
    listed = sorted(i["path"] for i in manifest["instances"])
    assert listed == sorted(str(p.relative_to(server.out)) for p in layout_files(server.out))
    assert len(listed) == 2 and all("_2/" in p for p in listed)
    study = json.loads(study_manifest_path(server.out, new_study).read_text())
    assert [s["series_instance_uid"] for s in study["series"]] == [new_series]
    assert study["revision"] == (2 if into == "series" else 1)
    (listed_study,) = json.loads(run_cli("ls", "--json", server.out).stdout)["studies"]
    assert listed_study["study_instance_uid"] == new_study
    assert [s["series_instance_uid"] for s in listed_study["series"]] == [new_series]
    assert "emptied" in server.log() and "Traceback" not in server.log()
    completions = [e["event"] for e in events_of(events) if e["event"].endswith("_complete")]
    wait_until(lambda: runs.exists() and len(runs.read_text().split()) >= len(completions), what="the hooks")
    assert sorted(runs.read_text().split()) == sorted(completions)  # none for the _emptied events


def test_a_series_whose_files_were_removed_before_a_rebuild_loses_its_manifest(serve_process, tmp_path: Path) -> None:
    """The rebuild (``reindex``, or a server's start after a crash) knows only
    the files: a completed series with none left had no row after it, so its
    manifest, naming the removed files, stayed for good."""
    events = tmp_path / "events.jsonl"
    server = serve_process(*STABLE, "--events", str(events))
    gone, kept = ct_copies(2, patient="Removed^ByHand"), ct_copies(1, patient="Kept^Here")
    assert send_datasets(server.port, gone + kept) == [SUCCESS] * 3
    wait_until(lambda: len(events_of(events, "study_complete")) == 2, timeout=30, what="both studies to complete")
    assert server.terminate() == 0
    manifests = [series_manifest_path(server.out, gone[0].SeriesInstanceUID),
                 study_manifest_path(server.out, gone[0].StudyInstanceUID)]
    assert all(m.is_file() for m in manifests)
    for path in layout_files(server.out):
        if "Removed^ByHand" in str(path):
            path.unlink()  # a user deletes a patient by hand
    done = run_cli("reindex", server.out, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    server = serve_process(*STABLE, "--events", str(events))
    wait_until(lambda: events_of(events, "study_emptied"), timeout=30, what="the emptied study")
    assert [e["series_instance_uid"] for e in events_of(events, "series_emptied")] == [gone[0].SeriesInstanceUID]
    assert not any(m.exists() for m in manifests)
    assert series_manifest_path(server.out, kept[0].SeriesInstanceUID).is_file()
    listed = json.loads(run_cli("ls", "--json", server.out).stdout)["studies"]
    assert [t["patient_name"] for t in listed] == ["Kept^Here"]
    time.sleep(2.5)  # past the stable time: the kept study does not complete again
    assert len(events_of(events, "series_complete")) == 2 and len(events_of(events, "study_complete")) == 2


def test_each_stored_event_names_the_series_its_version_was_sent_in(serve_process, tmp_path: Path) -> None:
    """Two versions of one instance back to back at the same path (a corrected
    SeriesInstanceUID, the same SeriesNumber): the stored event of the first,
    written up to 50 ms later, read the index row the second had replaced."""
    events = tmp_path / "events.jsonl"
    server = serve_process("--events", str(events))
    sent = []
    for first in ct_copies(60, patient="Version^Test"):
        second = copy.deepcopy(first)
        second.SeriesInstanceUID = generate_uid()
        sent += [first, second]
    assert send_datasets(server.port, sent) == [SUCCESS] * len(sent)
    wait_until(lambda: len(events_of(events, "stored")) == len(sent), timeout=30, what="every stored event")
    got = [(e["sop_instance_uid"], e["series_instance_uid"]) for e in events_of(events, "stored")]
    assert got == [(ds.SOPInstanceUID, ds.SeriesInstanceUID) for ds in sent]


def test_instances_leaving_a_series_one_by_one_complete_it_again_once(serve_process, tmp_path: Path) -> None:
    """An instance that leaves a series (resent into another) is a change to
    it like an arrival: it restarts the stable time. Moving three of four,
    one every half second with a stable time of 2 s, completes the old series
    again once, with the one left, not once per move on a partial series."""
    events = tmp_path / "events.jsonl"
    server = serve_process("--series-stable-seconds", "2", "--study-stable-seconds", "2", "--events", str(events))
    old = ct_copies(4, patient="Leave^Test")
    assert send_datasets(server.port, old) == [SUCCESS] * 4
    wait_until(lambda: events_of(events, "series_complete"), timeout=30, what="the series to complete")
    new_uid = generate_uid()
    for ds in old[:3]:
        moved = copy.deepcopy(ds)
        moved.SeriesInstanceUID, moved.SeriesNumber = new_uid, 2
        assert send_datasets(server.port, [moved]) == [SUCCESS]
        time.sleep(0.5)
    wait_until(lambda: len(events_of(events, "series_complete")) >= 3, timeout=30, what="both series complete")
    time.sleep(3)  # past the stable time: nothing more completes
    done = [(e["series_instance_uid"], e["revision"], e["instance_count"]) for e in events_of(events, "series_complete")]
    old_uid = old[0].SeriesInstanceUID
    assert sorted(done) == sorted([(old_uid, 1, 4), (old_uid, 2, 1), (new_uid, 1, 3)]), done


@pytest.mark.parametrize("uids", [("1.2.3." + "4" * 300,), ("1.2.826.0.1.3680043.8.498.5/7",
                                                            "1.2.826.0.1.3680043.8.498.5_7")],
                         ids=["too long for a file name", "two that make the same file name"])
def test_series_with_odd_uids_each_get_a_manifest_and_block_no_other(serve_process, tmp_path: Path, uids) -> None:
    """A SeriesInstanceUID longer than a file name allows stopped every series
    completion for good (its manifest failed first, every round, with a line
    every 0.25 s); two UIDs that sanitize alike shared one manifest."""
    events = tmp_path / "events.jsonl"
    server = serve_process(*STABLE, "--events", str(events))
    odd = []
    for i, uid in enumerate(uids):
        (ds,) = ct_copies(1)
        ds.SeriesInstanceUID = uid
        ds.SeriesNumber = 10 + i
        odd.append(ds)
    normal = ct_copies(2)
    assert send_datasets(server.port, odd) == [SUCCESS] * len(odd)
    assert send_datasets(server.port, normal) == [SUCCESS] * 2
    wait_until(lambda: {e["series_instance_uid"] for e in events_of(events, "series_complete")}
               >= {*uids, normal[0].SeriesInstanceUID}, timeout=30, what="every series to complete")
    manifests = {e["series_instance_uid"]: e["manifest"] for e in events_of(events, "series_complete")}
    assert len(set(manifests.values())) == len(manifests), manifests
    for uid in uids:
        assert json.loads(Path(manifests[uid]).read_text())["series_instance_uid"] == uid
    assert "Traceback" not in server.log()


def test_a_series_whose_manifest_cannot_be_written_blocks_no_other_and_is_logged_once(
        serve_process, tmp_path: Path) -> None:
    """Its manifest's name is held by a folder: that series cannot complete
    (tried again each round, one log line in all), the others complete."""
    events = tmp_path / "events.jsonl"
    server = serve_process(*STABLE, "--events", str(events))
    bad, good = ct_copies(1), ct_copies(2)
    bad[0].SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    bad[0].SeriesNumber = 77
    series_manifest_path(server.out, bad[0].SeriesInstanceUID).mkdir(parents=True)
    assert send_datasets(server.port, bad) == [SUCCESS]
    assert send_datasets(server.port, good) == [SUCCESS] * 2
    wait_until(lambda: events_of(events, "series_complete"), timeout=30, what="the other series to complete")
    time.sleep(2.0)  # several more rounds
    assert [e["series_instance_uid"] for e in events_of(events, "series_complete")] == [good[0].SeriesInstanceUID]
    lines = [line for line in server.log().splitlines() if "cannot complete series" in line]
    assert len(lines) == 1 and bad[0].SeriesInstanceUID in lines[0], server.log()


#: --hook-timeout of the hung-hook test; a C-STORE held by a hook would wait this long.
HOOK_TIMEOUT = 5


@pytest.mark.parametrize("command, logged", [
    ("sleep 1000", f"still running past --hook-timeout (stopped after {HOOK_TIMEOUT}."),
    ("sh -c 'echo no luck >&2; exit 3'", "exited 3"),
    # (the program named: a typo in the command is found from the line alone)
    ("/nonexistent/sortscp-hook --flag", "could not start /nonexistent/sortscp-hook: No such file or directory"),
])
def test_a_hung_or_failing_hook_changes_no_status_and_holds_no_response(serve_process, command: str,
                                                                        logged: str) -> None:
    """Every C-STORE answers Success, and none waits for a hook: with 2 hook
    slots and 10 instances, a response held by a hung hook would take its
    whole timeout. (How much hooks slow receiving: benchmarks/bench_serve.py --variant.)"""
    server = serve_process("--on-stored", command, "--hook-timeout", str(HOOK_TIMEOUT), "--hook-concurrency", "2")
    results = timed_stores(server.port, ct_copies(10))
    assert [status for status, _ in results] == [SUCCESS] * 10
    assert max(seconds for _, seconds in results) < HOOK_TIMEOUT, results
    wait_until(lambda: logged in server.log(), timeout=30, what=f"'{logged}' in the log")
    line = next(x for x in server.log().splitlines() if logged in x)
    assert "on_stored" in line
    if "exit" in command:
        assert "no luck" in line
    assert server.terminate() == 0, server.log()  # the stop kills hooks still running
    assert "Traceback" not in server.log()


def test_hooks_still_running_die_with_a_killed_server(serve_process, tmp_path: Path) -> None:
    """SIGKILL leaves the server no time to stop its hooks: their helper sees
    its stdin close and kills them (each in its own process group)."""
    pids = tmp_path / "pids"
    server = serve_process("--hook-shell", "--on-stored", f'echo $$ >> "{pids}"; exec sleep 1000')
    assert send_datasets(server.port, ct_copies(2)) == [SUCCESS] * 2
    wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2, what="2 hooks running")
    running = [int(p) for p in pids.read_text().split()]
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        except FileNotFoundError:
            return True

    wait_until(lambda: all(gone(p) for p in running), timeout=20, what="the hooks killed")


def test_the_metrics_endpoint_counts_what_was_sent(serve_process) -> None:
    port = free_port()
    server = serve_process("--metrics-port", str(port))
    datasets = ct_copies(3)
    assert send_datasets(server.port, datasets) == [SUCCESS] * 3

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    wait_until(lambda: scrape().get("sortscp_associations_active") == 0.0, what="the association closed")
    m = scrape()
    assert m[f'sortscp_instances_stored_total{{calling_aet="{CALLING_AET}"}}'] == 3
    assert m[f'sortscp_stored_bytes_total{{calling_aet="{CALLING_AET}"}}'] > 3 * 1000
    assert m["sortscp_associations_total"] == 1
    assert m["sortscp_store_seconds_count"] == 3
    assert m["sortscp_output_free_bytes"] > 0


def test_peers_that_reset_as_soon_as_they_are_accepted_leave_no_association_counted_open(serve_process) -> None:
    """The association's close (in the network thread) could come before its
    establishment (in the association thread) when the peer resets as soon as
    it reads the A-ASSOCIATE-AC (a health check killed, a flaky link): that
    association then stayed in sortscp_associations_active for ever, with no
    line. Hundreds of them leave the gauge at 0 and one line each."""
    import struct

    import pdu

    port = free_port()
    server = serve_process("--metrics-port", str(port), "--workers", "1")
    accepted = []

    def reset_after_accept(_: int) -> None:
        for _ in range(100):
            with pdu.Peer(server.port) as peer:
                peer.send(pdu.associate_rq([(1, pdu.VERIFICATION, [pdu.IMPLICIT_LE])], calling="RESETTER"))
                if peer.read_pdu().kind == 0x02:
                    accepted.append(1)
                peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    assert in_threads(reset_after_accept, 4, timeout=120) == []
    assert len(accepted) == 400

    def active() -> float | None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return next((float(line.split()[1]) for line in text.splitlines()
                     if line.startswith("sortscp_associations_active ")), None)

    wait_until(lambda: active() == 0.0, timeout=20, what="no association counted open")
    wait_until(lambda: server.log().count("association from RESETTER ") == 400, timeout=20,
               what="one line per association")
    assert "Traceback" not in server.log()


def test_idle_connections_to_the_metrics_port_hold_no_thread_nor_the_dicom_side(serve_process) -> None:
    """Each connection to the metrics port held a thread and a descriptor for as
    long as the client kept it open: a thousand idle ones stopped every
    association. Now they are served 16 at a time and dropped when idle."""
    connections, timeout = 16, 10.0  # (scp.events.metrics: METRICS_CONNECTIONS, METRICS_TIMEOUT)
    port = free_port()
    server = serve_process("--metrics-port", str(port))
    threads_before = len(os.listdir(f"/proc/{server.proc.pid}/task"))
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    try:
        time.sleep(1)
        threads = len(os.listdir(f"/proc/{server.proc.pid}/task"))
        assert threads <= threads_before + connections + 2, (threads_before, threads)
        assert send_datasets(server.port, ct_copies(1)) == [SUCCESS]  # the DICOM side goes on
        # the idle ones are dropped: the endpoint answers again, without their closing
        wait_until(lambda: _scrapes(port), timeout=timeout + 10, what="a scrape")
    finally:
        for s in idle:
            s.close()
    assert "Traceback" not in server.log()


def _scrapes(port: int) -> bool:
    try:
        return b"sortscp_" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return False


def test_events_to_stdout_and_to_a_file_one_json_line_each(serve_process, tmp_path: Path) -> None:
    to_stdout = serve_process("--events", "-", out=tmp_path / "a")
    assert send_datasets(to_stdout.port, ct_copies(2)) == [SUCCESS] * 2
    wait_until(lambda: len(json_lines(to_stdout.log())) == 2, what="2 JSON lines on stdout")
    assert [e["event"] for e in json_lines(to_stdout.log())] == ["stored", "stored"]
    events = tmp_path / "events.jsonl"
    to_file = serve_process("--events", str(events), *STABLE, out=tmp_path / "b")
    datasets = ct_copies(2)
    assert send_datasets(to_file.port, datasets) == [SUCCESS] * 2
    wait_until(lambda: len(events_of(events, "stored")) == 2, what="2 stored events")
    stored = events_of(events, "stored")
    assert sorted(e["sop_instance_uid"] for e in stored) == sorted(d.SOPInstanceUID for d in datasets)
    assert all((to_file.out / e["path"]).is_file() for e in stored)
    assert len(events.read_text().splitlines()) == len(events_of(events))
    assert_indexed(to_file.out)
    wait_until(lambda: events_of(events, "study_complete"), timeout=30, what="the study to complete")
    assert [e["event"] for e in events_of(events)] == ["stored", "stored", "series_complete", "study_complete"]


class _Collector(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        type(self).received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_the_webhook_receives_posts(serve_process) -> None:
    _Collector.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        server = serve_process("--webhook", f"http://127.0.0.1:{httpd.server_address[1]}/dicom")
        datasets = ct_copies(3)
        assert send_datasets(server.port, datasets) == [SUCCESS] * 3
        wait_until(lambda: len(_Collector.received) == 3, what="3 POSTs")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert sorted(e["sop_instance_uid"] for e in _Collector.received) == sorted(d.SOPInstanceUID for d in datasets)
    assert {e["event"] for e in _Collector.received} == {"stored"}


class _Redirector(BaseHTTPRequestHandler):
    """Answers every POST with a redirect; counts what it gets."""

    requests: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append(f"POST {self.path}")
        self.send_response(302)
        self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        type(self).requests.append(f"GET {self.path}")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_redirecting_webhook_is_not_followed_and_the_line_names_the_redirect(serve_process) -> None:
    """A POST that is redirected would be followed as a GET, without the
    event (urllib's habit): the event is dropped once, with a line that names
    the redirect, not retried."""
    _Redirector.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        server = serve_process("--webhook", f"http://127.0.0.1:{httpd.server_address[1]}/dicom")
        assert send_datasets(server.port, ct_copies(1)) == [SUCCESS]
        wait_until(lambda: "dropped the stored event" in server.log(), timeout=30, what="a drop log line")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert _Redirector.requests == ["POST /dicom"]
    line = next(x for x in server.log().splitlines() if "dropped the stored event" in x)
    assert "after 1 attempt(s): HTTP 302" in line and "/elsewhere" in line and "not followed" in line, line


def test_a_dead_webhook_drops_with_a_log_line_and_holds_no_response(serve_process) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed when the block ends: connections are refused
    server = serve_process("--webhook", f"http://127.0.0.1:{dead}/")
    results = timed_stores(server.port, ct_copies(10))
    assert [status for status, _ in results] == [SUCCESS] * 10
    assert max(seconds for _, seconds in results) < WEBHOOK_TIMEOUT, results  # no POST in the way
    wait_until(lambda: "dropped the stored event" in server.log(), timeout=30, what="a drop log line")


def test_ls_lists_what_the_server_received(serve_process, tmp_path: Path) -> None:
    server = serve_process(*STABLE)
    datasets = ct_copies(3, patient="Ls^Test")
    assert send_datasets(server.port, datasets) == [SUCCESS] * 3
    assert_indexed(server.out)
    wait_until(lambda: json.loads(run_cli("ls", "--json", server.out).stdout)["studies"][0]["series"][0]["complete"],
               timeout=30, what="the series complete in ls")
    (study,) = json.loads(run_cli("ls", "--json", server.out).stdout)["studies"]
    assert study["patient_name"] == "Ls^Test" and study["instances"] == 3
    (series,) = study["series"]
    assert series["instances"] == 3 and series["series_instance_uid"] == datasets[0].SeriesInstanceUID
    table = run_cli("ls", server.out)
    assert table.returncode == 0 and "Ls^Test" in table.stdout and "yes (rev 1)" in table.stdout


@pytest.mark.parametrize("rotation", ["create", "copytruncate"])
def test_the_events_file_goes_on_after_logrotate(serve_process, tmp_path: Path, rotation: str) -> None:
    """logrotate renames the file and lets the program write a new one
    ('create'), or copies it and truncates it in place ('copytruncate'). Both
    lose no event and leave no hole of NUL bytes at the start of the new file."""
    events = tmp_path / "events.jsonl"
    server = serve_process("--events", str(events))
    first, second = ct_copies(2)
    assert send_datasets(server.port, [first]) == [SUCCESS]
    wait_until(lambda: len(events_of(events, "stored")) == 1, what="the first stored event")
    old = tmp_path / "events.jsonl.1"
    if rotation == "create":
        events.rename(old)
    else:
        old.write_bytes(events.read_bytes())
        with open(events, "r+b") as f:
            f.truncate(0)
    assert send_datasets(server.port, [second]) == [SUCCESS]
    wait_until(lambda: len(events_of(events, "stored")) == 1, what="a stored event in the new file")
    assert [e["sop_instance_uid"] for e in events_of(old, "stored")] == [first.SOPInstanceUID]
    assert [e["sop_instance_uid"] for e in events_of(events, "stored")] == [second.SOPInstanceUID]
    assert events.read_bytes().startswith(b"{"), events.read_bytes()[:40]


def test_a_series_left_by_its_latest_instance_names_the_folder_and_header_of_those_left(
        serve_process, tmp_path: Path) -> None:
    """Found by an independent attack: a series whose instances went to two
    folders (two descriptions), whose latest was then resent into another
    series, went on naming in ``ls``, its manifest and ``SORTSCP_SERIES_FOLDER``
    the folder of the one that left, which had been pruned, and its description."""
    runs = tmp_path / "series-folders"
    server = serve_process(*STABLE, "--hook-shell", "--on-series-complete",
                           f'echo "$SORTSCP_SERIES_INSTANCE_UID $SORTSCP_SERIES_FOLDER" >> "{runs}"')
    first, latest = ct_copies(2, patient="Left^Series")
    first.SeriesDescription, latest.SeriesDescription = "Axial", "Axial MPR"
    assert send_datasets(server.port, [first, latest]) == [SUCCESS] * 2
    series = first.SeriesInstanceUID
    moved = copy.deepcopy(latest)
    moved.SeriesInstanceUID, moved.SeriesNumber = generate_uid(), 9
    assert send_datasets(server.port, [moved]) == [SUCCESS]
    (only,) = [p for p in layout_files(server.out) if p.name == f"{first.SOPInstanceUID}.dcm"]
    folder = str(only.parent.relative_to(server.out))
    assert folder.endswith("/Axial_1")

    def hooked() -> dict[str, str]:  # each series' latest completion
        return dict(line.split(" ", 1) for line in runs.read_text().splitlines()) if runs.exists() else {}

    # (the series may have completed once before the resend, with both folders)
    wait_until(lambda: hooked().get(series) == folder and moved.SeriesInstanceUID in hooked(),
               timeout=30, what=f"the series to complete with {folder}")
    (study,) = json.loads(run_cli("ls", "--json", server.out).stdout)["studies"]
    listed = {s["series_instance_uid"]: s for s in study["series"]}
    assert listed[series]["folder"] == folder and listed[series]["series_description"] == "Axial"
    assert listed[series]["instances"] == 1
    manifest = json.loads(series_manifest_path(server.out, series).read_text())
    assert manifest["folder"] == folder, manifest
    assert (server.out / folder).is_dir()


@pytest.mark.parametrize(("policy", "third"), [("replace", "replaced"), ("keep", "kept_existing")])
def test_each_stored_event_says_what_the_store_did(serve_process, tmp_path: Path, policy: str,
                                                   third: str) -> None:
    """A resend of the same bytes is Success and a `stored` event, as every
    C-STORE answered Success is (a resend asks a pipeline to run again); its
    ``placement`` (``SORTSCP_PLACEMENT`` for a hook) tells it from a new file,
    so a hook that must not work twice can skip it."""
    events, runs = tmp_path / "events.jsonl", tmp_path / "runs"
    server = serve_process("--events", str(events), "--on-duplicate", policy, "--hook-shell",
                           "--on-stored", f'echo "$SORTSCP_PLACEMENT" >> "{runs}"')
    (ds,) = ct_copies(1, patient="Placement^Test")
    changed = copy.deepcopy(ds)
    changed.SeriesNumber = 7  # another version of the instance: another folder
    assert send_datasets(server.port, [ds]) == [SUCCESS]
    assert send_datasets(server.port, [ds]) == [SUCCESS]
    assert send_datasets(server.port, [changed]) == [SUCCESS]
    expected = ["stored", "identical", third]
    wait_until(lambda: len(events_of(events, "stored")) == 3 and runs.exists()
               and len(runs.read_text().split()) == 3, what="3 stored events and hook runs")
    assert [e["placement"] for e in events_of(events, "stored")] == expected
    assert sorted(runs.read_text().split()) == sorted(expected)  # (hooks may run at once)
    (only,) = layout_files(server.out)
    assert ("_7/" in str(only)) == (policy == "replace")


def test_a_file_dated_in_the_future_does_not_hold_its_series_from_completing(serve_process, tmp_path: Path) -> None:
    """A file whose mtime is a year ahead (a sender's clock; ``sort`` keeps
    timestamps) was taken as the series' last arrival by the index built from
    the files, and kept as its maximum: the series never completed, whatever
    arrived later."""
    datasets = ct_copies(2, patient="Future^Clock")
    src = tmp_path / "src"
    src.mkdir()
    datasets[0].save_as(src / "a.dcm", enforce_file_format=True)
    ahead = time.time() + 365 * 86400
    os.utime(src / "a.dcm", (ahead, ahead))
    r = run_cli("sort", src, tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    events = tmp_path / "events.jsonl"
    server = serve_process(*STABLE, "--events", str(events))
    assert send_datasets(server.port, datasets[1:]) == [SUCCESS]
    wait_until(lambda: events_of(events, "series_complete"), timeout=30, what="the series to complete")
    (done,) = events_of(events, "series_complete")
    assert done["instance_count"] == 2, done


def test_a_last_arrival_ahead_of_the_clock_is_corrected_by_the_next_arrival(serve_process, tmp_path: Path) -> None:
    """An index that holds a last arrival a year ahead (built by an older
    version from such a file, or the clock set back since) is corrected by the
    next instance of the series: it completes after the stable time."""
    import sqlite3

    events = tmp_path / "events.jsonl"
    datasets = ct_copies(2, patient="Clock^Back")
    server = serve_process(*STABLE, "--events", str(events))
    assert send_datasets(server.port, datasets[:1]) == [SUCCESS]
    wait_until(lambda: events_of(events, "series_complete"), timeout=30, what="the series to complete")
    assert server.terminate() == 0, server.log()
    db = sqlite3.connect(index_path(server.out))
    with db:
        db.execute("UPDATE series SET last_arrival = last_arrival + 365 * 86400")
    db.close()
    server = serve_process(*STABLE, "--events", str(events))
    assert send_datasets(server.port, datasets[1:]) == [SUCCESS]
    try:
        wait_until(lambda: len(events_of(events, "series_complete")) >= 2, timeout=30, what="revision 2")
    except TimeoutError:
        raise AssertionError(f"{events.read_text()}\n{server.log()}") from None
    assert [e["revision"] for e in events_of(events, "series_complete")] == [1, 2]

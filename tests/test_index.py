"""The instance index (scp/store/index.py): real SQLite files, real processes,
real files, no mocks."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest
from index_workers import (
    churn,
    complete_race,
    facts_for,
    finish_recovery,
    layout_files,
    put,
    race,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from scp.errors import InstanceIndexError, StoreError
from scp.store import index as ix
from scp.store.index import (
    ClaimLostError,
    ClaimTimeoutError,
    IndexInUseError,
    IndexStaleError,
    InstanceIndex,
    SqliteIndex,
    check,
    create_empty,
    open_index,
    rebuild,
)

CTX = multiprocessing.get_context("spawn")


@pytest.fixture
def spawn():
    """Start child processes that can never outlive the test: daemonic, and
    killed at teardown if still alive (a child stuck at a barrier after its
    sibling died would otherwise keep pytest from exiting)."""
    kids: list = []

    def start(target, *args):
        kid = CTX.Process(target=target, args=args, daemon=True)
        kid.start()
        kids.append(kid)
        return kid

    yield start
    for kid in kids:
        if kid.is_alive():
            kid.kill()
        kid.join(10)
DEAD = "999999999.1.1"  # beyond pid_max: a process that cannot exist


@pytest.fixture
def root(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    create_empty(out)
    return out


@pytest.fixture
def idx(root: Path):
    index = SqliteIndex(root, claim_timeout=5)
    yield index
    index.close()


def raw(root: Path) -> sqlite3.Connection:
    return sqlite3.connect(ix.index_path(root), isolation_level=None, timeout=10)


def assert_agree(root: Path, index: SqliteIndex) -> list[ix.InstanceRow]:
    """Tree and index agree exactly: one file per UID, every row a file with its
    size and digest, nothing pending or obsolete, counters = rows."""
    rows = index.all_instances()
    assert all(r.state == "ok" and r.owner is None for r in rows), [r for r in rows if r.state != "ok"]
    assert index.obsolete_paths() == []
    files = layout_files(root)
    assert files == {r.path for r in rows}
    uids = [Path(f).name[: -len(".dcm")] for f in files]
    assert len(uids) == len(set(uids)), "two files for one UID"
    for r in rows:
        data = (root / r.path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (r.size, r.digest), r.path
        assert Path(r.path).name == f"{r.sop_instance_uid}.dcm"
    per_series: dict[str, int] = {}
    for r in rows:
        per_series[r.series_instance_uid] = per_series.get(r.series_instance_uid, 0) + 1
    assert {s.series_instance_uid: s.instances for s in index.series_list()} == per_series
    per_study: dict[str, int] = {}
    for r in rows:
        per_study[r.study_instance_uid] = per_study.get(r.study_instance_uid, 0) + 1
    assert {s.study_instance_uid: s.instances for s in index.studies()} == per_study
    return rows


# --------------------------------------------------------------- claim / commit / abort


def test_module_imports_only_stdlib_errors_and_process():
    import ast

    tree = ast.parse(Path(ix.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {n for n in names if n.split(".")[0] in ("scp", "pynetdicom", "pydicom")} == {"scp.errors", "scp._process"}
    assert issubclass(ix.InstanceIndexError, StoreError)
    assert isinstance(SqliteIndex.__new__(SqliteIndex), InstanceIndex)


def test_the_state_names_sort_uses_without_the_index_are_the_index_s():
    from scp.store import tmp

    assert (tmp.STATE_DIRNAME, tmp.INDEX_FILENAME, tmp.INDEX_LOCK_FILENAME) == (
        ix.STATE_DIRNAME, ix.INDEX_FILENAME, ix.LOCK_FILENAME)


def test_new_uid_commit(root, idx):
    claim = idx.begin("1.1", "A/S/1.1.dcm", facts_for(b"one"))
    assert claim.old is None
    assert idx.lookup("1.1").state == "pending" and idx.lookup("1.1").path is None
    (root / "A/S").mkdir(parents=True)
    (root / "A/S/1.1.dcm").write_bytes(b"one")
    assert idx.commit(claim) is None
    row = idx.lookup("1.1")
    assert (row.path, row.state, row.size, row.owner) == ("A/S/1.1.dcm", "ok", 3, None)
    assert idx.series_state("1.2.3").instances == 1
    assert idx.study_state("1.2").instances == 1
    assert idx.series_state("1.2.3").folder == "A/S"


def test_new_uid_abort_leaves_nothing(idx):
    claim = idx.begin("1.1", "A/S/1.1.dcm", facts_for(b"one"))
    idx.abort(claim)
    assert idx.lookup("1.1") is None
    assert idx.series_list() == []


@pytest.mark.parametrize(
    "new_path, data, expect_old",
    [
        ("A/S/1.1.dcm", b"two", None),  # same place, new bytes
        ("B/S/1.1.dcm", b"two", "A/S/1.1.dcm"),  # corrected PatientName: another folder
    ],
)
def test_replace(root, idx, new_path, data, expect_old):
    assert put(root, idx, "1.1", "A/S/1.1.dcm", b"one") == "stored"
    claim = idx.begin("1.1", new_path, facts_for(data))
    assert claim.old.path == "A/S/1.1.dcm" and claim.old.size == 3
    (root / new_path).parent.mkdir(parents=True, exist_ok=True)
    (root / new_path).write_bytes(data)
    assert idx.commit(claim) == expect_old
    assert idx.lookup("1.1").path == new_path
    assert idx.obsolete_paths() == ([expect_old] if expect_old else [])
    if expect_old:
        os.unlink(root / expect_old)
        idx.obsolete_removed(expect_old)
    assert idx.series_state("1.2.3").instances == 1
    assert_agree(root, idx)


def test_abort_of_existing_restores_row(root, idx):
    put(root, idx, "1.1", "A/S/1.1.dcm", b"one")
    before = idx.lookup("1.1")
    claim = idx.begin("1.1", "B/S/1.1.dcm", facts_for(b"two"))
    assert idx.lookup("1.1").state == "pending"
    idx.abort(claim)
    assert idx.lookup("1.1") == before


@pytest.mark.parametrize("policy, outcome", [("replace", "replaced"), ("keep", "kept")])
def test_policies_and_identical(root, idx, policy, outcome):
    assert put(root, idx, "1.1", "A/S/1.1.dcm", b"one") == "stored"
    assert put(root, idx, "1.1", "A/S/1.1.dcm", b"one", policy=policy) == "identical"
    assert put(root, idx, "1.1", "B/S/1.1.dcm", b"two", policy=policy) == outcome
    rows = assert_agree(root, idx)
    assert [r.path for r in rows] == ["B/S/1.1.dcm" if policy == "replace" else "A/S/1.1.dcm"]
    assert not (root / ("A" if policy == "replace" else "B")).exists()  # pruned / never made


def test_move_to_another_series_moves_the_counts(root, idx):
    put(root, idx, "1.1", "A/S/1.1.dcm", b"one", facts=facts_for(b"one", series="9.1", study="9"))
    put(root, idx, "1.2", "A/S/1.2.dcm", b"uno", facts=facts_for(b"uno", series="9.1", study="9"))
    put(root, idx, "1.1", "A/T/1.1.dcm", b"two", facts=facts_for(b"two", series="9.2", study="9"))
    assert idx.series_state("9.1").instances == 1
    assert idx.series_state("9.2").instances == 1
    assert idx.study_state("9").instances == 2 and idx.study_state("9").series == 2
    put(root, idx, "1.2", "A/T/1.2.dcm", b"dos", facts=facts_for(b"dos", series="9.2", study="9"))
    emptied = idx.series_state("9.1")  # kept at 0 until the completion watcher removed its manifest
    assert emptied.instances == 0 and [s.series_instance_uid for s in idx.series_list()] == ["9.2"]
    assert idx.study_state("9").series == 1
    assert not idx.forget_empty_series("9.1", emptied.revision - 1)  # read before a later change
    assert idx.forget_empty_series("9.1", emptied.revision)
    assert not idx.forget_empty_series("9.1", emptied.revision)  # settled once
    assert idx.series_state("9.1").complete and "9.1" not in {s.series_instance_uid for s in idx.stable_series(0, now=time.time() + 1)}
    assert_agree(root, idx)
    # an instance that comes back gives the next revision, never one given before
    put(root, idx, "1.2", "A/S/1.2.dcm", b"tres", facts=facts_for(b"tres", series="9.1", study="9"))
    back = idx.series_state("9.1")
    assert (back.instances, back.revision, back.complete) == (1, emptied.revision + 1, False)


def test_commit_of_a_lost_claim_raises(root, idx):
    claim = idx.begin("1.1", "A/S/1.1.dcm", facts_for(b"one"))
    raw(root).execute("UPDATE instances SET owner = 'someone.else.1' WHERE sop_instance_uid = '1.1'")
    with pytest.raises(ClaimLostError):
        idx.commit(claim)
    assert issubclass(ClaimLostError, InstanceIndexError)


def test_claim_held_by_a_live_process_times_out(root, idx):
    other = SqliteIndex(root)  # same pid: alive
    try:
        claim = other.begin("1.1", "A/S/1.1.dcm", facts_for(b"one"))
        t0 = time.monotonic()
        with pytest.raises(ClaimTimeoutError):
            idx.begin("1.1", "B/S/1.1.dcm", facts_for(b"two"), timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 2
        other.abort(claim)
        assert idx.begin("1.1", "B/S/1.1.dcm", facts_for(b"two")).old is None
    finally:
        other.close()


def test_claim_held_by_a_dead_process_is_settled_on_the_spot(root, idx):
    put(root, idx, "1.1", "A/S/1.1.dcm", b"one")
    # a dead worker had claimed it for B and linked B before dying
    claim = idx.begin("1.1", "B/S/1.1.dcm", facts_for(b"two"))
    (root / "B/S").mkdir(parents=True)
    (root / "B/S/1.1.dcm").write_bytes(b"two")
    raw(root).execute(f"UPDATE instances SET owner = '{DEAD}' WHERE sop_instance_uid = '1.1'")
    assert claim  # its process is gone
    again = idx.begin("1.1", "C/S/1.1.dcm", facts_for(b"three"))
    assert again.old.path == "B/S/1.1.dcm" and again.old.size == 3  # the dead one's commit was finished
    idx.abort(again)
    assert finish_recovery(root, idx) == ["A/S/1.1.dcm"]
    assert_agree(root, idx)


def test_bad_arguments(idx):
    with pytest.raises(ValueError):
        idx.begin("1.1", "../x/1.1.dcm", {})
    with pytest.raises(ValueError):
        idx.begin("1.1", "/abs/1.1.dcm", {})
    with pytest.raises(ValueError):
        idx.begin("1.1", "a/1.1.dcm", {"sizee": 1})


def test_connection_is_not_used_across_fork(root, idx):
    pid = os.fork()
    if pid == 0:
        try:
            idx.lookup("1.1")
        except InstanceIndexError:
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --------------------------------------------------------------- recover


def _pending(root: Path, uid: str, path: str | None, new: str, data: bytes) -> None:
    """Leave the intent a SIGKILLed worker leaves after begin."""
    index = SqliteIndex(root)
    index.begin(uid, new, facts_for(data))
    index.close()
    raw(root).execute(f"UPDATE instances SET owner = '{DEAD}' WHERE sop_instance_uid = ?", (uid,))


@pytest.mark.parametrize(
    "linked, expect_path, expect_removed",
    [
        (True, "B/S/1.1.dcm", ["A/S/1.1.dcm"]),  # killed after linking: the commit is finished
        (False, "A/S/1.1.dcm", []),  # killed before linking: the intent is dropped
    ],
)
def test_recover_settles_dead_intents(root, idx, linked, expect_path, expect_removed):
    put(root, idx, "1.1", "A/S/1.1.dcm", b"one")
    _pending(root, "1.1", "A/S/1.1.dcm", "B/S/1.1.dcm", b"two")
    _pending(root, "2.2", None, "A/S/2.2.dcm", b"new")  # a new UID, killed before linking
    if linked:
        (root / "B/S").mkdir(parents=True)
        (root / "B/S/1.1.dcm").write_bytes(b"two")
    assert finish_recovery(root, idx) == expect_removed
    assert idx.lookup("1.1").path == expect_path
    assert idx.lookup("2.2") is None
    assert_agree(root, idx)


@pytest.mark.parametrize("replaced", [True, False], ids=["replaced", "not replaced"])
def test_a_dead_replace_at_the_same_name_is_told_by_the_inode_not_the_clock(root, idx, replaced):
    """A worker claims a UID for the name its file already has, replaces that
    file (same size, other bytes) and is killed before its commit. Recovery
    took the file for untouched when its ctime was older than the claim, but
    the file system's clock lags ours by up to a tick: a file replaced just
    after the claim looks older, and the index kept the old digest for the
    new bytes (seen once under load in the SIGKILL test below). The claim now
    holds the inode that was there; a replace puts another one."""
    put(root, idx, "1.1", "A/S/1.1.dcm", b"one")
    _pending(root, "1.1", "A/S/1.1.dcm", "A/S/1.1.dcm", b"two")
    if replaced:
        tmp = root / "two.part"
        tmp.write_bytes(b"two")
        os.replace(tmp, root / "A/S/1.1.dcm")
    # the claim as if made a moment after the file's change (the clock's lag)
    after = (root / "A/S/1.1.dcm").lstat().st_ctime + 0.002
    raw(root).execute("UPDATE instances SET since = ? WHERE sop_instance_uid = '1.1'", (after,))
    finish_recovery(root, idx)
    assert idx.lookup("1.1").path == "A/S/1.1.dcm"
    assert (root / "A/S/1.1.dcm").read_bytes() == (b"two" if replaced else b"one")
    assert_agree(root, idx)  # the row's size and digest are the file's


def test_recover_finishes_removal_of_obsolete_files(root, idx):
    put(root, idx, "1.1", "A/S/1.1.dcm", b"one")
    claim = idx.begin("1.1", "B/S/1.1.dcm", facts_for(b"two"))
    (root / "B/S").mkdir(parents=True)
    (root / "B/S/1.1.dcm").write_bytes(b"two")
    assert idx.commit(claim) == "A/S/1.1.dcm"
    # killed before it unlinked A: the obsolete entry says so
    raw(root).execute(f"UPDATE obsolete SET owner = '{DEAD}'")
    assert finish_recovery(root, idx) == ["A/S/1.1.dcm"]
    assert_agree(root, idx)


def test_recover_with_intended_file_mismatched_keeps_old(root, idx):
    # the new path holds an older leftover version, not the intended bytes
    put(root, idx, "1.1", "A/S/1.1.dcm", b"one")
    (root / "B/S").mkdir(parents=True)
    (root / "B/S/1.1.dcm").write_bytes(b"zero")
    _pending(root, "1.1", "A/S/1.1.dcm", "B/S/1.1.dcm", b"two")
    assert finish_recovery(root, idx) == ["B/S/1.1.dcm"]
    assert idx.lookup("1.1").path == "A/S/1.1.dcm"
    assert_agree(root, idx)


def test_sigkill_at_random_points_leaves_tree_and_index_in_agreement(root, spawn):
    rng = random.Random(20261201)
    seen_pending = seen_obsolete = 0
    for round_ in range(20):
        ready = CTX.Event()
        child = spawn(churn, str(root), round_, ready)
        assert ready.wait(30), "child did not start"
        time.sleep(rng.uniform(0.005, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        conn = raw(root)
        seen_pending += conn.execute("SELECT count(*) FROM instances WHERE state <> 'ok'").fetchone()[0]
        seen_obsolete += conn.execute("SELECT count(*) FROM obsolete").fetchone()[0]
        conn.close()
        assert check(root) is None
        index = SqliteIndex(root)
        try:
            finish_recovery(root, index)
            rows = assert_agree(root, index)
        finally:
            index.close()
    assert rows, "the children stored nothing"
    print(f"kills inside the protocol: {seen_pending} intents, {seen_obsolete} obsolete files, {len(rows)} rows")
    assert seen_pending + seen_obsolete > 0, "no kill landed inside the protocol"


# --------------------------------------------------------------- concurrency


@pytest.mark.parametrize("policy", ["replace", "keep"])
def test_four_processes_claim_the_same_uids(root, policy, spawn):
    uids = [f"1.2.840.99.{i}" for i in range(40)]
    barrier, results = CTX.Barrier(4), CTX.Queue()
    procs = [spawn(race, str(root), w, uids, policy, barrier, results) for w in range(4)]
    outcomes = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    index = SqliteIndex(root)
    try:
        rows = assert_agree(root, index)
    finally:
        index.close()
    assert sorted(r.sop_instance_uid for r in rows) == sorted(uids)
    for uid in uids:
        got = [outcomes[w][uid] for w in range(4)]
        assert got.count("stored") == 1  # exactly one was first
        if policy == "keep":
            assert got.count("kept") == 3
            first = got.index("stored")
            assert [r.path for r in rows if r.sop_instance_uid == uid] == [f"W{first}/S/{uid}.dcm"]
        else:
            assert got.count("replaced") == 3


@pytest.mark.parametrize("kind", ["series", "study"])
def test_mark_complete_exactly_once_across_two_processes(root, kind, spawn):
    index = SqliteIndex(root)
    t0 = time.time() - 100
    for i in range(150):
        data = f"i{i}".encode()
        index.record_placed(f"5.{i}", f"P/S{i}/5.{i}.dcm", facts_for(data, series=f"7.{i}", study=f"8.{i % 50}"), now=t0)
    barrier, results = CTX.Barrier(2), CTX.Queue()
    procs = [spawn(complete_race, str(root), kind, barrier, results) for _ in range(2)]
    won = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    expect = {f"7.{i}" for i in range(150)} if kind == "series" else {f"8.{i}" for i in range(50)}
    assert len(won[0]) + len(won[1]) == len(expect)
    assert set(won[0]) | set(won[1]) == expect
    assert (index.stable_series(10) if kind == "series" else index.stable_studies(10)) == []
    index.close()


def test_revision_increments_after_completion(root, idx):
    t0 = 1_000_000.0
    idx.record_placed("1.1", "P/S/1.1.dcm", facts_for(b"a"), now=t0)
    [s] = idx.stable_series(10, now=t0 + 20)
    assert (s.revision, s.completed_revision, s.complete) == (1, 0, False)
    assert idx.stable_series(10, now=t0 + 5) == []  # not quiet long enough
    # an arrival between the look and the mark: the mark must not hide it
    idx.record_placed("1.2", "P/S/1.2.dcm", facts_for(b"b"), now=t0 + 1)
    assert idx.mark_series_complete("1.2.3", s.revision, arrivals=s.arrivals) is False
    [s] = idx.stable_series(10, now=t0 + 20)
    assert idx.mark_series_complete("1.2.3", s.revision, arrivals=s.arrivals) is True
    assert idx.mark_series_complete("1.2.3", s.revision) is False  # exactly once
    assert idx.series_state("1.2.3").complete
    assert idx.stable_series(10, now=t0 + 50) == []
    idx.record_placed("1.3", "P/S/1.3.dcm", facts_for(b"c"), now=t0 + 60)  # late arrival
    st = idx.series_state("1.2.3")
    assert (st.revision, st.completed_revision, st.instances, st.complete) == (2, 1, 3, False)
    idx.record_placed("1.4", "P/S/1.4.dcm", facts_for(b"d"), now=t0 + 61)  # same revision
    assert idx.series_state("1.2.3").revision == 2
    [s] = idx.stable_series(10, now=t0 + 100)
    assert s.revision == 2
    assert idx.mark_series_complete("1.2.3", 1) is False
    assert idx.mark_series_complete("1.2.3", 2) is True
    [study] = idx.studies()
    assert study.revision == 1  # never completed: still its first revision
    assert idx.mark_study_complete(study.study_instance_uid, 1) is True
    idx.record_placed("1.5", "P/S/1.5.dcm", facts_for(b"e"), now=t0 + 200)
    assert idx.study_state(study.study_instance_uid).revision == 2
    assert [r.sop_instance_uid for r in idx.instances_of_series("1.2.3")] == ["1.1", "1.2", "1.3", "1.4", "1.5"]


# --------------------------------------------------------------- rebuild / check


def read_identity(path: Path) -> dict:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {
        "sop_instance_uid": ds.SOPInstanceUID,
        "sop_class_uid": ds.SOPClassUID,
        "transfer_syntax_uid": ds.file_meta.TransferSyntaxUID,
        "study_instance_uid": ds.StudyInstanceUID,
        "series_instance_uid": ds.SeriesInstanceUID,
        "patient_name": str(ds.PatientName),
        "patient_id": ds.PatientID,
        "study_date": ds.StudyDate,
        "series_description": ds.SeriesDescription,
        "series_number": int(ds.SeriesNumber),
        "modality": ds.Modality,
        "calling_aet": ds.file_meta.get("SourceApplicationEntityTitle"),
    }


def dicom_bytes(tmp: Path, patient: str, pid: str, study: str, series: str, number: int, uid: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = uid
    ds.PatientName, ds.PatientID = patient, pid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyDate, ds.Modality = "20261201", "OT"
    ds.SeriesDescription, ds.SeriesNumber = f"Series{number}", number
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "MODALITY"
    ds.file_meta = meta
    ds.save_as(tmp, enforce_file_format=True)
    return tmp.read_bytes()


def build_tree(root: Path, index: SqliteIndex, scratch: Path) -> None:
    """3 patients x 2 series x 4 instances through the claim protocol, then
    one series resent with a corrected PatientName (every file moves)."""
    plan = []
    for p in range(3):
        study = generate_uid()
        for s in range(2):
            series = generate_uid()
            for i in range(4):
                plan.append((f"Doe^{p}", f"ID{p}", study, series, s + 1, generate_uid()))
    resent = [("Doe^Corrected", *rest) for (name, *rest) in plan if name == "Doe^1"][:4]
    for k, (name, pid, study, series, number, uid) in enumerate(plan + resent):
        data = dicom_bytes(scratch / f"{k}.dcm", name, pid, study, series, number, uid)
        facts = read_identity(scratch / f"{k}.dcm")
        del facts["sop_instance_uid"]
        facts.update(size=len(data), digest=hashlib.sha256(data).hexdigest())
        rel = f"{name}_{pid}/Series{number}_{number}/{uid}.dcm"
        put(root, index, uid, rel, data, facts=facts)


def snapshot(index: SqliteIndex):
    rows = sorted(dataclasses_replace(r, received=None) for r in index.all_instances())
    series = sorted(
        (s.series_instance_uid, s.study_instance_uid, s.folder, s.series_description, s.series_number,
         s.modality, s.instances, s.patient_name)
        for s in index.series_list()
    )
    studies = sorted(
        (s.study_instance_uid, s.patient_name, s.patient_id, s.study_date, s.instances, s.series)
        for s in index.studies()
    )
    return rows, series, studies


def dataclasses_replace(row, **kw):
    import dataclasses

    return tuple(dataclasses.astuple(dataclasses.replace(row, **kw)))


def test_rebuild_from_real_dicom_files_equals_incremental(root, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    index = SqliteIndex(root)
    build_tree(root, index, scratch)
    assert_agree(root, index)
    incremental = snapshot(index)
    assert len(incremental[0]) == 24 and len(incremental[1]) == 6
    assert any(s[7] == "Doe^Corrected" for s in incremental[1])
    with pytest.raises(IndexInUseError):
        rebuild(root, read_identity)  # not under an open index
    index.close()
    summary = rebuild(root, read_identity, digests=True)
    assert (summary.files_seen, summary.instances, summary.duplicates, summary.unreadable) == (24, 24, [], [])
    assert summary.generation == 2
    assert check(root) is None
    index = SqliteIndex(root)
    assert snapshot(index) == incremental
    index.close()

    # a second file for one UID (newer), and a .dcm that is not DICOM
    keep = next(r for r in incremental[0])
    uid, path = keep[0], keep[1]
    other = f"Elsewhere_X/S_1/{uid}.dcm"
    (root / other).parent.mkdir(parents=True)
    (root / other).write_bytes((root / path).read_bytes())
    os.utime(root / other, (time.time() + 10, time.time() + 10))
    (root / "Elsewhere_X/S_1/junk.dcm").write_bytes(b"not dicom")
    summary = rebuild(root, read_identity)
    assert summary.duplicates == [(uid, other, path)]
    assert [u[0] for u in summary.unreadable] == ["Elsewhere_X/S_1/junk.dcm"]
    with SqliteIndex(root) as index:
        assert index.lookup(uid).path == other


def test_rebuild_carries_completion_state_over(root, idx):
    idx.record_placed("1.1", "P/S/1.1.dcm", facts_for(b"a", series="3.1"), now=1.0)
    idx.record_placed("1.2", "P/T/1.2.dcm", facts_for(b"b", series="3.2"), now=1.0)
    for s in idx.stable_series(0):
        assert idx.mark_series_complete(s.series_instance_uid, s.revision)
    for rel, data in (("P/S/1.1.dcm", b"a"), ("P/T/1.2.dcm", b"b"), ("P/T/1.3.dcm", b"c")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)  # 1.3 is a file the index never heard of
    idx.close()
    ident = {"1.1": "3.1", "1.2": "3.2", "1.3": "3.2"}
    summary = rebuild(root, lambda p: {"sop_instance_uid": p.stem, "series_instance_uid": ident[p.stem]})
    assert summary.carried_completion
    with SqliteIndex(root) as index:
        assert index.series_state("3.1").complete  # unchanged: stays complete
        s2 = index.series_state("3.2")
        assert (s2.instances, s2.revision, s2.completed_revision) == (2, 2, 1)  # grew: a new revision


@pytest.mark.parametrize("change", ["one file for another", "other bytes", "moved", "none"])
def test_rebuild_carries_completion_only_over_a_series_whose_files_are_the_same(root, idx, change):
    """Not its count alone: one file removed and another added by hand (or by
    a sort), then a rebuild, kept the series complete, and its manifest named
    a file that was gone and left out one that was there."""
    for uid, data in (("1.1", b"a"), ("1.2", b"b")):
        idx.record_placed(uid, f"P/S/{uid}.dcm", facts_for(data, series="3.1", study="3"), now=1.0)
    for s in idx.stable_series(0):
        assert idx.mark_series_complete(s.series_instance_uid, s.revision)
    for t in idx.stable_studies(0):
        assert idx.mark_study_complete(t.study_instance_uid, t.revision)
    idx.close()
    files = {"P/S/1.1.dcm": b"a", "P/S/1.2.dcm": b"b"}
    if change == "one file for another":
        del files["P/S/1.2.dcm"]
        files["P/S/1.4.dcm"] = b"d"
    elif change == "other bytes":
        files["P/S/1.2.dcm"] = b"bb"
    elif change == "moved":
        files["P/T/1.2.dcm"] = files.pop("P/S/1.2.dcm")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    summary = rebuild(root, lambda p: {"sop_instance_uid": p.stem, "series_instance_uid": "3.1",
                                       "study_instance_uid": "3"})
    assert summary.carried_completion
    with SqliteIndex(root) as index:
        series, study = index.series_state("3.1"), index.study_state("3")
        assert series.instances == study.instances == 2
        if change == "none":
            assert (series.revision, series.complete, study.revision, study.complete) == (1, True, 1, True)
        else:  # a new revision, to complete (and its manifest to be written) again
            assert (series.revision, series.complete, study.revision, study.complete) == (2, False, 2, False)


def test_missing_index_is_rebuilt(root, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    index, report = open_index(root, read_identity)
    assert report.rebuilt is None
    build_tree(root, index, scratch)
    before = snapshot(index)
    index.close(clean=True)
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (root / ".sortscp" / name).unlink(missing_ok=True)
    assert check(root) == "missing"
    with pytest.raises(IndexStaleError):
        SqliteIndex(root)
    index, report = open_index(root, read_identity, digests=True)
    assert report.rebuilt == "missing" and report.summary.instances == 24
    assert snapshot(index) == before
    index.close(clean=True)


def test_check_detects_schema_garbage_and_unclean_reboot(root):
    index = SqliteIndex(root)
    index.mark_running()
    index.close()  # not clean: a crash
    assert check(root) is None  # same boot: a process crash, recover() is enough
    raw(root).execute("UPDATE meta SET value = 'another-boot' WHERE key = 'boot_id'")
    assert "reboot" in check(root)
    index = SqliteIndex(root)
    index.close(clean=True)
    assert check(root) is None  # closed cleanly: a reboot since does not matter
    raw(root).execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    assert "schema" in check(root)
    ix.index_path(root).write_bytes(b"garbage" * 1000)
    for name in ("index.sqlite-wal", "index.sqlite-shm"):
        (root / ".sortscp" / name).unlink(missing_ok=True)
    assert check(root).startswith("unreadable")
    rebuild(root, read_identity)
    assert check(root) is None


def test_clean_close_is_not_recorded_while_another_process_has_it_open(root):
    a, b = SqliteIndex(root), SqliteIndex(root)
    a.mark_running()
    a.close(clean=True)  # b still open: not clean yet
    raw(root).execute("UPDATE meta SET value = 'another-boot' WHERE key = 'boot_id'")
    assert "reboot" in check(root)
    b.close(clean=True)
    assert check(root) is None


def test_sigkill_one_of_two_concurrent_workers_the_other_settles_its_intents(root, spawn):
    rng = random.Random(7)
    for round_ in range(8):
        ready = [CTX.Event(), CTX.Event()]
        kids = [spawn(churn, str(root), 100 + 2 * round_ + k, ready[k]) for k in range(2)]
        assert all(r.wait(30) for r in ready)
        time.sleep(rng.uniform(0.01, 0.2))
        os.kill(kids[0].pid, signal.SIGKILL)  # the other goes on, meeting its intents
        kids[0].join(10)
        time.sleep(rng.uniform(0.05, 0.3))
        assert kids[1].is_alive(), "the survivor failed"
        os.kill(kids[1].pid, signal.SIGKILL)
        kids[1].join(10)
        index = SqliteIndex(root)
        try:
            finish_recovery(root, index)
            assert_agree(root, index)
        finally:
            index.close()


def test_one_index_shared_by_threads(root, idx):
    from conftest import in_threads

    def work(t: int) -> None:
        for i in range(30):
            put(root, idx, f"4.{i}", f"T{t}/S/4.{i}.dcm", f"{t}-{i}".encode(), durable=False)

    errors = in_threads(work)
    assert errors == []
    assert len(assert_agree(root, idx)) == 30


@pytest.mark.parametrize("folder", ["out#1", "what?", "100%"])
def test_an_index_under_a_folder_with_uri_characters_is_kept(tmp_path, folder):
    """'#', '?' or '%' in OUT's path cut the SQLite URI that checks the index:
    it read as unreadable, and every start rebuilt it from the tree."""
    root = tmp_path / folder
    root.mkdir()
    index, report = open_index(root, read_identity)
    index.close(clean=True)
    assert check(root) is None
    index, report = open_index(root, read_identity)
    index.close(clean=True)
    assert report.rebuilt is None


def test_an_identical_resend_whose_worker_died_gives_no_new_revision(root, idx):
    """The dead claim named the committed path with the same bytes: it was
    settled as a new commit, one more arrival and revision 2 of a complete
    series, so its completion hook ran again for the same content."""
    put(root, idx, "1.1", "A/S/1.1.dcm", b"one")
    [s] = idx.stable_series(0, now=time.time() + 10)
    assert idx.mark_series_complete(s.series_instance_uid, s.revision, arrivals=s.arrivals)
    before = idx.series_state(s.series_instance_uid)
    time.sleep(0.01)  # the claim comes after the file's last change
    _pending(root, "1.1", "A/S/1.1.dcm", "A/S/1.1.dcm", b"one")  # killed while comparing
    assert finish_recovery(root, idx) == []
    after = idx.series_state(s.series_instance_uid)
    assert (after.revision, after.arrivals, after.complete) == (before.revision, before.arrivals, True)
    assert_agree(root, idx)


def test_a_same_size_resend_that_replaced_the_file_before_its_worker_died_is_a_new_revision(root, idx):
    """The other side of the same rule: the committed file was replaced (same
    path, same size, other bytes) by the worker that died: that is new."""
    put(root, idx, "1.1", "A/S/1.1.dcm", b"one")
    [s] = idx.stable_series(0, now=time.time() + 10)
    assert idx.mark_series_complete(s.series_instance_uid, s.revision, arrivals=s.arrivals)
    time.sleep(0.01)
    _pending(root, "1.1", "A/S/1.1.dcm", "A/S/1.1.dcm", b"two")
    tmp = root / "A/S/.new"
    tmp.write_bytes(b"two")
    os.replace(tmp, root / "A/S/1.1.dcm")  # as the worker renames its file over the old one
    assert finish_recovery(root, idx) == []
    after = idx.series_state(s.series_instance_uid)
    assert after.revision == 2 and not after.complete
    assert idx.lookup("1.1").digest == hashlib.sha256(b"two").hexdigest()


def test_an_index_made_before_the_study_lookup_gets_it_when_opened(root):
    """The series of a study are found by its instances (a series UID a sender
    gave two studies); an index made before had no SQL index for that, and
    each study's lookup read every instance row. Opening it for writing makes
    the SQL index; a read-only open (``ls``) leaves the file alone."""
    def study_index() -> list:
        conn = raw(root)
        try:
            return conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'instances_study'"
                                ).fetchall()
        finally:
            conn.close()

    assert study_index() == [("instances_study",)]
    conn = raw(root)
    conn.execute("DROP INDEX instances_study")
    conn.close()
    SqliteIndex(root, read_only=True).close()
    assert study_index() == []
    SqliteIndex(root).close()
    assert study_index() == [("instances_study",)]

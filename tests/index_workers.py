"""The caller's side of the index claim protocol, as a worker does it, and the
child-process bodies of tests/test_index.py (importable by spawned children:
standard library and scp.store only, no pytest, no pydicom)."""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

from scp.store._prune import remove_obsolete
from scp.store.fsops import ensure_parent, fsync_path
from scp.store.index import SqliteIndex

TMP = ".sortscp-tmp"


def facts_for(data: bytes, series: str = "1.2.3", study: str = "1.2", **more) -> dict:
    return {
        "size": len(data),
        "digest": hashlib.sha256(data).hexdigest(),
        "series_instance_uid": series,
        "study_instance_uid": study,
        **more,
    }


def put(root: Path, index: SqliteIndex, uid: str, relpath: str, data: bytes, *, policy: str = "replace",
        facts: dict | None = None, durable: bool = True) -> str:
    """Store `data` as `uid` at `relpath` the way the server does; returns
    'stored', 'replaced', 'identical' or 'kept'."""
    root = Path(root)
    facts = facts_for(data) if facts is None else facts
    tmpdir = root / TMP
    tmpdir.mkdir(parents=True, exist_ok=True)
    tmp = tmpdir / f"{os.getpid()}-{time.monotonic_ns()}.part"
    tmp.write_bytes(data)
    claim = index.begin(uid, relpath, facts)
    try:
        if claim.old is not None and claim.old.digest == facts.get("digest"):
            index.abort(claim)
            tmp.unlink()
            return "identical"
        if claim.old is not None and policy == "keep":
            index.abort(claim)
            tmp.unlink()
            return "kept"
        if durable:
            fsync_path(tmp)
        final = root / relpath
        for _ in range(10):  # a concurrent prune may remove the folder we made
            ensure_parent(root, final, durable=False)  # (makes a folder pruned meanwhile again)
            try:
                os.replace(tmp, final)
                break
            except FileNotFoundError:
                continue
        else:
            raise OSError(f"cannot link {final}")
        if durable:
            fsync_path(final.parent)
    except BaseException:
        index.abort(claim)
        tmp.unlink(missing_ok=True)
        raise
    old = index.commit(claim)
    if old is not None:
        remove_obsolete(root, old)
        index.obsolete_removed(old)
    return "stored" if claim.old is None else "replaced"


def finish_recovery(root: Path, index: SqliteIndex) -> list[str]:
    """What the server does at start: recover, remove the obsolete files,
    confirm them, remove the temporary files of the dead."""
    paths = index.recover()
    for rel in paths:
        remove_obsolete(root, rel)
        index.obsolete_removed(rel)
    tmpdir = Path(root) / TMP
    if tmpdir.is_dir():
        for leftover in tmpdir.iterdir():
            leftover.unlink()
    return paths


def layout_files(root: Path) -> set[str]:
    """Relative paths of every file of the layout (dot folders skipped)."""
    root = Path(root)
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            out.add(Path(dirpath, name).relative_to(root).as_posix())
    return out


# ---------------------------------------------------------------- child bodies


def race(root: str, worker: int, uids: list[str], policy: str, barrier, results) -> None:
    """One of several processes storing the same UIDs under its own folder."""
    index = SqliteIndex(root)
    outcomes = {}
    barrier.wait(60)
    for uid in uids:
        data = f"{uid} from worker {worker}".encode()
        outcomes[uid] = put(Path(root), index, uid, f"W{worker}/S/{uid}.dcm", data, policy=policy, durable=False)
    index.close()
    results.put((worker, outcomes))


def churn(root: str, seed: int, ready) -> None:
    """Store, resend under another path, resend identical, keep... forever,
    until killed."""
    rng = random.Random(seed)
    index = SqliteIndex(root)
    ready.set()
    n = 0
    last: dict[str, bytes] = {}
    while True:
        uid = f"1.2.826.0.1.{rng.randrange(60)}"
        variant = rng.randrange(3)
        if uid in last and rng.random() < 0.15:
            data = last[uid]  # identical resend
        else:
            data = f"{uid}|{variant}|{seed}|{n}|".encode() * rng.randint(1, 50)
            last[uid] = data
        n += 1
        series = f"1.2.3.{variant}"  # the series moves too, now and then
        put(Path(root), index, uid, f"P{variant}/S{variant % 2}/{uid}.dcm", data,
            policy="keep" if rng.random() < 0.2 else "replace",
            facts=facts_for(data, series=series, study="1.2.9", patient_name=f"P{variant}"))


def complete_race(root: str, kind: str, barrier, results) -> None:
    """Mark every stable series (or study) complete; report the ones we flipped."""
    index = SqliteIndex(root)
    won = []
    barrier.wait(60)
    for _ in range(3):
        if kind == "series":
            for s in index.stable_series(10):
                if index.mark_series_complete(s.series_instance_uid, s.revision, arrivals=s.arrivals):
                    won.append(s.series_instance_uid)
        else:
            for s in index.stable_studies(10):
                if index.mark_study_complete(s.study_instance_uid, s.revision, arrivals=s.arrivals):
                    won.append(s.study_instance_uid)
    index.close()
    results.put(won)


"""Cost of the instance index's claim protocol (begin + commit), without files.

    python benchmarks/bench_index.py [--n 5000] [--runs 3] [--dir DIR]

Prints, per case, the median over runs of the wall time per instance (all
processes together) and of the time each process spends per instance.
Cases: a new UID (the common case) in 1 and in 4 concurrent processes; a
known UID moved to another path (the replace case) in 1 process.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scp.store.index import SqliteIndex, create_empty

FACTS = {
    "size": 528_000,
    "digest": "0" * 64,
    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
    "transfer_syntax_uid": "1.2.840.10008.1.2.1",
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
    "series_instance_uid": "1.2.826.0.1.3680043.8.498.1.1",
    "patient_name": "Doe^John",
    "patient_id": "12345",
    "study_date": "20261201",
    "series_description": "CT Thorax",
    "series_number": 2,
    "modality": "CT",
    "calling_aet": "MODALITY",
}


def worker(root: str, prefix: str, n: int, replace: bool, barrier, results) -> None:
    index = SqliteIndex(root)
    uid = f"1.2.826.0.1.3680043.8.498.{prefix}."
    if replace:
        for i in range(n):
            index.commit(index.begin(f"{uid}{i}", f"A/S/{uid}{i}.dcm", FACTS))
    barrier.wait()
    t0 = time.perf_counter()
    for i in range(n):
        new = f"B/S/{uid}{i}.dcm" if replace else f"A/S/{uid}{i}.dcm"
        old = index.commit(index.begin(f"{uid}{i}", new, FACTS))
        if old is not None:
            index.obsolete_removed(old)
    results.put(time.perf_counter() - t0)
    index.close()


def run(base: Path, procs: int, n: int, replace: bool) -> tuple[float, float]:
    root = Path(tempfile.mkdtemp(dir=base))
    create_empty(root)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(procs + 1), ctx.Queue()
    ps = [ctx.Process(target=worker, args=(str(root), f"{p}", n // procs, replace, barrier, results)) for p in range(procs)]
    for p in ps:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    each = [results.get() for _ in ps]
    wall = time.perf_counter() - t0
    for p in ps:
        p.join()
    per = n // procs * procs
    return wall / per * 1000, statistics.mean(each) / (n // procs) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as base:
        for label, procs, replace in (("new UID, 1 process", 1, False), ("new UID, 4 processes", 4, False),
                                      ("replace (new path), 1 process", 1, True)):
            walls, eachs = zip(*(run(Path(base), procs, args.n, replace) for _ in range(args.runs)))
            print(f"{label:32s} {statistics.median(walls):.3f} ms/instance wall,"
                  f" {statistics.median(eachs):.3f} ms/instance in each process")


if __name__ == "__main__":
    main()

"""What the completeness check and the instance index cost per instance, as a
share of serve's time per instance.

Measured side by side in one run, medians:

* the completeness walk of a ~0.5 MB CT dataset fed in 16 KiB fragments (what
  the network thread does as P-DATA arrives);
* the index's claim + commit of a new SOPInstanceUID (what each worker does
  around the link into the layout), on a real index under a temporary folder
  of the same file system as the cache;
* serve's wall time per instance for 500 such instances from one DCMTK
  ``storescu`` (``bench_serve.one_run``), which includes both.

Run from the repository root (needs DCMTK)::

    python benchmarks/bench_serve_checks.py [--runs 5] [--cache /tmp/sortscp-bench]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's scp

from bench_serve import one_run, split_folders  # noqa: E402

from scp.dicom.header import read_header  # noqa: E402
from scp.dicom.walk import SOP_CLASS_UID, SOP_INSTANCE_UID, DatasetWalker  # noqa: E402
from scp.jobs import FACT_KEYWORDS, instance_facts  # noqa: E402
from scp.store.index import SqliteIndex, create_empty  # noqa: E402

from _trees import CT, DEFAULT_CACHE, build_tree, instance_files  # noqa: E402
from localnet import dcmtk  # noqa: E402

FRAGMENT = 16 * 1024


def walk_seconds(dataset: bytes, repeat: int) -> float:
    view = memoryview(dataset)
    start = time.perf_counter()
    for _ in range(repeat):
        w = DatasetWalker(implicit=False, little=True, wanted=(SOP_CLASS_UID, SOP_INSTANCE_UID))
        for i in range(0, len(view), FRAGMENT):
            w.feed(view[i : i + FRAGMENT])
        w.close()
    return (time.perf_counter() - start) / repeat


def index_seconds(root: Path, facts: dict, n: int) -> float:
    create_empty(root)
    index = SqliteIndex(root)
    try:
        start = time.perf_counter()
        for i in range(n):
            claim = index.begin(f"1.2.826.0.1.3680043.99.{time.time_ns()}.{i}", f"P/S/{i}.dcm", facts)
            index.commit(claim)
        return (time.perf_counter() - start) / n
    finally:
        index.close(clean=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    storescu = dcmtk("storescu")
    files = instance_files(build_tree(CT, args.cache))
    sample = files[0]
    ds = read_header(sample, FACT_KEYWORDS)
    raw = sample.read_bytes()
    offset = 144 + int(ds.file_meta.FileMetaInformationGroupLength)
    dataset = raw[offset:]
    facts = instance_facts(ds, len(raw), "BENCH")
    work = args.cache / "work-checks"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    walks, claims, serves = [], [], []
    folders = split_folders(files, work, 1) if storescu else []
    for _ in range(args.runs):
        walks.append(walk_seconds(dataset, 200))
        with tempfile.TemporaryDirectory(dir=work) as root:
            claims.append(index_seconds(Path(root), facts, 2000))
        if storescu:
            serves.append(one_run("sortscp", storescu, folders, work, len(files)) / len(files))
    shutil.rmtree(work, ignore_errors=True)
    walk, claim = statistics.median(walks), statistics.median(claims)
    print(f"dataset {len(dataset) / 1e6:.2f} MB in {FRAGMENT // 1024} KiB fragments; medians of {args.runs} runs")
    print(f"completeness walk      {walk * 1e6:8.0f} us per instance")
    print(f"index claim + commit   {claim * 1e6:8.0f} us per instance")
    if serves:
        serve = statistics.median(serves)
        print(f"serve, 1 storescu      {serve * 1e6:8.0f} us per instance ({len(files)} instances)")
        print(f"check + index share    {100 * (walk + claim) / serve:8.1f} % of serve's time per instance")
    else:
        print("DCMTK's storescu not found: serve's time per instance not measured")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark ``sortscp serve`` against DCMTK's ``storescp``, both fed by DCMTK's ``storescu``.

The same ~500 CT-sized instances (512x512, 16-bit, ~0.5 MB each) are sent
with 1 sender and with 4 concurrent senders (the files split into 4 folders,
4 ``storescu`` processes at once; ``storescp --fork`` for the concurrent
case). Each run gets a fresh server and an empty output folder; after each
run every instance must be there (counted), so a broken run is never
reported as a fast one. Medians of N runs, after one untimed warm-up run.

sortscp files every instance into the layout and, with ``--fsync always``
(the default), flushes it to disk before answering; ``sortscp-never`` is the
same server with ``--fsync never``. storescp writes a flat folder without
flushing.

Run from the repository root (needs DCMTK: ``apt-get install dcmtk``)::

    python benchmarks/bench_serve.py [--runs 5] [--cache /tmp/sortscp-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _trees import CT, DEFAULT_CACHE, build_tree, cli_env, count_files, instance_files, sortscp_cmd  # noqa: E402
from localnet import DCMTK_ENV, dcmtk, free_port, wait_for_port  # noqa: E402

HOST = "127.0.0.1"
AET = "BENCHSCP"
SENDERS = (1, 4)
#: storescp, then sortscp with ``--fsync always`` (the default) and ``--fsync never``
KINDS = ("storescp", "sortscp", "sortscp-never")
START_TIMEOUT = 30.0
RUN_TIMEOUT = 300.0


def split_folders(files: list[Path], work: Path, parts: int) -> list[Path]:
    """`parts` folders of hard links to `files`, dealt round-robin."""
    folders = [work / f"send-{parts}-{i}" for i in range(parts)]
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for i, f in enumerate(files):
        os.link(f, folders[i % parts] / f"IM{i:05d}")
    return folders


class Server:
    """One receiver process on a free port, writing into `out`."""

    def __init__(self, kind: str, out: Path, concurrent: bool, log: Path) -> None:
        self.kind, self.out = kind, out
        self.port = free_port()
        out.mkdir(parents=True)
        if kind == "storescp":
            cmd = [dcmtk("storescp"), "-aet", AET, "-od", str(out)]
            cmd += ["--fork"] if concurrent else []
            cmd += [str(self.port)]
            env = DCMTK_ENV
        else:
            # The senders have all finished when the server is stopped; a short
            # drain bounds the stop all the same.
            fsync = "never" if kind == "sortscp-never" else "always"
            cmd = sortscp_cmd("serve", "--out", str(out), "--host", HOST, "--port", str(self.port),
                              "--aet", AET, "--log-level", "WARNING", "--drain-timeout", "1",
                              "--fsync", fsync)
            env = cli_env()
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_port(self.port, HOST, START_TIMEOUT, proc=self.proc)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()


def send(storescu: str, port: int, folders: list[Path]) -> float:
    """Run one storescu per folder, all at once; return the wall time."""
    env = DCMTK_ENV
    start = time.perf_counter()
    procs = [
        subprocess.Popen([storescu, "-aec", AET, "+sd", "+r", HOST, str(port), str(folder)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for folder in folders
    ]
    outputs = [p.communicate(timeout=RUN_TIMEOUT)[0] for p in procs]
    elapsed = time.perf_counter() - start
    for p, out in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"storescu exited {p.returncode}:\n{out.decode(errors='replace')}")
    return elapsed


def one_run(kind: str, storescu: str, folders: list[Path], work: Path, expected: int) -> float:
    out = work / f"out-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    server = Server(kind, out, concurrent=len(folders) > 1, log=work / f"{kind}.log")
    try:
        elapsed = send(storescu, server.port, folders)
    finally:
        server.stop()
    found = count_files(out)
    if found != expected:
        raise RuntimeError(f"{kind}: {found} instances arrived, expected {expected}; see {work}")
    shutil.rmtree(out)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the tree is built")
    parser.add_argument("--senders", type=int, nargs="+", default=list(SENDERS),
                        help="concurrent senders per case (default: 1 4)")
    args = parser.parse_args(argv)
    storescu = dcmtk("storescu")
    if storescu is None or dcmtk("storescp") is None:
        print("DCMTK's storescu/storescp not found (apt-get install dcmtk)", file=sys.stderr)
        return 2
    files = instance_files(build_tree(CT, args.cache))
    nbytes = sum(f.stat().st_size for f in files)
    work = args.cache / "work-serve"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict[tuple[str, int], list[float]] = {}
    for senders in args.senders:
        folders = split_folders(files, work, senders)
        cases = [(kind, senders) for kind in KINDS]
        for kind, _ in cases:  # warm-up, untimed
            one_run(kind, storescu, folders, work, len(files))
        for _ in range(args.runs):  # interleaved
            for kind, _ in cases:
                results.setdefault((kind, senders), []).append(
                    one_run(kind, storescu, folders, work, len(files)))
    shutil.rmtree(work, ignore_errors=True)

    print(f"\n{len(files)} instances, {nbytes / 1e6:.0f} MB; median of {args.runs} runs "
          "(after one warm-up run each)")
    print(f"{'senders':>7} {'receiver':<13} {'median s':>9} {'inst/s':>8} {'MB/s':>7} {'x storescp':>10}")
    for senders in args.senders:
        base = statistics.median(results[("storescp", senders)])
        for kind in KINDS:
            med = statistics.median(results[(kind, senders)])
            print(f"{senders:>7} {kind:<13} {med:9.3f} {len(files) / med:8.0f} "
                  f"{nbytes / 1e6 / med:7.0f} {med / base:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

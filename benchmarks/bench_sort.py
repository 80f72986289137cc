"""Benchmark ``sortscp sort`` (copy, hardlink, move) against ``cp -r``.

Builds (once, cached) a tree of ~5000 small instances (128x128, 16-bit) and
one of ~500 CT-sized instances (512x512, 16-bit), then for each tree times
N runs of each command and prints the medians, files/s and the ratio to
``cp -r``. The page cache cannot be dropped, so every command gets one untimed
warm-up run first and all of them read from a warm cache; dirty pages are
written back (``sync``, untimed) before each run, so that no run pays for the
write-back of the one before it. Runs of the commands are interleaved.

Run from the repository root::

    python benchmarks/bench_sort.py [--runs 5] [--cache /tmp/sortscp-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _trees import (  # noqa: E402
    CT,
    DEFAULT_CACHE,
    SMALL,
    TreeSpec,
    build_tree,
    cli_env,
    count_files,
    run_checked,
    sortscp_cmd,
)

MODES = ("copy", "hardlink", "move")


def _timed(setup: Callable[[], None], run: Callable[[], None], check: Callable[[], None]) -> float:
    setup()
    os.sync()  # no run pays for the write-back of the one before it
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    check()
    return elapsed


def startup_seconds(cache: Path, runs: int, workers: int | None) -> float:
    """Median time of ``sortscp sort`` on a one-file tree: interpreter, imports
    and worker pool, the fixed cost of every run."""
    work = cache / "work-startup"
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    shutil.copy2(next(p for p in sorted((build_tree(SMALL, cache)).rglob("*")) if p.is_file()),
                 work / "src" / "IM0001")
    extra = ["--workers", str(workers)] if workers else []
    times = []
    for i in range(runs + 1):
        dst = work / f"dst{i}"
        start = time.perf_counter()
        run_checked(sortscp_cmd("sort", str(work / "src"), str(dst), "--mode", "hardlink", *extra),
                    env=cli_env())
        times.append(time.perf_counter() - start)
    shutil.rmtree(work, ignore_errors=True)
    return statistics.median(times[1:])


def bench_tree(spec: TreeSpec, cache: Path, runs: int, workers: int | None) -> list[tuple]:
    src = build_tree(spec, cache)
    expected = count_files(src)
    work = cache / f"work-{spec.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    dst = work / "dst"
    moved_src = work / "src-copy"
    env = cli_env()
    extra = ["--workers", str(workers)] if workers else []

    def clear() -> None:
        shutil.rmtree(dst, ignore_errors=True)

    def expect(folder: Path) -> Callable[[], None]:
        def check() -> None:
            found = count_files(folder)
            if found != expected:
                raise RuntimeError(f"{folder}: {found} files, expected {expected}")
        return check

    def cp() -> None:
        run_checked(["cp", "-r", str(src), str(dst)])

    def sort(mode: str, source: Path) -> Callable[[], None]:
        def run() -> None:
            run_checked(sortscp_cmd("sort", str(source), str(dst), "--mode", mode, *extra), env=env)
        return run

    def fresh_copy() -> None:
        clear()
        shutil.rmtree(moved_src, ignore_errors=True)
        subprocess.run(["cp", "-r", str(src), str(moved_src)], check=True)

    cases = [("cp -r", clear, cp)]
    for mode in MODES:
        if mode == "move":
            cases.append((f"sortscp {mode}", fresh_copy, sort(mode, moved_src)))
        else:
            cases.append((f"sortscp {mode}", clear, sort(mode, src)))

    # One untimed run of each first, so every command starts from the same warm cache.
    for _, setup, run in cases:
        _timed(setup, run, expect(dst))
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(runs):  # interleaved, so a slow moment of the machine hits all alike
        for name, setup, run in cases:
            times[name].append(_timed(setup, run, expect(dst)))
    shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(times["cp -r"])
    rows = []
    for name, _, _ in cases:
        med = statistics.median(times[name])
        rows.append((spec.name, name, med, expected / med, med / base))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (median)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the trees are built")
    parser.add_argument("--workers", type=int, default=None, help="sortscp --workers")
    parser.add_argument("--only", choices=("small", "ct"), default=None, help="one tree only")
    args = parser.parse_args(argv)
    specs = {"small": [SMALL], "ct": [CT], None: [SMALL, CT]}[args.only]
    rows = []
    for spec in specs:
        rows += bench_tree(spec, args.cache, args.runs, args.workers)
    startup = startup_seconds(args.cache, args.runs, args.workers)
    print(f"\nmedian of {args.runs} runs (after one warm-up run each); "
          f"sortscp start-up (a one-file tree): {startup:.3f} s")
    print(f"{'tree':<16} {'command':<18} {'median s':>9} {'files/s':>9} {'x cp -r':>8} "
          f"{'files/s after start-up':>23}")
    for tree, name, med, rate, ratio in rows:
        n = rate * med
        shown = name.startswith("sortscp") and med > 2 * startup  # else too noisy to mean much
        net = f"{n / (med - startup):23.0f}" if shown else ""
        print(f"{tree:<16} {name:<18} {med:9.3f} {rate:9.0f} {ratio:8.2f} {net}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

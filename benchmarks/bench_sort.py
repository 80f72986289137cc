"""Benchmark ``sortscp sort`` in every mode against ``cp -r`` and ``cp -al``.

Trees (built once, cached): 5,000 and 50,000 instances of ~37 KB (128x128,
16-bit). For each tree, every command runs once untimed, then ``--runs`` timed
runs (``--runs-large`` for the 50,000-file tree), interleaved, so a busy moment
of the machine hits all alike. Medians, files/s, ratios, the start-up of
``sortscp sort`` (a one-file tree) and the files/s after it, and the peak RSS
of the sortscp process and of its largest worker.

Honest on this file system (see the notes on ext4 without a journal): every
run writes to a fresh destination and nothing is deleted while a tree is timed
(creating files soon after deleting many is slow); every timed run, the
references included, ends with ``sync`` inside the timing, so the write-back of
copies is paid by whoever made them. The outputs are removed after the tree,
then the benchmark waits ``--settle`` seconds before the next tree.

``move`` moves a fresh tree of hard links to the cached files (``cp -al``,
untimed): the same ``link`` + ``unlink`` per file as a tree of real files, and
the cached tree stays whole.

Run from the repository root::

    python benchmarks/bench_sort.py [--runs 5] [--runs-large 3] [--only small|large]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _trees import (  # noqa: E402
    DEFAULT_CACHE,
    LARGE,
    SMALL,
    TreeSpec,
    build_tree,
    cli_env,
    count_files,
    run_checked,
    sortscp_cmd,
)

#: (label, mode, extra sortscp options); compared with cp -r, links also with cp -al.
SORT_CASES = (
    ("copy", "copy", ()),
    ("copy --fsync never", "copy", ("--fsync", "never")),
    ("hardlink", "hardlink", ()),
    ("move", "move", ()),
    ("symlink", "symlink", ()),
)


@dataclass
class Case:
    name: str
    run: Callable[[Path], list[str]]  # destination -> command
    source: Callable[[int], Path] | None = None  # fresh source per run (move)
    times: list[float] = field(default_factory=list)
    rss: list[tuple[int, int]] = field(default_factory=list)  # (parent, largest worker) KiB
    cpu: list[float] = field(default_factory=list)  # user + system seconds of the whole tree
    env: dict[str, str] | None = None  # another checkout's (--compare)


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                found += kids
                todo += kids
        except OSError:
            continue
    return found


def _hwm_kib(pid: int) -> int:
    """Peak resident set of `pid` (VmHWM), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _is_forkserver(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"forkserver" in f.read()
    except OSError:
        return False


def run_measured(cmd: list[str], env: dict[str, str] | None,
                 cwd: Path | None = None) -> tuple[float, int, int, float]:
    """Run `cmd`, then ``sync``; return seconds (sync included), the peak RSS
    (KiB) of the process and of its largest worker, sampled from /proc, and the
    CPU seconds (user + system) of the process and every process it waited for
    (its workers): on a shared machine the CPU a run costs moves less than its
    wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    peaks: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            for pid in [proc.pid, *_descendants(proc.pid)]:
                if pid == proc.pid or not _is_forkserver(pid):
                    peaks[pid] = max(peaks.get(pid, 0), _hwm_kib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err.decode()}")
    os.sync()
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    parent = peaks.pop(proc.pid, 0)
    return elapsed, parent, max(peaks.values(), default=0), cpu


def startup_seconds(cache: Path, runs: int, env: dict[str, str] | None = None) -> float:
    """Median time of ``sortscp sort`` (hardlink) of a one-file tree: interpreter,
    imports, worker pool, the fixed cost of every run."""
    work = cache / "work-startup"
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    first = next(p for p in sorted(build_tree(SMALL, cache).rglob("*")) if p.is_file())
    shutil.copy2(first, work / "src" / "IM0001")
    times = []
    for i in range(runs + 1):
        cmd = sortscp_cmd("sort", str(work / "src"), str(work / f"dst{i}"), "--mode", "hardlink")
        start = time.perf_counter()
        run_checked(cmd, env=env or cli_env(), cwd=cache)  # not the checkout: see bench_tree
        times.append(time.perf_counter() - start)
    shutil.rmtree(work, ignore_errors=True)
    return statistics.median(times[1:])


def bench_tree(spec: TreeSpec, cache: Path, runs: int, workers: int | None,
               compare: Path | None = None) -> list[Case]:
    src = build_tree(spec, cache)
    expected = count_files(src)
    work = cache / f"work-{spec.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    env = cli_env()
    extra = ["--workers", str(workers)] if workers else []

    def fresh_links(i: int) -> Path:
        path = work / f"move-src-{i}"
        subprocess.run(["cp", "-al", str(src), str(path)], check=True)
        return path

    cases = [
        Case("cp -r", lambda dst: ["cp", "-r", str(src), str(dst)]),
        Case("cp -al", lambda dst: ["cp", "-al", str(src), str(dst)]),
    ]
    for label, mode, options in SORT_CASES:
        def command(dst: Path, mode: str = mode, options: tuple = options,
                    source: Path = src) -> list[str]:
            return sortscp_cmd("sort", str(source), str(dst), "--mode", mode, *options, *extra)
        cases.append(Case(f"sortscp {label}", command, fresh_links if mode == "move" else None))
    if compare is not None:
        other = dict(env, PYTHONPATH=str(compare.resolve()))
        for mode in ("copy", "hardlink", "move"):
            def command(dst: Path, mode: str = mode) -> list[str]:
                return sortscp_cmd("sort", str(src), str(dst), "--mode", mode, *extra)
            cases.append(Case(f"sortscp {mode} ({compare.name})", command,
                              fresh_links if mode == "move" else None, env=other))

    n = 0
    for round_ in range(runs + 1):  # round 0: untimed warm-up
        for case in cases:
            n += 1
            dst = work / f"dst-{n}"
            cmd = case.run(dst)
            if case.source is not None:
                source = case.source(n)
                cmd = [source.as_posix() if a == src.as_posix() else a for a in cmd]
                os.sync()
            # `python -m scp` puts its working folder first on sys.path: run it
            # from the cache, so that PYTHONPATH picks the checkout (--compare)
            seconds, parent, worker, cpu = run_measured(cmd, case.env or env, cwd=cache)
            found = count_files(dst)  # links to files count as files
            if found != expected:
                raise RuntimeError(f"{case.name}: {found} entries in {dst}, expected {expected}")
            if round_:
                case.times.append(seconds)
                case.cpu.append(cpu)
                if case.name.startswith("sortscp"):
                    case.rss.append((parent, worker))
            print(f"  {spec.name} round {round_} {case.name}: {seconds:.3f} s", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    os.sync()
    return cases


def _versions() -> str:
    import pydicom
    import pynetdicom

    kernel = platform.release()
    return (f"Python {platform.python_version()}, pydicom {pydicom.__version__}, "
            f"pynetdicom {pynetdicom.__version__}, Linux {kernel}, {os.cpu_count()} CPUs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command, 5,000 files")
    parser.add_argument("--runs-large", type=int, default=3,
                        help="timed runs per command, 50,000 files")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where trees are built")
    parser.add_argument("--workers", type=int, default=None, help="sortscp --workers")
    parser.add_argument("--only", choices=("small", "large"), default=None, help="one tree only")
    parser.add_argument("--settle", type=float, default=65.0,
                        help="seconds to wait after removing a tree's outputs")
    parser.add_argument("--compare", type=Path, default=None, metavar="CHECKOUT",
                        help="also run copy, hardlink and move of another checkout (e.g. main), "
                        "on its defaults, side by side")
    args = parser.parse_args(argv)
    args.cache = args.cache.resolve()
    specs = {"small": [(SMALL, args.runs)], "large": [(LARGE, args.runs_large)],
             None: [(SMALL, args.runs), (LARGE, args.runs_large)]}[args.only]
    startup = startup_seconds(args.cache, 5)
    other_startup = None
    if args.compare is not None:
        other_startup = startup_seconds(
            args.cache, 5, dict(cli_env(), PYTHONPATH=str(args.compare.resolve())))
    results = []
    for i, (spec, runs) in enumerate(specs):
        if i:
            time.sleep(args.settle)
        results.append((spec, runs, bench_tree(spec, args.cache, runs, args.workers,
                                               args.compare)))

    print(f"\n{time.strftime('%Y-%m-%d')}; {_versions()}")
    other = "" if other_startup is None else f" ({args.compare.name}: {other_startup:.3f} s)"
    print(f"sortscp sort start-up (a one-file tree, median of 5): {startup:.3f} s{other}; "
          "every run ends with `sync`, inside its time\n")
    print("| files | command | runs | median s | files/s | x `cp -r` | x `cp -al` "
          "| files/s after start-up | CPU s (all processes) | peak RSS parent / worker MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec, runs, cases in results:
        base = statistics.median(next(c for c in cases if c.name == "cp -r").times)
        links = statistics.median(next(c for c in cases if c.name == "cp -al").times)
        for case in cases:
            med = statistics.median(case.times)
            vs_links = f"{med / links:.2f}" if case.name != "cp -r" and (
                "copy" not in case.name) else ""
            after = rss = ""
            if case.name.startswith("sortscp"):
                own = startup if "(" not in case.name else other_startup  # each checkout's
                if own is not None and med > own:
                    after = f"{spec.count / (med - own):,.0f}"
                parent = max(p for p, _ in case.rss) / 1024
                worker = max(w for _, w in case.rss) / 1024
                rss = f"{parent:.0f} / {worker:.0f}"
            cpu = f"{statistics.median(case.cpu):.2f}"
            print(f"| {spec.count:,} | `{case.name}` | {runs} | {med:.3f} | "
                  f"{spec.count / med:,.0f} | {med / base:.2f} | {vs_links} | {after} | {cpu} "
                  f"| {rss} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

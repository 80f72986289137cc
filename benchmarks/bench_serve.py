"""Benchmark ``sortscp serve`` against DCMTK's ``storescp``, both fed by DCMTK's ``storescu``.

The same ~500 CT-sized instances (512x512, 16-bit, ~0.5 MB each; with
``--instances small``, 2,000 of ~37 KB: 128x128, 16-bit) are sent
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

``--events`` adds a third receiver, ``sortscp+events``: the same server with a
per-instance hook (``--on-stored true``), the metrics endpoint
(``--metrics-port 0``) and the JSON-lines event file on, to measure their
overhead (the "x sortscp" column, the median of the ratios of runs made back to back;
the target is below 1.05)::

    python benchmarks/bench_serve.py --events --senders 1 --runs 5

``--variant NAME`` (repeatable) adds any receiver of :data:`VARIANTS`: the
parts of ``sortscp+events`` alone (``sortscp+metrics``, ``sortscp+hook``),
and what must never slow receiving: a hook that hangs until its timeout
(``sortscp+hung-hook``), one that fails (``sortscp+failing-hook``), a webhook
whose port refuses connections (``sortscp+dead-webhook``)::

    python benchmarks/bench_serve.py --senders 1 --variant sortscp+hung-hook --variant sortscp+dead-webhook

``--compare CHECKOUT`` also runs another checkout's ``sortscp`` and
``sortscp-never`` (named ``sortscp@NAME``), side by side in the same rounds::

    python benchmarks/bench_serve.py --compare ../main

``--variant sortscp-split`` (and ``sortscp-never-split``) measures what a
receiver process per core could give at most: two independent ``sortscp
serve`` processes (``--workers 1`` each, each with its own output folder and
index, so nothing is shared), half of the senders sending to each; run only
with 2 senders or more::

    python benchmarks/bench_serve.py --senders 4 --variant sortscp-split --variant sortscp-never-split
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _trees import CT, DEFAULT_CACHE, SERVE_SMALL, build_tree, cli_env, count_files, instance_files, sortscp_cmd  # noqa: E402
from localnet import DCMTK_ENV, dcmtk, free_port, wait_for_port  # noqa: E402

HOST = "127.0.0.1"
AET = "BENCHSCP"
SENDERS = (1, 4)
#: storescp, then sortscp with ``--fsync always`` (the default) and ``--fsync never`` (the variants add more)
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


#: What ``sortscp+events`` adds to the serve command line (README "Events, hooks and metrics").
EVENTS_ARGS = ("--on-stored", "true", "--metrics-port", "0", "--metrics-host", HOST)
#: A port nothing listens on (``sortscp+dead-webhook``): connections are refused.
DEAD_PORT = 9


def variant_args(kind: str, log: Path) -> list[str]:
    """What receiver `kind` (a key of :data:`VARIANTS`) adds to ``sortscp serve``."""
    events = ["--events", str(log.with_suffix(".events.jsonl"))]
    metrics = ["--metrics-port", "0", "--metrics-host", HOST]
    return {
        "sortscp": [],
        "sortscp-never": ["--fsync", "never"],
        "sortscp+events": [*EVENTS_ARGS, *events],
        "sortscp+metrics": [*metrics, *events],
        "sortscp+hook": ["--on-stored", "true"],
        "sortscp+hung-hook": ["--on-stored", "sleep 1000", "--hook-timeout", "1"],
        "sortscp+failing-hook": ["--on-stored", "sh -c 'echo no luck >&2; exit 3'"],
        "sortscp+dead-webhook": ["--webhook", f"http://{HOST}:{DEAD_PORT}/"],
        "sortscp-split": ["--workers", "1"],
        "sortscp-never-split": ["--fsync", "never", "--workers", "1"],
    }[kind]


VARIANTS = ("sortscp+events", "sortscp+metrics", "sortscp+hook", "sortscp+hung-hook", "sortscp+failing-hook",
            "sortscp+dead-webhook", "sortscp-split", "sortscp-never-split")
#: Variants that run two receiver processes, the senders dealt between them.
SPLIT = ("sortscp-split", "sortscp-never-split")


#: Orthanc's server, if installed (``apt-get install orthanc``): run with ``--orthanc``.
ORTHANC = shutil.which("Orthanc")


def orthanc_config(out: Path, port: int, path: Path) -> Path:
    """An Orthanc configuration that stores into `out` (its index in a dot folder,
    which the file count skips) and flushes each instance before answering
    (``SyncStorageArea``, as ``sortscp --fsync always``); no HTTP server, no plugins."""
    path.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(out), "IndexDirectory": str(out / ".index"),
        "DicomAet": AET, "DicomPort": port, "DicomCheckCalledAet": False,
        "HttpServerEnabled": False, "HttpPort": free_port(), "RemoteAccessAllowed": False,
        "SyncStorageArea": True, "StorageCompression": False, "Plugins": [],
        "SaveJobs": False, "LogExportedResources": False,
    }))
    return path


class Server:
    """One receiver process on a free port, writing into `out`."""

    def __init__(self, kind: str, out: Path, concurrent: bool, log: Path,
                 checkout: Path | None = None) -> None:
        self.kind, self.out = kind, out
        self.port = free_port()
        out.mkdir(parents=True)
        if kind == "storescp":
            cmd = [dcmtk("storescp"), "-aet", AET, "-od", str(out)]
            cmd += ["--fork"] if concurrent else []
            cmd += [str(self.port)]
            env = DCMTK_ENV
        elif kind == "orthanc":
            cmd = [ORTHANC or "Orthanc", str(orthanc_config(out, self.port, log.with_suffix(".json")))]
            env = dict(os.environ)
        else:
            # The senders have all finished when the server is stopped; a short
            # drain bounds the stop all the same.
            cmd = sortscp_cmd("serve", "--out", str(out), "--host", HOST, "--port", str(self.port),
                              "--aet", AET, "--log-level", "WARNING", "--drain-timeout", "1")
            cmd += variant_args(kind.partition("@")[0], log)
            env = cli_env() if checkout is None else dict(cli_env(), PYTHONPATH=str(checkout.resolve()))
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_port(self.port, HOST, START_TIMEOUT, proc=self.proc)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the receiver; `cpu` is then the CPU seconds of its main process and
        of the children it reaped (hooks; not the pool's workers, reaped by the forkserver)."""
        self.cpu = float("nan")
        self.hook_cpu = hook_helper_cpu(self.proc.pid) if self.kind != "storescp" else float("nan")
        if self.proc.poll() is None:
            self.proc.terminate()
            deadline = time.monotonic() + 60
            while True:
                pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
                if pid:
                    self.proc.returncode = os.waitstatus_to_exitcode(status)
                    self.cpu = usage.ru_utime + usage.ru_stime
                    break
                if time.monotonic() > deadline:
                    self.proc.kill()
                    self.proc.wait(30)
                    break
                time.sleep(0.02)
        self._log.close()


def hook_helper_cpu(pid: int) -> float:
    """CPU seconds of the hook helper process of server `pid` so far (its own and
    its reaped children's: the hooks); 0.0 without a helper, NaN where /proc cannot say."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            if b"hook_process_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
                return sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
    except OSError:
        return float("nan")
    return 0.0


def send(storescu: str, ports: list[int], folders: list[Path]) -> float:
    """Run one storescu per folder, all at once, the folders dealt between
    `ports`; return the wall time."""
    env = DCMTK_ENV
    start = time.perf_counter()
    procs = [
        subprocess.Popen([storescu, "-aec", AET, "+sd", "+r", HOST, str(ports[i % len(ports)]), str(folder)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for i, folder in enumerate(folders)
    ]
    outputs = [p.communicate(timeout=RUN_TIMEOUT)[0] for p in procs]
    elapsed = time.perf_counter() - start
    for p, out in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"storescu exited {p.returncode}:\n{out.decode(errors='replace')}")
    return elapsed


#: CPU seconds of each run's receiver (see Server.stop), by (kind, senders).
CPU: dict[tuple[str, int], list[float]] = {}
#: Of which the hook helper and the hooks it ran.
HOOK_CPU: dict[tuple[str, int], list[float]] = {}


#: Other checkouts to run beside this one (--compare), by name.
CHECKOUTS: dict[str, Path] = {}


def one_run(kind: str, storescu: str, folders: list[Path], work: Path, expected: int) -> float:
    name = kind.replace('+', '-').replace('@', '-')
    outs = [work / f"out-{name}-{i}" for i in range(2 if kind in SPLIT else 1)]
    servers: list[Server] = []
    try:
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
            servers.append(Server(kind, out, concurrent=len(folders) > 1, log=work / f"{kind}.log",
                                  checkout=CHECKOUTS.get(kind.partition("@")[2])))
        elapsed = send(storescu, [server.port for server in servers], folders)
    finally:
        for server in servers:
            server.stop()
    CPU.setdefault((kind, len(folders)), []).append(sum(getattr(s, "cpu", float("nan")) for s in servers))
    HOOK_CPU.setdefault((kind, len(folders)), []).append(
        sum(getattr(s, "hook_cpu", float("nan")) for s in servers))
    found = sum(count_files(out) for out in outs)
    if found != expected:
        raise RuntimeError(f"{kind}: {found} instances arrived, expected {expected}; see {work}")
    for out in outs:
        shutil.rmtree(out)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the tree is built")
    parser.add_argument("--instances", choices=("ct", "small"), default="ct",
                        help="ct: 500 x ~0.5 MB (512x512); small: 2,000 x ~37 KB (128x128)")
    parser.add_argument("--events", action="store_true",
                        help="also run sortscp with a hook, metrics and the event file on (sortscp+events)")
    parser.add_argument("--senders", type=int, nargs="+", default=list(SENDERS), help="sender counts to run")
    parser.add_argument("--variant", action="append", choices=VARIANTS, default=[],
                        help="also run this sortscp variant (repeatable)")
    parser.add_argument("--orthanc", action="store_true",
                        help="also run Orthanc (SyncStorageArea on), if installed")
    parser.add_argument("--compare", type=Path, default=None, metavar="CHECKOUT",
                        help="also run this checkout's sortscp and sortscp-never, side by side")
    args = parser.parse_args(argv)
    storescu = dcmtk("storescu")
    if storescu is None or dcmtk("storescp") is None:
        print("DCMTK's storescu/storescp not found (apt-get install dcmtk)", file=sys.stderr)
        return 2
    files = instance_files(build_tree(CT if args.instances == "ct" else SERVE_SMALL, args.cache))
    nbytes = sum(f.stat().st_size for f in files)
    work = args.cache / "work-serve"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict[tuple[str, int], list[float]] = {}
    extra = (["sortscp+events"] if args.events else []) + args.variant
    kinds = list(KINDS) + list(dict.fromkeys(extra))
    if args.orthanc:
        if ORTHANC is None:
            print("Orthanc not found (apt-get install orthanc); running without it", file=sys.stderr)
        else:
            kinds.insert(1, "orthanc")
    if args.compare is not None:
        CHECKOUTS[args.compare.resolve().name] = args.compare
        kinds += [f"{kind}@{args.compare.resolve().name}" for kind in ("sortscp", "sortscp-never")]
    for senders in args.senders:
        folders = split_folders(files, work, senders)
        cases = [(kind, senders) for kind in kinds if senders > 1 or kind not in SPLIT]
        for kind, _ in cases:  # warm-up, untimed
            one_run(kind, storescu, folders, work, len(files))
        for _ in range(args.runs):  # interleaved
            for kind, _ in cases:
                results.setdefault((kind, senders), []).append(
                    one_run(kind, storescu, folders, work, len(files)))
    shutil.rmtree(work, ignore_errors=True)

    print(f"\n{len(files)} instances, {nbytes / 1e6:.0f} MB; median of {args.runs} runs "
          "(after one warm-up run each)")
    print(f"{'senders':>7} {'receiver':<24} {'median s':>9} {'inst/s':>8} {'MB/s':>7} {'x storescp':>10}"
          f" {'x sortscp':>9} {'CPU s':>6} {'+CPU':>6} {'hooks':>6}  runs (s)")
    for senders in args.senders:
        for kind in kinds:
            if (kind, senders) not in results:
                continue  # a split variant with one sender
            med = statistics.median(results[(kind, senders)])
            # the median of per-round ratios: each round runs every receiver back to back, so a
            # busy moment of the machine weighs on both sides of a ratio alike
            rounds = [t / o for t, o in zip(results[(kind, senders)], results[("sortscp", senders)])]
            vs_dcmtk = statistics.median(
                t / o for t, o in zip(results[(kind, senders)], results[("storescp", senders)]))
            ours = kind.startswith("sortscp")
            vs_ours = f"{statistics.median(rounds):9.3f}" if ours and kind != "sortscp" else ""
            cpu = statistics.median(CPU[(kind, senders)][-args.runs:]) if ours else float("nan")
            hook_cpu = statistics.median(HOOK_CPU[(kind, senders)][-args.runs:]) if ours else float("nan")
            # CPU seconds more than plain sortscp, per round (median)
            extra_cpu = statistics.median(
                c - o for c, o in zip(CPU[(kind, senders)][-args.runs:], CPU[("sortscp", senders)][-args.runs:])
            ) if ours and kind != "sortscp" else float("nan")
            runs = " ".join(f"{t:.2f}" for t in results[(kind, senders)])
            print(f"{senders:>7} {kind:<24} {med:9.3f} {len(files) / med:8.0f} "
                  f"{nbytes / 1e6 / med:7.0f} {vs_dcmtk:10.2f} {vs_ours:>9} {cpu:6.2f} {extra_cpu:6.2f} "
                  f"{hook_cpu:6.2f}  {runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Receive-path benchmark: DCMTK ``storescp`` against a pynetdicom SCP that stores nothing.

Receivers (each fed by DCMTK ``storescu +sd +r``, TCP_NODELAY=1, 1 sender and
4 concurrent senders, ~500 instances of 512x512 16-bit CT, ~0.5 MB each):

* ``storescp-ignore``: ``storescp --ignore`` (receives, writes nothing);
* ``storescp``: ``storescp -od DIR`` (writes each instance, no fsync);
* ``pynd-stock``: pynetdicom 3.0 SCP, handler returns 0x0000 and stores nothing,
  ``_config.STORE_RECV_CHUNKED_DATASET = True`` (the dataset goes to a temp file
  that pynetdicom deletes after the handler);
* ``pynd-threads``: the same with sortscp's event-driven network threads
  (``scp.net._pynetdicom.install_network_threads()``) and the accepted sockets
  tuned as ``sortscp serve`` tunes them (TCP_NODELAY, a send timeout);
* ``pynd-fast``: that, with each dataset streamed to sortscp's incoming-file
  sink (``scp.net.sink.install``, the completeness walk included) in a
  temporary folder beside the others, as ``sortscp serve`` receives it: the
  C-STORE fast path (no pynetdicom primitives, no service class);
* ``pynd-sink``: the same with a no-op handler on ``EVT_DIMSE_RECV``, which
  keeps pynetdicom's primitives and ``StorageServiceClass`` on the path: the
  difference to ``pynd-fast`` is what the fast path saves.

Runs are interleaved (every receiver once per round, the order rotated each
round), one untimed warm-up round, medians of ``--runs`` rounds. Every run must
deliver every instance: storescp's output folder is counted, the pynetdicom SCP
reports how many C-STORE requests it answered. Each storescp run writes into a
fresh folder; the folders are deleted only at the end (see PERF-NOTES: deleting
between timed runs measures ext4's inode allocator).

Run from the repository root::

    python benchmarks/bench_null_scp.py [--runs 5] [--only pynd-threads,storescp] [--max-pdu N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

HOST = "127.0.0.1"
AET = "BENCHSCP"
KINDS = ("storescp-ignore", "storescp", "pynd-stock", "pynd-threads", "pynd-fast", "pynd-sink")


# --------------------------------------------------------------------------- the null SCP


def serve(mode: str, port: int, bufsize: int | None, max_pdu: int) -> None:
    """Run the null pynetdicom SCP until SIGTERM; print the number of C-STOREs answered."""
    from pynetdicom import AE, StoragePresentationContexts, _config, evt
    from pynetdicom.transport import ThreadedAssociationServer

    server_class = ThreadedAssociationServer
    if mode in ("threads", "fast", "sink"):
        from scp.net import _pynetdicom

        _pynetdicom.install_network_threads()

        class TunedServer(ThreadedAssociationServer):
            def get_request(self):
                client, address = super().get_request()
                _pynetdicom.tune_accepted_socket(client, 60.0, bufsize)
                return client, address

        server_class = TunedServer

    _config.STORE_RECV_CHUNKED_DATASET = True
    count = [0]

    def on_store(event):
        count[0] += 1
        return 0x0000

    handlers = [(evt.EVT_C_STORE, on_store)]
    if mode in ("fast", "sink"):
        import tempfile

        from scp.net import sink

        sink.install(Path(tempfile.mkdtemp(prefix="null-scp-", dir=os.environ.get("NULL_SCP_DIR"))))
        if mode == "sink":
            handlers.append((evt.EVT_DIMSE_RECV, lambda event: None))

    ae = AE(ae_title=AET)
    ae.supported_contexts = StoragePresentationContexts
    ae.maximum_associations = 16
    ae.maximum_pdu_size = max_pdu
    server = ae.make_server((HOST, port), evt_handlers=handlers, server_class=server_class)
    import threading

    from scp.net import _pynetdicom

    _pynetdicom.register_server(ae, server)  # what start_server() does
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.05)
    server.shutdown()
    print(f"STORED {count[0]}", flush=True)


# --------------------------------------------------------------------------- the driver


def split_folders(files: list[Path], work: Path, parts: int) -> list[Path]:
    folders = [work / f"send-{parts}-{i}" for i in range(parts)]
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for i, f in enumerate(files):
        os.link(f, folders[i % parts] / f"IM{i:05d}")
    return folders


class Receiver:
    def __init__(self, kind: str, work: Path, run_id: str, concurrent: bool,
                 bufsize: int | None, max_pdu: int) -> None:
        from localnet import DCMTK_ENV, dcmtk, free_port, wait_for_port

        self.kind = kind
        self.port = free_port()
        self.out: Path | None = None
        if kind.startswith("storescp"):
            cmd = [dcmtk("storescp"), "-aet", AET]
            if kind == "storescp-ignore":
                cmd.append("--ignore")
            else:
                self.out = work / "out" / run_id
                self.out.mkdir(parents=True)
                cmd += ["-od", str(self.out)]
            cmd += (["--fork"] if concurrent else []) + [str(self.port)]
            env = DCMTK_ENV
        else:
            mode = kind.removeprefix("pynd-")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", mode,
                   "--port", str(self.port), "--max-pdu", str(max_pdu)]
            if bufsize:
                cmd += ["--bufsize", str(bufsize)]
            env = {**os.environ, "NULL_SCP_DIR": str(work)}  # (pynd-fast/-sink's sink folder)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env)
        wait_for_port(self.port, HOST, 30, proc=self.proc)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out.decode(errors="replace")


def send(port: int, folders: list[Path]) -> float:
    from localnet import DCMTK_ENV, dcmtk

    storescu = dcmtk("storescu")
    start = time.perf_counter()
    procs = [subprocess.Popen([storescu, "+sd", "+r", "-aec", AET, HOST, str(port), str(f)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=DCMTK_ENV)
             for f in folders]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    elapsed = time.perf_counter() - start
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"storescu exited {p.returncode}: {out.decode(errors='replace')}")
    return elapsed


CPU: dict[tuple[str, int], list[float]] = {}


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU of process `pid` (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(kind: str, folders: list[Path], work: Path, run_id: str, expected: int,
            bufsize: int | None, max_pdu: int) -> float:
    from _trees import count_files

    rx = Receiver(kind, work, run_id, len(folders) > 1, bufsize, max_pdu)
    try:
        cpu0 = _cpu_seconds(rx.proc.pid)
        elapsed = send(rx.port, folders)
        if cpu0 is not None and not kind.startswith("storescp"):
            CPU.setdefault((kind, len(folders)), []).append(_cpu_seconds(rx.proc.pid) - cpu0)
    finally:
        out = rx.stop()
    if rx.out is not None:
        found = count_files(rx.out)
    elif kind.startswith("pynd"):
        lines = [ln for ln in out.splitlines() if ln.startswith("STORED ")]
        found = int(lines[-1].split()[1]) if lines else -1
    else:
        found = expected  # storescp --ignore: storescu's exit status is all we have
    if found != expected:
        raise RuntimeError(f"{kind}: {found} of {expected} instances; output:\n{out}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--bufsize", type=int, default=None,
                    help="SO_RCVBUF/SO_SNDBUF for pynd-threads' accepted sockets")
    ap.add_argument("--max-pdu", type=int, default=16382,
                    help="the pynetdicom SCPs' maximum PDU (pynetdicom's default 16382; "
                         "sortscp serve's is 1048576)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--senders", default="1,4")
    ap.add_argument("--only", default=",".join(KINDS))
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/net-bench"))
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.bufsize, args.max_pdu)
        return 0

    from _trees import CT, DEFAULT_CACHE, build_tree, instance_files

    kinds = [k for k in args.only.split(",") if k]
    root = build_tree(CT, args.cache or DEFAULT_CACHE)
    files = instance_files(root)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    results: dict[tuple[str, int], list[float]] = {}
    try:
        for senders in (int(s) for s in args.senders.split(",")):
            folders = split_folders(files, args.work, senders)
            for rnd in range(args.runs + 1):  # round 0: warm-up
                order = kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]
                for kind in order:
                    t = one_run(kind, folders, args.work, f"{senders}-{rnd}-{kind}",
                                len(files), args.bufsize, args.max_pdu)
                    if rnd:
                        results.setdefault((kind, senders), []).append(t)
                    print(f"  {senders} sender(s) round {rnd} {kind:18s} {t:6.2f} s",
                          file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)

    print(f"\n{len(files)} instances x {CT.instance_bytes / 1e6:.2f} MB, medians of {args.runs}")
    print(f"{'receiver':18s} " + " ".join(f"{s} snd: s   /storescp /ignore" for s in
                                          sorted({s for _, s in results})))
    for kind in kinds:
        cells = []
        for senders in sorted({s for _, s in results}):
            med = statistics.median(results[(kind, senders)])
            ref = results.get(("storescp", senders))
            ign = results.get(("storescp-ignore", senders))
            r1 = f"{med / statistics.median(ref):6.2f}x" if ref else "   -   "
            r2 = f"{med / statistics.median(ign):6.2f}x" if ign else "   -   "
            cells.append(f"{med:10.2f} {r1:>9s} {r2:>7s}")
        print(f"{kind:18s} " + " ".join(cells))
    if CPU:
        print("\nreceiver CPU seconds per run (user+system, all threads; medians):")
        for (kind, senders), values in sorted(CPU.items()):
            print(f"  {kind:18s} {senders} sender(s): {statistics.median(values):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

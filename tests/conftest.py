"""Shared fixtures: real DICOM files, DCMTK tools, a real server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from localnet import DCMTK_ENV, dcmtk, descendants, free_port, wait_for_port  # noqa: F401 (for the tests)

REPO = Path(__file__).resolve().parents[1]

# The tests start hundreds of Python processes (servers, sorts, their workers).
# Where the environment forbids bytecode files (PYTHONDONTWRITEBYTECODE), each
# of them compiled our modules again: about 0.3 s a process on a slow machine.
# Their bytecode goes to a cache of its own instead, outside the checkout (as
# an installed package has it; the benchmarks do the same).
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
    os.environ.setdefault("PYTHONPYCACHEPREFIX", os.path.join(tempfile.gettempdir(), "sortscp-test-pycache"))
PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
TEST_FILES = PYDICOM_DATA / "test_files"
CHARSET_FILES = PYDICOM_DATA / "charset_files"


def _data_store() -> Path | None:
    try:
        import data_store  # the pydicom-data package
    except ImportError:
        return None
    return Path(data_store.__file__).parent / "data"


DATA_STORE = _data_store()


def readable_dicom_files() -> list[Path]:
    """Every file of pydicom's test data and of pydicom-data that pydicom reads
    as a Part 10 file with a SOP Instance UID (the files a real sender could send)."""
    roots = [TEST_FILES, CHARSET_FILES] + ([DATA_STORE] if DATA_STORE else [])
    found = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            meta = getattr(ds, "file_meta", None)
            if meta is None or "TransferSyntaxUID" not in meta:
                continue
            if not (ds.get("SOPInstanceUID") and ds.get("SOPClassUID")):
                continue
            if ds.SOPClassUID == "1.2.840.10008.1.3.10":  # DICOMDIR
                continue
            found.append(path)
    return found


#: Test files whose dataset is cut short (pydicom reads them leniently).
CUT_SHORT = {"emri_small_jpeg_2k_lossless_too_short.dcm", "MR_truncated.dcm", "rtplan_truncated.dcm"}


def names_its_instance(path: Path) -> bool:
    """True if the file's File Meta names the instance its dataset holds (a few
    test files disagree: a sender that takes the command's UIDs from the File
    Meta then sends a dataset that is another instance than the command says)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (ds.file_meta.MediaStorageSOPInstanceUID, ds.file_meta.MediaStorageSOPClassUID) == (
        ds.SOPInstanceUID, ds.SOPClassUID)


def storable_dicom_files() -> list[Path]:
    """The readable files a receiver must store: complete, and naming their instance."""
    return [f for f in readable_dicom_files() if f.name not in CUT_SHORT and names_its_instance(f)]


def dcmtk_tool(tool: str) -> str:
    """Path of DCMTK's `tool`; skip the test, saying why, if it is not installed."""
    path = dcmtk(tool)
    if path is None:
        pytest.skip(f"DCMTK's {tool} is not installed (apt-get install dcmtk)")
    return path


@pytest.fixture(scope="session")
def storescu() -> str:
    return dcmtk_tool("storescu")


@pytest.fixture(scope="session")
def storescp() -> str:
    return dcmtk_tool("storescp")


def cli_env() -> dict[str, str]:
    """Environment for running this checkout's CLI as ``python -m scp``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # COLUMNS and LINES: the terminal pytest (or a pytest-xdist worker) runs in is not the CLI's
    for key in [k for k in env if k.startswith("SORTSCP_") or k in ("COLUMNS", "LINES")]:
        del env[key]
    return env


def unprivileged_prefix() -> list[str]:
    """A command prefix under which permissions apply (we may be root)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv is not installed: file modes cannot be tested")
    # root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH obeys the mode bits
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    probe = tempfile.mkdtemp()
    try:
        os.chmod(probe, 0)
        p = subprocess.run([*prefix, sys.executable, "-c", f"import os; os.listdir({probe!r})"],
                           check=False, capture_output=True)
        if p.returncode == 0:
            pytest.skip("cannot drop root's permission override here (setpriv had no effect)")
    finally:
        os.chmod(probe, 0o700)
        os.rmdir(probe)
    return prefix


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m scp ARGS`` of this checkout; capture its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "scp", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=kwargs.pop("env", cli_env()),
        **kwargs,
    )


class ServeProcess:
    """``sortscp serve`` in a child process on a free port of 127.0.0.1."""

    def __init__(self, out: Path, *args: str, env: dict[str, str] | None = None,
                 cwd: Path | None = None, new_session: bool = False) -> None:
        """`new_session`: its own process group, workers included, for a test
        that signals the whole group (as a terminal or systemd does)."""
        self.out = out
        self.new_session = new_session
        self.port = free_port()
        self.log_path = out.parent / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scp", "serve", "--out", str(out), "--host", "127.0.0.1",
             "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env or cli_env(), cwd=cwd,
            start_new_session=new_session,
        )
        try:
            wait_for_port(self.port, proc=self.proc)
        except Exception:
            self.kill()
            raise RuntimeError(f"server did not start:\n{self.log()}") from None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if self.new_session:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[callable]:
    """Factory: ``serve_process(*args)`` starts ``sortscp serve`` writing to
    ``tmp_path / "out"``; every server started is stopped after the test."""
    started: list[ServeProcess] = []

    def start(*args: str, out: Path | None = None, env: dict[str, str] | None = None,
              cwd: Path | None = None, new_session: bool = False) -> ServeProcess:
        server = ServeProcess(out or tmp_path / "out", *args, env=env, cwd=cwd, new_session=new_session)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def in_threads(work, n: int = 4, timeout: float = 60) -> list[BaseException]:
    """Run ``work(t)`` for t in range(n) in n threads at once; what they raised."""
    import threading

    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            work(t)
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


def copy_tree_of(files: list[Path], dst: Path) -> Path:
    """Copy `files` into a flat folder `dst` with unique names; return `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        shutil.copy2(f, dst / f"{i:04d}_{f.name}")
    return dst


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[callable]:
    """Factory: ``tmpfs(size)`` mounts a tmpfs of `size` at a new folder; unmounted after."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)

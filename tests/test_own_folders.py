"""sortscp's own folders in an output root (``.sortscp-tmp``, ``.sortscp``) are
never followed out of it.

Every command writes into them and cleans them: the start of ``serve`` removes
temporary files older than an hour, ``sort`` those of dead processes. If one of
those names is a symbolic link (made by a careless script, or by someone who can
write to OUT but not to the folder it points at), following it would remove
files outside OUT. Each command refuses such an OUT with one line, exit status
2 (``reindex``: 1), and touches nothing on the far side of the link.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from scp.store.tmp import STATE_DIRNAME, TMP_DIRNAME, remove_orphans

from conftest import run_cli
from localnet import free_port

CT = Path(get_testdata_file("CT_small.dcm"))
OLD = time.time() - 30 * 24 * 3600  # older than any staleness rule


def _victim(tmp_path: Path) -> dict[Path, bytes]:
    """A folder outside OUT whose files a cleaner would take for leftovers:
    one old, one named like the temporary file of a dead process."""
    victim = tmp_path / "victim"
    victim.mkdir()
    files = {victim / "notes.txt": b"precious\n", victim / "w-3999999-half.part": b"also mine\n"}
    for path, data in files.items():
        path.write_bytes(data)
        os.utime(path, (OLD, OLD))
    return files


def _assert_untouched(files: dict[Path, bytes]) -> None:
    folder = next(iter(files)).parent
    assert sorted(folder.iterdir()) == sorted(files), sorted(folder.iterdir())
    for path, data in files.items():
        assert path.read_bytes() == data


def _link(out: Path, name: str, target: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).symlink_to(os.path.relpath(target, out))


def _one_clear_line(output: str, out: Path, name: str) -> None:
    assert "Traceback" not in output, output
    assert f"{out / name} is a symbolic link" in output, output


@pytest.mark.parametrize("name", [TMP_DIRNAME, STATE_DIRNAME])
def test_serve_refuses_an_output_folder_whose_own_folder_is_a_link(tmp_path: Path, name: str) -> None:
    files = _victim(tmp_path)
    out = tmp_path / "out"
    _link(out, name, tmp_path / "victim")
    proc = run_cli("serve", "--out", out, "--host", "127.0.0.1", "--port", free_port(), timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    _one_clear_line(output, out, name)
    _assert_untouched(files)


@pytest.mark.parametrize("name", [TMP_DIRNAME, STATE_DIRNAME])
def test_sort_refuses_a_destination_whose_own_folder_is_a_link(tmp_path: Path, name: str) -> None:
    files = _victim(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(CT, src / "IM0001")
    dst = tmp_path / "dst"
    _link(dst, name, tmp_path / "victim")
    for mode in ("copy", "move"):
        proc = run_cli("sort", src, dst, "--mode", mode, timeout=120)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2, output
        _one_clear_line(output, dst, name)
        _assert_untouched(files)
        assert (src / "IM0001").read_bytes() == CT.read_bytes()  # the source stays
        assert sorted(p.name for p in dst.iterdir()) == sorted({name, STATE_DIRNAME}), sorted(dst.iterdir())


def test_reindex_refuses_a_state_folder_that_is_a_link(tmp_path: Path) -> None:
    files = _victim(tmp_path)
    out = tmp_path / "out"
    _link(out, STATE_DIRNAME, tmp_path / "victim")
    proc = run_cli("reindex", out, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    _one_clear_line(output, out, STATE_DIRNAME)
    _assert_untouched(files)


def test_the_sweep_does_not_follow_a_temporary_folder_replaced_by_a_link(tmp_path: Path) -> None:
    """The running server's sweeper, if the folder was swapped for a link after its start."""
    files = _victim(tmp_path)
    out = tmp_path / "out"
    _link(out, TMP_DIRNAME, tmp_path / "victim")
    assert remove_orphans(out / TMP_DIRNAME, older_than=60) == 0
    _assert_untouched(files)
    real = tmp_path / "real"
    real.mkdir()
    for path, data in files.items():  # the same files in a real folder are swept
        (real / path.name).write_bytes(data)
        os.utime(real / path.name, (OLD, OLD))
    assert remove_orphans(real, older_than=60) == 2
    assert list(real.iterdir()) == []

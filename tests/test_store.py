"""The store: temp file then no-clobber naming, duplicates, the four sort modes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

import pytest

from scp.enums import Duplicate, Mode, Placement
from scp.errors import OutsideRootError, StoreError
from scp.store.commit import commit_file, write_atomic
from scp.store.place import place
from scp.store.tmp import TMP_DIRNAME, fs_clock_ns, remove_orphans

from conftest import TEST_FILES

REL = PurePosixPath("P_1/S_1/1.2.3.dcm")
CT = TEST_FILES / "CT_small.dcm"
MR = TEST_FILES / "MR_small.dcm"


def files_under(root: Path) -> list[str]:
    """Final files under `root` (the temp folder excluded), relative, sorted."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*")
        if (p.is_file() or p.is_symlink()) and TMP_DIRNAME not in p.relative_to(root).parts
    )


def tmp_leftovers(root: Path) -> list[str]:
    tmp = root / TMP_DIRNAME
    return sorted(os.listdir(tmp)) if tmp.exists() else []


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    path = folder / "ct"
    shutil.copy2(CT, path)
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_100_000_000_123_456_789))
    return path


@pytest.mark.parametrize(
    "rel", ["../x.dcm", "/etc/x.dcm", "a/../../x.dcm", f"{TMP_DIRNAME}/x.dcm", "."]
)
def test_refuses_paths_outside_the_root(tmp_path: Path, src: Path, rel: str) -> None:
    with pytest.raises(OutsideRootError):
        place(src, tmp_path / "out", PurePosixPath(rel), Mode.COPY)
    assert not (tmp_path / "x.dcm").exists()


def test_copy_keeps_timestamps_and_bytes(tmp_path: Path, src: Path) -> None:
    out = tmp_path / "out"
    final, placement = place(src, out, REL, Mode.COPY)
    assert (final, placement) == (out / REL, Placement.STORED)
    assert final.read_bytes() == CT.read_bytes()
    assert final.stat().st_mtime_ns == src.stat().st_mtime_ns == 1_100_000_000_123_456_789
    assert not os.path.samefile(src, final)
    assert src.exists() and tmp_leftovers(out) == []


def test_copy_again_is_identical_and_writes_nothing(tmp_path: Path, src: Path) -> None:
    out = tmp_path / "out"
    final, _ = place(src, out, REL, Mode.COPY)
    inode, tmp_mtime = final.stat().st_ino, (out / TMP_DIRNAME).stat().st_mtime_ns
    os.utime(out / TMP_DIRNAME, ns=(0, 0))
    again, placement = place(src, out, REL, Mode.COPY)
    assert (again, placement) == (final, Placement.IDENTICAL)
    assert final.stat().st_ino == inode
    # no temporary file was even created (the temp folder did not change)
    assert (out / TMP_DIRNAME).stat().st_mtime_ns == 0, tmp_mtime
    assert files_under(out) == [str(REL)]


def test_other_bytes_under_a_taken_name_are_kept_beside(tmp_path: Path, src: Path) -> None:
    out = tmp_path / "out"
    other = tmp_path / "other"
    shutil.copy2(MR, other)
    place(src, out, REL, Mode.COPY)
    final, placement = place(other, out, REL, Mode.COPY)
    assert placement is Placement.STORED_AS_COPY
    assert final == out / "P_1/S_1/1.2.3~2.dcm"
    assert (out / REL).read_bytes() == CT.read_bytes()
    assert final.read_bytes() == MR.read_bytes()
    # and again: both are found in place, nothing new
    assert place(other, out, REL, Mode.COPY) == (final, Placement.IDENTICAL)
    assert place(src, out, REL, Mode.COPY) == (out / REL, Placement.IDENTICAL)
    third = tmp_path / "third"
    third.write_bytes(CT.read_bytes() + b"\0\0")
    assert place(third, out, REL, Mode.HARDLINK)[0].name == "1.2.3~3.dcm"
    assert len(files_under(out)) == 3


def test_hardlink_shares_the_inode(tmp_path: Path, src: Path) -> None:
    out = tmp_path / "out"
    final, placement = place(src, out, REL, Mode.HARDLINK)
    assert placement is Placement.STORED and os.path.samefile(src, final)
    assert place(src, out, REL, Mode.HARDLINK) == (final, Placement.IDENTICAL)


def test_symlink_points_to_the_source(tmp_path: Path, src: Path) -> None:
    out = tmp_path / "out"
    final, placement = place(src, out, REL, Mode.SYMLINK)
    assert placement is Placement.STORED and final.is_symlink()
    assert os.readlink(final) == str(src.resolve())
    assert final.read_bytes() == CT.read_bytes()
    assert place(src, out, REL, Mode.SYMLINK) == (final, Placement.IDENTICAL)


def test_move_removes_the_source_once_stored(tmp_path: Path, src: Path) -> None:
    out = tmp_path / "out"
    inode = src.stat().st_ino
    final, placement = place(src, out, REL, Mode.MOVE)
    assert placement is Placement.STORED
    assert not src.exists()
    assert final.stat().st_ino == inode and final.read_bytes() == CT.read_bytes()


def test_move_of_a_duplicate_removes_it_and_keeps_the_stored_file(tmp_path: Path, src: Path) -> None:
    out = tmp_path / "out"
    first, _ = place(src, out, REL, Mode.COPY)
    dup = tmp_path / "dup"
    shutil.copy(CT, dup)
    final, placement = place(dup, out, REL, Mode.MOVE)
    assert (final, placement) == (first, Placement.IDENTICAL)
    assert not dup.exists() and first.read_bytes() == CT.read_bytes()


def test_move_of_a_hard_link_of_the_stored_file_removes_the_source_name(
    tmp_path: Path, src: Path
) -> None:
    out = tmp_path / "out"
    final, _ = place(src, out, REL, Mode.HARDLINK)
    # the source's own inode is never "already in place" (issue #10): the move
    # leaves the destination as the file's only name and says so
    assert place(src, out, REL, Mode.MOVE) == (final, Placement.REPLACED)
    assert not src.exists() and final.read_bytes() == CT.read_bytes()


def test_move_in_place_keeps_a_kept_beside_copy(tmp_path: Path, src: Path) -> None:
    """``<uid>~2.dcm`` sorted again in place is its own destination: it stays."""
    out = tmp_path / "out"
    other = tmp_path / "other"
    shutil.copy2(MR, other)
    place(src, out, REL, Mode.MOVE)
    beside, placement = place(other, out, REL, Mode.MOVE)
    assert placement is Placement.STORED_AS_COPY and not other.exists()
    for path in (out / REL, beside):
        before = path.read_bytes()
        assert place(path, out, REL, Mode.MOVE)[1] is Placement.IDENTICAL
        assert path.read_bytes() == before
    assert files_under(out) == [str(REL), str(REL.with_name("1.2.3~2.dcm"))]


def test_move_never_removes_a_file_that_is_its_own_destination(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / REL).parent.mkdir(parents=True)
    shutil.copy(CT, out / REL)
    final, placement = place(out / REL, out, REL, Mode.MOVE)
    assert (final, placement) == (out / REL, Placement.IDENTICAL)
    assert (out / REL).read_bytes() == CT.read_bytes()
    # also when reached through another spelling of the same path
    place(out / "P_1" / ".." / "P_1" / "S_1" / "1.2.3.dcm", out, REL, Mode.MOVE)
    assert (out / REL).read_bytes() == CT.read_bytes()


def test_a_file_where_a_folder_is_needed_is_a_store_error(tmp_path: Path, src: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "P_1").write_text("in the way")
    for mode in Mode:
        with pytest.raises(StoreError, match="P_1"):
            place(src, out, REL, mode)
    assert src.read_bytes() == CT.read_bytes()  # move left the source alone
    assert (out / "P_1").read_text() == "in the way"
    assert tmp_leftovers(out) == []


@pytest.mark.parametrize("on_conflict", list(Duplicate))
def test_write_atomic_conflicts(tmp_path: Path, on_conflict: Duplicate) -> None:
    out = tmp_path / "out"
    write_atomic(out, REL, lambda f: f.write(b"first"))
    assert write_atomic(out, REL, lambda f: f.write(b"first"), on_conflict=on_conflict) == (
        out / REL, Placement.IDENTICAL)
    final, placement = write_atomic(out, REL, lambda f: f.write(b"second"), on_conflict=on_conflict)
    expected = {
        Duplicate.REPLACE: (out / REL, Placement.REPLACED, b"second"),
        Duplicate.KEEP: (out / REL, Placement.KEPT_EXISTING, b"first"),
        Duplicate.BOTH: (out / "P_1/S_1/1.2.3~2.dcm", Placement.STORED_AS_COPY, b"second"),
    }[on_conflict]
    assert (final, placement, final.read_bytes()) == expected
    assert tmp_leftovers(out) == []


def test_write_atomic_never_names_a_half_written_file(tmp_path: Path) -> None:
    out = tmp_path / "out"

    def fail_halfway(f) -> None:
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(out, REL, fail_halfway)
    assert files_under(out) == [] and tmp_leftovers(out) == []


def test_fs_clock_is_not_behind_files_created_after_it(tmp_path: Path) -> None:
    before = fs_clock_ns(tmp_path)
    final, _ = write_atomic(tmp_path, REL, lambda f: f.write(b"x"))
    assert final.stat().st_ctime_ns >= before
    assert tmp_leftovers(tmp_path) == []




def test_a_folder_pruned_while_a_file_is_named_into_it_is_made_again(tmp_path: Path) -> None:
    """A resend that moves an instance removes the folders it leaves empty. A
    store naming a file into one of them at that moment must make the folder
    again, not fail the instance (the sender would get a failure status for
    nothing). Here a thread removes the empty target folders as fast as it can
    while 300 files are committed into fresh folders."""
    import threading
    import time

    from scp.store._prune import prune_empty_dirs
    from scp.store.commit import commit_file
    from scp.store.tmp import tmp_dir

    root = tmp_path / "out"
    root.mkdir()
    n = 300
    stop = threading.Event()
    pruned = [0]
    round_ = [0]

    def pruner() -> None:
        while not stop.is_set():
            for i in range(n):
                pruned[0] += prune_empty_dirs(root, f"P{i % 7}/S{round_[0]}-{i}")

    failures: list[Exception] = []
    thread = threading.Thread(target=pruner)
    thread.start()
    try:
        # Rounds until the pruner did remove folders under the writer at least
        # once (on a loaded machine one round may never give it the chance).
        for round_[0] in range(20):
            for i in range(n):
                src = tmp_dir(root) / f"incoming-{round_[0]}-{i}.part"  # the commit links it
                src.write_bytes(f"instance {i}".encode())
                try:
                    commit_file(src, root, PurePosixPath(f"P{i % 7}/S{round_[0]}-{i}/1.{i}.dcm"),
                                durable=False)
                except StoreError as exc:
                    failures.append(exc)
                time.sleep(0)  # the GIL to the pruner: it must get to run between the commits
            if pruned[0]:
                break
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert pruned[0] > 0  # the pruner did remove folders under the writer
    for r in range(round_[0] + 1):
        for i in range(n):
            assert (root / f"P{i % 7}/S{r}-{i}/1.{i}.dcm").read_bytes() == f"instance {i}".encode()


def test_replacing_a_file_under_the_longest_name_works(tmp_path: Path) -> None:
    """The temporary link made beside a name to replace it atomically is cut
    to fit too: under a 255-byte name it was refused ("File name too long")."""
    out = tmp_path / "out"
    rel = PurePosixPath("p", "x" * 251 + ".dcm")
    write_atomic(out, rel, lambda f: f.write(b"first"))
    src = out / TMP_DIRNAME / "incoming"
    src.write_bytes(b"second")
    assert commit_file(src, out, rel, on_conflict=Duplicate.REPLACE) == (
        out / rel, Placement.REPLACED)
    assert (out / rel).read_bytes() == b"second"
    assert sorted(p.name for p in (out / "p").iterdir()) == [rel.name]


def test_same_instance_is_the_dataset_and_what_the_meta_says_it_is_not_who_sent_it(tmp_path: Path) -> None:
    from scp.dicom.meta import file_meta_bytes
    from scp.store.commit import same_instance

    ct, uid, explicit, implicit = "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
    dataset = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + os.urandom(5000)

    def part10(name: str, *meta: str, data: bytes = dataset) -> Path:
        path = tmp_path / name
        path.write_bytes(file_meta_bytes(*meta) + data)
        return path

    first = part10("modality", ct, uid, explicit, "CT1")
    assert same_instance(first, part10("router", ct, uid, explicit, "A_LONGER_ROUTER"))
    assert same_instance(first, part10("no-aet", ct, uid, explicit, ""))
    assert not same_instance(first, part10("other-ts", ct, uid, implicit, "CT1"))
    assert not same_instance(first, part10("other-uid", ct, "1.2.4", explicit, "CT1"))
    # (the last byte changed for sure: the random one could have been "!" already)
    other = dataset[:-1] + bytes([dataset[-1] ^ 0xFF])
    assert not same_instance(first, part10("other-bytes", ct, uid, explicit, "CT1", data=other))
    assert not same_instance(first, part10("longer", ct, uid, explicit, "CT1", data=dataset + b"\0\0"))
    bare = tmp_path / "bare"  # no File Meta: compared whole
    bare.write_bytes(dataset)
    twin = tmp_path / "twin"
    twin.write_bytes(dataset)
    assert same_instance(bare, twin) and not same_instance(bare, first)


def test_a_replace_cut_off_by_a_dying_process_leaves_nothing_in_the_layout(tmp_path: Path) -> None:
    """A replace names the new file with a second link, then renames that over
    the old one. A process killed in between (a worker at its deadline, the
    OOM killer) left that link, a hidden full copy, in the layout for ever:
    no sweep, rebuild or reindex looks for it there. It is made in the
    temporary area, whose sweep removes a dead process's files."""
    import subprocess
    import sys

    root = tmp_path / "out"
    rel = PurePosixPath("P/S/1.2.3.dcm")
    child = (
        "import os, sys\n"
        "from pathlib import Path, PurePosixPath\n"
        "from scp.enums import Duplicate\n"
        "from scp.store.commit import commit_file\n"
        "from scp.store.tmp import new_tmp\n"
        "root, rel = Path(sys.argv[1]), PurePosixPath(sys.argv[2])\n"
        "for content in (b'first', b'second'):\n"
        "    src = new_tmp(root)\n"
        "    src.write_bytes(content)\n"
        "    if content == b'second':  # the process dies just before the rename\n"
        "        os.replace = lambda a, b: os._exit(9)\n"
        "    commit_file(src, root, rel, on_conflict=Duplicate.REPLACE)\n"
    )
    done = subprocess.run([sys.executable, "-c", child, str(root), str(rel)], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 9, done.stderr
    assert (root / rel).read_bytes() == b"first"  # the old file, whole
    layout = [p for p in root.rglob("*") if TMP_DIRNAME not in p.parts and ".sortscp" not in p.parts]
    assert sorted(p.relative_to(root).as_posix() for p in layout if p.is_file()) == [rel.as_posix()]
    assert remove_orphans(root / TMP_DIRNAME) >= 1  # the dead process's, as the next start sweeps them
    assert os.listdir(root / TMP_DIRNAME) == []

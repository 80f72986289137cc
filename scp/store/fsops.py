"""Small file-system primitives shared by the commit and the sort placements:
flushes, content comparison, folder creation, the permissions of new files."""

from __future__ import annotations

import os
from pathlib import Path

from scp.errors import StoreError

CHUNK = 1 << 20


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Permissions of the files we create (temporary files start as 0600).
NEW_FILE_MODE = 0o666 & ~umask()


def ensure_parent(root: Path, final: Path, durable: bool) -> None:
    parent = final.parent
    if parent.is_dir():
        return
    missing = []
    while parent != root and not parent.is_dir():
        missing.append(parent)
        parent = parent.parent
    folder = root
    try:
        root.mkdir(parents=True, exist_ok=True)
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                if not folder.is_dir():
                    raise
            if durable:
                fsync_dir(folder.parent)
    except OSError as exc:
        raise StoreError(f"cannot create folder {folder}: {exc.strerror}") from exc


def same_content(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                ca, cb = fa.read(CHUNK), fb.read(CHUNK)
                if ca != cb:
                    return False
                if not ca:
                    return True
    except OSError:
        return False


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_path(path)
    except OSError:  # some file systems cannot fsync a folder; the data is synced
        pass

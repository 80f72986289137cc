"""Removing a layout file the index says is obsolete, and the folders it leaves empty.

File-system work only (the index module never touches layout files). Imports
only the standard library.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path, PurePosixPath


def prune_empty_dirs(root: Path | str, relfolder: str | PurePosixPath) -> int:
    """Remove `relfolder` (relative to `root`) and then each parent that is
    left empty, stopping at the first folder that is not empty and never
    removing `root` itself. Returns how many folders were removed.

    Racing a writer is safe for the files: ``rmdir`` only removes an empty
    folder, so it never takes a file with it. A writer that created a folder
    and is about to rename a file into it may find the folder gone
    (``FileNotFoundError``); it must create the folder again and retry.
    """
    root = Path(root)
    rel = PurePosixPath(relfolder)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"not a relative folder inside the root: {relfolder}")
    removed = 0
    while rel.parts:
        try:
            os.rmdir(root.joinpath(*rel.parts))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY, errno.ENOTDIR):
                break
            raise
        else:
            removed += 1
        rel = rel.parent
        if str(rel) == ".":
            break
    return removed


def remove_obsolete(root: Path | str, relpath: str) -> bool:
    """Unlink ``root/relpath`` (a path the index returned from ``commit`` or
    ``recover``) and prune the folders it leaves empty. True if a file was
    removed, False if it was already gone. The caller then tells the index
    with ``obsolete_removed(relpath)``."""
    root = Path(root)
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"not a relative path inside the root: {relpath}")
    try:
        os.unlink(root.joinpath(*rel.parts))
    except FileNotFoundError:
        gone = False
    else:
        gone = True
    prune_empty_dirs(root, rel.parent)
    return gone

"""One file per SOPInstanceUID: committing a received instance through the index.

:func:`commit_instance` runs the crash-consistency protocol of
:mod:`scp.store.index` around :func:`scp.store.commit.commit_file`:

1. claim the UID in the index (waits while another process holds it);
2. give the complete temporary file its final name, durably;
3. record it; if the UID was filed elsewhere before (a resend with a
   corrected PatientName or SeriesNumber), remove the old file and prune the
   folders it leaves empty.

What a resend under another path does depends on the duplicate policy:
``replace`` (the default) files the newcomer and then removes the old copy;
``keep`` keeps the first copy and drops the newcomer (logged by the caller);
``both`` files the newcomer and leaves the old copy where it is (the index
then points at the newest). A resend to the same path is the commit's usual
identical / replace / keep / ``~N`` logic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from scp.enums import Duplicate, Placement
from scp.errors import IndexCommitFailed, InstanceIndexError
from scp.store._prune import remove_obsolete
from scp.store.commit import commit_file
from scp.store.index import InstanceIndex, SqliteIndex, open_index


@dataclass(frozen=True)
class Committed:
    """Where the instance is now, what happened, and what it superseded."""

    final: Path
    placement: Placement
    #: the earlier copy elsewhere in the tree that was removed (replace) or kept (keep/both)
    other: str | None = None
    #: where the index had the earlier copy, now holding something else (kept; see `holds`)
    not_removed: str | None = None
    #: where the index had the earlier copy, which holds no file any more (moved or
    #: removed by hand: a copy moved elsewhere stays, unknown to the index)
    missing: str | None = None
    #: the size of the file at `final` when it is an earlier copy (``IDENTICAL``:
    #: its File Meta may name another sender), else None (the file received)
    size: int | None = None


def commit_instance(
    src: Path,
    root: Path,
    rel: PurePosixPath,
    uid: str,
    facts: Mapping[str, Any],
    index: InstanceIndex,
    *,
    on_conflict: Duplicate = Duplicate.REPLACE,
    durable: bool = True,
    holds: Callable[[Path, str], bool] | None = None,
) -> Committed:
    """File the complete temporary file `src` as ``root / rel``, keeping one
    file per SOPInstanceUID `uid` in the tree (see the module docstring).

    `holds(path, uid)`, if given, says whether the file at `path` is still an
    instance `uid`: the earlier copy the index names is removed only then (a
    file moved there by hand since, another instance, is kept: ``not_removed``)."""
    claim = index.begin(uid, rel.as_posix(), facts)
    try:
        old = claim.old
        elsewhere = old is not None and old.path is not None and old.path != rel.as_posix() \
            and (root / old.path).is_file()
        gone = old.path if old is not None and old.path is not None and old.path != rel.as_posix() \
            and not elsewhere else None
        if elsewhere and on_conflict is Duplicate.KEEP:
            index.abort(claim)
            assert old is not None
            return Committed(root / str(old.path), Placement.KEPT_EXISTING, old.path)
        # "keep" keeps the first copy of this instance, which the index knows;
        # a file at the name it does not hold for this UID (a fragment another
        # tool left, which a rebuild found unreadable) is no copy of it
        policy = Duplicate.REPLACE if on_conflict is Duplicate.KEEP and old is None else on_conflict
        final, placement = commit_file(src, root, rel, on_conflict=policy, durable=durable)
        there = None
        if placement is Placement.IDENTICAL:
            # the file there is the first copy: its File Meta (the sender's title) may
            # differ in length from this one's, and the row and the events tell its size
            there = final.stat().st_size
            claim = dataclasses.replace(claim, facts={**claim.facts, "size": there})
        unchanged = placement is Placement.IDENTICAL and old is not None and old.path == rel.as_posix()
        if final != root / rel or (placement is Placement.KEPT_EXISTING and old is not None) or unchanged:
            # stored as ~N beside other bytes, the indexed file kept, or the same bytes sent
            # again where the index has them: the row stays as it was (its series too:
            # nothing new arrived, so a completed series does not complete again)
            index.abort(claim)
            return Committed(final, placement, size=there)
    except BaseException:
        index.abort(claim)
        raise
    try:
        superseded = index.commit(claim)
    except InstanceIndexError:  # e.g. the claim was settled by another process: not ours to hold
        raise
    except Exception as exc:  # its file is in place, its claim still ours: see IndexCommitFailed
        raise IndexCommitFailed(f"filed at {rel}, but the index cannot record it: {exc}") from exc
    if elsewhere and placement is Placement.STORED:
        placement = Placement.REPLACED
    if old is not None and old.path == rel.as_posix() and placement is Placement.STORED:
        gone = old.path  # (a new file where the index had one)
    if superseded is not None:
        if on_conflict is Duplicate.BOTH:
            index.obsolete_removed(superseded)  # kept on purpose: no longer the index's concern
        elif holds is not None and not holds(root / superseded, uid):
            index.obsolete_removed(superseded)  # no longer this instance's: not the index's to remove
            return Committed(final, placement, None, not_removed=superseded, missing=gone, size=there)
        else:
            remove_obsolete(root, superseded)
            index.obsolete_removed(superseded)
    return Committed(final, placement, superseded, missing=gone, size=there)


def open_for_serving(root: Path, read_identity) -> tuple[SqliteIndex, str | None, int]:
    """The index of `root` for a server's main process: rebuilt from the files
    if missing or behind, intents of dead processes settled, their obsolete
    files removed. Returns (index, why it was rebuilt or None, files removed)."""
    index, report = open_index(root, read_identity)
    removed = settle(index, root, report.obsolete)
    return index, report.rebuilt, removed


def settle(
    index: SqliteIndex, root: Path, obsolete: list[str] | None = None, *, wait: float | None = None,
) -> int:
    """Remove the obsolete files the index hands back (all of them after a
    worker died: ``recover``, waiting up to `wait` s for the index), confirming
    each. Returns how many were removed."""
    removed = 0
    for rel in index.recover(wait=wait) if obsolete is None else obsolete:
        if remove_obsolete(root, rel):
            removed += 1
        index.obsolete_removed(rel)
    return removed

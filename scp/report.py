"""What happened to each file (:class:`Outcome`) and to a whole run (:class:`Report`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from scp.enums import Result, SkipCategory


@dataclass(frozen=True)
class Outcome:
    """What happened to one file or received instance.

    `category` says why a ``skipped`` entry was left alone (a
    :class:`~scp.enums.SkipCategory` value), empty otherwise.
    """

    result: Result
    source: str = ""
    destination: str = ""
    reason: str = ""
    nbytes: int = 0
    category: str = ""
    #: serve: the index facts of the instance filed at `destination` (its
    #: series and study ...), as its worker committed them; None where the
    #: file there is another one (``--on-duplicate keep``).
    facts: Mapping[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)
    #: serve: what the store did at `destination` (a :class:`~scp.enums.Placement` value).
    placement: str = ""


#: How the summary names each kind of skipped entry, in order.
SKIP_WORDS = {
    SkipCategory.NOT_DICOM.value: "not DICOM",
    SkipCategory.TRUNCATED.value: "truncated",
    SkipCategory.SYMLINK.value: "link",
    SkipCategory.SPECIAL.value: "special",
    SkipCategory.GONE.value: "gone",
}


@dataclass
class Report:
    """Counts of a run and its exit code (non-zero if any file failed).

    Examples
    --------
    >>> r = Report()
    >>> r.add(Outcome(Result.NEW, nbytes=10)); r.add(Outcome(Result.FAILED))
    >>> r.counts[Result.NEW], r.exit_code
    (1, 1)
    """

    counts: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    nbytes: int = 0
    #: Flushes to disk the workers made (``fsync``/``syncfs``; 0 with ``--fsync never``).
    flushes: int = 0
    #: ``sort`` into a serve output folder: the instances its rebuilt index holds.
    indexed: int | None = None
    #: ... and the files of DST that hold an instance another file holds
    #: (SOPInstanceUID, the file indexed, the other file): the rebuild's
    #: ``duplicates``, as ``reindex`` lists them.
    index_duplicates: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.result] += 1
        if outcome.result is Result.SKIPPED:
            self.skipped[outcome.category or SkipCategory.NOT_DICOM.value] += 1
        self.nbytes += outcome.nbytes

    def recount(self, old: Result, new: Result) -> None:
        """One file counted as `old` turned out to be `new` (a name given after the walk)."""
        self.counts[old] -= 1
        self.counts[new] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def failed(self) -> int:
        return self.counts[Result.FAILED]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def summary(self) -> str:
        """One line, each number meaning one thing.

        >>> r = Report(); r.add(Outcome(Result.NEW))
        >>> r.add(Outcome(Result.SKIPPED, category="symlink")); r.summary()
        '1 new, 0 replaced, 0 already in place, 0 kept as ~N, 1 skipped (0 not DICOM, 0 truncated, 1 link, 0 special), 0 failed'
        """
        c = self.counts
        kinds = [k for k in SKIP_WORDS if k != SkipCategory.GONE.value or self.skipped[k]]
        skipped = ", ".join(f"{self.skipped[k]} {SKIP_WORDS[k]}" for k in kinds)
        parts = [
            f"{c[Result.NEW]} new",
            f"{c[Result.REPLACED]} replaced",
            f"{c[Result.ALREADY]} already in place",
            f"{c[Result.KEPT_AS_COPY]} kept as ~N",
            f"{c[Result.SKIPPED]} skipped ({skipped})",
            f"{c[Result.FAILED]} failed",
        ]
        if c[Result.PLANNED]:
            parts.insert(0, f"{c[Result.PLANNED]} planned (dry run)")
        return ", ".join(parts)

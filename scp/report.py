"""What happened to each file (:class:`Outcome`) and to a whole run (:class:`Report`)."""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field


class Status(str, enum.Enum):
    """The outcome of one file or instance."""

    STORED = "stored"  #: now in the layout (new, replaced, or kept beside an older one)
    ALREADY = "already"  #: the same bytes were already at the destination
    PLANNED = "planned"  #: --dry-run: would be stored there
    SKIPPED = "skipped"  #: not a DICOM instance; left where it was
    FAILED = "failed"  #: a DICOM instance that could not be stored; the reason says why


@dataclass(frozen=True)
class Outcome:
    """What happened to one file or received instance."""

    status: Status
    source: str = ""
    destination: str = ""
    reason: str = ""
    nbytes: int = 0

    @property
    def ok(self) -> bool:
        return self.status is not Status.FAILED


@dataclass
class Report:
    """Counts of a run and its exit code (non-zero if any DICOM file failed).

    Examples
    --------
    >>> r = Report()
    >>> r.add(Outcome(Status.STORED, nbytes=10)); r.add(Outcome(Status.FAILED))
    >>> r.counts[Status.STORED], r.exit_code
    (1, 1)
    """

    counts: Counter = field(default_factory=Counter)
    nbytes: int = 0

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.status] += 1
        self.nbytes += outcome.nbytes

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def failed(self) -> int:
        return self.counts[Status.FAILED]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def summary(self) -> str:
        c = self.counts
        parts = [
            f"{c[Status.STORED]} sorted",
            f"{c[Status.ALREADY]} already in place",
            f"{c[Status.SKIPPED]} skipped (not DICOM)",
            f"{c[Status.FAILED]} failed",
        ]
        if c[Status.PLANNED]:
            parts.insert(0, f"{c[Status.PLANNED]} planned (dry run)")
        return ", ".join(parts)

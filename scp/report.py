"""What happened to each file (:class:`Outcome`) and to a whole run (:class:`Report`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from scp.enums import Result


@dataclass(frozen=True)
class Outcome:
    """What happened to one file or received instance."""

    result: Result
    source: str = ""
    destination: str = ""
    reason: str = ""
    nbytes: int = 0


@dataclass
class Report:
    """Counts of a run and its exit code (non-zero if any DICOM file failed).

    Examples
    --------
    >>> r = Report()
    >>> r.add(Outcome(Result.STORED, nbytes=10)); r.add(Outcome(Result.FAILED))
    >>> r.counts[Result.STORED], r.exit_code
    (1, 1)
    """

    counts: Counter = field(default_factory=Counter)
    nbytes: int = 0

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.result] += 1
        self.nbytes += outcome.nbytes

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
        c = self.counts
        parts = [
            f"{c[Result.STORED]} sorted",
            f"{c[Result.ALREADY]} already in place",
            f"{c[Result.SKIPPED]} skipped (not DICOM)",
            f"{c[Result.FAILED]} failed",
        ]
        if c[Result.PLANNED]:
            parts.insert(0, f"{c[Result.PLANNED]} planned (dry run)")
        return ", ".join(parts)

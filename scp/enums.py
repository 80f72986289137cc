"""The closed sets of sortscp: each is a ``str`` Enum, so typer offers its values
as choices and they print and serialize as plain words."""

from __future__ import annotations

import enum


class Mode(str, enum.Enum):
    """How ``sort`` puts a source file into the layout."""

    COPY = "copy"
    MOVE = "move"
    HARDLINK = "hardlink"
    SYMLINK = "symlink"


class Duplicate(str, enum.Enum):
    """What to do when an instance's final name already holds other bytes.

    ``serve`` offers ``replace`` (the default: the sender's latest wins) and
    ``keep``; ``sort`` always keeps both, the newcomer as ``<stem>~N<ext>``.
    """

    REPLACE = "replace"  #: the newcomer atomically replaces the existing file
    KEEP = "keep"  #: the existing file stays, the newcomer is dropped
    BOTH = "both"  #: the newcomer is stored beside it as <stem>~N<ext>


class LogFormat(str, enum.Enum):
    TEXT = "text"
    JSON = "json"


class Placement(str, enum.Enum):
    """What happened at a final name (the store's answer)."""

    STORED = "stored"  #: a new file now carries the final name
    STORED_AS_COPY = "stored_as_copy"  #: name taken by other bytes: stored as <stem>~N<ext>
    REPLACED = "replaced"  #: different bytes were atomically replaced
    IDENTICAL = "identical"  #: the same bytes were already there
    KEPT_EXISTING = "kept_existing"  #: different bytes were there and were kept


class Result(str, enum.Enum):
    """What happened to one file or received instance (a row of the report)."""

    STORED = "stored"  #: now in the layout (new, replaced, or kept beside an older one)
    ALREADY = "already"  #: the same bytes were already at the destination
    PLANNED = "planned"  #: --dry-run: would be stored there
    SKIPPED = "skipped"  #: not a DICOM instance; left where it was
    FAILED = "failed"  #: a DICOM instance that could not be stored; the reason says why

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
    DEFERRED = "deferred"  #: sort: other bytes hold the name; named after the walk (~N)


class Result(str, enum.Enum):
    """What happened to one file or received instance (a row of the report).

    ``sort`` reports every entry of SRC with one of these; a ``skipped`` row
    also carries a :class:`SkipCategory`.
    """

    NEW = "new"  #: now in the layout under a name that was free
    REPLACED = "replaced"  #: now in the layout, where a link or other bytes were before
    ALREADY = "already"  #: the same bytes were already at the destination (a real file)
    KEPT_AS_COPY = "kept_as_copy"  #: other bytes hold the name: kept beside it as <stem>~N<ext>
    PLANNED = "planned"  #: --dry-run: would be stored there
    SKIPPED = "skipped"  #: not an instance (see SkipCategory); left where it was
    FAILED = "failed"  #: could not be stored or read; the reason says why
    STORED = "new"  #: alias of NEW (the name serve's code uses)


class SkipCategory(str, enum.Enum):
    """Why ``sort`` left an entry of SRC alone (the report's ``category``)."""

    NOT_DICOM = "not_dicom"  #: text, image, DICOMDIR, empty ...
    TRUNCATED = "truncated"  #: a fragment: the dataset ends before its elements say
    SYMLINK = "symlink"  #: a symbolic link not followed (or a loop, dangling, seen already)
    SPECIAL = "special"  #: a FIFO, socket or device
    GONE = "gone"  #: listed, then removed by someone else before it was read


class Fsync(str, enum.Enum):
    """Whether files are flushed to disk (``fsync``) before they count as stored.

    ``always``: a stored file and its folder entry are on disk before ``serve``
    answers Success and before ``sort`` reports the file placed (and before a
    move removes its source). ``never``: nothing is flushed; the operating
    system writes the data back in its own time (seconds), so a power loss or
    a kernel crash soon after can lose files reported as stored, or, for a
    move, both the copy and its source. For storage that is safe already
    (battery-backed cache, ZFS ``sync=always``), or for speed.
    """

    ALWAYS = "always"
    NEVER = "never"

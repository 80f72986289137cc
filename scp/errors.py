"""The few exceptions sortscp raises on purpose."""

from __future__ import annotations


class SortscpError(Exception):
    """Base class of every error sortscp raises on purpose."""


class TemplateError(SortscpError, ValueError):
    """A path template is malformed or names an unknown DICOM keyword."""


class NotDicomError(SortscpError):
    """A file or byte stream is not a DICOM instance (or is a DICOMDIR)."""


class StoreError(SortscpError):
    """An instance could not be written to its final place."""


class SourceChanged(StoreError):
    """A source file was replaced or written to while it was being sorted: it
    is neither placed from its new bytes nor removed (a rerun sorts it)."""

    #: True once a move's link in DST (the source's own file) was removed with it
    unfiled: bool = False


class FolderGone(StoreError):
    """The folder a file was being named into was removed meanwhile (a
    concurrent prune); the caller makes it again and retries."""


class OutsideRootError(StoreError):
    """A computed destination would lie outside the output folder."""


class TruncatedError(NotDicomError):
    """A dataset ends before its elements say, or leaves a sequence, an item or
    encapsulated pixel data unclosed: a fragment, not an instance."""


class DatasetMismatch(NotDicomError):
    """A received dataset names another SOP Instance (or Class) than the
    C-STORE command that carried it: the file and its File Meta could not
    agree on one identity."""


class NoDataset(NotDicomError):
    """A C-STORE request that carries no dataset: it can never succeed."""


class NotStorageContext(SortscpError):
    """A C-STORE on a presentation context whose abstract syntax is no storage class."""


class ReceiveFailed(StoreError):
    """An incoming dataset could not be written to the temporary area."""


class InstanceIndexError(StoreError):
    """The instance index (``<root>/.sortscp/index.sqlite``) cannot do what was
    asked: a UID held too long by another live process, a claim lost, an index
    that is missing, stale or in use by a rebuild. A store that meets it is a
    failure (0xA700), never a Success."""


class IndexCommitFailed(InstanceIndexError):
    """The file has its final name but the index could not record it (e.g. the
    disk filled between the two). The claim stays held by the process that
    wrote it, so that process is replaced (:attr:`replace_worker`): its claim
    is then a dead owner's, settled from the files by the next store of that
    UID (the sender's retry) as after a crash, instead of blocking every
    retry while the process lives."""

    #: The worker pool replaces the worker that raised it (:meth:`scp.pool.WorkerPool.run`).
    replace_worker = True


class DestinationLockedError(SortscpError):
    """Another ``sortscp sort`` holds the lock on the destination folder."""


class ReportError(SortscpError):
    """``sort``'s report cannot be written (a full disk): the run stops."""


class Interrupted(SortscpError):
    """A run was stopped by SIGINT or SIGTERM after it had drained and cleaned up."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum

"""The temporary file pynetdicom writes an incoming dataset into, made to fail softly.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each incoming dataset to
a ``NamedTemporaryFile`` from its network thread. If that file cannot be
created or written (disk full, folder gone or read-only), the exception kills
the association's network thread and the sender waits for a response that
never comes. :class:`IncomingDataset` stands in for that file: on the first
error it logs one clear line, removes what it wrote and discards the rest of
the dataset, so the transfer completes and the C-STORE handler answers with a
failure status: the handler answers from :attr:`IncomingDataset.error`.

It also gives the file its final File Meta on the way in (:mod:`scp.dicom.meta`: our
implementation UID, the sender's AE title), so that a worker only has to flush
the complete file and link it into the layout: the dataset is written once.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from scp.dicom.meta import file_meta_bytes, meta_end, meta_values
from scp.net import _pynetdicom
from scp.store.tmp import TMP_DIRNAME, tmp_prefix

log = logging.getLogger(__name__)


class IncomingDataset:
    """A ``NamedTemporaryFile(delete=False)`` look-alike that never raises on write.

    ``error`` is the first :class:`OSError` met (None while all is well); once
    set, the file is gone and further data is discarded.
    """

    def __init__(self, folder: Path, **kwargs: Any) -> None:
        self.error: OSError | None = None
        self._file: Any = None
        self._head: bytearray | None = bytearray()  # until the File Meta is complete
        self._folder = folder
        kwargs["prefix"] = tmp_prefix("r")
        kwargs["dir"] = folder
        try:
            try:
                self._file = tempfile.NamedTemporaryFile(**kwargs)
            except FileNotFoundError:  # the output folder was removed: make it again, once
                folder.mkdir(parents=True, exist_ok=True)
                self._file = tempfile.NamedTemporaryFile(**kwargs)
            self.name: str = self._file.name
        except OSError as exc:
            # A name that does not exist, so that reading it fails.
            self.name = os.path.join(folder, f".unwritable-{uuid.uuid4().hex}.dcm")
            self._fail(exc)

    @property
    def file(self) -> IncomingDataset:
        return self  # pynetdicom calls ``.file.flush()``

    def write(self, data: bytes) -> int:
        n = len(data)
        if self._head is not None:
            self._head += data
            try:
                end = meta_end(self._head)
                if end is None:
                    return n
                head, self._head = self._head, None
                data = _our_file_meta(bytes(head[:end])) + bytes(head[end:])
            except (AttributeError, KeyError, ValueError, UnicodeError) as exc:
                self._head = None
                self._fail(OSError(f"cannot build the File Meta of an incoming dataset: {exc}"))
                return n
        self._write(data)
        return n

    def _write(self, data: bytes) -> None:
        if self._file is not None:
            try:
                self._file.write(data)
            except OSError as exc:
                self._fail(exc)

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        self._head = None
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        log.error(
            "cannot write an incoming dataset to %s: %s; it will be refused (out of resources)",
            self._folder, exc.strerror or exc,
            extra={"event": "receive_failed", "reason": exc.strerror or str(exc)},
        )
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            try:
                os.unlink(self.name)
            except OSError:
                pass
            self._file = None


def _our_file_meta(head: bytes) -> bytes:
    """Our File Meta in place of pynetdicom's `head`, with the same SOP identity and
    transfer syntax. pynetdicom writes the file from the association's network
    thread, which carries the association (and so the calling AE title)."""
    assoc = _pynetdicom.current_association()
    if assoc is None:
        raise ValueError("no association in this thread")
    values = meta_values(head)
    return file_meta_bytes(values[0x0002], values[0x0003], values[0x0010], assoc.requestor.ae_title)


class SinkFactory:
    """Makes the :class:`IncomingDataset` of every dataset received under `out`
    (in its temporary area, made again if the folder was removed)."""

    def __init__(self, out: Path) -> None:
        self.folder = out / TMP_DIRNAME

    def __call__(self, **kwargs: Any) -> IncomingDataset:
        return IncomingDataset(self.folder, **kwargs)


def install(out: Path) -> None:
    """Make pynetdicom write the datasets it receives through :class:`IncomingDataset`
    s in the temporary area of `out`."""
    _pynetdicom.install_dataset_sink(SinkFactory(out))

"""The file an incoming dataset is written to, checked as it arrives.

pynetdicom streams each C-STORE dataset to a file from the association's
network thread (``STORE_RECV_CHUNKED_DATASET``). sortscp decodes the P-DATA
itself (:func:`scp.net._pynetdicom.install_receiver`) and hands every dataset
fragment to an :class:`IncomingDataset`, opened once the command set is
complete. That object:

* writes **our File Meta** first, built only from the association: the
  command's Affected SOP Class/Instance UID, the negotiated transfer syntax,
  the real calling AE title (:mod:`scp.dicom.meta`); nothing inside the
  dataset can change it;
* writes the dataset **exactly as received**, except (0002,xxxx) elements a
  sender put in front of it, which are dropped (they belong to the File Meta,
  which is ours);
* walks it as it arrives (:class:`scp.dicom.walk.DatasetWalker`: element
  headers only, deflated data inflated in bounded pieces), so that
  :attr:`problem` says, by the last fragment, whether it is complete and
  whether its SOP Class/Instance UID are the command's;
* never raises: a write error (disk full, folder gone) is kept in
  :attr:`error`, the file removed and the rest discarded, so the transfer
  completes and the handler answers a failure status from it.

A dataset that never completes (the association ends, or another command
starts first) is removed by :meth:`abandon`.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

from scp.dicom.header import FIRST_PIXEL_TAG, vr_switch
from scp.dicom.meta import file_meta_bytes
from scp.dicom.walk import SOP_CLASS_UID, SOP_INSTANCE_UID, DatasetWalker, encoding_of
from scp.errors import DatasetMismatch, NotDicomError, SortscpError, TruncatedError
from scp.jobs import ReceivedHeader
from scp.log import safe
from scp.net import _pynetdicom
from scp.store.tmp import TMP_DIRNAME, open_tmp

log = logging.getLogger(__name__)


class IncomingDataset:
    """One dataset arriving on an association, written to the temporary area.

    Attributes
    ----------
    name : str
        Path of the temporary file (our File Meta, then the dataset).
    error : OSError | None
        The first write error (the file is then gone): out of resources.
    problem : SortscpError | None
        Why the dataset cannot be stored even though it was written: cut
        short, malformed, or naming another instance than the command
        (:class:`~scp.errors.TruncatedError`, :class:`~scp.errors.NotDicomError`,
        :class:`~scp.errors.DatasetMismatch`). Final once :meth:`finish` ran.
    dataset_offset : int
        Where the dataset starts in the file (the length of our File Meta).
    """

    def __init__(
        self,
        folder: Path,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_aet: str,
        keep: tuple[int, ...] = (),
    ) -> None:
        self.error: OSError | None = None
        self.problem: SortscpError | None = None
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.calling_aet = calling_aet
        self.finished = False
        self._folder = folder
        self._file: Any = None
        self._received = 0
        self.fragments = 0  #: how many pieces the dataset came in so far
        self._first = b""
        self._keep = tuple(t for t in keep if t < FIRST_PIXEL_TAG)
        encoding = encoding_of(transfer_syntax)
        self._walker: DatasetWalker | None = None
        self._deflated = False
        self._encoding = (False, True)
        if encoding is not None:  # a private syntax we cannot walk is taken on trust
            implicit, little, self._deflated = encoding
            self._encoding = (implicit, little)
            self._walker = DatasetWalker(
                implicit=implicit, little=little, deflated=self._deflated,
                wanted=(SOP_CLASS_UID, SOP_INSTANCE_UID, *self._keep),
            )
        meta = b""
        self.problem = _bad_uids(sop_class_uid, sop_instance_uid)
        if self.problem is None:
            try:
                meta = file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax, calling_aet)
            except (UnicodeError, ValueError) as exc:
                self.problem = NotDicomError(f"cannot build the File Meta from the command: {exc}")
        self.dataset_offset = len(meta)
        if self.problem is not None:  # refused whatever follows: nothing is written
            self.name: str = os.path.join(folder, f".refused-{uuid.uuid4().hex}.dcm")
            return
        try:
            # (made again if the output folder was removed)
            self._file, self.name = open_tmp(os.path.join(folder, TMP_DIRNAME), "r", ".dcm")
            self._file.write(meta)
        except OSError as exc:
            self.name = getattr(self, "name", os.path.join(folder, f".unwritable-{uuid.uuid4().hex}.dcm"))
            self._fail(exc)

    @property
    def received(self) -> int:
        """Dataset bytes received so far."""
        return self._received

    # pynetdicom calls ``.file.flush()`` and ``.close()`` on the dataset file
    @property
    def file(self) -> IncomingDataset:
        return self

    def write(self, data: bytes | memoryview) -> int:
        """The next fragment of the dataset."""
        n = len(data)
        self.fragments += 1
        if self._received < 6:
            self._first += bytes(data[: 6 - self._received])
        self._received += n
        if self.problem is None and self._walker is not None:
            try:
                self._walker.feed(data)
            except (TruncatedError, NotDicomError) as exc:
                self._refuse(exc)
        if self._file is not None:
            try:
                self._file.write(data)
            except OSError as exc:
                self._fail(exc)
        return n

    def finish(self) -> None:
        """The last fragment arrived: decide :attr:`problem` and make the file
        what will be stored (leading group 0002 elements removed)."""
        if self.finished:
            return
        self.finished = True
        walker = self._walker
        if self.problem is None and walker is not None:
            try:
                walker.close()
                self._check_identity(walker)
            except (TruncatedError, NotDicomError) as exc:
                self._refuse(exc)
        if self._file is not None:
            try:
                self._file.flush()
                if self.problem is None and walker is not None and walker.leading_meta_end:
                    self._drop_leading_meta(walker.leading_meta_end)
            except OSError as exc:
                self._fail(exc)

    def header(self) -> ReceivedHeader | None:
        """The header values kept while the dataset arrived (the tags given as
        `keep`), for a dataset that was stored as written; None where the
        worker must read the file (deflated, irregular before the last kept
        tag, leading File Meta elements, another VR encoding than the
        transfer syntax's at its start: what pydicom reads differently)."""
        walker = self._walker
        if not self.finished or self.problem is not None or self.error is not None or walker is None \
                or not self._keep or self._deflated or walker.irregular_in_header or walker.leading_meta_end \
                or vr_switch(self._first, self._encoding[0]):
            return None
        return ReceivedHeader(
            elements={t: v for t, v in walker.elements.items() if t < FIRST_PIXEL_TAG},
            implicit=self._encoding[0], little=self._encoding[1], transfer_syntax=self.transfer_syntax,
            sop_class_uid=self.sop_class_uid, sop_instance_uid=self.sop_instance_uid,
            dataset_offset=self.dataset_offset,
        )

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._fail(exc)

    def abandon(self, why: str, peer: str = "") -> None:
        """Remove a dataset that will never be complete, with one log line."""
        if self.finished and self._file is None:
            return
        self.finished = True
        log.warning(
            "dataset of SOP Instance %s from %s%s abandoned after %d bytes: %s; nothing stored",
            safe(self.sop_instance_uid), safe(self.calling_aet), f" ({peer})" if peer else "",
            self._received, why,
            extra={"event": "dataset_abandoned", "calling_aet": self.calling_aet,
                   "sop_instance": self.sop_instance_uid, "reason": why},
        )
        self._discard()

    # --- internals -------------------------------------------------------------

    def _check_identity(self, walker: DatasetWalker) -> None:
        for tag, expected, what in (
            (SOP_INSTANCE_UID, self.sop_instance_uid, "SOP Instance UID"),
            (SOP_CLASS_UID, self.sop_class_uid, "SOP Class UID"),
        ):
            found = walker.elements.get(tag)
            if found is None:
                if tag == SOP_INSTANCE_UID:
                    raise DatasetMismatch(f"the dataset has no {what} (the command says {expected})")
                continue
            value = found[1].rstrip(b"\x00 ").decode("ascii", "replace")
            if value != expected.rstrip("\x00 "):
                raise DatasetMismatch(
                    f"the dataset's {what} {value!r} is not the command's {expected!r}"
                )

    def _drop_leading_meta(self, end: int) -> None:
        """Rewrite the file without the first `end` dataset bytes (elements of
        group 0002 the sender put in the dataset)."""
        if self._deflated:  # inside the compressed stream: cannot cut it out
            self._refuse(NotDicomError("the deflated dataset starts with File Meta (0002) elements"))
            return
        old = self._file
        old.close()
        self._file = None
        dst, dst_name = open_tmp(os.path.dirname(self.name), "r", ".dcm")
        with open(self.name, "rb") as src, dst:
            try:
                dst.write(src.read(self.dataset_offset))
                src.seek(self.dataset_offset + end)
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            except OSError:
                os.unlink(dst_name)
                raise
        os.replace(dst_name, self.name)
        log.info(
            "dataset of SOP Instance %s from %s carried %d bytes of File Meta (0002) elements; "
            "dropped (the File Meta comes from the association)",
            safe(self.sop_instance_uid), safe(self.calling_aet), end,
        )

    def _refuse(self, exc: SortscpError) -> None:
        """The dataset cannot be stored: stop writing it, keep the reason."""
        self.problem = exc
        self._discard()

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        log.debug(  # the C-STORE's failure line, with its sender and UID, says it (once)
            "cannot write an incoming dataset to %s: %s; it will be refused (out of resources)",
            self._folder, _strerror(exc),
            extra={"event": "receive_failed", "reason": _strerror(exc)},
        )
        self._discard()

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        try:
            os.unlink(self.name)
        except OSError:
            pass


#: What a UID that names a file must look like: at most 64 characters, letters,
#: digits, dots and hyphens, starting with a letter or digit. That is looser than
#: PS3.5 9.1 (digits and dots, no leading zeros), which real senders and
#: anonymizers break (hex digests), but every such UID is its own file name
#: unchanged; anything else could name another instance's file once sanitized
#: ("1.2/3" and "1.2_3"), or a folder ("..").
_UID = re.compile(r"[0-9A-Za-z][0-9A-Za-z.\-]{0,63}")


def _bad_uids(sop_class_uid: str, sop_instance_uid: str) -> NotDicomError | None:
    """Why the command's UIDs cannot name a stored instance (None: they can)."""
    for what, uid in (("SOP Instance", sop_instance_uid), ("SOP Class", sop_class_uid)):
        value = uid.rstrip("\x00 ")
        if not _UID.fullmatch(value):
            return NotDicomError(f"the command's Affected {what} UID {value!r} is not a valid UID")
    return None


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


class SinkFactory:
    """Opens the :class:`IncomingDataset` of each C-STORE received under `out`
    (in its temporary area, made again if the folder was removed)."""

    def __init__(self, out: Path, keep: tuple[int, ...] = ()) -> None:
        self.folder = out
        self.keep = keep

    def __call__(self, command: Any, transfer_syntax: str, calling_aet: str) -> IncomingDataset:
        return IncomingDataset(
            self.folder,
            sop_class_uid=_pynetdicom.uid_text(command.AffectedSOPClassUID),
            sop_instance_uid=_pynetdicom.uid_text(command.AffectedSOPInstanceUID),
            transfer_syntax=str(transfer_syntax),
            calling_aet=calling_aet,
            keep=self.keep,
        )


def install(out: Path, keep: tuple[int, ...] = ()) -> None:
    """Make the server write the datasets it receives through
    :class:`IncomingDataset` s in the temporary area of `out`, keeping the
    values of the tags in `keep` for the worker (:meth:`IncomingDataset.header`)."""
    _pynetdicom.install_receiver(SinkFactory(out, keep))

"""Every use of a pynetdicom internal, in one place, checked at start-up.

pynetdicom's public API cannot yet do a few things a receiver needs; each is
wrapped here, with the upstream change that would remove it:

* :func:`configure_storage`: ``_config.UNRESTRICTED_STORAGE_SERVICE`` (every
  storage SOP class, private ones included), with ``acse.negotiate_unrestricted``
  replaced by :func:`_negotiate_storage`: pynetdicom takes for storage every
  standard UID whose pydicom keyword is not a name in ``pynetdicom.sop_class``,
  which the two spell differently for Modality Worklist FIND and a few others
  (accepted, then a C-FIND failed with 0xC311), and its ``_STORAGE_CLASSES``
  lacks some storage classes that are names there (Hanging Protocol, Color
  Palette, Implant Template, Defined Procedure Protocol, Inventory Storage:
  refused). Upstream: decide by the UID dictionary's name, as
  :func:`is_storage_class` does,
  ``_config.STORE_RECV_CHUNKED_DATASET`` (datasets streamed to a file, never
  held in memory) and ``_config.LOG_HANDLER_LEVEL`` (pynetdicom's per-message
  log handlers only when their lines are shown). Documented, but a private,
  process-wide module.
* :func:`_dimse_send_msg` (``DIMSEServiceProvider.send_msg``, installed with
  the network threads): a plain C-STORE-RSP is encoded by hand
  (:func:`store_rsp_command`, byte for byte pydicom's encoding, a few us
  instead of ~300 us). Upstream: a cached or hand-written encoder for fixed
  DIMSE command sets.
* :func:`install_receiver`: ``DIMSEMessage.decode_msg``, which turns P-DATA
  into DIMSE messages, replaced by :func:`_decode_msg` (same protocol logic).
  Ours hands each C-STORE dataset, fragment by fragment, to a sink opened
  with the command set, the negotiated transfer syntax and the calling AE
  (so the File Meta comes from the association, the dataset is checked as it
  arrives, a full disk fails one instance instead of killing the network
  thread); abandons a dataset when another command starts before it ends;
  aborts the association on a PDV for another presentation context than its
  command's, a dataset PDV without a command, or a command set or a
  non-C-STORE dataset past a bound (pynetdicom would hold it in memory).
  Upstream: a per-AE factory for the chunked-dataset file that receives the
  command set and context, and bounds on in-memory DIMSE data. A clean
  C-STORE-RQ command set is read straight from its bytes (:class:`StoreCommand`,
  ~4 us instead of pydicom's ~63 us), anything else by pydicom as before.
* :func:`dataset_sink`: ``C_STORE._dataset_file``, that file as the handler
  sees it (``Event.dataset_path`` gives only its name, not whether writing it
  failed).
* :func:`current_association`: the association whose network thread is
  running (pynetdicom's DUL thread carries it as ``.assoc``).
* :func:`partial_dataset_file`: ``assoc.dimse.message._data_set_file``, the file of
  a dataset still arriving when the connection closes (pynetdicom removes only
  complete ones). Upstream: removing it on connection close.
* :func:`reject`: the A-ASSOCIATE-RJ sequence pynetdicom itself runs for a
  rejection from an ``EVT_REQUESTED`` handler. Upstream: a public reject.
* :func:`register_server`: ``AE._servers``, so ``AE.shutdown`` stops a server
  made with ``AE.make_server`` as it stops one from ``AE.start_server``.
  Upstream: ``start_server(server_class=...)``.

* **Event-driven network threads** (the section at the end of this module,
  :func:`install_network_threads`, installed by ``sortscp serve`` at start-up).
  pynetdicom 3.0 runs two threads per association and both poll: the DUL
  reactor (``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay``
  (1 ms) whenever its event queue is empty and reads a PDU with a blocking
  ``AssociationSocket.recv`` that joins 4 KiB reads until the declared length
  has arrived, however large the peer says it is; the association reactor
  (``Association._run_reactor``) sleeps 1 ms per loop. Replaced, process-wide:

  - ``DULServiceProvider.run_reactor`` / ``kill_dul`` / ``stop_dul``: the DUL
    waits in ``select`` on its socket and a wake-up socketpair (written when a
    primitive is queued for it: ``to_provider_queue`` and ``event_queue``
    become :class:`_WakingQueue`, and when it is told to stop), never longer
    than :data:`SAFETY_TIMEOUT` nor the ARTIM deadline, so ARTIM still fires.
    Each PDU is read without blocking: the 6-byte header, then ``recv_into``
    one buffer of the declared size, resumed on the next readiness (a
    half-sent PDU never pins the thread). A declared length over
    :func:`pdu_limit` (P-DATA-TF: our maximum PDU + :data:`PDATA_SLACK`;
    other PDUs: :data:`OTHER_PDU_LIMIT`) is refused from the header alone
    (Evt19: A-ABORT, connection closed, nothing buffered). A DIMSE message
    that stops progressing (:func:`message_allowance`) is aborted the same
    way. ``fsm.InvalidEventError`` (e.g. a local abort in Sta13 when
    ``ae.shutdown()`` meets an association already closing) no longer kills
    the thread. Uses ``_process_recv_primitive``, ``_decode_pdu``,
    ``_recv_pdu``, ``_idle_timer``, ``artim_timer`` (``Timer._start_time``,
    ``_end_time``, ``remaining``), ``_kill_thread``, ``state_machine``.
    Upstream: an event-driven DUL. The maintainers' own comment "try and
    make this event based rather than running loops" sits beside
    ``_run_loop_delay`` in ``dul.py``; the polling has a long history:
    pydicom/pynetdicom#60 (100 % CPU; a ``select`` timeout suggested instead
    of sleeps), #102/#103 ("Revert sleep times ... Really need to find a
    better method for managing race conditions/CPU usage"), #120 and PR #139
    (a shorter DUL sleep, "about 4X" storescp throughput, never merged),
    #650/PR #651 (sleep only when the event queue is empty: what 3.0 ships),
    #317 (time spent in ``select``). The blocking read is #272 (open: "DUL
    hangs if in State 13 and data is available on the connection ... because
    the recv call is blocking"); a resumable ``recv_into`` of the declared
    length, checked against a limit before the body is read, fixes it and
    the unbounded buffer.
  - ``Association.__init__`` / ``_run_reactor`` / ``kill``: the association
    reactor waits on a ``threading.Event`` set when the DIMSE message queue
    (``dimse.msg_queue``) or the DUL's ``to_user_queue`` receives something,
    the DUL stops, or ``kill`` is called; never longer than
    :data:`SAFETY_TIMEOUT` nor the network (idle) deadline. Uses
    ``_is_paused``, ``_reactor_checkpoint``, ``_dul_ready``,
    ``_serve_request``, ``_kill``, ``dimse.message`` (the message still
    arriving). Upstream: the queues feeding a ``Condition`` (PR #289 did this
    for the DUL start-up with ``_dul_ready``).
  - the C-STORE fast path (:func:`_queue_store`, :func:`_serve_store`): a
    C-STORE-RQ whose dataset went to our sink is queued as a
    :class:`StoreRequest` and served by the association reactor without
    ``message_to_primitive``, ``_serve_request`` or
    ``StorageServiceClass.SCP`` (250-300 us an instance of primitive
    building and validation); the handler still runs through ``evt.trigger``
    and the response is encoded by hand. Uses ``dimse.message``,
    ``_sent_release``, ``dimse.cancel_req``, ``_accepted_cx``. Upstream: a
    primitive conversion that validates once.
  - accepted sockets get TCP_NODELAY and a send timeout
    (:func:`tune_accepted_socket`). Upstream: a socket-options hook on
    ``AssociationServer`` (today only ``get_request`` can be overridden).

  TLS sockets keep pynetdicom's own blocking PDU read (with the network
  timeout on the socket); they get the event-driven waits, and the message
  progress rule is kept by the association's thread, which shuts the socket
  down under a read past its allowance (and under the read of a request that
  did not arrive within the ACSE timeout). Upstream for this too: a
  non-blocking transport.

:func:`check` runs before the server starts: a pynetdicom whose internals
moved stops sortscp with one line naming what is missing, never a feature that
silently vanished. The pin in ``pyproject.toml`` (``pynetdicom>=3.0,<3.1``)
keeps installs on the tested minor version.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom import AE, _config, dimse_messages, evt, fsm
from pynetdicom import _handlers as _pyn_handlers
from pynetdicom import acse as _acse
from pynetdicom import presentation as _presentation
from pynetdicom import sop_class as _sop_class
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import _MESSAGE_TYPES, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.timer import Timer

from scp.errors import SortscpError
from scp.log import safe
from scp.net.status import HANDLER_FAILED

log = logging.getLogger(__name__)

#: The pynetdicom minor version these internals were written and tested against.
TESTED_VERSION = "3.0"


class PynetdicomMismatch(SortscpError):
    """The installed pynetdicom lacks an internal sortscp relies on."""


def _source_mentions(func: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.getsource(func)
    except (OSError, TypeError):
        return False


#: (what, test) for each internal used below.
_INTERNALS: list[tuple[str, Callable[[], bool]]] = [
    ("_config.UNRESTRICTED_STORAGE_SERVICE", lambda: hasattr(_config, "UNRESTRICTED_STORAGE_SERVICE")),
    ("_config.STORE_RECV_CHUNKED_DATASET", lambda: hasattr(_config, "STORE_RECV_CHUNKED_DATASET")),
    ("_config.LOG_HANDLER_LEVEL", lambda: hasattr(_config, "LOG_HANDLER_LEVEL")),
    ("DIMSEMessage.decode_msg", lambda: callable(getattr(DIMSEMessage, "decode_msg", None))),
    ("dimse_messages._MESSAGE_TYPES", lambda: isinstance(getattr(dimse_messages, "_MESSAGE_TYPES", None), dict)),
    ("dimse_messages.C_STORE_RQ", lambda: isinstance(getattr(dimse_messages, "C_STORE_RQ", None), type)),
    ("DIMSEMessage.encoded_command_set", lambda: _source_mentions(DIMSEMessage.__init__, "encoded_command_set")),
    ("Association._accepted_cx", lambda: _source_mentions(Association, "self._accepted_cx")),
    ("DULServiceProvider.event_queue", lambda: _source_mentions(DULServiceProvider, "self.event_queue")),
    (
        "DIMSEMessage._data_set_file",
        lambda: _source_mentions(DIMSEMessage.__init__, "_data_set_file"),
    ),
    ("DULServiceProvider.assoc", lambda: isinstance(getattr(DULServiceProvider, "assoc", None), property)),
    ("ACSE.send_reject", lambda: callable(getattr(ACSE, "send_reject", None))),
    ("acse.negotiate_unrestricted", lambda: callable(getattr(_acse, "negotiate_unrestricted", None))),
    ("presentation.negotiate_as_acceptor",
     lambda: callable(getattr(_presentation, "negotiate_as_acceptor", None))),
    ("presentation.SCP_SCU_ROLES", lambda: isinstance(getattr(_presentation, "SCP_SCU_ROLES", None), dict)),
    ("sop_class._STORAGE_CLASSES", lambda: isinstance(getattr(_sop_class, "_STORAGE_CLASSES", None), dict)),
    ("Association.kill", lambda: callable(getattr(Association, "kill", None))),
    ("AE._servers", lambda: _source_mentions(AE.__init__, "_servers")),
    ("AE.make_server(server_class=)", lambda: "server_class" in inspect.signature(AE.make_server).parameters),
    ("evt.EVT_REJECTED", lambda: hasattr(evt, "EVT_REJECTED")),
]


def check() -> None:
    """Raise :class:`PynetdicomMismatch` naming the first missing internal.

    >>> check()  # the installed pynetdicom has them all
    """
    for what, present in _INTERNALS:
        try:
            ok = present()
        except Exception:
            ok = False
        if not ok:
            raise PynetdicomMismatch(
                f"pynetdicom {pynetdicom.__version__} lacks {what}, which sortscp uses; "
                f"sortscp was tested with pynetdicom {TESTED_VERSION}.x "
                f"(install 'pynetdicom>={TESTED_VERSION},<3.1')"
            )


def configure_storage() -> None:
    """Accept every storage SOP class; stream datasets to a file as they arrive.

    pynetdicom's standard log handlers (``_config.LOG_HANDLER_LEVEL``, bound
    to every association) format INFO and DEBUG lines for each PDU and DIMSE
    message (~0.3 ms a C-STORE); they are bound only if the ``pynetdicom``
    logger shows INFO (``--log-level DEBUG``), else nothing they write is seen.
    """
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _acse.negotiate_unrestricted = _negotiate_storage  # type: ignore[attr-defined]
    _config.STORE_RECV_CHUNKED_DATASET = True
    shown = logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
    _config.LOG_HANDLER_LEVEL = "standard" if shown else "none"


#: The standard UID root: a UID outside it is private (a vendor's own SOP class).
_DICOM_ROOT = "1.2.840.10008."
#: A storage SOP class's name in the UID dictionary: "... Storage", "... Storage
#: - For Presentation", "... Storage - Trial", "Stored Print Storage SOP Class".
_STORAGE_NAME = re.compile(r".*\bStorage( - For \w+)?( - Trial)?( SOP Class)?")
#: Not storage though named so (DICOMDIR's class, in File Meta only) or newer
#: than pydicom's dictionary (Storage Management, an N-ACTION service).
_NOT_STORAGE = frozenset({"1.2.840.10008.1.3.10", "1.2.840.10008.5.1.4.2"})
_STORAGE_UIDS = frozenset(getattr(_sop_class, "_STORAGE_CLASSES", {}).values())  # (checked by check())


def is_storage_class(uid: str) -> bool:
    """Whether sortscp accepts presentation contexts of abstract syntax `uid`
    to receive C-STOREs: a private UID (a vendor's class), a storage SOP class
    pynetdicom or pydicom knows, or a standard UID neither knows (one newer than
    them). Not: Verification (accepted on its own), query/retrieve, worklist,
    MPPS, commitment, print and the other non-storage services.

    >>> is_storage_class("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    True
    >>> is_storage_class("1.2.840.10008.5.1.4.38.1")  # Hanging Protocol Storage
    True
    >>> is_storage_class("1.2.840.10008.5.1.4.31")  # Modality Worklist FIND
    False
    >>> is_storage_class("1.2.840.113619.4.27")  # a vendor's private class
    True
    """
    uid = str(uid).rstrip("\0 ")
    if uid in _NOT_STORAGE:
        return False
    if not uid.startswith(_DICOM_ROOT) or uid in _STORAGE_UIDS:
        return True
    known = UID(uid)
    if not known.name or known.name == uid:  # unknown, or a retired class pydicom has no name for
        return True
    return known.type == "SOP Class" and _STORAGE_NAME.fullmatch(known.name) is not None


def _negotiate_storage(rq_contexts: list, ac_contexts: list, roles: dict | None = None) -> tuple[list, list]:
    """What ``negotiate_unrestricted`` does, with :func:`is_storage_class` as
    its rule: each context of a storage class is accepted with the transfer
    syntax proposed first (the dataset is stored as received), its SCP/SCU
    role selection answered; the others are negotiated against the AE's
    supported contexts (Verification), so they are refused: abstract syntax
    not supported."""
    roles = roles or {}
    storage = [is_storage_class(cx.abstract_syntax) for cx in rq_contexts]
    other = [cx for cx, ok in zip(rq_contexts, storage) if not ok]
    result, _ = _presentation.negotiate_as_acceptor(other, ac_contexts, roles)
    reply_roles = {}
    for rcx in (cx for cx, ok in zip(rq_contexts, storage) if ok):
        cx = _presentation.PresentationContext()
        cx.context_id = rcx.context_id
        cx.abstract_syntax = rcx.abstract_syntax
        cx.transfer_syntax = [rcx.transfer_syntax[0]]
        cx.result = 0x00
        cx._as_scu = cx._as_scp = True
        asked = roles.get(rcx.abstract_syntax)
        if asked is not None:
            role = SCP_SCU_RoleSelectionNegotiation()
            role.sop_class_uid = rcx.abstract_syntax
            outcome = _presentation.SCP_SCU_ROLES[asked][(True, True)]
            cx._as_scu, cx._as_scp = outcome[2], outcome[3]
            role.scu_role, role.scp_role = bool(asked[0]), bool(asked[1])  # (never 1 where 0 was asked)
            reply_roles[rcx.abstract_syntax] = role
        result.append(cx)
    # the roles of the refused (non-storage) contexts: none, they are refused
    return sorted(result, key=lambda cx: cx.context_id), sorted(reply_roles.values(), key=lambda r: r.sop_class_uid)


# --- receiving DIMSE messages ---------------------------------------------------

#: Largest command set accepted (real ones are a few hundred bytes).
MAX_COMMAND_BYTES = 64 * 1024
#: Largest dataset of a message other than C-STORE held in memory (C-ECHO has
#: none; sortscp serves nothing else).
MAX_OTHER_DATASET_BYTES = 1 << 20

#: A C-STORE dataset may come in this many fragments before they must average
#: :data:`MIN_FRAGMENT_AVERAGE` bytes: a peer that sends a few bytes per PDV makes
#: the network thread work per fragment, not per byte (eight such peers slowed
#: a normal sender tenfold); real senders fill their PDUs (DCMTK's smallest: 4 KiB).
SMALL_FRAGMENTS_ALLOWED = 1024
MIN_FRAGMENT_AVERAGE = 256

#: Called as ``open_dataset(command_set, transfer_syntax, calling_aet)`` from
#: the network thread once a C-STORE-RQ command set is complete; returns the
#: sink (``write``/``finish``/``abandon``/``close``/``name``) of its dataset.
_open_dataset: Callable[[Dataset, str, str], Any] | None = None


def install_receiver(open_dataset: Callable[[Dataset, str, str], Any]) -> None:
    """Decode incoming P-DATA with :func:`_decode_msg`, giving every C-STORE
    dataset to a sink made by `open_dataset`."""
    global _open_dataset
    _open_dataset = open_dataset
    DIMSEMessage.decode_msg = _decode_msg  # type: ignore[method-assign]


def uninstall_receiver() -> None:
    """Undo :func:`install_receiver` (pynetdicom's own decoding again)."""
    global _open_dataset
    _open_dataset = None
    DIMSEMessage.decode_msg = _ORIGINAL_DECODE_MSG  # type: ignore[method-assign]


_ORIGINAL_DECODE_MSG = DIMSEMessage.decode_msg


def _peer(assoc: Any) -> str:
    try:
        return f"{assoc.requestor.ae_title} ({assoc.requestor.address}:{assoc.requestor.port})"
    except AttributeError:
        return "?"


def _protocol_error(msg: DIMSEMessage, assoc: Any, why: str) -> bool:
    """Abort the association over a DIMSE protocol violation (what pynetdicom
    does for an undecodable message), dropping any dataset in progress."""
    sink = msg._data_set_file
    if sink is not None and hasattr(sink, "abandon"):
        sink.abandon(why)
    _reset(msg)
    log.warning("aborting the association with %s: %s", safe(_peer(assoc)), why,
                   extra={"event": "protocol_error", "reason": why})
    if assoc is not None:
        assoc._sortscp_aborting = True  # (nothing more is sent on it: see _dimse_send_msg)
        assoc.dul.event_queue.put("Evt19")
    return False


def _reset(msg: DIMSEMessage) -> None:
    msg.__class__ = DIMSEMessage
    DIMSEMessage.__init__(msg)


def _decode_msg(self: DIMSEMessage, primitive: P_DATA, assoc: Any = None) -> bool:
    """``DIMSEMessage.decode_msg``, with C-STORE datasets sent to our sink.

    Returns True once the message is complete, as pynetdicom's does."""
    if primitive.__class__ is not P_DATA:
        return False
    sink: Any
    pdvs = primitive.presentation_data_value_list
    try:
        for i, (context_id, data) in enumerate(pdvs):
            more = i + 1 < len(pdvs)
            control = data[0]
            if control & 1:  # a command fragment
                if self.context_id is not None:
                    # A command set is complete and its dataset is not: a new
                    # command now is a protocol violation (as DCMTK's "unexpected
                    # PDV"). Aborted: the sender hears, and may send both again.
                    return _protocol_error(self, assoc, _COMMAND_IN_DATASET)
                self.encoded_command_set.write(data[1:])
                if self.encoded_command_set.tell() > MAX_COMMAND_BYTES:
                    return _protocol_error(self, assoc, f"a command set longer than {MAX_COMMAND_BYTES} bytes")
                if not control & 2:
                    continue
                self.context_id = context_id
                lean = None
                if _open_dataset is not None and assoc is not None:
                    lean = StoreCommand.read(self.encoded_command_set.getvalue())
                # (a StoreCommand stands in for the Dataset on our path only: _as_pynetdicom_message)
                self.command_set = lean or decode(self.encoded_command_set, True, True)  # type: ignore[assignment]
                self.__class__ = _MESSAGE_TYPES[self.command_set.CommandField][1]
                if self.command_set.CommandDataSetType == 0x0101:
                    if more:
                        return _protocol_error(self, assoc, _SECOND_MESSAGE)
                    return True  # no dataset follows
                if isinstance(self, C_STORE_RQ) and _open_dataset is not None and assoc is not None:
                    cx = assoc._accepted_cx.get(context_id)
                    if cx is None:
                        return _protocol_error(
                            self, assoc, f"a C-STORE on presentation context {context_id}, which was not accepted"
                        )
                    missing = [k for k in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID")
                               if self.command_set.get(k) in (None, "")]
                    if missing:  # pynetdicom would never answer it (not a valid request)
                        return _protocol_error(
                            self, assoc, f"a C-STORE request without {', '.join(missing)}"
                        )
                    sink = _open_dataset(self.command_set, cx.transfer_syntax[0], assoc.requestor.ae_title)
                    self._data_set_file = sink
                    self._data_set_path = Path(sink.name)
            else:  # a dataset fragment
                if self.context_id is None:
                    return _protocol_error(self, assoc, "a dataset fragment with no command before it")
                if context_id != self.context_id:
                    return _protocol_error(
                        self, assoc,
                        f"a dataset fragment on presentation context {context_id}, "
                        f"its command's is {self.context_id}",
                    )
                sink = self._data_set_file
                if sink is not None:
                    sink.write(memoryview(data)[1:])
                    pieces = getattr(sink, "fragments", 0)
                    if pieces > SMALL_FRAGMENTS_ALLOWED and sink.received < pieces * MIN_FRAGMENT_AVERAGE:
                        return _protocol_error(
                            self, assoc, f"a dataset sent in {pieces} fragments of "
                            f"{sink.received // pieces} bytes on average (each costs as much to take as a "
                            f"full one; at least {MIN_FRAGMENT_AVERAGE} are expected)",
                        )
                else:
                    buffer = self.data_set
                    assert buffer is not None
                    buffer.write(data[1:])
                    if buffer.tell() > MAX_OTHER_DATASET_BYTES:
                        return _protocol_error(
                            self, assoc, f"a dataset longer than {MAX_OTHER_DATASET_BYTES} bytes in a "
                            f"{type(self).__name__.replace('_', '-')}",
                        )
                if control & 2:  # the last fragment
                    if more:
                        return _protocol_error(self, assoc, _SECOND_MESSAGE)
                    if sink is not None:
                        sink.finish()
                        if _queue_store(self, assoc, sink):
                            return False  # queued for the association reactor
                    return True
    except Exception as exc:  # an undecodable command set, an unknown command field...
        return _protocol_error(self, assoc, f"an invalid DIMSE message ({type(exc).__name__}: {exc})")
    return False


#: Why a P-DATA-TF that goes on past the end of a message is refused.
_SECOND_MESSAGE = (
    "a P-DATA-TF went on past the end of a message, before its answer "
    "(one operation at a time was negotiated)"
)


#: Why a command fragment in the middle of a dataset is refused.
_COMMAND_IN_DATASET = "a new command began before the last fragment of the dataset in progress"


def current_association() -> Association | None:
    """The association whose network thread is calling (None elsewhere)."""
    return getattr(threading.current_thread(), "assoc", None)



def partial_dataset_file(assoc: Association) -> Any | None:
    """The file of a dataset still arriving on `assoc`, if any."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    return getattr(message, "_data_set_file", None)


def reject(assoc: Association, result: int, source: int, reason: int) -> None:
    """Reject `assoc` from an ``EVT_REQUESTED`` handler with A-ASSOCIATE-RJ
    (what pynetdicom itself does: the RJ is sent only once the association is
    killed)."""
    assoc.acse.send_reject(result, source, reason)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def register_server(ae: AE, server: Any) -> None:
    """Let ``ae.shutdown()`` stop `server` (``server.shutdown()`` removes it)."""
    ae._servers.append(server)


def dataset_sink(request: Any) -> Any | None:
    """The file object a C-STORE request's dataset was streamed into (None: the
    request carried no dataset)."""
    return getattr(request, "_dataset_file", None)


# =====================================================================================
# Event-driven network threads (see the module docstring): install_network_threads()
# =====================================================================================


#: Longest wait of either reactor without an event (seconds): how late anything not
#: woken explicitly (a timer, a deadline) is noticed.
SAFETY_TIMEOUT = 0.05
#: Bytes a P-DATA-TF may exceed our maximum PDU length by (a peer's rounding).
PDATA_SLACK = 1024
#: Our maximum PDU length for ``--max-pdu 0`` ("unlimited"): announced as such
#: (a sender told 0 puts a whole 100 MB instance in one PDU, which would then be
#: held in memory or aborted), and the bound on a P-DATA-TF should a maximum
#: of 0 be in force all the same.
UNLIMITED_PDATA_LIMIT = 64 << 20
#: Bound on every other PDU (A-ASSOCIATE-RQ/AC/RJ, A-RELEASE, A-ABORT).
OTHER_PDU_LIMIT = 1 << 20
#: The buffer a PDU is first read into; a longer one doubles it as its bytes
#: arrive (a default 1 MiB P-DATA-TF fits at once).
FIRST_PDU_BUFFER = (1 << 20) + PDATA_SLACK + 6
#: A DIMSE message still arriving must average at least this many bytes per second
#: after its first ``dimse_timeout`` seconds (see :func:`message_allowance`).
MIN_RATE = 64 << 10

_HEADER = struct.Struct(">BBL")
_PDU_TYPES = frozenset(range(1, 8))
#: State machine events raised by a primitive of the local user (to_provider_queue).
_LOCAL_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})
#: State machine events raised by a PDU from the peer.
_PDU_EVENTS = frozenset({"Evt3", "Evt4", "Evt6", "Evt10", "Evt12", "Evt13", "Evt16"})

_INTERNALS.extend([
    ("DULServiceProvider.run_reactor", lambda: callable(getattr(DULServiceProvider, "run_reactor", None))),
    ("DULServiceProvider.kill_dul", lambda: callable(getattr(DULServiceProvider, "kill_dul", None))),
    ("DULServiceProvider.stop_dul", lambda: callable(getattr(DULServiceProvider, "stop_dul", None))),
    ("DULServiceProvider._process_recv_primitive",
     lambda: callable(getattr(DULServiceProvider, "_process_recv_primitive", None))),
    ("DULServiceProvider._is_transport_event",
     lambda: callable(getattr(DULServiceProvider, "_is_transport_event", None))),
    ("DULServiceProvider._decode_pdu", lambda: callable(getattr(DULServiceProvider, "_decode_pdu", None))),
    ("DULServiceProvider.idle_timer_expired",
     lambda: callable(getattr(DULServiceProvider, "idle_timer_expired", None))),
    *[
        (f"DULServiceProvider.{name}", lambda name=name: _source_mentions(DULServiceProvider.__init__, name))
        for name in ("event_queue", "to_provider_queue", "to_user_queue", "_recv_pdu", "artim_timer",
                     "_idle_timer", "_kill_thread", "state_machine")
    ],
    *[
        (f"Association.{name}", lambda name=name: callable(getattr(Association, name, None)))
        for name in ("_run_reactor", "_serve_request", "abort")
    ],
    *[
        (f"Association.{name}", lambda name=name: _source_mentions(_original(Association, "__init__"), name))
        for name in ("_is_paused", "_reactor_checkpoint", "_dul_ready", "_kill")
    ],
    ("DIMSEServiceProvider.msg_queue", lambda: _source_mentions(DIMSEServiceProvider.__init__, "msg_queue")),
    ("DIMSEServiceProvider.message", lambda: _source_mentions(DIMSEServiceProvider.__init__, "self.message")),
    ("DIMSEServiceProvider.get_msg", lambda: callable(getattr(DIMSEServiceProvider, "get_msg", None))),
    ("ACSE.is_release_requested", lambda: callable(getattr(ACSE, "is_release_requested", None))),
    ("ACSE.is_aborted", lambda: callable(getattr(ACSE, "is_aborted", None))),
    ("ACSE.send_release", lambda: callable(getattr(ACSE, "send_release", None))),
    ("Timer._start_time/_end_time", lambda: _source_mentions(Timer.__init__, "_end_time")),
    ("Timer.remaining", lambda: isinstance(getattr(Timer, "remaining", None), property)),
    ("fsm.InvalidEventError", lambda: isinstance(getattr(fsm, "InvalidEventError", None), type)),
])


def tune_accepted_socket(sock: socket.socket, send_timeout: float | None,
                         bufsize: int | None = None) -> None:
    """Options of an accepted (plain TCP) socket: TCP_NODELAY (else a sender that
    waits for each response can stall ~40 ms per message on delayed ACKs), a kernel
    send timeout of `send_timeout` seconds (a peer that stops reading cannot block
    our sends for ever: the socket itself stays blocking with no Python timeout, which
    the event-driven read needs) and, if given, SO_RCVBUF/SO_SNDBUF of `bufsize`.
    Errors are ignored (not every socket is TCP)."""
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    if send_timeout:
        seconds = int(send_timeout)
        timeval = struct.pack("ll", seconds, int((send_timeout - seconds) * 1e6))
        options.append((socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval))  # type: ignore[arg-type]
    if bufsize:
        options += [(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize),
                    (socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)]
    for level, name, value in options:
        try:
            sock.setsockopt(level, name, value)
        except (OSError, AttributeError):
            pass


def pdu_limit(dul: DULServiceProvider, pdu_type: int) -> int:
    """Longest PDU (its declared length, after the 6-byte header) we read."""
    if pdu_type != 0x04:
        return OTHER_PDU_LIMIT
    assoc = dul.assoc
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    ours = local.maximum_length
    if not ours:
        return UNLIMITED_PDATA_LIMIT
    return int(ours) + PDATA_SLACK


def message_allowance(grace: float | None, received: int) -> float | None:
    """Seconds a DIMSE message may take from its first byte, having brought
    `received` bytes so far: `grace` (the DIMSE timeout) plus one second per
    :data:`MIN_RATE` bytes. None: no limit.

    >>> message_allowance(3.0, 0), message_allowance(3.0, 10 * MIN_RATE)
    (3.0, 13.0)
    """
    if grace is None:
        return None
    return grace + received / MIN_RATE


class _WakingQueue(queue.Queue):
    """A queue that calls `notify` after every put."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


def _adopt(old: queue.Queue, notify: Callable[[], None]) -> _WakingQueue:
    new = _WakingQueue(notify)
    new.queue.extend(old.queue)  # empty at __init__, kept for safety
    return new


class _WakePipe:
    """A socket pair one thread waits on (in ``select``, with ``waiting`` set)
    and another writes a byte to in order to wake it; the write releases the GIL."""

    __slots__ = ("rsock", "waiting", "wsock")

    def __init__(self) -> None:
        self.rsock, self.wsock = socket.socketpair()
        self.rsock.setblocking(False)
        self.wsock.setblocking(False)
        self.waiting = False

    def notify(self) -> None:
        if self.waiting:
            try:
                self.wsock.send(b"\0")
            except OSError:  # full (already woken) or closed (waiter gone)
                pass

    def drain(self) -> None:
        try:
            while self.rsock.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        for s in (self.rsock, self.wsock):
            try:
                s.close()
            except OSError:
                pass


class _NetState:
    """Per-DUL state of the event-driven reactor."""

    __slots__ = ("buf", "dead", "eof", "fallback", "header", "hn", "hview", "msg_bytes", "msg_start",
                 "n", "pipe", "readable", "stopped", "total", "view")

    def __init__(self) -> None:
        self.pipe = _WakePipe()  # the reactor's wake-up, beside the peer's socket
        self.readable = False  # the socket is (probably) readable now
        self.eof = False  # the peer closed (or the socket broke): select it no more
        self.dead = False  # refused: read nothing more, close in Sta13
        self.header = bytearray(6)
        self.hview = memoryview(self.header)
        self.hn = 0
        self.buf: bytearray | None = None
        self.view: memoryview | None = None
        self.n = 0
        self.total = 0  # the current PDU's length, header included (`buf` may be shorter yet)
        self.stopped = False
        self.fallback: bool | None = None  # TLS / timeout socket: pynetdicom's own read
        self.msg_start: float | None = None  # first byte of the message still arriving
        self.msg_bytes = 0

    def wake(self) -> None:
        self.pipe.notify()

    def close(self) -> None:
        self.pipe.close()


def wait_readable(objs: list[Any], timeout: float) -> list[Any]:
    """Those of `objs` (sockets) readable within `timeout` seconds (or closed,
    or in error: a read finds out): ``select.select``, for descriptors of any
    number (``select`` refuses 1024 and over, which a busy server reaches)."""
    poller = select.poll()
    by_fd = {}
    for obj in objs:
        fd = obj.fileno()
        by_fd[fd] = obj
        poller.register(fd, select.POLLIN | select.POLLPRI)
    return [by_fd[fd] for fd, _ in poller.poll(max(0.0, timeout) * 1000)]


class _Waker:
    """What the association's reactor waits on: an Event whose ``set`` wakes the
    waiter through a socket pair. The write releases the GIL, so a woken
    reactor that the kernel runs at once (on a busy 2-core machine, in place of
    the DUL thread that received the message) takes the GIL and goes on; with a
    ``threading.Event`` it found the GIL held by the thread it preempted, and
    both waited for the scheduler (a third of the DUL thread's time in
    ``Event.set`` when measured). The sockets exist while the reactor runs."""

    __slots__ = ("flag", "pipe")

    def __init__(self) -> None:
        self.flag = False
        self.pipe: _WakePipe | None = None

    def open(self) -> None:
        if self.pipe is None:
            self.pipe = _WakePipe()

    def set(self) -> None:
        self.flag = True
        pipe = self.pipe
        if pipe is not None:  # (flag, then waiting: see wait)
            pipe.notify()

    def wait(self, timeout: float) -> None:
        pipe = self.pipe
        if pipe is None:
            return
        pipe.waiting = True  # (waiting, then flag: a set() in between is seen by one of us)
        try:
            if not self.flag:
                wait_readable([pipe.rsock], timeout)
        finally:
            pipe.waiting = False
        pipe.drain()

    def clear(self) -> None:
        self.flag = False

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()


class _PollingWaker:
    """A :class:`_Waker` without descriptors, for an association started when
    there are none left (EMFILE): it polls every millisecond, as pynetdicom's
    own reactor does."""

    __slots__ = ("flag",)

    def __init__(self) -> None:
        self.flag = False

    def open(self) -> None:
        pass

    def set(self) -> None:
        self.flag = True

    def wait(self, timeout: float) -> None:
        if not self.flag:
            time.sleep(min(timeout, 0.001))

    def clear(self) -> None:
        self.flag = False

    def close(self) -> None:
        pass


def _wake_dul(dul: Any) -> None:
    state = getattr(dul, "_sortscp_net", None)
    if state is not None:
        state.wake()


def _wake_assoc(assoc: Any) -> None:
    wake = getattr(assoc, "_sortscp_wake", None)
    if wake is not None:
        wake.set()


_ORIGINALS: dict[tuple[type, str], Any] = {}


def _original(owner: type, name: str) -> Any:
    return _ORIGINALS.get((owner, name)) or owner.__dict__[name]


def _fallback(exc: OSError) -> None:
    log.warning("%s: serving an association with polling reactors",
                exc.strerror or exc, extra={"event": "reactor_fallback"})


def _assoc_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _original(Association, "__init__")(self, *args, **kwargs)
    dul = self.dul
    try:
        state = _NetState()
    except OSError as exc:  # out of descriptors (EMFILE): this one's network thread is
        # pynetdicom's own polling reactor and its association's polls (the thread died here)
        _fallback(exc)
        return
    wake = _Waker()
    self._sortscp_wake = wake
    dul._sortscp_net = state
    dul.to_provider_queue = _adopt(dul.to_provider_queue, state.wake)
    dul.event_queue = _adopt(dul.event_queue, state.wake)
    dul.to_user_queue = _adopt(dul.to_user_queue, wake.set)
    self.dimse.msg_queue = _adopt(self.dimse.msg_queue, wake.set)


def _who(dul: Any) -> str:
    """'AE' (address:port) of the peer, for a log line."""
    try:
        peer = dul.assoc.requestor if dul.assoc.is_acceptor else dul.assoc.acceptor
        title = str(peer.ae_title or getattr(peer.primitive, "calling_ae_title", "") or "").strip()
        where = f"{peer.address}:{peer.port}"
        return f"{safe(title)!r} ({where})" if title else where
    except Exception:  # a log line must never fail
        return "a peer"


def _refuse(dul: Any, state: _NetState, why: str, event: str) -> bool:
    """Abort the association now (A-ABORT, connection closed): one log line."""
    log.warning("aborting the association with %s: %s", _who(dul), why,
                extra={"event": event, "reason": why})
    state.dead = True
    state.readable = False
    state.buf = state.view = None
    state.msg_start = None
    dul.event_queue.put("Evt19")
    return True


def _lost(dul: Any, state: _NetState, why: str | None) -> bool:
    if why:
        log.debug("%s: %s", _who(dul), why)
    state.eof = True
    state.readable = False
    state.buf = state.view = None
    dul.event_queue.put("Evt17")
    return True


def _read_some(dul: Any, state: _NetState, sock: socket.socket) -> bool:
    """Read what is available of the current PDU without blocking.

    Queues at most one PDU's event (as pynetdicom's reactor does, one per loop).
    Returns True if anything was read (or an event was queued)."""
    got = False
    flags = socket.MSG_DONTWAIT
    if state.buf is None:
        while state.hn < 6:
            try:
                n = sock.recv_into(state.hview[state.hn:], 6 - state.hn, flags)
            except (BlockingIOError, InterruptedError):
                state.readable = False
                return got
            except OSError as exc:
                # EBADF: closed here (abort, shutdown); anything else: by the network.
                return _lost(dul, state, f"connection lost: {exc}")
            if n == 0:
                return _lost(dul, state, "connection closed in a PDU header" if state.hn else None)
            if state.msg_start is None:
                state.msg_start = time.monotonic()
            state.msg_bytes += n
            got = True
            state.hn += n
        state.hn = 0
        pdu_type, _, length = _HEADER.unpack(state.header)
        if pdu_type not in _PDU_TYPES:
            return _refuse(dul, state, f"unknown PDU type 0x{pdu_type:02X}", "bad_pdu")
        limit = pdu_limit(dul, pdu_type)
        if length > limit:
            return _refuse(dul, state, f"it announced a PDU (type 0x{pdu_type:02X}) of {length} bytes, "
                                       f"more than the {limit} we accept", "pdu_too_large")
        # Memory follows the bytes that came, not the length a header announced
        # (up to 64 MiB with --max-pdu 0): the buffer doubles as it fills.
        state.total = 6 + length
        state.buf = bytearray(min(state.total, FIRST_PDU_BUFFER))
        state.buf[:6] = state.header
        state.view = memoryview(state.buf)
        state.n = 6
    buf, view = state.buf, state.view
    assert view is not None
    total = state.total
    while state.n < total:
        if state.n == len(buf):
            view.release()
            buf.extend(bytes(min(total - len(buf), len(buf))))
            view = state.view = memoryview(buf)
        try:
            n = sock.recv_into(view[state.n:], len(buf) - state.n, flags)
        except (BlockingIOError, InterruptedError):
            state.readable = False
            return got
        except OSError as exc:
            return _lost(dul, state, f"connection lost in a PDU: {exc}")
        if n == 0:
            return _lost(dul, state, f"connection closed in a PDU ({state.n} of {total} bytes)")
        state.msg_bytes += n
        got = True
        state.n += n
    view.release()
    state.buf = state.view = None
    try:
        pdu, event = dul._decode_pdu(buf)
    except Exception as exc:
        return _refuse(dul, state, f"a PDU that cannot be decoded ({type(exc).__name__}: {safe(exc)})", "bad_pdu")
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)
    return True


def _raw_socket(dul: Any) -> socket.socket | None:
    asock = dul.socket
    if asock is None or asock.socket is None or not asock._is_connected:
        return None
    return asock.socket


def _uses_fallback(state: _NetState, sock: socket.socket) -> bool:
    if state.fallback is None:
        import ssl

        state.fallback = isinstance(sock, ssl.SSLSocket) or sock.gettimeout() is not None
    return state.fallback


def _transport_event(dul: Any, state: _NetState) -> bool:
    """The event-driven ``_is_transport_event``."""
    sock = _raw_socket(dul)
    if sock is not None and _uses_fallback(state, sock):
        if state.msg_start is None and dul.socket.ready:
            state.msg_start = time.monotonic()
        got = bool(_original(DULServiceProvider, "_is_transport_event")(dul))
        if got:
            try:
                state.msg_bytes += len(dul._recv_pdu.queue[-1])
            except (IndexError, TypeError):
                pass
        return got
    if dul.state_machine.current_state == "Sta13":
        # As pynetdicom: read what is still pending, close once nothing is.
        if sock is not None and not (state.eof or state.dead) and _read_some(dul, state, sock):
            return True
        if dul.socket is not None:
            dul.socket.close()
        return True
    if sock is None or state.eof or state.dead or not state.readable:
        return False
    return _read_some(dul, state, sock)


def _dul_wait(dul: Any, state: _NetState) -> None:
    timeout = SAFETY_TIMEOUT
    artim = dul.artim_timer
    if artim.timeout is not None and artim._start_time is not None and artim._end_time is None:
        timeout = max(0.0, min(timeout, artim.remaining))
    sock = _raw_socket(dul)
    pipe = state.pipe
    rlist: list[Any] = [pipe.rsock]
    if sock is not None and not (state.eof or state.dead):
        if state.fallback:
            pending = getattr(sock, "pending", None)
            if pending is not None and pending():
                return
        elif state.readable:
            return
        rlist.append(sock)
    pipe.waiting = True
    try:
        if dul._kill_thread or dul.to_provider_queue.qsize() or dul.event_queue.qsize():
            return
        try:
            ready = wait_readable(rlist, timeout)
        except (OSError, ValueError):
            # The socket was closed under us: let the next read find out.
            ready = []
            state.readable = True
    finally:
        pipe.waiting = False
    if pipe.rsock in ready:
        pipe.drain()
    if sock is not None and sock in ready:
        state.readable = True


def _check_progress(dul: Any, state: _NetState) -> None:
    """Abort an association whose DIMSE message (or PDU) stopped progressing."""
    if state.msg_start is None or state.dead or not dul.assoc.is_established:
        return
    allowance = message_allowance(dul.assoc.dimse_timeout, state.msg_bytes)
    if allowance is None:
        return
    took = time.monotonic() - state.msg_start
    if took > allowance:
        _refuse(dul, state, f"a DIMSE message still incomplete after {took:.1f} s ({state.msg_bytes} bytes; "
                            f"allowed: --dimse-timeout plus 1 s per {MIN_RATE >> 10} KiB)", "too_slow")


def _watch_blocking_read(dul: Any, state: _NetState) -> None:
    """For a socket read with pynetdicom's own blocking read (TLS), called from the
    association's thread: a message past its allowance gets its socket shut down,
    which ends the read the DUL is blocked in (the DUL then sees the connection
    closed: A-P-ABORT, EVT_CONN_CLOSE)."""
    start = state.msg_start
    if start is None or not dul.assoc.is_established:
        return
    allowance = message_allowance(dul.assoc.dimse_timeout, state.msg_bytes)
    took = time.monotonic() - start
    if allowance is None or took <= allowance:
        return
    why = (f"a DIMSE message still incomplete after {took:.1f} s ({state.msg_bytes} bytes; "
           f"allowed: --dimse-timeout plus 1 s per {MIN_RATE >> 10} KiB)")
    log.warning("aborting the association with %s: %s", _who(dul), why,
                extra={"event": "too_slow", "reason": why})
    state.dead = True
    _shutdown_raw(dul)


def _shutdown_raw(dul: Any) -> None:
    sock = getattr(dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _after_pdu(dul: Any, state: _NetState, event: str) -> None:
    """A PDU was processed: the message it belonged to may be complete."""
    if event not in _PDU_EVENTS:
        return
    if event == "Evt10" and getattr(dul.assoc.dimse, "message", None) is not None:
        return  # the message goes on
    state.msg_start = None
    state.msg_bytes = 0


def _fail(dul: Any, exc: BaseException) -> None:
    """The network thread met an error it cannot go on from: one log line, an
    A-ABORT to the peer (bypassing the state machine, as pynetdicom does), stop."""
    log.error("network thread of the association with %s failed (%s: %s); aborting it",
              _who(dul), type(exc).__name__, safe(exc), extra={"event": "network_error"})
    abort_pdu = A_ABORT_RQ()
    abort_pdu.source = 0x02
    abort_pdu.reason_diagnostic = 0x00
    assoc = dul.assoc
    assoc.is_aborted = True
    assoc.is_established = False
    try:
        if dul.socket is not None:
            dul.socket.send(abort_pdu.encode())
            dul.socket.close()
        # What pynetdicom's own connection-closed actions do (AA-4): so that the
        # EVT_CONN_CLOSE handlers (the association's log line, the removal of a
        # partial dataset) run for this association too.
        remote = assoc.acceptor if assoc.is_requestor else assoc.requestor
        evt.trigger(assoc, evt.EVT_CONN_CLOSE, {"address": remote.address_info.as_tuple})
    except Exception:
        pass
    assoc._kill = True
    dul._kill_thread = True


def _dul_run_reactor(self: Any) -> None:
    """``DULServiceProvider.run_reactor``, waiting on events instead of sleeping."""
    state = getattr(self, "_sortscp_net", None)
    if state is None:
        return _original(DULServiceProvider, "run_reactor")(self)  # type: ignore[no-any-return]
    self._idle_timer.start()
    event_queue = self.event_queue
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                event_queue.put("Evt18")
            _check_progress(self, state)
            try:
                if self._process_recv_primitive():
                    pass
                elif _transport_event(self, state):
                    self._idle_timer.restart()
            except Exception as exc:
                _fail(self, exc)
                return None
            try:
                event = event_queue.get(block=False)
            except queue.Empty:
                _dul_wait(self, state)
                continue
            if event == "Evt9" and self.state_machine.current_state == "Sta13":
                # A P-DATA (a C-STORE's response) queued just as the association was
                # aborted: no one to send it to. pynetdicom's state machine would
                # log two ERROR lines for it, which say nothing to an operator.
                log.debug("a P-DATA after the abort of the association with %s: not sent", _who(self))
                try:
                    self.to_provider_queue.get(block=False)
                except queue.Empty:
                    pass
                continue
            try:
                self.state_machine.do_action(event)
            except fsm.InvalidEventError as exc:
                # e.g. Evt15 (a local A-ABORT) in Sta13, when ae.shutdown() aborts an
                # association that is already closing: stock pynetdicom's DUL thread
                # dies on it. Drop the primitive that raised it and go on.
                log.debug("%s; ignored", exc)
                if event in _LOCAL_EVENTS:
                    try:
                        self.to_provider_queue.get(block=False)
                    except queue.Empty:
                        pass
            except Exception as exc:  # an action failed: stock's thread dies with a traceback
                _fail(self, exc)
                return None
            _after_pdu(self, state, event)
    finally:
        state.stopped = True
        state.close()
        state.buf = state.view = None
        assoc = self.assoc
        if assoc.is_acceptor and assoc.requestor.primitive is None and not self.to_user_queue.qsize():
            # Stopped before any A-ASSOCIATE-RQ was delivered: the association thread
            # waits for one for the ACSE timeout, holding a slot; tell it now.
            self.to_user_queue.put(None)
        _wake_assoc(assoc)
    return None


def _dul_kill_dul(self: Any) -> None:
    self._kill_thread = True
    _wake_dul(self)


def _dul_stop_dul(self: Any) -> bool:
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        _wake_dul(self)
        if threading.current_thread() is not self:
            while self.is_alive():
                self.join(0.1)
        return True
    return False


def _assoc_kill(self: Any) -> None:
    self._reactor_checkpoint.set()
    self._kill = True
    self.is_established = False
    self._is_paused = True
    _wake_assoc(self)
    dul = self.dul
    _wake_dul(dul)
    state = getattr(dul, "_sortscp_net", None)
    if (state is not None and state.fallback and self.is_acceptor and self.requestor.primitive is None
            and dul.is_alive() and threading.current_thread() is not dul):
        # No request within the ACSE timeout, the DUL blocked in a TLS read of it:
        # end that read, or this loop waits as long as the peer drips.
        _shutdown_raw(dul)
    while dul.is_alive() and not dul.stop_dul():
        # The DUL is finishing a state (e.g. Sta13); join returns when it stops.
        if threading.current_thread() is not dul:
            dul.join(0.005)
        else:
            time.sleep(0.005)


def _assoc_run_reactor(self: Any) -> None:
    """``Association._run_reactor``, waiting on an Event instead of sleeping 1 ms."""
    wake: _Waker | _PollingWaker | None = getattr(self, "_sortscp_wake", None)
    if wake is not None:
        try:
            wake.open()
        except OSError as exc:  # out of descriptors
            _fallback(exc)
            wake = None
    if wake is None:  # our loop all the same (pynetdicom's knows no StoreRequest), polling
        wake = _PollingWaker()
    try:
        _assoc_reactor_loop(self, wake)
    finally:
        wake.close()


def _assoc_reactor_loop(self: Any, wake: _Waker | _PollingWaker) -> None:
    dul = self.dul
    idle = dul._idle_timer
    self._is_paused = False
    while not self._kill:
        # Paused while waiting: release()/send_*() from another thread need not
        # wait for us; we then stop at the checkpoint they cleared.
        self._is_paused = True
        timeout = SAFETY_TIMEOUT
        if idle.timeout is not None:
            timeout = max(0.0, min(timeout, idle.remaining))
        if not self.dimse.msg_queue.qsize():  # else a set() before our clear() is not lost
            wake.wait(timeout)
        wake.clear()
        self._reactor_checkpoint.wait()
        self._is_paused = False
        # A send_*() of this association's own user (a requestor) clears the
        # checkpoint and then waits until it sees us paused, to take its response
        # itself. Cleared after our wait() returned, but seen paused before the
        # line above: look again, or get_msg() below could take that response.
        if not self._reactor_checkpoint.is_set():
            continue

        context_id, msg = self.dimse.get_msg(block=False)
        if msg.__class__ is StoreRequest:
            _serve_store(self, msg, context_id)
        elif msg:
            self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            # Released before the response goes: woken at once, the DUL may send it
            # and see the connection close (EVT_CONN_CLOSE) before the next line.
            self.is_released = True
            self.acse.send_release(is_response=True)
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return None

        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return None

        state = getattr(dul, "_sortscp_net", None)
        if state is not None and state.fallback and not state.dead:
            _watch_blocking_read(dul, state)
        if state is not None and state.stopped:
            dul.join(1.0)
        if not dul.is_alive():
            self.kill()
            return None

        if dul.idle_timer_expired():
            log.warning("no data from %s for %s s (--network-timeout); aborting the association",
                        _who(dul), self.network_timeout, extra={"event": "network_timeout"})
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return None
    return None


# --- the C-STORE fast path ------------------------------------------------------------
#
# pynetdicom turns every complete DIMSE message into a primitive
# (``message_to_primitive``: ~175 us for a C-STORE-RQ, every UID validated
# again) and serves it through ``Association._serve_request`` and
# ``StorageServiceClass.SCP``, which builds a response primitive (validated
# again) before our handler's status goes out: 250-300 us of one GIL per
# instance on a path a sender waits on. With our network threads, a C-STORE-RQ
# whose dataset went to our sink skips all of it: the DUL thread queues a
# :class:`StoreRequest` carrying the command's values and the sink, the
# association reactor calls the ``EVT_C_STORE`` handler with it (as
# ``StorageServiceClass.SCP`` does, through ``evt.trigger``) and sends the
# response encoded by hand (:func:`store_rsp_command`). The usual path stays
# whenever something else than pynetdicom's debug logger listens to
# ``EVT_DIMSE_RECV`` (it needs the message object this path never builds).
# Upstream: a leaner primitive conversion (validate once, on the wire bytes).

_INTERNALS.extend([
    ("DIMSEServiceProvider.message (reset)", lambda: _source_mentions(
        DIMSEServiceProvider.receive_primitive, "self.message = None")),
    ("Association._sent_release", lambda: _source_mentions(Association, "_sent_release")),
    ("DIMSEServiceProvider.cancel_req", lambda: _source_mentions(DIMSEServiceProvider.__init__, "cancel_req")),
    ("_handlers.standard_dimse_recv_handler",
     lambda: callable(getattr(_pyn_handlers, "standard_dimse_recv_handler", None))),
])

def uid_text(value: Any) -> str:
    """A command's UID as the peer sent it: pydicom splits a value with
    backslashes into several (a list whose ``str`` is its Python repr).

    >>> from pydicom.multival import MultiValue
    >>> uid_text(MultiValue(str, ["1.2", "1.3"])), uid_text("1.2"), uid_text(None)
    ('1.2\\\\1.3', '1.2', '')
    """
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


class StoreCommand:
    """The command set of a plain C-STORE-RQ, read straight from its bytes
    (implicit VR little endian, a handful of elements): what pydicom's decode
    gives for the values this path reads, in ~4 us instead of ~63 us (the
    UIDs converted and validated element by element; far more while the other
    threads want the GIL). :meth:`read` takes only a clean command set (every
    element a known C-STORE-RQ one, in order, of its usual length, text in
    ASCII with one value) and gives None for anything else, which pydicom then
    decodes as before; :func:`_as_pynetdicom_message` turns it into pydicom's
    form where pynetdicom's own path needs the message.
    Upstream: a lean decoder of fixed DIMSE command sets."""

    __slots__ = ("CommandField", "MessageID", "Priority", "CommandDataSetType",
                 "AffectedSOPClassUID", "AffectedSOPInstanceUID")

    #: element number (group 0000) -> how its value reads; anything else: not ours
    _ELEMENTS = {0x0000: "UL", 0x0002: "UI", 0x0100: "US", 0x0110: "US", 0x0700: "US",
                 0x0800: "US", 0x1000: "UI", 0x1030: "AE", 0x1031: "US"}
    _ELEMENT = struct.Struct("<HHL")

    def __init__(self, values: dict[int, Any]) -> None:
        self.CommandField = values[0x0100]
        self.MessageID = values[0x0110]
        self.Priority = values.get(0x0700)
        self.CommandDataSetType = values[0x0800]
        self.AffectedSOPClassUID = values[0x0002]
        self.AffectedSOPInstanceUID = values[0x1000]

    def get(self, keyword: str, default: Any = None) -> Any:
        return getattr(self, keyword, default)

    @classmethod
    def read(cls, raw: bytes) -> StoreCommand | None:
        """The command in `raw`, if it is a clean C-STORE-RQ with a dataset.

        >>> cmd = StoreCommand.read(bytes.fromhex(
        ...     "000000000400000000000000"  # (0000,0000) group length
        ...     "0000020004000000312e3200"  # (0000,0002) SOP class "1.2"
        ...     "00000001020000000100"  # (0000,0100) C-STORE-RQ
        ...     "00001001020000000700"  # (0000,0110) message 7
        ...     "00000008020000000000"  # (0000,0800) a dataset follows
        ...     "0000001004000000312e3300"))  # (0000,1000) SOP instance "1.3"
        >>> cmd.CommandField, cmd.MessageID, cmd.AffectedSOPClassUID, cmd.AffectedSOPInstanceUID
        (1, 7, '1.2', '1.3')
        >>> StoreCommand.read(b"") is None  # anything else: pydicom's to decode
        True
        """
        values: dict[int, Any] = {}
        pos, end, last = 0, len(raw), -1
        while pos < end:
            if pos + 8 > end:
                return None
            group, element, length = cls._ELEMENT.unpack_from(raw, pos)
            pos += 8
            kind = cls._ELEMENTS.get(element)
            if group != 0 or element <= last or kind is None or pos + length > end:
                return None
            value = raw[pos:pos + length]
            pos += length
            last = element
            if kind == "US":
                if length != 2:
                    return None
                values[element] = int.from_bytes(value, "little")
            elif kind == "UL":
                if length != 4:
                    return None
                values[element] = int.from_bytes(value, "little")
            else:
                if not 0 < length <= 64 or not value.isascii():
                    return None
                text = value.decode("ascii").rstrip(" \0")  # (pydicom strips the padding...)
                if not text or "\\" in text:
                    return None  # (... and splits values at backslashes)
                values[element] = text.strip()
        if values.get(0x0100) != 0x0001 or values.get(0x0800, 0x0101) == 0x0101 \
                or 0x0110 not in values or not values.get(0x0002) or not values.get(0x1000):
            return None
        return cls(values)


def _as_pynetdicom_message(msg: DIMSEMessage) -> bool:
    """Give `msg` the pydicom command set pynetdicom's own path reads (if it
    carries a :class:`StoreCommand`); False, for :func:`_queue_store`."""
    if isinstance(msg.command_set, StoreCommand):
        msg.command_set = decode(msg.encoded_command_set, True, True)
    return False


class StoreRequest:
    """A C-STORE request as the fast path hands it to the ``EVT_C_STORE``
    handler (``event.request``): the command's values the response needs, read
    once, and the sink its dataset went to, under ``C_STORE``'s attribute
    names (so ``Event.dataset`` and ``Event.dataset_path`` work as usual)."""

    __slots__ = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "DataSet",
                 "_dataset_file", "_dataset_path")

    def __init__(self, command_set: Dataset | StoreCommand, sink: Any) -> None:
        self.MessageID = int(command_set.MessageID)
        self.AffectedSOPClassUID = uid_text(command_set.AffectedSOPClassUID)
        self.AffectedSOPInstanceUID = uid_text(command_set.AffectedSOPInstanceUID)
        self.DataSet = None  # (Event.dataset's fallback reads it)
        self._dataset_file = sink
        self._dataset_path = Path(sink.name)


def _queue_store(msg: DIMSEMessage, assoc: Any, sink: Any) -> bool:
    """Queue the complete C-STORE `msg` for :func:`_serve_store` (True), or
    leave it to pynetdicom (False: our association reactor is not running, or
    ``EVT_DIMSE_RECV`` is watched)."""
    if assoc is None or getattr(assoc, "_sortscp_wake", None) is None or msg.__class__ is not C_STORE_RQ \
            or _watched(assoc, evt.EVT_DIMSE_RECV, _pyn_handlers.standard_dimse_recv_handler):
        return _as_pynetdicom_message(msg)
    try:
        request = StoreRequest(msg.command_set, sink)
    except (AttributeError, TypeError, ValueError):
        return _as_pynetdicom_message(msg)  # let pynetdicom's conversion decide
    context_id = msg.context_id
    assoc.dimse.message = None  # the next P-DATA starts a new message (what receive_primitive does)
    assoc.dimse.msg_queue.put((context_id, request))
    return True


def _serve_store(assoc: Any, request: StoreRequest, context_id: int) -> None:
    """What ``Association._serve_request`` and ``StorageServiceClass.SCP`` do
    for a C-STORE, on a :class:`StoreRequest`."""
    sink = request._dataset_file
    try:
        if assoc._sent_release:
            log.warning("C-STORE message received during association release, ignoring")
            return
        context = assoc._accepted_cx.get(context_id)
        if context is None:  # (checked when its command arrived)
            assoc.abort()
            return
        assoc.dimse.cancel_req = {}
        assoc._is_paused = True  # in case the handler calls one of the send_* methods
        try:
            status = evt.trigger(assoc, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
        except Exception as exc:  # (sortscp's handler answers every failure with a status)
            log.error("the EVT_C_STORE handler failed (%s: %s); answering 0x%04X",
                      type(exc).__name__, safe(str(exc)), HANDLER_FAILED)
            status = HANDLER_FAILED
        finally:
            assoc._is_paused = False
            assoc.dimse.cancel_req = {}
    finally:
        sink.close()
        try:
            os.unlink(sink.name)
        except OSError:
            pass
    if not assoc.is_established or _aborting(assoc):
        return  # (the status is in the handler's line; no one is left to hear it)
    if not isinstance(status, int) or not 0 <= status <= 0xFFFF:
        log.error("the EVT_C_STORE handler returned %r, not a status", status)
        status = HANDLER_FAILED
    dimse = assoc.dimse
    fields = (request.AffectedSOPClassUID, request.MessageID, status, request.AffectedSOPInstanceUID)
    if _send_store_rsp(dimse, context_id, *fields):
        return
    try:
        rsp = C_STORE()  # pynetdicom's encoder, and its EVT_DIMSE_SENT
        rsp.MessageIDBeingRespondedTo = request.MessageID
        rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
        rsp.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
        rsp.Status = status
        _ORIGINALS.get((DIMSEServiceProvider, "send_msg"), _ORIGINAL_SEND_MSG)(dimse, rsp, context_id)
    except Exception as exc:  # its UIDs (e.g. over 64 characters) do not fit pynetdicom's validation
        log.warning(
            "cannot answer the C-STORE of SOP Instance %s from %s (status 0x%04X): %s; aborting the "
            "association", safe(request.AffectedSOPInstanceUID), safe(_peer(assoc)), status, safe(str(exc)),
            extra={"event": "protocol_error", "reason": f"cannot answer: {exc}"},
        )
        assoc.abort()


# --- the C-STORE response, encoded by hand ---------------------------------------------

_INTERNALS.extend([
    ("DIMSEServiceProvider.send_msg", lambda: callable(getattr(DIMSEServiceProvider, "send_msg", None))),
    ("DIMSEServiceProvider.dul/maximum_pdu_size",
     lambda: _source_mentions(DIMSEServiceProvider, "maximum_pdu_size")),
    ("_handlers.standard_dimse_sent_handler",
     lambda: callable(getattr(_pyn_handlers, "standard_dimse_sent_handler", None))),
])

_US = struct.Struct("<HHLH")  # tag group, element, length (2), value: one implicit VR US element


def _ui(element: int, uid: str) -> bytes:
    value = uid.encode("latin-1")  # (how pydicom decoded the request's bytes: they go back as sent)
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", 0, element, len(value)) + value


def store_rsp_command(class_uid: str, message_id: int, status: int, instance_uid: str) -> bytes:
    """The command set of a C-STORE-RSP without a dataset, Error Comment or
    Offending Element, in implicit VR little endian: the bytes pynetdicom's
    ``C_STORE_RSP.encode_msg`` produces (pydicom's encoder, 300 us an
    instance), built directly (a few us).

    >>> store_rsp_command("1.2", 7, 0, "1.23")[:12].hex()
    '000000000400000040000000'
    """
    body = (
        _ui(0x0002, class_uid)
        + _US.pack(0, 0x0100, 2, 0x8001)
        + _US.pack(0, 0x0120, 2, message_id)
        + _US.pack(0, 0x0800, 2, 0x0101)
        + _US.pack(0, 0x0900, 2, status)
        + _ui(0x1000, instance_uid)
    )
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _plain_store_rsp(primitive: Any) -> tuple[str, int, int, str] | None:
    """The fields of :func:`store_rsp_command` if `primitive` is a plain
    C-STORE response (what sortscp's handler answers), else None."""
    if primitive.__class__ is not C_STORE or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    status, class_uid, instance_uid = primitive.Status, primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    if status is None or class_uid is None or instance_uid is None:
        return None
    try:
        return str(class_uid), int(primitive.MessageIDBeingRespondedTo), int(status), str(instance_uid)
    except ValueError:
        return None


def _send_store_rsp(dimse: Any, context_id: int, class_uid: str, message_id: int, status: int,
                    instance_uid: str) -> bool:
    """Send a plain C-STORE-RSP encoded by hand (:func:`store_rsp_command`);
    False if it cannot be (values it cannot encode, see :func:`_send_command`)."""
    try:
        command = store_rsp_command(class_uid, message_id, status, instance_uid)
    except (UnicodeError, struct.error):
        return False
    return _send_command(dimse, command, context_id)


def _dimse_send_msg(self: Any, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg``, with a plain C-STORE-RSP encoded by
    hand and sent as one PDV. pynetdicom's path stays for everything else, for
    a response that would not fit one PDU, and whenever something else than
    its debug logger listens to ``EVT_DIMSE_SENT`` (or that logger is on):
    that event needs the message object this path never builds. Nothing is
    sent on an association already aborted (a response to a dataset whose
    association was aborted while it was checked): pynetdicom's state machine
    would refuse it in Sta13 with two ERROR lines of its own."""
    if _aborting(self.assoc):
        log.debug("%s not sent: the association is aborted", type(primitive).__name__)
        return
    fields = _plain_store_rsp(primitive)
    if fields is not None and _send_store_rsp(self, context_id, *fields):
        return
    _ORIGINALS.get((DIMSEServiceProvider, "send_msg"), _ORIGINAL_SEND_MSG)(self, primitive, context_id)


def _aborting(assoc: Any) -> bool:
    """Whether `assoc` is aborted, or its abort is on its way (queued by
    :func:`_protocol_error`): a P-DATA sent now would reach pynetdicom's state
    machine after the abort, in Sta13, which refuses it with ERROR lines."""
    return bool(getattr(assoc, "_sortscp_aborting", False) or getattr(assoc, "is_aborted", False)
                or assoc.dul.state_machine.current_state == "Sta13")


def _send_command(dimse: Any, command: bytes, context_id: int) -> bool:
    """Send the encoded command set `command` (no dataset) as one PDV; False
    if it would not fit one PDU or ``EVT_DIMSE_SENT`` is watched (then
    pynetdicom's path must send it)."""
    if dimse.maximum_pdu_size != 0 and len(command) + 6 > dimse.maximum_pdu_size:
        return False
    if _watched(dimse.assoc, evt.EVT_DIMSE_SENT, _pyn_handlers.standard_dimse_sent_handler):
        return False
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
    dimse.dul.send_pdu(pdata)
    return True


def _watched(assoc: Any, event: Any, standard: Callable[..., Any]) -> bool:
    """True if a handler other than pynetdicom's `standard` debug logger is
    bound to `event`, or that logger's lines are shown."""
    handlers = assoc.get_handlers(event)
    if any(h[0] is not standard for h in handlers):
        return True
    return bool(handlers) and logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)


_ORIGINAL_SEND_MSG = DIMSEServiceProvider.send_msg


_PATCHES: dict[tuple[type, str], Callable[..., Any]] = {
    (DIMSEServiceProvider, "send_msg"): _dimse_send_msg,
    (Association, "__init__"): _assoc_init,
    (Association, "_run_reactor"): _assoc_run_reactor,
    (Association, "kill"): _assoc_kill,
    (DULServiceProvider, "run_reactor"): _dul_run_reactor,
    (DULServiceProvider, "kill_dul"): _dul_kill_dul,
    (DULServiceProvider, "stop_dul"): _dul_stop_dul,
}
_install_lock = threading.Lock()


def network_threads_installed() -> bool:
    """True once :func:`install_network_threads` has run (and not been undone)."""
    return all(owner.__dict__.get(name) is fn for (owner, name), fn in _PATCHES.items())


def install_network_threads() -> None:
    """Make every association created from now on run the event-driven threads
    (process-wide, idempotent). Associations already running keep their loops.

    >>> install_network_threads(); network_threads_installed()
    True
    """
    with _install_lock:
        for (owner, name), fn in _PATCHES.items():
            current = owner.__dict__[name]
            if current is fn:
                continue
            _ORIGINALS.setdefault((owner, name), current)
            setattr(owner, name, fn)


def uninstall_network_threads() -> None:
    """Undo :func:`install_network_threads` for associations created from now on."""
    with _install_lock:
        for (owner, name), original in _ORIGINALS.items():
            setattr(owner, name, original)

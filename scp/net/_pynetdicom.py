"""Every use of a pynetdicom internal, in one place, checked at start-up.

pynetdicom's public API cannot yet do a few things a receiver needs; each is
wrapped here, with the upstream change that would remove it:

* :func:`configure_storage`: ``_config.UNRESTRICTED_STORAGE_SERVICE`` (every
  storage SOP class, private ones included) and
  ``_config.STORE_RECV_CHUNKED_DATASET`` (datasets streamed to a file, never
  held in memory). Documented, but a private, process-wide module.
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
  command set and context, and bounds on in-memory DIMSE data.
* :func:`dataset_sink`: ``C_STORE._dataset_file``, that file as the handler
  sees it (``Event.dataset_path`` gives only its name, not whether writing it
  failed).
* :func:`current_association`: the association whose network thread is
  running (pynetdicom's DUL thread carries it as ``.assoc``).
* :func:`set_poll_delay`: ``DULServiceProvider._run_loop_delay``, the sleep
  between polls of the network thread. Upstream: an event-driven DUL.
* :func:`partial_dataset_file`: ``assoc.dimse.message._data_set_file``, the file of
  a dataset still arriving when the connection closes (pynetdicom removes only
  complete ones). Upstream: removing it on connection close.
* :func:`reject`: the A-ASSOCIATE-RJ sequence pynetdicom itself runs for a
  rejection from an ``EVT_REQUESTED`` handler. Upstream: a public reject.
* :func:`register_server`: ``AE._servers``, so ``AE.shutdown`` stops a server
  made with ``AE.make_server`` as it stops one from ``AE.start_server``.
  Upstream: ``start_server(server_class=...)``.

:func:`check` runs before the server starts: a pynetdicom whose internals
moved stops sortscp with one line naming what is missing, never a feature that
silently vanished. The pin in ``pyproject.toml`` (``pynetdicom>=3.0,<3.1``)
keeps installs on the tested minor version.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import _MESSAGE_TYPES, C_STORE_RQ, DIMSEMessage
from pynetdicom.dsutils import decode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

from scp.errors import SortscpError
from scp.log import safe

LOGGER = logging.getLogger("scp.net")

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
    ("DIMSEMessage.decode_msg", lambda: callable(getattr(DIMSEMessage, "decode_msg", None))),
    ("dimse_messages._MESSAGE_TYPES", lambda: isinstance(getattr(dimse_messages, "_MESSAGE_TYPES", None), dict)),
    ("dimse_messages.C_STORE_RQ", lambda: isinstance(getattr(dimse_messages, "C_STORE_RQ", None), type)),
    ("DIMSEMessage.encoded_command_set", lambda: _source_mentions(DIMSEMessage.__init__, "encoded_command_set")),
    ("Association._accepted_cx", lambda: _source_mentions(Association.__init__, "_accepted_cx")),
    ("DULServiceProvider.event_queue", lambda: _source_mentions(DULServiceProvider.__init__, "event_queue")),
    (
        "DIMSEMessage._data_set_file",
        lambda: _source_mentions(DIMSEMessage.__init__, "_data_set_file"),
    ),
    (
        "DULServiceProvider._run_loop_delay",
        lambda: _source_mentions(DULServiceProvider.__init__, "_run_loop_delay"),
    ),
    ("DULServiceProvider.assoc", lambda: isinstance(getattr(DULServiceProvider, "assoc", None), property)),
    ("ACSE.send_reject", lambda: callable(getattr(ACSE, "send_reject", None))),
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
    """Accept every storage SOP class; stream datasets to a file as they arrive."""
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.STORE_RECV_CHUNKED_DATASET = True


# --- receiving DIMSE messages ---------------------------------------------------

#: Largest command set accepted (real ones are a few hundred bytes).
MAX_COMMAND_BYTES = 64 * 1024
#: Largest dataset of a message other than C-STORE held in memory (C-ECHO has
#: none; sortscp serves nothing else).
MAX_OTHER_DATASET_BYTES = 1 << 20

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
    LOGGER.warning("aborting the association with %s: %s", safe(_peer(assoc)), why,
                   extra={"event": "protocol_error", "reason": why})
    if assoc is not None:
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
    try:
        for context_id, data in primitive.presentation_data_value_list:
            control = data[0]
            if control & 1:  # a command fragment
                if self.context_id is not None:
                    # a command set is complete and its dataset is not: abandoned
                    sink = self._data_set_file
                    if sink is not None and hasattr(sink, "abandon"):
                        sink.abandon("another command started before its last fragment", _peer(assoc))
                    _reset(self)
                self.encoded_command_set.write(data[1:])
                if self.encoded_command_set.tell() > MAX_COMMAND_BYTES:
                    return _protocol_error(self, assoc, f"a command set longer than {MAX_COMMAND_BYTES} bytes")
                if not control & 2:
                    continue
                self.context_id = context_id
                self.command_set = decode(self.encoded_command_set, True, True)
                self.__class__ = _MESSAGE_TYPES[self.command_set.CommandField][1]
                if self.command_set.CommandDataSetType == 0x0101:
                    return True  # no dataset follows
                if isinstance(self, C_STORE_RQ) and _open_dataset is not None and assoc is not None:
                    cx = assoc._accepted_cx.get(context_id)
                    if cx is None:
                        return _protocol_error(
                            self, assoc, f"a C-STORE on presentation context {context_id}, which was not accepted"
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
                    if sink is not None:
                        sink.finish()
                    return True
    except Exception as exc:  # an undecodable command set, an unknown command field...
        return _protocol_error(self, assoc, f"an invalid DIMSE message ({type(exc).__name__}: {exc})")
    return False


def current_association() -> Association | None:
    """The association whose network thread is calling (None elsewhere)."""
    return getattr(threading.current_thread(), "assoc", None)


def set_poll_delay(assoc: Association, seconds: float) -> None:
    """Sleep of `assoc`'s network thread between polls of its socket and queue."""
    assoc.dul._run_loop_delay = seconds


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

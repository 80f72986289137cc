"""Every use of a pynetdicom internal, in one place, checked at start-up.

pynetdicom's public API cannot yet do a few things a receiver needs; each is
wrapped here, with the upstream change that would remove it:

* :func:`configure_storage`: ``_config.UNRESTRICTED_STORAGE_SERVICE`` (every
  storage SOP class, private ones included) and
  ``_config.STORE_RECV_CHUNKED_DATASET`` (datasets streamed to a file, never
  held in memory). Documented, but a private, process-wide module.
* :func:`install_dataset_sink`: the file pynetdicom streams an incoming
  dataset into is ``dimse_messages.NamedTemporaryFile``; replaced so that a
  full disk fails one instance instead of killing the association's network
  thread, and so that our File Meta is written on arrival. Upstream: a
  per-AE factory for the chunked-dataset file (pynetdicom has no folder option
  for it either).
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
import threading
from collections.abc import Callable
from typing import Any

import pynetdicom
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider

from scp.errors import SortscpError

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
    ("dimse_messages.NamedTemporaryFile", lambda: hasattr(dimse_messages, "NamedTemporaryFile")),
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


def install_dataset_sink(factory: Callable[..., Any]) -> None:
    """Make pynetdicom create the file of each incoming dataset with `factory`
    (called as ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``
    is, from the association's network thread)."""
    dimse_messages.NamedTemporaryFile = factory  # type: ignore[attr-defined]


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

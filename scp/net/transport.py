"""The association server: one that no single peer can stall.

pynetdicom's stock server performs the TLS handshake in its accept loop without
a timeout (one silent client stalls every new association) and gives accepted
sockets no timeout (a peer that stops in the middle of a PDU holds its
association, and a slot of ``--max-associations``, for ever).
:class:`HardenedAssociationServer` moves the handshake into the connection's
own thread, bounds it, and gives every accepted socket the network timeout.
It is used with and without TLS.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from scp.net import _pynetdicom

log = logging.getLogger(__name__)


class HardenedAssociationServer(ThreadedAssociationServer):
    """A :class:`ThreadedAssociationServer` that no single peer can stall.

    * ``get_request`` only accepts; the TLS handshake runs in the connection's
      own thread, bounded by the ACSE timeout, so a silent client cannot keep
      the accept loop waiting.
    * A plain connection becomes an association only once its first byte
      arrives (within the ACSE timeout): probes do not take association slots.
    * Every accepted socket gets the network timeout: a peer that stops in the
      middle of a PDU is dropped instead of holding its association for ever.
    """

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        return self.socket.accept()

    def finish_request(self, request, client_address) -> None:  # type: ignore[override]
        ae = self.ae
        if self.ssl_context is not None:
            try:
                request.settimeout(ae.acse_timeout)
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
                log.warning(
                    "TLS handshake with %s:%s failed: %s", *client_address[:2], _tls_reason(exc),
                    extra={"event": "tls_failed", "peer": str(client_address[0])},
                )
                _close_quietly(request)
                return
        elif not _first_byte_arrives(request, ae.acse_timeout):
            _close_quietly(request)
            return
        request.settimeout(ae.network_timeout)
        super().finish_request(request, client_address)


def _first_byte_arrives(sock: socket.socket, timeout: float | None) -> bool:
    """Wait (bounded) for the peer's first byte without consuming it.

    A connection that closes or stays silent never becomes an association, so
    port probes and health checks do not hold a slot of ``--max-associations``
    (pynetdicom would keep one until its ACSE timeout).
    """
    try:
        sock.settimeout(timeout)
        return bool(sock.recv(1, socket.MSG_PEEK))
    except OSError:  # timed out or reset
        return False


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no handshake within the timeout"
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def start_server(
    ae: AE,
    address: tuple[str, int],
    evt_handlers: list[tuple],
    ssl_context: ssl.SSLContext | None = None,
) -> HardenedAssociationServer:
    """Listen on `address` with a :class:`HardenedAssociationServer`; serve in a
    daemon thread (what ``ae.start_server(block=False)`` does with its own class).

    Raises :class:`OSError` if the address cannot be bound.
    """
    server = ae.make_server(
        address, ssl_context=ssl_context, evt_handlers=evt_handlers,
        server_class=HardenedAssociationServer,
    )
    assert isinstance(server, HardenedAssociationServer)
    _pynetdicom.register_server(ae, server)
    threading.Thread(
        target=server.serve_forever, name=f"AcceptorServer@{address[1]}", daemon=True
    ).start()
    return server

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
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from scp.net import _pynetdicom

log = logging.getLogger(__name__)


class HardenedAssociationServer(ThreadedAssociationServer):
    """A :class:`ThreadedAssociationServer` that no single peer can stall.

    * ``get_request`` only accepts; the TLS handshake runs in the connection's
      own thread, bounded by the ACSE timeout, so a silent client cannot keep
      the accept loop waiting.
    * A connection becomes an association only once its whole A-ASSOCIATE-RQ
      has arrived, within the ACSE timeout in total (from the connection, TLS
      handshake included): probes and peers that drip their request, or that
      complete a TLS handshake and say nothing, do not take association slots.
      A plain request is peeked at in the kernel; a TLS one is read, and given
      back first by the connection's socket (:class:`_PrefixedSSLSocket`).
    * Connections still waiting for their request are bounded: at most
      :data:`PENDING_PER_HOST` from one address and :data:`PENDING_TOTAL` in
      all (each holds a thread); one more is closed at once, logged at most
      once a second with the count. A flood of silent connections from one
      host thus costs a bounded number of threads and keeps no other host out.
    * Every accepted socket gets the network timeout (with the event-driven
      network threads, a kernel send timeout; they keep the receive deadlines
      themselves): a peer that stops in the middle of a PDU is dropped instead
      of holding its association for ever.
    """

    #: The listen backlog (socketserver's 5, which pynetdicom keeps, drops the SYNs
    #: of a burst of connections: each sender past it waits a second to retry).
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pending: Counter[str] = Counter()  #: connections waiting for their request, by address
        self._pending_lock = threading.Lock()
        self._turned_away = 0  #: since the last line that said so
        self._turned_away_logged = 0.0
        super().__init__(*args, **kwargs)
        if self.ssl_context is not None:
            self.ssl_context.sslsocket_class = _PrefixedSSLSocket  # see _admit

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        return self.socket.accept()

    def verify_request(self, request, client_address) -> bool:  # type: ignore[override]
        """Admit the connection to the wait for its request, unless its address
        (or everyone) already has as many waiting as allowed; then it is closed
        (by socketserver) before any thread is started for it."""
        host = str(client_address[0])
        with self._pending_lock:
            if self._pending[host] < PENDING_PER_HOST and self._pending.total() < PENDING_TOTAL:
                self._pending[host] += 1
                return True
            self._turned_away += 1
            now = time.monotonic()
            if now - self._turned_away_logged < 1.0:
                return False
            count, self._turned_away, self._turned_away_logged = self._turned_away, 0, now
            mine = self._pending[host]
        limit = f"{PENDING_PER_HOST} from {host}" if mine >= PENDING_PER_HOST else f"{PENDING_TOTAL} in all"
        log.warning(
            "closed %d new connection(s) at once (the last from %s:%s): %s already waiting to "
            "send their A-ASSOCIATE-RQ", count, *client_address[:2], limit,
            extra={"event": "connection_refused", "peer": host, "reason": "too many connections waiting"},
        )
        return False

    def _done_waiting(self, client_address) -> None:
        host = str(client_address[0])
        with self._pending_lock:
            self._pending[host] -= 1
            if self._pending[host] <= 0:
                del self._pending[host]

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread for it (e.g. none can be started): not waiting
            self._done_waiting(client_address)
            raise

    def finish_request(self, request, client_address) -> None:  # type: ignore[override]
        try:
            request = self._admit(request, client_address)
        finally:
            self._done_waiting(client_address)
        if request is not None:
            super().finish_request(request, client_address)

    def _admit(self, request, client_address):
        """The socket of the association once its whole request is there (set
        up for the network threads), or None when the connection was closed."""
        ae = self.ae
        if self.ssl_context is not None:
            deadline = None if ae.acse_timeout is None else time.monotonic() + ae.acse_timeout
            request.settimeout(ae.acse_timeout)
            if not _sends_anything(request):  # a silent probe or health check is not worth a line
                _close_quietly(request)
                return None
            try:
                if deadline is not None:
                    request.settimeout(max(0.001, deadline - time.monotonic()))
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
                log.warning(
                    "TLS handshake with %s:%s failed: %s", *client_address[:2], _tls_reason(exc),
                    extra={"event": "tls_failed", "peer": str(client_address[0])},
                )
                _close_quietly(request)
                return None
            head = _read_request(request, deadline)
            got, wanted = len(head), _wanted(head)
            refused = _refusal(head) if got >= 6 else None
            request.prefix = bytes(head)  # the DUL reads it first, as if it had just arrived
        else:
            got, wanted = _request_arrives(request, ae.acse_timeout)
            refused = _not_a_request(request) if got >= 6 else None
        if refused:
            log.warning(
                "closed the connection from %s:%s: %s", *client_address[:2], refused,
                extra={"event": "association_refused", "peer": str(client_address[0]),
                       "reason": refused},
            )
            _abort_quietly(request)
            return None
        if got < wanted:
            if got:  # a silent probe or health check is not worth a line
                log.warning(
                    "closed the connection from %s:%s: no complete A-ASSOCIATE-RQ within %g s "
                    "(%d of %s bytes)", *client_address[:2], ae.acse_timeout, got,
                    wanted if wanted > 6 else "at least 6",
                    extra={"event": "association_timeout", "peer": str(client_address[0]),
                           "reason": "no complete A-ASSOCIATE-RQ within the ACSE timeout"},
                )
            _close_quietly(request)
            return None
        if self.ssl_context is None and _pynetdicom.network_threads_installed():
            # The event-driven DUL reads without blocking and keeps every
            # deadline itself; it needs a socket without a Python timeout.
            request.settimeout(None)
            _pynetdicom.tune_accepted_socket(request, ae.network_timeout)
        else:
            request.settimeout(ae.network_timeout)
        return request


class _PrefixedSSLSocket(ssl.SSLSocket):
    """The server's TLS sockets (``SSLContext.sslsocket_class``): bytes read
    from one before it became an association (its A-ASSOCIATE-RQ, see
    :func:`_read_request`) are read from it again first, and count as pending
    (pynetdicom's ``AssociationSocket.ready`` and our DUL look at ``pending()``)."""

    prefix = b""

    def pending(self) -> int:
        return len(self.prefix) + super().pending()

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix[:buflen], self.prefix[buflen:]
            return data
        return super().recv(buflen, flags)

    def recv_into(self, buffer, nbytes: int | None = None, flags: int = 0) -> int:  # type: ignore[override]
        if self.prefix:
            view = memoryview(buffer).cast("B")
            n = min(len(self.prefix), nbytes or len(view), len(view))
            view[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        return super().recv_into(buffer, nbytes, flags)


#: Connections from one address that may wait at once for their A-ASSOCIATE-RQ
#: (a sender's are there for milliseconds; a PACS opens a few associations at once).
PENDING_PER_HOST = 32
#: The same, from all addresses together.
PENDING_TOTAL = 512

#: An A-ASSOCIATE-RQ longer than this is handed over before it is complete (it would
#: not fit a receive buffer; the network thread's ARTIM timer then bounds the rest).
REQUEST_PEEK_LIMIT = 64 << 10


def _request_arrives(sock: socket.socket, timeout: float | None) -> tuple[int, int]:
    """Wait until the peer's first PDU (its A-ASSOCIATE-RQ) is entirely in the
    receive buffer, without consuming it, for at most `timeout` seconds in total.

    Returns (bytes there, bytes wanted): complete when the first is not less.
    Until then the connection is not an association, so a port probe, a health
    check or a peer that sends its request one byte at a time never holds a
    slot of ``--max-associations``, and is closed after `timeout` seconds
    whatever it sends. The wait sleeps in the kernel: ``SO_RCVLOWAT`` makes the
    peek return only once the bytes wanted are there.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    wanted, got = 6, 0
    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return got, wanted
            sock.settimeout(left)
            _set_lowat(sock, wanted)
            data = sock.recv(wanted, socket.MSG_PEEK)
            if not data:  # closed
                return got, wanted
            got = len(data)
            wanted = _wanted(data)  # the header alone is complete enough to judge, or to hand over
            if got >= wanted:
                return got, wanted
            if _peer_closed(sock):  # its request can never be complete (the peek sees no EOF)
                return got, wanted
            time.sleep(0.01)  # fewer bytes than asked: no SO_RCVLOWAT here
    except OSError:  # timed out or reset
        return got, wanted
    finally:
        _set_lowat(sock, 1)


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has closed (or shut down) its side of `sock`, whatever it
    sent before: a peek returns those bytes at once for ever, never the empty
    read of a closed connection. False where the kernel cannot tell (no POLLRDHUP)."""
    rdhup = getattr(select, "POLLRDHUP", 0)
    if not rdhup:
        return False
    poller = select.poll()
    poller.register(sock, rdhup)
    try:
        return any(ev & (rdhup | select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))
    except OSError:
        return True


def _wanted(head: bytes | bytearray) -> int:
    """How many bytes of the first PDU to wait for, given its first bytes `head`:
    all of an A-ASSOCIATE-RQ of at most :data:`REQUEST_PEEK_LIMIT`; anything
    else once its header is there (enough to refuse it, or to hand it over)."""
    if len(head) < 6:
        return 6
    kind, _, length = struct.unpack(">BBL", head[:6])
    if kind != 0x01 or 6 + length > REQUEST_PEEK_LIMIT:
        return len(head)
    return 6 + length


def _read_request(sock: ssl.SSLSocket, deadline: float | None) -> bytearray:
    """Read the first PDU from a TLS connection (which cannot be peeked at, see
    :func:`_request_arrives`) until :func:`_wanted` says it is there, the peer
    stops, or `deadline` passes. Returns what was read."""
    head = bytearray()
    try:
        while len(head) < _wanted(head):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            sock.settimeout(left)
            data = sock.recv(_wanted(head) - len(head))
            if not data:
                break
            head += data
    except (OSError, ValueError):  # timed out, reset, or a TLS error
        pass
    return head


def _not_a_request(sock: socket.socket) -> str | None:
    """Why the first PDU waiting on `sock` cannot start an association (None: it
    can), peeked at without reading it (see :func:`_refusal`)."""
    try:
        head = sock.recv(6, socket.MSG_PEEK)
    except OSError:
        return None
    return _refusal(head)


def _refusal(head: bytes | bytearray) -> str | None:
    """Why a connection whose first PDU starts with `head` cannot become an
    association (None: it can). Such a peer is refused before it becomes one:
    else pynetdicom's association thread would hold its slot for the ACSE
    timeout, waiting for a request that never comes."""
    if len(head) < 6:
        return None
    kind, _, length = struct.unpack(">BBL", head[:6])
    if kind != 0x01:
        return f"its first PDU (type 0x{kind:02X}) is not an A-ASSOCIATE-RQ"
    if length > _pynetdicom.OTHER_PDU_LIMIT:
        return f"it announced an A-ASSOCIATE-RQ of {length} bytes, more than the {_pynetdicom.OTHER_PDU_LIMIT} we accept"
    return None


#: A-ABORT, service-provider initiated, reason not specified.
_A_ABORT = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x00)


def _abort_quietly(sock: socket.socket) -> None:
    try:
        sock.settimeout(1.0)
        sock.sendall(_A_ABORT)
    except OSError:
        pass
    _close_quietly(sock)


def _set_lowat(sock: socket.socket, n: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
    except (OSError, AttributeError):
        pass


def _sends_anything(sock: socket.socket) -> bool:
    """Whether the peer sends a byte before it closes, resets or its time runs
    out (the byte is left where it is, for the TLS handshake to read)."""
    try:
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

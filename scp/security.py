"""Who may send, over what: the calling-AE allow-list, TLS, and an association
server that no single peer can stall.

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
import os
import socket
import ssl
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from scp.config import check_ae_title
from scp.errors import SortscpError

log = logging.getLogger(__name__)

#: A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognized.
REJECT_CALLING_AET = (0x01, 0x01, 0x03)
#: Oldest TLS version we accept (the BCP 195 profiles of PS3.15 require 1.2 or later).
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


class SecurityConfigError(SortscpError):
    """An access rule or a TLS file is not usable."""


# --- access control -----------------------------------------------------------


@dataclass(frozen=True)
class AllowRule:
    """A calling AE title that may associate, optionally only from some addresses.

    Examples
    --------
    >>> AllowRule.parse("MODALITY1@127.0.0.1").allows("MODALITY1", "127.0.0.1")
    True
    >>> AllowRule.parse("MODALITY1@127.0.0.1").allows("MODALITY1", "10.0.0.9")
    False
    """

    title: str
    host: str | None = None
    addresses: frozenset[str] | None = None  #: None: any address

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """``TITLE`` or ``TITLE@HOST``; HOST (a name or an address) is resolved now."""
        title, at, host = text.strip().rpartition("@")
        if not at:
            title, host = host, ""
        title = title.strip()
        try:
            check_ae_title(title)
        except ValueError as exc:
            raise SecurityConfigError(f"--allow-aet {text!r}: {exc}") from None
        if not at:
            return cls(title)
        if not host:
            raise SecurityConfigError(f"--allow-aet {text!r}: a host is missing after '@'")
        return cls(title, host, frozenset(_resolve(host, text)))

    def allows(self, calling_aet: str, address: str) -> bool:
        if calling_aet != self.title:
            return False
        return self.addresses is None or _normalize(address) in self.addresses

    def __str__(self) -> str:
        return f"{self.title}@{self.host}" if self.host else self.title


def _resolve(host: str, text: str) -> set[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise SecurityConfigError(f"--allow-aet {text!r}: cannot resolve {host!r}: {exc}") from None
    return {_normalize(info[4][0]) for info in infos}


def _normalize(address: str) -> str:
    """An IPv4 peer seen on a dual-stack socket is ``::ffff:a.b.c.d``."""
    return address.removeprefix("::ffff:") if "." in address else address


def split_allow_list(values: Iterable[str]) -> list[str]:
    """Entries given as repeated options and/or whitespace or comma separated text.

    >>> split_allow_list(["A, B@host", "C"])
    ['A', 'B@host', 'C']
    """
    entries = []
    for value in values:
        items = value.replace(",", " ").split()
        if not items:
            raise SecurityConfigError(f"--allow-aet {value!r}: an empty entry")
        entries.extend(items)
    return entries


class AccessControl:
    """An ``EVT_REQUESTED`` handler that rejects calling AE titles not on the list.

    An empty list allows everyone (as DCMTK and Orthanc do by default).
    """

    def __init__(self, rules: Sequence[AllowRule]) -> None:
        self.rules = tuple(rules)
        self.rejected = 0
        self._lock = threading.Lock()

    def allows(self, calling_aet: str, address: str) -> bool:
        return not self.rules or any(r.allows(calling_aet, address) for r in self.rules)

    def bindings(self) -> list[tuple]:
        return [(evt.EVT_REQUESTED, self.on_requested)] if self.rules else []

    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        # ``requestor.ae_title`` is set only later, during negotiation.
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        if self.allows(calling, address):
            return
        with self._lock:
            self.rejected += 1
        log.warning(
            "rejected association from %r (%s): calling AE title not allowed",
            calling, address,
            extra={"event": "association_rejected", "calling_aet": calling, "peer": address,
                   "reason": "calling AE title not allowed"},
        )
        # What pynetdicom itself does for a rejection: the A-ASSOCIATE-RJ is
        # sent only if the association is killed afterwards.
        assoc.acse.send_reject(*REJECT_CALLING_AET)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()


# --- TLS ------------------------------------------------------------------------


def server_tls_context(cert: Path, key: Path | None, ca: Path | None = None) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later).

    `key` may be None when `cert` holds the private key too. With `ca`, every client must present a certificate signed by it.
    Raises :class:`SecurityConfigError` with a one-line reason for a file that
    is missing, unreadable, not PEM, or a key that does not match the certificate.
    """
    for option, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if path is not None and not os.access(path, os.R_OK):
            why = "no such file" if not os.path.exists(path) else "not readable"
            raise SecurityConfigError(f"{option} {path}: {why}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_TLS_VERSION
    try:
        ctx.load_cert_chain(cert, key, password=_no_password(cert, key))
    except ssl.SSLError as exc:
        raise SecurityConfigError(_cert_chain_problem(cert, key, exc)) from None
    except OSError as exc:
        raise SecurityConfigError(f"{_pair(cert, key)}: {exc.strerror or exc}") from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            raise SecurityConfigError(f"--tls-ca {ca}: not a PEM CA certificate ({reason})") from None
        if not ctx.get_ca_certs():
            raise SecurityConfigError(f"--tls-ca {ca}: holds no CA certificate")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _no_password(cert: Path, key: Path | None):
    """Refuse an encrypted key instead of letting OpenSSL prompt on the terminal."""

    def refuse() -> bytes:
        raise SecurityConfigError(
            f"{_key_option(cert, key)}: the private key "
            "is encrypted; give an unencrypted key (readable by this service only)"
        )

    return refuse


def _cert_chain_problem(cert: Path, key: Path | None, exc: ssl.SSLError) -> str:
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"{_pair(cert, key)}: the private key does not belong to the certificate"
    if PEM_CERTIFICATE not in _head(cert):
        return f"--tls-cert {cert}: not a PEM certificate"
    return f"{_key_option(cert, key)}: not an unencrypted PEM private key"


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError:
        return b""


def _key_option(cert: Path, key: Path | None) -> str:
    """The option that named the private key: --tls-key, or --tls-cert holding both."""
    return f"--tls-key {key}" if key else f"--tls-cert {cert}"


def _pair(cert: Path, key: Path | None) -> str:
    return f"--tls-cert {cert}" + (f" / --tls-key {key}" if key else "")


# --- the association server ---------------------------------------------------


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
    ae._servers.append(server)  # as start_server does; server.shutdown() removes it
    threading.Thread(
        target=server.serve_forever, name=f"AcceptorServer@{address[1]}", daemon=True
    ).start()
    return server

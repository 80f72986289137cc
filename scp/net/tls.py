"""TLS for ``serve``: a server context from PEM files, with one clear line for
every way those files can be unusable."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from scp.net.access import SecurityConfigError

#: Oldest TLS version we accept (the BCP 195 profiles of PS3.15 require 1.2 or later).
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


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



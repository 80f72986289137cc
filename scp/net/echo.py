"""``sortscp echo``: a C-ECHO client for health checks and connectivity tests.

The answer is a plain :class:`EchoResult`; the CLI prints its message and
exits 0 only when the peer answered Success.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from scp.config import DEFAULT_AET, DEFAULT_ECHO_AET, DEFAULT_ECHO_TIMEOUT
from scp.net.status import SUCCESS


@dataclass(frozen=True)
class EchoResult:
    """The outcome of one C-ECHO: ``ok`` only if the peer answered Success."""

    ok: bool
    message: str
    status: int | None = None
    seconds: float = 0.0


def echo(
    host: str,
    port: int,
    aet: str = DEFAULT_ECHO_AET,
    called_aet: str = DEFAULT_AET,
    timeout: float = DEFAULT_ECHO_TIMEOUT,
) -> EchoResult:
    """Associate with `called_aet` at `host:port`, send one C-ECHO, release.

    Every step (connect, association, the echo itself) waits at most `timeout`
    seconds, so the call always returns in bounded time.
    """
    from pynetdicom import AE  # imported here: the CLI loads this module for every command
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    peer = f"{called_aet}@{host}:{port}"
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.connection_timeout = timeout
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    started = time.monotonic()
    # pynetdicom logs connection failures at ERROR; we report them ourselves.
    quiet = logging.getLogger("pynetdicom")
    level = quiet.level
    if not logging.getLogger().handlers:
        quiet.setLevel(logging.CRITICAL)
    try:
        try:
            assoc = ae.associate(host, port, ae_title=called_aet)
        except OSError as exc:  # the name does not resolve
            return EchoResult(False, f"cannot reach {peer}: {exc.strerror or exc}")
        if assoc.is_rejected:
            return EchoResult(False, f"{peer} rejected the association{_reject_reason(assoc)}")
        if not assoc.is_established and assoc.rejected_contexts:
            return EchoResult(False, f"{peer} does not accept Verification (C-ECHO)")
        if not assoc.is_established:
            return EchoResult(False, f"no association with {peer}: connection refused, closed "
                                     f"or aborted, or no answer within {timeout:g} s")
        try:
            if not any(cx.abstract_syntax == Verification for cx in assoc.accepted_contexts):
                return EchoResult(False, f"{peer} does not accept Verification (C-ECHO)")
            rsp = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        status = rsp.get("Status") if rsp else None
        seconds = time.monotonic() - started
        if status is None:
            return EchoResult(False, f"no C-ECHO answer from {peer} within {timeout:g} s")
        if status != SUCCESS:
            return EchoResult(False, f"{peer} answered 0x{status:04X}", status, seconds)
        return EchoResult(True, f"{peer} answered Success in {seconds * 1000:.0f} ms",
                          status, seconds)
    finally:
        quiet.setLevel(level)


def _reject_reason(assoc) -> str:
    rsp = getattr(assoc.acceptor, "primitive", None)
    reason = getattr(rsp, "reason_str", None)
    return f" ({reason})" if reason else ""

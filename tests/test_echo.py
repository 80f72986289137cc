"""``sortscp echo``: exit 0 only when the peer answers Success to a C-ECHO."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from conftest import free_port, run_cli

#: Bounds every echo in these tests; a hang fails the test instead of the suite.
ECHO_TIMEOUT = "5"
RUN_TIMEOUT = 60


def _echo(*args: object) -> tuple[int, str]:
    result = run_cli("echo", *map(str, args), "--timeout", ECHO_TIMEOUT, timeout=RUN_TIMEOUT)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture
def peer() -> Iterator[callable]:
    """Factory for an in-process pynetdicom SCP on a free port of 127.0.0.1;
    each is shut down after the test."""
    servers = []

    def start(ae: AE, handlers: list | None = None) -> int:
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers or []))
        return port

    yield start
    for server in servers:
        server.shutdown()


def test_echo_to_sortscp_serve_succeeds(serve_process) -> None:
    server = serve_process("--workers", "1")
    code, out = _echo("127.0.0.1", server.port)
    assert code == 0, out
    assert "SORTSCP@127.0.0.1" in out and "answered Success" in out, out


def test_echo_uses_the_called_aet_given(serve_process) -> None:
    server = serve_process("--workers", "1", "--aet", "PACS_IN")
    code, out = _echo("127.0.0.1", server.port, "--called-aet", "PACS_IN", "--aet", "MODALITY")
    assert code == 0, out
    assert "PACS_IN@127.0.0.1" in out, out


def test_echo_fails_when_nothing_listens() -> None:
    port = free_port()  # bound and released: nothing listens there now
    code, out = _echo("127.0.0.1", port)
    assert code == 1, out
    assert "no association" in out, out


def test_echo_fails_when_the_host_does_not_resolve() -> None:
    code, out = _echo("no-such-host.invalid", 104)
    assert code == 1, out
    assert "cannot reach" in out, out


def test_echo_fails_when_the_peer_rejects_the_called_aet(peer) -> None:
    ae = AE(ae_title="STRICT")
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    port = peer(ae)

    code, out = _echo("127.0.0.1", port, "--called-aet", "SOMEONE_ELSE")
    assert code == 1, out
    assert "rejected the association" in out and "Called AE title not recognised" in out, out

    code, out = _echo("127.0.0.1", port, "--called-aet", "STRICT")
    assert code == 0, out


def test_echo_fails_when_the_peer_answers_another_status(peer) -> None:
    ae = AE(ae_title="BUSY")
    ae.add_supported_context(Verification)
    port = peer(ae, [(evt.EVT_C_ECHO, lambda event: 0x0211)])  # unrecognised operation
    code, out = _echo("127.0.0.1", port, "--called-aet", "BUSY")
    assert code == 1, out
    assert "answered 0x0211" in out, out


def test_echo_fails_when_the_peer_does_not_accept_verification(peer) -> None:
    ae = AE(ae_title="STOREONLY")
    ae.add_supported_context(CTImageStorage)
    port = peer(ae)
    code, out = _echo("127.0.0.1", port, "--called-aet", "STOREONLY")
    assert code == 1, out
    assert "does not accept Verification" in out, out


@pytest.mark.parametrize(
    "args",
    [
        ("127.0.0.1", "11112", "--aet", "A" * 17),
        ("127.0.0.1", "11112", "--called-aet", "BAD\\AET"),
        ("127.0.0.1", "0"),
        ("127.0.0.1", "not-a-port"),
    ],
)
def test_echo_usage_errors_exit_2_without_a_traceback(args: tuple[str, ...]) -> None:
    result = run_cli("echo", *args, timeout=RUN_TIMEOUT)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out

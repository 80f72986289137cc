"""Attacks on the TLS request read-ahead (the A-ASSOCIATE-RQ read before the
connection becomes an association, then given back by the socket) and on the
bound of connections waiting for their request: real sockets on 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import struct
import time

from test_security import _tls_peer, certs, client_tls, tls_args  # noqa: F401 (fixture)
from test_serve_hostile import SUCCESS, _closed_by_server, _connect, ct_bytes, ct_path

from scp.net.transport import PENDING_PER_HOST, REQUEST_PEEK_LIMIT

import pdu
from serve_helpers import wait_until


def _associate_and_store(peer, uid: str, data: bytes, rq: bytes) -> int:
    """Send `rq` (the request, or what is left of it), wait for the A-ASSOCIATE-AC
    (a P-DATA before it is a protocol error), then the C-STORE in one write; its status."""
    peer.send(rq)
    answer = peer.read_pdu()
    assert answer.kind == pdu.A_ASSOCIATE_AC, f"PDU type {answer.kind:#x} {answer.body.hex()}"
    cid = 1
    blob = pdu.p_data((cid, pdu.COMMAND | pdu.LAST, pdu.c_store_rq(pdu.CT_IMAGE_STORAGE, uid)))
    for i in range(0, len(data), 8000):
        blob += pdu.p_data((cid, pdu.LAST if i + 8000 >= len(data) else 0, data[i:i + 8000]))
    peer.send(blob)
    return peer.status()


def still_stores_over_tls(server, certs, patient_id: str) -> None:  # noqa: F811
    """A well-behaved TLS sender, from 127.0.0.1, still stores an instance (filed)."""
    uid, data, ds = ct_bytes(PatientID=patient_id)
    with _tls_peer(server.port, certs) as peer:
        rq = pdu.associate_rq([(1, pdu.CT_IMAGE_STORAGE, [pdu.EXPLICIT_LE])])
        assert _associate_and_store(peer, uid, data, rq) == SUCCESS, server.log()
        assert peer.release()
    assert ct_path(server.out, ds).is_file()


def test_tls_bytes_after_the_request_reach_the_association(serve_process, certs):  # noqa: F811
    """The request and a P-DATA in one write: the P-DATA is not lost in the read
    ahead of the request (nor swallowed into it). Before the A-ASSOCIATE-AC it is
    a protocol error, so the DUL aborts, as on a plain port; had it been lost the
    server would answer A-ASSOCIATE-AC and wait."""
    server = serve_process(*tls_args(certs), "--workers", "1")
    rq = pdu.associate_rq([(1, pdu.CT_IMAGE_STORAGE, [pdu.EXPLICIT_LE])])
    with _tls_peer(server.port, certs) as peer:
        peer.send(rq + pdu.p_data((1, pdu.COMMAND | pdu.LAST, pdu.c_echo_rq())))
        answer = peer.read_pdu()
        assert answer.kind == pdu.A_ABORT, f"PDU type {answer.kind:#x}\n{server.log()}"
    assert "Traceback" not in server.log()


def test_tls_request_in_many_records_then_a_store(serve_process, certs):  # noqa: F811
    server = serve_process(*tls_args(certs), "--workers", "1")
    uid, data, ds = ct_bytes(PatientID="TLSRECORDS")
    rq = pdu.associate_rq([(1, pdu.CT_IMAGE_STORAGE, [pdu.EXPLICIT_LE])])
    with _tls_peer(server.port, certs) as peer:
        for i in range(0, len(rq) - 3, 3):  # one TLS record each
            peer.send(rq[i:i + 3])
        rest = rq[len(range(0, len(rq) - 3, 3)) * 3:]
        assert _associate_and_store(peer, uid, data, rest) == SUCCESS, server.log()
        assert peer.release()
    assert ct_path(server.out, ds).is_file()


def test_tls_request_larger_than_the_peek_limit(serve_process, certs):  # noqa: F811
    """An A-ASSOCIATE-RQ over 64 KiB (many transfer syntaxes), then a store."""
    server = serve_process(*tls_args(certs), "--workers", "1")
    uid, data, ds = ct_bytes(PatientID="TLSBIGRQ")
    filler = [f"1.2.3.{i}" for i in range(2500)]
    contexts = [(1, pdu.CT_IMAGE_STORAGE, [pdu.EXPLICIT_LE] + filler[:2400])]
    contexts += [(k, pdu.VERIFICATION, filler[:2400]) for k in (3, 5, 7)]
    rq = pdu.associate_rq(contexts)
    assert len(rq) > REQUEST_PEEK_LIMIT
    with _tls_peer(server.port, certs) as peer:
        assert _associate_and_store(peer, uid, data, rq) == SUCCESS, server.log()
        assert peer.release()
    assert ct_path(server.out, ds).is_file()
    assert "Traceback" not in server.log()


def _only_the_bound_waits(server, host: str) -> list[socket.socket]:
    """Once a churn of connections from `host` is seen through (bounded: 20 s),
    `host` may again hold exactly PENDING_PER_HOST waiting connections and one
    more is closed at once. Returns the connections it opened (the caller closes them)."""
    deadline = time.monotonic() + 20
    while True:  # the churn is seen through once its threads end
        probe = [_connect(server.port, host) for _ in range(PENDING_PER_HOST)]
        closed = _closed_by_server(probe, 1.0)
        if not closed or time.monotonic() > deadline:
            break
        for s in probe:
            s.close()
        time.sleep(0.5)
    try:
        assert not closed, f"{len(closed)} of {PENDING_PER_HOST} closed after the churn\n{server.log()}"
        one_more = _connect(server.port, host)
        probe.append(one_more)
        assert _closed_by_server([one_more], 5.0) == {one_more}, "one more connection stayed open"
    except BaseException:
        for s in probe:
            s.close()
        raise
    return probe


def test_tls_churn_leaves_no_count_behind(serve_process, certs):  # noqa: F811
    """200 short-lived connections from one address on a TLS port: closed at once,
    reset, failed handshakes, handshakes then closed, non-requests. Afterwards
    the address may again have exactly PENDING_PER_HOST waiting, and another
    address still stores."""
    server = serve_process(*tls_args(certs), "--workers", "1", "--acse-timeout", "30")
    ctx = client_tls(certs)
    rogue = client_tls(certs, "rogue")
    for i in range(200):
        s = _connect(server.port, "127.0.0.2", reset=i % 5 == 1)
        try:
            if i % 5 == 2:
                s.sendall(b"\x16\x03\x01\x00\x05garbage")
            elif i % 5 == 3:
                t = (ctx if i % 2 else rogue).wrap_socket(s, server_hostname="localhost")
                t.sendall(pdu.release_rq())
                s = t
            elif i % 5 == 4:
                t = ctx.wrap_socket(s, server_hostname="localhost")
                t.sendall(pdu.associate_rq([(1, pdu.CT_IMAGE_STORAGE, [pdu.EXPLICIT_LE])])[:20])
                s = t
        except (OSError, ssl.SSLError):
            pass
        s.close()
    socks = _only_the_bound_waits(server, "127.0.0.2")
    try:
        still_stores_over_tls(server, certs, "AFTERCHURN")  # from 127.0.0.1: another address
    finally:
        for s in socks:
            s.close()
    assert "Traceback" not in server.log()


def test_tls_store_of_several_files_with_dcmtk(serve_process, certs):  # noqa: F811
    """DCMTK's storescu over TLS, three files on one association: each request
    read ahead and given back, then every P-DATA after it, in order."""
    import pydicom
    from test_security import run_dcmtk, stored_path

    from conftest import TEST_FILES, dcmtk_tool

    files = [TEST_FILES / name for name in ("CT_small.dcm", "MR_small.dcm", "SC_rgb_small_odd.dcm")]
    server = serve_process(*tls_args(certs), "--workers", "1")
    proc = run_dcmtk(dcmtk_tool("storescu"), "+tls", certs / "client.key", certs / "client.crt",
                     "+cf", certs / "ca.crt", "-aet", "DCMTKTLS", "-aec", "SORTSCP",
                     "127.0.0.1", server.port, *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr + server.log()
    for f in files:
        sent = pydicom.dcmread(f)
        stored = pydicom.dcmread(stored_path(server.out, sent))
        assert stored.SOPInstanceUID == sent.SOPInstanceUID
        assert stored.PixelData == sent.PixelData, f


def test_tls_request_announcing_more_than_a_pdu_may_be_is_refused(serve_process, certs):  # noqa: F811
    """A request header announcing 2 MiB (over the 1 MiB any non-data PDU may be):
    refused with an A-ABORT from its header alone, as on a plain port."""
    server = serve_process(*tls_args(certs), "--workers", "1")
    with _tls_peer(server.port, certs) as peer:
        peer.send(struct.pack(">BBI", pdu.A_ASSOCIATE_RQ, 0, 2 << 20) + bytes(100))
        answer = peer.read_pdu(timeout=10)
        assert answer.kind == pdu.A_ABORT, f"PDU type {answer.kind:#x}\n{server.log()}"
        assert peer.closed_within(5) is not None
    assert "Traceback" not in server.log()
    still_stores_over_tls(server, certs, "AFTERHUGE")


def test_plain_churn_leaves_no_count_behind(serve_process):
    """As the TLS churn, on a plain port: 200 connections from one address that
    reset at once, close at once, send half a header, or a PDU that is not a
    request; then that address may again hold PENDING_PER_HOST waiting."""
    server = serve_process("--workers", "1", "--acse-timeout", "30")
    for i in range(200):
        s = _connect(server.port, "127.0.0.2", reset=i % 4 == 0)
        try:
            if i % 4 == 2:
                s.sendall(b"\x01\x00\x00")
            elif i % 4 == 3:
                s.sendall(pdu.release_rq())
        except OSError:
            pass
        s.close()
    for s in _only_the_bound_waits(server, "127.0.0.2"):
        s.close()
    assert "Traceback" not in server.log()


def test_tls_port_probes_that_send_nothing_are_not_logged(serve_process, certs):  # noqa: F811
    """A health check that connects and closes (or resets) a TLS port gets no
    line, as on a plain port; a client that starts a handshake and fails it
    still gets one; the server keeps serving."""
    server = serve_process(*tls_args(certs), "--workers", "1")
    for i in range(20):
        s = _connect(server.port, "127.0.0.1", reset=i % 2 == 1)
        s.close()
    bad = _connect(server.port, "127.0.0.1")
    bad.sendall(b"\x16\x03\x01\x00\x05garbage")
    assert _closed_by_server([bad], 10.0) == {bad}
    bad.close()
    still_stores_over_tls(server, certs, "AFTERPROBES")
    wait_until(lambda: "TLS handshake" in server.log(), timeout=10, what="the handshake line")
    lines = [line for line in server.log().splitlines() if "TLS handshake" in line]
    assert len(lines) == 1, server.log()  # the garbage sender's, not the 20 probes'
    assert "Traceback" not in server.log()

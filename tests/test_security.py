"""Who may send, and over what: the calling-AE allow-list, the called AE title,
TLS with and without client certificates, and unusable TLS files.

Every test runs ``sortscp serve`` in a child process on 127.0.0.1 and talks to
it with pynetdicom's SCU or DCMTK's tools.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from conftest import DCMTK_ENV, TEST_FILES, cli_env, dcmtk_tool, free_port, run_cli
from serve_helpers import wait_until

CT = TEST_FILES / "CT_small.dcm"
#: Seconds any single network step of a test may take before it is a failure.
STEP = 20.0
#: A-ASSOCIATE-RJ (result, source, reason): calling / called AE title not recognized.
RJ_CALLING_AET = (0x01, 0x01, 0x03)
RJ_CALLED_AET = (0x01, 0x01, 0x07)

SUCCESS = 0x0000


def layout_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.dcm") if ".sortscp-tmp" not in p.parts)


def stored_path(out: Path, ds: pydicom.Dataset) -> Path:
    """Where the default template puts `ds` (found by its unique file name)."""
    found = [p for p in layout_files(out) if p.name == f"{ds.SOPInstanceUID}.dcm"]
    assert len(found) == 1, f"expected one {ds.SOPInstanceUID}.dcm, found {found}"
    return found[0]


class Result:
    """What a pynetdicom SCU saw: association accepted/rejected and DIMSE statuses."""

    def __init__(self) -> None:
        self.established = False
        self.rejected: tuple[int, int, int] | None = None
        self.aborted = False
        self.statuses: list[int | None] = []

    def __repr__(self) -> str:
        return (f"Result(established={self.established}, rejected={self.rejected}, "
                f"aborted={self.aborted}, statuses={self.statuses})")


def scu(
    port: int,
    calling: str = "PYSCU",
    called: str = "SORTSCP",
    *,
    tls: ssl.SSLContext | None = None,
    store: pydicom.Dataset | None = None,
) -> Result:
    """Associate, C-ECHO, optionally C-STORE `store`, release."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = STEP
    result = Result()
    assoc = ae.associate("127.0.0.1", port, ae_title=called,
                         tls_args=(tls, "localhost") if tls else None)
    result.established = assoc.is_established
    if assoc.is_established:
        result.statuses.append(getattr(assoc.send_c_echo(), "Status", None))
        if store is not None:
            result.statuses.append(getattr(assoc.send_c_store(store), "Status", None))
        assoc.release()
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        result.rejected = (rj.result, rj.result_source, rj.diagnostic)
    result.aborted = assoc.is_aborted
    return result


def ct_instance(uid_suffix: str) -> pydicom.Dataset:
    """CT_small with a new SOP Instance UID (so each test's file is its own)."""
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{uid_suffix}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def run_dcmtk(tool_path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool_path, *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=DCMTK_ENV)


# --- access control -------------------------------------------------------------


def test_any_calling_aet_is_accepted_by_default(serve_process, tmp_path):
    server = serve_process()
    ds = ct_instance("1")
    result = scu(server.port, calling="ANYONE", called="NOT-OURS", store=ds)
    assert result.established and result.statuses == [SUCCESS, SUCCESS], f"{result}\n{server.log()}"
    assert stored_path(server.out, ds).is_file()


def test_allow_aet_accepts_listed_titles_and_rejects_the_rest(serve_process):
    server = serve_process(
        "--allow-aet", "GOOD", "--allow-aet", "LOCAL@127.0.0.1", "--allow-aet", "NAMED@localhost",
        "--allow-aet", "ELSEWHERE@192.0.2.10",
    )
    for n, calling in enumerate(("GOOD", "LOCAL", "NAMED")):
        ds = ct_instance(f"1{n}")
        result = scu(server.port, calling=calling, store=ds)
        assert result.statuses == [SUCCESS, SUCCESS], f"{calling}: {result}\n{server.log()}"
        assert stored_path(server.out, ds).is_file()
    for calling in ("EVIL", "ELSEWHERE", "good", "GOODX"):
        result = scu(server.port, calling=calling, store=ct_instance("9"))
        assert not result.established and result.rejected == RJ_CALLING_AET, f"{calling}: {result}"
    assert len(layout_files(server.out)) == 3
    log = server.log()
    assert "rejected association from 'EVIL' (127.0.0.1): calling AE title not allowed" in log, log
    assert "Traceback" not in log, log


def test_allow_aet_from_the_environment_splits_on_commas_and_spaces(serve_process):
    env = dict(cli_env(), SORTSCP_ALLOW_AET="FIRST, SECOND  THIRD@127.0.0.1")
    server = serve_process(env=env)
    for calling in ("FIRST", "SECOND", "THIRD"):
        assert scu(server.port, calling=calling).statuses == [SUCCESS], calling
    assert scu(server.port, calling="FOURTH").rejected == RJ_CALLING_AET


def test_the_docker_health_check_gets_in_with_the_allow_list_the_readme_gives(serve_process):
    """README "Docker": with an allow list, HEALTHCHECK@127.0.0.1 lets the image's
    check (the same `sortscp echo` command line) in, and no one else by that title."""
    env = dict(cli_env(), SORTSCP_ALLOW_AET="MOD1 HEALTHCHECK@127.0.0.1")
    server = serve_process(env=env)
    check = ("echo", "127.0.0.1", server.port, "--called-aet", "SORTSCP", "--timeout", "10")
    ok = run_cli(*check, "--aet", "HEALTHCHECK", timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr + server.log()
    refused = run_cli(*check, "--aet", "OTHERCHECK", timeout=60)
    assert refused.returncode == 1 and "rejected" in refused.stderr, refused.stdout + refused.stderr


def test_allow_aet_rejects_dcmtk_senders_not_listed(serve_process):
    storescu = dcmtk_tool("storescu")
    echoscu = dcmtk_tool("echoscu")
    server = serve_process("--allow-aet", "DCMTKOK")
    bad = run_dcmtk(echoscu, "-aet", "INTRUDER", "-aec", "SORTSCP", "127.0.0.1", server.port)
    assert bad.returncode != 0, bad.stdout + bad.stderr
    assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
    good = run_dcmtk(storescu, "-aet", "DCMTKOK", "-aec", "SORTSCP", "127.0.0.1", server.port, CT)
    assert good.returncode == 0, good.stdout + good.stderr
    assert stored_path(server.out, pydicom.dcmread(CT)).is_file()


def test_require_called_aet(serve_process):
    server = serve_process("--aet", "FILER", "--require-called-aet")
    assert scu(server.port, called="FILER").statuses == [SUCCESS]
    wrong = scu(server.port, called="SOMEONEELSE")
    assert not wrong.established and wrong.rejected == RJ_CALLED_AET, wrong


@pytest.mark.parametrize("entry", ["", "@127.0.0.1", "TOOLONGAETITLE_XYZ", "A@no-such-host.invalid"])
def test_bad_allow_aet_is_a_clear_startup_error(tmp_path, entry):
    proc = run_cli("serve", "--out", tmp_path / "out", "--host", "127.0.0.1", "--port", free_port(),
                   "--allow-aet", entry, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "--allow-aet" in output and "Traceback" not in output, output


# --- TLS ------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"openssl {' '.join(args)}:\n{proc.stderr}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate
    signed by the CA, and a self-signed 'rogue' client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (apt-get install openssl)")
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=sortscp test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    exts = {
        "server": "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                  "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        "client": "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                  "extendedKeyUsage=clientAuth\n",
    }
    for name, ext in exts.items():
        (d / f"{name}.ext").write_text(ext)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
                 cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out",
             "rogue.crt", "-days", "2", "-subj", "/CN=rogue", cwd=d)
    return d


def client_tls(certs: Path, cert: str | None = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.crt"))
    if cert:
        ctx.load_cert_chain(certs / f"{cert}.crt", certs / f"{cert}.key")
    return ctx


def tls_args(certs: Path, ca: bool = True) -> list[str]:
    args = ["--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key")]
    return args + (["--tls-ca", str(certs / "ca.crt")] if ca else [])


def test_tls_store_with_a_client_certificate(serve_process, certs):
    server = serve_process(*tls_args(certs))
    ds = ct_instance("21")
    result = scu(server.port, tls=client_tls(certs), store=ds)
    assert result.statuses == [SUCCESS, SUCCESS], f"{result}\n{server.log()}"
    stored = pydicom.dcmread(stored_path(server.out, ds))
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.PixelData == ds.PixelData
    assert "(TLS)" in server.log()


def test_tls_store_with_dcmtk(serve_process, certs):
    storescu = dcmtk_tool("storescu")
    server = serve_process(*tls_args(certs))
    proc = run_dcmtk(storescu, "+tls", certs / "client.key", certs / "client.crt",
                     "+cf", certs / "ca.crt", "-aet", "DCMTKTLS", "-aec", "SORTSCP",
                     "127.0.0.1", server.port, CT)
    assert proc.returncode == 0, proc.stdout + proc.stderr + server.log()
    stored = pydicom.dcmread(stored_path(server.out, pydicom.dcmread(CT)))
    assert stored.file_meta.SourceApplicationEntityTitle == "DCMTKTLS"


@pytest.mark.parametrize("client_cert", [None, "rogue"], ids=["no-certificate", "rogue-certificate"])
def test_tls_refuses_clients_without_a_valid_certificate(serve_process, certs, client_cert):
    server = serve_process(*tls_args(certs))
    result = scu(server.port, tls=client_tls(certs, client_cert), store=ct_instance("22"))
    assert not result.established and result.statuses == [], result
    assert layout_files(server.out) == []
    # the client can see the alert before the server has written its line
    wait_until(lambda: "TLS handshake with 127.0.0.1" in server.log(), timeout=STEP, what="the handshake line")
    # ... and the server keeps serving a client with a valid certificate
    assert scu(server.port, tls=client_tls(certs)).statuses == [SUCCESS]


def test_tls_refuses_a_rogue_dcmtk_sender(serve_process, certs):
    storescu = dcmtk_tool("storescu")
    server = serve_process(*tls_args(certs))
    proc = run_dcmtk(storescu, "+tls", certs / "rogue.key", certs / "rogue.crt",
                     "+cf", certs / "ca.crt", "-to", "10", "-ta", "10",
                     "127.0.0.1", server.port, CT)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert layout_files(server.out) == []


def test_tls_without_ca_accepts_clients_without_certificates(serve_process, certs):
    server = serve_process(*tls_args(certs, ca=False))
    assert scu(server.port, tls=client_tls(certs, None)).statuses == [SUCCESS]


def test_plain_client_on_the_tls_port_is_refused(serve_process, certs):
    server = serve_process(*tls_args(certs))
    result = scu(server.port, store=ct_instance("23"))
    assert not result.established, result
    assert layout_files(server.out) == []
    assert scu(server.port, tls=client_tls(certs)).statuses == [SUCCESS]


def test_a_silent_client_does_not_block_a_tls_store(serve_process, certs):
    """pynetdicom's stock server does the TLS handshake in its accept loop with
    no timeout: one silent connection stalls every later association."""
    server = serve_process(*tls_args(certs), "--acse-timeout", "60", "--network-timeout", "60")
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=STEP)
    try:
        box: list[Result] = []
        ds = ct_instance("24")
        sender = threading.Thread(
            target=lambda: box.append(scu(server.port, tls=client_tls(certs), store=ds)), daemon=True
        )
        sender.start()
        sender.join(STEP * 2)
        assert not sender.is_alive(), "the TLS store was blocked by the silent connection"
        assert box[0].statuses == [SUCCESS, SUCCESS], f"{box}\n{server.log()}"
        assert stored_path(server.out, ds).is_file()
    finally:
        silent.close()


BAD_TLS = {
    "missing-cert": (lambda c: ["--tls-cert", c / "nope.crt", "--tls-key", c / "server.key"], "no such file"),
    "cert-not-pem": (lambda c: ["--tls-cert", c / "server.ext", "--tls-key", c / "server.key"], "not a PEM certificate"),
    "key-not-pem": (lambda c: ["--tls-cert", c / "server.crt", "--tls-key", c / "server.csr"], "not an unencrypted PEM private key"),
    "key-mismatch": (lambda c: ["--tls-cert", c / "server.crt", "--tls-key", c / "client.key"], "does not belong"),
    "ca-not-pem": (lambda c: ["--tls-cert", c / "server.crt", "--tls-key", c / "server.key", "--tls-ca", c / "server.key"], "--tls-ca"),
    "key-without-cert": (lambda c: ["--tls-key", c / "server.key"], "need --tls-cert"),
}


@pytest.mark.parametrize("case", sorted(BAD_TLS))
def test_bad_tls_files_are_a_clear_startup_error(tmp_path, certs, case):
    args, expected = BAD_TLS[case]
    port = free_port()
    proc = run_cli("serve", "--out", tmp_path / "out", "--host", "127.0.0.1", "--port", port,
                   *args(certs), timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert expected in output, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "ERROR" in line or line.startswith("Error")]
    assert len(errors) == 1, output


def _tls_peer(port: int, certs: Path):
    import pdu

    peer = pdu.Peer(port, timeout=10)
    peer.sock = client_tls(certs).wrap_socket(peer.sock, server_hostname="localhost")
    return peer


def test_tls_peer_dripping_its_request_is_closed_after_the_acse_timeout(serve_process, certs):
    """With TLS the request cannot be peeked at: the connection's thread reads it
    before it becomes an association, within the ACSE timeout in total."""
    import time

    import pdu

    server = serve_process(*tls_args(certs), "--acse-timeout", "2", "--workers", "1")
    rq = pdu.associate_rq([(1, pdu.CT_IMAGE_STORAGE, [pdu.EXPLICIT_LE])])
    with _tls_peer(server.port, certs) as peer:
        start = time.monotonic()
        closed = None
        for i in range(40):  # 20 s at most
            try:
                peer.send(rq[i:i + 1])
            except OSError:
                closed = time.monotonic() - start
                break
            if peer.closed_within(0.5) is not None:
                closed = time.monotonic() - start
                break
    assert closed is not None, f"a TLS peer dripping its A-ASSOCIATE-RQ was never closed\n{server.log()}"
    assert closed < 2 + 4, f"closed only after {closed:.1f} s"
    result = scu(server.port, tls=client_tls(certs), store=ct_instance("31"))
    assert result.statuses == [SUCCESS, SUCCESS], f"{result}\n{server.log()}"


@pytest.mark.parametrize("peer_does", ["nothing", "drips-its-request"])
def test_a_tls_peer_without_its_whole_request_holds_no_slot(serve_process, certs, peer_does):
    """With one association slot, a peer that completed its TLS handshake and then
    says nothing, or sends its A-ASSOCIATE-RQ a byte at a time, must not keep a
    real sender out for the ACSE timeout: a connection becomes an association only
    once its whole request is there, with TLS as without."""
    import time

    import pdu

    server = serve_process(*tls_args(certs), "--max-associations", "1", "--acse-timeout", "30",
                           "--workers", "1")
    rq = pdu.associate_rq([(1, pdu.CT_IMAGE_STORAGE, [pdu.EXPLICIT_LE])])
    stop = threading.Event()
    ds = ct_instance("41" if peer_does == "nothing" else "42")
    with _tls_peer(server.port, certs) as peer:

        def drip() -> None:
            for i in range(len(rq) - 1):  # never the last byte
                if stop.wait(0.2):
                    return
                try:
                    peer.send(rq[i:i + 1])
                except OSError:
                    return

        dripper = threading.Thread(target=drip, daemon=True)
        if peer_does == "drips-its-request":
            dripper.start()
        time.sleep(1.0)  # its handshake is long done, its request not
        try:
            result = scu(server.port, tls=client_tls(certs), store=ds)
        finally:
            stop.set()
            if dripper.is_alive():
                dripper.join(5)
    assert result.rejected is None, f"the real sender was rejected: {result}\n{server.log()}"
    assert result.statuses == [SUCCESS, SUCCESS], f"{result}\n{server.log()}"
    assert stored_path(server.out, ds).is_file()


def test_a_tls_peer_whose_first_pdu_is_not_a_request_is_refused(serve_process, certs):
    """As on a plain port: refused at once with an A-ABORT and one log line, before
    it becomes an association."""
    import pdu

    server = serve_process(*tls_args(certs), "--workers", "1")
    with _tls_peer(server.port, certs) as peer:
        peer.send(pdu.release_rq())
        answer = peer.read_pdu(timeout=10)
        assert answer.kind == pdu.A_ABORT, f"expected an A-ABORT, got PDU type {answer.kind:#x}"
        assert peer.closed_within(5) is not None, "the connection stayed open"
    wait_until(lambda: "is not an A-ASSOCIATE-RQ" in server.log(), timeout=STEP, what="the refusal line")
    lines = [line for line in server.log().splitlines() if "is not an A-ASSOCIATE-RQ" in line]
    assert len(lines) == 1, server.log()
    assert "(type 0x05)" in lines[0], lines[0]
    assert "Traceback" not in server.log()
    result = scu(server.port, tls=client_tls(certs), store=ct_instance("43"))
    assert result.statuses == [SUCCESS, SUCCESS], f"{result}\n{server.log()}"


@pytest.mark.parametrize("drip", ["whole-pdus", "inside-one-pdu"])
def test_tls_peer_dripping_its_dataset_is_cut_off(serve_process, certs, drip):
    """A byte every 0.5 s, as P-DATA PDUs of one byte each, or as the body of one
    P-DATA PDU (the network thread then sits in pynetdicom's blocking TLS read)."""
    import time

    import pdu

    server = serve_process(*tls_args(certs), "--dimse-timeout", "2", "--workers", "1")
    with _tls_peer(server.port, certs) as peer:
        cid = peer.associate([(1, pdu.CT_IMAGE_STORAGE, [pdu.EXPLICIT_LE])]).accepted_ids()[0]
        peer.send_command(cid, pdu.c_store_rq(pdu.CT_IMAGE_STORAGE, pydicom.uid.generate_uid()))
        start = time.monotonic()
        cut = None
        if drip == "inside-one-pdu":
            whole = pdu.p_data((cid, 0, bytes(100)))
            peer.send(whole[:12])
            drips = [whole[i:i + 1] for i in range(12, len(whole))]
        else:
            drips = [pdu.p_data((cid, 0, b"\x08"))] * 40
        for chunk in drips[:40]:  # 20 s at most
            try:
                peer.send(chunk)
            except OSError:
                cut = time.monotonic() - start
                break
            if peer.closed_within(0.5) is not None:
                cut = time.monotonic() - start
                break
    assert cut is not None, f"a TLS peer dripping its dataset was never cut off\n{server.log()}"
    assert cut < 2 + 5, f"cut off only after {cut:.1f} s"
    wait_until(lambda: "DIMSE message still incomplete" in server.log(), timeout=STEP, what="the timeout line")

"""The event-driven network threads of scp.net._pynetdicom, on real sockets.

Every test runs an in-process AE on 127.0.0.1 with ``install_network_threads()``
active and talks to it with a real pynetdicom SCU, DCMTK's storescu or a raw
socket that speaks (or misspeaks) the upper layer protocol. No mocks. The
timers pynetdicom keeps (ARTIM, ACSE, DIMSE and network timeouts, abort,
release) must still fire on the new threads; the PDU size cap and the
message progress rule are checked here too.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import CTImageStorage, Verification

from scp.net import _pynetdicom as net
from scp.net._pynetdicom import DULServiceProvider

from localnet import DCMTK_ENV, dcmtk

HOST = "127.0.0.1"
CT_FILE = get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module", autouse=True)
def installed():
    was = net.network_threads_installed()
    net.install_network_threads()
    old = _config.STORE_RECV_CHUNKED_DATASET
    _config.STORE_RECV_CHUNKED_DATASET = True
    yield
    _config.STORE_RECV_CHUNKED_DATASET = old
    if not was:
        net.uninstall_network_threads()


class Server:
    """An in-process SCP (Verification + CT Image Storage) counting what it gets."""

    def __init__(self, *, acse_timeout=30, network_timeout=60, echo_delay=0.0,
                 max_pdu=16382) -> None:
        self.stored = 0
        self.aborted: list[float] = []
        self.lock = threading.Lock()
        self.echo_delay = echo_delay
        ae = AE(ae_title="FASTSCP")
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage)
        ae.acse_timeout = acse_timeout
        ae.network_timeout = network_timeout
        ae.maximum_pdu_size = max_pdu
        ae.maximum_associations = 16
        self.ae = ae
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_C_ECHO, self._echo),
                    (evt.EVT_ABORTED, self._abort)]
        self.server = ae.start_server((HOST, 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _store(self, event):
        _ = event.dataset  # decodes the chunked temp file: the data really arrived
        with self.lock:
            self.stored += 1
        return 0x0000

    def _echo(self, event):
        time.sleep(self.echo_delay)
        return 0x0000

    def _abort(self, event):
        self.aborted.append(time.monotonic())

    def close(self) -> None:
        self.ae.shutdown()


@pytest.fixture
def server():
    servers: list[Server] = []

    def make(**kwargs) -> Server:
        s = Server(**kwargs)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def scu(**timeouts) -> AE:
    ae = AE(ae_title="FASTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    for name, value in timeouts.items():
        setattr(ae, name, value)
    return ae


# --------------------------------------------------------------------------- raw upper layer


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def associate_rq(called: str = "FASTSCP", calling: str = "RAWPEER", max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification (context 1), encoded by hand."""
    ctx = _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2")
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, b"1.2.3.4")
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
            + b"\0" * 32 + _item(0x10, b"1.2.840.10008.3.1.1.1")
            + _item(0x20, bytes([1, 0, 0, 0]) + ctx) + _item(0x50, user))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


RELEASE_RQ = struct.pack(">BBL", 0x05, 0, 4) + b"\0" * 4


def read_pdu(sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    kind, _, length = struct.unpack(">BBL", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return kind, body


def wait_closed(sock: socket.socket, limit: float) -> float:
    """Seconds until the peer closes `sock` (reading and dropping anything it sends)."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        pytest.fail(f"connection still open after {limit} s")
    return time.monotonic() - start


def raw_associated(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port))
    sock.sendall(associate_rq())
    kind, _ = read_pdu(sock)
    assert kind == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {kind:#x}"
    return sock


# --------------------------------------------------------------------------- tests


def test_check_passes_and_install_is_idempotent():
    net.check()
    net.install_network_threads()
    net.install_network_threads()
    assert net.network_threads_installed()
    assert DULServiceProvider.run_reactor is net._dul_run_reactor
    net.check()  # still passes with the patches in place


def test_check_names_a_missing_internal():
    saved = DULServiceProvider.__dict__["_process_recv_primitive"]
    del DULServiceProvider._process_recv_primitive
    try:
        with pytest.raises(net.PynetdicomMismatch) as info:
            net.check()
    finally:
        DULServiceProvider._process_recv_primitive = saved
    msg = str(info.value)
    assert "\n" not in msg
    assert "lacks DULServiceProvider._process_recv_primitive" in msg and "3.0.x" in msg


def test_uninstall_restores_and_reinstall_works():
    from pynetdicom.association import Association

    net.uninstall_network_threads()
    try:
        assert Association._run_reactor is net._ORIGINALS[(Association, "_run_reactor")]
        assert not net.network_threads_installed()
    finally:
        net.install_network_threads()
    assert Association._run_reactor is net._assoc_run_reactor


@pytest.mark.parametrize("n", [1, 4])
def test_echo_and_store_pynetdicom_scu(server, n):
    srv = server()
    ds = pydicom.dcmread(CT_FILE)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            assoc = scu().associate(HOST, srv.port, ae_title="FASTSCP")
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0
            for _ in range(10):
                assert assoc.send_c_store(ds).Status == 0
            assoc.release()
            assert assoc.is_released
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert srv.stored == 10 * n
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("n", [1, 4])
def test_store_dcmtk_storescu(server, tmp_path, n):
    storescu = dcmtk("storescu")
    if storescu is None:
        pytest.skip("DCMTK storescu not installed")
    srv = server()
    ds = pydicom.dcmread(CT_FILE)
    folders = []
    for i in range(n):
        folder = tmp_path / f"f{i}"
        folder.mkdir()
        for j in range(5):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            ds.save_as(folder / f"IM{j}", enforce_file_format=True)
        folders.append(folder)
    procs = [subprocess.Popen([storescu, "+sd", "+r", "-aec", "FASTSCP", HOST, str(srv.port),
                               str(f)], env=DCMTK_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for f in folders]
    for p in procs:
        out = p.communicate(timeout=60)[0]
        assert p.returncode == 0, out
    assert srv.stored == 5 * n


def test_acse_timeout_half_associate_rq(server):
    srv = server(acse_timeout=1)
    sock = socket.create_connection((HOST, srv.port))
    rq = associate_rq()
    sock.sendall(rq[: len(rq) // 2])  # then nothing: stock pynetdicom blocks in recv here
    elapsed = wait_closed(sock, 5)
    assert 0.7 < elapsed < 2.5, elapsed
    sock.close()


def test_artim_connection_without_pdu(server):
    srv = server(acse_timeout=1)
    sock = socket.create_connection((HOST, srv.port))
    elapsed = wait_closed(sock, 5)
    assert 0.7 < elapsed < 2.5, elapsed
    sock.close()


def test_artim_after_release_silent_peer(server):
    """Sta13 (A-RELEASE-RP sent, ARTIM running): a peer that keeps the connection
    open is not waited for beyond ARTIM (pynetdicom closes once nothing is pending)."""
    srv = server(acse_timeout=1)
    sock = raw_associated(srv.port)
    sock.sendall(RELEASE_RQ)
    kind, _ = read_pdu(sock)
    assert kind == 0x06  # A-RELEASE-RP
    elapsed = wait_closed(sock, 5)
    assert elapsed < 1.5, elapsed
    sock.close()


def test_network_timeout_aborts_idle_peer(server):
    srv = server(network_timeout=1)
    assoc = scu().associate(HOST, srv.port, ae_title="FASTSCP")
    assert assoc.is_established
    start = time.monotonic()
    while assoc.is_established and time.monotonic() - start < 5:
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    assert assoc.is_aborted
    assert 0.7 < elapsed < 2.5, elapsed


def test_dimse_timeout_on_the_scu(server):
    srv = server(echo_delay=2.0)
    assoc = scu(dimse_timeout=0.5).associate(HOST, srv.port, ae_title="FASTSCP")
    assert assoc.is_established
    start = time.monotonic()
    status = assoc.send_c_echo()
    elapsed = time.monotonic() - start
    assert "Status" not in status  # no response
    assert assoc.is_aborted
    assert 0.4 < elapsed < 1.5, elapsed


def test_peer_abort_noticed_at_once(server):
    srv = server()
    assoc = scu().associate(HOST, srv.port, ae_title="FASTSCP")
    assert assoc.is_established
    time.sleep(0.3)  # both reactors idle (waiting)
    start = time.monotonic()
    assoc.abort()
    deadline = start + 2
    while not srv.aborted and time.monotonic() < deadline:
        time.sleep(0.005)
    assert srv.aborted
    assert srv.aborted[0] - start < 1.0  # not left to a timer (the network timeout is 60 s)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_oversized_pdata_is_aborted_without_buffering(server):
    srv = server()
    sock = raw_associated(srv.port)
    before = _rss_mib()
    start = time.monotonic()
    sock.sendall(struct.pack(">BBL", 0x04, 0, 400 * 1024 * 1024))
    sent = 0
    try:
        sock.settimeout(5)
        chunk = b"\0" * 65536
        while sent < 64 * 1024 * 1024 and time.monotonic() - start < 5:
            sock.sendall(chunk)
            sent += len(chunk)
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass
    # We are answered with an A-ABORT (unless the reset beat it) and the connection closes.
    try:
        kind, _ = read_pdu(sock, timeout=3)
        assert kind == 0x07
    except (ConnectionError, OSError):
        pass
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, elapsed
    assert sent < 64 * 1024 * 1024  # refused long before the body ended
    deadline = time.monotonic() + 3
    while not srv.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.aborted
    assert _rss_mib() - before < 50
    sock.close()


def test_oversized_associate_rq_is_aborted(server):
    # Before association pynetdicom's association thread waits acse_timeout for an
    # A-ASSOCIATE indication that will not come (stock does the same): keep it short.
    srv = server(acse_timeout=1)
    sock = socket.create_connection((HOST, srv.port))
    sock.sendall(struct.pack(">BBL", 0x01, 0, 50 * 1024 * 1024))
    start = time.monotonic()
    kind, _ = read_pdu(sock, timeout=3)
    assert kind == 0x07
    wait_closed(sock, 3)
    assert time.monotonic() - start < 1.5
    sock.close()



def _store_rq(uid: str) -> bytes:
    """A C-STORE-RQ command set (CT Image Storage), implicit VR little endian."""
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    ds = Dataset()
    ds.AffectedSOPClassUID = CTImageStorage
    ds.CommandField = 0x0001
    ds.MessageID = 1
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000
    ds.AffectedSOPInstanceUID = uid
    ds.CommandGroupLength = len(encode(ds, True, True))
    return encode(ds, True, True)


def _pdata(cid: int, header: int, data: bytes) -> bytes:
    body = struct.pack(">IBB", len(data) + 2, cid, header) + data
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def associate_ct(port: int) -> socket.socket:
    """A raw association proposing CT Image Storage (explicit VR LE) as context 1."""
    ctx = _item(0x30, CTImageStorage.encode()) + _item(0x40, b"1.2.840.10008.1.2.1")
    user = _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.3.4")
    body = (struct.pack(">HH", 1, 0) + b"FASTSCP".ljust(16) + b"RAWPEER".ljust(16) + b"\0" * 32
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + _item(0x20, bytes([1, 0, 0, 0]) + ctx)
            + _item(0x50, user))
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(struct.pack(">BBL", 0x01, 0, len(body)) + body)
    kind, _ = read_pdu(sock)
    assert kind == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {kind:#x}"
    return sock


def _big_dataset() -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(CT_FILE)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.PixelData = bytes(1 << 20)
    ds.Rows, ds.Columns = 512, 1024
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def test_dripping_message_is_aborted_after_the_dimse_timeout(server):
    """One byte of dataset per 0.2 s keeps the idle timer happy, not the progress rule."""
    srv = server(network_timeout=60)
    srv.ae.dimse_timeout = 1
    srv.server.ae.dimse_timeout = 1
    sock = associate_ct(srv.port)
    sock.sendall(_pdata(1, 0x03, _store_rq(pydicom.uid.generate_uid())))
    start = time.monotonic()
    cut = None
    for _ in range(50):  # 10 s at most
        try:
            sock.sendall(_pdata(1, 0x00, b"\x08"))
        except OSError:
            cut = time.monotonic() - start
            break
        sock.settimeout(0.2)
        try:
            if sock.recv(65536) == b"":
                cut = time.monotonic() - start
                break
        except TimeoutError:
            pass
        except OSError:
            cut = time.monotonic() - start
            break
    sock.close()
    assert cut is not None, "a dripping message was never cut off"
    assert 0.8 < cut < 4, cut
    deadline = time.monotonic() + 3
    while not srv.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.aborted and srv.stored == 0


def test_message_slower_than_the_dimse_timeout_but_steady_is_received(server):
    """The rule is a minimum rate, not a total deadline: 1 MiB over ~1.5 s passes
    with a 0.5 s DIMSE timeout."""
    srv = server()
    srv.server.ae.dimse_timeout = 0.5
    data = _big_dataset()
    sock = associate_ct(srv.port)
    sock.sendall(_pdata(1, 0x03, _store_rq(pydicom.uid.generate_uid())))
    chunks = [data[i:i + 16000] for i in range(0, len(data), 16000)]
    start = time.monotonic()
    for i, chunk in enumerate(chunks):
        sock.sendall(_pdata(1, 0x02 if i == len(chunks) - 1 else 0x00, chunk))
        time.sleep(1.5 / len(chunks))
    kind, _ = read_pdu(sock, timeout=10)
    took = time.monotonic() - start
    assert kind == 0x04, f"expected the C-STORE-RSP (P-DATA-TF), got PDU type {kind:#x}"
    assert took > 1.0  # it did take longer than the DIMSE timeout
    assert srv.stored == 1
    sock.sendall(RELEASE_RQ)
    kind, _ = read_pdu(sock)
    assert kind == 0x06
    sock.close()


def test_unknown_pdu_type_is_aborted(server):
    srv = server()
    sock = raw_associated(srv.port)
    sock.sendall(struct.pack(">BBL", 0x09, 0, 4) + b"\0" * 4)
    kind, _ = read_pdu(sock, timeout=3)
    assert kind == 0x07
    wait_closed(sock, 3)
    sock.close()


def test_release_is_answered_and_closed(server):
    srv = server()
    sock = raw_associated(srv.port)
    sock.sendall(RELEASE_RQ)
    kind, _ = read_pdu(sock)
    assert kind == 0x06
    sock.close()
    assoc = scu().associate(HOST, srv.port, ae_title="FASTSCP")
    assert assoc.is_established
    assoc.release()
    assert assoc.is_released and not assoc.is_aborted



def test_bad_first_pdu_frees_the_association_at_once(server):
    """The DUL stops before any A-ASSOCIATE-RQ: the association thread is told at
    once instead of waiting out the ACSE timeout (30 s) with its slot."""
    srv = server(acse_timeout=30)
    sock = socket.create_connection((HOST, srv.port))
    sock.sendall(struct.pack(">BBL", 0x04, 0, 10) + b"\0" * 10)  # P-DATA-TF first
    kind, _ = read_pdu(sock, timeout=3)
    assert kind == 0x07
    wait_closed(sock, 3)
    sock.close()
    deadline = time.monotonic() + 3
    while srv.server.active_associations and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not srv.server.active_associations


@pytest.mark.parametrize("first", [
    struct.pack(">BBL", 0x04, 0, 400_000_000),  # a P-DATA-TF header instead of a request
    struct.pack(">BBL", 0x01, 0, 50 << 20),  # an A-ASSOCIATE-RQ of 50 MiB
])
def test_sortscp_transport_refuses_a_bad_first_pdu_without_a_slot(first):
    """sortscp's transport: such a peer never becomes an association; with one slot,
    a well-behaved sender associates right after."""
    from scp.net.transport import start_server

    ae = AE(ae_title="FASTSCP")
    ae.add_supported_context(Verification)
    ae.maximum_associations = 1
    ae.acse_timeout = 30
    srv = start_server(ae, (HOST, 0), [])
    try:
        port = srv.server_address[1]
        sock = socket.create_connection((HOST, port))
        sock.sendall(first)
        kind, _ = read_pdu(sock, timeout=3)
        assert kind == 0x07
        wait_closed(sock, 3)
        sock.close()
        assoc = scu().associate(HOST, port, ae_title="FASTSCP")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        ae.shutdown()


def test_shutdown_is_prompt(server):
    before = set(threading.enumerate())
    srv = Server()
    assocs = [scu().associate(HOST, srv.port, ae_title="FASTSCP") for _ in range(4)]
    assert all(a.is_established for a in assocs)
    start = time.monotonic()
    srv.ae.shutdown()
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, elapsed
    deadline = time.monotonic() + 2
    while any(a.is_established for a in assocs) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(a.is_established for a in assocs)
    left = [t for t in set(threading.enumerate()) - before if t.name.startswith("AcceptorThread")]
    for t in left:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not [t for t in left if t.is_alive()]


def _idle_cpu(port: int, seconds: float = 3.0) -> float:
    """Process CPU (fraction of one core) while 4 associations sit idle."""
    assocs = [scu().associate(HOST, port, ae_title="FASTSCP") for _ in range(4)]
    assert all(a.is_established for a in assocs)
    time.sleep(0.2)
    c0, t0 = time.process_time(), time.monotonic()
    time.sleep(seconds)
    cpu = (time.process_time() - c0) / (time.monotonic() - t0)
    for a in assocs:
        a.release()
    return cpu


def test_idle_associations_cost_little_cpu(server, record_property):
    srv = server()
    ours = _idle_cpu(srv.port)
    record_property("idle_cpu", ours)
    assert ours < 0.10


def test_zz_no_association_threads_left_behind():
    """Every association of the tests above has ended (none leaked, none hung)."""
    deadline = time.monotonic() + 5
    for t in threading.enumerate():
        if t.name.startswith(("AcceptorThread", "RequestorThread")) or isinstance(t, DULServiceProvider):
            t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threading.enumerate()
             if t.name.startswith(("AcceptorThread", "RequestorThread"))
             or isinstance(t, DULServiceProvider)]
    assert not alive, alive


# --- the C-STORE-RSP encoded by hand --------------------------------------------------


@pytest.mark.parametrize("class_uid, message_id, status, instance_uid", [
    (CTImageStorage, 1, 0x0000, "1.2.3.4"),                    # even UIDs
    ("1.2.840.10008.5.1.4.1.1.7", 65535, 0xA700, "1.2.3.45"),  # odd ones, padded
    ("1.2", 7, 0xC000, "1.23"),
    (CTImageStorage, 300, 0xA900, "2.25." + "9" * 59),          # a 64-character UID
])
def test_store_rsp_bytes_are_pynetdicoms(class_uid, message_id, status, instance_uid):
    """The command set sent for a C-STORE-RSP is, byte for byte, the one
    pynetdicom encodes with pydicom for the same primitive."""
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = class_uid
    rsp.AffectedSOPInstanceUID = instance_uid
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = list(message.encode_msg(1, 16384))
    ((_, theirs),) = pdata.presentation_data_value_list
    assert theirs == b"\x03" + net.store_rsp_command(class_uid, message_id, status, instance_uid)
    rsp.ErrorComment = "why"  # anything else goes pynetdicom's way
    assert net._plain_store_rsp(rsp) is None


def test_store_rsp_reaches_a_pynetdicom_scu_either_way():
    """A real SCU accepts the hand-encoded response (it checks the message ID
    and reads the status); with pynetdicom's debug log on, the response goes
    pynetdicom's own way and is accepted as well."""
    import logging

    ae = AE(ae_title="RSPSCP")
    ae.add_supported_context(CTImageStorage)
    server = ae.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0xA700)])
    port = server.server_address[1]
    ds = pydicom.dcmread(CT_FILE)
    try:
        for debug in (False, True):
            logger = logging.getLogger("pynetdicom")
            old = logger.level
            logger.setLevel(logging.DEBUG if debug else logging.WARNING)
            try:
                scu = AE(ae_title="RSPSCU")
                scu.add_requested_context(CTImageStorage)
                assoc = scu.associate(HOST, port, ae_title="RSPSCP")
                assert assoc.is_established
                status = assoc.send_c_store(ds, msg_id=4321)
                assoc.release()
            finally:
                logger.setLevel(old)
            assert status.Status == 0xA700
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- the C-STORE fast path


@pytest.fixture
def receiver(tmp_path):
    """Datasets streamed to sortscp's sink under tmp_path (as ``serve`` does)."""
    from scp.net import sink

    sink.install(tmp_path)
    yield tmp_path
    net.uninstall_receiver()


class RecordingServer(Server):
    """A Server whose C-STORE handler records what it was given and answers
    `status` (or raises it, if it is an exception)."""

    def __init__(self, status=0xB000, extra_handlers=(), **kwargs) -> None:
        self.status = status
        self.seen: list[tuple[str, bytes]] = []
        self.extra = list(extra_handlers)
        super().__init__(**kwargs)
        for event, handler in self.extra:
            self.server.bind(event, handler)

    def _store(self, event):
        self.seen.append((type(event.request).__name__, event.dataset_path.read_bytes()))
        _ = event.dataset
        if isinstance(self.status, BaseException):
            raise self.status
        return self.status


def _send_ct(port: int) -> int:
    ds = pydicom.dcmread(CT_FILE)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    assoc = scu().associate(HOST, port, ae_title="FASTSCP")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_a_store_skips_pynetdicoms_primitives_and_answers_the_handlers_status(receiver):
    """With the sink and our threads, the handler gets a StoreRequest (no
    C_STORE primitive is built); the status it returns, the request's UID and a
    readable dataset come through; the temporary file is removed after."""
    srv = RecordingServer(status=0xB000)
    uid = pydicom.uid.generate_uid()
    ds = pydicom.dcmread(CT_FILE)
    ds.SOPInstanceUID = uid
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    data = fp.getvalue()
    chunks = [data[i:i + 16000] for i in range(0, len(data), 16000)]
    try:
        sock = associate_ct(srv.port)
        sock.sendall(_pdata(1, 0x03, _store_rq(uid)))
        for i, chunk in enumerate(chunks):
            sock.sendall(_pdata(1, 0x02 if i == len(chunks) - 1 else 0x00, chunk))
        kind, body = read_pdu(sock)
        sock.sendall(RELEASE_RQ)
        assert read_pdu(sock)[0] == 0x06
        sock.close()
    finally:
        srv.close()
    assert kind == 0x04
    # one PDV: length (4), context 1, control 0x03 (last command fragment), the command
    assert body[4:6] == b"\x01\x03"
    rsp = decode(BytesIO(body[6:]), True, True)
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8001, 1, 0xB000)
    assert (rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID) == (CTImageStorage, uid)
    assert rsp.CommandDataSetType == 0x0101
    assert [kind for kind, _ in srv.seen] == ["StoreRequest"]
    assert srv.seen[0][1].endswith(data)  # the dataset the handler read is the one sent
    assert list((receiver / ".sortscp-tmp").iterdir()) == []


def test_a_watched_dimse_recv_keeps_pynetdicoms_path(receiver):
    """A handler on EVT_DIMSE_RECV needs pynetdicom's message object: the
    request is then the usual C_STORE, with the same answer."""
    received = []
    srv = RecordingServer(status=0xB000, extra_handlers=[(evt.EVT_DIMSE_RECV, received.append)])
    try:
        status = _send_ct(srv.port)
    finally:
        srv.close()
    assert status == 0xB000
    assert [kind for kind, _ in srv.seen] == ["C_STORE"]
    assert len(received) == 1


@pytest.mark.parametrize("answer", [RuntimeError("handler bug"), "not a status", 0x1_0000])
def test_a_handler_that_raises_or_answers_no_status_gives_0xC211(receiver, answer):
    srv = RecordingServer(status=answer)
    try:
        status = _send_ct(srv.port)
    finally:
        srv.close()
    assert status == 0xC211
    assert list((receiver / ".sortscp-tmp").iterdir()) == []


def test_a_requestors_reactor_never_takes_the_response_its_user_waits_for(server):
    """sortscp's own SCUs (and any requestor in a process running our threads)
    pause the reactor around each request and take the response themselves.
    With thread switches forced often, a reactor that passed its checkpoint just
    before the user paused it could take the response: the user then saw a
    DIMSE timeout and aborted. Every echo must be answered."""
    import sys

    srv = server()
    unanswered: list[int] = []

    def one(n: int) -> None:
        assoc = scu(dimse_timeout=5).associate(HOST, srv.port, ae_title="FASTSCP")
        assert assoc.is_established
        try:
            for i in range(300):
                if "Status" not in assoc.send_c_echo():
                    unanswered.append(n * 1000 + i)
                    return
        finally:
            assoc.release()

    import logging

    quiet = logging.getLogger("pynetdicom")  # (its per-message lines change the timing)
    old = sys.getswitchinterval(), quiet.disabled
    sys.setswitchinterval(1e-6)
    quiet.disabled = True
    try:
        threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(old[0])
        quiet.disabled = old[1]
    assert unanswered == []


def test_waiting_on_sockets_works_for_descriptors_past_1024() -> None:
    """``select.select`` refuses descriptors of 1024 and over, which a busy
    server reaches: every new association's thread died with a traceback."""
    import resource
    import socket

    from scp.net._pynetdicom import wait_readable

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1600:
        pytest.skip(f"the descriptor limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1600), hard))
    a, b = socket.socketpair()
    try:
        high = socket.socket(fileno=os.dup2(a.fileno(), 1500))
        try:
            assert wait_readable([high], 0.05) == []
            b.send(b"x")
            assert wait_readable([high], 1.0) == [high]
        finally:
            high.detach()
            os.close(1500)
    finally:
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

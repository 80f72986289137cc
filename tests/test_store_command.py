"""The C-STORE-RQ command set read straight from its bytes
(``scp.net._pynetdicom.StoreCommand``) gives what pydicom's decode gives, or
leaves the command set to pydicom; over a real association, a command set it
leaves to pydicom is still filed, and one neither can read still aborts."""

from __future__ import annotations

import random
import struct
import time
import warnings
from io import BytesIO

import pytest
from pydicom.uid import generate_uid
from pynetdicom.dsutils import decode
from test_serve_hostile import (
    CT_CONTEXT,
    FAST,
    ct_bytes,
    ct_path,
    layout_files,
    log_lines,
    no_temp_files_within,
    still_serving,
)

from scp.net._pynetdicom import StoreCommand
from scp.net.status import CANNOT_UNDERSTAND, SUCCESS

import pdu
from pdu import Peer

FIELDS = ("CommandField", "MessageID", "Priority", "CommandDataSetType",
          "AffectedSOPClassUID", "AffectedSOPInstanceUID")
UID = "1.2.826.0.1.3680043.8.498.10203040506070809101112131415161718"


def element(number: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, number, len(value)) + value


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def ui(text: str) -> bytes:
    raw = text.encode("latin-1")
    return raw + b"\0" if len(raw) % 2 else raw


def store_rq(*, sop_class: str = pdu.CT_IMAGE_STORAGE, uid: str = UID, message_id: int = 7,
             priority: int | None = 0, data_set_type: int = 0x0000, extra: bytes = b"",
             move: tuple[bytes, int] | None = None) -> bytes:
    """A C-STORE-RQ command set, element by element (group length first)."""
    body = element(0x0002, ui(sop_class)) + element(0x0100, us(1)) + element(0x0110, us(message_id))
    if priority is not None:
        body += element(0x0700, us(priority))
    body += element(0x0800, us(data_set_type)) + element(0x1000, ui(uid))
    if move is not None:
        body += element(0x1030, move[0]) + element(0x1031, us(move[1]))
    body += extra
    return element(0x0000, struct.pack("<L", len(body))) + body


def pydicom_values(raw: bytes) -> tuple:
    with warnings.catch_warnings():  # (its warnings about invalid UIDs: the sink refuses them)
        warnings.simplefilter("ignore")
        ds = decode(BytesIO(raw), True, True)
        return tuple(None if ds.get(k) is None else (str(ds.get(k)) if "UID" in k else int(ds.get(k)))
                 for k in FIELDS)


def lean_values(cmd: StoreCommand) -> tuple:
    return tuple(getattr(cmd, k) for k in FIELDS)


CLEAN = {
    "plain": store_rq(),
    "pynetdicom's encoding": pdu.c_store_rq(pdu.CT_IMAGE_STORAGE, UID, 513),
    "no priority": store_rq(priority=None),
    "high priority, message 65535": store_rq(priority=1, message_id=0xFFFF),
    "a C-MOVE's sub-operation": store_rq(move=(b"MOVESCU ", 12)),
    "uids padded with a space": store_rq(uid=UID[:-1] + " ", sop_class=pdu.CT_IMAGE_STORAGE + " "),
    "a 64-character uid": store_rq(uid="1." + "2" * 62),
    "a uid that names no file (the sink refuses it)": store_rq(uid="1.2/3"),
    "a uid with a leading space": store_rq(uid=" 1.2.3"),
}


@pytest.mark.parametrize("raw", CLEAN.values(), ids=CLEAN.keys())
def test_a_clean_c_store_command_reads_as_pydicom_reads_it(raw):
    cmd = StoreCommand.read(raw)
    assert cmd is not None, "a clean C-STORE-RQ was left to pydicom"
    assert lean_values(cmd) == pydicom_values(raw)


ODD = {
    "empty": b"",
    "a C-ECHO-RQ": pdu.c_echo_rq(3),
    "a C-STORE-RQ without a dataset": store_rq(data_set_type=0x0101),
    "an element it does not know": store_rq(extra=element(0x1035, b"XX")),
    "(0000,0001), retired": element(0x0000, struct.pack("<L", 12)) + element(0x0001, b"\0\0\0\0")
    + store_rq()[12:],
    "elements out of order": store_rq()[12:36] + store_rq()[:12] + store_rq()[36:],
    "an element twice": store_rq() + element(0x1000, ui(UID)),
    "another group": store_rq() + struct.pack("<HHL", 2, 0x0010, 2) + b"1\0",
    "a US of 4 bytes": store_rq(extra=element(0x1031, b"\1\0\0\0")),
    "cut in an element header": store_rq()[:-len(ui(UID)) - 4],
    "cut in a value": store_rq()[:-3],
    "an empty instance uid": store_rq(uid=""),
    "an instance uid of spaces": store_rq(uid="  "),
    "two values": store_rq(uid="1.2.3\\1.2.4"),
    "not ASCII": store_rq(uid="1.2.\xe9"),
    "a 66-byte uid": store_rq(uid="1." + "2" * 64),
    "no message id": element(0x0000, b"\0\0\0\0") + element(0x0002, ui("1.2")) + element(0x0100, us(1))
    + element(0x0800, us(0)) + element(0x1000, ui("1.3")),
}


@pytest.mark.parametrize("raw", ODD.values(), ids=ODD.keys())
def test_anything_unusual_is_left_to_pydicom(raw):
    assert StoreCommand.read(raw) is None


def test_whatever_it_reads_from_damaged_bytes_pydicom_reads_alike():
    """5,000 seeded damages of real command sets (bytes flipped, cut, grown,
    elements dropped): each one it reads, pydicom reads to the same values."""
    rng = random.Random(11)
    seeds = list(CLEAN.values())
    read = 0
    for _ in range(5000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            if not raw:
                break
            how = rng.randrange(4)
            at = rng.randrange(len(raw))
            if how == 0:
                raw[at] = rng.randrange(256)
            elif how == 1:
                del raw[at:]
            elif how == 2:
                raw[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            else:
                del raw[at:at + rng.choice((2, 8, 10, 12))]
        cmd = StoreCommand.read(bytes(raw))
        if cmd is None:
            continue
        read += 1
        try:
            expected = pydicom_values(bytes(raw))
        except Exception as exc:  # noqa: BLE001 - the failure to report
            pytest.fail(f"read {bytes(raw).hex()}, which pydicom cannot decode: {exc!r}")
        assert lean_values(cmd) == expected, bytes(raw).hex()
    assert 100 < read < 5000, f"{read} read: the damages do not exercise both sides"


# --- over a real association ------------------------------------------------------------


def _store_with(port: int, command: bytes, data: bytes) -> int | None:
    with Peer(port, timeout=10) as peer:
        cid = peer.associate(CT_CONTEXT).accepted_ids()[0]
        peer.send_command(cid, command)
        try:
            peer.send_dataset(cid, data)
            status = peer.status(10)
        except Exception:  # noqa: BLE001 - closed, or no answer: no status
            return None
        peer.release()
        return status


@pytest.mark.parametrize("case", ["retired (0000,0001)", "a C-MOVE originator"])
def test_a_command_set_left_to_pydicom_is_still_filed(serve_process, case):
    server = serve_process(*FAST)
    uid, data, ds = ct_bytes(generate_uid())
    if case == "a C-MOVE originator":  # read directly: filed the same way
        command = store_rq(uid=uid, move=(b"MOVER\x00", 3))
        assert StoreCommand.read(command) is not None
    else:
        body = store_rq(uid=uid)[12:]
        command = element(0x0000, struct.pack("<L", len(body) + 12)) + element(0x0001, b"\0\0\0\0") + body
        assert StoreCommand.read(command) is None
    assert _store_with(server.port, command, data) == SUCCESS, server.log()
    filed = ct_path(server.out, ds)
    assert layout_files(server.out) == [filed]
    assert filed.read_bytes().endswith(data)  # our File Meta, then the dataset as sent
    still_serving(server)


@pytest.mark.parametrize("where", ["value", "element header"])
def test_a_cut_command_set_files_nothing(serve_process, where):
    """Cut in its last value (pydicom reads a shorter UID: the dataset no
    longer matches it) or in its last element header (undecodable): left to
    pydicom, refused or aborted as before, with the reason in the log."""
    server = serve_process(*FAST)
    uid, data, _ = ct_bytes(generate_uid())
    cut = 3 if where == "value" else len(ui(uid)) + 4
    command = store_rq(uid=uid)[:-cut]
    assert StoreCommand.read(command) is None
    status = _store_with(server.port, command, data)
    assert status != SUCCESS
    assert layout_files(server.out) == []
    reason = "does not match|aborting the association" if status is None else "C-STORE failed"
    assert log_lines(server, reason), server.log()
    still_serving(server)


# --- answers that cannot be written as usual, and PDUs that run on -----------------------


def _answer(peer: Peer, timeout: float = 10) -> tuple[str, object]:
    """('rsp', command set) for a response, ('abort', None) for an A-ABORT or
    a closed connection."""
    try:
        pdu_ = peer.read_pdu(timeout)
    except (OSError, ConnectionError, pdu.PeerClosed):
        return "abort", None
    if pdu_.kind == pdu.A_ABORT:
        return "abort", None
    assert pdu_.kind == pdu.P_DATA_TF, f"PDU type {pdu_.kind:#x}"
    fragments = b"".join(f for _, header, f in pdu.parse_pdvs(pdu_.body) if header & pdu.COMMAND)
    return "rsp", pdu.decode_command(fragments)


def test_a_response_that_fits_neither_encoder_aborts_instead_of_hanging(serve_process):
    """A 65-character UID (refused: 0xC000) from a peer whose PDUs hold 120
    bytes: the hand-made response does not fit one PDU and pynetdicom's
    refuses the UID. The association is aborted at once with a line, not left
    open with its thread dead."""
    server = serve_process(*FAST, "--network-timeout", "30")
    uid = "1.2.826.0.1.3680043.8.498." + "3" * 39
    assert len(uid) == 65
    _, data, _ = ct_bytes(uid)
    with Peer(server.port, timeout=10) as peer:
        peer.associate(CT_CONTEXT, max_pdu=120)
        peer.send_command(1, store_rq(uid=uid))
        peer.send_dataset(1, data, fragment=100)
        started = time.monotonic()
        kind, _ = _answer(peer)
        assert kind == "abort" and time.monotonic() - started < 5, server.log()
    assert log_lines(server, "cannot answer the C-STORE"), server.log()
    assert "Traceback" not in server.log()
    assert layout_files(server.out) == []
    still_serving(server)


@pytest.mark.parametrize("sent", [b"1.2.826.0.1.3680043.8.498." + b"3" * 38 + b"\xe9", b"1.2.3\\1.2.4"],
                         ids=["65 bytes, not ASCII", "two values"])
def test_a_refused_uid_is_answered_with_the_bytes_it_came_with(serve_process, sent):
    """pydicom's response encoder refuses the first (over 64 characters) and
    writes the second as a Python list; the answer must carry what was sent."""
    server = serve_process(*FAST)
    _, data, _ = ct_bytes(generate_uid())
    with Peer(server.port, timeout=10) as peer:
        peer.associate(CT_CONTEXT)
        peer.send_command(1, store_rq(uid=sent.decode("latin-1")))
        peer.send_dataset(1, data)
        kind, rsp = _answer(peer)
        assert kind == "rsp", server.log()
        assert rsp.Status == CANNOT_UNDERSTAND and rsp.MessageIDBeingRespondedTo == 7
        raw = rsp["AffectedSOPInstanceUID"]  # as it came back, value for value
        values = raw.value if isinstance(raw.value, list) or raw.VM > 1 else [raw.value]
        assert "\\".join(str(v) for v in values).encode("latin-1") == sent
        assert peer.release()
    assert layout_files(server.out) == []
    assert "Traceback" not in server.log() and "['" not in server.log()


@pytest.mark.parametrize("second", ["C-STORE", "C-ECHO"])
def test_a_pdu_that_runs_on_past_a_message_aborts_and_files_nothing(serve_process, second):
    """Two messages in one P-DATA-TF: one operation at a time was negotiated,
    so the second could not be sent before the first's answer. Aborted with a
    line, nothing filed (it used to answer the first and drop the second
    silently, leaving its sender waiting)."""
    server = serve_process(*FAST)
    uid, data, _ = ct_bytes(generate_uid())
    other, data2, _ = ct_bytes(generate_uid())
    pdvs = [(1, pdu.COMMAND | pdu.LAST, store_rq(uid=uid)), (1, pdu.LAST, data)]
    if second == "C-STORE":
        pdvs += [(1, pdu.COMMAND | pdu.LAST, store_rq(uid=other, message_id=8)), (1, pdu.LAST, data2)]
        first = pdvs[:2]
    else:
        pdvs = [(3, pdu.COMMAND | pdu.LAST, pdu.c_echo_rq(1)), (3, pdu.COMMAND | pdu.LAST, pdu.c_echo_rq(2))]
        first = pdvs[:1]
    assert StoreCommand.read(pdvs[0][2]) is not None or second == "C-ECHO"
    with Peer(server.port, timeout=10) as peer:
        peer.associate(CT_CONTEXT)
        peer.send(pdu.p_data(*pdvs))
        kind, _ = _answer(peer)
        assert kind == "abort", server.log()
    assert log_lines(server, "went on past the end of a message"), server.log()
    assert layout_files(server.out) == []
    assert no_temp_files_within(server.out) == []
    # the same messages one PDU each are served
    with Peer(server.port, timeout=10) as peer:
        peer.associate(CT_CONTEXT)
        peer.send(pdu.p_data(*first))
        kind, rsp = _answer(peer)
        assert kind == "rsp" and rsp.Status == SUCCESS, server.log()
        assert peer.release()
    still_serving(server)


def c_cancel_rq(message_id: int) -> bytes:
    body = element(0x0100, us(0x0FFF)) + element(0x0120, us(message_id)) + element(0x0800, us(0x0101))
    return element(0x0000, struct.pack("<L", len(body))) + body


@pytest.mark.parametrize("second", ["C-STORE", "C-CANCEL", "C-ECHO"])
def test_a_command_in_the_middle_of_a_dataset_aborts_and_files_nothing(serve_process, second):
    """A C-STORE's dataset half sent, then a new command (a C-CANCEL, which
    no C-STORE has, another C-STORE, a C-ECHO). The first instance can never
    be completed; the association is aborted with a line, as DCMTK aborts on
    an unexpected PDV, so the sender hears at once and can send both again.
    (It used to drop the first silently and go on with the second: the
    sender waited for an answer to the first that never came.)"""
    server = serve_process(*FAST)
    uid, data, _ = ct_bytes(generate_uid())
    other, data2, ds2 = ct_bytes(generate_uid())
    with Peer(server.port, timeout=10) as peer:
        peer.associate(CT_CONTEXT)
        peer.send_command(1, store_rq(uid=uid))
        peer.send_dataset(1, data[: len(data) // 2], last=False)
        if second == "C-STORE":
            peer.send_command(1, store_rq(uid=other, message_id=8))
            peer.send_dataset(1, data2)
        elif second == "C-CANCEL":
            peer.send_command(1, c_cancel_rq(7))
        else:
            peer.send(pdu.p_data((3, pdu.COMMAND | pdu.LAST, pdu.c_echo_rq(8))))
        kind, _ = _answer(peer)
        assert kind == "abort", server.log()
    assert log_lines(server, "a new command began before the last fragment"), server.log()
    assert "Traceback" not in server.log()
    assert layout_files(server.out) == []
    assert no_temp_files_within(server.out) == []
    assert _store_with(server.port, store_rq(uid=other, message_id=8), data2) == SUCCESS
    assert layout_files(server.out) == [ct_path(server.out, ds2)]
    still_serving(server)


def _explicit(tag: int, vr: str, value: bytes) -> bytes:
    if vr in ("OB", "OW", "SQ", "UN", "UT"):
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _rows_first(uid: str, *names: bytes) -> bytes:
    """A CT dataset, explicit VR little endian, with Rows (0028,0010) before
    `names` (elements as :func:`_explicit` makes them): out of tag order, so
    the worker, not the network thread, reads its header."""
    return (_explicit(0x00080016, "UI", ui(pdu.CT_IMAGE_STORAGE)) + _explicit(0x00080018, "UI", ui(uid))
            + _explicit(0x00280010, "US", b"\x10\x00") + b"".join(names)
            + _explicit(0x7FE00010, "OW", b"\0\0\0\0"))


def test_a_dataset_with_a_tag_out_of_order_is_filed_where_pydicom_reads_it(serve_process):
    """Rows (0028,0010) before the names, as a relay that forwards a dataset's
    bytes unchanged may send it (found by an independent attack). pydicom,
    and `sort`, read the names; `serve` filed it under UNKNOWN_UNKNOWN: its
    second read stopped at the first tag past the template's, never seeing
    the names after it."""
    server = serve_process(*FAST)
    uid = generate_uid()
    data = _rows_first(uid, _explicit(0x0008103E, "LO", b"CHEST "), _explicit(0x00100010, "PN", b"Doe^John"),
                       _explicit(0x00100020, "LO", b"12345 "), _explicit(0x00200011, "IS", b"3 "))
    assert _store_with(server.port, store_rq(uid=uid), data) == SUCCESS, server.log()
    files = layout_files(server.out)
    assert [f.relative_to(server.out).as_posix() for f in files] == [f"Doe^John_12345/CHEST_3/{uid}.dcm"]
    assert files[0].read_bytes().endswith(data)


@pytest.mark.parametrize("series_number", [(0x00200011, "IS", b"inf "), (0x00200011, "FD", b"\0\0\0\0")],
                         ids=["IS inf", "FD of 4 bytes"])
def test_a_value_pydicom_cannot_convert_still_files_the_instance(serve_process, series_number):
    """The layout renders such a value UNKNOWN, and `sort` files it; `serve`
    refused it with 0xA700 (out of resources), as its index facts converted
    it unguarded (found by an independent attack)."""
    server = serve_process(*FAST)
    uid = generate_uid()
    data = _rows_first(uid, _explicit(0x00100010, "PN", b"Doe^John"), _explicit(0x00100020, "LO", b"12345 "),
                       _explicit(*series_number))
    assert _store_with(server.port, store_rq(uid=uid), data) == SUCCESS, server.log()
    files = layout_files(server.out)
    assert [f.relative_to(server.out).as_posix() for f in files] == [f"Doe^John_12345/UNKNOWN_UNKNOWN/{uid}.dcm"]
    assert "Traceback" not in server.log()


def test_a_c_store_on_the_verification_context_is_refused_and_files_nothing(serve_process):
    """Verification is the one accepted context of no storage class: a C-STORE
    sent on it was filed like any other. It is refused (0x0122, SOP Class not
    supported) with one line, and the association goes on."""
    server = serve_process(*FAST)
    uid, data, ds = ct_bytes(generate_uid())
    with Peer(server.port, timeout=10) as peer:
        cid = peer.associate([(1, pdu.VERIFICATION, [pdu.EXPLICIT_LE]), (3, pdu.CT_IMAGE_STORAGE, [pdu.EXPLICIT_LE])]
                             ).accepted_ids()
        assert cid == [1, 3]
        peer.send_command(1, store_rq(uid=uid))
        peer.send_dataset(1, data)
        assert peer.status(10) == 0x0122
        peer.send_command(3, store_rq(uid=uid))  # the same instance on its own context: filed
        peer.send_dataset(3, data)
        assert peer.status(10) == SUCCESS
        peer.release()
    assert layout_files(server.out) == [ct_path(server.out, ds)]
    (line,) = log_lines(server, r"no storage class")
    assert "0x0122" in line, line
    still_serving(server)


def test_a_dataset_in_tiny_fragments_aborts_and_files_nothing_while_a_full_one_is_filed(serve_process):
    """A peer that sends its dataset a few bytes per PDV makes the network
    thread work per fragment: eight of them slowed a normal sender tenfold.
    Past 1,024 fragments averaging under 256 bytes, the association is aborted
    with one line; the same dataset in PDVs of 256 bytes (a fifth of DCMTK's
    smallest PDU) is filed."""
    server = serve_process(*FAST)
    uid, data, ds = ct_bytes(generate_uid())
    assert len(data) > 1024 * 16
    with Peer(server.port, timeout=10) as peer:
        cid = peer.associate(CT_CONTEXT).accepted_ids()[0]
        peer.send_command(cid, store_rq(uid=uid))
        started = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 - aborted: the send or the status read fails
            peer.send_dataset(cid, data, fragment=16)
            peer.status(10)
        assert peer.closed_within(10) is not None
        assert time.monotonic() - started < 20
    assert layout_files(server.out) == []
    (line,) = log_lines(server, r"aborting the association.*fragments of \d+ bytes on average")
    assert "WARNING" in line, line
    assert no_temp_files_within(server.out) == []
    assert _store_with(server.port, store_rq(uid=uid), data) == SUCCESS, server.log()  # (PDVs of 8000)
    with Peer(server.port, timeout=10) as peer:  # small but real PDVs
        cid = peer.associate(CT_CONTEXT).accepted_ids()[0]
        uid2, data2, ds2 = ct_bytes(generate_uid())
        peer.send_command(cid, store_rq(uid=uid2))
        peer.send_dataset(cid, data2, fragment=256)
        assert peer.status(10) == SUCCESS
        peer.release()
    assert sorted(layout_files(server.out)) == sorted([ct_path(server.out, ds), ct_path(server.out, ds2)])
    still_serving(server)

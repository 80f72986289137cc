"""The UID a received file is filed by is its command's, whoever reads it.

The network thread checks each dataset against its C-STORE command with its own
element walker; the worker names the file from those values or, for what the
walker leaves to it (an encoding switched mid-dataset, a deflated or a private
transfer syntax), from pydicom's reading of the same bytes. A sender who builds
a dataset that the two read differently must not get it filed under another
instance's UID (the index's "one file per SOPInstanceUID" would then remove that
instance's file under a Success for this one), and a transfer syntax the walker
cannot read must not skip the checks.
"""

from __future__ import annotations

import struct
import zlib

import pytest
from test_serve_hostile import (
    FAST,
    ct_bytes,
    dataset_bytes_of,
    layout_files,
    log_lines,
    no_temp_files_within,
    raw_store,
    still_serving,
)

from scp.net.status import CANNOT_UNDERSTAND, DATA_SET_MISMATCH, SUCCESS

import pdu

DEFLATED = "1.2.840.10008.1.2.1.99"
PRIVATE_TS = "1.2.3.4.5.6.7"  # a transfer syntax sortscp knows nothing of (accepted, as any)


def _ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" * (len(raw) % 2)


def two_faced_explicit(seen_by_pydicom: str, seen_by_walker: str) -> bytes:
    """Explicit VR Little Endian for an element walker that reads each header's
    VR, implicit VR for pydicom, which decides from the first element: a
    ``(0008,0012) OB`` hides one ``(0008,0018)`` from the walker, the other hides
    inside an implicit-VR ``(0009,1000)`` for pydicom."""
    a, b = _ui(seen_by_pydicom), _ui(seen_by_walker)
    data = struct.pack("<HHI", 8, 5, 10) + b"ISO_IR 100"  # implicit VR (0008,0005) first
    hidden = 26 + 16975  # where pydicom, reading "OB\0\0" as a length, goes on
    element_a = struct.pack("<HHI", 8, 0x18, len(a)) + a
    private = hidden + len(element_a)
    walker_next = private + 8
    element_b = struct.pack("<HH2sH", 8, 0x18, b"UI", len(b)) + b
    end = walker_next + len(element_b)
    data += struct.pack("<HH2sHI", 8, 0x12, b"OB", 0, walker_next - 30)
    data += b"\0" * (hidden - len(data)) + element_a
    data += struct.pack("<HHI", 9, 0x1000, end - private - 8) + element_b
    return data


def two_faced_implicit(seen_by_pydicom: str, seen_by_walker: str) -> bytes:
    """Implicit VR for the walker, explicit for pydicom (``CS\\0\\0`` read as a length)."""
    a, b = _ui(seen_by_pydicom), _ui(seen_by_walker)
    data = struct.pack("<HH", 8, 5) + b"CS" + struct.pack("<H", 0)
    data += struct.pack("<HH2sH", 8, 0x18, b"UI", len(a)) + a
    private = len(data)
    walker_next = 8 + 0x5343
    element_b = struct.pack("<HHI", 8, 0x18, len(b)) + b
    end = walker_next + len(element_b)
    data += struct.pack("<HH2sHI", 9, 0x1000, b"OB", 0, end - private - 12)
    data += b"\0" * (walker_next - len(data)) + element_b
    return data


def _store_victim(server) -> tuple[str, bytes]:
    uid, data, _ = ct_bytes(PatientName="Victim^A", PatientID="V1")
    assert raw_store(server.port, uid, data) == SUCCESS, server.log()
    (victim,) = layout_files(server.out)
    return uid, victim.read_bytes()


def _other(uid: str) -> str:
    """Another valid UID of the same length (generated UIDs have all 64 characters)."""
    return uid[:-1] + ("1" if uid[-1] != "1" else "2")


def _victim_intact(server, uid: str, before: bytes) -> None:
    files = layout_files(server.out)
    assert len(files) == 1 and files[0].name == f"{uid}.dcm", files
    assert files[0].read_bytes() == before
    assert no_temp_files_within(server.out) == []


def _deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize("syntax", [pdu.EXPLICIT_LE, pdu.IMPLICIT_LE, DEFLATED])
def test_a_dataset_two_readers_see_as_different_instances_is_refused(serve_process, syntax):
    server = serve_process(*FAST)
    victim, before = _store_victim(server)
    attacker = _other(victim)
    data = (two_faced_implicit if syntax == pdu.IMPLICIT_LE else two_faced_explicit)(victim, attacker)
    if syntax == DEFLATED:
        data = _deflate(data)
    contexts = [(1, pdu.CT_IMAGE_STORAGE, [syntax])]
    status = raw_store(server.port, attacker, data, contexts=contexts)
    assert status == DATA_SET_MISMATCH, f"0x{status:04X}\n{server.log()}"
    _victim_intact(server, victim, before)
    assert len(log_lines(server, rf"SOP Instance {attacker}.*is not the command's")) == 1, server.log()
    still_serving(server)


def test_a_private_transfer_syntax_still_gets_the_uid_check(serve_process):
    server = serve_process(*FAST)
    victim, before = _store_victim(server)
    _, data, _ = ct_bytes(victim, PatientName="Evil^Private")  # a dataset that says: the victim
    contexts = [(1, pdu.CT_IMAGE_STORAGE, [PRIVATE_TS])]
    status = raw_store(server.port, _other(victim), data, contexts=contexts)
    assert status == DATA_SET_MISMATCH, f"0x{status:04X}\n{server.log()}"
    _victim_intact(server, victim, before)
    still_serving(server)


def test_a_private_transfer_syntax_dataset_cut_short_is_refused(serve_process):
    server = serve_process(*FAST)
    uid, data, _ = ct_bytes()
    contexts = [(1, pdu.CT_IMAGE_STORAGE, [PRIVATE_TS])]
    status = raw_store(server.port, uid, data[:-7], contexts=contexts)
    assert status == CANNOT_UNDERSTAND, f"0x{status:04X}\n{server.log()}"
    assert layout_files(server.out) == []
    assert no_temp_files_within(server.out) == []
    # whole, the same dataset is filed byte for byte under its syntax
    assert raw_store(server.port, uid, data, contexts=contexts) == SUCCESS, server.log()
    (stored,) = layout_files(server.out)
    assert stored.name == f"{uid}.dcm" and dataset_bytes_of(stored) == data

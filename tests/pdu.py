"""A raw DICOM Upper Layer peer for hostile tests: build PDUs byte by byte, send
them in any order or shape, read what the server answers.

Layouts: PS3.8 section 9.3 (and pynetdicom's tests/encoded_pdu_items.py).
Every socket here is on 127.0.0.1 with a timeout; every loop is bounded.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom.dsutils import encode

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.3811.99"

# PDU types
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

# message control header bits of a PDV
COMMAND, LAST = 0x01, 0x02


def _uid(uid: str | bytes) -> bytes:
    return uid.encode("ascii") if isinstance(uid, str) else uid


def item(kind: int, value: bytes) -> bytes:
    """A variable item: type, reserved, 2-byte length, value."""
    return struct.pack(">BBH", kind, 0, len(value)) + value


def pdu(kind: int, body: bytes) -> bytes:
    """A PDU: type, reserved, 4-byte length, body."""
    return struct.pack(">BBI", kind, 0, len(body)) + body


def presentation_context(context_id: int, abstract: str | bytes,
                         transfer_syntaxes: list[str | bytes]) -> bytes:
    body = struct.pack(">BBBB", context_id, 0, 0, 0) + item(0x30, _uid(abstract))
    for ts in transfer_syntaxes:
        body += item(0x40, _uid(ts))
    return item(0x20, body)


def user_information(max_pdu: int = 16384, implementation_uid: str = IMPLEMENTATION_UID,
                     version: bytes = b"HOSTILE") -> bytes:
    body = item(0x51, struct.pack(">I", max_pdu)) + item(0x52, _uid(implementation_uid))
    if version:
        body += item(0x55, version)
    return item(0x50, body)


def _ae(title: str | bytes) -> bytes:
    raw = title.encode("latin-1") if isinstance(title, str) else title
    return raw[:16].ljust(16, b" ")


def associate_rq(
    contexts: list[tuple[int, str | bytes, list[str | bytes]]] | None = None,
    calling: str | bytes = "HOSTILE",
    called: str | bytes = "SORTSCP",
    *,
    raw_items: bytes | None = None,
    max_pdu: int = 16384,
) -> bytes:
    """A-ASSOCIATE-RQ. `contexts`: (id, abstract syntax, [transfer syntaxes]).
    `raw_items` replaces every variable item (to send malformed ones)."""
    if raw_items is None:
        raw_items = item(0x10, _uid(APPLICATION_CONTEXT))
        for cid, abstract, tss in contexts or []:
            raw_items += presentation_context(cid, abstract, tss)
        raw_items += user_information(max_pdu)
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\x00" * 32 + raw_items
    return pdu(A_ASSOCIATE_RQ, body)


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """P-DATA-TF with PDVs of (context id, message control header, fragment)."""
    body = b""
    for cid, header, data in pdvs:
        body += struct.pack(">IBB", len(data) + 2, cid, header) + data
    return pdu(P_DATA_TF, body)


def release_rq() -> bytes:
    return pdu(A_RELEASE_RQ, b"\x00" * 4)


def release_rp() -> bytes:
    return pdu(A_RELEASE_RP, b"\x00" * 4)


def abort() -> bytes:
    return pdu(A_ABORT, b"\x00\x00\x00\x00")


# --- DIMSE command sets ---------------------------------------------------------


def command_set(**elements) -> bytes:
    """Implicit VR LE command set with (0000,0000) CommandGroupLength first."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = encode(ds, True, True)
    ds.CommandGroupLength = len(body)
    return encode(ds, True, True)


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1,
               has_dataset: bool = True) -> bytes:
    return command_set(
        AffectedSOPClassUID=sop_class,
        CommandField=0x0001,
        MessageID=message_id,
        Priority=0,
        CommandDataSetType=0x0000 if has_dataset else 0x0101,
        AffectedSOPInstanceUID=sop_instance,
    )


def c_echo_rq(message_id: int = 1) -> bytes:
    return command_set(
        AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=message_id,
        CommandDataSetType=0x0101,
    )


def decode_command(data: bytes) -> Dataset:
    return read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)


# --- reading --------------------------------------------------------------------


@dataclass
class Pdu:
    kind: int
    body: bytes


@dataclass
class Accepted:
    """What an A-ASSOCIATE-AC said: context id -> (result, transfer syntax)."""

    contexts: dict[int, tuple[int, str]] = field(default_factory=dict)
    max_pdu: int = 0

    def accepted_ids(self) -> list[int]:
        return [cid for cid, (result, _) in self.contexts.items() if result == 0]


def parse_ac(body: bytes) -> Accepted:
    out = Accepted()
    pos = 68  # version, reserved, called, calling, 32 reserved
    while pos + 4 <= len(body):
        kind, length = body[pos], struct.unpack(">H", body[pos + 2 : pos + 4])[0]
        value = body[pos + 4 : pos + 4 + length]
        if kind == 0x21:
            cid, result = value[0], value[2]
            ts = ""
            if len(value) > 8 and value[4] == 0x40:
                ts_len = struct.unpack(">H", value[6:8])[0]
                ts = value[8 : 8 + ts_len].decode("ascii").rstrip("\0 ")
            out.contexts[cid] = (result, ts)
        elif kind == 0x50:
            sub = 0
            while sub + 4 <= len(value):
                skind, slen = value[sub], struct.unpack(">H", value[sub + 2 : sub + 4])[0]
                if skind == 0x51 and slen == 4:
                    out.max_pdu = struct.unpack(">I", value[sub + 4 : sub + 8])[0]
                sub += 4 + slen
        pos += 4 + length
    return out


def parse_pdvs(body: bytes) -> list[tuple[int, int, bytes]]:
    pdvs, pos = [], 0
    while pos + 6 <= len(body):
        length = struct.unpack(">I", body[pos : pos + 4])[0]
        pdvs.append((body[pos + 4], body[pos + 5], body[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    return pdvs


class PeerClosed(Exception):
    """The server closed the connection."""


class Peer:
    """A raw TCP peer of the server on 127.0.0.1."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete PDU within {self.timeout} s")
            self.sock.settimeout(left)
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise PeerClosed(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def read_pdu(self, timeout: float | None = None) -> Pdu:
        deadline = time.monotonic() + (timeout or self.timeout)
        head = self._recv_exact(6, deadline)
        kind, _, length = struct.unpack(">BBI", head)
        if length > 64 << 20:
            raise ValueError(f"PDU of {length} bytes announced by the server")
        return Pdu(kind, self._recv_exact(length, deadline))

    def associate(self, contexts, calling: str | bytes = "HOSTILE", called: str = "SORTSCP",
                  max_pdu: int = 16384) -> Accepted:
        self.send(associate_rq(contexts, calling, called, max_pdu=max_pdu))
        answer = self.read_pdu()
        if answer.kind != A_ASSOCIATE_AC:
            raise AssertionError(f"association not accepted: PDU type 0x{answer.kind:02x} "
                                 f"{answer.body.hex()}")
        return parse_ac(answer.body)

    def read_message(self, timeout: float | None = None) -> tuple[int, Dataset]:
        """Read P-DATA-TF PDUs until a complete command set; return (context id, command)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        data = bytearray()
        for _ in range(10_000):
            answer = self.read_pdu(max(0.01, deadline - time.monotonic()))
            if answer.kind != P_DATA_TF:
                raise AssertionError(f"expected P-DATA-TF, got PDU type 0x{answer.kind:02x}")
            for cid, header, fragment in parse_pdvs(answer.body):
                if header & COMMAND:
                    data += fragment
                    if header & LAST:
                        return cid, decode_command(bytes(data))
        raise AssertionError("no complete command set")

    def status(self, timeout: float | None = None) -> int:
        """Read the next response and return its Status."""
        _, cmd = self.read_message(timeout)
        return int(cmd.Status)

    def send_command(self, cid: int, command: bytes) -> None:
        self.send(p_data((cid, COMMAND | LAST, command)))

    def send_dataset(self, cid: int, dataset: bytes, fragment: int = 8000,
                     last: bool = True) -> None:
        """The dataset in PDVs of at most `fragment` bytes; the final one has the last bit
        set (unless `last` is false: then the final bit is never sent)."""
        chunks = [dataset[i : i + fragment] for i in range(0, len(dataset), fragment)] or [b""]
        for i, chunk in enumerate(chunks):
            final = last and i == len(chunks) - 1
            self.send(p_data((cid, LAST if final else 0, chunk)))

    def c_store(self, cid: int, sop_class: str, sop_instance: str, dataset: bytes,
                message_id: int = 1, timeout: float | None = None) -> int:
        self.send_command(cid, c_store_rq(sop_class, sop_instance, message_id))
        self.send_dataset(cid, dataset)
        return self.status(timeout)

    def release(self, timeout: float = 10.0) -> bool:
        """A-RELEASE-RQ; True if the server answered A-RELEASE-RP."""
        try:
            self.send(release_rq())
            for _ in range(100):
                answer = self.read_pdu(timeout)
                if answer.kind == A_RELEASE_RP:
                    return True
                if answer.kind == A_ABORT:
                    return False
        except (OSError, PeerClosed, TimeoutError):
            return False
        return False

    def closed_within(self, seconds: float) -> float | None:
        """Read (and drop) whatever comes until the server closes the connection;
        the seconds it took, or None if it was still open after `seconds`."""
        start = time.monotonic()
        deadline = start + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError:  # reset
                return time.monotonic() - start
            if not chunk:
                return time.monotonic() - start
        return None

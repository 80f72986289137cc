"""The File Meta Information of the files ``serve`` stores.

Every stored file starts with the 128-byte preamble, ``DICM`` and this File
Meta: the SOP Class/Instance UIDs and the transfer syntax as negotiated, our
Implementation Class UID and version name, and the sender's AE title in
SourceApplicationEntityTitle. The dataset follows exactly as received.

The group is encoded here by hand (Explicit VR Little Endian, PS3.10 7.1): it
is a handful of short elements, and this runs in the network thread for every
instance, where pydicom's general writer costs ~0.2 ms.

Examples
--------
>>> from io import BytesIO
>>> from pydicom import dcmread
>>> head = file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1", "CT1")
>>> meta = dcmread(BytesIO(head + b"\\x08\\x00\\x05\\x00CS\\x00\\x00")).file_meta
>>> meta.SourceApplicationEntityTitle, meta.TransferSyntaxUID.name
('CT1', 'Explicit VR Little Endian')
>>> meta_end(head) == len(head)
True
>>> meta_values(head)[0x0003]
'1.2.3'
"""

from __future__ import annotations

import struct

from scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

#: The 128-byte preamble and ``DICM``: where every Part 10 file starts.
PREAMBLE = b"\x00" * 128 + b"DICM"
#: The header of (0002,0000) File Meta Information Group Length, UL, 4 bytes.
GROUP_LENGTH_HEADER = b"\x02\x00\x00\x00UL\x04\x00"


def _element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, calling_aet: str
) -> bytes:
    """Preamble, ``DICM`` and the File Meta group for one received instance."""
    elements = [
        _element(0x0001, b"OB", b"\x00\x01", b"\x00"),
        _element(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\x00"),
        _element(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\x00"),
        _element(0x0010, b"UI", transfer_syntax_uid.encode("ascii"), b"\x00"),
        _element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00"),
        _element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" "),
    ]
    aet = calling_aet.strip()
    if aet:
        elements.append(_element(0x0016, b"AE", aet.encode("ascii", "replace"), b" "))
    body = b"".join(elements)
    return PREAMBLE + GROUP_LENGTH_HEADER + struct.pack("<I", len(body)) + body


def meta_end(head: bytes | bytearray) -> int | None:
    """Offset where the dataset starts, once `head` holds the whole File Meta
    group (preamble, ``DICM``, group length first); None while it does not.

    Raises ValueError if `head` does not start like a Part 10 file.
    """
    if len(head) < 144:
        return None
    if head[128:132] != b"DICM" or head[132:140] != GROUP_LENGTH_HEADER:
        raise ValueError("not a Part 10 header with a File Meta group length")
    (length,) = struct.unpack("<I", head[140:144])
    end = 144 + length
    return end if len(head) >= end else None


def meta_values(head: bytes | bytearray) -> dict[int, str]:
    """The text values of the File Meta group in `head` (complete, see
    :func:`meta_end`), by element number: e.g. ``0x0010`` is the transfer syntax."""
    end = meta_end(head)
    if end is None:
        raise ValueError("the File Meta group is incomplete")
    values: dict[int, str] = {}
    pos = 144
    while pos + 8 <= end:
        group, element, vr = struct.unpack("<HH2s", head[pos : pos + 6])
        if group != 0x0002:
            raise ValueError(f"element ({group:04X},{element:04X}) inside the File Meta group")
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack("<I", head[pos + 8 : pos + 12])
            pos += 12
        else:
            (length,) = struct.unpack("<H", head[pos + 6 : pos + 8])
            pos += 8
        value = bytes(head[pos : pos + length])
        if vr in (b"UI", b"SH", b"AE"):
            values[element] = value.rstrip(b"\x00 ").decode("ascii", "replace")
        pos += length
    return values

"""The completeness walk on real files (every bundled one, in any chunking, cut
at every offset) and on hostile datasets built byte by byte."""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble

from scp.dicom.walk import MAX_DEPTH, DatasetWalker, walk_file
from scp.errors import NotDicomError, TruncatedError

from conftest import TEST_FILES, readable_dicom_files

#: Bundled files that really are cut short, and what the walk says.
TRUNCATED = {
    "MR_truncated.dcm": "element (7FE0,0010) declares 8192 bytes, 8130 remain",
    "rtplan_truncated.dcm": "element (300A,00B0) declares 976 bytes, 711 remain",
    "emri_small_jpeg_2k_lossless_too_short.dcm":
        "encapsulated pixel data (7FE0,0010) has no sequence delimiter",
}

_ENCODINGS = {
    pydicom.uid.ImplicitVRLittleEndian: (True, True, False),
    pydicom.uid.ExplicitVRBigEndian: (False, False, False),
    pydicom.uid.DeflatedExplicitVRLittleEndian: (False, True, True),
}


def _dataset(path: Path) -> tuple[int, bytes, bool, bool, bool]:
    """(offset, dataset bytes, implicit, little, deflated) of a Part 10 file."""
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_preamble(f, False)
        meta = _read_file_meta_info(f)
        offset = f.tell()
        data = f.read()
    implicit, little, deflated = _ENCODINGS.get(meta.TransferSyntaxUID, (False, True, False))
    return offset, data, implicit, little, deflated


def _feed(data: bytes, step: int, *, seek: bool, **enc) -> DatasetWalker:
    """Feed `data` `step` bytes at a time; with `seek`, pass over what the
    walker says it skips, as a file driver would."""
    w = DatasetWalker(**enc)
    mv = memoryview(data)
    i = 0
    while i < len(data):
        if seek and w.skip:
            n = min(w.skip, len(data) - i)
            w.skipped(n)
            i += n
            continue
        w.feed(mv[i : i + step])
        i += step
    w.close()
    return w


def _enc(implicit: bool, little: bool, deflated: bool) -> dict:
    return {"implicit": implicit, "little": little, "deflated": deflated}


FILES = readable_dicom_files()


def test_every_complete_bundled_file_walks_clean_in_any_chunking() -> None:
    walked = failed = 0
    for path in FILES:
        offset, data, *enc = _dataset(path)
        enc = _enc(*enc)
        outcomes = []
        for run in (
            lambda: _feed(data, 1, seek=True, **enc),
            lambda: _feed(data, 7, seek=True, **enc),
            lambda: _feed(data, 16 * 1024, seek=False, **enc),
            lambda: walk_file(open(path, "rb"), offset, **enc),
        ):
            try:
                run()
                outcomes.append(None)
            except NotDicomError as exc:
                outcomes.append(str(exc))
        if path.name in TRUNCATED:
            assert outcomes == [TRUNCATED[path.name]] * 4, (path.name, outcomes)
            failed += 1
        else:
            assert outcomes == [None] * 4, (path.name, outcomes)
            walked += 1
    assert walked > 200 and failed == len(TRUNCATED), (walked, failed)


def _top_level_ends(data: bytes, implicit: bool, little: bool) -> set[int]:
    """Offsets where a top-level element ends, by pydicom's own reader."""
    fp = DicomBytesIO(data)
    ends = {0}
    for _ in data_element_generator(fp, implicit, little):
        ends.add(fp.tell())
    return ends


CUT_FILES = ["CT_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "MR_small_bigendian.dcm",
             "SC_rgb_small_odd_jpeg.dcm"]


@pytest.mark.parametrize("name", CUT_FILES)
def test_a_file_cut_anywhere_inside_its_dataset_is_truncated(name: str) -> None:
    offset, data, implicit, little, deflated = _dataset(TEST_FILES / name)
    assert not deflated
    ends = _top_level_ends(data, implicit, little)
    assert len(data) in ends
    cuts = 0
    for cut in range(len(data)):
        w = DatasetWalker(implicit=implicit, little=little)
        w.feed(data[:cut])
        if _complete_at(data, ends, cut):
            w.close()  # a shorter but complete dataset
            continue
        with pytest.raises(TruncatedError):
            w.close()
        cuts += 1
    assert cuts > len(data) * 0.9, cuts


def _complete_at(data: bytes, ends: set[int], cut: int) -> bool:
    """A cut at a top-level element boundary, or one followed by fewer zero
    bytes than an element header (tolerated as padding), leaves a dataset."""
    last = max(e for e in ends if e <= cut)
    return cut - last < 8 and not data[last:cut].strip(b"\0")


@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG2000.dcm", "rtplan.dcm"])
def test_a_cut_file_walked_from_disk_says_what_is_missing(tmp_path: Path, name: str) -> None:
    offset, data, implicit, little, _ = _dataset(TEST_FILES / name)
    ends = _top_level_ends(data, implicit, little)
    raw = (TEST_FILES / name).read_bytes()
    for cut in range(1, len(data), max(1, len(data) // 300)):
        path = tmp_path / "cut.dcm"
        path.write_bytes(raw[: offset + cut])
        with open(path, "rb") as f:
            if _complete_at(data, ends, cut):
                walk_file(f, offset, implicit=implicit, little=little)
                continue
            with pytest.raises(TruncatedError) as exc:
                walk_file(f, offset, implicit=implicit, little=little)
        assert "\n" not in str(exc.value) and str(exc.value)


def test_a_cut_deflate_stream_is_truncated_at_every_offset() -> None:
    offset, data, implicit, little, deflated = _dataset(TEST_FILES / "image_dfl.dcm")
    assert deflated
    for cut in range(len(data)):
        z = zlib.decompressobj(-zlib.MAX_WBITS)
        z.decompress(data[:cut])
        w = DatasetWalker(implicit=False, little=True, deflated=True)
        w.feed(data[:cut])
        if z.eof:
            w.close()
        else:
            with pytest.raises(TruncatedError):
                w.close()


# --- hostile datasets, byte by byte -----------------------------------------------


def el(group: int, elem: int, vr: bytes, value: bytes, *, length: int | None = None,
       little: bool = True) -> bytes:
    """One explicit VR element."""
    e = "<" if little else ">"
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack(e + "HH2s2xL", group, elem, vr, n) + value
    return struct.pack(e + "HH2sH", group, elem, vr, n) + value


def imp(group: int, elem: int, value: bytes, *, length: int | None = None) -> bytes:
    """One implicit VR element (or an item / delimiter)."""
    return struct.pack("<HHL", group, elem, len(value) if length is None else length) + value


UNDEF = 0xFFFFFFFF
ITEM = (0xFFFE, 0xE000)
ITEM_END = imp(0xFFFE, 0xE00D, b"")
SEQ_END = imp(0xFFFE, 0xE0DD, b"")
NAME = el(0x0010, 0x0010, b"PN", b"Doe^John")
UID = el(0x0008, 0x0018, b"UI", b"1.2.3\0")


def _walk(data: bytes, *, implicit: bool = False, little: bool = True, step: int = 0,
          **kw) -> DatasetWalker:
    w = DatasetWalker(implicit=implicit, little=little, **kw)
    if step:
        for i in range(0, len(data), step):
            w.feed(data[i : i + step])
    else:
        w.feed(data)
    w.close()
    return w


def _seq(items: bytes, *, undefined: bool = True, tag=(0x0008, 0x1140)) -> bytes:
    if undefined:
        return el(*tag, b"SQ", items, length=UNDEF) + SEQ_END
    return el(*tag, b"SQ", items)


def _item(body: bytes, *, undefined: bool = False) -> bytes:
    if undefined:
        return imp(*ITEM, body, length=UNDEF) + ITEM_END
    return imp(*ITEM, body)


def _pixels(*fragments: bytes, end: bool = True) -> bytes:
    data = el(0x7FE0, 0x0010, b"OB", b"", length=UNDEF)
    data += b"".join(imp(*ITEM, f) for f in fragments)
    return data + (SEQ_END if end else b"")


GOOD = {
    "flat": UID + NAME,
    "defined sequence, defined items": UID + _seq(_item(NAME) + _item(UID), undefined=False) + NAME,
    "undefined sequence, undefined items": UID + _seq(_item(NAME, undefined=True)) + NAME,
    "nested": UID + _seq(_item(_seq(_item(NAME, undefined=True)) + NAME)),
    "empty sequence": UID + el(0x0008, 0x1140, b"SQ", b"") + _seq(b""),
    "implicit item in explicit sequence": UID + _seq(_item(imp(0x0010, 0x0010, b"Doe^"))),
    "UN of undefined length is a sequence": UID
    + el(0x0009, 0x1010, b"UN", _item(imp(0x0010, 0x0010, b"X ")), length=UNDEF) + SEQ_END,
    "encapsulated pixel data": UID + _pixels(b"", b"\xff\xd8\xff\xd9"),
    "trailing padding": UID + NAME + b"\0" * 5,
    "dataset trailing padding": UID + _pixels(b"") + el(0xFFFC, 0xFFFC, b"OB", b"\0" * 40),
}


@pytest.mark.parametrize("name", GOOD)
@pytest.mark.parametrize("step", [0, 1, 3, 7])
def test_well_formed_datasets_walk_clean(name: str, step: int) -> None:
    w = _walk(GOOD[name], step=step, wanted=[0x00100010])
    padding = 5 if name == "trailing padding" else 0
    assert w.position == len(GOOD[name]) - padding
    assert w.past_wanted


BAD = {
    "PN length overrun": (UID + el(0x0010, 0x0010, b"PN", b"Doe", length=32767),
                          "element (0010,0010) declares 32767 bytes, 3 remain"),
    "undefined sequence without delimiter": (UID + el(0x0008, 0x1140, b"SQ", b"", length=UNDEF)
                                             + _item(NAME),
                                             "the dataset ends inside sequence (0008,1140)"),
    "undefined item without delimiter": (UID + el(0x0008, 0x1140, b"SQ", b"", length=UNDEF)
                                         + imp(*ITEM, NAME, length=UNDEF),
                                         "the dataset ends inside an item of sequence (0008,1140)"),
    "encapsulated pixel data without delimiter": (
        UID + _pixels(b"", b"\xff\xd8", end=False),
        "encapsulated pixel data (7FE0,0010) has no sequence delimiter"),
    "fragment overruns the data": (UID + _pixels(b"", end=False) + imp(*ITEM, b"ab", length=100),
                                   "element (FFFE,E000) declares 100 bytes, 2 remain"),
    "item overruns its sequence": (
        UID + el(0x0008, 0x1140, b"SQ", imp(*ITEM, NAME, length=400)) + NAME,
        "an item of sequence (0008,1140) declares 400 bytes, 16 remain"),
    "element overruns its item": (
        UID + _seq(_item(UID + el(0x0010, 0x0010, b"PN", b"Doe^John", length=9))),
        "element (0010,0010) declares 9 bytes, 8 remain in an item of sequence (0008,1140)"),
    "cut inside an element header": (UID + NAME[:5],
                                     "the data ends inside an element header (5 bytes at offset 14)"),
}


@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("step", [0, 1, 7])
def test_hostile_datasets_are_truncated_with_a_precise_reason(name: str, step: int) -> None:
    data, reason = BAD[name]
    with pytest.raises(TruncatedError) as exc:
        _walk(data, step=step)
    assert str(exc.value) == reason


NOT_DICOM = {
    "a non-item in a sequence": (UID + _seq(NAME), "sequence (0008,1140) holds (0010,0010)"),
    "a fragment of undefined length": (UID + el(0x7FE0, 0x0010, b"OB", b"", length=UNDEF)
                                       + imp(*ITEM, b"", length=UNDEF),
                                       "has a fragment of undefined length"),
    "an element in encapsulated pixel data": (
        UID + el(0x7FE0, 0x0010, b"OB", b"", length=UNDEF) + NAME,
        "(0010,0010) where an item or the sequence delimiter belongs"),
    "a stray item delimiter": (UID + ITEM_END, "an item delimiter (FFFE,E00D) in the dataset"),
}


@pytest.mark.parametrize("name", NOT_DICOM)
def test_structures_that_are_not_dicom_are_refused(name: str) -> None:
    data, reason = NOT_DICOM[name]
    with pytest.raises(NotDicomError) as exc:
        _walk(data)
    assert reason in str(exc.value)
    assert not isinstance(exc.value, TruncatedError) or "ends" in str(exc.value)


def test_deep_nesting_is_bounded() -> None:
    depth = 5000  # far deeper than Python's recursion limit allows a recursive walk
    data = UID + el(0x0008, 0x1140, b"SQ", b"", length=UNDEF)
    data += (imp(*ITEM, b"", length=UNDEF) + el(0x0008, 0x1140, b"SQ", b"", length=UNDEF)) * depth
    with pytest.raises(NotDicomError, match=f"nested deeper than {MAX_DEPTH} levels"):
        _walk(data)
    ok = UID + _seq(_item(NAME))
    for _ in range(MAX_DEPTH - 1):
        ok = _seq(_item(ok, undefined=True))
    _walk(ok)


def test_leading_file_meta_elements_are_reported() -> None:
    meta = el(0x0002, 0x0000, b"UL", struct.pack("<L", 18)) + el(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1\0")
    assert _walk(meta + UID + NAME).leading_meta_end == len(meta)
    assert _walk(UID + NAME).leading_meta_end == 0
    assert _walk(meta + UID + NAME, step=1).leading_meta_end == len(meta)


def test_wanted_values_are_kept_whatever_the_chunking() -> None:
    big = el(0x0010, 0x0010, b"PN", b"A" * 5000)
    data = el(0x0008, 0x0005, b"CS", b"ISO_IR 100") + UID + big + el(0x0020, 0x0011, b"IS", b"7 ")
    for step in (0, 1, 5, 4096):
        w = _walk(data, step=step, wanted=[0x00100010, 0x00080018])
        assert w.elements == {0x00080005: ("CS", b"ISO_IR 100"), 0x00080018: ("UI", b"1.2.3\0"),
                              0x00100010: ("PN", b"A" * 5000)}


def test_big_endian_and_implicit_elements() -> None:
    be = el(0x0008, 0x0018, b"UI", b"1.2\0", little=False) + el(0x0010, 0x0010, b"PN", b"Doe ", little=False)
    assert _walk(be, little=False, wanted=[0x00100010]).elements[0x00100010] == ("PN", b"Doe ")
    im = imp(0x0008, 0x0018, b"1.2\0") + imp(0x0010, 0x0010, b"Doe ")
    assert _walk(im, implicit=True, wanted=[0x00100010], step=1).elements[0x00100010] == (None, b"Doe ")
    with pytest.raises(TruncatedError):
        _walk(im[:-1], implicit=True)


# --- deflate -----------------------------------------------------------------------

BOMB_VALUE = 1 << 30


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """About 1 MB of deflate that inflates to a header and a 1 GiB OB value of zeros."""
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(UID + NAME + el(0x7FE0, 0x0010, b"OB", b"", length=BOMB_VALUE))]
    zeros = bytes(1 << 20)
    for _ in range(BOMB_VALUE >> 20):
        out.append(z.compress(zeros))
    out.append(z.flush())
    return b"".join(out)


def test_a_deflate_bomb_walks_in_bounded_memory(bomb: bytes) -> None:
    assert len(bomb) < 2_000_000
    tracemalloc.start()
    try:
        w = DatasetWalker(implicit=False, little=True, deflated=True, wanted=[0x00100010])
        for i in range(0, len(bomb), 64 * 1024):
            w.feed(bomb[i : i + 64 * 1024])
        w.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert w.position == len(UID + NAME) + 12 + BOMB_VALUE
    assert w.elements[0x00100010] == ("PN", b"Doe^John")


def test_a_cut_or_corrupt_deflate_bomb_fails(bomb: bytes) -> None:
    w = DatasetWalker(implicit=False, little=True, deflated=True)
    w.feed(bomb[: len(bomb) // 2])
    with pytest.raises(TruncatedError, match="deflate stream is cut short"):
        w.close()
    w = DatasetWalker(implicit=False, little=True, deflated=True)
    with pytest.raises(NotDicomError, match="corrupt deflate stream"):
        w.feed(b"\xff" * 64 + bomb[:1000])


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("step", [1, 5, 13, 4096, 1 << 24])
def test_zero_bytes_read_as_empty_elements_whatever_the_chunking(implicit: bool, step: int) -> None:
    """A run of zero bytes (padding some writers leave; the cheapest deflate
    bomb: 32 MiB of zeros in 33 KB kept a server's thread busy for 26 s, 8
    bytes at a time) is a run of empty (0000,0000) elements, taken in one
    step: counted each, noted as out of order, and bounded by the element
    limit, in the dataset and inside an item."""
    if implicit:
        uid, name = imp(0x0008, 0x0018, b"1.2.3\0"), imp(0x0010, 0x0010, b"Doe^John")
    else:
        uid, name = UID, NAME
    zeros = bytes(8 * 1000 + 3 * 8)
    item = imp(0xFFFE, 0xE000, name + bytes(8 * 50))  # an item of defined length: a name, then zeros
    seq = imp(0x0008, 0x1115, item) if implicit else el(0x0008, 0x1115, b"SQ", item)
    data = uid + seq + name + zeros
    w = _feed(data, step, seek=False, implicit=implicit, little=True, wanted=[0x00100010])
    assert w.position == len(data)
    assert w.elements[0x00100010][1] == b"Doe^John"
    assert w.irregular is not None
    # as many element headers as fed one byte at a time (never more than 12 bytes in view)
    one = _feed(data, 1, seek=False, implicit=implicit, little=True, wanted=[0x00100010])
    assert w._count == one._count >= len(zeros) // 8


@pytest.mark.parametrize("unit", [bytes(8), b"\0\0\0\0UL\0\0", b"\x08\x00\x05\x00CS\x00\x00",
                                  b"\x08\x00\x05\x00CS\x02\x00AB" + b"\x08\x00\x06\x00SH\x00\x00"],
                         ids=["zeros", "empty-UL", "empty-CS", "two-alternating"])
def test_a_deflate_bomb_of_any_repeated_element_is_refused_after_a_bounded_walk(unit: bytes) -> None:
    """The zero bomb's run is taken in one step; the same bomb of any other
    small element, repeated or alternating (49 KB inflating to 4 Mi headers),
    was walked header by header up to MAX_ELEMENTS: 8 s of a server's
    thread. Deflated data now gets DEFLATED_PER_BYTE headers per compressed
    byte received: refused after a few hundred thousand."""
    from scp.dicom.walk import DEFLATED_PER_BYTE

    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = z.compress(UID + unit * ((4 << 20) * 8 // len(unit))) + z.flush()
    assert len(stream) < 128 * 1024
    w = DatasetWalker(implicit=False, little=True, deflated=True)
    with pytest.raises(NotDicomError, match="deflate bomb"):
        for i in range(0, len(stream), 16 * 1024):
            w.feed(stream[i : i + 16 * 1024])
        w.close()
    assert w._count <= DEFLATED_PER_BYTE * len(stream) + 1


def test_a_deflated_dataset_of_many_near_identical_items_walks_whole() -> None:
    """What a real deflated dataset of the most repetitive kind looks like (an
    enhanced multi-frame object's per-frame items, each frame's position its
    only difference): far below the headers a compressed byte may bring."""
    from scp.dicom.walk import DEFLATED_PER_BYTE

    items = b""
    for frame in range(20_000):
        position = f"-125.0\\-125.0\\{frame * 0.5:.1f}".encode()
        position += b" " * (len(position) % 2)
        inner = el(0x0020, 0x0032, b"DS", position) + el(0x0020, 0x9157, b"UL", frame.to_bytes(4, "little"))
        plane = el(0x0020, 0x9113, b"SQ", b"", length=0xFFFFFFFF) + _item(inner) + SEQ_END
        items += _item(plane)
    body = UID + NAME + el(0x5200, 0x9230, b"SQ", b"", length=0xFFFFFFFF) + items + SEQ_END
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = z.compress(body) + z.flush()
    w = DatasetWalker(implicit=False, little=True, deflated=True, wanted=[0x00100010])
    for i in range(0, len(stream), 16 * 1024):
        w.feed(stream[i : i + 16 * 1024])
    w.close()
    assert w.position == len(body) and w.elements[0x00100010] == ("PN", b"Doe^John")
    assert w._count > 100_000
    assert w._count < DEFLATED_PER_BYTE * len(stream) / 4, (w._count, len(stream))  # a margin of 4


@pytest.mark.parametrize("chunk", [1, 7, 64 * 1024, 1 << 24])
def test_a_deflate_stream_padded_to_an_even_length_ends(chunk: int) -> None:
    """A deflated dataset padded with a zero byte (PS3.5 A.5: even length),
    whose inflated size is a multiple of the inflate piece: the walk ends (it
    once looped for ever on the byte past the end of the stream)."""
    body = UID + NAME + el(0x7FE0, 0x0010, b"OB", b"", length=3 << 20)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = z.compress(body + bytes(3 << 20)) + z.flush()
    for padded in (stream + b"\0", stream + b"\0\0\0"):
        w = DatasetWalker(implicit=False, little=True, deflated=True, wanted=[0x00100010])
        for i in range(0, len(padded), chunk):
            w.feed(padded[i : i + chunk])
        w.close()
        assert w.position == len(body) + (3 << 20)
        assert w.elements[0x00100010] == ("PN", b"Doe^John")


def test_walk_file_seeks_over_large_values(tmp_path: Path) -> None:
    data = UID + NAME + el(0x7FE0, 0x0010, b"OB", b"", length=50_000_000)
    path = tmp_path / "sparse.dcm"
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(len(data) + 50_000_000)
    with open(path, "rb") as f:
        w = walk_file(f, 0, implicit=False, little=True, wanted=[0x00100010])
    assert w.position == len(data) + 50_000_000
    with open(path, "r+b") as f:
        f.truncate(len(data) + 49_999_999)
    with open(path, "rb") as f, pytest.raises(TruncatedError,
                                              match=r"\(7FE0,0010\) declares 50000000 bytes, 49999999 remain"):
        walk_file(f, 0, implicit=False, little=True)
    with pytest.raises(TruncatedError):
        walk_file(io.BytesIO(data[:-3]), 0, implicit=False, little=True)


def _outcome(data: bytes, step: int, **kw) -> tuple:
    """Everything a walk tells, or the error it ends with."""
    try:
        w = _walk(data, step=step, **kw)
    except (TruncatedError, NotDicomError) as exc:
        return (type(exc).__name__, str(exc))
    return (w.elements, w.value_offsets, w.irregular, w.irregular_in_header, w.position,
            w.past_wanted, w.leading_meta_end)


#: Plain runs the lean loop takes, broken by everything it leaves to the general
#: loop: wanted tags, the first tag past them, tags out of order, sequences,
#: defined-length items ending where the next top-level element starts, group
#: FFFF, undefined lengths, long VRs, a value running past the end.
_PLAIN = b"".join(el(0x0018, e, b"DS", b"1.5 ") for e in range(0x50, 0x58))
EDGES = {
    "plain runs around wanted tags": UID + _PLAIN + NAME + el(0x0010, 0x0020, b"LO", b"ID")
    + el(0x0020, 0x000D, b"UI", b"1.2\0") + _PLAIN.replace(b"\x18\x00", b"\x28\x00"),
    "out of order past the wanted": UID + NAME + el(0x0028, 0x0010, b"US", b"\1\0")
    + el(0x0028, 0x0008, b"IS", b"1 ") + el(0x0028, 0x0011, b"US", b"\1\0"),
    "defined items in a defined sequence": UID + NAME
    + _seq(_item(_PLAIN) + _item(_PLAIN + NAME), undefined=False, tag=(0x0040, 0x0275))
    + el(0x0040, 0x0300, b"LO", b"after "),
    "undefined items": UID + NAME + _seq(_item(_PLAIN, undefined=True) * 2, tag=(0x0040, 0x0275))
    + el(0x0040, 0x0300, b"LO", b"after "),
    "long VRs": UID + NAME + el(0x0029, 0x1010, b"OB", b"\1" * 300) + el(0x0029, 0x1011, b"UT", b"t ")
    + el(0x0029, 0x1012, b"UN", b"\2" * 6) + el(0x0029, 0x1013, b"SQ", b""),
    "group FFFF and padding": UID + NAME + el(0xFFFF, 0x0001, b"OB", b"\0\0"),
    "a value past the end": UID + NAME + _PLAIN + el(0x0028, 0x0100, b"OB", b"x" * 10, length=40),
    "an item past its sequence": UID + NAME
    + el(0x0040, 0x0275, b"SQ", imp(*ITEM, _PLAIN, length=len(_PLAIN) + 9), length=len(_PLAIN) + 8)
    + NAME,
    "implicit plain runs": imp(0x0008, 0x0018, b"1.2\0") + imp(0x0010, 0x0010, b"Doe ")
    + b"".join(imp(0x0018, e, b"1.5 ") for e in range(0x50, 0x60)) + imp(0x0018, 0x0040, b"x "),
}


@pytest.mark.parametrize("name", EDGES)
def test_a_walk_tells_the_same_in_any_chunking(name: str) -> None:
    """The lean loop (plain elements) and the general one agree: whatever the
    chunking, and cut at any offset, a walk reports the same."""
    data = EDGES[name]
    kw = {"implicit": name.startswith("implicit"), "wanted": [0x00100010, 0x00080018]}
    for cut in range(len(data), 0, -1):
        piece = data[:cut]
        whole = _outcome(piece, 0, **kw)
        for step in (1, 2, 7, 8, 9, 12, 13, 64):
            assert _outcome(piece, step, **kw) == whole, (cut, step)
        sized = _outcome(piece, 0, size=len(piece), **kw)  # a file: lengths checked at once
        assert sized[0] == whole[0] if isinstance(whole[0], str) else sized == whole, cut

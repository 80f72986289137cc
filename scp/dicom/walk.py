"""The completeness walk: one streaming pass over a dataset's element headers.

``serve`` feeds it network fragments as they arrive, ``sort`` runs it over
files (:func:`walk_file`, which seeks over large values instead of reading
them). It never decodes a value. It checks that every declared length fits
inside its container (the dataset, or an enclosing defined-length sequence or
item), that undefined-length sequences and items are closed by their
delimiters, and that encapsulated pixel data is a run of defined-length items
ended by a sequence delimiter. On the way it keeps the raw values of a few
wanted top-level elements, so a header can be built from the same pass.

Transfer syntaxes: explicit VR little endian, implicit VR little endian,
explicit VR big endian, and deflated explicit VR little endian (inflated in
bounded pieces: memory stays at a few MiB whatever the inflated size).

Rules, the same as pydicom's reader where pydicom is lenient:

* in explicit VR, a VR that is not two letters means the writer switched to
  implicit VR for that element; group ``FFFE`` always has the implicit
  8-byte header;
* an undefined-length element is a sequence, except encapsulated pixel data:
  in explicit VR any undefined-length VR other than ``SQ`` and ``UN``, in
  implicit VR (7FE0,0010);
* the items of a sequence in an explicit VR dataset may be implicit VR (their
  first element's VR tells);
* in implicit VR a defined-length value is opaque (never parsed as a sequence);
* zero bytes at the very end that are too short for an element header are
  padding.

Costs, measured on this machine kind (2 shared cores, Python 3.11, medians of
300 runs; the machine is shared, so +-10 %): a 0.5 MB CT instance
(``CT_small.dcm`` header, 258 top-level elements, 512x512x16-bit pixels) fed
in 16 KiB chunks 82-87 us, in 1 MiB chunks 73-79 us (about 0.3 us per element
header; a value is skipped in O(1) inside a chunk, whatever its size);
:func:`walk_file` on the 39 KB ``CT_small.dcm`` 77-82 us (open excluded);
1-byte feeding 0.3-0.5 us per byte (linear).

Examples
--------
>>> import struct
>>> w = DatasetWalker(implicit=False, little=True, wanted=[0x00100010])
>>> w.feed(b"\\x10\\x00\\x10\\x00PN\\x08\\x00Doe^John")
>>> w.close()
>>> w.elements
{1048592: ('PN', b'Doe^John')}
>>> w = DatasetWalker(implicit=False, little=True)
>>> w.feed(b"\\x10\\x00\\x10\\x00PN\\x20\\x00Doe")
>>> w.close()
Traceback (most recent call last):
...
scp.errors.TruncatedError: element (0010,0010) declares 32 bytes, 3 remain
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from struct import Struct
from typing import BinaryIO

from scp.errors import NotDicomError, TruncatedError

__all__ = ["DatasetWalker", "walk_file", "SPECIFIC_CHARACTER_SET", "MAX_DEPTH", "MAX_ELEMENTS"]

#: (0008,0005) Specific Character Set: always kept, names need it.
SPECIFIC_CHARACTER_SET = 0x00080005
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
#: Deepest nesting of sequences followed.
MAX_DEPTH = 32
#: Most element, item and fragment headers followed in one dataset.
MAX_ELEMENTS = 1 << 22
#: In deflated data, at most this many headers per compressed byte received
#: (and :data:`DEFLATED_FLOOR` in any case): a deflate bomb of a repeated
#: small element (49 KB inflating to 4 Mi headers) would otherwise cost the
#: walk of :data:`MAX_ELEMENTS` headers, seconds of a server's thread. Real
#: datasets, even of many near-identical items, hold well under one header
#: per compressed byte.
DEFLATED_PER_BYTE = 16
DEFLATED_FLOOR = 1 << 16
#: Bytes :func:`walk_file` reads at a time.
FILE_CHUNK = 64 * 1024

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_NO_LIMIT = 1 << 62
_NO_TAGS: frozenset[int] = frozenset()
_LAST_PLAIN_TAG = 0xFFFDFFFF

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (pydicom's
#: ``EXPLICIT_VR_LENGTH_32``, written out so that the walk needs no pydicom).
EXPLICIT_VR_LENGTH_32 = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)
#: Explicit VRs with a 2-byte length.
_SHORT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split()
)
_SEQUENCE_VRS = frozenset((b"SQ", b"UN"))
#: The VRs as the numbers their two bytes read as (little endian, big endian):
#: (short VRs, long VRs but SQ), for the walk's lean loop.
_VR_NUMBERS = {
    little: (frozenset(int.from_bytes(vr, "little" if little else "big") for vr in _SHORT_VRS),
             frozenset(int.from_bytes(vr, "little" if little else "big") for vr in _LONG_VRS - {b"SQ"}))
    for little in (True, False)
}

# Frame kinds and fields. A frame is a list: [kind, end, limit, implicit, tag, undecided].
_TOP, _ITEM_FRAME, _SEQ, _FRAGS = 0, 1, 2, 3
_MAX_FRAMES = 2 * MAX_DEPTH + 1


def _fmt(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def encoding_of(transfer_syntax: str) -> tuple[bool, bool, bool] | None:
    """(implicit VR, little endian, deflated) of a dataset in `transfer_syntax`;
    None for a private syntax pydicom does not know (its encoding cannot be told).

    >>> encoding_of("1.2.840.10008.1.2"), encoding_of("1.2.840.10008.1.2.4.50")
    ((True, True, False), (False, True, False))
    """
    import pydicom.uid

    uid = pydicom.uid.UID(transfer_syntax)
    if not uid.is_transfer_syntax:
        return None
    return uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated


class DatasetWalker:
    """Walk one dataset's element headers as its bytes arrive, in any chunking.

    Parameters
    ----------
    implicit, little
        The dataset's encoding (implicit VR little endian, explicit VR little
        or big endian).
    deflated
        The bytes are a raw deflate stream of an explicit VR little endian
        dataset (Deflated Explicit VR Little Endian).
    wanted
        Top-level tags whose raw values to keep in :attr:`elements`
        (SpecificCharacterSet is always kept).
    max_inflate
        Largest piece inflated at a time; memory use is a small multiple of it.
    size
        The dataset's length in bytes, if known (a file): lengths are then
        checked against it as soon as they are read. Not for deflated data.

    Attributes
    ----------
    elements : dict[int, tuple[str | None, bytes]]
        Raw values of the wanted top-level elements, by tag: (VR, value); VR
        is None for implicit VR. A later duplicate replaces an earlier one.
    value_offsets : dict[int, int]
        Where each kept value starts, in dataset bytes.
    past_wanted : bool
        True once the walk is past the last wanted top-level tag (it read a
        greater top-level tag, or the dataset ended).
    leading_meta_end : int
        Dataset offset just after the (0002,xxxx) elements at the start of the
        dataset (0 if it does not start with any).
    position : int
        Dataset bytes consumed so far; for deflated data, inflated bytes.
    irregular : str | None
        The first thing seen that a strict reader would not expect but pydicom
        tolerates (a switch to implicit VR, an unknown VR, top-level tags out
        of order, an undefined-length wanted tag, a command group): a header
        reader that must match pydicom falls back to it.
    irregular_in_header : bool
        True if such a thing was seen before the walk was past the last
        wanted tag (or is a wanted tag out of order): it may change what
        pydicom reads.
    """

    __slots__ = (
        "elements", "value_offsets", "past_wanted", "leading_meta_end", "position",
        "irregular", "irregular_in_header", "_implicit", "_little", "_wanted", "_max_wanted",
        "_frames", "_skip", "_cur", "_collect", "_tail", "_count", "_leading", "_last_tag",
        "_z", "_compressed", "_max_elements", "_max_inflate", "_closed", "_impl", "_expl", "_ul", "_expl_n", "_short_n", "_long_n",
    )

    def __init__(
        self,
        *,
        implicit: bool,
        little: bool,
        deflated: bool = False,
        wanted: Iterable[int] = (),
        max_inflate: int = 1 << 20,
        size: int | None = None,
    ) -> None:
        if deflated and (implicit or not little):
            raise ValueError("deflated data is explicit VR little endian")
        if deflated and size is not None:
            raise ValueError("the size of deflated data is not known in advance")
        self._implicit = bool(implicit)
        self._little = bool(little)
        self._wanted = frozenset(int(t) for t in wanted) | {SPECIFIC_CHARACTER_SET}
        self._max_wanted = max(self._wanted)
        self.elements: dict[int, tuple[str | None, bytes]] = {}
        self.value_offsets: dict[int, int] = {}
        self.past_wanted = False
        self.leading_meta_end = 0
        self.position = 0
        self.irregular: str | None = None
        self.irregular_in_header = False
        limit = _NO_LIMIT if size is None else int(size)
        self._frames: list[list] = [[_TOP, -1, limit, self._implicit, 0, False]]
        self._skip = 0
        self._cur = (0, 0)  # (tag, length) of the value being skipped, for messages
        self._collect: list | None = None
        self._tail = b""
        self._count = 0
        self._leading = True
        self._last_tag = -1
        self._z = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
        self._compressed = 0  # deflated bytes fed
        self._max_elements = DEFLATED_FLOOR if deflated else MAX_ELEMENTS
        self._max_inflate = max(1024, int(max_inflate))
        self._closed = False
        e = "<" if little else ">"
        self._impl = Struct(e + "HHL").unpack_from
        self._expl = Struct(e + "HH2sH").unpack_from
        self._ul = Struct(e + "L").unpack_from
        self._expl_n = Struct(e + "HHHH").unpack_from
        self._short_n, self._long_n = _VR_NUMBERS[self._little]

    # --- driving -------------------------------------------------------------

    @property
    def skip(self) -> int:
        """Value bytes the walk passes over next without looking at them: a
        file driver may seek over them and call :meth:`skipped`. Always 0 for
        deflated data (compressed bytes cannot be skipped)."""
        return 0 if self._z is not None else self._skip

    def skipped(self, n: int) -> None:
        """Tell the walker `n` bytes (at most :attr:`skip`) were passed over."""
        if n < 0 or n > self.skip:
            raise ValueError(f"cannot skip {n} bytes, {self.skip} are skippable")
        self._skip -= n
        self.position += n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Walk the next bytes of the dataset (any length, even 1 byte)."""
        if self._closed:
            raise ValueError("the walker is closed")
        if not data:
            return
        z = self._z
        if z is None:
            self._feed_raw(data)
            return
        limit = self._max_inflate
        if z.eof:
            return  # bytes after the end of the deflate stream (padding to an even length)
        self._compressed += len(data)
        self._max_elements = min(MAX_ELEMENTS, max(DEFLATED_FLOOR, DEFLATED_PER_BYTE * self._compressed))
        try:
            out = z.decompress(data, limit)
            while True:
                if out:
                    self._feed_raw(out)
                # past the end of the stream, zlib keeps the rest as an
                # unconsumed tail for ever: it is padding, not data
                if z.eof or (len(out) < limit and not z.unconsumed_tail):
                    return
                out = z.decompress(z.unconsumed_tail, limit)
        except zlib.error as exc:
            raise TruncatedError(f"corrupt deflate stream: {exc}") from None

    def close(self) -> None:
        """End of data: raise :class:`TruncatedError` if the dataset is incomplete."""
        if self._closed:
            return
        self._closed = True
        if self._z is not None and not self._z.eof:
            raise TruncatedError(
                f"the deflate stream is cut short (after {self.position} inflated bytes)"
            )
        if not self._tail:
            self.position += self._run(b"", 0, 0)
        self.past_wanted = True
        frames = self._frames
        if self._collect is not None or self._skip:
            tag, length = self._cur
            got = length - (self._collect[3] if self._collect is not None else self._skip)
            raise TruncatedError(f"element {_fmt(tag)} declares {length} bytes, {got} remain")
        if self._tail:
            if len(frames) == 1 and not self._tail.strip(b"\0"):
                return  # trailing padding, shorter than an element header
            raise TruncatedError(
                f"the data ends inside an element header ({len(self._tail)} bytes "
                f"at offset {self.position}){self._where(frames[-1])}"
            )
        if len(frames) > 1:
            fr = frames[-1]
            kind, tag = fr[0], fr[4]
            if kind == _FRAGS:
                raise TruncatedError(
                    f"encapsulated pixel data {_fmt(tag)} has no sequence delimiter"
                )
            if kind == _SEQ:
                raise TruncatedError(f"the dataset ends inside sequence {_fmt(tag)}")
            raise TruncatedError(f"the dataset ends inside an item of sequence {_fmt(tag)}")
        top_limit = frames[0][2]
        if top_limit != _NO_LIMIT and self.position < top_limit:
            raise TruncatedError(
                f"the walk ended at offset {self.position}, the dataset has {top_limit} bytes"
            )

    # --- the walk --------------------------------------------------------------

    def _feed_raw(self, data) -> None:
        n = len(data)
        i = 0
        while self._tail and i < n:
            old = self._tail
            take = min(12 - len(old), n - i)
            head = old + bytes(data[i : i + take])
            self._tail = b""
            used = self._run(head, 0, len(head))
            self.position += used
            if used >= len(old):
                i += used - len(old)
            else:
                self._tail = head[used:]
                i += take
        if self._tail or i >= n:
            return
        used = self._run(data, i, n)
        self.position += used - i
        if used < n:
            self._tail = bytes(data[used:n])

    @staticmethod
    def _where(fr: list) -> str:
        kind, tag = fr[0], fr[4]
        if kind == _TOP:
            return ""
        if kind == _FRAGS:
            return f" in encapsulated pixel data {_fmt(tag)}"
        if kind == _SEQ:
            return f" in sequence {_fmt(tag)}"
        return f" in an item of sequence {_fmt(tag)}"

    def _push(self, frame: list) -> None:
        if len(self._frames) >= _MAX_FRAMES:
            raise NotDicomError(f"sequences nested deeper than {MAX_DEPTH} levels")
        self._frames.append(frame)

    def _note(self, what: str, header: bool = False) -> None:
        if self.irregular is None:
            self.irregular = what
        if header or not self.past_wanted:
            self.irregular_in_header = True

    def _too_many(self) -> NotDicomError:
        if self._z is None or self._max_elements == MAX_ELEMENTS:
            return NotDicomError(f"more than {MAX_ELEMENTS} element headers")
        return NotDicomError(f"more than {self._max_elements} element headers in the first "
                             f"{self._compressed} bytes of deflated data (a deflate bomb)")

    def _run(self, buf, i: int, n: int) -> int:
        """Walk `buf[i:n]`; return the index where more bytes are needed.
        The caller advances :attr:`position`."""
        frames = self._frames
        base = self.position - i
        impl, expl, ul = self._impl, self._expl, self._ul
        wanted = self._wanted
        max_wanted = self._max_wanted
        long_vrs, short_vrs = _LONG_VRS, _SHORT_VRS
        elements = self.elements
        max_elements = self._max_elements
        while True:
            if self._skip:
                left = n - i
                if left < self._skip:
                    self._skip -= left
                    return n
                i += self._skip
                self._skip = 0
            if self._collect is not None:
                c = self._collect
                take = min(c[3], n - i)
                c[2] += buf[i : i + take]
                c[3] -= take
                i += take
                if c[3]:
                    return i
                self._collect = None
                elements[c[0]] = (c[1], bytes(c[2]))
                self.value_offsets[c[0]] = c[4]
            fr = frames[-1]
            pos = base + i
            fr_end = fr[1]
            if pos == fr_end:
                frames.pop()
                continue
            if n - i < 8:
                return i
            kind = fr[0]
            limit = fr[2]

            if kind == _SEQ or kind == _FRAGS:
                self._count += 1
                if self._count > self._max_elements:
                    raise self._too_many()
                g, e, length = impl(buf, i)
                tag = g << 16 | e
                if pos + 8 > limit:
                    raise TruncatedError(f"an item header runs past the end{self._where(fr)}")
                if tag == _ITEM:
                    if length == _UNDEFINED:
                        if kind == _FRAGS:
                            raise NotDicomError(
                                f"encapsulated pixel data {_fmt(fr[4])} has a fragment "
                                "of undefined length"
                            )
                        self._push([_ITEM_FRAME, -1, limit, fr[3], fr[4], not fr[3]])
                        i += 8
                        continue
                    end = pos + 8 + length
                    if end > limit:
                        what = "a fragment of encapsulated pixel data" if kind == _FRAGS \
                            else "an item of sequence"
                        raise TruncatedError(
                            f"{what} {_fmt(fr[4])} declares {length} bytes, "
                            f"{max(0, limit - pos - 8)} remain"
                        )
                    i += 8
                    if kind == _FRAGS:
                        j = i + length
                        if j <= n:
                            i = j
                        else:
                            self._cur = (_ITEM, length)
                            self._skip = j - n
                            return n
                    elif length:
                        self._push([_ITEM_FRAME, end, end, fr[3], fr[4], not fr[3]])
                    continue
                if tag == _SEQUENCE_DELIMITER:
                    if fr_end < 0:
                        frames.pop()
                        i += 8
                        continue
                    raise NotDicomError(
                        f"a sequence delimiter inside the defined-length sequence {_fmt(fr[4])}"
                    )
                if kind == _FRAGS:
                    raise NotDicomError(
                        f"encapsulated pixel data {_fmt(fr[4])}: {_fmt(tag)} where an item "
                        "or the sequence delimiter belongs"
                    )
                raise NotDicomError(
                    f"sequence {_fmt(fr[4])} holds {_fmt(tag)} where an item belongs"
                )

            # Elements of the top-level dataset or of an item: an inner loop
            # runs over the simple ones (defined length, not a sequence).
            if fr[5]:  # first element of an item in an explicit VR dataset: which VR?
                fr[5] = False
                if not (0x40 < buf[i + 4] < 0x5B and 0x40 < buf[i + 5] < 0x5B):
                    fr[3] = True
            implicit = fr[3]
            top = kind == _TOP
            count = self._count
            last_tag = self._last_tag
            leading = self._leading
            past = self.past_wanted
            try:
                if not leading:
                    # A lean loop over the plain elements, wanted ones
                    # included (their values kept): in order, of defined
                    # length, not sequences, inside the buffer and their
                    # container, not the first past the wanted tags. The first
                    # element it does not take (and everything it would refuse)
                    # goes to the general loop below, which decides and comes
                    # back after it.
                    prev = last_tag if top else -1
                    want = wanted if top else _NO_TAGS
                    offsets = self.value_offsets
                    # the first tag past the wanted ones, items and delimiters
                    # (group FFFE) are left to the general loop
                    stop = max_wanted if top and not past else _LAST_PLAIN_TAG
                    lim = min(n, limit - base)  # a value may end here at most
                    if max_elements - count > (n - i) // 8:  # never reached in this buffer
                        n8 = n - 8
                        if implicit:
                            while i <= n8:
                                g, e, length = impl(buf, i)
                                tag = g << 16 | e
                                j = i + 8 + length  # an undefined length is past `lim`
                                if not prev < tag <= stop or j > lim:
                                    break
                                if tag in want:
                                    elements[tag] = (None, bytes(buf[i + 8 : j]))
                                    offsets[tag] = base + i + 8
                                count += 1
                                prev = tag
                                i = j
                        else:
                            # (the VR read as a number: no bytes object per element)
                            n12 = n - 12
                            expl_n, short_n, long_n = self._expl_n, self._short_n, self._long_n
                            if want and stop != _LAST_PLAIN_TAG:
                                while i <= n8:
                                    g, e, vr_n, length = expl_n(buf, i)
                                    if vr_n in short_n:
                                        v = i + 8
                                    elif vr_n in long_n and i <= n12:
                                        v = i + 12
                                        length = ul(buf, i + 8)[0]
                                    else:
                                        break
                                    tag = g << 16 | e
                                    j = v + length
                                    if not prev < tag <= stop or j > lim:
                                        break
                                    if tag in want:
                                        elements[tag] = (bytes(buf[i + 4 : i + 6]).decode("latin-1"),
                                                         bytes(buf[v:j]))
                                        offsets[tag] = base + v
                                    count += 1
                                    prev = tag
                                    i = j
                            else:  # past the wanted tags, or in an item: nothing to keep
                                while i <= n8:
                                    g, e, vr_n, length = expl_n(buf, i)
                                    if vr_n in short_n:
                                        j = i + 8 + length
                                    elif vr_n in long_n and i <= n12:
                                        j = i + 12 + ul(buf, i + 8)[0]
                                    else:
                                        break
                                    tag = g << 16 | e
                                    if not prev < tag <= stop or j > lim:
                                        break
                                    count += 1
                                    prev = tag
                                    i = j
                    pos = base + i
                    if top:
                        last_tag = prev
                    if pos == fr_end:
                        continue  # the item is complete: the outer loop closes it first
                    if n - i < 8:
                        return i
                while True:
                    count += 1
                    if implicit:
                        g, e, length = impl(buf, i)
                        hl = 8
                        vr = None
                    else:
                        g, e, vr, length = expl(buf, i)
                        if g == 0xFFFE:
                            length = ul(buf, i + 4)[0]
                            hl = 8
                            vr = None
                        elif vr in long_vrs:
                            if n - i < 12:
                                count -= 1
                                return i
                            length = ul(buf, i + 8)[0]
                            hl = 12
                        elif vr in short_vrs:
                            hl = 8
                        elif b"AA" <= vr <= b"ZZ":
                            self._note(f"unknown VR {vr!r} at offset {pos}")
                            hl = 8
                        else:
                            self._note(f"implicit VR element in explicit VR at offset {pos}")
                            g, e, length = impl(buf, i)
                            hl = 8
                            vr = None
                    tag = g << 16 | e
                    if pos + hl > limit:
                        raise TruncatedError(
                            f"the data ends inside an element header{self._where(fr)}"
                        )
                    if g == 0xFFFE:
                        if tag == _ITEM_DELIMITER and kind == _ITEM_FRAME and fr_end < 0:
                            frames.pop()
                            i += 8
                            break
                        if tag in (_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER):
                            name = {_ITEM: "an item tag", _ITEM_DELIMITER: "an item delimiter",
                                    _SEQUENCE_DELIMITER: "a sequence delimiter"}[tag]
                            place = "the dataset" if top else \
                                f"a defined-length item of sequence {_fmt(fr[4])}"
                            raise NotDicomError(f"{name} {_fmt(tag)} in {place} at offset {pos}")
                    if top:
                        if tag > max_wanted and not past:
                            past = self.past_wanted = True
                        if tag <= last_tag:
                            self._note(f"top-level tag {_fmt(tag)} out of order",
                                       tag <= max_wanted)
                        last_tag = tag
                        if leading:
                            if g == 2 and length != _UNDEFINED:
                                self.leading_meta_end = pos + hl + length
                            else:
                                leading = False
                                if g == 0:
                                    self._note("a command group (0000,xxxx) in the dataset")
                    if length == _UNDEFINED:
                        if top and tag in wanted:
                            self._note(f"wanted tag {_fmt(tag)} has an undefined length")
                        if vr is None:
                            frags = tag == _PIXEL_DATA
                        else:
                            frags = vr not in _SEQUENCE_VRS
                        if frags:
                            self._push([_FRAGS, -1, limit, True, tag, False])
                        else:
                            self._push([_SEQ, -1, limit, implicit, tag, False])
                        i += hl
                        break
                    end = pos + hl + length
                    if end > limit:
                        raise TruncatedError(
                            f"element {_fmt(tag)} declares {length} bytes, "
                            f"{max(0, limit - pos - hl)} remain{self._where(fr)}"
                        )
                    i += hl
                    if vr == b"SQ" and length:
                        self._push([_SEQ, end, end, False, tag, False])
                        break
                    j = i + length
                    if top and tag in wanted:
                        vrs = vr if vr is None else vr.decode("latin-1")
                        if j > n:
                            self._cur = (tag, length)
                            self._collect = [tag, vrs, bytearray(buf[i:n]), j - n, pos + hl]
                            return n
                        elements[tag] = (vrs, bytes(buf[i:j]))
                        self.value_offsets[tag] = pos + hl
                    elif j > n:
                        self._cur = (tag, length)
                        self._skip = j - n
                        return n
                    i = j
                    pos = end
                    if tag == 0 and length == 0 and buf[i : i + 8] == _ZERO_HEADER:
                        # A run of zero bytes (padding; a deflate bomb) reads as
                        # empty (0000,0000) elements, each noted as the first one
                        # was: taken in one step, not one slow header at a time.
                        run = _zero_run(buf, i, min(n, limit - base))
                        count += run // 8
                        if count > max_elements:
                            raise self._too_many()
                        if top:
                            self._note("top-level tag (0000,0000) out of order", True)
                        i += run
                        pos += run
                    if pos == fr_end or n - i < 8:
                        break
                    if count > max_elements:
                        raise self._too_many()
                    if not leading:
                        break  # back to the lean loop
            finally:
                self._count = count
                if top:
                    self._last_tag = last_tag
                    self._leading = leading
            if count > max_elements:
                raise self._too_many()


_ZERO_HEADER = bytes(8)


def _zero_run(buf, i: int, stop: int) -> int:
    """How many bytes of whole 8-byte groups of zeros start `buf[i:stop]`
    (looked at in growing pieces: the cost is the run's, not the buffer's)."""
    run, step = 0, 64
    while i + run < stop:
        seg = bytes(buf[i + run : min(stop, i + run + step)])
        zeros = len(seg) - len(seg.lstrip(b"\0"))
        run += zeros
        if zeros < len(seg):
            break
        step = min(step * 2, 1 << 20)
    return run - run % 8


def walk_file(
    f: BinaryIO,
    offset: int,
    *,
    implicit: bool,
    little: bool,
    deflated: bool = False,
    wanted: Iterable[int] = (),
) -> DatasetWalker:
    """Walk the dataset of `f` from `offset` to the end of the file.

    Large values are passed over with a seek, never read. Return the closed
    walker (its :attr:`~DatasetWalker.elements` hold the wanted values); raise
    :class:`TruncatedError` if the dataset is cut short, :class:`NotDicomError`
    if its structure is not DICOM. The stream is left at the end of the file.
    """
    size = os.fstat(f.fileno()).st_size if _has_fileno(f) else f.seek(0, os.SEEK_END)
    if offset > size:
        raise TruncatedError(f"the dataset starts at {offset}, past the end of the file ({size})")
    f.seek(offset)
    walker = DatasetWalker(
        implicit=implicit, little=little, deflated=deflated, wanted=wanted,
        size=None if deflated else size - offset,
    )
    read = f.read
    while True:
        skip = walker.skip
        if skip:
            f.seek(skip, os.SEEK_CUR)
            walker.skipped(skip)
        chunk = read(FILE_CHUNK)
        if not chunk:
            break
        walker.feed(chunk)
    walker.close()
    return walker


def _has_fileno(f: BinaryIO) -> bool:
    try:
        f.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True

"""Does a received dataset hold together? Walk its element chain to the last byte, no deeper.

Every transfer syntax the node accepts is walked: Implicit and Explicit VR Little Endian, Explicit VR Big
Endian (byte order swapped), the encapsulated syntaxes (Explicit VR Little Endian outside the fragments) and
Deflated (inflated within the size limit into an unnamed temporary file, then walked). The walk reads element
headers and skips values by their lengths; it enters every sequence and item, defined length or not, and
checks that each element ends inside its item, each item inside its sequence, each fragment inside the pixel
data, and that every undefined-length one is closed by its delimiter. It is iterative: nesting costs a list
entry, not a stack frame, and nesting deeper than ``MAX_DEPTH`` is refused (pydicom, which the worker uses,
recurses once per level). Cost: ~20 us for a typical CT header; values (pixel data) are never read.

It also refuses native pixel data shorter than the image module says it is (rows x columns x samples x
bytes x frames, for the photometric interpretations whose size that is): a file cut off by a modality's
export, re-padded to an element boundary, would otherwise be acknowledged and fail only in the worker.
The same walk reads the four identifying UIDs (``WANTED``) that place the file, so no second parser runs.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import BinaryIO

from pydicom.datadict import DicomDictionary
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

SOP_CLASS = 0x00080016
SOP_INSTANCE = 0x00080018
STUDY = 0x0020000D
SERIES = 0x0020000E
WANTED = (SOP_CLASS, SOP_INSTANCE, STUDY, SERIES)

MAX_DEPTH = 64  # nested sequences (and encapsulated pixel data) refused beyond this
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset(str(vr).encode() for vr in EXPLICIT_VR_LENGTH_32)  # 4-byte length after 2 reserved bytes
_SHORT_VRS = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2) - _LONG_VRS
# Implicit VR: which tags are sequences, from pydicom's dictionary (a defined-length one looks like any value)
_SEQUENCE_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
_LE = (struct.Struct("<HHI"), struct.Struct("<I"), struct.Struct("<H"))
_BE = (struct.Struct(">HHI"), struct.Struct(">I"), struct.Struct(">H"))
_WINDOW = 1 << 14
_WANTED = frozenset(WANTED)
_LAST_WANTED = max(WANTED)
_PIXEL_DATA = 0x7FE00010
# Image Pixel module elements the pixel data size follows from: SamplesPerPixel, PhotometricInterpretation,
# NumberOfFrames, Rows, Columns, BitsAllocated
_IMAGE_ELEMENTS = frozenset((0x0002, 0x0004, 0x0008, 0x0010, 0x0011, 0x0100))
_FULL_SIZE_PHOTOMETRIC = frozenset(("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL"))
# what an open container holds: a sequence holds items, an item holds elements, encapsulated pixel data
# holds fragments (items whose values are bytes)
_SEQUENCE, _DATASET, _FRAGMENTS = 0, 1, 2


def value_text(raw: bytes | bytearray | memoryview) -> str:
    """A UI/short-text value as pydicom reads it: ASCII, trailing NUL/space padding and leading spaces removed
    (UnicodeDecodeError for anything else: the caller then asks pydicom)."""
    return bytes(raw).decode("ascii").rstrip("\0 ").lstrip(" ")


def _short_pixel_data(image: dict[int, bytes], length: int, u16: struct.Struct) -> str | None:
    """Why native pixel data of ``length`` bytes cannot hold the image the Image Pixel module describes, or
    None (also when that module is incomplete or unusual: pydicom and the worker judge those)."""
    try:
        rows, cols, bits = (u16.unpack(image[e])[0] for e in (0x0010, 0x0011, 0x0100))
        samples = u16.unpack(image[0x0002])[0] if 0x0002 in image else 1
        frames = int(image[0x0008].decode("ascii").strip("\0 ") or 1) if 0x0008 in image else 1
        photometric = image[0x0004].decode("ascii").strip("\0 ") if 0x0004 in image else ""
    except (KeyError, struct.error, UnicodeDecodeError, ValueError):
        return None
    if bits not in (8, 16, 32, 64) or photometric not in _FULL_SIZE_PHOTOMETRIC:
        return None
    expected = rows * cols * samples * (bits // 8) * frames
    if length >= expected:
        return None
    return (
        f"pixel data holds {length} bytes; {frames} frame(s) of {rows}x{cols}x{samples} at {bits} bits need {expected}"
    )


def check_structure(
    path: str | os.PathLike[str],
    start: int,
    end: int,
    *,
    explicit: bool,
    big_endian: bool = False,
    native: bool = True,
    head: bytes | bytearray | None = None,
) -> str | None:
    """None if the elements from offset ``start`` tile the file exactly up to ``end``; otherwise why not.

    ``big_endian``: Explicit VR Big Endian. ``native``: pixel data not encapsulated (its size is checked
    against the image module). ``head``, the first bytes of the dataset already in memory, saves reopening
    the file: a typical dataset's element headers all lie in it and its pixel data, last, is skipped by length."""
    reader = _Reader(path, start, end, head)
    try:
        return _walk(reader, start, end, explicit, None, big_endian, native)
    finally:
        reader.close()


def check_and_find(
    path: str | os.PathLike[str],
    start: int,
    end: int,
    *,
    explicit: bool,
    big_endian: bool = False,
    native: bool = True,
    head: bytes | bytearray | None = None,
) -> tuple[str | None, dict[int, str] | None]:
    """``check_structure`` plus, from the same walk, the top-level values of ``WANTED`` seen before any later
    top-level tag (as pydicom reads them; missing ones absent, empty ones ''); None for those if they could
    not be read here (not ASCII, longer than a window), so the caller asks pydicom."""
    reader = _Reader(path, start, end, head)
    found: dict[int, str] | None = {}
    try:
        try:
            why = _walk(reader, start, end, explicit, found, big_endian, native)
        except (UnicodeDecodeError, _Unreadable):
            why, found = _walk(reader, start, end, explicit, None, big_endian, native), None
    finally:
        reader.close()
    return why, found


def check_bytes(
    data: bytes, *, explicit: bool, big_endian: bool = False, native: bool = True
) -> tuple[str | None, dict[int, str] | None]:
    """``check_and_find`` for a dataset wholly in memory."""
    return check_and_find("", 0, len(data), explicit=explicit, big_endian=big_endian, native=native, head=data)


class _Unreadable(Exception):
    """An identifying value the walk cannot read from its window."""


class _Reader:
    """Windows of the file for the walk: from ``head`` while it covers them, else pread (opened lazily)."""

    def __init__(self, path: str | os.PathLike[str], start: int, end: int, head: bytes | bytearray | None) -> None:
        self.path = path
        self.start = start
        self.head = bytes(head) if head else b""
        self.whole = start + len(self.head) >= end  # the head is the entire dataset
        self.fd: int | None = None

    def window(self, pos: int) -> bytes:
        off = pos - self.start
        if off >= 0 and (self.whole or len(self.head) - off >= _WINDOW):
            return self.head[off:]
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self.fd, _WINDOW, pos)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _walk(
    reader: _Reader, pos: int, end: int, explicit: bool, found: dict[int, str] | None, big_endian: bool, native: bool
) -> str | None:
    head_s, u32, u16 = _BE if big_endian else _LE
    shift = 0 if big_endian else 16  # a short VR's length: the last two of the four bytes read as one number
    base, buf = pos, reader.window(pos)  # element headers are read from this window of the file
    wanted = found is not None  # still collecting the identifying UIDs (top level, up to SeriesInstanceUID)
    collected: dict[int, str] = found if found is not None else {}
    image: dict[int, bytes] = {}  # top-level Image Pixel module values (raw), for the pixel data size check
    # open containers, innermost last: (kind, defined end or -1, the limit it must end by, implicit VR inside)
    stack: list[tuple[int, int, int, bool]] = []
    kind, limit, implicit = _DATASET, end, not explicit  # of the innermost container (the top level: the dataset)
    depth = 0  # open sequences and encapsulated pixel data
    while True:
        if pos >= limit:
            if pos > limit:
                return f"element length runs {pos - limit} bytes past the end of its {_NAMES[len(stack) > 0][kind]}"
            if not stack:
                return None
            k, own_end, _, _ = stack[-1]
            if own_end < 0:  # undefined length, cut short by its parent's end
                return "dataset ends inside a sequence" if limit == end else "sequence runs past the end of its item"
            stack.pop()
            if k != _DATASET:
                depth -= 1
            kind, _, limit, implicit = stack[-1] if stack else (_DATASET, -1, end, not explicit)
            if stack:
                limit = stack[-1][1] if stack[-1][1] >= 0 else stack[-1][2]
            continue
        if limit - pos < 8:
            return f"truncated element header at offset {pos}"
        off = pos - base
        if off < 0 or off + 12 > len(buf):
            base, buf, off = pos, reader.window(pos), 0
        group, elem, length = head_s.unpack_from(buf, off)
        if group == 0xFFFE:  # item or delimiter: no VR in any transfer syntax
            tag = group << 16 | elem
            at, pos = pos, pos + 8
            own_end = stack[-1][1] if stack else 0
            if tag == _ITEM and kind == _SEQUENCE:
                if length == _UNDEFINED:
                    stack.append((_DATASET, -1, limit, implicit))
                else:
                    if pos + length > limit:
                        return f"item at offset {at} runs past the end of its sequence"
                    stack.append((_DATASET, pos + length, limit, implicit))
                    limit = pos + length
                kind = _DATASET
            elif tag == _ITEM and kind == _FRAGMENTS and length != _UNDEFINED:
                pos += length  # a fragment (or the basic offset table) ending past its pixel data is caught above
            elif ((tag == _SEQ_END and kind != _DATASET) or (tag == _ITEM_END and kind == _DATASET)) and own_end < 0:
                stack.pop()
                if kind != _DATASET:
                    depth -= 1
                kind, _, limit, implicit = stack[-1] if stack else (_DATASET, -1, end, not explicit)
                if stack:
                    limit = stack[-1][1] if stack[-1][1] >= 0 else stack[-1][2]
            else:
                return f"unexpected item tag {tag:08X} at offset {at}"
            continue
        if kind != _DATASET:
            return f"element where an item was expected at offset {pos}"
        vr = b""
        if not implicit:
            vr = buf[off + 4 : off + 6]
            if vr in _LONG_VRS:
                if limit - pos < 12 or off + 12 > len(buf):
                    return f"truncated element header at offset {pos}"
                length = u32.unpack_from(buf, off + 8)[0]
                pos += 12
            elif vr in _SHORT_VRS:
                length, pos = (length >> shift) & 0xFFFF, pos + 8
            else:
                return f"invalid VR {vr!r} at offset {pos}"
        else:
            pos += 8
        if not stack:
            if wanted:
                tag = group << 16 | elem
                if tag > _LAST_WANTED:
                    wanted = False
                elif tag in _WANTED and length != _UNDEFINED:
                    start = pos - base
                    if start + length > len(buf):  # longer than a window: not a UID, leave it to pydicom
                        raise _Unreadable
                    collected[tag] = value_text(buf[start : start + length])
            if length != _UNDEFINED and native:
                if group == 0x0028 and elem in _IMAGE_ELEMENTS and length <= 16:
                    if pos - base < 0 or pos - base + length > len(buf):  # the value is past this window
                        base, buf = pos, reader.window(pos)
                    image[elem] = bytes(buf[pos - base : pos - base + length])
                elif group << 16 | elem == _PIXEL_DATA and (why := _short_pixel_data(image, length, u16)):
                    return why
        if length == _UNDEFINED:
            if group << 16 | elem == _PIXEL_DATA or vr in (b"OB", b"OW"):
                new_kind = _FRAGMENTS
            elif vr in (b"SQ", b"UN", b""):
                new_kind = _SEQUENCE
            else:
                return f"undefined length for VR {vr!r} at offset {pos}"
            depth += 1
            if depth > MAX_DEPTH:
                return f"sequences nested deeper than {MAX_DEPTH}"
            implicit = implicit or vr == b"UN"  # an undefined-length UN holds Implicit VR data (PS3.5 6.2.2)
            stack.append((new_kind, -1, limit, implicit))
            kind = new_kind
            continue
        if length and (vr == b"SQ" or (implicit and (group << 16 | elem) in _SEQUENCE_TAGS)):
            if pos + length > limit:
                return f"sequence at offset {pos} runs past the end of its {_NAMES[len(stack) > 0][kind]}"
            depth += 1
            if depth > MAX_DEPTH:
                return f"sequences nested deeper than {MAX_DEPTH}"
            stack.append((_SEQUENCE, pos + length, limit, implicit))
            kind, limit = _SEQUENCE, pos + length
            continue
        pos += length


_NAMES = ({_DATASET: "dataset"}, {_DATASET: "item", _SEQUENCE: "sequence", _FRAGMENTS: "pixel data"})


class MalformedDataset(ValueError):
    """The received bytes are not a dataset the node will keep; the message says why."""


def inflate_into(path: str | os.PathLike[str], start: int, out: BinaryIO, *, max_total: int) -> int:
    """Inflate the Deflated Explicit VR dataset at ``start`` of ``path`` into ``out``; returns its size.

    Streamed a MiB at a time and stopped past ``max_total``: pydicom would inflate it all into memory, and a
    few MiB of zeros deflate a thousandfold. Raises MalformedDataset for a bad, truncated or oversized stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        while not inflater.eof and (chunk := fh.read(1 << 16)):
            while True:  # until this chunk is consumed and zlib holds no more output for it
                try:
                    data = inflater.decompress(chunk, 1 << 20)
                except zlib.error as exc:
                    raise MalformedDataset(f"invalid deflate stream: {exc}") from exc
                chunk = inflater.unconsumed_tail
                total += len(data)
                if total > max_total:
                    raise MalformedDataset(f"inflates to more than {max_total >> 20} MiB")
                out.write(data)
                if inflater.eof or (not chunk and len(data) < 1 << 20):
                    break
    if not inflater.eof:
        raise MalformedDataset("deflate stream is truncated")
    out.flush()
    return total

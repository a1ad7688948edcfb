"""Does a received Little Endian dataset hold together? Walk its element chain to the last byte, no deeper.

It also refuses native pixel data shorter than the image module says it is (rows x columns x samples x
bytes x frames, for the photometric interpretations whose size that is): a file cut off by a modality's
export, re-padded to an element boundary, would otherwise be acknowledged and fail only in the worker.

The header sniff reads only up to (0020,000E); a dataset truncated in its pixel data, or with an element
length that runs past the end, would otherwise be acknowledged and fail only later in the worker. The walk
reads element headers, skips values by their lengths and follows undefined-length sequences and
encapsulated pixel data by counting delimiters, iteratively: nesting costs a counter, not a stack frame, and
nesting deeper than ``MAX_DEPTH`` is refused (pydicom, which the worker uses, recurses once per level).
Cost: ~20 us for a typical CT header; values (pixel data) are never read.
"""

from __future__ import annotations

import os
import struct
import zlib

from dicom_node.header_sniff import WANTED, value_text

MAX_DEPTH = 64
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"))
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))
_HEAD = struct.Struct("<HHI")
_U32 = struct.Struct("<I")
_WINDOW = 1 << 14
_WANTED = frozenset(WANTED)
_LAST_WANTED = max(WANTED)
_PIXEL_DATA = 0x7FE00010
# Image Pixel module elements the pixel data size follows from: SamplesPerPixel, PhotometricInterpretation,
# NumberOfFrames, Rows, Columns, BitsAllocated
_IMAGE_ELEMENTS = frozenset((0x0002, 0x0004, 0x0008, 0x0010, 0x0011, 0x0100))
_FULL_SIZE_PHOTOMETRIC = frozenset(("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL"))
_U16 = struct.Struct("<H")


def _short_pixel_data(image: dict[int, bytes], length: int) -> str | None:
    """Why native pixel data of ``length`` bytes cannot hold the image the Image Pixel module describes, or
    None (also when that module is incomplete or unusual: pydicom and the worker judge those)."""
    try:
        rows, cols, bits = (_U16.unpack(image[e])[0] for e in (0x0010, 0x0011, 0x0100))
        samples = _U16.unpack(image[0x0002])[0] if 0x0002 in image else 1
        frames = int(image[0x0008].decode("ascii").strip("\0 ") or 1) if 0x0008 in image else 1
        photometric = image[0x0004].decode("ascii").strip("\0 ") if 0x0004 in image else ""
    except (KeyError, struct.error, UnicodeDecodeError, ValueError):
        return None
    if bits not in (8, 16, 32, 64) or photometric not in _FULL_SIZE_PHOTOMETRIC:
        return None
    expected = rows * cols * samples * (bits // 8) * frames
    if length >= expected:
        return None
    return (f"pixel data holds {length} bytes; {frames} frame(s) of {rows}x{cols}x{samples} at {bits} bits "
            f"need {expected}")


def check_structure(path: str | os.PathLike[str], start: int, end: int, *, explicit: bool,
                    head: bytes | bytearray | None = None) -> str | None:
    """None if the elements from offset ``start`` tile the file exactly up to ``end``; otherwise why not.

    ``head``, the first bytes of the dataset already in memory, saves reopening the file: a typical
    dataset's element headers all lie in it and its pixel data, last, is skipped by length."""
    reader = _Reader(path, start, end, head)
    try:
        return _walk(reader, start, end, explicit)
    finally:
        reader.close()


def check_and_find(path: str | os.PathLike[str], start: int, end: int, *, explicit: bool,
                   head: bytes | bytearray | None = None) -> tuple[str | None, dict[int, str] | None]:
    """``check_structure`` plus, from the same walk, the top-level values of ``header_sniff.WANTED`` seen
    before any later top-level tag (as ``sniff_uids`` reads them); None for those if they could not be
    read here (not ASCII), so the caller asks pydicom."""
    reader = _Reader(path, start, end, head)
    found: dict[int, str] | None = {}
    try:
        try:
            why = _walk(reader, start, end, explicit, found)
        except (UnicodeDecodeError, _Unreadable):
            why, found = _walk(reader, start, end, explicit), None
    finally:
        reader.close()
    return why, found


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
        if 0 <= off < len(self.head) and (self.whole or len(self.head) - off >= _WINDOW):
            return self.head[off:]
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self.fd, _WINDOW, pos)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _walk(reader: _Reader, pos: int, end: int, explicit: bool, found: dict[int, str] | None = None) -> str | None:
    base, buf = pos, reader.window(pos)  # element headers are read from this window of the file
    wanted = found is not None  # still collecting the identifying UIDs (top level, up to SeriesInstanceUID)
    collected: dict[int, str] = found if found is not None else {}
    image: dict[int, bytes] = {}  # top-level Image Pixel module values (raw), for the pixel data size check
    depth = 0  # open undefined-length sequences / encapsulated pixel data
    implicit_from = 0  # > 0: inside an undefined-length UN opened at this depth, encoded Implicit VR (PS3.5 6.2.2)
    while pos < end:
        if end - pos < 8:
            return f"truncated element header at offset {pos}"
        off = pos - base
        if off < 0 or off + 12 > len(buf):
            base, buf, off = pos, reader.window(pos), 0
        group, elem, length = _HEAD.unpack_from(buf, off)
        if group == 0xFFFE:  # item or delimiter: no VR in any transfer syntax
            tag = group << 16 | elem
            pos += 8
            if tag == _SEQ_END:
                if depth == 0:
                    return f"sequence delimiter outside a sequence at offset {pos - 8}"
                depth -= 1
                if depth < implicit_from:
                    implicit_from = 0
            elif tag == _ITEM and length != _UNDEFINED:
                if depth == 0:
                    return f"item outside a sequence at offset {pos - 8}"
                pos += length
            elif tag not in (_ITEM, _ITEM_END):
                return f"unknown item tag {tag:08X} at offset {pos - 8}"
            continue
        vr = b""
        if explicit and not implicit_from:
            vr = buf[off + 4:off + 6]
            if vr in _LONG_VRS:
                if end - pos < 12 or off + 12 > len(buf):
                    return f"truncated element header at offset {pos}"
                length = _U32.unpack_from(buf, off + 8)[0]
                pos += 12
            elif vr in _SHORT_VRS:
                length, pos = length >> 16, pos + 8
            else:
                return f"invalid VR {vr!r} at offset {pos}"
        else:
            pos += 8
        if wanted and depth == 0:
            tag = group << 16 | elem
            if tag > _LAST_WANTED:
                wanted = False
            elif tag in _WANTED and length != _UNDEFINED:
                start = pos - base
                if start + length > len(buf):  # longer than a window: not a UID, leave it to pydicom
                    raise _Unreadable
                collected[tag] = value_text(buf[start:start + length])
        if depth == 0 and length != _UNDEFINED:
            if group == 0x0028 and elem in _IMAGE_ELEMENTS and length <= 16:
                if pos - base < 0 or pos - base + length > len(buf):  # the value is past this window
                    base, buf = pos, reader.window(pos)
                image[elem] = bytes(buf[pos - base:pos - base + length])
            elif group << 16 | elem == _PIXEL_DATA and (why := _short_pixel_data(image, length)):
                return why
        if length == _UNDEFINED:
            depth += 1
            if depth > MAX_DEPTH:
                return f"sequences nested deeper than {MAX_DEPTH}"
            if vr == b"UN" and not implicit_from:
                implicit_from = depth
            continue
        pos += length
    if pos > end:
        return f"element length runs {pos - end} bytes past the end"
    if depth:
        return "dataset ends inside a sequence"
    return None


class MalformedDataset(ValueError):
    """The received bytes are not a dataset the node will keep; the message says why."""


def inflated_head(path: str | os.PathLike[str], start: int, *, head_bytes: int, max_total: int) -> tuple[bytes, bool]:
    """The first ``head_bytes`` of a Deflated Explicit VR dataset at ``start``, and whether that is all of it.

    The whole stream is inflated to check it is complete and no larger than ``max_total``, but only the head
    is kept: pydicom would inflate it all into memory, and a few MiB of zeros deflate a thousandfold."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = bytearray()
    total = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        while chunk := fh.read(1 << 16):
            while chunk:
                try:
                    out = inflater.decompress(chunk, 1 << 20)
                except zlib.error as exc:
                    raise MalformedDataset(f"invalid deflate stream: {exc}") from exc
                chunk = inflater.unconsumed_tail
                total += len(out)
                if total > max_total:
                    raise MalformedDataset(f"inflates to more than {max_total >> 20} MiB")
                if len(head) < head_bytes:
                    head += out[:head_bytes - len(head)]
                if inflater.eof:
                    break
            if inflater.eof:
                break
    if not inflater.eof:
        raise MalformedDataset("deflate stream is truncated")
    return bytes(head), total <= head_bytes

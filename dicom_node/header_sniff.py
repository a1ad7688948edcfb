"""Read the four identifying UIDs from the start of a Little Endian dataset without building a Dataset.

The listener needs SOP Class, SOP Instance, Study and Series UID (all at or before tag (0020,000E)) to
place a file; pydicom's parser costs far more per instance than the rest of the receive path. Anything
this walker does not handle (a truncated buffer, undefined-length UN, odd encodings) returns None and the
caller falls back to pydicom, so the fast path never decides differently, only sooner.
"""

from __future__ import annotations

import struct

SOP_CLASS = 0x00080016
SOP_INSTANCE = 0x00080018
STUDY = 0x0020000D
SERIES = 0x0020000E
WANTED = (SOP_CLASS, SOP_INSTANCE, STUDY, SERIES)

_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"))
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Undecided(Exception):
    """The walker cannot decide from these bytes; use pydicom."""


def _header(buf: bytes, pos: int, explicit: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR or b'', value length, value offset) of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise _Undecided
    group, elem = _TAG.unpack_from(buf, pos)
    tag = group << 16 | elem
    if group == 0xFFFE or not explicit:
        return tag, b"", _U32.unpack_from(buf, pos + 4)[0], pos + 8
    vr = bytes(buf[pos + 4:pos + 6])
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _Undecided
        return tag, vr, _U32.unpack_from(buf, pos + 8)[0], pos + 12
    if not vr.isalpha():
        raise _Undecided
    return tag, vr, _U16.unpack_from(buf, pos + 6)[0], pos + 8


def _skip_sequence(buf: bytes, pos: int, explicit: bool, depth: int) -> int:
    """Offset just past an undefined-length sequence whose value starts at ``pos``."""
    if depth > 16:
        raise _Undecided
    while True:
        tag, _, length, pos = _header(buf, pos, explicit)
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Undecided
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements up to the item delimiter
            tag, vr, length, pos = _header(buf, pos, explicit)
            if tag == _ITEM_END:
                break
            pos = _skip_value(buf, pos, vr, length, explicit, depth + 1)


def _skip_value(buf: bytes, pos: int, vr: bytes, length: int, explicit: bool, depth: int) -> int:
    if length != _UNDEFINED:
        return pos + length
    if vr not in (b"SQ", b""):  # undefined-length UN or encapsulated data this early: leave it to pydicom
        raise _Undecided
    return _skip_sequence(buf, pos, explicit, depth)


def value_text(raw: bytes | bytearray | memoryview) -> str:
    """A UI/short-text value as pydicom reads it: ASCII, trailing NUL/space padding and leading spaces removed
    (UnicodeDecodeError for anything else: the caller then asks pydicom)."""
    return bytes(raw).decode("ascii").rstrip("\0 ").lstrip(" ")


def sniff_uids(buf: bytes | memoryview, *, explicit: bool, complete: bool) -> dict[int, str] | None:
    """{tag: value} of the WANTED tags found (missing tags are absent, empty values are ''), or None when
    undecided. ``complete`` says ``buf`` holds the whole dataset (so running out of bytes means absent)."""
    found: dict[int, str] = {}
    pos, end = 0, len(buf)
    try:
        while pos < end:
            tag, vr, length, start = _header(buf, pos, explicit)
            if tag > SERIES:
                return found
            if tag in WANTED:
                if length == _UNDEFINED or start + length > end:
                    raise _Undecided
                found[tag] = value_text(buf[start:start + length])
            pos = _skip_value(buf, start, vr, length, explicit, 0)
    except (_Undecided, UnicodeDecodeError, struct.error):
        return None
    if pos > end or not complete:
        return None
    return found

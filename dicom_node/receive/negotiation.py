"""A-ASSOCIATE-RQ read and answered directly for the plain requests storage senders make (PS3.8 9.3.2-9.3.3).

pynetdicom's path (decode into item objects, validate every UID through pydicom, negotiate, build and encode
the answer) costs 50-150 ms for the 128 presentation contexts DCMTK's storescu proposes: on a fresh listener
process that is longer than receiving dozens of instances. This reads the request's items itself and
negotiates the same way ``pynetdicom.presentation.negotiate_as_acceptor`` does for an AE whose contexts carry
no SCP/SCU roles (the node's): for each proposed context the first of the *acceptor's* transfer syntaxes the
requestor offers. A request with anything more (user identity, extended or asynchronous-operations
negotiation, unknown items, odd values) gets None, and the caller asks pynetdicom: this path never answers
differently, only sooner. The tests compare its answers with pynetdicom's byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from dicom_node.receive import upper_layer as ul
from storage.files import is_valid_uid

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
_ITEM = struct.Struct(">BxH")
_ROLE_SELECTION, _MAX_LENGTH, _IMPL_UID, _IMPL_VERSION = 0x54, 0x51, 0x52, 0x55


@dataclass(frozen=True)
class PlainRequest:
    called_ae: bytes  # the 16 bytes as received
    calling_ae: bytes
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...]  # (context id, abstract syntax, transfer syntaxes)


class _NotPlain(Exception):
    pass


def _uid(value: bytes) -> str:
    text = value.rstrip(b"\0").decode("ascii")
    if not is_valid_uid(text):  # stricter than pynetdicom (no leading zeros): anything else goes to it
        raise _NotPlain
    return text


def _items(data: bytes, pos: int, end: int) -> list[tuple[int, bytes]]:
    out = []
    while pos < end:
        if pos + 4 > end:
            raise _NotPlain
        kind, length = _ITEM.unpack_from(data, pos)
        if pos + 4 + length > end:
            raise _NotPlain
        out.append((kind, data[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return out


def parse(raw: bytes) -> PlainRequest | None:
    """The request if it is plain (see module docstring), else None. ``raw`` is the whole PDU."""
    try:
        if len(raw) < 74 or raw[0] != ul.A_ASSOCIATE_RQ or int.from_bytes(raw[2:6], "big") != len(raw) - 6:
            return None
        if raw[6:8] != b"\0\1":
            return None
        called, calling = raw[10:26], raw[26:42]
        for title in (called, calling):
            text = title.decode("ascii")
            if not text.strip() or text != text.lstrip(" ").ljust(16) or "\\" in text or not text.isprintable():
                return None  # pynetdicom normalises such titles; leave them to it
        contexts: list[tuple[int, str, tuple[str, ...]]] = []
        seen: set[int] = set()
        app_context = user_info = False
        for kind, value in _items(raw, 74, len(raw)):
            if kind == 0x10 and not app_context:
                if _uid(value) != APPLICATION_CONTEXT:
                    return None
                app_context = True
            elif kind == 0x20:
                if len(value) < 4 or value[0] in seen or value[0] % 2 == 0:
                    return None
                seen.add(value[0])
                sub = _items(value, 4, len(value))
                if not sub or sub[0][0] != 0x30 or len(sub) < 2 or any(k != 0x40 for k, _ in sub[1:]):
                    return None
                contexts.append((value[0], _uid(sub[0][1]), tuple(_uid(v) for _, v in sub[1:])))
            elif kind == 0x50 and not user_info:
                user_info = True
                for sub_kind, sub_value in _items(value, 0, len(value)):
                    if sub_kind == _MAX_LENGTH and len(sub_value) == 4:
                        continue
                    if sub_kind == _IMPL_UID:
                        _uid(sub_value)
                        continue
                    if sub_kind in (_IMPL_VERSION, _ROLE_SELECTION):  # roles: no effect on the node's AE
                        continue
                    return None
            else:
                return None
        if not (app_context and user_info and contexts):
            return None
        return PlainRequest(called, calling, tuple(contexts))
    except (_NotPlain, UnicodeDecodeError):
        return None


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, len(value)) + value


def accept(
    rq: PlainRequest,
    supported: Mapping[str, tuple[str, ...]],
    *,
    max_pdu: int,
    implementation_uid: str,
    implementation_version: str,
) -> tuple[bytes, dict[int, tuple[str, str]]]:
    """(A-ASSOCIATE-AC PDU, {context id: (abstract syntax, transfer syntax)} of the accepted contexts)."""
    results = []
    accepted: dict[int, tuple[str, str]] = {}
    for cid, abstract, offered in sorted(rq.contexts):
        ours = supported.get(abstract)
        chosen = next((ts for ts in ours if ts in offered), None) if ours is not None else None
        if chosen is not None:
            result, ts = 0x00, chosen
            accepted[cid] = (abstract, chosen)
        else:
            result, ts = (0x04 if ours is not None else 0x03), offered[0]
        results.append(_item(0x21, bytes([cid, 0, result, 0]) + _item(0x40, ts.encode("ascii"))))
    user = (
        _item(_MAX_LENGTH, struct.pack(">I", max_pdu))
        + _item(_IMPL_UID, implementation_uid.encode("ascii"))
        + _item(_IMPL_VERSION, implementation_version.encode("ascii"))
    )
    body = (
        b"\0\1\0\0"
        + rq.called_ae
        + rq.calling_ae
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
        + b"".join(results)
        + _item(0x50, user)
    )
    return ul.pdu(ul.A_ASSOCIATE_AC, body), accepted

"""A DICOM peer on a raw socket: it sends exactly the bytes a test writes, however wrong, and as slowly as asked.

pynetdicom and DCMTK only send what the standard allows; the listener's defences are against what it does not.
Also: the resident memory of a process, for tests that bound what a hostile peer can make the node hold.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

from dicom_node.receive import upper_layer as ul

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(value)) + value


def _ae(title: bytes) -> bytes:
    return title.ljust(16, b" ")[:16]


def associate_rq(
    *,
    calling: bytes = b"SCANNER",
    called: bytes = b"DICOM_NODE",
    version: int = 1,
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...] = ((1, CT, (EXPLICIT,)),),
    max_pdu: int = 16384,
    extra: bytes = b"",
) -> bytes:
    """An A-ASSOCIATE-RQ PDU; ``extra``: bytes appended inside the user information item (to make it large)."""
    items = _item(0x10, APPLICATION_CONTEXT)
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        items += _item(0x20, bytes([cid, 0, 0, 0]) + sub)
    items += _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4") + extra)
    body = struct.pack(">H", version) + b"\0\0" + _ae(called) + _ae(calling) + bytes(32) + items
    return ul.pdu(ul.A_ASSOCIATE_RQ, body)


def p_data(context_id: int, control: int, value: bytes) -> bytes:
    """One P-DATA-TF with one PDV; ``control``: bit 0 command, bit 1 last fragment."""
    return ul.pdu(ul.P_DATA_TF, struct.pack(">IBB", len(value) + 2, context_id, control) + value)


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian)."""

    def el(elem: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0, elem, len(value)) + value

    def uid(v: str) -> bytes:
        b = v.encode()
        return b + b"\0" if len(b) % 2 else b

    body = (
        el(0x0002, uid(sop_class))
        + el(0x0100, struct.pack("<H", 1))
        + el(0x0110, struct.pack("<H", message_id))
        + el(0x0700, struct.pack("<H", 0))
        + el(0x0800, struct.pack("<H", 0))
        + el(0x1000, uid(sop_instance))
    )
    return el(0x0000, struct.pack("<I", len(body))) + body


class RawPeer:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu(self) -> tuple[int, bytes]:
        """(type, body) of the next PDU; raises ConnectionError when the node closes the connection."""
        head = self._exact(6)
        pdu_type, length = struct.unpack(">BxI", head)
        return pdu_type, self._exact(length)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the node")
            out += chunk
        return out

    def associate(self, rq: bytes | None = None) -> None:
        self.send(rq or associate_rq())
        pdu_type, _ = self.read_pdu()
        assert pdu_type == ul.A_ASSOCIATE_AC, f"PDU type {pdu_type:#x}, not A-ASSOCIATE-AC"

    def ended(self, within: float) -> tuple[str, float]:
        """How the node ended the connection ('abort', 'closed', or 'open' if still open after ``within`` s),
        and after how many seconds."""
        t0 = time.monotonic()
        self.sock.settimeout(within)
        try:
            while True:
                pdu_type, _ = self.read_pdu()
                if pdu_type == ul.A_ABORT:
                    return "abort", time.monotonic() - t0
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                return "open", time.monotonic() - t0
            return "closed", time.monotonic() - t0

    def store_status(self) -> int:
        """The status of the next C-STORE-RSP."""
        pdu_type, body = self.read_pdu()
        assert pdu_type == ul.P_DATA_TF, f"PDU type {pdu_type:#x}"
        pdv = next(ul.iter_pdvs(memoryview(body)))
        status = ul.command_us(ul.parse_command(bytes(body[pdv.start : pdv.end])), 0x0900)
        assert status is not None
        return status

    def close(self) -> None:
        self.sock.close()


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")

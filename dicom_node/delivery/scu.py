"""C-STORE client with a typed outcome per instance and every timeout set.

Only the SOP classes being sent are proposed (with the file's own transfer syntax and the two
little-endian ones), so a PACS with a small set of accepted contexts still takes them.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom import uid as pduid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import, not declared

log = logging.getLogger("dicom_node.scu")


class Outcome(Enum):
    SUCCESS = "success"
    WARNING = "warning"  # stored, with a warning (0xB000, 0xB006, 0xB007): counts as delivered
    RETRYABLE = "retryable"  # out of resources, no association, abort, timeout
    PERMANENT = "permanent"  # refused for good (0xA9xx, 0xCxxx, unknown failures)


@dataclass(frozen=True)
class SendResult:
    path: Path
    outcome: Outcome
    status: str  # "0x0000", or "" when no response came
    detail: str = ""


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 60.0


def classify(status: int) -> Outcome:
    if status == 0x0000:
        return Outcome.SUCCESS
    if 0xB000 <= status <= 0xBFFF:
        return Outcome.WARNING
    if 0xA700 <= status <= 0xA7FF:
        return Outcome.RETRYABLE
    return Outcome.PERMANENT


# A-ASSOCIATE-RJ (result source, reason) -> words (PS3.8 9.3.4), so an admin reads why without the table
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def _nodelay(event: Any) -> None:
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _associate(ae: AE, peer: Peer) -> tuple[Any, threading.Event]:
    """Request an association; the event tells whether a TCP connection was made at all."""
    connected = threading.Event()

    def on_open(event: Any) -> None:
        connected.set()
        _nodelay(event)

    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    return assoc, connected


def _ae(peer: Peer) -> AE:
    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = peer.acse_timeout
    ae.dimse_timeout = peer.dimse_timeout
    ae.network_timeout = peer.network_timeout
    ae.connection_timeout = min(peer.network_timeout, 10.0)
    return ae


def echo(peer: Peer) -> tuple[bool, str]:
    ae = _ae(peer)
    ae.add_requested_context(Verification)
    assoc, connected = _associate(ae, peer)
    if not assoc.is_established:
        return False, _association_failure(assoc, connected.is_set())
    try:
        status = assoc.send_c_echo()
        if status and "Status" in status:
            return status.Status == 0, f"0x{status.Status:04X}"
        return False, "no response"
    finally:
        assoc.release()


def _association_failure(assoc: Any, connected: bool) -> str:
    if not connected:  # pynetdicom reports a refused connection as an abort: say what happened
        return "no association: cannot connect (peer down or unreachable)"
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        if rsp is not None:
            kind = {1: "permanent", 2: "transient"}.get(rsp.result, "")
            why = _REJECT_REASONS.get((rsp.result_source, rsp.diagnostic), "unknown reason")
            return (
                f"association rejected ({kind}: {why}; result {rsp.result}, source {rsp.result_source}, "
                f"reason {rsp.diagnostic})"
            )
        return "association rejected"
    if assoc.is_aborted:
        return "no association: aborted by the peer during negotiation"
    return "no association: no answer to the association request (timeout)"


def send_files(peer: Peer, paths: Sequence[Path]) -> list[SendResult]:
    """Send files over one association; every path gets a SendResult."""
    datasets: list[Dataset | None] = []
    unreadable: dict[Path, str] = {}
    for p in paths:
        try:
            datasets.append(dcmread(p))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:  # never retried: it cannot get better
            datasets.append(None)
            unreadable[p] = f"result file unreadable: {type(exc).__name__}: {exc}"
    ae = _ae(peer)
    contexts: dict[str, set[str]] = {}
    for ds in datasets:
        if ds is None:
            continue
        ts = str(ds.file_meta.TransferSyntaxUID)
        contexts.setdefault(str(ds.SOPClassUID), set()).update(
            {ts, str(pduid.ExplicitVRLittleEndian), str(pduid.ImplicitVRLittleEndian)}
        )
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    if not contexts:
        return [SendResult(p, Outcome.PERMANENT, "", unreadable[p]) for p in paths]
    assoc, connected = _associate(ae, peer)
    if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
        # the peer answered, and accepts none of these SOP classes: asking again will not change that
        refused = ", ".join(sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts}))
        why = f"no presentation context accepted (SOP classes {refused}): the peer does not store them"
        return [SendResult(p, Outcome.PERMANENT, "", unreadable.get(p, why)) for p in paths]
    if not assoc.is_established:
        why = _association_failure(assoc, connected.is_set())
        return [SendResult(p, Outcome.RETRYABLE, "", why) for p in paths]
    out: list[SendResult] = []
    broken = False  # a C-STORE went unanswered: the association is unusable even if not yet marked aborted
    try:
        for p, ds in zip(paths, datasets, strict=True):
            if ds is None:
                out.append(SendResult(p, Outcome.PERMANENT, "", unreadable[p]))
                continue
            if broken or not assoc.is_established:
                out.append(SendResult(p, Outcome.RETRYABLE, "", "not sent: association lost"))
                continue
            t0 = time.monotonic()
            try:
                rsp = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:  # no accepted context for this class/syntax
                out.append(SendResult(p, Outcome.PERMANENT, "", f"cannot send: {exc}"))
                continue
            if rsp is None or "Status" not in rsp:
                broken = True
                if time.monotonic() - t0 >= peer.dimse_timeout:
                    detail = f"no response within dimse_timeout ({peer.dimse_timeout:g} s): association aborted"
                else:
                    detail = "association aborted by the peer before it answered"
                out.append(SendResult(p, Outcome.RETRYABLE, "", detail))
                continue
            status = int(rsp.Status)
            comment = str(rsp.get("ErrorComment", "") or "")
            out.append(SendResult(p, classify(status), f"0x{status:04X}", comment))
    finally:
        if broken:
            assoc.abort()
        elif assoc.is_established:
            assoc.release()
    return out

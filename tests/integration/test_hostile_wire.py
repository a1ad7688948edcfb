"""Hostile peers on the wire, from a raw socket: what the listener holds (memory, time, slots) stays bounded.

Each test drives the real listener the way an attacker would, with small limits in its config so that a
timeout is seconds, not minutes; memory is the resident size of the listener's process (this one).
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ

from dicom_node.receive import upper_layer as ul
from dicom_node.receive.access import connection_cap
from tests.raw_peer import CT, EXPLICIT, IMPLICIT, RawPeer, associate_rq, c_store_rq, p_data, rss_bytes

VERIFICATION = "1.2.840.10008.1.1"
SOP = "1.2.826.0.1.3680043.10.99.7.1"


def _associate(port: int, calling: str = "SCANNER") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = 5
    return ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == name]


def _drip(peer: RawPeer, data: bytes, interval: float, give_up: float) -> float | None:
    """Send ``data`` a byte at a time every ``interval`` s; seconds until the node closed the connection, or
    None if it was still open after ``give_up`` s."""
    t0 = time.monotonic()
    peer.sock.settimeout(interval)
    for b in data:
        if time.monotonic() - t0 > give_up:
            return None
        try:
            peer.send(bytes([b]))
            got = peer.sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
        if not got or got[0] == ul.A_ABORT:
            return time.monotonic() - t0
    return None


# ---- 1. command sets ----------------------------------------------------------------------------------------


def test_an_endless_command_set_is_aborted_in_bounded_memory(make_listener) -> None:
    lis = make_listener()
    peer = RawPeer(lis.port)
    peer.associate()
    chunk = p_data(1, 0x01, b"\0" * 16000)  # command fragment, never the last
    before = rss_bytes()
    sent = 0
    try:
        while sent < 96 << 20:
            peer.send(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the node aborted and closed
    grown = rss_bytes() - before
    how, _ = peer.ended(5)
    peer.close()
    assert grown < 24 << 20, f"listener grew by {grown >> 20} MiB after {sent >> 20} MiB of command fragments"
    assert how in ("abort", "closed")
    assert sent < 8 << 20, f"{sent >> 20} MiB of command accepted before the abort"


# ---- 2. slow peers ------------------------------------------------------------------------------------------


def test_a_slowly_dripped_association_request_ends_at_acse_timeout(make_listener) -> None:
    lis = make_listener(acse_timeout=2, network_timeout=8)
    peer = RawPeer(lis.port)
    took = _drip(peer, associate_rq(), interval=0.4, give_up=8)
    peer.close()
    assert took is not None, "still connected after 8 s of one byte per 0.4 s (acse_timeout 2 s)"
    assert took < 3.5, f"{took:.1f} s"


def test_a_slowly_dripped_pdu_ends_at_network_timeout(make_listener) -> None:
    lis = make_listener(network_timeout=2, dimse_timeout=30)
    peer = RawPeer(lis.port)
    peer.associate()
    took = _drip(peer, p_data(1, 0x03, c_store_rq(CT, SOP)), interval=0.4, give_up=8)
    peer.close()
    assert took is not None, "still connected after 8 s of one byte per 0.4 s (network_timeout 2 s)"
    assert took < 3.5, f"{took:.1f} s"


def test_a_message_sent_in_slow_small_pdus_ends_at_dimse_timeout(make_listener) -> None:
    lis = make_listener(network_timeout=5, dimse_timeout=2)
    peer = RawPeer(lis.port)
    peer.associate()
    peer.send(p_data(1, 0x03, c_store_rq(CT, SOP)))
    t0 = time.monotonic()
    peer.sock.settimeout(0.4)
    took = None
    while time.monotonic() - t0 < 8:
        try:
            peer.send(p_data(1, 0x00, b"\x08\x00"))  # each PDU whole and prompt; the message never ends
            got = peer.sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            got = b""
        if not got or got[0] == ul.A_ABORT:
            took = time.monotonic() - t0
            break
    peer.close()
    assert took is not None, "still connected after 8 s of one small PDU per 0.4 s (dimse_timeout 2 s)"
    assert took < 3.5, f"{took:.1f} s"
    assert lis.rt.jobs.all_instances() == []


# ---- 3. connection slots ------------------------------------------------------------------------------------


def test_silent_connections_do_not_take_association_slots(make_listener) -> None:
    lis = make_listener(max_associations=2, acse_timeout=10)
    silent = [socket.create_connection(("127.0.0.1", lis.port)) for _ in range(4)]
    try:
        time.sleep(0.5)  # accepted and served by now
        assoc = _associate(lis.port)
        assert assoc.is_established, "an allowed peer was refused while 4 connections sat silent"
        second = _associate(lis.port)
        assert second.is_established
        third = _associate(lis.port)  # the limit still holds for associations
        assert third.is_rejected
        assoc.release()
        second.release()
    finally:
        for s in silent:
            s.close()


def test_a_flood_of_silent_connections_is_cut_oldest_first(make_listener, caplog) -> None:
    lis = make_listener(max_associations=2, acse_timeout=30)
    caplog.set_level(logging.INFO, logger="dicom_node")
    cap = connection_cap(2)
    socks = [socket.create_connection(("127.0.0.1", lis.port), timeout=5) for _ in range(cap)]
    try:
        time.sleep(0.5)  # accepted and served by now
        t0 = time.monotonic()
        assoc = _associate(lis.port)
        assert assoc.is_established, "an allowed peer was turned away by silent connections"
        assert time.monotonic() - t0 < 3
        assoc.release()
        assert socks[0].recv(1) == b""  # the oldest silent one was cut for it
        assert _events(caplog, "connection_cut")[0]["reason"] == "negotiating_connections_full"
    finally:
        for s in socks:
            s.close()


# ---- association requests ---------------------------------------------------------------------------------


def _answer(port: int, rq: bytes) -> tuple[int, bytes]:
    peer = RawPeer(port)
    try:
        peer.send(rq)
        return peer.read_pdu()
    finally:
        peer.close()


@pytest.mark.parametrize(
    ("calling", "called", "reason"),
    [
        pytest.param(b"SCANNER\t", b"DICOM_NODE", 3, id="calling-tab"),
        pytest.param(b"SCAN\nNER", b"DICOM_NODE", 3, id="calling-lf"),
        pytest.param(b"\rSCANNER", b"DICOM_NODE", 3, id="calling-cr"),
        pytest.param(b"SCANNER\x00", b"DICOM_NODE", 3, id="calling-nul"),
        pytest.param(b"SCANNER", b"DICOM_NODE\x0b", 7, id="called-vt"),
        pytest.param(b"SCANNER", b"DICOM\x7fNODE", 7, id="called-del"),
    ],
)
@pytest.mark.parametrize("allow_list", [True, False])
def test_control_characters_in_ae_titles_are_rejected(
    make_listener, caplog, calling: bytes, called: bytes, reason: int, allow_list: bool
) -> None:
    lis = make_listener({"allowed_calling_ae_titles": ["SCANNER"]} if allow_list else None)
    caplog.set_level(logging.INFO, logger="dicom_node")
    pdu_type, rj = _answer(lis.port, associate_rq(calling=calling, called=called))
    assert pdu_type == ul.A_ASSOCIATE_RJ, f"PDU type {pdu_type:#x}"
    assert tuple(rj[1:4]) == (1, 1, reason)
    assert _events(caplog, "association_rejected")
    assert not _events(caplog, "association_aborted")


def test_spaces_around_ae_titles_are_insignificant(make_listener) -> None:
    lis = make_listener({"allowed_calling_ae_titles": ["SCANNER"]})
    pdu_type, _ = _answer(lis.port, associate_rq(calling=b"  SCANNER", called=b" DICOM_NODE"))
    assert pdu_type == ul.A_ASSOCIATE_AC


def test_protocol_version_without_bit_0_is_rejected(make_listener) -> None:
    lis = make_listener()
    pdu_type, rj = _answer(lis.port, associate_rq(version=2))
    assert pdu_type == ul.A_ASSOCIATE_RJ, f"PDU type {pdu_type:#x}"
    assert tuple(rj[1:4]) == (1, 2, 2)  # rejected-permanent, ACSE service-provider, protocol version
    assert _answer(lis.port, associate_rq(version=3))[0] == ul.A_ASSOCIATE_AC


def _big_request(calling: bytes) -> bytes:
    """~1 MB of presentation contexts (ids repeat, so only pynetdicom's decoder would take it)."""
    syntaxes = tuple(f"1.2.840.10008.1.2.{i}.99999999999999999999" for i in range(8))
    contexts = tuple((1 + 2 * (i % 128), f"1.2.826.0.1.3680043.10.99.{i}", syntaxes) for i in range(2600))
    return associate_rq(calling=calling, contexts=contexts)


def test_a_refused_ae_title_is_not_decoded(make_listener, monkeypatch) -> None:
    lis = make_listener({"allowed_calling_ae_titles": ["SCANNER"]})
    decoded: list[int] = []
    real = A_ASSOCIATE_RQ.decode
    monkeypatch.setattr(A_ASSOCIATE_RQ, "decode", lambda self, raw: (decoded.append(len(raw)), real(self, raw))[1])
    rq = _big_request(b"INTRUDER")
    assert len(rq) > 1_000_000
    t0 = time.monotonic()
    pdu_type, rj = _answer(lis.port, rq)
    took = time.monotonic() - t0
    assert pdu_type == ul.A_ASSOCIATE_RJ and tuple(rj[1:4]) == (1, 1, 3)
    assert decoded == [], f"the refused request was decoded ({took:.2f} s)"
    # the same request from an allowed title is decoded, and the node answers it
    assert _answer(lis.port, _big_request(b"SCANNER"))[0] in (ul.A_ASSOCIATE_AC, ul.A_ASSOCIATE_RJ)
    assert decoded


# ---- data phase -----------------------------------------------------------------------------------------


def test_a_dataset_on_another_presentation_context_is_aborted(make_listener, tmp_path: Path) -> None:
    lis = make_listener()
    peer = RawPeer(lis.port)
    peer.associate(associate_rq(contexts=((1, CT, (EXPLICIT,)), (3, CT, (IMPLICIT,)))))
    dataset = (
        struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 26)
        + CT.encode()
        + b"\0"
        + struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", len(SOP) + 1)
        + SOP.encode()
        + b"\0"
    )
    peer.send(p_data(1, 0x03, c_store_rq(CT, SOP)) + p_data(3, 0x02, dataset))
    how, _ = peer.ended(5)
    peer.close()
    assert how == "abort"
    assert lis.rt.jobs.all_instances() == []

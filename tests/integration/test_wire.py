"""Garbage on the wire: the listener aborts or closes, allocates nothing for what a peer merely announces,
cuts off silent peers, and keeps serving everyone else."""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from ai_models.phantom import generate_phantom
from dicom_node.config import parse_config
from dicom_node.receive.listener import start_listener
from dicom_node.runtime import open_runtime
from dicom_node.synth import StudyIds, phantom_datasets, write_datasets
from tests.peers import DCMTK_ENV, ECHOSCU, free_port, storescu

VERIFICATION = "1.2.840.10008.1.1"
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_ABORT = 0x02, 0x03, 0x04, 0x07


@pytest.fixture()
def make_node(tmp_path: Path) -> Iterator[Any]:
    """Start a listener with the given node settings (ACSE and network timeouts 30 s unless given)."""
    servers: list[Any] = []

    def make(**settings: Any) -> tuple[int, Any, Any]:
        port = free_port()
        cfg = parse_config(
            {
                "node": {
                    "port": port,
                    "bind": "127.0.0.1",
                    "data_dir": str(tmp_path / "var"),
                    "min_free_mb": 0,
                    "acse_timeout": 30,
                    "network_timeout": 30,
                    **settings,
                }
            },
            tmp_path,
        )
        rt = open_runtime(cfg)
        ae, server = start_listener(cfg, rt.files, rt.jobs)
        servers.append((ae, server))
        return port, rt, server

    yield make
    for ae, server in servers:
        server.shutdown()
        ae.shutdown()


@pytest.fixture()
def node(make_node: Any) -> tuple[int, Any, Any]:
    return make_node()


def associate_rq(calling: str = "SCANNER", called: str = "DICOM_NODE") -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    cx = build_context(VERIFICATION)
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = 16384
    prim.user_information = [max_len]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def read_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the node sends until it closes the connection (fails if it does not within ``timeout``)."""
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def established(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq())
    head = sock.recv(6)
    assert head[0] == A_ASSOCIATE_AC, head
    (length,) = struct.unpack(">I", head[2:6])
    while length:
        length -= len(sock.recv(length))
    return sock


def echo_ok(port: int) -> bool:
    proc = subprocess.run(
        [ECHOSCU, "-aec", "DICOM_NODE", "127.0.0.1", str(port)], env=DCMTK_ENV, capture_output=True, timeout=30
    )
    return proc.returncode == 0


def _ended_by_node(reply: bytes) -> None:
    """Closed, possibly after an A-ABORT or A-ASSOCIATE-RJ, never anything else."""
    assert reply == b"" or reply[0] in (A_ABORT, A_ASSOCIATE_RJ), reply[:16]


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(random.Random(1).randbytes(4096), id="random-bytes"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
        pytest.param(bytes([0x09, 0, 0, 0, 0, 4]) + b"abcd", id="unknown-pdu-type"),
        pytest.param(bytes([0x04, 0, 0, 0, 0, 4]) + b"abcd", id="p-data-before-association"),
        pytest.param(bytes([0x01, 0, 0xFF, 0xFF, 0xFF, 0xF0]), id="associate-rq-announcing-4gib"),
        pytest.param(b"\x01", id="one-byte"),
    ],
)
def test_garbage_before_association_is_closed_and_node_keeps_serving(node, garbage: bytes) -> None:
    port, rt, _ = node
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(garbage)
        if len(garbage) < 6:
            s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        _ended_by_node(read_until_closed(s))
        assert time.monotonic() - t0 < 5  # not left to a 30 s timeout
    assert echo_ok(port)
    assert rt.jobs.all_instances() == []


def _corrupt_item_length(rq: bytes, item_type: int, new_length: int) -> bytes:
    pos = 6 + 68  # variable items start after the fixed A-ASSOCIATE-RQ fields
    while rq[pos] != item_type:
        pos += 4 + struct.unpack(">H", rq[pos + 2 : pos + 4])[0]
    return rq[: pos + 2] + struct.pack(">H", new_length) + rq[pos + 4 :]


@pytest.mark.parametrize(
    ("item", "length"),
    [
        (0x10, 0xFFFF),  # application context name runs past the PDU
        (0x20, 0xFFFF),  # presentation context item runs past the PDU
        (0x20, 0),  # presentation context item with no content
        (0x50, 0xFFFF),  # user information runs past the PDU
        (0x50, 1),  # user information cut short, the rest reads as garbage items
    ],
)
def test_associate_rq_with_bad_item_lengths_is_refused(node, item: int, length: int, caplog) -> None:
    port, _, _ = node
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(_corrupt_item_length(associate_rq(), item, length))
        reply = read_until_closed(s)
    assert reply == b"" or reply[0] in (A_ABORT, A_ASSOCIATE_RJ, A_ASSOCIATE_AC)
    assert echo_ok(port)
    assert not [r for r in caplog.records if r.exc_info], "garbage is a protocol error, not an internal failure"


@pytest.mark.parametrize("announced", [0xFFFFFFF0, 32 << 20])
def test_p_data_announcing_a_huge_length_is_aborted_without_allocating_it(node, announced: int) -> None:
    port, _, _ = node
    tracemalloc.start()
    try:
        with established(port) as s:
            tracemalloc.reset_peak()
            s.sendall(bytes([P_DATA_TF, 0]) + struct.pack(">I", announced) + b"\x00" * 64)
            t0 = time.monotonic()
            _ended_by_node(read_until_closed(s))
            elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 5  # refused on the header, not after waiting for the body
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB allocated for an announced {announced} bytes"
    assert echo_ok(port)


def test_silent_peer_is_cut_off_after_acse_timeout_while_others_are_served(make_node, tmp_path: Path) -> None:
    port, rt, _ = make_node(acse_timeout=1)
    sent = write_datasets(
        phantom_datasets(generate_phantom(4, shape=(4, 32, 32), n_nodules=0), StudyIds.new(4)), tmp_path / "in"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        t0 = time.monotonic()
        box: dict[str, Any] = {}
        reader = threading.Thread(target=lambda: box.update(reply=read_until_closed(silent), t=time.monotonic()))
        reader.start()
        storescu(port, sent)  # a well-behaved sender meanwhile
        reader.join(15)
        assert not reader.is_alive()
    assert box["reply"] == b"" or box["reply"][0] == A_ABORT
    assert 0.5 < box["t"] - t0 < 5
    assert len(rt.jobs.all_instances()) == len(sent)


@pytest.mark.parametrize("tail", [b"", bytes([P_DATA_TF, 0, 0, 0, 1, 0]) + b"\x00" * 10], ids=["idle", "half-pdu"])
def test_idle_or_stalled_association_is_cut_off_after_network_timeout(make_node, tail: bytes) -> None:
    port, _, _ = make_node(network_timeout=1)
    with established(port) as s:
        s.sendall(tail)
        t0 = time.monotonic()
        _ended_by_node(read_until_closed(s))
        assert 0.5 < time.monotonic() - t0 < 5
    assert echo_ok(port)

"""`dicom-node serve` with several listener processes on one port: associations spread over them, limits
stay node-wide, a killed listener is replaced, and none outlives the node."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from ai_models.phantom import generate_phantom
from dicom_node.synth import StudyIds, phantom_datasets, write_datasets
from tests.peers import (
    DCMTK_ENV,
    STORESCU,
    NodeProcess,
    children,
    free_port,
    stored_instances,
    storescu,
    wait_for,
    write_config,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _node(tmp_path: Path, processes: int = 2, node_keys: str = "") -> NodeProcess:
    port = free_port()
    cfg = write_config(
        tmp_path / "config.toml",
        port=port,
        data_dir=tmp_path / "var",
        destinations=[],
        stable_seconds=3600,
        models="",
        routes="",
        node_extra=f"listener_processes = {processes}\n{node_keys}",
        log_level="DEBUG",
    )
    return NodeProcess(cfg, port, tmp_path / "node.log").start()


def _listeners(node: NodeProcess, what: str) -> list[int]:
    """The node's two listener processes, once there are two (one read of /proc per try)."""

    def two() -> list[int] | None:
        found = children(node.proc.pid)
        return found if len(found) == 2 else None

    return wait_for(two, 30, what)


@pytest.fixture()
def study(tmp_path: Path) -> list[Path]:
    ph = generate_phantom(8, shape=(24, 32, 32), n_nodules=0)
    return write_datasets(phantom_datasets(ph, StudyIds.new(8)), tmp_path / "in")


def test_parallel_associations_are_spread_over_the_listener_processes(tmp_path: Path, study: list[Path]) -> None:
    node = _node(tmp_path)
    try:
        listeners = _listeners(node, "two listener processes")
        procs = [
            subprocess.Popen(
                [STORESCU, "-aec", "DICOM_NODE", "127.0.0.1", str(node.port), *map(str, study[i::4])],
                env=DCMTK_ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for i in range(4)
        ]
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out.decode(errors="replace")[-2000:]
        assert stored_instances(node.config.parent / "var") == len(study)
        pids = {int(m) for m in re.findall(r"event=association_accepted .*?pid=(\d+)", node.log_text())}
        assert pids == set(listeners), f"associations accepted by {pids}, listeners {listeners}"
    finally:
        assert node.stop() == 0


def test_association_limit_counts_every_listener_process(tmp_path: Path) -> None:
    node = _node(tmp_path, node_keys="max_associations = 2")
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    held = []
    try:
        _listeners(node, "two listener processes")
        for _ in range(2):
            assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
            assert assoc.is_established
            held.append(assoc)
        # the two held associations sit in different processes (round-robin); the third is over the node's limit
        third = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
        assert third.is_rejected
        assert "too_many_associations" in node.log_text()
        held.pop().release()

        def another() -> bool:
            assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
            if assoc.is_established:
                held.append(assoc)
            return assoc.is_established

        wait_for(another, 10, "a slot freed by the release")
    finally:
        for a in held:
            a.release()
        assert node.stop() == 0


def test_silent_connections_take_no_association_slot_in_any_listener_process(tmp_path: Path) -> None:
    node = _node(tmp_path, node_keys="max_associations = 2\nacse_timeout = 10")
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    held = []
    silent: list[socket.socket] = []
    try:
        _listeners(node, "two listener processes")
        silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(4)]  # spread over both
        time.sleep(0.5)
        for _ in range(2):
            assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
            assert assoc.is_established, "silent connections took the association slots"
            held.append(assoc)
        third = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
        assert third.is_rejected  # accepted associations still count node-wide
    finally:
        for s in silent:
            s.close()
        for a in held:
            a.release()
        assert node.stop() == 0


def test_a_killed_listener_process_is_replaced(tmp_path: Path, study: list[Path]) -> None:
    node = _node(tmp_path)
    try:
        first = _listeners(node, "two listener processes")
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: "listener_process_restarted" in node.log_text(), 30, "the restart")
        now = _listeners(node, "two listener processes again")
        assert first[0] not in now and first[1] in now
        assert "event=listener_process_exited" in node.log_text()
        for _ in range(4):  # whichever process takes each association, every instance is stored
            storescu(node.port, study[:3])
        assert stored_instances(node.config.parent / "var") == 3
    finally:
        assert node.stop() == 0


def test_listener_processes_end_with_the_node(tmp_path: Path, study: list[Path]) -> None:
    node = _node(tmp_path)
    listeners = _listeners(node, "two listener processes")
    storescu(node.port, study[:2])
    assert node.stop(signal.SIGTERM) == 0
    assert not any(_alive(p) for p in listeners)
    assert node.log_text().count("event=listener_stopped") == 2

    (tmp_path / "again").mkdir()
    node = _node(tmp_path / "again")
    listeners = _listeners(node, "two listener processes")
    node.stop(signal.SIGKILL)  # no clean-up code runs in the parent: the kernel ends the children
    wait_for(lambda: not any(_alive(p) for p in listeners), 10, "the listener processes to end")
    with socket.socket() as s:  # and nothing holds the port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", node.port))

"""Retention soak: `dicom-node serve` with its data folder on a small tmpfs, studies sent one after another
with storescu while results go to a real storescp. With retention at its most eager every instance is
acknowledged, every result delivered and the disk stays below the high watermark though the studies
together are several times its size; with the destination down nothing is deleted and instances are
refused only once nothing may be evicted, and taken again once the destination is back."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from ai_models.phantom import generate_phantom
from dicom_node.synth import StudyIds, phantom_datasets, write_datasets
from tests.fault_models import write_fault_bundle
from tests.peers import NodeProcess, StoreSCP, free_port, running, storescu, wait_for, write_config

DISK_MIB = 64
HIGH, LOW, FLOOR_MIB = 80, 60, 6
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real, small file system (tmpfs; CI runs as root) for the node's data folder."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m,mode=0700", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    """110 small CT studies (12 slices of 256x256, ~1.5 MiB each): one phantom, new UIDs each time."""
    root = tmp_path_factory.mktemp("studies")
    ph = generate_phantom(3, shape=(12, 256, 256), n_nodules=0)
    return [write_datasets(phantom_datasets(ph, StudyIds.new(f"soak-{k}")), root / f"s{k}") for k in range(110)]


class DiskSampler:
    """Peak use of the data volume, sampled every 20 ms."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self) -> int:
        st = os.statvfs(self.mnt)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.used())

    def start(self) -> DiskSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _node(tmp: Path, disk: Path, pacs_port: int, **retention: object) -> NodeProcess:
    port = free_port()
    bundle = write_fault_bundle(tmp / "bundles", "fast-seg")
    keys = {
        "keep_received_hours": 0,
        "keep_results_days": 0,
        "keep_failed_days": 0,
        "keep_history_days": 0,
        "high_watermark_percent": HIGH,
        "low_watermark_percent": LOW,
        "interval_seconds": 0.5,
        **retention,
    }
    cfg = write_config(
        tmp / "config.toml",
        port=port,
        data_dir=disk / "var",
        destinations=[{"name": "pacs", "port": pacs_port}],
        stable_seconds=0.5,
        models=f'[[models]]\nname = "fast"\nbundle = "{bundle}"\n',
        route_models=("fast",),
        extra='format = "json"\n\n[retention]\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()),
    )
    text = cfg.read_text().replace("min_free_mb = 0", f"min_free_mb = {FLOOR_MIB}")
    cfg.write_text(text.replace("[sender]\n", "[sender]\nmax_attempts = 10000\n"))
    return NodeProcess(cfg, port, tmp / "node.log")


def _events(node: NodeProcess, name: str) -> list[dict]:
    out = []
    for line in node.log_text().splitlines():
        if f'"{name}"' in line:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == name or ev.get("msg") == name or ev.get("message") == name:
                out.append(ev)
    return out


_SEEN: dict[Path, str] = {}  # storescp's files already read: path -> study UID of an SR, or ""


def _sr_studies(pacs: StoreSCP) -> set[str]:
    """Studies whose SR the PACS holds (a file still being written is read at a later call)."""
    for p in pacs.files():
        if p not in _SEEN:
            try:
                ds = dcmread(p, stop_before_pixels=True)
                _SEEN[p] = str(ds.StudyInstanceUID) if str(ds.SOPClassUID) == SR_CLASS else ""
            except (InvalidDicomError, OSError, EOFError, AttributeError):
                continue
    return {uid for p, uid in _SEEN.items() if uid and p.parent == pacs.out_dir}


def _db(disk: Path, sql: str) -> list[tuple]:
    with closing(sqlite3.connect(disk / "var" / "node.db")) as db:
        return db.execute(sql).fetchall()


def _send(node: NodeProcess, paths: list[Path]) -> None:
    storescu(node.port, paths, check=False)  # refused instances are counted from the node's log


def test_eager_retention_keeps_the_disk_below_the_high_watermark(
    tmp_path: Path, small_disk: Path, studies: list[list[Path]]
) -> None:
    pacs = StoreSCP(tmp_path / "pacs").start()
    node = _node(tmp_path, small_disk, pacs.port)
    uids = [str(dcmread(s[0], stop_before_pixels=True).StudyInstanceUID) for s in studies]
    sent_bytes = sum(p.stat().st_size for s in studies for p in s)
    assert sent_bytes > 2 * DISK_MIB << 20  # without retention these could not all be stored
    sampler = DiskSampler(small_disk)
    with running(pacs, node):
        node.start()
        sampler.start()
        try:
            for k, paths in enumerate(studies):
                if k >= 4:  # the scanner's pace: a few studies ahead of the PACS
                    wait_for(lambda k=k: uids[k - 4] in _sr_studies(pacs), 60, f"results of study {k - 4}")
                _send(node, paths)
            wait_for(lambda: set(uids) <= _sr_studies(pacs), 120, "every study's results at the PACS")
            wait_for(lambda: _db(small_disk, "SELECT count(*) FROM instances") == [(0,)], 30, "every study purged")
        finally:
            sampler.stop()
    assert _events(node, "instance_rejected") == []
    assert len(_events(node, "job_done")) == len(studies)
    assert _events(node, "job_failed") == [] and _events(node, "delivery_failed") == []
    purged = _events(node, "study_purged")
    assert {e["study_uid"] for e in purged if e["what"] == "received"} == set(uids)
    assert all(
        e["bytes"] > 0 and e["reason"] in ("retention", "disk_pressure") for e in purged if e["what"] != "history"
    )
    assert {e["study_uid"] for e in purged if e["what"] == "history"} <= set(uids)
    assert not any("PatientName" in json.dumps(e) or "PatientID" in json.dumps(e) for e in purged)
    total = os.statvfs(small_disk).f_blocks * os.statvfs(small_disk).f_frsize
    peak_percent = 100 * sampler.peak / total
    print(
        f"\nsoak: {len(studies)} studies, {sent_bytes >> 20} MiB sent, peak disk use {sampler.peak >> 20} MiB "
        f"({peak_percent:.0f}% of {DISK_MIB} MiB), 0 refusals"
    )
    assert peak_percent < HIGH
    assert not list((small_disk / "var" / "files").rglob("*.dcm"))  # nothing left that nothing indexes


def test_with_the_destination_down_studies_are_kept_and_refused_only_when_nothing_may_go(
    tmp_path: Path, small_disk: Path, studies: list[list[Path]]
) -> None:
    pacs_port = free_port()
    node = _node(tmp_path, small_disk, pacs_port)
    uids = [str(dcmread(s[0], stop_before_pixels=True).StudyInstanceUID) for s in studies]
    pacs = StoreSCP(tmp_path / "pacs", port=pacs_port)
    with running(node, pacs):
        node.start()
        sent = 0
        while not _events(node, "instance_rejected"):
            assert sent < 60, "the disk never filled"
            _send(node, studies[sent])
            sent += 1
        refused = _events(node, "instance_rejected")
        assert all(e["status"] == "0xA700" for e in refused)
        why = _events(node, "storage_full_nothing_to_evict")
        assert why and "studies_evictable" not in why[0] and why[0]["free_mb"] < FLOOR_MIB
        assert _events(node, "study_purged") == []  # every study still waits for its delivery
        stored = {u for (u,) in _db(small_disk, "SELECT DISTINCT study_uid FROM instances")}
        assert set(uids[: sent - 1]) <= stored
        print(f"\ndestination down: {sent} studies sent, refused from study {sent}, {len(refused)} refusals")
        pacs.start()  # the destination is back: results go out, retention frees the disk, the node takes more
        wait_for(lambda: set(uids[: sent - 1]) <= _sr_studies(pacs), 120, "the kept studies' results at the PACS")
        n_refused = len(_events(node, "instance_rejected"))
        _send(node, studies[sent])
        assert len(_events(node, "instance_rejected")) == n_refused
        wait_for(lambda: uids[sent] in _sr_studies(pacs), 60, "the next study's results")


def test_watermarks_evict_delivered_studies_oldest_first_before_refusing(
    tmp_path: Path, small_disk: Path, studies: list[list[Path]]
) -> None:
    pacs = StoreSCP(tmp_path / "pacs").start()
    node = _node(
        tmp_path,
        small_disk,
        pacs.port,
        keep_received_hours=1000,
        keep_results_days=1000,
        keep_history_days=1000,
        interval_seconds=2,
    )
    batch = studies[:50]  # ~75 MiB: more than the disk holds
    uids = [str(dcmread(s[0], stop_before_pixels=True).StudyInstanceUID) for s in batch]
    with running(pacs, node):
        node.start()
        for k, paths in enumerate(batch):
            if k >= 4:
                wait_for(lambda k=k: uids[k - 4] in _sr_studies(pacs), 60, f"results of study {k - 4}")
            _send(node, paths)
        wait_for(lambda: set(uids) <= _sr_studies(pacs), 120, "every study's results at the PACS")
    assert _events(node, "instance_rejected") == []
    evicted = [e["study_uid"] for e in _events(node, "study_purged") if e["what"] == "received"]
    assert evicted and all(e["reason"] == "disk_pressure" for e in _events(node, "study_purged"))
    # oldest first: by when each study finished (its last delivery), which may swap neighbours in sending order
    order = [uids.index(u) for u in evicted]
    assert all(i <= n + 2 for n, i in enumerate(order)), order
    assert not set(uids[-5:]) & set(evicted)
    print(f"\nwatermarks: {len(batch)} studies, {len(evicted)} evicted under disk pressure, 0 refusals")
    st = os.statvfs(small_disk)
    assert 100 * (st.f_blocks - st.f_bfree) / st.f_blocks <= HIGH

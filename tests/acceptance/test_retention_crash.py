"""Purges that die (kill -9) or run on two nodes at once: no index row ever points at a missing file, the next
start removes whatever files an interrupted purge left, and on PostgreSQL two nodes never purge at once."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from storage.batching import instance_batch
from storage.db import make_engine
from storage.files import FileStore
from storage.jobstore import JobStore
from storage.records import NewInstance, NewJob, NewResult
from storage.retention import RetentionStore
from storage.schema import InstanceRow, PurgeFileRow, ResultRow
from tests.peers import REPO, track

CT = "1.2.840.10008.5.1.4.1.1.2"
PER_STUDY = 8


def _fill(js: JobStore, files: FileStore, studies: int, with_results: int) -> list[str]:
    """Finished studies: ``studies`` without a route, then ``with_results`` whose SEG was delivered."""
    uids = []
    for k in range(studies + with_results):
        study, series = f"1.77.{k}", f"1.77.{k}.1"
        batch = []
        for i in range(PER_STUDY):
            path = files.instance_path(study, series, f"{series}.{i}")
            size = files.write_atomic(path, b"\0" * 4096)
            batch.append(
                NewInstance(f"{series}.{i}", study, series, CT, "1.2.840.10008.1.2.1", files.relative(path), size)
            )
        with instance_batch(js.engine) as tx:
            tx.record(batch)
        jobs = [NewJob("r", series, ("m",), ("pacs",))] if k >= studies else []
        js.complete_study(study, 0, jobs)
        if jobs:
            job = js.claim_job("w", 60)
            assert job is not None
            path = files.result_path(study, f"{series}.99")
            files.write_atomic(path, b"SEG")
            js.finish_job(
                job.id,
                "w",
                [
                    NewResult(
                        "seg",
                        "m",
                        study,
                        f"{series}.9",
                        f"{series}.99",
                        "1.2.840.10008.5.1.4.1.1.66.4",
                        files.relative(path),
                    )
                ],
            )
            (d,) = js.claim_deliveries("s", 60)
            js.delivery_outcome(d.id, "s", state="done")
        uids.append(study)
    return uids


def _config(tmp: Path, data: Path, url: str = "") -> Path:
    cfg = tmp / "config.toml"
    db = f'database_url = "{url}"\n' if url else ""
    cfg.write_text(f'[node]\ndata_dir = "{data}"\nmin_free_mb = 0\n{db}')
    return cfg


def _purge(cfg: Path, *args: str) -> subprocess.Popen[str]:
    return track(
        subprocess.Popen(  # type: ignore[return-value]
            [sys.executable, "-m", "dicom_node.cli", "--config", str(cfg), "purge", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
    )


def _check(js: JobStore, files: FileStore, *, allow_noted: bool) -> tuple[int, int]:
    """No row names a missing file; every file on disk is indexed (or, mid-purge, noted). (rows, files)."""
    with js._tx() as s:
        rows = [r.path for r in s.scalars(select(InstanceRow))]
        rows += [r.path for r in s.scalars(select(ResultRow).where(ResultRow.path != ""))]
        noted = {r.path for r in s.scalars(select(PurgeFileRow))}
    missing = [p for p in rows if not (files.root / p).is_file()]
    assert missing == [], f"index rows pointing at missing files: {missing[:5]}"
    on_disk = {files.relative(p) for p in files.root.rglob("*.dcm")}
    unindexed = on_disk - set(rows) - (noted if allow_noted else set())
    assert unindexed == set(), f"files nothing indexes: {sorted(unindexed)[:5]}"
    return len(rows), len(on_disk)


def test_kill_9_during_purges_leaves_no_row_without_its_file_and_the_next_start_cleans_up(tmp_path: Path) -> None:
    data = tmp_path / "var"
    js = JobStore(make_engine(f"sqlite:///{data / 'node.db'}", synchronous="OFF"))
    js.create_schema()
    files = FileStore(data / "files")
    uids = _fill(js, files, 260, 20)
    cfg = _config(tmp_path, data)
    rng = random.Random(17)
    killed_mid_purge = 0
    for _round in range(5):
        before = _check(js, files, allow_noted=True)
        proc = _purge(cfg, "--older-than", "0")
        out = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "purged received" not in out:  # it is deleting now
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            out += line
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        after = _check(js, files, allow_noted=True)  # at the moment of the kill: rows never outlive files
        killed_mid_purge += after[0] < before[0] and after[0] > 0
    assert killed_mid_purge >= 3, "the kills did not land during purges"
    RetentionStore(js.engine, files).finish_pending()  # what `dicom-node serve` does at start
    _check(js, files, allow_noted=False)
    with js._tx() as s:
        assert s.scalars(select(PurgeFileRow)).all() == []
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "--config", str(cfg), "purge", "--older-than", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _check(js, files, allow_noted=False) == (0, 0)
    assert js.instances_of_study(uids[-1]) == []
    js.engine.dispose()


def test_two_nodes_purge_one_postgresql_database_one_at_a_time(tmp_path: Path, postgres_url: str) -> None:
    data = tmp_path / "shared"
    js = JobStore(make_engine(postgres_url))
    js.create_schema()
    files = FileStore(data / "files")
    uids = _fill(js, files, 60, 20)
    configs = []
    for n in (1, 2):
        (tmp_path / f"node{n}").mkdir()
        configs.append(_config(tmp_path / f"node{n}", data, postgres_url))
    procs = [_purge(c, "--older-than", "0") for c in configs]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    purged = [m for out in outs for m in re.findall(r"^purged received of (\S+)", out, re.M)]
    assert sorted(purged) == sorted(uids)  # each study purged once, by one node or the other
    assert all(re.search(r"^purged 0 item", out, re.M) or re.search(r"purged received", out) for out in outs)
    assert sum(bool(re.search(r"purged received", out)) for out in outs) == 1  # the lock: one purge at a time
    assert _check(js, files, allow_noted=False) == (0, 0)
    js.engine.dispose()

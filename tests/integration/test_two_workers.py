"""Two worker processes on one database (SQLite, or PostgreSQL as several machines would share) never hold
the same job at once, and every job runs once.

Each process claims jobs from the same JobStore in a loop, "works" a few ms while recording (job id, pid,
start, end) to its own file, then finishes the job. Run as a module, this file is that worker process.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from storage.db import integrity_check, make_engine
from storage.jobstore import JobStore
from storage.records import NewJob
from tests.peers import REPO, wait_for

N_JOBS = 200
WORK_SECONDS = 0.003
LEASE_SECONDS = 60.0  # far longer than any hold: a second holder could only come from a broken claim


def worker_main(db_url: str, out: Path, ready: Path, go: Path) -> int:
    """Claim until no job is left; one line per hold: job id, pid, start ns, end ns (monotonic, system-wide)."""
    jobs = JobStore(make_engine(db_url))
    owner = f"worker:{os.getpid()}"
    ready.touch()
    deadline = time.monotonic() + 60
    while not go.exists():  # start both workers together so they really contend
        if time.monotonic() > deadline:
            return 3
        time.sleep(0.005)
    with out.open("w") as fh:
        while True:
            job = jobs.claim_job(owner, LEASE_SECONDS)
            if job is None:
                counts = jobs.counts()["jobs"]
                if not counts.get("queued") and not counts.get("running"):
                    return 0
                time.sleep(0.002)  # the other worker holds the last jobs: poll, as the node's worker loop does
                continue
            start = time.monotonic_ns()
            time.sleep(WORK_SECONDS)  # the "inference"
            end = time.monotonic_ns()
            fh.write(f"{job.id} {os.getpid()} {start} {end}\n")
            fh.flush()
            if not jobs.finish_job(job.id, owner, [], ""):
                fh.write(f"LOST {job.id}\n")
                fh.flush()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_worker_processes_share_one_database(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    db_url = f"sqlite:///{tmp_path / 'node.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    store = JobStore(make_engine(db_url))
    store.create_schema()
    for i in range(N_JOBS):
        store.enqueue_job(
            f"1.2.826.0.1.3680043.10.1234.9.{i}",
            0,
            NewJob(route="r", series_uid=f"1.2.3.{i}", models=("m",), destinations=("pacs",)),
        )
    go = tmp_path / "go"
    procs, outs, readies = [], [], []
    for n in range(2):
        out, ready = tmp_path / f"holds-{n}.txt", tmp_path / f"ready-{n}"
        outs.append(out)
        readies.append(ready)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.integration.test_two_workers", db_url, str(out), str(ready), str(go)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        wait_for(lambda: all(r.exists() for r in readies), 60, "both workers ready")
        go.touch()
        codes = [p.wait(120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    logs = [p.stdout.read() if p.stdout else "" for p in procs]
    assert codes == [0, 0], logs

    holds: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    per_pid: dict[int, int] = defaultdict(int)
    for out in outs:
        for line in out.read_text().splitlines():
            assert not line.startswith("LOST"), f"a worker lost a job it held: {line}"
            job_id, pid, start, end = map(int, line.split())
            holds[job_id].append((pid, start, end))
            per_pid[pid] += 1
    assert sorted(holds) == [j.id for j in store.list_jobs(limit=N_JOBS)][::-1]
    assert all(len(h) == 1 for h in holds.values()), {j: h for j, h in holds.items() if len(h) > 1}
    # overlapping holds of one job would show up as duplicates above; check the intervals anyway
    for job_id, hs in holds.items():
        hs.sort(key=lambda h: h[1])
        for a, b in itertools.pairwise(hs):
            assert a[2] <= b[1], f"job {job_id} held by {a[0]} and {b[0]} at once"
    assert len(per_pid) == 2 and min(per_pid.values()) > 0, f"both workers should have claimed jobs: {per_pid}"
    counts = store.counts()["jobs"]
    assert counts == {"done": N_JOBS}, counts
    assert all(j.attempts == 1 for j in store.list_jobs(limit=N_JOBS))
    if backend == "sqlite":
        assert integrity_check(store.engine) == "ok"
    store.engine.dispose()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])))

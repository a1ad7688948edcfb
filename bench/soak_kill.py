"""Soak: kill -9 the node in the middle of a 200-instance send, restart, check nothing acknowledged is lost.

    .venv/bin/python bench/soak_kill.py --rounds 20

Each round restarts `dicom-node serve` on the same data folder, sends the same 200-instance study with a
pynetdicom SCU that records every Success it gets, and kills the node with SIGKILL after a random number of
acknowledgements (the next C-STORE is then in flight). After each restart it checks: every acknowledged
instance is indexed and on disk with an identical dataset, no index row lacks its file, no temp file is left.
At the end the node completes the study and it must be processed exactly once; the study's instance count
must match its rows, and SQLite's integrity_check pass. Prints rounds, instances sent, acknowledged and lost
(lost must be 0).
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom import uid as pduid
from pydicom.dataset import Dataset
from pynetdicom import AE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_models.phantom import generate_phantom  # noqa: E402
from dicom_node.synth import StudyIds, phantom_datasets  # noqa: E402
from storage.db import integrity_check, make_engine  # noqa: E402
from storage.jobstore import JobStore  # noqa: E402
from tests.peers import NodeProcess, free_port, wait_for, write_config  # noqa: E402


@dataclass
class RoundResult:
    sent: int
    acked: int
    lost: list[str]
    orphan_rows: list[str]
    temp_files: int


def make_study(n: int = 200, seed: int = 4242) -> list[Dataset]:
    ph = generate_phantom(seed, shape=(n, 64, 64), spacing=(1.5, 1.0, 1.0), n_nodules=1)
    return phantom_datasets(ph, StudyIds.new(f"soak-{seed}"))


def send_and_kill(port: int, datasets: list[Dataset], node: NodeProcess, kill_after: int) -> tuple[int, set[str]]:
    """Send until ``kill_after`` Successes, then SIGKILL the node mid-send; returns (sent, acknowledged)."""
    acked: set[str] = set()
    sent = 0
    reached = threading.Event()
    done = threading.Event()

    def scu() -> None:
        nonlocal sent
        ae = AE(ae_title="SOAKSCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [pduid.ExplicitVRLittleEndian])
        ae.dimse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
        try:
            for ds in datasets:
                if not assoc.is_established:
                    break
                sent += 1
                rsp = assoc.send_c_store(ds)
                if rsp is not None and rsp.get("Status") == 0:
                    acked.add(str(ds.SOPInstanceUID))
                    if len(acked) >= kill_after:
                        reached.set()
                else:
                    break
            if assoc.is_established:
                assoc.release()
        finally:
            reached.set()
            done.set()

    t = threading.Thread(target=scu, daemon=True)
    t.start()
    reached.wait(120)
    node.stop(signal.SIGKILL)
    done.wait(60)
    return sent, acked


def _url(data_dir: Path, database_url: str) -> str:
    return database_url or f"sqlite:///{data_dir / 'node.db'}"


def check_store(
    data_dir: Path, datasets: dict[str, Dataset], acked: set[str], database_url: str = ""
) -> tuple[list[str], list[str], int]:
    """(acknowledged but lost, index rows without a file, temp files left) after a restart."""
    js = JobStore(make_engine(_url(data_dir, database_url)))
    rows = {i.sop_instance_uid: i for i in js.all_instances()}
    root = data_dir / "files"
    lost = []
    for sop in acked:
        row = rows.get(sop)
        if row is None or not (root / row.path).is_file():
            lost.append(sop)
            continue
        stored = dcmread(root / row.path)
        sent = datasets[sop]
        same = (
            stored.PixelData == sent.PixelData
            and stored.SOPInstanceUID == sent.SOPInstanceUID
            and len(stored) == len(sent)
        )
        if not same:
            lost.append(sop)
    orphans = [sop for sop, r in rows.items() if not (root / r.path).is_file()]
    # received instances' temp files only: a result the restarted node's worker is writing right now has one
    temps = len(list((root / "incoming").glob(".tmp-*")))
    js.engine.dispose()
    return lost, orphans, temps


def run_rounds(workdir: Path, rounds: int, *, seed: int = 1, log=print, database_url: str = "") -> dict[str, int]:
    """``database_url``: the job store there (PostgreSQL) instead of SQLite in the data folder."""
    rng = random.Random(seed)
    node_extra = f'database_url = "{database_url}"' if database_url else ""
    study = make_study()
    by_uid = {str(d.SOPInstanceUID): d for d in study}
    port = free_port()
    data_dir = workdir / "var"
    # a long quiet time: nothing is processed while rounds are running
    cfg = write_config(
        workdir / "soak.toml",
        port=port,
        data_dir=data_dir,
        destinations=[],
        stable_seconds=3600,
        models="",
        routes="",
        node_extra=node_extra,
    )
    totals = {"rounds": 0, "sent": 0, "acknowledged": 0, "lost": 0, "orphan_rows": 0, "temp_files_left": 0}
    all_acked: set[str] = set()
    for r in range(rounds):
        node = NodeProcess(cfg, port, workdir / f"node-{r}.log").start()
        if r > 0:  # the previous round's kill left the store as it was: check it after this restart
            lost, orphans, temps = check_store(data_dir, by_uid, all_acked, database_url)
            totals["lost"] += len(lost)
            totals["orphan_rows"] += len(orphans)
            totals["temp_files_left"] += temps
        kill_after = rng.randint(10, len(study) - 10)
        sent, acked = send_and_kill(port, study, node, kill_after)
        all_acked |= acked
        totals["rounds"] += 1
        totals["sent"] += sent
        totals["acknowledged"] += len(acked)
        log(f"round {r + 1}: sent {sent}, acknowledged {len(acked)}, killed after {kill_after}")
    # last restart: the study is now quiet and routed; it must be processed exactly once
    final = write_config(
        workdir / "final.toml",
        port=port,
        data_dir=data_dir,
        destinations=[],
        stable_seconds=0.5,
        routes='[[routes]]\nname = "chest-ct"\nmodels = ["chest-ct-seg"]\nsend_to = []\n',
        node_extra=node_extra,
    )
    node = NodeProcess(final, port, workdir / "node-final.log").start()
    lost, orphans, temps = check_store(data_dir, by_uid, all_acked, database_url)
    study_uid = str(study[0].StudyInstanceUID)
    js = JobStore(make_engine(_url(data_dir, database_url)))
    try:
        wait_for(
            lambda: [j for j in js.list_jobs(limit=100) if j.study_uid == study_uid and j.state in ("done", "failed")],
            600,
            "the soaked study's job to finish",
        )
        jobs = [j for j in js.list_jobs(limit=100) if j.study_uid == study_uid]
        if any(j.state != "done" for j in jobs):
            raise RuntimeError(f"the soaked study's job did not succeed: {[(j.state, j.error) for j in jobs]}")
        totals["jobs_for_study"] = len(jobs)
    finally:
        node.stop()
        js.engine.dispose()
    totals["lost"] += len(lost)
    totals["orphan_rows"] += len(orphans)
    totals["temp_files_left"] += temps
    js = JobStore(make_engine(_url(data_dir, database_url)))
    study_row = js.get_study(study_uid)
    # the study's own count agrees with its instance rows; on SQLite the file passes integrity_check too
    consistent = study_row is not None and study_row.instance_count == len(js.instances_of_study(study_uid))
    sqlite_ok = database_url != "" or integrity_check(js.engine) == "ok"
    totals["integrity_ok"] = int(consistent and sqlite_ok)
    js.engine.dispose()
    return totals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="soak-kill-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    totals = run_rounds(workdir, args.rounds)
    print()
    print(
        f"{'rounds':>7} {'sent':>7} {'acked':>7} {'lost':>5} {'orphan rows':>12} {'temp left':>10} "
        f"{'jobs for study':>15} {'integrity':>10}"
    )
    print(
        f"{totals['rounds']:>7} {totals['sent']:>7} {totals['acknowledged']:>7} {totals['lost']:>5} "
        f"{totals['orphan_rows']:>12} {totals['temp_files_left']:>10} {totals['jobs_for_study']:>15} "
        f"{'ok' if totals['integrity_ok'] else 'FAILED':>10}"
    )
    print(f"({time.time() - t0:.0f} s, data in {workdir})")
    ok = totals["lost"] == 0 and totals["orphan_rows"] == 0 and totals["integrity_ok"] and totals["jobs_for_study"] == 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

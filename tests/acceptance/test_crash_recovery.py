"""Crashes and restarts of `dicom-node serve`: nothing acknowledged is lost, every result reaches the PACS once."""

from __future__ import annotations

import signal
from pathlib import Path

from pydicom import dcmread

from ai_models.phantom import generate_phantom
from bench.soak_kill import run_rounds
from dicom_node.synth import StudyIds, phantom_datasets, write_datasets
from storage.db import make_engine
from storage.jobstore import JobStore
from tests.peers import NodeProcess, StoreSCP, free_port, running, storescu, wait_for, write_config


def test_kill_9_during_200_instance_sends_loses_nothing(tmp_path: Path) -> None:
    totals = run_rounds(tmp_path, rounds=3, seed=7, log=lambda _msg: None)
    assert totals["acknowledged"] > 0
    assert totals["lost"] == 0
    assert totals["orphan_rows"] == 0
    assert totals["temp_files_left"] == 0
    assert totals["integrity_ok"] == 1
    assert totals["jobs_for_study"] == 1


def test_kill_9_during_sends_with_the_job_store_on_postgresql_loses_nothing(tmp_path: Path, postgres_url: str) -> None:
    totals = run_rounds(tmp_path, rounds=2, seed=8, log=lambda _msg: None, database_url=postgres_url)
    assert totals["acknowledged"] > 0
    assert totals["lost"] == 0
    assert totals["orphan_rows"] == 0
    assert totals["temp_files_left"] == 0
    assert totals["integrity_ok"] == 1
    assert totals["jobs_for_study"] == 1


def _setup(tmp_path: Path, name: str) -> tuple[list[Path], str, StoreSCP, NodeProcess, Path]:
    ph = generate_phantom(31, shape=(40, 128, 128), n_nodules=1)
    ids = StudyIds.new(f"crash-{name}")
    paths = write_datasets(phantom_datasets(ph, ids), tmp_path / "in")
    pacs = StoreSCP(tmp_path / "pacs").start()
    port = free_port()
    cfg = write_config(
        tmp_path / "config.toml",
        port=port,
        data_dir=tmp_path / "var",
        destinations=[{"name": "pacs", "port": pacs.port}],
        stable_seconds=0.5,
        extra="",
    )
    node = NodeProcess(cfg, port, tmp_path / "node-1.log")
    return paths, ids.study_uid, pacs, node, cfg


def _store(tmp_path: Path) -> JobStore:
    return JobStore(make_engine(f"sqlite:///{tmp_path / 'var' / 'node.db'}"))


def _pacs_uids(pacs: StoreSCP) -> dict[str, str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.name[:2] for p in pacs.files()}


def test_kill_9_during_inference_reruns_the_job_and_sends_once(tmp_path: Path) -> None:
    paths, _study_uid, pacs, node, cfg = _setup(tmp_path, "inference")
    with running(pacs, node):
        node.start()
        storescu(node.port, paths)
        wait_for(lambda: "job_started" in node.log_text(), 60, "the job to start")
        node.stop(signal.SIGKILL)
        js = _store(tmp_path)
        (job,) = js.list_jobs()
        assert job.state == "running" and job.attempts == 1  # killed mid-inference
        node2 = NodeProcess(cfg, node.port, tmp_path / "node-2.log").start()
        with running(node2):
            wait_for(
                lambda: (
                    len(pacs.files()) >= 2
                    and all(d.state == "done" for d in js.deliveries_of_job(job.id))
                    and js.deliveries_of_job(job.id)
                ),
                300,
                "results after the restart",
            )
            assert "leases_recovered" in node2.log_text()
        done = js.get_job(job.id)
        assert done.state == "done" and done.attempts == 2
        assert sorted(_pacs_uids(pacs).values()) == ["SG", "SR"]  # one SEG and one SR at the PACS


def test_kill_9_during_sending_resends_same_uids_without_reinference(tmp_path: Path) -> None:
    paths, _study_uid, pacs, node, cfg = _setup(tmp_path, "sending")
    pacs.stop()  # the PACS is down: results are built, deliveries wait
    with running(pacs, node):
        node.start()
        storescu(node.port, paths)
        wait_for(lambda: "delivery_retry_scheduled" in node.log_text(), 300, "a delivery attempt")
        node.stop(signal.SIGKILL)
        js = _store(tmp_path)
        (job,) = js.list_jobs()
        first_uids = {d.result.sop_instance_uid for d in js.deliveries_of_job(job.id)}
        pacs.start()
        node2 = NodeProcess(cfg, node.port, tmp_path / "node-2.log").start()
        with running(node2):
            wait_for(lambda: all(d.state == "done" for d in js.deliveries_of_job(job.id)), 120, "deliveries done")
            assert "job_started" not in node2.log_text()  # results were only re-sent, not rebuilt
        assert set(_pacs_uids(pacs)) == first_uids and len(first_uids) == 2


def test_sigterm_leaves_no_job_running_and_work_resumes(tmp_path: Path) -> None:
    paths, _study_uid, pacs, node, cfg = _setup(tmp_path, "sigterm")
    with running(pacs, node):
        node.start()
        storescu(node.port, paths)
        wait_for(lambda: "job_started" in node.log_text(), 60, "the job to start")
        assert node.stop(signal.SIGTERM) == 0
        assert "node_stopped" in node.log_text()
        js = _store(tmp_path)
        (job,) = js.list_jobs()
        assert job.state in ("done", "queued"), job.state  # finished in the grace period, or lease given back
        node2 = NodeProcess(cfg, node.port, tmp_path / "node-2.log").start()
        with running(node2):
            wait_for(
                lambda: (dels := js.deliveries_of_job(job.id)) and all(d.state == "done" for d in dels),
                300,
                "results after the restart",
            )
        assert sorted(_pacs_uids(pacs).values()) == ["SG", "SR"]

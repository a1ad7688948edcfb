"""Study completion and routing over real stored files: one job per route and generation, late arrivals re-run."""

from __future__ import annotations

import time
from pathlib import Path

from pynetdicom import AE

from ai_models.phantom import generate_phantom
from dicom_node.assembly import Assembler
from dicom_node.config import parse_config
from dicom_node.runtime import open_runtime
from dicom_node.scp import start_listener
from dicom_node.synth import StudyIds, localizer_datasets, phantom_datasets
from tests.peers import SHIPPED_SEG_BUNDLE, free_port


def test_quiet_study_gets_one_job_on_the_axial_series_and_late_arrivals_rerun(tmp_path: Path) -> None:
    cfg = parse_config({
        "node": {"data_dir": str(tmp_path / "var"), "min_free_mb": 0, "port": free_port(), "bind": "127.0.0.1"},
        "completion": {"stable_seconds": 0.5},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        "models": [{"name": "seg", "bundle": str(SHIPPED_SEG_BUNDLE)}],
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["seg"], "send_to": ["pacs"]},
                   {"name": "mr", "match": {"Modality": "MR"}, "models": ["seg"], "send_to": ["pacs"]}],
    }, tmp_path)
    rt = open_runtime(cfg)
    ph = generate_phantom(5, shape=(20, 48, 48), n_nodules=0)
    ids = StudyIds.new("assembly")
    axial = phantom_datasets(ph, ids)
    datasets = axial[:-1] + localizer_datasets(ph, ids)

    ae, server = start_listener(cfg, rt.files, rt.jobs)

    def store(dss) -> None:
        scu = AE(ae_title="MODALITY")
        scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        assoc = scu.associate("127.0.0.1", cfg.node.port, ae_title="DICOM_NODE")
        assert [int(assoc.send_c_store(d).Status) for d in dss] == [0] * len(dss)
        assoc.release()

    try:
        _run(cfg, rt, ids, axial, datasets, store)
    finally:
        server.shutdown()
        ae.shutdown()


def _run(cfg, rt, ids, axial, datasets, store) -> None:
    store(datasets)
    asm = Assembler(cfg, rt.files, rt.jobs)
    assert asm.run_once() == 0  # not quiet yet
    assert asm.run_once(now=time.time() + 1) == 1
    (job,) = rt.jobs.list_jobs()
    assert job.route == "ct" and job.series_uid == str(axial[0].SeriesInstanceUID) and job.generation == 0
    assert asm.run_once(now=time.time() + 1) == 0  # complete: not routed twice

    store(axial[-1:])  # a late slice re-opens the study
    assert rt.jobs.get_study(ids.study_uid).state == "receiving"
    assert asm.run_once(now=time.time() + 1) == 1
    jobs = rt.jobs.list_jobs()
    assert [j.generation for j in jobs] == [1, 0]
    assert rt.jobs.get_study(ids.study_uid).instance_count == len(datasets) + 1

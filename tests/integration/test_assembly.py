"""Study completion and routing over real stored files: one job per route and generation, late arrivals re-run,
the re-run's SR supersedes the first one's, and an IOCM rejection note retires the first run's SEG at the PACS."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE

from ai_models.phantom import generate_phantom
from dicom_node.config import Config, parse_config
from dicom_node.delivery.sender import Sender
from dicom_node.jobs.assembly import Assembler
from dicom_node.jobs.model_cache import ModelCache
from dicom_node.jobs.worker import Worker
from dicom_node.receive.listener import start_listener
from dicom_node.runtime import Runtime, open_runtime
from dicom_node.service import node_identity
from dicom_node.synth import StudyIds, localizer_datasets, phantom_datasets
from storage.records import NewInstance
from tests.peers import PHANTOM_SEG_BUNDLE, StoreSCP, free_port, running
from tests.unit.results_helpers import dciodvfy_errors


def _config(tmp_path: Path, pacs_port: int = 4242) -> Config:
    return parse_config(
        {
            "node": {"data_dir": str(tmp_path / "var"), "min_free_mb": 0, "port": free_port(), "bind": "127.0.0.1"},
            "completion": {"stable_seconds": 0.5},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
            "models": [{"name": "seg", "bundle": str(PHANTOM_SEG_BUNDLE)}],
            "routes": [
                {"name": "ct", "match": {"Modality": "CT"}, "models": ["seg"], "send_to": ["pacs"]},
                {"name": "mr", "match": {"Modality": "MR"}, "models": ["seg"], "send_to": ["pacs"]},
            ],
        },
        tmp_path,
    )


@contextlib.contextmanager
def _listening(cfg: Config, rt: Runtime) -> Iterator[Callable[[Sequence[Dataset]], None]]:
    """The node's listener; yields a function that C-STOREs datasets to it (all must succeed)."""
    ae, server = start_listener(cfg, rt.files, rt.jobs)

    def store(dss: Sequence[Dataset]) -> None:
        scu = AE(ae_title="MODALITY")
        for sop_class in sorted({str(d.SOPClassUID) for d in dss}):
            scu.add_requested_context(sop_class)
        assoc = scu.associate("127.0.0.1", cfg.node.port, ae_title="DICOM_NODE")
        assert [int(assoc.send_c_store(d).Status) for d in dss] == [0] * len(dss)
        assoc.release()

    try:
        yield store
    finally:
        server.shutdown()
        ae.shutdown()


def _node_parts(
    tmp_path: Path, name: str, *, seed: int, pacs_port: int = 4242
) -> tuple[Config, Runtime, StudyIds, list[Dataset], Assembler, Worker]:
    """A node's store, assembler and worker (the shipped segmentation model) and a small axial phantom series."""
    cfg = _config(tmp_path, pacs_port)
    rt = open_runtime(cfg)
    ids = StudyIds.new(name)
    axial = phantom_datasets(generate_phantom(seed, shape=(16, 48, 48), n_nodules=0), ids)
    worker = Worker(cfg, rt.files, rt.jobs, ModelCache(cfg), node_identity(cfg), "test-owner")
    return cfg, rt, ids, axial, Assembler(cfg, rt.files, rt.jobs), worker


def test_quiet_study_gets_one_job_on_the_axial_series_and_late_arrivals_rerun(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    rt = open_runtime(cfg)
    ph = generate_phantom(5, shape=(20, 48, 48), n_nodules=0)
    ids = StudyIds.new("assembly")
    axial = phantom_datasets(ph, ids)
    datasets = axial[:-1] + localizer_datasets(ph, ids)
    with _listening(cfg, rt) as store:
        _run(cfg, rt, ids, axial, datasets, store)


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


def test_the_sr_of_a_rerun_supersedes_the_first_ones(tmp_path: Path) -> None:
    """A late slice re-runs the study: the new SR names the first run's SR as its predecessor (and comes after
    it in the series), so viewers and IHE AIR consumers can tell which report is current."""
    cfg, rt, ids, axial, asm, worker = _node_parts(tmp_path, "supersede", seed=6)

    segs: list[Dataset] = []

    def run_and_read_sr() -> Dataset:
        assert asm.run_once(now=time.time() + 1) == 1
        assert worker.run_once()
        job = rt.jobs.list_jobs(limit=1)[0]
        assert job.state == "done", job.error
        (sr,) = [r for r in rt.jobs.results_of_job(job.id) if r.kind == "sr"]
        segs.extend(dcmread(rt.files.absolute(r.path)) for r in rt.jobs.results_of_job(job.id) if r.kind == "seg")
        return dcmread(rt.files.absolute(sr.path))

    try:
        with _listening(cfg, rt) as store:
            store(axial[:-1])
            first = run_and_read_sr()
            store(axial[-1:])  # late: re-opens the study
            second = run_and_read_sr()
            # the PACS forwards the node's own results back (a common auto-forward rule): stored, no re-run
            results = [dcmread(rt.files.absolute(r.path)) for r in rt.jobs.results_of_job(rt.jobs.list_jobs()[0].id)]
            assert sorted(r.Modality for r in results) == ["KO", "SEG", "SR"]  # the KO: the rejection note
            store(results)
            assert asm.run_once(now=time.time() + 1) == 0
            study = rt.jobs.get_study(ids.study_uid)
            assert study is not None and (study.state, study.generation) == ("complete", 1)
    finally:
        worker.close()
    assert "PredecessorDocumentsSequence" not in first and first.InstanceNumber == 1
    assert second.SOPInstanceUID != first.SOPInstanceUID and second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.InstanceNumber == 2
    # the SEG too follows the first one in its series, and the new SR points at the new SEG
    assert [(d.SeriesInstanceUID, d.InstanceNumber) for d in segs] == [
        (segs[0].SeriesInstanceUID, 1),
        (segs[0].SeriesInstanceUID, 2),
    ]
    assert segs[1].SOPInstanceUID != segs[0].SOPInstanceUID
    evidence = {
        s.ReferencedSOPInstanceUID
        for e in second.CurrentRequestedProcedureEvidenceSequence
        for series in e.ReferencedSeriesSequence
        for s in series.ReferencedSOPSequence
    }
    assert segs[1].SOPInstanceUID in evidence and segs[0].SOPInstanceUID not in evidence
    (study,) = second.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (doc,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (ids.study_uid, first.SeriesInstanceUID)
    assert (doc.ReferencedSOPClassUID, doc.ReferencedSOPInstanceUID) == (first.SOPClassUID, first.SOPInstanceUID)
    hd.sr.Comprehensive3DSR.from_dataset(second)  # still a TID 1500 document to highdicom, and valid:
    second.save_as(tmp_path / "second.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "second.dcm") == []


def test_after_a_restart_a_cut_transfer_gets_its_quiet_period_again(tmp_path: Path) -> None:
    """A study whose transfer a node crash cut looks quiet for as long as the node was down; completing it
    at restart would run the models on part of a study while its senders are about to send the rest."""
    cfg = _config(tmp_path)
    rt = open_runtime(cfg)
    cut = time.time() - 600  # the last instance arrived before the crash, ten minutes ago
    rt.jobs.record_instance(
        NewInstance("1.2.3.1", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "x/1.dcm", 10),
        now=cut,
    )
    restarted = time.time()
    asm = Assembler(cfg, rt.files, rt.jobs, started_at=restarted)
    stable = cfg.completion.stable_seconds
    assert asm.run_once(now=restarted + stable * 0.9) == 0
    assert rt.jobs.get_study("1.2.3").state == "receiving"
    assert asm.run_once(now=restarted + stable + 0.01) == 1  # nothing more came: complete, as any quiet study


def test_a_run_superseded_before_it_starts_is_dropped_not_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first run's job was still waiting (e.g. in a retry's backoff) when late slices made a second run:
    the worker drops it instead of sending results that would arrive after, and look newer than, the second's."""
    cfg, rt, _, axial, asm, worker = _node_parts(tmp_path, "superseded", seed=7)
    caplog.set_level("INFO")
    try:
        with _listening(cfg, rt) as store:
            store(axial[:-1])
            assert asm.run_once(now=time.time() + 1) == 1
            store(axial[-1:])
            assert asm.run_once(now=time.time() + 1) == 1
        first, second = sorted(rt.jobs.list_jobs(), key=lambda j: j.generation)
        assert worker.run_once() and worker.run_once()
    finally:
        worker.close()
    first, second = rt.jobs.get_job(first.id), rt.jobs.get_job(second.id)
    assert (first.state, first.error) == ("cancelled", f"superseded by job {second.id}")
    assert rt.jobs.results_of_job(first.id) == [] and second.state == "done"
    events = [r.getMessage() for r in caplog.records if r.name == "dicom_node.worker"]
    assert events.count("job_superseded") == 1 and events.count("job_done") == 1


def test_a_rerun_retires_the_superseded_seg_at_the_pacs_with_a_rejection_note(tmp_path: Path) -> None:
    """After a re-run the PACS holds two SEGs of the study and viewers list both; the re-run also sends an IOCM
    rejection note ("Rejected for Quality Reasons") naming the first SEG, and only once the PACS (a real DCMTK
    storescp) has confirmed the new SEG and SR, so the study never shows no current result."""
    pacs = StoreSCP(tmp_path / "pacs").start()
    cfg, rt, ids, axial, asm, worker = _node_parts(tmp_path, "rejection", seed=8, pacs_port=pacs.port)
    try:
        with _listening(cfg, rt) as store:
            store(axial[:-1])
            assert asm.run_once(now=time.time() + 1) == 1 and worker.run_once()
            first_job = rt.jobs.list_jobs(limit=1)[0]
            assert [r.kind for r in rt.jobs.results_of_job(first_job.id)] == ["seg", "sr"]  # a first run rejects none
            store(axial[-1:])
            assert asm.run_once(now=time.time() + 1) == 1 and worker.run_once()
    finally:
        worker.close()
    second_job = rt.jobs.list_jobs(limit=1)[0]
    assert second_job.state == "done" and second_job.generation == 1, second_job.error
    (old_seg,) = [r for r in rt.jobs.results_of_job(first_job.id) if r.kind == "seg"]
    results = {r.kind: r for r in rt.jobs.results_of_job(second_job.id)}
    assert sorted(results) == ["rejection", "seg", "sr"]
    note_path = rt.files.absolute(results["rejection"].path)
    note = dcmread(note_path)
    assert dciodvfy_errors(note_path) == []
    ko = hd.ko.KeyObjectSelectionDocument.from_dataset(note)
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    assert (note.StudyInstanceUID, note.SeriesNumber, note.InstanceNumber) == (ids.study_uid, 9200, 2)
    (evidence,) = note.CurrentRequestedProcedureEvidenceSequence
    rejected = {
        (s.SeriesInstanceUID, r.ReferencedSOPInstanceUID)
        for s in evidence.ReferencedSeriesSequence
        for r in s.ReferencedSOPSequence
    }
    assert rejected == {(old_seg.series_uid, old_seg.sop_instance_uid)}  # the first SEG only: not the new one
    assert ko.resolve_reference(old_seg.sop_instance_uid)[1] == old_seg.series_uid
    assert results["seg"].sop_instance_uid != old_seg.sop_instance_uid

    sender = Sender(cfg, rt.files, rt.jobs, "sender-test")
    with running(pacs):
        assert sender.run_once()  # both runs' SEG and SR; the note waits for the PACS to confirm them
        states = {d.result.kind: d.state for d in rt.jobs.deliveries_of_job(second_job.id)}
        assert states == {"seg": "done", "sr": "done", "rejection": "pending"}
        received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pacs.files()}
        assert results["seg"].sop_instance_uid in received and note.SOPInstanceUID not in received
        assert sender.run_once()  # now the note
        assert not sender.run_once()
        at_pacs = {str(d.SOPInstanceUID): d for d in (dcmread(p) for p in pacs.files())}
    assert all(d.state == "done" for d in rt.jobs.deliveries_of_job(second_job.id))
    assert at_pacs[note.SOPInstanceUID].SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert at_pacs[note.SOPInstanceUID].ConceptNameCodeSequence[0].CodeValue == "113001"

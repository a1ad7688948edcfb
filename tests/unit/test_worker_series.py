"""A job on a series whose slices each carry their own FrameOfReferenceUID (real de-identified data): it is
processed, the tolerance is logged with study and job, and the SEG and SR are in one frame of reference."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ai_models.types import Detection, DetectionResult, ModelIdentity, SegmentationResult, Volume
from dicom_node.jobs.worker import Worker

from .results_helpers import dciodvfy_errors, make_ct_series

SEG = ModelIdentity(name="seg", version="1", task="segmentation", labels={1: "lung"}, bundle_hash="0" * 64)
DET = ModelIdentity(name="det", version="1", task="detection", labels={1: "nodule"}, bundle_hash="1" * 64)


class _Model:
    def __init__(self, identity: ModelIdentity) -> None:
        self.identity = identity

    def run_timed(self, volume: Volume) -> tuple[SegmentationResult | DetectionResult, dict[str, float]]:
        if self.identity.task == "detection":
            box = Detection(label="nodule", score=0.9, box_min=(1.0, 2.0, 2.0), box_max=(2.0, 5.0, 5.0))
            return DetectionResult(identity=self.identity, detections=(box,)), {}
        mask = np.zeros(volume.array.shape, dtype=np.uint8)
        mask[1:3, 2:6, 2:6] = 1
        return SegmentationResult(identity=self.identity, mask=mask), {}


def test_a_frame_of_reference_per_slice_gives_results_in_one_frame(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.config import parse_config
    from dicom_node.jobs.model_cache import ModelCache
    from dicom_node.runtime import open_runtime
    from dicom_node.service import node_identity
    from storage.records import NewInstance, NewJob

    cfg = parse_config({"node": {"data_dir": str(tmp_path / "var")}}, tmp_path)
    rt = open_runtime(cfg)
    slices = make_ct_series(n_slices=4, rows=8, cols=8)
    study, series = str(slices[0].StudyInstanceUID), str(slices[0].SeriesInstanceUID)
    frames = [generate_uid() for _ in slices]
    for z, ds in enumerate(slices):
        ds.FrameOfReferenceUID = frames[z]
        sop = str(ds.SOPInstanceUID)
        path = rt.files.instance_path(study, series, sop)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        rt.jobs.record_instance(
            NewInstance(
                sop, study, series, CTImageStorage, ExplicitVRLittleEndian, rt.files.relative(path), path.stat().st_size
            ),
            now=1.0 + z,
        )
    rt.jobs.complete_study(study, 0, [NewJob(route="r", series_uid=series, models=("seg", "det"), destinations=("p",))])
    models = ModelCache(cfg)
    monkeypatch.setattr(models, "get", lambda name: _Model(SEG if name == "seg" else DET))
    worker = Worker(cfg, rt.files, rt.jobs, models, node_identity(cfg), "w")
    caplog.set_level(logging.INFO)
    try:
        assert worker.run_once()
    finally:
        worker.close()
    job = rt.jobs.get_job(1)
    assert job is not None and job.state == "done", job
    warned = [r for r in caplog.records if r.getMessage() == "series_geometry_tolerated"]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    fields = warned[0].fields  # type: ignore[attr-defined]
    assert fields["study_uid"] == study and fields["job_id"] == job.id and fields["series_uid"] == series
    assert fields["warning"].startswith(
        f"4 FrameOfReferenceUIDs in one series of regular geometry: read as one volume in {frames[0]}"
    )
    results = rt.jobs.results_of_job(job.id)
    assert sorted(r.kind for r in results) == ["seg", "sr", "sr"]  # the full report and the findings SR for viewers
    in_frame = 0
    for r in results:
        data = rt.files.absolute(r.path).read_bytes()
        # the first slice's frame of reference (the first along the normal) and no other slice's; the findings
        # SR for viewers places its ellipses on images and names no frame at all
        assert not any(f.encode() in data for f in frames[1:]), r.kind
        in_frame += frames[0].encode() in data
        assert dciodvfy_errors(rt.files.absolute(r.path)) == [], r.kind
    assert in_frame == 2  # the SEG and the full report
    seg = pydicom.dcmread(rt.files.absolute(next(r.path for r in results if r.kind == "seg")))
    assert seg.FrameOfReferenceUID == frames[0]

"""The whole path as a hospital meets it: storescu -> `dicom-node serve` -> SEG + SR at a real PACS (storescp).

One node serves several studies at once (plain with a localizer series, RLE, JPEG 2000 lossless, no
nodules); a second node meets a PACS that comes up only after its results are ready.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom import uid as pduid
from pydicom.errors import InvalidDicomError
from pydicom.uid import ComprehensiveSRStorage

from ai_models.phantom import Phantom, generate_phantom
from dicom_node.synth import StudyIds, localizer_datasets, phantom_datasets, write_datasets
from tests.peers import NodeProcess, StoreSCP, dciodvfy_errors, free_port, running, storescu, wait_for, write_config

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SHAPE = (48, 160, 160)


@dataclass(frozen=True)
class SentStudy:
    name: str
    ids: StudyIds
    phantom: Phantom
    axial_series_uid: str
    paths: list[Path]
    flags: tuple[str, ...]


def _study(
    tmp: Path,
    name: str,
    seed: int,
    *,
    nodules: int,
    ts: str = pduid.ExplicitVRLittleEndian,
    flags: tuple[str, ...] = (),
    localizer: bool = False,
    unsigned: bool = False,
) -> SentStudy:
    ph = generate_phantom(seed, shape=SHAPE, spacing=(2.5, 1.6, 1.6), n_nodules=nodules, min_nodule_radius_mm=6.0)
    ids = StudyIds.new(f"e2e-{name}-{seed}")
    axial = phantom_datasets(ph, ids, transfer_syntax=ts, unsigned=unsigned, descending=unsigned)
    paths = write_datasets(axial, tmp / name)
    if localizer:
        paths += write_datasets(localizer_datasets(ph, ids), tmp / name)
    return SentStudy(name, ids, ph, str(axial[0].SeriesInstanceUID), paths, flags)


def _results_by_study(pacs: StoreSCP) -> dict[str, dict[str, Path]]:
    out: dict[str, dict[str, Path]] = {}
    for p in pacs.files():
        try:
            ds = dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError):  # storescp still writing it: the next poll reads it
            continue
        kind = {SEG_CLASS: "seg", SR_CLASS: "sr", ComprehensiveSRStorage: "findings"}.get(
            str(ds.SOPClassUID), str(ds.SOPClassUID)
        )
        out.setdefault(str(ds.StudyInstanceUID), {})[kind] = p
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / denom) if denom else 1.0


def _seg_labels_on_source_grid(seg_path: Path, study: SentStudy) -> np.ndarray:
    """Decode the SEG back onto the sent axial series, ordered like the phantom's z axis."""
    seg = hd.seg.segread(seg_path)
    axial = [dcmread(p, stop_before_pixels=True) for p in study.paths]
    axial = [d for d in axial if str(d.SeriesInstanceUID) == study.axial_series_uid]
    axial.sort(key=lambda d: float(d.ImagePositionPatient[2]))  # the phantom's z order: increasing position
    sop_uids = [str(d.SOPInstanceUID) for d in axial]
    numbers = {seg.get_segment_description(n).segment_label: n for n in seg.segment_numbers}
    labels = np.zeros(study.phantom.labels.shape, dtype=np.uint8)
    for value, name in ((1, "lung"), (2, "nodule")):
        if name not in numbers:
            continue
        arr = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=sop_uids,
            segment_numbers=[numbers[name]],
            combine_segments=False,
            skip_overlap_checks=True,
            ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,
        )
        labels[arr[..., 0] > 0] = value
    return labels


def _check_study(study: SentStudy, results: dict[str, Path], *, detect: bool = False) -> None:
    # the findings SR for viewers comes with the detections
    assert set(results) - {"findings"} == {"seg", "sr"}, f"{study.name}: got {sorted(results)}"
    for kind, path in results.items():
        errors = dciodvfy_errors(path)
        assert errors == [], f"{study.name} {kind}: dciodvfy errors: {errors}"
    seg = hd.seg.segread(results["seg"])
    assert seg.StudyInstanceUID == study.ids.study_uid
    ref_series = {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence}
    assert ref_series == {study.axial_series_uid}  # never the localizer
    assert seg.FrameOfReferenceUID == dcmread(study.paths[0], stop_before_pixels=True).FrameOfReferenceUID
    labels = _seg_labels_on_source_grid(results["seg"], study)
    truth = study.phantom.labels
    assert _dice(labels == 1, truth == 1) > 0.9, f"{study.name}: lung Dice too low"
    sr = hd.sr.srread(results["sr"])
    assert sr.StudyInstanceUID == study.ids.study_uid
    assert sr.VerificationFlag == "UNVERIFIED"
    groups = sr.content.get_volumetric_roi_measurement_groups()
    text = json.dumps(sr.to_json_dict())
    if study.phantom.nodules:
        assert _dice(labels == 2, truth == 2) > 0.5, f"{study.name}: nodule mask does not overlap the truth"
        seg_labels = {seg.get_segment_description(n).segment_label for n in seg.segment_numbers}
        assert seg_labels == {"lung", "nodule"}
        seg_groups = [g for g in groups if g.referenced_segment is not None]
        referenced = {n for g in seg_groups for n in g.referenced_segment.referenced_segment_numbers}
        assert referenced == set(seg.segment_numbers)  # one volume measurement per SEG segment
        for g in seg_groups:
            (volume,) = g.get_measurements()
            assert volume.value > 0
    else:
        assert (labels == 2).sum() < 20, f"{study.name}: false nodule voxels"
        assert "272519000" in text  # SCT Absent: the SR says no nodule was found
    if detect:
        _check_detections_and_classification(study, sr)


def _algorithm_names(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> list[str]:
    """Algorithm Name (DCM 111001) items of a measurement group."""
    return [str(i.TextValue) for i in group[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111001"]


def _check_detections_and_classification(study: SentStudy, sr: hd.sr.Comprehensive3DSR) -> None:
    """One located finding per nodule (SCOORD3D near its centre) plus the study-level classification."""
    boxes = [g for g in sr.content.get_volumetric_roi_measurement_groups() if g.roi is not None]
    axial = sorted(
        (
            dcmread(p, stop_before_pixels=True)
            for p in study.paths
            if str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID) == study.axial_series_uid
        ),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )
    origin = np.asarray(axial[0].ImagePositionPatient, float)
    dz, dy, dx = study.phantom.spacing
    truth = [
        origin + np.array([n.center_zyx[2] * dx, n.center_zyx[1] * dy, n.center_zyx[0] * dz])
        for n in study.phantom.nodules
    ]
    centres = [np.asarray(g.roi.graphic_data).reshape(-1, 3).mean(axis=0) for g in boxes]
    # the shipped detector runs at 0.225 false positives per study: every nodule found, at most one extra
    assert len(truth) <= len(boxes) <= len(truth) + 1, f"{study.name}: {len(boxes)} findings, {len(truth)} nodules"
    for t, n in zip(truth, study.phantom.nodules, strict=True):
        assert min(np.linalg.norm(c - t) for c in centres) <= max(n.radius_mm, 5.0), f"{study.name}: nodule missed"
    for g in boxes:
        assert g.roi.frame_of_reference_uid == axial[0].FrameOfReferenceUID
        assert g.tracking_identifier and g.tracking_uid
    # each box also drawn as an ellipse on an image of the axial series, for viewers that draw only 2D SCOORD
    planar = sr.content.get_planar_roi_measurement_groups()
    assert sorted(g.tracking_uid for g in planar) == sorted(g.tracking_uid for g in boxes)
    axial_uids = {str(d.SOPInstanceUID) for d in axial}
    assert all(g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in axial_uids for g in planar)
    (cls,) = [g for g in sr.content.get_image_measurement_groups() if "chest-ct-cls" in _algorithm_names(g)]
    (evaluation,) = [q for q in cls.get_qualitative_evaluations() if q.name == cls.finding_type]
    assert str(evaluation.value.value) == ("52101004" if truth else "272519000")  # Present / Absent
    (probability,) = cls.get_measurements()
    assert (probability.value >= 50) == bool(truth)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


def test_studies_come_back_as_seg_and_sr_at_the_pacs(workdir: Path) -> None:
    studies = [
        _study(workdir / "in", "plain", 11, nodules=2, localizer=True),
        _study(workdir / "in", "rle", 12, nodules=1, ts=pduid.RLELossless, flags=("-xr",), unsigned=True),
        _study(workdir / "in", "j2k", 13, nodules=0, ts=pduid.JPEG2000Lossless, flags=("-xv",)),
    ]
    pacs = StoreSCP(workdir / "pacs").start()
    port = free_port()
    cfg = write_config(
        workdir / "config.toml",
        port=port,
        data_dir=workdir / "var",
        destinations=[{"name": "pacs", "port": pacs.port}],
        route_models=("chest-ct-seg", "chest-ct-det", "chest-ct-cls"),
    )
    node = NodeProcess(cfg, port, workdir / "node.log").start()
    with running(pacs, node):
        for s in studies:
            storescu(port, s.paths, flags=s.flags)
        got = wait_for(
            lambda: (
                (r := _results_by_study(pacs))
                and all({"seg", "sr"} <= set(r.get(s.ids.study_uid, {})) for s in studies)
                and r
            ),
            600,
            "SEG and SR of every study at the PACS",
        )
        for s in studies:
            _check_study(s, got[s.ids.study_uid], detect=True)
        status = node.cli("status")
        assert status.returncode == 0
        assert "jobs: done=3" in status.stdout, status.stdout
        assert "deliveries: done=" in status.stdout
        machine = json.loads(node.cli("status", "--json").stdout)  # for monitoring scripts: objects, not strings
        for job in machine["jobs"]:
            assert job["state"] == "done" and job["timings"]["inference_forward"] > 0
            kinds = sorted((d["kind"], d["state"]) for d in job["deliveries"])
            assert kinds in ([("seg", "done"), ("sr", "done")], [("seg", "done"), ("sr", "done"), ("sr", "done")])
        log = node.log_text()
        assert "study_complete" in log and "job_done" in log
        assert "t_inference_forward" in log  # the runner's stages reach the job's timings
        # worker.preload_models (default): each model loaded once, at start, before the first job
        assert log.count("model_loaded") == 3 and log.rindex("model_loaded") < log.index("job_started")
        for s in studies:  # no patient names or IDs at INFO
            assert s.ids.patient_name.split("^")[0] not in log and s.ids.patient_id not in log
        assert node.stop() == 0
    assert "node_stopped" in node.log_text()


def test_results_wait_for_a_pacs_that_comes_up_later(workdir: Path) -> None:
    study = _study(workdir / "in2", "late-pacs", 21, nodules=1)
    pacs_port = free_port()
    port = free_port()
    cfg = write_config(
        workdir / "config2.toml",
        port=port,
        data_dir=workdir / "var2",
        destinations=[{"name": "pacs", "port": pacs_port}],
    )
    node = NodeProcess(cfg, port, workdir / "node2.log").start()
    pacs = StoreSCP(workdir / "pacs2", port=pacs_port)
    with running(pacs, node):
        storescu(port, study.paths)
        wait_for(lambda: "delivery_retry_scheduled" in node.log_text(), 300, "a failed first delivery attempt")
        assert pacs.proc is None and not (workdir / "pacs2").exists()
        pacs.start()
        got = wait_for(
            lambda: (r := _results_by_study(pacs).get(study.ids.study_uid, {})) and len(r) == 2 and r,
            120,
            "SEG and SR after the PACS came up",
        )
        _check_study(study, got)
        assert node.log_text().count("job_started") == 1  # delivered without re-running the model

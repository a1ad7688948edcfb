"""TID 1500 Comprehensive 3D SR: valid (dciodvfy), read back with highdicom, values, no-findings case."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from ai_models.types import ClassificationResult, Detection, DetectionResult, SegmentationResult, Volume
from dicom_node.results import build_seg, build_sr, result_uids, segment_volumes_ml
from dicom_node.results.sr import spacing_from_source

from .results_helpers import NODE, dciodvfy_errors, identity, lung_nodule_mask, make_ct_series, volume_of, write

SHAPE = (20, 64, 64)
ALGORITHM_NAME = "111001"
ALGORITHM_VERSION = "111003"


@pytest.fixture(scope="module")
def source() -> list[pydicom.Dataset]:
    return make_ct_series(*SHAPE, with_pixels=False)


@pytest.fixture(scope="module")
def geometry(source: list[pydicom.Dataset]) -> Volume:
    return volume_of(source)


def _detector() -> DetectionResult:
    ident = identity("detection", {1: "nodule"}, name="nodule-det", version="2.0")
    boxes = (Detection("nodule", 0.91, (8, 28, 40), (12, 36, 48)), Detection("nodule", 0.42, (3, 5, 6), (3, 5, 6)))
    return DetectionResult(ident, boxes)


def _classifier(probability: float) -> ClassificationResult:
    return ClassificationResult(identity("classification", {1: "nodule"}, name="nodule-cls"), "nodule", probability)


def _sr(source: list[pydicom.Dataset], geometry: Volume | None, **kw: object) -> pydicom.Dataset:
    uids = result_uids("SR", source[0].SeriesInstanceUID, "job", "1")
    args: dict[str, object] = {"seg": None, "segmentation": None, "detections": (), "classifications": ()}
    args.update(kw)
    return build_sr(
        source, geometry, series_uid=uids.series_uid, sop_uid=uids.sop_uid, series_number=902, node=NODE, **args
    )


def _algorithm_names(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> list[str]:
    """Algorithm Name items directly in the group container (TID 4019 of the group)."""
    return [
        str(item.TextValue)
        for item in group[0].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == ALGORITHM_NAME
    ]


def _evaluation(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> str:
    """Value of the qualitative evaluation named after the group's finding type (Present/Absent code)."""
    (item,) = [q for q in group.get_qualitative_evaluations() if q.name == group.finding_type]
    return str(item.value.value)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory, source: list[pydicom.Dataset], geometry: Volume) -> dict:
    directory = tmp_path_factory.mktemp("sr")
    segmentation = SegmentationResult(identity(), lung_nodule_mask(SHAPE))
    seg_uids = result_uids("SEG", source[0].SeriesInstanceUID, "chest-ct-seg", "1.0.0")
    seg = build_seg(
        source, segmentation, series_uid=seg_uids.series_uid, sop_uid=seg_uids.sop_uid, series_number=901, node=NODE
    )
    sr = _sr(
        source,
        geometry,
        seg=seg,
        segmentation=segmentation,
        detections=[_detector()],
        classifications=[_classifier(0.8)],
    )
    return {"path": write(sr, directory / "sr.dcm"), "seg": seg, "segmentation": segmentation}


def test_sr_passes_dciodvfy(full: dict) -> None:
    assert dciodvfy_errors(full["path"]) == []


def test_sr_header_study_evidence_and_flags(full: dict, source: list[pydicom.Dataset]) -> None:
    sr = hd.sr.srread(full["path"])
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.StudyInstanceUID == source[0].StudyInstanceUID and sr.PatientID == source[0].PatientID
    assert sr.SeriesNumber == 902 and sr.Manufacturer == NODE.manufacturer
    assert sr.SoftwareVersions == NODE.software_version
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    referenced = {s.SeriesInstanceUID: len(s.ReferencedSOPSequence) for s in evidence}
    assert referenced == {source[0].SeriesInstanceUID: len(source), full["seg"].SeriesInstanceUID: 1}
    (observer,) = sr.content.get_observer_contexts()
    assert observer.observer_type.value == "121007"  # Device
    assert observer.observer_identifying_attributes.serial_number == NODE.device_serial_number


def test_sr_segment_volumes_reference_seg_segments(full: dict, source: list[pydicom.Dataset]) -> None:
    sr = hd.sr.srread(full["path"])
    seg, mask = full["seg"], full["segmentation"].mask
    groups = [g for g in sr.content.get_volumetric_roi_measurement_groups() if g.referenced_segment is not None]
    assert len(groups) == 2
    spacing = (2.5, 0.8, 0.7)
    for group in groups:
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        (number,) = ref.referenced_segment_numbers
        label = {"39607008": 1, "786838002": 2}[group.finding_type.value]
        assert int(seg.SegmentSequence[number - 1].SegmentNumber) == number
        assert str(seg.SegmentSequence[number - 1].SegmentLabel) == {1: "lung", 2: "nodule"}[label]
        assert ref.source_series_for_segmentation.value == source[0].SeriesInstanceUID
        (volume,) = group.get_measurements()
        assert volume.unit.value == "ml" and volume.name.value == "118565006"
        expected = np.count_nonzero(mask == label) * np.prod(spacing) / 1000.0
        assert volume.value == pytest.approx(expected, rel=1e-6)
        assert _algorithm_names(group) == ["chest-ct-seg"]


def test_sr_detections_are_ellipsoids_in_frame_of_reference(full: dict, geometry: Volume) -> None:
    sr = hd.sr.srread(full["path"])
    groups = [g for g in sr.content.get_volumetric_roi_measurement_groups() if g.roi is not None]
    assert len(groups) == 2
    for group, detection in zip(groups, _detector().detections, strict=True):
        assert group.finding_type.value == "786838002"
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues3D.ELLIPSOID
        assert group.roi.frame_of_reference_uid == geometry.frame_of_reference_uid
        points = group.roi.graphic_data
        centre = geometry.index_to_lps((np.asarray(detection.box_min) + np.asarray(detection.box_max)) / 2.0)
        np.testing.assert_allclose(np.asarray(points).reshape(6, 3).mean(axis=0), centre, atol=1e-3)
        (score,) = group.get_measurements()
        assert score.name.value == "111012" and score.unit.value == "%"
        assert score.value == pytest.approx(100 * detection.score)
        assert _algorithm_names(group) == ["nodule-det"]
    # major axis first: the 5-slice box is 12.5 mm along z, 9 rows x 0.8 mm = 7.2 mm, 9 columns = 6.3 mm
    axes = np.asarray(groups[0].roi.graphic_data).reshape(3, 2, 3)
    lengths = np.linalg.norm(axes[:, 1] - axes[:, 0], axis=1)
    np.testing.assert_allclose(lengths, [12.5, 7.2, 6.3], atol=1e-3)


def test_sr_classification_present_with_probability(full: dict) -> None:
    sr = hd.sr.srread(full["path"])
    (group,) = sr.content.get_image_measurement_groups()
    assert group.finding_type.value == "786838002"
    assert _evaluation(group) == "52101004"  # Present
    (probability,) = group.get_measurements()
    assert probability.value == pytest.approx(80.0)
    assert _algorithm_names(group) == ["nodule-cls"]


def test_sr_without_findings_says_absent(tmp_path: Path, source: list[pydicom.Dataset], geometry: Volume) -> None:
    empty = SegmentationResult(identity(), np.zeros(SHAPE, dtype=np.uint8))
    no_boxes = DetectionResult(identity("detection", {1: "nodule"}, name="nodule-det"))
    sr_ds = _sr(source, geometry, segmentation=empty, detections=[no_boxes], classifications=[_classifier(0.1)])
    path = write(sr_ds, tmp_path / "negative.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    groups = sr.content.get_image_measurement_groups()
    findings = sorted((g.finding_type.meaning, _evaluation(g)) for g in groups)
    absent = "272519000"
    assert findings == [
        ("Lung", absent),
        ("Pulmonary nodule", absent),
        ("Pulmonary nodule", absent),
        ("Pulmonary nodule", absent),
    ]
    referenced = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in referenced] == [source[0].SeriesInstanceUID]


def test_sr_uids_and_tracking_are_deterministic(source: list[pydicom.Dataset], geometry: Volume) -> None:
    one = _sr(source, geometry, detections=[_detector()])
    two = _sr(source, geometry, detections=[_detector()])
    assert one.SOPInstanceUID == two.SOPInstanceUID
    tracking = [
        g.tracking_uid
        for g in hd.sr.Comprehensive3DSR.from_dataset(one).content.get_volumetric_roi_measurement_groups()
    ]
    again = [
        g.tracking_uid
        for g in hd.sr.Comprehensive3DSR.from_dataset(two).content.get_volumetric_roi_measurement_groups()
    ]
    assert tracking == again and len(set(tracking)) == 2


def test_segment_volumes_ml_counts_voxels_times_voxel_volume() -> None:
    mask = np.zeros((4, 5, 6), dtype=np.uint8)
    mask[0, :2, :3] = 1  # 6 voxels
    mask[3, 4, 5] = 2
    result = SegmentationResult(identity(), mask)
    assert segment_volumes_ml(result, (2.0, 0.5, 0.5)) == pytest.approx({1: 6 * 0.5 / 1000, 2: 0.5 / 1000})
    assert segment_volumes_ml(SegmentationResult(identity(), np.zeros_like(mask)), (1, 1, 1)) == {}


def test_spacing_from_source_matches_geometry(source: list[pydicom.Dataset], geometry: Volume) -> None:
    assert spacing_from_source(source) == pytest.approx(geometry.spacing)


def test_sr_refuses_unreferencable_or_empty_input(source: list[pydicom.Dataset], geometry: Volume) -> None:
    segmentation = SegmentationResult(identity(), lung_nodule_mask(SHAPE))
    with pytest.raises(ValueError, match="no SEG"):
        _sr(source, geometry, segmentation=segmentation)
    with pytest.raises(ValueError, match="no results"):
        _sr(source, geometry)
    with pytest.raises(ValueError, match="geometry"):
        _sr(source, None, detections=[_detector()])

"""TID 1500 Comprehensive 3D SR: valid (dciodvfy), read back with highdicom, values, no-findings case."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from ai_models.types import ClassificationResult, Detection, DetectionResult, SegmentationResult, Volume
from dicom_node.results import build_seg, build_sr, segment_volumes_ml
from dicom_node.results.sr import spacing_from_source

from .results_helpers import (
    NODE,
    dciodvfy_errors,
    identity,
    lung_nodule_mask,
    make_ct_series,
    seg_uids,
    sr_uids,
    volume_of,
    write,
)

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
    uids = sr_uids(source, "job")
    args: dict[str, object] = {"segmentations": (), "detections": (), "classifications": ()}
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
    seg_name = seg_uids(source, segmentation.identity)
    seg = build_seg(
        source, segmentation, series_uid=seg_name.series_uid, sop_uid=seg_name.sop_uid, series_number=901, node=NODE
    )
    sr = _sr(
        source,
        geometry,
        segmentations=[(segmentation, seg)],
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
    assert sr.PreliminaryFlag == "FINAL"  # never revised (a re-run writes a new document); PACS may hide PRELIMINARY
    (procedure,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"  # CT unspecified body region
    assert "CodingSchemeIdentificationSequence" not in sr  # no private code used: nothing to declare
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


def test_sr_detections_are_also_ellipses_on_their_centre_slice(
    full: dict, geometry: Volume, source: list[pydicom.Dataset]
) -> None:
    """2D viewers (OHIF, most PACS) draw SCOORD on an image, not SCOORD3D: each box is also a TID 1410 group."""
    sr = hd.sr.srread(full["path"])
    planar = sr.content.get_planar_roi_measurement_groups()
    volumetric = [g for g in sr.content.get_volumetric_roi_measurement_groups() if g.roi is not None]
    assert len(planar) == 2
    spacing = (2.5, 0.8, 0.7)
    for group, twin, detection in zip(planar, volumetric, _detector().detections, strict=True):
        assert group.tracking_uid == twin.tracking_uid  # one finding, two drawings
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.ELLIPSE
        lo, hi = np.asarray(detection.box_min), np.asarray(detection.box_max)
        z = int(np.floor((lo[0] + hi[0]) / 2 + 0.5))
        image = group.roi.ContentSequence[0].ReferencedSOPSequence[0]  # SELECTED FROM the image
        assert image.ReferencedSOPInstanceUID == source[z].SOPInstanceUID
        assert image.ReferencedSOPClassUID == source[z].SOPClassUID
        points = np.asarray(group.roi.value).reshape(4, 2)  # (column, row); pixel (r, c) spans c..c+1, r..r+1
        np.testing.assert_allclose(points.mean(axis=0), [(lo[2] + hi[2]) / 2 + 0.5, (lo[1] + hi[1]) / 2 + 0.5])
        mm = (points[[1, 3]] - points[[0, 2]]) * [spacing[2], spacing[1]]
        major, minor = np.linalg.norm(mm, axis=1)
        assert major >= minor  # major axis first
        assert sorted([major, minor]) == pytest.approx(
            sorted([(hi[2] - lo[2] + 1) * spacing[2], (hi[1] - lo[1] + 1) * spacing[1]])
        )
        (score,) = group.get_measurements()
        assert score.value == pytest.approx(100 * detection.score)


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
    sr_ds = _sr(
        source, geometry, segmentations=[(empty, None)], detections=[no_boxes], classifications=[_classifier(0.1)]
    )
    path = write(sr_ds, tmp_path / "negative.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    groups = sr.content.get_image_measurement_groups()
    findings = sorted((g.finding_type.meaning, _evaluation(g)) for g in groups)
    absent, not_detected = "272519000", "260415000"  # a finding is absent; an organ was not found (out of view?)
    assert findings == [
        ("Lung", not_detected),
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
        _sr(source, geometry, segmentations=[(segmentation, None)])
    with pytest.raises(ValueError, match="no results"):
        _sr(source, geometry)
    with pytest.raises(ValueError, match="geometry"):
        _sr(source, None, detections=[_detector()])


def _kidneys() -> SegmentationResult:
    """A second segmentation model: right kidney present, left kidney empty."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[8:12, 20:30, 10:20] = 1
    return SegmentationResult(identity(labels={1: "Right Kidney", 2: "Left Kideny"}, name="kidney-seg"), mask)


def test_sr_reports_every_segmentation_model_and_lists_each_seg_as_evidence(
    tmp_path: Path, source: list[pydicom.Dataset], geometry: Volume
) -> None:
    lungs = SegmentationResult(identity(), lung_nodule_mask(SHAPE))
    kidneys = _kidneys()
    segs = []
    for result in (lungs, kidneys):
        uids = seg_uids(source, result.identity)
        segs.append(
            build_seg(source, result, series_uid=uids.series_uid, sop_uid=uids.sop_uid, series_number=901, node=NODE)
        )
    empty = SegmentationResult(
        identity(labels={1: "liver", 2: "wobble"}, name="liver-seg"), np.zeros(SHAPE, dtype=np.uint8)
    )
    sr_ds = _sr(source, geometry, segmentations=[(lungs, segs[0]), (empty, None), (kidneys, segs[1])])
    path = write(sr_ds, tmp_path / "three-models.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    referenced = {
        g.referenced_segment.referenced_sop_instance_uid: g.referenced_segment.referenced_segment_numbers
        for g in sr.content.get_volumetric_roi_measurement_groups()
    }
    assert set(referenced) == {segs[0].SOPInstanceUID, segs[1].SOPInstanceUID}
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    expected = {source[0].SeriesInstanceUID, *(s.SeriesInstanceUID for s in segs)}
    assert {s.SeriesInstanceUID for s in evidence} == expected
    not_found = sorted((g.finding_type.meaning, _evaluation(g)) for g in sr.content.get_image_measurement_groups())
    # the second model's left kidney, the third model's liver and its label outside the code table: none of
    # them is a finding, so none is claimed "Absent" (272519000), only "Not detected"
    assert not_found == [("Kidney", "260415000"), ("Liver", "260415000"), ("wobble", "260415000")]


def test_seg_and_sr_share_each_segments_tracking_uid_across_reruns(
    source: list[pydicom.Dataset], geometry: Volume
) -> None:
    """One structure, one Tracking UID in the SEG and the SR, and the same again in a re-run's new objects."""
    lungs = SegmentationResult(identity(), lung_nodule_mask(SHAPE))
    seen = []
    for run in ("1", "2"):  # a re-run after late arrivals: new SOP Instance UIDs
        seg = build_seg(source, lungs, series_uid="2.25.11", sop_uid=f"2.25.12{run}", series_number=901, node=NODE)
        uids = sr_uids(source, f"job-{run}")
        sr = build_sr(
            source,
            geometry,
            segmentations=[(lungs, seg)],
            detections=(),
            classifications=(),
            series_uid=uids.series_uid,
            sop_uid=uids.sop_uid,
            series_number=902,
            node=NODE,
        )
        in_seg = {int(s.SegmentNumber): (s.TrackingUID, s.TrackingID) for s in seg.SegmentSequence}
        in_sr = {
            g.referenced_segment.referenced_segment_numbers[0]: (g.tracking_uid, str(g.tracking_identifier))
            for g in hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_volumetric_roi_measurement_groups()
        }
        assert {n: uid for n, (uid, _) in in_seg.items()} == {n: uid for n, (uid, _) in in_sr.items()}
        assert in_seg[1][1] == "lung (chest-ct-seg)" and in_seg[1][1] in in_sr[1][1]
        seen.append(in_seg)
    assert seen[0] == seen[1]


def test_building_a_seg_leaves_no_seg_attribute_in_a_later_sr(
    tmp_path: Path, source: list[pydicom.Dataset], geometry: Volume
) -> None:
    """The SEG adds a laterality modifier to its segment's type code; that item must not be shared with the
    code table, or every later SR's Finding would carry (0062,0011), which SR content items do not have."""
    kidneys = _kidneys()
    seg = build_seg(source, kidneys, series_uid="2.25.21", sop_uid="2.25.22", series_number=901, node=NODE)
    assert "SegmentedPropertyTypeModifierCodeSequence" in seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    sr_ds = _sr(source, geometry, segmentations=[(kidneys, seg)])
    path = write(sr_ds, tmp_path / "kidneys.dcm")
    assert dciodvfy_errors(path) == []
    assert (0x0062, 0x0011) not in {elem.tag for ds in sr_ds.ContentSequence for elem in _walk(ds)}
    out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, check=False)
    assert "SegmentedPropertyTypeModifier" not in out.stdout + out.stderr


def _walk(ds: pydicom.Dataset) -> list[pydicom.DataElement]:
    found = []
    for elem in ds:
        found.append(elem)
        if elem.VR == "SQ":
            for item in elem.value:
                found += _walk(item)
    return found


def test_a_missing_structure_is_matched_with_its_laterality(source: list[pydicom.Dataset], geometry: Volume) -> None:
    """Right and left kidney share a type code: a found right kidney does not hide a missing left one."""
    ident = identity("detection", {1: "Right Kidney", 2: "Left Kidney"}, name="kidney-det")
    found = DetectionResult(ident, (Detection("Right Kidney", 0.9, (8, 20, 10), (11, 29, 19)),))
    sr = hd.sr.Comprehensive3DSR.from_dataset(_sr(source, geometry, detections=[found]))
    (missing,) = sr.content.get_image_measurement_groups()
    (site,) = missing.finding_sites
    assert missing.finding_type.meaning == "Kidney" and site.laterality.value == "7771000"  # Left
    assert _evaluation(missing) == "260415000"  # Not detected


def test_procedure_reported_follows_the_source_modality(geometry: Volume) -> None:
    mr = make_ct_series(*SHAPE, with_pixels=False)
    for ds in mr:
        ds.Modality = "MR"
    sr = _sr(mr, geometry, classifications=[_classifier(0.8)])
    (procedure,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure.ConceptCodeSequence[0].CodeValue == "25056-3"  # MRI unspecified body region


def test_results_carry_the_configured_institution(source: list[pydicom.Dataset], geometry: Volume) -> None:
    """results.institution_name: the site the node runs at, in the SEG (fast encoder) and the SR alike."""
    site = dataclasses.replace(NODE, institution_name="General Hospital")
    lungs = SegmentationResult(identity(), lung_nodule_mask(SHAPE))
    seg = build_seg(source, lungs, series_uid="2.25.31", sop_uid="2.25.32", series_number=901, node=site)
    uids = sr_uids(source, "inst")
    sr = build_sr(
        source,
        geometry,
        segmentations=[(lungs, seg)],
        detections=(),
        classifications=(),
        series_uid=uids.series_uid,
        sop_uid=uids.sop_uid,
        series_number=902,
        node=site,
    )
    assert seg.InstitutionName == sr.InstitutionName == "General Hospital"
    plain = build_seg(source, lungs, series_uid="2.25.31", sop_uid="2.25.33", series_number=901, node=NODE)
    assert "InstitutionName" not in plain

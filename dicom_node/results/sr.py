"""Model results -> Comprehensive 3D SR with a TID 1500 Measurement Report (IHE AI Results).

Content, one measurement group per item, each with its own tracking identifier and the algorithm
identification (TID 4019):

- segmentation, per segment of each SEG (one per segmentation model): TID 1411 volumetric group
  referencing the segment, with its volume in ml (voxel count x voxel volume); it carries the segment's own
  tracking UID and ID (``seg.segment_tracking``);
- segmentation, per model label with no voxel: TID 1501 group, qualitative evaluation "<label>: Absent"
  for a finding, "Not detected" for an anatomical structure (see codes.py);
- detection, per box: TID 1411 volumetric group with the box as an axis-aligned SCOORD3D ELLIPSOID in
  the source frame of reference, and a TID 1410 planar group with the box's ellipse on its centre slice
  (SCOORD ELLIPSE on that image), which 2D viewers draw; both carry the score as DCM 111012 "Certainty
  of Finding" (%) and one tracking UID;
- detection, per model label with no box: as for segmentation;
- classification: TID 1501 group, "<finding>: Present/Absent" plus the probability as Certainty of
  Finding (%); the decision threshold is an algorithm parameter.

So a study without findings still gets an SR that says so. Observer context is the device (the node),
VerificationFlag UNVERIFIED (no person has checked it), PreliminaryFlag FINAL (this document never changes;
a re-run writes a new one). Evidence: the source images and every SEG the SR refers to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from ai_models.types import (
    ClassificationResult,
    Detection,
    DetectionResult,
    ModelIdentity,
    SegmentationResult,
    Volume,
)

from .codes import (
    ABSENT,
    AREA,
    CERTAINTY_OF_FINDING,
    COMMENT,
    MILLILITER,
    NOT_DETECTED,
    PERCENT,
    PRESENT,
    SQUARE_MILLIMETER,
    VOLUME,
    SegmentCoding,
    coding_scheme_identification,
    procedure_reported,
    segment_coding,
)
from .equipment import NodeIdentity, equipment_kwargs, sr_algorithm_identification
from .seg import label_voxel_counts, segment_numbers, segment_tracking
from .uids import derive_uid

Group = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def segment_volumes_ml(result: SegmentationResult, spacing: Sequence[float]) -> dict[int, float]:
    """Volume in ml of each label present in the mask: voxel count x voxel volume (mm^3 / 1000)."""
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values, got {spacing!r}")
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    counts = label_voxel_counts(result.mask)
    return {label: float(counts[label]) * voxel_ml for label in segment_numbers(result, counts)}


def spacing_from_source(source: Sequence[pydicom.Dataset]) -> tuple[float, float, float]:
    """(slice step, row spacing, column spacing) in mm from the sorted source headers."""
    first = source[0]
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    if len(source) > 1:
        orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:])
        delta = np.asarray(source[1].ImagePositionPatient, float) - np.asarray(first.ImagePositionPatient, float)
        step = abs(float(delta @ normal))
    else:
        step = float(first.SliceThickness)
    return (step, row_spacing, col_spacing)


def _tracking(*key: str, text: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=derive_uid("tracking", *key), identifier=text[:64])


def _finding_sites(coding: SegmentCoding) -> list[hd.sr.FindingSite] | None:
    if coding.modifier is None:
        return None
    return [hd.sr.FindingSite(anatomic_location=coding.type, laterality=coding.modifier)]


def _absent_group(
    coding: SegmentCoding, tracking: hd.sr.TrackingIdentifier, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """ "<finding>: Absent", or "<structure>: Not detected" for anatomy (which may lie outside the scan)."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=coding.type,
        finding_category=coding.category,
        finding_sites=_finding_sites(coding),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=coding.type, value=ABSENT if coding.is_finding else NOT_DETECTED)
        ],
    )


def _coding_key(coding: SegmentCoding) -> tuple[str, str, str]:
    """What tells two labels' structures apart: type and laterality (left and right kidney share a type)."""
    modifier = "" if coding.modifier is None else coding.modifier.value
    return (coding.type.scheme_designator, coding.type.value, modifier)


def _segmentation_groups(
    result: SegmentationResult,
    seg: pydicom.Dataset | None,
    spacing: Sequence[float],
    source_series_uid: str,
    node: NodeIdentity,
) -> list[Group]:
    identity = result.identity
    algorithm = sr_algorithm_identification(identity, node)
    counts = label_voxel_counts(result.mask)
    numbers = segment_numbers(result, counts)
    if numbers:
        _check_seg_matches(seg, identity, numbers)
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    groups: list[Group] = []
    for label, name in sorted(identity.labels.items()):
        coding = segment_coding(name)
        number = numbers.get(label)
        uid, text = segment_tracking(source_series_uid, identity, label)
        tracking = hd.sr.TrackingIdentifier(uid=uid, identifier=text)
        if number is None:
            groups.append(_absent_group(coding, tracking, algorithm))
            continue
        assert seg is not None  # checked by _check_seg_matches
        volume = hd.sr.Measurement(
            name=VOLUME, value=float(counts[label]) * voxel_ml, unit=MILLILITER, algorithm_id=algorithm
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
                ),
                finding_type=coding.type,
                finding_category=coding.category,
                finding_sites=_finding_sites(coding),
                algorithm_id=algorithm,
                measurements=[volume],
            )
        )
    return groups


def _check_seg_matches(seg: pydicom.Dataset | None, identity: ModelIdentity, numbers: dict[int, int]) -> None:
    """The SR may only reference segments that exist in the SEG it is given."""
    if seg is None:
        raise ValueError("segmentation has labelled voxels but no SEG was given to reference")
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    expected = {number: identity.labels[label][:64] for label, number in numbers.items()}
    if labels != expected:
        raise ValueError(f"SEG segments {labels} do not match the segmentation result {expected}")


def ellipsoid_lps(detection: Detection, geometry: Volume) -> np.ndarray:
    """(6, 3) LPS axis end points of the ellipsoid inscribed in the (inclusive) voxel box.

    Axes follow the volume's axes, longest first as SCOORD3D ELLIPSOID requires (major axis first).
    """
    lo = np.asarray(detection.box_min, dtype=np.float64)
    hi = np.asarray(detection.box_max, dtype=np.float64)
    if np.any(hi < lo):
        raise ValueError(f"detection box min {detection.box_min} exceeds max {detection.box_max}")
    centre = (lo + hi) / 2.0
    half = (hi - lo + 1.0) / 2.0  # inclusive voxel indices: a 1-voxel box is 1 voxel wide
    order = np.argsort(-half * np.asarray(geometry.spacing), kind="stable")
    points = []
    for axis in order:
        offset = np.zeros(3)
        offset[axis] = half[axis]
        points.extend([centre - offset, centre + offset])
    return geometry.index_to_lps(np.asarray(points))


def _centre_slice_ellipse(detection: Detection, geometry: Volume) -> tuple[int, np.ndarray]:
    """(slice index, (4, 2) column/row points) of the box's ellipse on its centre slice: the major axis's end
    points first, then the minor's (SCOORD ELLIPSE), in image coordinates whose top left pixel spans 0..1
    (PS3.3 C.18.6.1.2), so voxel index i has its centre at i + 0.5."""
    lo = np.asarray(detection.box_min, dtype=np.float64)
    hi = np.asarray(detection.box_max, dtype=np.float64)
    z = int(np.clip(np.floor((lo[0] + hi[0]) / 2.0 + 0.5), 0, len(geometry.sop_instance_uids) - 1))
    row, col = (lo[1] + hi[1]) / 2.0 + 0.5, (lo[2] + hi[2]) / 2.0 + 0.5
    half_rows, half_cols = (hi[1] - lo[1] + 1.0) / 2.0, (hi[2] - lo[2] + 1.0) / 2.0
    along_rows = [[col, row - half_rows], [col, row + half_rows]]  # (column, row) pairs
    along_cols = [[col - half_cols, row], [col + half_cols, row]]
    if half_rows * geometry.spacing[1] > half_cols * geometry.spacing[2]:
        return z, np.asarray(along_rows + along_cols)
    return z, np.asarray(along_cols + along_rows)


# OHIF 3.x (@cornerstonejs/adapters) reads a measurement group as one of its tools by this Tracking Identifier;
# an ellipse is its EllipticalROI
CORNERSTONE_ELLIPSE = "Cornerstone3DTools@^0.1.0:EllipticalROI"


def finding_label(coding: SegmentCoding, score: float) -> str:
    """What a viewer shows as the finding's name: "Pulmonary nodule (certainty 99 %)"."""
    return f"{coding.display} (certainty {100.0 * score:.0f} %)"[:64]


def _planar_group(
    detection: Detection, geometry: Volume, sop_classes: dict[str, str], common: dict[str, Any]
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group with the box's ellipse on its centre slice (SCOORD ELLIPSE on that image) and the score."""
    z, points = _centre_slice_ellipse(detection, geometry)
    image_uid = geometry.sop_instance_uids[z]
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.ELLIPSE,
        graphic_data=points.astype(np.float32),
        source_image=hd.sr.SourceImageForRegion(sop_classes[image_uid], image_uid),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        referenced_region=region, measurements=[_score(detection, common["algorithm_id"])], **common
    )


def _viewer_group(
    detection: Detection, geometry: Volume, sop_classes: dict[str, str], common: dict[str, Any]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group as OHIF's adapter reads an ellipse: Tracking Identifier in its form, the first measurement
    the ellipse's area INFERRED FROM the ellipse on the box's centre slice (TID 300; OHIF takes that SCOORD as
    the annotation and the value as its area), then the score, and a Comment that OHIF shows as the label."""
    z, points = _centre_slice_ellipse(detection, geometry)
    image_uid = geometry.sop_instance_uids[z]
    ellipse = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.ELLIPSE,
        graphic_data=points.astype(np.float32),
        source_image=hd.sr.SourceImageForRegion(sop_classes[image_uid], image_uid),
    )
    algorithm = common["algorithm_id"]
    area = hd.sr.Measurement(
        name=AREA,
        value=_ellipse_area_mm2(points, geometry),
        unit=SQUARE_MILLIMETER,
        algorithm_id=algorithm,
        referenced_coordinates=[ellipse],
    )
    tracking = hd.sr.TrackingIdentifier(uid=common["tracking_identifier"][1].UID, identifier=CORNERSTONE_ELLIPSE)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        measurements=[area, _score(detection, algorithm)], **{**common, "tracking_identifier": tracking}
    )
    label = finding_label(segment_coding(detection.label), detection.score)
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(name=COMMENT, value=label, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    )
    return group


def _ellipse_area_mm2(points: np.ndarray, geometry: Volume) -> float:
    """pi x semi-axes in mm, of the (column, row) axis end points (major first, then minor)."""
    scale = np.asarray([geometry.spacing[2], geometry.spacing[1]])
    axes = [float(np.linalg.norm((points[i + 1] - points[i]) * scale)) / 2.0 for i in (0, 2)]
    return float(np.pi * axes[0] * axes[1])


def _detection_common(
    detection: Detection, index: int, identity: ModelIdentity, algorithm: hd.sr.AlgorithmIdentification, sop_uid: str
) -> dict[str, Any]:
    coding = segment_coding(detection.label)
    # a detection is new in every run (nothing says box k is the same lesion as last time): its tracking
    # UID derives from the run's report UID; the 3D and the planar group, and the findings SR, share it
    tracking = _tracking(sop_uid, "det", identity.name, str(index), text=f"{coding.display} {index}")
    return {
        "tracking_identifier": tracking,
        "finding_type": coding.type,
        "finding_category": coding.category,
        "finding_sites": _finding_sites(coding),
        "algorithm_id": algorithm,
    }


def _detection_groups(
    result: DetectionResult,
    geometry: Volume | None,
    source_series_uid: str,
    frame_of_reference_uid: str,
    sop_uid: str,
    node: NodeIdentity,
    sop_classes: dict[str, str],
) -> list[Group]:
    identity = result.identity
    algorithm = sr_algorithm_identification(identity, node)
    groups: list[Group] = []
    if result.detections and geometry is None:
        raise ValueError("detections need the volume geometry to be placed in the frame of reference")
    for index, detection in enumerate(result.detections, start=1):
        assert geometry is not None
        common = _detection_common(detection, index, identity, algorithm, sop_uid)
        surface = hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.ELLIPSOID,
            graphic_data=ellipsoid_lps(detection, geometry).astype(np.float32),
            frame_of_reference_uid=frame_of_reference_uid,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
        )
        # the planar group first: a viewer that keeps one group per tracking UID keeps the drawable one
        groups.append(_planar_group(detection, geometry, sop_classes, common))
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_volume_surface=surface, measurements=[_score(detection, algorithm)], **common
            )
        )
    found = {_coding_key(segment_coding(d.label)) for d in result.detections}
    for label, name in sorted(identity.labels.items()):
        coding = segment_coding(name)
        if _coding_key(coding) not in found:
            tracking = _tracking(source_series_uid, "det-absent", identity.name, str(label), text=name)
            groups.append(_absent_group(coding, tracking, algorithm))
    return groups


def _score(detection: Detection, algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=CERTAINTY_OF_FINDING, value=100.0 * float(detection.score), unit=PERCENT, algorithm_id=algorithm
    )


def _classification_group(result: ClassificationResult, source_series_uid: str, node: NodeIdentity) -> Group:
    coding = segment_coding(result.label)
    algorithm = sr_algorithm_identification(result.identity, node, [f"threshold={result.threshold:g}"])
    probability = hd.sr.Measurement(
        name=CERTAINTY_OF_FINDING, value=100.0 * float(result.probability), unit=PERCENT, algorithm_id=algorithm
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(source_series_uid, "cls", result.identity.name, result.label, text=result.label),
        finding_type=coding.type,
        finding_category=coding.category,
        finding_sites=_finding_sites(coding),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=coding.type, value=PRESENT if result.present else ABSENT)
        ],
        measurements=[probability],
    )


def _observer_context(node: NodeIdentity, identities: Sequence[ModelIdentity]) -> hd.sr.ObservationContext:
    names = ", ".join(dict.fromkeys(i.name for i in identities)) or node.model_name
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid("device", node.manufacturer, node.model_name, node.device_serial_number),
        name=names,
        manufacturer_name=node.manufacturer,
        model_name=node.model_name,
        serial_number=node.device_serial_number,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def build_sr(
    source: Sequence[pydicom.Dataset],
    volume_geometry: Volume | None,
    *,
    segmentations: Sequence[tuple[SegmentationResult, pydicom.Dataset | None]],
    detections: Sequence[DetectionResult],
    classifications: Sequence[ClassificationResult],
    series_uid: str,
    sop_uid: str,
    series_number: int,
    node: NodeIdentity,
    instance_number: int = 1,
    predecessors: Sequence[pydicom.Dataset] = (),
) -> pydicom.Dataset:
    """One TID 1500 Comprehensive 3D SR for everything a job found (or did not find) in ``source``.

    ``segmentations``: each segmentation model's result with the SEG built from it (None when the mask was
    empty, so there is no SEG). ``predecessors``: the SRs this one supersedes (a re-run after late arrivals),
    named in its Predecessor Documents Sequence, so viewers and IHE AIR consumers can tell which is current;
    they need only their Study/Series/SOP Instance and SOP Class UIDs."""
    if not source:
        raise ValueError("no source images")
    found = _report_findings(source, volume_geometry, segmentations, detections, classifications, sop_uid, node)
    if not found.groups:
        raise ValueError("no results to report: give a segmentation, detections or classifications")
    evidence = [*source, *(seg for _, seg in segmentations if seg is not None)]
    document = _document_kwargs(series_uid, series_number, sop_uid, instance_number, predecessors, node, found.labels)
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=_measurement_report(source[0], node, found),
        series_description=f"AI SR {_names(found.identities)}"[:64],
        **document,
    )


@dataclass
class _Found:
    """The measurement groups of a report, the models behind them and every label they name."""

    groups: list[Group] = field(default_factory=list)
    identities: list[ModelIdentity] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


def _report_findings(
    source: Sequence[pydicom.Dataset],
    volume_geometry: Volume | None,
    segmentations: Sequence[tuple[SegmentationResult, pydicom.Dataset | None]],
    detections: Sequence[DetectionResult],
    classifications: Sequence[ClassificationResult],
    sop_uid: str,
    node: NodeIdentity,
) -> _Found:
    """The full report's groups: segment volumes, detections (with their SCOORD3D) and classifications."""
    first = source[0]
    source_series_uid = str(first.SeriesInstanceUID)
    frame_uid = str(getattr(first, "FrameOfReferenceUID", "")) or (
        volume_geometry.frame_of_reference_uid if volume_geometry else ""
    )
    spacing = volume_geometry.spacing if volume_geometry is not None else None
    found = _Found()
    for segmentation, seg in segmentations:
        found.identities.append(segmentation.identity)
        found.labels += segmentation.identity.labels.values()
        found.groups += _segmentation_groups(
            segmentation, seg, spacing or spacing_from_source(source), source_series_uid, node
        )
    sop_classes = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in source}
    for result in detections:
        found.identities.append(result.identity)
        found.labels += [*result.identity.labels.values(), *(d.label for d in result.detections)]
        found.groups += _detection_groups(
            result, volume_geometry, source_series_uid, frame_uid, sop_uid, node, sop_classes
        )
    for classification in classifications:
        found.identities.append(classification.identity)
        found.labels.append(classification.label)
        found.groups.append(_classification_group(classification, source_series_uid, node))
    return found


def _measurement_report(first: pydicom.Dataset, node: NodeIdentity, found: _Found) -> hd.sr.MeasurementReport:
    """TID 1500 around the groups, observed by the node's device for the models that made them."""
    return hd.sr.MeasurementReport(
        observation_context=_observer_context(node, found.identities),
        procedure_reported=procedure_reported(str(getattr(first, "Modality", ""))),
        imaging_measurements=found.groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )


def build_findings_sr(
    source: Sequence[pydicom.Dataset],
    volume_geometry: Volume,
    *,
    detections: Sequence[DetectionResult],
    report_sop_uid: str,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    node: NodeIdentity,
    instance_number: int = 1,
    predecessors: Sequence[pydicom.Dataset] = (),
) -> pydicom.Dataset | None:
    """The findings with geometry alone, as a TID 1500 Comprehensive SR that OHIF 3.x opens and draws; None
    when there is none.

    OHIF 3.x cannot open a measurement report with any group that has no SCOORD (a segment's volume, an
    "Absent", a classification: it stops with an error), so these go in the full report (``build_sr``) and
    this one holds one TID 1501 group per detection: the ellipse on its centre slice, its area INFERRED
    FROM it (TID 300), the score, OHIF's Tracking Identifier and a Comment with the finding and its score (OHIF's
    label). Each group keeps the tracking UID of the same finding in the full report (``report_sop_uid``)."""
    if not source:
        raise ValueError("no source images")
    sop_classes = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in source}
    found = _Found()
    for result in detections:
        algorithm = sr_algorithm_identification(result.identity, node)
        for index, detection in enumerate(result.detections, start=1):
            common = _detection_common(detection, index, result.identity, algorithm, report_sop_uid)
            found.groups.append(_viewer_group(detection, volume_geometry, sop_classes, common))
            found.labels.append(detection.label)
        if result.detections:
            found.identities.append(result.identity)
    if not found.groups:
        return None
    document = _document_kwargs(series_uid, series_number, sop_uid, instance_number, predecessors, node, found.labels)
    return hd.sr.ComprehensiveSR(
        evidence=list(source),
        content=_measurement_report(source[0], node, found),
        series_description=f"AI findings {_names(found.identities)}"[:64],
        **document,
    )


def _names(identities: Sequence[ModelIdentity]) -> str:
    return " ".join(dict.fromkeys(i.name for i in identities))


def _document_kwargs(
    series_uid: str,
    series_number: int,
    sop_uid: str,
    instance_number: int,
    predecessors: Sequence[pydicom.Dataset],
    node: NodeIdentity,
    labels: Iterable[str],
) -> dict[str, Any]:
    """What the full report and the findings SR share as documents: identity, succession, flags (complete,
    FINAL, UNVERIFIED), coding schemes and equipment."""
    return {
        "series_instance_uid": series_uid,
        "series_number": series_number,
        "sop_instance_uid": sop_uid,
        "instance_number": instance_number,
        "previous_versions": list(predecessors) or None,
        "is_complete": True,
        "is_final": True,
        "is_verified": False,
        "coding_schemes": coding_scheme_identification(segment_coding(label) for label in labels),
        **equipment_kwargs(node),
    }

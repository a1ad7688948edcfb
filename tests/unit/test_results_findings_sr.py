"""The findings SR for viewers: only groups with geometry, read the way OHIF 3.x's Cornerstone adapter reads an
ellipse, and still valid TID 1500 for dciodvfy, DCMTK dsrdump and highdicom. In the full report each planar
group comes before the 3D group of the same finding."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from ai_models.types import Detection, DetectionResult
from dicom_node.results.sr import CORNERSTONE_ELLIPSE, build_findings_sr, build_sr

from .results_helpers import NODE, dciodvfy_errors, identity, make_ct_series, volume_of, write

DSRDUMP = "/usr/bin/dsrdump"
BOXES = (Detection("nodule", 0.91, (8, 28, 40), (12, 36, 48)), Detection("nodule", 0.42, (3, 5, 6), (3, 9, 6)))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    source = make_ct_series(20, 64, 64, with_pixels=False)
    geometry = volume_of(source)
    dets = [DetectionResult(identity("detection", {1: "nodule"}, name="nodule-det"), BOXES)]
    full = build_sr(
        source,
        geometry,
        segmentations=(),
        detections=dets,
        classifications=(),
        series_uid="2.25.81",
        sop_uid="2.25.82",
        series_number=9002,
        node=NODE,
    )
    findings = build_findings_sr(
        source,
        geometry,
        detections=dets,
        report_sop_uid="2.25.82",
        series_uid="2.25.83",
        sop_uid="2.25.84",
        series_number=9003,
        node=NODE,
    )
    directory = tmp_path_factory.mktemp("findings")
    return {
        "full": write(full, directory / "full.dcm"),
        "findings": write(findings, directory / "findings.dcm"),
        "geometry": geometry,
    }


def _groups(path: Path) -> list[pydicom.Dataset]:
    root = pydicom.dcmread(path).ContentSequence
    return list(next(i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "126010").ContentSequence)


def _item(group: pydicom.Dataset, code: str) -> pydicom.Dataset:
    return next(i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code)


@pytest.mark.parametrize("kind", ["full", "findings"])
def test_valid_for_dciodvfy_dsrdump_and_highdicom(built: dict, kind: str) -> None:
    assert dciodvfy_errors(built[kind]) == []
    proc = subprocess.run([DSRDUMP, "-Ee", str(built[kind])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    assert hd.sr.srread(built[kind]).content is not None


def test_every_group_is_an_ellipse_that_ohif_reads(built: dict) -> None:
    groups = _groups(built["findings"])
    assert len(groups) == len(BOXES)
    for group, box in zip(groups, BOXES, strict=True):
        assert _item(group, "112039").TextValue == CORNERSTONE_ELLIPSE  # Tracking Identifier
        nums = [i for i in group.ContentSequence if i.ValueType == "NUM"]
        area, score = nums  # the first NUM carries the geometry (OHIF: annotation and area)
        assert area.ConceptNameCodeSequence[0].CodeValue == "42798000"
        scoord = next(i for i in area.ContentSequence if i.ValueType == "SCOORD")
        assert scoord.RelationshipType == "INFERRED FROM" and scoord.GraphicType == "ELLIPSE"
        assert scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in (
            built["geometry"].sop_instance_uids
        )
        assert float(score.MeasuredValueSequence[0].NumericValue) == pytest.approx(100 * box.score)
        assert _item(group, "121106").TextValue == f"Pulmonary nodule (certainty {100 * box.score:.0f} %)"
        assert _item(group, "121071").ConceptCodeSequence[0].CodeMeaning == "Pulmonary nodule"
        assert not any(i.ValueType in ("SCOORD", "SCOORD3D") for i in group.ContentSequence)  # not TID 1410


def test_findings_share_tracking_uids_with_the_full_report_where_2d_comes_first(built: dict) -> None:
    full = [g for g in _groups(built["full"]) if any(i.ValueType in ("SCOORD", "SCOORD3D") for i in g.ContentSequence)]
    kinds = [next(i.ValueType for i in g.ContentSequence if i.ValueType in ("SCOORD", "SCOORD3D")) for g in full]
    assert kinds == ["SCOORD", "SCOORD3D"] * len(BOXES)
    uids = [_item(g, "112040").UID for g in full]
    assert [_item(g, "112040").UID for g in _groups(built["findings"])] == uids[::2] == uids[1::2]


def test_no_detections_no_findings_sr() -> None:
    source = make_ct_series(20, 64, 64, with_pixels=False)
    empty = [DetectionResult(identity("detection", {1: "nodule"}, name="nodule-det"))]
    assert (
        build_findings_sr(
            source,
            volume_of(source),
            detections=empty,
            report_sop_uid="2.25.1",
            series_uid="2.25.2",
            sop_uid="2.25.3",
            series_number=9003,
            node=NODE,
        )
        is None
    )

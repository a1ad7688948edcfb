"""A model-zoo bundle with many classes, end to end into results: the zoo's wholeBody_ct_segmentation
(SegResNet, TotalSegmentator's 104 classes; random weights, as nothing is downloaded) on a phantom series
gives a SEG with one segment per class it labelled and a TID 1500 SR covering every class, both valid to
dciodvfy and read back by highdicom, with SNOMED CT codes for the classes DICOM has concepts for."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from ai_models.bundle import load_model
from ai_models.phantom import generate_phantom
from ai_models.volume import read_series
from dicom_node.results import build_seg, build_sr
from dicom_node.synth import StudyIds, phantom_datasets, write_datasets
from tests.unit.results_helpers import NODE, dciodvfy_errors
from tests.unit.test_bundle import ZOO, _zoo_copy

pytestmark = pytest.mark.skipif(
    not (ZOO / "wholeBody_ct_segmentation").is_dir(), reason="model-zoo configs not present"
)


def test_whole_body_bundle_gives_valid_seg_and_sr(tmp_path: Path) -> None:
    model = load_model(_zoo_copy("wholeBody_ct_segmentation", tmp_path), name="wholebody")
    ph = generate_phantom(3, shape=(40, 96, 96), spacing=(2.5, 1.5, 1.5), n_nodules=0)
    volume, headers = read_series(write_datasets(phantom_datasets(ph, StudyIds.new("wb")), tmp_path / "in"))
    result = model.run(volume)
    present = sorted(int(v) for v in np.unique(result.mask) if v)
    assert len(present) > 10  # random weights label many classes: a SEG with many segments
    seg = build_seg(headers, result, series_uid="2.25.71", sop_uid="2.25.72", series_number=9001, node=NODE)
    sr = build_sr(
        headers,
        volume,
        segmentations=[(result, seg)],
        detections=(),
        classifications=(),
        series_uid="2.25.73",
        sop_uid="2.25.74",
        series_number=9002,
        node=NODE,
    )
    for ds, name in ((seg, "seg.dcm"), (sr, "sr.dcm")):
        ds.save_as(tmp_path / name, enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / name) == [], name

    back = hd.seg.segread(tmp_path / "seg.dcm")
    labels = model.identity.labels
    assert [back.get_segment_description(n).segment_label for n in back.segment_numbers] == [labels[v] for v in present]
    report = hd.sr.srread(tmp_path / "sr.dcm")
    measured = report.content.get_volumetric_roi_measurement_groups()
    not_found = report.content.get_image_measurement_groups()
    assert len(measured) == len(present) and len(measured) + len(not_found) == len(labels) == 104
    coded = [g.finding_type.scheme_designator for g in (*measured, *not_found)]
    assert coded.count("SCT") == 92

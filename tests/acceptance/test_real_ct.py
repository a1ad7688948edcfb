"""Real CT through the shipped product: storescu -> `dicom-node serve` with the shipped config.toml's models and
route -> SEG and SR at a real PACS (storescp).

The study is 40 real slices of LIDC-IDRI-0314 (tests/data/lidc_idri_0314, CC BY 3.0) around a nodule four
radiologists outlined, with the archive's quirk kept: every slice has its own FrameOfReferenceUID. The results
must be valid (dciodvfy), in one frame of reference, and right: the nodule located where the readers put it,
nothing else reported, both lungs segmented on the correct sides.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from ai_models.evaluation import consensus_mask, dice, mask_centroid_lps
from ai_models.volume import load_series
from tests.peers import (
    REPO,
    NodeProcess,
    StoreSCP,
    dciodvfy_errors,
    free_port,
    running,
    shipped_models_and_route,
    storescu,
    wait_for,
    write_config,
)

LIDC = REPO / "tests" / "data" / "lidc_idri_0314"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
pytestmark = pytest.mark.slow


def _segment_mask(seg: hd.seg.Segmentation, sop_uids: list[str], label: str) -> np.ndarray:
    (number,) = [n for n in seg.segment_numbers if seg.get_segment_description(n).segment_label == label]
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sop_uids,
        segment_numbers=[number],
        combine_segments=False,
        skip_overlap_checks=True,
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )
    return arr[..., 0] > 0


def test_real_chest_ct_gives_lungs_and_the_readers_nodule(tmp_path: Path) -> None:
    files = sorted(LIDC.glob("*.dcm"))
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    assert len({str(h.FrameOfReferenceUID) for h in headers}) == len(files)  # the quirk is in the data
    volume = load_series(files)
    readers = consensus_mask(LIDC / "nodule_annotations.json", volume, min_readers=2)
    nodule_centre = mask_centroid_lps(readers, volume)

    pacs = StoreSCP(tmp_path / "pacs").start()
    port = free_port()
    models, route = shipped_models_and_route()
    cfg = write_config(
        tmp_path / "config.toml",
        port=port,
        data_dir=tmp_path / "var",
        destinations=[{"name": "pacs", "port": pacs.port}],
        models=models,
        routes=route,
    )
    node = NodeProcess(cfg, port, tmp_path / "node.log").start()
    with running(pacs, node):
        storescu(port, files, flags=("-xv",))  # propose JPEG 2000 lossless, as the files are stored

        def arrived() -> dict[str, list[Path]] | None:
            kinds: dict[str, list[Path]] = {}
            for p in pacs.files():
                kinds.setdefault(str(dcmread(p, stop_before_pixels=True).SOPClassUID), []).append(p)
            return kinds if len(kinds.get(SEG_CLASS, [])) == 2 and len(kinds.get(SR_CLASS, [])) == 1 else None

        got = wait_for(arrived, 600, "two SEGs (lungs, nodule) and one SR at the PACS")
        log = node.log_text()
    assert "series_geometry_tolerated" in log  # the FrameOfReferenceUID per slice is said, not hidden

    for path in [*got[SEG_CLASS], *got[SR_CLASS]]:
        assert dciodvfy_errors(path) == [], path.name
    slice_frames = {str(h.FrameOfReferenceUID) for h in headers}
    sop_uids = list(volume.sop_instance_uids)
    segs = [hd.seg.segread(p) for p in got[SEG_CLASS]]
    assert {s.FrameOfReferenceUID for s in segs} == {volume.frame_of_reference_uid} <= slice_frames
    labels = {s.get_segment_description(n).segment_label: s for s in segs for n in s.segment_numbers}
    assert set(labels) == {"right lung", "left lung", "nodule"}

    lung_sides = {name: _segment_mask(labels[name], sop_uids, name) for name in ("right lung", "left lung")}
    for name, sign in (("right lung", -1.0), ("left lung", 1.0)):  # LPS: the patient's left is +x
        assert lung_sides[name].sum() > 100_000
        assert np.sign(mask_centroid_lps(lung_sides[name], volume)[0]) == sign
    nodule = _segment_mask(labels["nodule"], sop_uids, "nodule")
    assert dice(nodule, readers) >= 0.6
    assert np.linalg.norm(mask_centroid_lps(nodule, volume) - nodule_centre) <= 5.0

    sr = hd.sr.srread(got[SR_CLASS][0])
    located = [g for g in sr.content.get_volumetric_roi_measurement_groups() if g.roi is not None]
    assert len(located) == 1  # the readers' nodule, and nothing else at the shipped operating point
    centre = np.asarray(located[0].roi.graphic_data).reshape(-1, 3).mean(axis=0)
    assert np.linalg.norm(centre - nodule_centre) <= 10.0
    assert located[0].roi.frame_of_reference_uid == volume.frame_of_reference_uid
    text = json.dumps(sr.to_json_dict())
    assert "52101004" in text  # SCT Present: the classification reports the nodule

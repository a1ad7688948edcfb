"""Each SEG segment carries a Recommended Display CIELab Value: the fixed chest colours, a stable palette for
other labels, the same in the fast encoder and in highdicom's."""

from __future__ import annotations

import highdicom as hd

from ai_models.types import SegmentationResult
from dicom_node.results.colors import segment_rgb
from dicom_node.results.seg import build_seg, build_seg_highdicom

from .results_helpers import NODE, identity, lung_nodule_mask, make_ct_series

UIDS = {"series_uid": "2.25.11", "sop_uid": "2.25.12", "series_number": 901, "node": NODE}


def _colours(seg: object) -> dict[str, tuple[int, int, int]]:
    return {
        str(d.SegmentLabel): hd.color.CIELabColor.from_dicom_value(d.RecommendedDisplayCIELabValue).to_rgb()
        for d in seg.SegmentSequence
    }  # type: ignore[attr-defined]


def test_segments_carry_fixed_distinct_colours_in_both_encoders() -> None:
    source = make_ct_series(n_slices=12, rows=48, cols=48)
    mask = lung_nodule_mask((12, 48, 48))
    mask[2:4, 5:9, 20:28] = 3
    result = SegmentationResult(identity(labels={1: "lung", 2: "nodule", 3: "liver"}), mask)
    fast = build_seg(source, result, **UIDS)
    assert not isinstance(fast, hd.seg.Segmentation)  # the fast path
    reference = build_seg_highdicom(source, result, **UIDS)
    colours = _colours(fast)
    assert colours == _colours(reference)
    assert colours["lung"] == (80, 160, 255) and colours["nodule"] == (230, 40, 40)
    assert len(set(colours.values())) == 3


def test_palette_is_stable_and_tells_totalsegmentator_classes_apart() -> None:
    names = [
        "liver",
        "spleen",
        "kidney_left",
        "kidney_right",
        "aorta",
        "heart",
        "stomach",
        "pancreas",
        "lung_upper_lobe_left",
        "lung_lower_lobe_left",
        "vertebrae_L1",
        "vertebrae_L2",
        "left lung",
        "right lung",
    ]
    colours = [segment_rgb(n) for n in names]
    assert colours == [segment_rgb(n) for n in names]  # no state: the same label, the same colour
    assert len(set(colours)) == len(names)
    assert segment_rgb("Lung Nodule") == segment_rgb("nodule") and segment_rgb("Left_Lung") == segment_rgb("lung left")
    assert all(max(c) >= 200 for c in colours)  # bright enough to see over CT greys

"""The DSB 2017 nodule model: weight conversion, candidates from the map, the three runners on one map."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ai_models.bundle import load_model
from ai_models.evaluation import dice, match_detections
from ai_models.nodule_map import MAP_CACHE, NoduleMap
from ai_models.nodule_net import DSB2017NoduleNet
from ai_models.nodule_runners import CandidateSettings, candidate_boxes_source, find_candidates, paint_candidates
from ai_models.types import ClassificationResult, DetectionResult, SegmentationResult, Volume

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = {t: ROOT / "ai_models" / "bundles" / f"dsb2017_nodule_{t}" for t in ("det", "seg", "cls")}
REFERENCE = ROOT / "tests" / "unit" / "data" / "dsb2017_reference.npz"
H5 = (
    ROOT.parent
    / "shared"
    / "realdata"
    / "weights"
    / "astoc_kaggle_dsb2017_nodule_identifier"
    / "d8_2x2x2_best_weights.h5"
)


def _shipped_state() -> dict[str, torch.Tensor]:
    return torch.load(BUNDLES["det"] / "models" / "model.pt", weights_only=True)


# ---------------------------------------------------------------------------------------------- conversion


def test_shipped_weights_reproduce_the_keras_reference() -> None:
    """The numpy Keras implementation's output (true convolution on the HDF5 arrays) for a fixed slab."""
    ref = np.load(REFERENCE)
    net = DSB2017NoduleNet().eval()
    net.load_state_dict(_shipped_state(), strict=True)
    with torch.inference_mode():
        out = net(torch.from_numpy(ref["input"]))[0, 0].numpy()
    assert out.shape == ref["output"].shape == (24, 28)
    assert ref["output"].max() > 0.4 and ref["output"].min() < 0.01  # the reference is not flat
    np.testing.assert_allclose(out, ref["output"], atol=1e-4)


def test_bundles_ship_identical_weights() -> None:
    data = [(b / "models" / "model.pt").read_bytes() for b in BUNDLES.values()]
    assert data[0] == data[1] == data[2]


@pytest.mark.skipif(
    importlib.util.find_spec("h5py") is None or not H5.is_file(), reason="needs h5py and ../shared/realdata"
)
def test_conversion_from_hdf5_gives_the_shipped_weights_and_reference() -> None:
    from ai_models.convert.dsb2017 import keras_forward_numpy, read_keras_convolutions, reference_input, to_state_dict

    layers = read_keras_convolutions(H5)
    converted = to_state_dict(layers)
    shipped = _shipped_state()
    assert converted.keys() == shipped.keys()
    for key, value in converted.items():
        assert torch.equal(value, shipped[key]), key
    ref = np.load(REFERENCE)
    np.testing.assert_array_equal(reference_input(), ref["input"])
    np.testing.assert_allclose(
        keras_forward_numpy(layers, ref["input"][0].astype(np.float64)), ref["output"], atol=1e-6
    )


# ---------------------------------------------------------------------------------------------- candidates


def _volume(shape: tuple[int, int, int], spacing: tuple[float, float, float], origin=(0.0, 0.0, 0.0), flip_x=False):
    row = (-1.0, 0.0, 0.0) if flip_x else (1.0, 0.0, 0.0)
    col = (0.0, 1.0, 0.0)
    return Volume(
        array=np.full(shape, -1000.0, dtype=np.float32),
        spacing=spacing,
        origin=origin,
        row_cosines=row,
        column_cosines=col,
        normal=(0.0, 0.0, 1.0),
        sop_instance_uids=tuple(f"2.25.9.{i}" for i in range(shape[0])),
        series_instance_uid="2.25.9",
        study_instance_uid="2.25.8",
        frame_of_reference_uid="2.25.7",
    )


def _work_affine(origin_lps: tuple[float, float, float], step: float = 2.0) -> np.ndarray:
    """RAS affine, (x, y, z) index order, of a 2 mm LPS-ordered working grid starting at origin_lps."""
    affine = np.diag([-step, -step, step, 1.0])  # x -> L (RAS -x), y -> P (RAS -y), z -> S
    affine[:3, 3] = [-origin_lps[0], -origin_lps[1], origin_lps[2]]
    return affine


def test_candidates_min_size_merging_and_source_boxes() -> None:
    prob = np.zeros((20, 30, 30), dtype=np.float32)
    prob[5:8, 5:8, 5:8] = 0.95  # a 6 mm cube: kept
    prob[5:8, 5:8, 10:12] = 0.9  # 2 working voxels (4 mm) away along x: merged with the first
    prob[15, 25, 25:27] = 0.99  # 2 voxels: under min_voxels
    prob[15:17, 20:23, 20:23] = 0.8  # far from the rest: its own candidate
    nodule_map = NoduleMap(prob=prob, affine_xyz=_work_affine((0.0, 0.0, 0.0)))
    settings = CandidateSettings(threshold=0.5, min_voxels=3, merge_distance_mm=10.0)
    candidates, labels = find_candidates(nodule_map, settings)
    assert len(candidates) == 2
    first = next(c for c in candidates if c.box_min == (5, 5, 5))
    assert first.box_max == (7, 7, 11) and len(first.labels) == 2 and first.voxels == 27 + 18
    assert candidates[0].score > candidates[1].score  # the bigger, more probable one first
    separate = find_candidates(nodule_map, CandidateSettings(merge_distance_mm=3.0))[0]
    assert len(separate) == 3

    # source grid: 1 mm slices, 0.5 mm pixels, x running to the patient's right (flipped against the work grid)
    volume = _volume((40, 60, 60), (1.0, 0.5, 0.5), origin=(29.75, 0.0, 0.0), flip_x=True)
    ext = candidate_boxes_source([first], nodule_map, volume)[0]
    # working voxels z 5..7, y 5..7, x 5..11 (2 mm) span [9, 15], [9, 15], [9, 23] mm between their faces
    np.testing.assert_allclose(ext[:3], [9.0, 18.0, (29.75 - 23.0) / 0.5], atol=1e-6)
    np.testing.assert_allclose(ext[3:], [15.0, 30.0, (29.75 - 9.0) / 0.5], atol=1e-6)
    mask = paint_candidates([first], labels, nodule_map, volume, 0.5)
    idx = np.argwhere(mask)
    assert idx.min(axis=0).tolist()[0] >= 9 and idx.max(axis=0).tolist()[0] <= 16
    # the painted region is where the working voxels are: its centre maps back to the cube's centre
    centre_lps = volume.index_to_lps(idx.mean(axis=0))
    assert abs(centre_lps[2] - 12.0) < 1.0 and abs(centre_lps[1] - 12.0) < 1.0


def test_match_detections_and_dice() -> None:
    from ai_models.types import Detection

    volume = _volume((20, 20, 20), (1.0, 1.0, 1.0))
    near = Detection("nodule", 0.9, (4.0, 4.0, 4.0), (6.0, 6.0, 6.0))
    far = Detection("nodule", 0.4, (15.0, 15.0, 15.0), (16.0, 16.0, 16.0))
    m = match_detections([far, near], volume, [np.array([5.0, 5.0, 8.0])], radius_mm=10.0)
    assert m.found == (True,) and m.false_detections == 1 and m.distances_mm[0] == pytest.approx(3.0)
    assert match_detections([far, near], volume, [np.array([5.0, 5.0, 8.0])], min_score=0.5).false_detections == 0
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4, 4), bool)
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- runners


def _chest_like_volume() -> tuple[Volume, np.ndarray]:
    """A small chest-like volume: soft-tissue body, lung-density interior, a 12 mm solid nodule."""
    shape, spacing = (48, 72, 80), (1.0, 0.75, 0.75)
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((y - 27) / 24) ** 2 + ((x - 30) / 28) ** 2 <= 1.0
    lung = ((y - 27) / 19) ** 2 + ((x - 30) / 23) ** 2 <= 1.0
    hu[body] = 40.0
    hu[lung] = -850.0
    centre_mm = np.array([24.0, 25.0, 22.0])  # z, y, x from the origin
    hu[(z - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (x - centre_mm[2]) ** 2 <= 6.0**2] = 30.0
    volume = _volume(shape, spacing, origin=(-30.0, -20.0, -500.0))
    volume = Volume(**{**volume.__dict__, "array": hu})
    centre_lps = np.array([-30.0 + centre_mm[2], -20.0 + centre_mm[1], -500.0 + centre_mm[0]])
    return volume, centre_lps


def test_three_runners_share_one_map_and_find_the_nodule() -> None:
    MAP_CACHE.clear()
    models = {t: load_model(b, device="cpu") for t, b in BUNDLES.items()}
    volume, centre_lps = _chest_like_volume()
    before = MAP_CACHE.computed
    det, det_t = models["det"].run_timed(volume)
    seg, seg_t = models["seg"].run_timed(volume)
    cls, cls_t = models["cls"].run_timed(volume)
    assert MAP_CACHE.computed == before + 1
    assert det_t["forward"] > 0 and seg_t["forward"] == 0 and cls_t["forward"] == 0

    assert isinstance(det, DetectionResult) and det.detections
    best = det.detections[0]
    assert best.score >= 0.6 and best.label == "nodule"
    assert match_detections(det.detections[:1], volume, [centre_lps], radius_mm=4.0).found == (True,)
    assert all(0 <= v < n for d in det.detections for v, n in zip(d.box_max, volume.array.shape, strict=True))

    assert isinstance(seg, SegmentationResult) and seg.mask.shape == volume.array.shape
    sphere = np.zeros(volume.array.shape, dtype=bool)
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in volume.array.shape), indexing="ij")
    sphere[(zz - 24) ** 2 + ((yy * 0.75) - 25) ** 2 + ((xx * 0.75) - 22) ** 2 <= 36] = True
    assert dice(seg.mask, sphere) > 0.5

    assert isinstance(cls, ClassificationResult) and cls.present and cls.probability == pytest.approx(best.score)
    assert cls.threshold == 0.6

    # a second volume (another object) computes its own map
    other, _ = _chest_like_volume()
    models["cls"].run(other)
    assert MAP_CACHE.computed == before + 2


def test_no_body_gives_nothing() -> None:
    volume = _volume((16, 32, 32), (2.0, 2.0, 2.0))
    model = load_model(BUNDLES["det"], device="cpu")
    result = model.run(volume)
    assert isinstance(result, DetectionResult) and result.detections == ()

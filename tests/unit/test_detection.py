"""The shipped nodule detector: built without torchvision, boxes mapped back onto the source grid, and
it finds the phantom's nodules through load_model, the node's own path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ai_models.bundle import bundle_hash, load_model, make_parser
from ai_models.detection import boxes_to_source, build_retinanet, tile_cores, to_inclusive
from ai_models.phantom import Nodule, Phantom, generate_phantom, to_volume
from ai_models.types import Detection, DetectionResult
from tests.fixtures.phantom_training import train_chest_ct_det as det_train
from tests.fixtures.phantom_training.phantom_data import nodules_on_grid

BUNDLE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "phantom_bundles" / "chest_ct_det"
needs_weights = pytest.mark.skipif(
    not (BUNDLE / "models" / "model.pt").is_file(), reason="chest_ct_det weights not trained yet"
)


def test_nothing_imports_torchvision() -> None:
    """The whole detection stack (network, detector, training loss) runs in a fresh interpreter without
    torchvision being importable or imported."""
    code = (
        "import sys, importlib.util, torch\n"
        "assert importlib.util.find_spec('torchvision') is None\n"
        "from ai_models.detection import build_retinanet, configure_detector\n"
        "from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector\n"
        "from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape\n"
        "net = build_retinanet()\n"
        "anchors = AnchorGeneratorWithAnchorShape((1, 2), ((4, 4, 4), (7, 7, 7)))\n"
        "det = configure_detector(RetinaNetDetector(net, anchors))\n"
        "det.train()\n"
        "t = [{'box': torch.tensor([[4., 4., 4., 12., 12., 12.]]), 'label': torch.zeros(1, dtype=torch.long)}]\n"
        "loss = det(torch.rand(1, 1, 24, 24, 24), t)\n"
        "(loss['classification'] + loss['box_regression']).backward()\n"
        "assert 'torchvision' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_network_levels_match_anchor_config() -> None:
    parser = make_parser(BUNDLE)
    net = build_retinanet(fpn_stages=(1, 2))
    out = net(torch.zeros(1, 1, 32, 32, 32))
    # strides 4 and 8, one map per anchor-generator scale, 2 anchors x 1 class
    assert [tuple(t.shape[2:]) for t in out["classification"]] == [(8, 8, 8), (4, 4, 4)]
    assert len(parser["anchor_generator"]["feature_map_scales"]) == len(out["classification"])
    assert out["classification"][0].shape[1] == parser["network_def"]["num_anchors"]


def _flipped_volume(phantom: Phantom):  # type: ignore[no-untyped-def]
    """The same phantom stored with rows running anterior and columns running right (both flipped)."""
    return to_volume(
        phantom, origin=(120.0, 90.0, -40.0), row_cosines=(-1.0, 0.0, 0.0), column_cosines=(0.0, -1.0, 0.0)
    )


def test_boxes_map_back_to_source_grid() -> None:
    """A box drawn round a nodule on the working grid (after RAS reorientation, 2 mm resampling and the
    body crop) lands on that nodule's source voxels, for a flipped orientation too."""
    ph = generate_phantom(11, shape=(40, 96, 112), spacing=(2.5, 1.3, 1.1), n_nodules=1, min_nodule_radius_mm=5)
    pre = make_parser(BUNDLE).get_parsed_content("preprocessing")
    for volume in (to_volume(ph), _flipped_volume(ph)):
        from ai_models.bundle import volume_to_metatensor

        image = pre({"image": volume_to_metatensor(volume)})["image"]
        affine = np.asarray(image.affine, dtype=np.float64)
        centres, radii = nodules_on_grid(ph, volume, affine)
        box = np.r_[centres[0] - radii[0], centres[0] + radii[0]][None, :]
        src = boxes_to_source(box, affine, volume)[0]
        centre = (src[:3] + src[3:]) / 2
        np.testing.assert_allclose(centre, ph.nodules[0].center_zyx, atol=1e-6)
        np.testing.assert_allclose((src[3:] - src[:3]) / 2 * np.asarray(ph.spacing), ph.nodules[0].radius_mm, rtol=1e-6)
        # the scaled image is bright (nodule) at the working centre, dark (lung) just outside it
        i = np.round(centres[0]).astype(int)
        assert float(image[0, i[0], i[1], i[2]]) > 0.55
        j = np.round(centres[0] + [0, 0, radii[0][2] + 2]).astype(int)
        assert float(image[0, j[0], j[1], j[2]]) < 0.3


@pytest.mark.parametrize(
    ("size", "tile", "overlap"), [(10, 160, 32), (160, 160, 32), (161, 160, 32), (333, 160, 32), (97, 40, 12)]
)
def test_tile_cores_partition_the_axis(size: int, tile: int, overlap: int) -> None:
    """Every voxel centre belongs to exactly one tile's core, and a core point is at least overlap / 2
    from its tile's inner edges (so a nodule smaller than that is whole in the tile that reports it)."""
    tiles = tile_cores(size, tile, overlap)
    points = np.arange(size) + 0.25
    owners = np.array([[lo <= p < hi for _, lo, hi in tiles] for p in points])
    assert np.all(owners.sum(axis=1) == 1)
    for i, (start, lo, hi) in enumerate(tiles):
        inside = points[(points >= lo) & (points < hi)]
        assert start - 0.5 <= inside.min() and inside.max() <= start + tile - 0.5  # voxel i spans i ± 0.5
        if i > 0:
            assert inside.min() - start >= overlap // 2 - 1
        if i < len(tiles) - 1:
            assert start + tile - inside.max() >= overlap // 2 - 1


def test_to_inclusive_keeps_size_and_clips() -> None:
    lo, hi = to_inclusive(np.array([9.5, -3.0, 4.8]), np.array([13.5, 1.0, 5.2]), (20, 20, 20))
    np.testing.assert_allclose(hi - lo + 1, [4.0, 1.5, 1.0])  # the y box is clipped at 0; x collapses to its centre
    np.testing.assert_allclose(lo, [10.0, 0.0, 5.0])


def test_matching_rule() -> None:
    """Centre within the radius or IoU >= 0.1 hits; duplicates of a scored nodule are false positives;
    detections of nodules below the scored size are neither hits nor false positives."""
    ph = Phantom(
        hu=np.zeros((40, 40, 40), np.int16),
        labels=np.zeros((40, 40, 40), np.uint8),
        spacing=(1.0, 1.0, 1.0),
        nodules=(Nodule((10.0, 10.0, 10.0), 5.0), Nodule((30.0, 30.0, 30.0), 3.0)),
    )

    def det(c: tuple[float, float, float], half: float, score: float = 0.9) -> Detection:
        return Detection("nodule", score, tuple(v - half + 0.5 for v in c), tuple(v + half - 0.5 for v in c))  # type: ignore[arg-type]

    hit = det((12.0, 12.0, 12.0), 5.0)  # centre 3.5 mm away, inside the 5 mm radius
    assert det_train.score_study([hit], ph) == det_train.StudyScore(hits=1, scored=1, false_positives=0)
    far = det((10.0, 10.0, 19.0), 5.0)  # 9 mm away, boxes overlap with IoU 1/19
    assert det_train.score_study([far], ph).hits == 0
    wide = det((10.0, 10.0, 15.0), 9.0)  # centre outside the radius but IoU > 0.1
    assert det_train.score_study([wide], ph).hits == 1
    dup = det((10.0, 10.0, 10.0), 5.0, score=0.5)
    small = det((30.0, 30.0, 30.0), 3.0)
    nowhere = det((30.0, 5.0, 5.0), 3.0)
    assert det_train.score_study([hit, dup, small, nowhere], ph) == det_train.StudyScore(1, 1, 2)


def _test_phantoms() -> list[Phantom]:
    return [
        generate_phantom(7001, shape=(64, 192, 192), spacing=(2.5, 1.4, 1.4), n_nodules=2, min_nodule_radius_mm=4.5),
        generate_phantom(7002, shape=(80, 160, 176), spacing=(2.0, 1.6, 1.6), n_nodules=1, min_nodule_radius_mm=5.0),
        generate_phantom(7003, shape=(60, 160, 160), spacing=(2.5, 1.5, 1.5), n_nodules=0),
    ]


@needs_weights
def test_shipped_bundle_finds_nodules() -> None:
    model = load_model(BUNDLE, device="cpu")
    assert model.identity.task == "detection" and model.identity.labels == {0: "nodule"}
    found = total = fps = 0
    for i, ph in enumerate(_test_phantoms()):
        # same voxels, different storage geometry: indices on the source grid must not change
        volume = _flipped_volume(ph) if i == 1 else to_volume(ph)
        result = model.run(volume)
        assert isinstance(result, DetectionResult)
        for d in result.detections:
            assert d.label == "nodule" and 0.0 <= d.score <= 1.0
            assert all(
                0 <= lo <= hi <= n - 1 for lo, hi, n in zip(d.box_min, d.box_max, volume.array.shape, strict=True)
            )
        score = det_train.score_study(result.detections, ph)
        found, total, fps = found + score.hits, total + score.scored, fps + score.false_positives
    assert total == 3
    assert found == total
    assert fps <= 1


@needs_weights
def test_air_only_volume_has_no_detections() -> None:
    ph = generate_phantom(3, shape=(20, 64, 64), spacing=(2.0, 1.0, 1.0), n_nodules=0)
    air = Phantom(hu=np.full_like(ph.hu, -1000), labels=np.zeros_like(ph.labels), spacing=ph.spacing, nodules=())
    result = load_model(BUNDLE, device="cpu").run(to_volume(air))
    assert isinstance(result, DetectionResult) and result.detections == ()


def test_training_script_smoke(restore_torch_state: None) -> None:
    """A few steps on tiny phantoms run end to end and leave the shipped bundle untouched."""
    before = bundle_hash(BUNDLE)
    assert det_train.main(["--smoke"]) == 0
    assert bundle_hash(BUNDLE) == before


def test_training_is_seeded() -> None:
    kwargs = dict(
        seed=3, n_train=1, iterations=2, batch=1, crop_size=32, lr=1e-3, max_matrix=128, max_slices=40, log=None
    )
    a, _ = det_train.train(BUNDLE, **kwargs)  # type: ignore[arg-type]
    b, _ = det_train.train(BUNDLE, **kwargs)  # type: ignore[arg-type]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_weights
def test_tiles_find_what_one_pass_finds() -> None:
    """Small tiles (many inner edges) report the same nodules as one whole-image pass: each box comes
    from exactly one tile, none is lost or doubled at a tile boundary."""
    ph = generate_phantom(7004, shape=(48, 128, 128), spacing=(2.5, 1.6, 1.6), n_nodules=2, min_nodule_radius_mm=5.0)
    volume = to_volume(ph)
    model = load_model(BUNDLE, device="cpu")
    runner = model._runner
    runner.tile, runner.overlap = (512, 512, 512), 0  # type: ignore[attr-defined]
    whole = model.run(volume)
    runner.tile, runner.overlap = (48, 48, 48), 24  # type: ignore[attr-defined]
    tiled = model.run(volume)
    assert isinstance(whole, DetectionResult) and isinstance(tiled, DetectionResult)
    assert len(whole.detections) == len(tiled.detections)
    expected = det_train.StudyScore(hits=2, scored=2, false_positives=0)
    assert det_train.score_study(whole.detections, ph) == expected
    assert det_train.score_study(tiled.detections, ph) == expected


def test_operating_point_drops_lower_scores_and_sets_the_classification_threshold() -> None:
    from ai_models.types import ClassificationResult, Detection, DetectionResult, ModelIdentity, at_operating_point

    ident = ModelIdentity(name="m", version="1", task="detection", labels={0: "nodule"}, bundle_hash="0")
    dets = tuple(Detection("nodule", s, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)) for s in (0.9, 0.5, 0.2))
    kept = at_operating_point(DetectionResult(ident, dets), 0.5)
    assert [d.score for d in kept.detections] == [0.9, 0.5]  # type: ignore[union-attr]
    cls = at_operating_point(ClassificationResult(ident, "nodule", 0.4, threshold=0.5), 0.3)
    assert isinstance(cls, ClassificationResult) and cls.present and cls.threshold == 0.3


def test_load_model_reports_at_the_configured_operating_point() -> None:
    strict = load_model(BUNDLE, device="cpu", min_score=0.999999)
    loose = load_model(BUNDLE, device="cpu")
    assert loose.min_score is None  # the phantom bundle names no operating point
    volume = to_volume(generate_phantom(seed=3))
    assert len(strict.run(volume).detections) < len(loose.run(volume).detections)  # type: ignore[union-attr]


def test_a_segmentation_model_takes_no_min_score() -> None:
    from ai_models.types import ModelError

    seg = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "phantom_bundles" / "chest_ct_seg"
    with pytest.raises(ModelError, match="min_score applies to detection and classification"):
        load_model(seg, device="cpu", min_score=0.5)

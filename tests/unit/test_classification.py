"""The shipped nodule-presence classifier: patch tiling that misses no nodule, max aggregation, and
studies with and without nodules separated through load_model, the node's own path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ai_models.bundle import bundle_hash, load_model, make_parser
from ai_models.classification import PatchMaxInferer, patch_starts
from ai_models.phantom import Phantom, generate_phantom, to_volume
from ai_models.types import ClassificationResult
from tests.fixtures.phantom_training import train_chest_ct_cls as cls_train

BUNDLE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "phantom_bundles" / "chest_ct_cls"
needs_weights = pytest.mark.skipif(
    not (BUNDLE / "models" / "model.pt").is_file(), reason="chest_ct_cls weights not trained yet"
)


@pytest.mark.parametrize("size", [1, 39, 40, 41, 67, 68, 100, 333])
def test_patches_hold_every_nodule_whole(size: int) -> None:
    """The overlap is wider than the largest nodule (12 mm radius = 9.6 voxels at 2.5 mm), so any
    interval that short lies whole inside some patch."""
    inferer = PatchMaxInferer((40, 40, 40), overlap=0.3)
    starts = patch_starts(size, 40, inferer.steps[0])
    assert starts[0] == 0 and starts[-1] == max(0, size - 40)
    for lo in range(max(1, size - 10)):
        hi = min(lo + 10, size)
        assert any(s <= lo and hi <= s + 40 for s in starts)


def test_inferer_takes_the_max_over_patches() -> None:
    """network = per-patch maximum value: the aggregate must be the image's global maximum, wherever
    it lies (an edge patch included), and smaller images are padded with air."""
    inferer = PatchMaxInferer((8, 8, 8), overlap=0.25, sw_batch_size=3)

    def net(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).max(dim=1, keepdim=True).values

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 21, 9, 5, generator=g) * 0.5
    image[0, 0, 20, 8, 4] = 0.9
    image[1, 0, 3, 2, 1] = 0.8
    out = inferer(image, net)
    assert out.shape == (2, 1)
    np.testing.assert_allclose(out[:, 0].numpy(), [0.9, 0.8])
    assert inferer.patches(image[0]).shape[1:] == (1, 8, 8, 8)


def test_auc_and_threshold() -> None:
    assert cls_train.auc([0.9, 0.8, 0.3, 0.1], [True, True, False, False]) == 1.0
    assert cls_train.auc([0.5, 0.5], [True, False]) == 0.5
    assert cls_train.auc([0.2, 0.9, 0.6], [True, False, False]) == 0.0
    t = cls_train.best_threshold([0.9, 0.7, 0.4, 0.1], [True, True, False, False])
    assert 0.4 < t <= 0.7
    with pytest.raises(ValueError):
        cls_train.auc([0.1], [True])


def test_network_is_a_monai_densenet() -> None:
    from monai.networks.nets import DenseNet

    net = make_parser(BUNDLE).get_parsed_content("network_def")
    assert isinstance(net, DenseNet)
    assert net(torch.zeros(2, 1, 40, 40, 40)).shape == (2, 1)


def _studies() -> list[tuple[Phantom, bool]]:
    return [
        (
            generate_phantom(
                8101, shape=(60, 176, 176), spacing=(2.5, 1.5, 1.5), n_nodules=1, min_nodule_radius_mm=4.0
            ),
            True,
        ),
        (generate_phantom(8102, shape=(72, 160, 192), spacing=(2.0, 1.4, 1.4), n_nodules=2), True),
        (generate_phantom(8103, shape=(60, 176, 176), spacing=(2.5, 1.5, 1.5), n_nodules=0), False),
        (generate_phantom(8104, shape=(72, 160, 192), spacing=(2.0, 1.4, 1.4), n_nodules=0), False),
    ]


@needs_weights
def test_shipped_bundle_separates_present_from_absent() -> None:
    model = load_model(BUNDLE, device="cpu")
    assert model.identity.task == "classification" and model.identity.labels == {0: "nodule"}
    results = [(model.run(to_volume(ph)), present) for ph, present in _studies()]
    for result, present in results:
        assert isinstance(result, ClassificationResult) and result.label == "nodule"
        assert 0.0 <= result.probability <= 1.0
        assert result.present == present, (result.probability, result.threshold, present)
    lowest_present = min(r.probability for r, p in results if p)
    highest_absent = max(r.probability for r, p in results if not p)
    assert lowest_present > highest_absent


@needs_weights
def test_air_only_volume_is_absent() -> None:
    ph = generate_phantom(3, shape=(20, 64, 64), spacing=(2.0, 1.0, 1.0), n_nodules=0)
    air = Phantom(hu=np.full_like(ph.hu, -1000), labels=np.zeros_like(ph.labels), spacing=ph.spacing, nodules=())
    result = load_model(BUNDLE, device="cpu").run(to_volume(air))
    assert isinstance(result, ClassificationResult) and not result.present


def test_training_script_smoke(restore_torch_state: None) -> None:
    """A few steps on tiny phantoms run end to end and leave the shipped bundle untouched."""
    before = bundle_hash(BUNDLE)
    assert cls_train.main(["--smoke"]) == 0
    assert bundle_hash(BUNDLE) == before


def test_training_is_seeded() -> None:
    kwargs = dict(seed=5, n_train=2, iterations=2, batch=2, lr=1e-3, max_matrix=128, max_slices=40)
    a, _ = cls_train.train(BUNDLE, **kwargs)  # type: ignore[arg-type]
    b, _ = cls_train.train(BUNDLE, **kwargs)  # type: ignore[arg-type]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hard_negative_mining_keeps_the_highest_scoring_nodule_free_patches() -> None:
    from tests.fixtures.phantom_training.phantom_data import WorkingCase

    image = torch.zeros(1, 30, 30, 30)
    image[0, 20:, 20:, 20:] = 1.0  # a bright corner the "network" below scores highly
    image[0, 3:8, 3:8, 3:8] = 5.0  # the nodule: brighter still, but never in a negative
    case = WorkingCase(image, np.array([[5.0, 5.0, 5.0]]), np.array([[2.0, 2.0, 2.0]]), np.array([4.0]))

    def net(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(dim=1, keepdim=True)

    network = torch.nn.Module()
    network.forward = net  # type: ignore[method-assign]
    rng = np.random.default_rng(0)
    size = np.array([10, 10, 10])
    hard = cls_train.mine_hard_negatives(network, [case], size, rng, n=40, keep=4)
    assert len(hard) == 4 and all(h.shape == (1, 10, 10, 10) for h in hard)
    assert min(float(h.float().mean()) for h in hard) > 0.0  # all from the bright corner
    assert max(float(h.float().max()) for h in hard) == 1.0  # none holds the nodule
    for _ in range(20):  # negatives never touch the nodule
        got = cls_train.sample_patch(case, size, rng, positive=False)
        assert got is not None and got[1] == 0.0 and float(got[0].max()) < 5.0
    positive = cls_train.sample_patch(case, size, rng, positive=True)
    assert (
        positive is not None
        and positive[1] == 1.0
        and float(positive[0].sum()) == 5.0 * 125 + float(positive[0][positive[0] == 1.0].sum())
    )

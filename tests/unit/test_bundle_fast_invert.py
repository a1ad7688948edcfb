"""The segmentation runner's axis-aligned inversion gives the labels the bundle's own Invertd would (end to
end, against the bundle's own path: tests/unit/test_fastpath.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ai_models.bundle import _fast_invert_head, _fast_invert_plan, volume_to_metatensor
from ai_models.grid import axis_aligned_maps, build_plan, invert_argmax_axis_aligned
from ai_models.phantom import generate_phantom, to_volume
from tests.fixtures.phantom_training.common import eval_seed


def _affine(perm: tuple[int, int, int], scales: tuple[float, float, float], origin: tuple[float, ...]) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = 0.0
    for src_axis, world_axis in enumerate(perm):
        a[world_axis, src_axis] = scales[src_axis]
    a[:3, 3] = origin
    return a


def test_axis_aligned_maps_accepts_flips_and_permutations_and_rejects_oblique() -> None:
    working = _affine((0, 1, 2), (1.5, 1.5, 1.5), (10.0, 20.0, -30.0))
    source = _affine((1, 0, 2), (-0.75, 0.75, 2.0), (40.0, 5.0, -30.0))
    maps = axis_aligned_maps(source, working, (64, 64, 20))
    assert maps is not None
    assert [w for w, _, _ in maps] == [1, 0, 2]
    np.testing.assert_allclose([s for _, s, _ in maps], [-0.5, 0.5, 2.0 / 1.5])
    np.testing.assert_allclose([o for _, _, o in maps], [(5.0 - 20.0) / 1.5, (40.0 - 10.0) / 1.5, 0.0])
    angle = np.deg2rad(5.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    assert axis_aligned_maps(rot @ source, working, (64, 64, 20)) is None


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize(
    ("perm", "scales", "origin"),
    [
        ((0, 1, 2), (0.75, 0.75, 1.5), (0.0, 0.0, 0.0)),  # the CT case: 2x in-plane, same slices
        ((0, 1, 2), (-0.6, 0.9, 2.5), (30.0, -2.0, 1.0)),  # flip, odd ratios, source beyond the working grid
        ((2, 0, 1), (1.1, -0.8, 0.7), (25.0, 4.0, -3.0)),  # permuted axes, z partly outside
    ],
)
def test_matches_monai_resample_then_argmax(padding: str, perm, scales, origin) -> None:
    """Same labels as MONAI's SpatialResample (what Invertd runs) followed by argmax, on random scores."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    gen = torch.Generator().manual_seed(0)
    working_shape = (20, 24, 16)
    scores = torch.nn.functional.avg_pool3d(torch.rand((4, 24, 28, 20), generator=gen)[None], 5, 1)[0]
    assert tuple(scores.shape[1:]) == working_shape
    working = _affine((0, 1, 2), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0))
    source = _affine(perm, scales, origin)
    source_shape = (30, 26, 12)
    plan = build_plan(source, source_shape, working, working_shape, padding, torch.device("cpu"))
    assert plan is not None
    fast = invert_argmax_axis_aligned(scores, plan)
    resampled = SpatialResample(mode="bilinear", padding_mode=padding, align_corners=False)(
        MetaTensor(scores, affine=torch.as_tensor(working)),
        dst_affine=torch.as_tensor(source),
        spatial_size=source_shape,
    )
    reference = torch.argmax(torch.as_tensor(resampled), dim=0).numpy().astype(np.uint8).transpose(2, 1, 0)
    assert fast.shape == reference.shape
    assert (fast == reference).mean() >= 0.999  # float ties only
    assert len(np.unique(fast)) > 1


_ANGLE = np.deg2rad(12.0)


def test_plan_refuses_rotated_grids_and_unknown_operations(model) -> None:
    from monai.data import MetaTensor

    ph = generate_phantom(eval_seed(0, 913), shape=(20, 48, 48), spacing=(2.0, 1.5, 1.5), n_nodules=0)
    volume = to_volume(ph)
    runner = model._runner
    with torch.inference_mode():
        image = runner.preprocessing({runner.image_key: volume_to_metatensor(volume)})[runner.image_key]
    pred = torch.zeros((3, *image.shape[1:]))
    assert _fast_invert_plan(image, pred.shape, volume, torch.device("cpu")) is not None
    rot = torch.eye(4, dtype=torch.float64)
    rot[:2, :2] = torch.tensor([[np.cos(_ANGLE), -np.sin(_ANGLE)], [np.sin(_ANGLE), np.cos(_ANGLE)]])
    rotated = MetaTensor(image.as_tensor(), affine=rot @ image.affine)
    assert _fast_invert_plan(rotated, pred.shape, volume, torch.device("cpu")) is None
    cropped = image.clone()
    cropped.push_applied_operation({"class": "CropForeground", "extra_info": {}})
    assert _fast_invert_plan(cropped, pred.shape, volume, torch.device("cpu")) is None
    one_channel = (1, *image.shape[1:])  # one channel: rounding, not argmax
    assert _fast_invert_plan(image, one_channel, volume, torch.device("cpu")) is None
    all_codes = (256, *image.shape[1:])  # labels 0..255: MONAI's argmax fits uint8, the fast inversion does not
    assert _fast_invert_plan(image, all_codes, volume, torch.device("cpu")) is None
    assert _fast_invert_plan(image, (255, *image.shape[1:]), volume, torch.device("cpu")) is not None


def test_head_only_for_the_common_postprocessing() -> None:
    from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, KeepLargestConnectedComponentd

    pre = Compose([])

    def invert(**kw) -> Invertd:
        return Invertd(keys="pred", transform=pre, orig_keys="image", **{"nearest_interp": False, **kw})

    act = Activationsd(keys="pred", softmax=True)
    assert _fast_invert_head([act, invert()], pre, "image") is not None
    assert _fast_invert_head([act, invert(), AsDiscreted(keys="pred", argmax=True)], pre, "image") is not None
    assert _fast_invert_head([act], pre, "image") is None
    assert _fast_invert_head([act, invert(nearest_interp=True)], pre, "image") is None
    assert _fast_invert_head([act, invert()], Compose([]), "image") is None
    assert _fast_invert_head([act, invert(), AsDiscreted(keys="pred", threshold=0.5)], pre, "image") is None
    keep = KeepLargestConnectedComponentd(keys="pred", applied_labels=[1])
    assert _fast_invert_head([act, invert(), keep], pre, "image") is None
    assert _fast_invert_head([keep, act, invert()], pre, "image") is None

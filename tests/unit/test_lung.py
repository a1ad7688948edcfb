"""The lung segmentation model: the re-written network, its slice-wise volume path, the right/left split, and
the shipped bundle on real CT slices (tests/data/lidc_idri_0314, CC BY 3.0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ai_models.lung import LEFT_LUNG, RIGHT_LUNG, LungUNet2D, lung_sides

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "ai_models" / "bundles" / "lung_seg"
LIDC = REPO / "tests" / "data" / "lidc_idri_0314"


@pytest.fixture(scope="module")
def net() -> LungUNet2D:
    model = LungUNet2D()
    model.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True))
    return model.eval()


def _blob(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def test_volume_path_runs_each_axial_slice_as_a_rows_by_columns_image(net: LungUNet2D) -> None:
    """Enclosed air whose box, with its margin, covers the whole slice (so no crop): the 5D path gives, slice
    for slice, the source's 4D forward on the (rows = y, columns = x) image (BatchNorm folded: to float
    rounding), so an asymmetric slice is not seen transposed or flipped."""
    rng = np.random.default_rng(3)
    vol = rng.uniform(600, 1600, size=(512, 512, 2)).astype(np.float32)  # (x, y, z), all "body"
    vol[20:490, 25:300, :] = 24.0  # enclosed air, asymmetric in x and y
    vol[300:330, 400:500, :] = 24.0
    with torch.inference_mode():
        out = net(torch.from_numpy(vol)[None, None])[0, 0].numpy()
        for z in range(vol.shape[2]):
            image = torch.from_numpy(np.ascontiguousarray(vol[:, :, z].T))[None, None]  # (1, 1, rows, cols)
            expected = net(image)[0, 0].numpy().T
            np.testing.assert_allclose(out[:, :, z], expected, atol=1e-5)


def test_slices_without_enclosed_air_are_skipped_and_other_matrices_scaled(net: LungUNet2D) -> None:
    vol = np.full((256, 256, 3), 24.0, dtype=np.float32)  # air
    vol[:, :, 1] = 1024.0  # water: body everywhere, no lung possible
    vol[:, :, 2] = 1024.0
    vol[60:200, 50:120, 2] = 24.0  # enclosed air on slice 2
    with torch.inference_mode():
        out = net(torch.from_numpy(vol)[None, None])
    assert out.shape == (1, 1, 256, 256, 3)
    assert float(out[..., :2].abs().max()) == 0.0  # skipped: probability 0
    assert float(out[..., 2].abs().max()) > 0.0  # run, after scaling to 512x512 and back


def test_folded_batchnorm_is_the_same_function(net: LungUNet2D) -> None:
    x = torch.from_numpy(np.random.default_rng(5).uniform(0, 1600, (2, 1, 64, 48)).astype(np.float32))
    with torch.inference_mode():
        np.testing.assert_allclose(net._for_inference().forward_slices(x), net.forward_slices(x), atol=1e-5)
    assert set(net.state_dict()) == set(LungUNet2D().state_dict())  # the published weights' keys, unchanged


def test_two_separate_lungs_take_their_sides_and_islands_are_dropped() -> None:
    shape = (80, 40, 10)  # x increases toward the patient's left
    mask = _blob(shape, (20, 20, 5), 9) | _blob(shape, (60, 20, 5), 8) | _blob(shape, (40, 5, 5), 0.9)
    sides = lung_sides(mask)
    assert set(np.unique(sides[:40])) <= {0, RIGHT_LUNG} and (sides[:40] == RIGHT_LUNG).any()
    assert set(np.unique(sides[41:])) <= {0, LEFT_LUNG} and (sides[41:] == LEFT_LUNG).any()
    assert sides[40, 5, 5] == 0  # a few voxels of airway: not lung


def test_touching_lungs_are_split_at_the_junction() -> None:
    shape = (80, 40, 10)
    mask = _blob(shape, (22, 20, 5), 12) | _blob(shape, (58, 20, 5), 12)
    mask[30:50, 18:21, 4:6] = True  # a thin anterior junction joins them
    sides = lung_sides(mask)
    assert (sides[:38][mask[:38]] == RIGHT_LUNG).all()
    assert (sides[42:][mask[42:]] == LEFT_LUNG).all()


def test_a_single_lung_takes_the_side_of_the_image_it_lies_on() -> None:
    shape = (80, 40, 10)
    mask = _blob(shape, (60, 20, 5), 12)
    assert set(np.unique(lung_sides(mask))) == {0, LEFT_LUNG}
    assert set(np.unique(lung_sides(mask[::-1].copy()))) == {0, RIGHT_LUNG}


@pytest.mark.slow
def test_shipped_bundle_segments_both_lungs_of_a_real_chest_ct() -> None:
    """Real slices (each with its own FrameOfReferenceUID, made equal here: the volume reader's tolerance is
    tested in test_volume): both lungs, on the correct sides, agreeing with a classical threshold mask."""
    import pydicom

    import ai_models.volume as volume_module
    from ai_models.bundle import load_model
    from ai_models.evaluation import classical_lung_mask

    files = sorted(LIDC.glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert len({h.FrameOfReferenceUID for h in headers}) == len(files)
    volume = volume_module.load_series(files)
    result = load_model(BUNDLE, device="cpu").run(volume)
    mask = result.mask
    assert mask.shape == volume.array.shape
    for label, sign in ((RIGHT_LUNG, -1), (LEFT_LUNG, +1)):  # LPS: the patient's left is +x
        z, y, x = np.nonzero(mask == label)
        assert len(z) > 100_000
        centre = volume.index_to_lps(np.array([z.mean(), y.mean(), x.mean()]))
        assert np.sign(centre[0]) == sign
    reference = classical_lung_mask(volume)
    lungs = mask > 0
    dice = 2 * np.count_nonzero(lungs & reference) / (np.count_nonzero(lungs) + np.count_nonzero(reference))
    assert dice >= 0.95


def test_folding_ignores_hooks_others_put_on_the_network(net: LungUNet2D) -> None:
    """The worker times forward calls with hooks whose state cannot be copied (CUDA events): the folded copy
    is built from the weights, not by copying the module with its hooks."""

    class Uncopyable:
        def __deepcopy__(self, memo: dict) -> None:
            raise TypeError("cannot pickle 'Event' object")

    class Clock:  # as ForwardClock: a bound method as the hook, its state not copyable
        def __init__(self) -> None:
            self.pending = Uncopyable()

        def after(self, *_: object) -> None:
            pass

    handle = net.register_forward_hook(Clock().after)
    try:
        net.__dict__.pop("_fused", None)
        with torch.inference_mode():
            net(torch.full((1, 1, 64, 64, 1), 24.0))
    finally:
        handle.remove()

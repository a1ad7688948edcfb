"""The segmentation runner's fast paths give what the bundle's own MONAI transforms give, and step aside for
anything they do not reproduce exactly."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ai_models import grid
from ai_models.bundle import load_model, source_affine_xyz, volume_to_metatensor
from ai_models.fastpath import FastPreprocessing, FastSlidingWindow, ForwardClock, HeadActivation, head_activation
from ai_models.phantom import generate_phantom, to_volume
from tests.fixtures.phantom_training.common import dice, eval_seed
from tests.unit.test_bundle import ZOO

_ANGLE = np.deg2rad(12.0)
GEOMETRIES = [
    ((24, 70, 64), (2.5, 1.3, 1.1), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    ((30, 56, 60), (1.0, 0.7, 0.7), (-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # flipped rows, upsampled slices
    ((20, 48, 52), (2.0, 1.6, 1.6), (np.cos(_ANGLE), np.sin(_ANGLE), 0.0), (-np.sin(_ANGLE), np.cos(_ANGLE), 0.0)),
    ((40, 32, 36), (0.9, 2.1, 2.1), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),  # sagittal: axes permuted
]


def _volume(index: int, shape, spacing, row, col, nodules: int = 0):
    ph = generate_phantom(eval_seed(0, index), shape=shape, spacing=spacing, n_nodules=nodules)
    return ph, to_volume(ph, origin=(-60.0, -50.0, -120.0), row_cosines=row, column_cosines=col)


def _preprocessing(**spacing_kwargs):
    from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, Orientationd, ScaleIntensityRanged, Spacingd

    return Compose(
        [
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", **{"pixdim": (1.5, 1.5, 1.5), "mode": "bilinear", **spacing_kwargs}),
            ScaleIntensityRanged(keys="image", a_min=-1000, a_max=-400, b_min=0, b_max=1, clip=True),
            EnsureTyped(keys="image"),
        ]
    )


# ---------------------------------------------------------------------------------------------- pre-processing


def _fast_and_eager(fast: FastPreprocessing, pre, volume) -> tuple:
    """Both runs' images, checked alike: same grid, affine and dtype, values equal to float32 rounding, and
    the caller's volume left untouched."""
    before = volume.array.copy()
    with torch.inference_mode():
        got = fast({"image": volume_to_metatensor(volume)})
        want = pre({"image": volume_to_metatensor(volume)})
    assert got is not None
    assert np.array_equal(volume.array, before)
    g, w = got["image"], want["image"]
    assert g.shape == w.shape and g.dtype == w.dtype == torch.float32
    assert torch.equal(g.affine, w.affine)
    assert (g - w).abs().max().item() < 1e-5
    return g, w


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize(("shape", "spacing", "row", "col"), GEOMETRIES)
def test_preprocessing_matches_monai(padding: str, shape, spacing, row, col) -> None:
    """Same grid, affine and applied-operation trace as eager MONAI, values equal to float32 rounding; the
    caller's volume is left untouched."""
    _, volume = _volume(920, shape, spacing, row, col)
    pre = _preprocessing(padding_mode=padding)
    fast = FastPreprocessing.of(pre, "image")
    assert fast is not None
    g, w = _fast_and_eager(fast, pre, volume)
    assert g.meta.keys() == w.meta.keys()
    assert len(g.applied_operations) == len(w.applied_operations) == 2
    for a, b in zip(g.applied_operations, w.applied_operations, strict=True):
        assert a.keys() == b.keys()
        assert a["class"] == b["class"] and not a["lazy"] and tuple(a["orig_size"]) == tuple(b["orig_size"])
        assert a["extra_info"].keys() == b["extra_info"].keys()
        for key, value in a["extra_info"].items():
            other = b["extra_info"][key]
            if isinstance(value, torch.Tensor | np.ndarray):
                assert np.array_equal(np.asarray(value), np.asarray(other))
            else:
                assert value == other


def test_preprocessing_trace_inverts_like_monai() -> None:
    """Invertd maps a working-grid prediction back through the fast path's trace as through MONAI's."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    _, volume = _volume(921, *GEOMETRIES[0])
    pre = _preprocessing()
    fast = FastPreprocessing.of(pre, "image")
    assert fast is not None
    with torch.inference_mode():
        out = []
        for data in (fast({"image": volume_to_metatensor(volume)}), pre({"image": volume_to_metatensor(volume)})):
            assert data is not None
            image = data["image"]
            pred = MetaTensor(torch.cat([image, 1 - image]).as_tensor(), meta=image.meta)
            data["pred"] = pred
            out.append(Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(data)["pred"])
    assert out[0].shape == out[1].shape == (2, *volume.array.shape[::-1])
    assert (out[0] - out[1]).abs().max().item() < 1e-5


def test_scale_intensity_range_in_place_is_bit_identical() -> None:
    from monai.transforms import ScaleIntensityRange

    from ai_models.fastpath import _scale_in_place

    x = torch.randn(200_000) * 800 - 500
    for scaler in (ScaleIntensityRange(-1000, -400, 0, 1, clip=True), ScaleIntensityRange(-57, 164.5, 0.0, 1.0)):
        y = x.clone()
        _scale_in_place(y, scaler)
        assert torch.equal(y, torch.as_tensor(scaler(x.clone())))


@pytest.mark.parametrize("order", ["scale_first", "kept_tensor_between", "new_tensor_between"])
def test_scaler_not_right_after_the_resampling_matches_monai(order: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bundles put ScaleIntensityRanged elsewhere too: before Orientationd/Spacingd (MONAI's own scaler, and
    the caller's volume untouched), or after a transform that keeps the resampled tensor (scaled in place
    as a whole) or replaces it (MONAI's own again). Each gives eager MONAI's values, grid and trace."""
    from monai.transforms import Compose, CropForegroundd

    from ai_models import fastpath

    first, orientation, spacing, scale, ensure = _preprocessing().transforms
    if order == "scale_first":
        chain = [first, scale, orientation, spacing, ensure]
    elif order == "kept_tensor_between":
        chain = [first, orientation, spacing, ensure, scale]
    else:
        chain = [first, orientation, spacing, CropForegroundd(keys="image", source_key="image", margin=2), scale]
    pre = Compose(chain)
    fast = FastPreprocessing.of(pre, "image")
    assert fast is not None
    whole: list[tuple[int, ...]] = []
    real = fastpath._scale_in_place

    def spy(image: torch.Tensor, scaler) -> None:
        whole.append(tuple(image.shape))
        real(image, scaler)

    monkeypatch.setattr(fastpath, "_scale_in_place", spy)
    _, volume = _volume(924, *GEOMETRIES[1])
    g, w = _fast_and_eager(fast, pre, volume)
    assert float(g.min()) >= 0.0 and 0.5 < float(g.max()) <= 1.0  # scaled and clipped
    assert [op["class"] for op in g.applied_operations] == [op["class"] for op in w.applied_operations]
    # the in-place scaler ran on the whole resampled image only where that tensor was still the fast path's
    assert (tuple(g.shape) in whole) == (order == "kept_tensor_between")


def test_unrecognised_chains_fall_back_to_monai() -> None:
    from monai.transforms import Compose, CropForegroundd, EnsureChannelFirstd, NormalizeIntensityd, Spacingd

    assert FastPreprocessing.of(Compose([EnsureChannelFirstd(keys="image")]), "image") is None  # nothing to speed up
    assert FastPreprocessing.of(Compose(_preprocessing().transforms, lazy=True), "image") is None  # MONAI lazy
    other_key = _preprocessing()
    other_key.transforms[2].keys = ("label",)
    other_key.transforms[1].keys = ("label",)
    assert FastPreprocessing.of(other_key, "image") is None
    _, volume = _volume(922, *GEOMETRIES[0])
    with torch.inference_mode():
        for pre in (
            _preprocessing(mode="nearest"),
            _preprocessing(align_corners=True),
            _preprocessing(padding_mode="reflection"),
            _preprocessing(recompute_affine=True),
            _preprocessing(pixdim=(1.1, 1.3, 2.5)),  # the source grid already: MONAI keeps the image as is
            Compose([*_preprocessing().transforms[:3], Spacingd(keys="image", pixdim=(2.0, 2.0, 2.0))]),  # twice
        ):
            fast = FastPreprocessing.of(pre, "image")
            assert fast is not None and fast({"image": volume_to_metatensor(volume)}) is None
        # unknown transforms run as MONAI's own around the fast resampling
        mixed = Compose(
            [
                *_preprocessing().transforms[:3],
                NormalizeIntensityd(keys="image"),
                CropForegroundd(keys="image", source_key="image"),
            ]
        )
        fast = FastPreprocessing.of(mixed, "image")
        assert fast is not None
        got, want = fast({"image": volume_to_metatensor(volume)}), mixed({"image": volume_to_metatensor(volume)})
        assert got is not None and got["image"].shape == want["image"].shape
        assert torch.equal(got["image"].affine, want["image"].affine)
        assert (got["image"] - want["image"]).abs().max().item() < 1e-4
        assert [op["class"] for op in got["image"].applied_operations] == [
            op["class"] for op in want["image"].applied_operations
        ]
    # an oblique target grid (Spacingd diagonal=True) is not axis-aligned with the source
    _, oblique = _volume(923, *GEOMETRIES[2])
    fast = FastPreprocessing.of(_preprocessing(diagonal=True), "image")
    assert fast is not None
    with torch.inference_mode():
        assert fast({"image": volume_to_metatensor(oblique)}) is None


# ---------------------------------------------------------------------------------------------- sliding window


class _Net(torch.nn.Module):
    def __init__(self, out_channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 3.0


@pytest.mark.parametrize(
    ("roi", "overlap", "batch"),
    [((16, 16, 16), 0.125, 1), ((12, 20, 9), 0.5, 4), ((16, -1, 10), 0.25, 3), ((40, 24, 16), 0.0, 2)],
)
def test_sliding_window_sums_are_monai_bit_for_bit(roi, overlap: float, batch: int) -> None:
    from monai.inferers import SlidingWindowInferer

    net = _Net().eval()
    x = torch.randn(1, 1, 40, 33, 21)
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=batch, overlap=overlap)
    fast = FastSlidingWindow.of(inferer)
    assert fast is not None
    with torch.inference_mode():
        sums = fast(x, net)
        want = inferer(x, net)
    assert sums is not None
    assert torch.equal(sums.averaged(), want)
    count = sums.counts[0][:, None, None] * sums.counts[1][None, :, None] * sums.counts[2][None, None, :]
    assert torch.equal(count.min(), torch.tensor(1.0))


def test_sliding_window_steps_aside() -> None:
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    assert FastSlidingWindow.of(SlidingWindowInferer(roi_size=(8, 8, 8), mode="gaussian")) is None
    assert FastSlidingWindow.of(SimpleInferer()) is None
    fast = FastSlidingWindow.of(SlidingWindowInferer(roi_size=(64, 8, 8)))
    assert fast is not None
    x = torch.randn(1, 1, 20, 20, 20)
    with torch.inference_mode():
        assert fast(x, _Net()) is None  # MONAI pads a roi larger than the image
        fast = FastSlidingWindow.of(SlidingWindowInferer(roi_size=(8, 8, 8)))
        assert fast is not None
        assert fast(x, lambda w: (w, w)) is None  # not one tensor per window


def test_head_activation() -> None:
    from monai.transforms import Activationsd, Compose

    assert head_activation(Compose([Activationsd(keys="pred", softmax=True)])) is HeadActivation.SOFTMAX
    assert head_activation(Compose([Activationsd(keys="pred", sigmoid=True)])) is HeadActivation.SIGMOID
    assert head_activation(Compose([])) is HeadActivation.NONE
    unsupported = [
        Compose([Activationsd(keys="pred", other=torch.tanh)]),
        Compose([Activationsd(keys="pred", softmax=True, dim=1)]),
        Compose([Activationsd(keys="pred", softmax=True), Activationsd(keys="pred", sigmoid=True)]),
    ]
    assert [head_activation(h) for h in unsupported] == [HeadActivation.UNSUPPORTED] * 3
    assert [a.grid_name for a in (HeadActivation.NONE, HeadActivation.SOFTMAX, HeadActivation.SIGMOID)] == [
        None,
        "softmax",
        "sigmoid",
    ]
    with pytest.raises(ValueError):
        _ = HeadActivation.UNSUPPORTED.grid_name


# ---------------------------------------------------------------------------------------------- inversion


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", None])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_inversion_from_window_sums_matches_monai(activation: str | None, padding: str) -> None:
    """Window sums + counts + activation -> labels equal MONAI's: divide, activate, SpatialResample (float64),
    argmax."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    gen = torch.Generator().manual_seed(1)
    scores = torch.nn.functional.avg_pool3d(torch.randn((4, 26, 30, 22), generator=gen)[None] * 6, 5, 1)[0]
    counts = [torch.tensor([1.0] * 8 + [2.0] * 6 + [1.0] * (n - 14)) for n in scores.shape[1:]]
    count = counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
    sums = scores * count
    working = np.diag([1.5, 1.5, 1.5, 1.0])
    source = np.array([[-0.7, 0, 0, 30.0], [0, 0.9, 0, -2.0], [0, 0, 2.5, 1.0], [0, 0, 0, 1]])
    source_shape = (40, 36, 12)
    plan = grid.build_plan(source, source_shape, working, scores.shape[1:], padding, torch.device("cpu"))
    assert plan is not None
    fast = grid.invert_argmax_axis_aligned(sums, plan, counts=counts, activation=activation)
    probs = sums / count[None]
    probs = torch.softmax(probs, 0) if activation == "softmax" else torch.sigmoid(probs) if activation else probs
    resample = SpatialResample(mode="bilinear", padding_mode=padding, align_corners=False, dtype=torch.float64)
    image = MetaTensor(probs, affine=torch.as_tensor(working))
    resampled = resample(image, dst_affine=torch.as_tensor(source), spatial_size=source_shape)
    reference = torch.argmax(torch.as_tensor(resampled), dim=0).numpy().astype(np.uint8).transpose(2, 1, 0)
    assert np.array_equal(fast, reference)
    assert len(np.unique(fast)) > 2


# ---------------------------------------------------------------------------------------------- the runner


RUNNER_GEOMETRIES = [
    ((40, 96, 104), (2.5, 1.3, 1.3), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    ((50, 88, 80), (1.25, 1.6, 1.6), (-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    ((30, 64, 72), (2.0, 1.5, 1.5), (np.cos(_ANGLE), np.sin(_ANGLE), 0.0), (-np.sin(_ANGLE), np.cos(_ANGLE), 0.0)),
]


@pytest.mark.parametrize(("shape", "spacing", "row", "col"), RUNNER_GEOMETRIES)
def test_runner_fast_paths_equal_the_bundles_own(model, monkeypatch: pytest.MonkeyPatch, shape, spacing, row, col):
    """Fast pre-processing + window sums + reduced inversion vs MONAI's Spacingd, SlidingWindowInferer and
    Invertd end to end: the same label map, voxel for voxel (Dice >= 0.999 per label allowed for float
    rounding at boundaries; on these phantoms it is exact). The fast run inverts once, axis-aligned."""
    runner = model._runner
    assert (
        runner.fast_pre is not None
        and runner.fast_window is not None
        and runner.fast_activation is HeadActivation.SOFTMAX
    )
    assert runner.fast_head is not None
    ph, volume = _volume(930, shape, spacing, row, col, nodules=1)
    used: list[bool] = []
    original = grid.invert_argmax_axis_aligned

    def spy(scores: torch.Tensor, plan: grid.FastInvertPlan, **kwargs) -> np.ndarray:
        used.append(True)
        return original(scores, plan, **kwargs)

    monkeypatch.setattr("ai_models.bundle.invert_argmax_axis_aligned", spy)
    fast = model.run(volume).mask
    assert used == [True]
    timings = dict(runner.timings)
    with runner.fast_paths_disabled():
        reference = model.run(volume).mask
    assert used == [True]
    assert fast.shape == reference.shape == ph.labels.shape and fast.dtype == np.uint8
    for label in (1, 2):
        assert dice(fast == label, reference == label) >= 0.999
    assert np.array_equal(fast, reference)
    assert {0, 1} <= set(np.unique(fast))
    assert set(timings) == {"pre", "forward", "window", "post"} and timings["forward"] > 0


def test_runner_falls_back_when_the_geometry_is_not_its_own(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spacingd diagonal=True resamples an oblique series onto an axis-aligned grid: no fast resampling,
    no fast inversion, MONAI's transforms and Invertd give the result."""
    from monai.transforms import Spacingd

    runner = model._runner
    pre = runner.preprocessing
    spacing = next(t for t in pre.transforms if isinstance(t, Spacingd))
    monkeypatch.setattr(spacing.spacing_transform, "diagonal", True)
    _, volume = _volume(931, *RUNNER_GEOMETRIES[2])
    calls: list[str] = []
    original = grid.resample_linear
    monkeypatch.setattr("ai_models.fastpath.resample_linear", lambda *a: calls.append("pre") or original(*a))
    result = model.run(volume).mask
    assert calls == []
    with runner.fast_paths_disabled():
        assert np.array_equal(result, model.run(volume).mask)


def test_forward_clock_counts_only_the_network() -> None:
    net = _Net().eval()
    clock = ForwardClock(net, torch.device("cpu"))
    assert clock.predictor is net  # hooks, the inferer gets the module itself
    with torch.inference_mode():
        net(torch.zeros(1, 1, 8, 8, 8))
        net(torch.zeros(1, 1, 8, 8, 8))
    assert clock.calls == 2 and clock.seconds > 0
    clock.reset()
    assert clock.calls == 0 and clock.seconds == 0.0
    scripted = torch.jit.trace(_Net().eval(), torch.zeros(1, 1, 8, 8, 8))
    clock = ForwardClock(scripted, torch.device("cpu"))  # TorchScript takes no hooks: a wrapper
    assert clock.predictor is not scripted
    with torch.inference_mode():
        out = clock.predictor(torch.zeros(1, 1, 8, 8, 8))
    assert out.shape == (1, 3, 8, 8, 8) and clock.calls == 1


def test_plan_source_affine_matches_volume(model) -> None:
    """The working grid the fast path builds is the one MONAI's Spacingd builds for the same volume."""
    _, volume = _volume(932, *GEOMETRIES[1])
    runner = model._runner
    with torch.inference_mode():
        fast = runner.fast_pre({"image": volume_to_metatensor(volume)})["image"]
        monai = runner.preprocessing({"image": volume_to_metatensor(volume)})["image"]
    assert torch.equal(fast.affine, monai.affine) and fast.shape == monai.shape
    plan = grid.build_plan(
        source_affine_xyz(volume),
        volume.array.shape[::-1],
        fast.affine.numpy(),
        fast.shape[1:],
        "border",
        torch.device("cpu"),
    )
    assert plan is not None


@pytest.mark.parametrize("name", ["chest_ct_seg", "chest_ct_det", "chest_ct_cls"])
def test_shipped_bundles_preprocessing_matches_monai(seg_bundle: Path, name: str) -> None:
    """Every shipped bundle's pre-processing (the detection and classification ones crop to the body after
    resampling: that crop runs as MONAI's own) comes out as MONAI's, trace included."""
    from ai_models.bundle import make_parser

    pre = make_parser(seg_bundle.parent / name).get_parsed_content("preprocessing")
    fast = FastPreprocessing.of(pre, "image")
    assert fast is not None
    _, volume = _volume(933, *GEOMETRIES[1])
    with torch.inference_mode():
        got = fast({"image": volume_to_metatensor(volume)})
        want = pre({"image": volume_to_metatensor(volume)})
    assert got is not None
    g, w = got["image"], want["image"]
    assert g.shape == w.shape and torch.equal(g.affine, w.affine)
    assert (g - w).abs().max().item() < 1e-5
    assert [op["class"] for op in g.applied_operations] == [op["class"] for op in w.applied_operations]


def test_slab_threads_give_the_same_labels(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small slabs, several slab threads (inference mode carried into them, torch's thread count restored):
    the same label map as one pass."""
    _, volume = _volume(934, *RUNNER_GEOMETRIES[0], nodules=1)
    whole = model.run(volume).mask
    threads = torch.get_num_threads()
    monkeypatch.setattr(grid, "SLAB_BYTES", 1 << 14)
    monkeypatch.setattr(grid, "INVERT_SLAB_BYTES", 1 << 14)
    seen: list[int] = []
    original = grid.run_slabs

    def spy(work, starts, device) -> None:
        starts = list(starts)
        seen.append(len(starts))
        original(work, starts, device)

    monkeypatch.setattr(grid, "run_slabs", spy)
    torch.set_num_threads(max(2, threads))
    try:
        sliced = model.run(volume).mask
        assert torch.get_num_threads() == max(2, threads)
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 2 and min(seen) > 4  # resampling and inversion, both in many slabs
    assert np.array_equal(sliced, whole)


@pytest.mark.skipif(
    not (ZOO / "spleen_ct_segmentation").is_dir(), reason="model-zoo configs not present (../shared/bundles)"
)
def test_zoo_spleen_bundle_fast_paths_equal_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zoo's spleen config, unmodified (random weights): its windows (96³, overlap 0.5, 4 per batch),
    its 1.5 x 1.5 x 2 mm grid and its argmax after Invertd, fast paths vs its own MONAI path."""
    import shutil

    from ai_models.bundle import make_parser

    bundle = tmp_path / "spleen"
    shutil.copytree(ZOO / "spleen_ct_segmentation", bundle)
    torch.manual_seed(0)
    net = make_parser(bundle).get_parsed_content("network_def")
    (bundle / "models").mkdir()
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    spleen = load_model(bundle, name="spleen", device="cpu")
    runner = spleen._runner
    assert runner.fast_pre is not None and runner.fast_window is not None and runner.fast_head is not None
    _, volume = _volume(935, (50, 110, 100), (4.5, 1.5, 1.6), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    used: list[bool] = []
    monkeypatch.setattr(runner, "fast_window", _Spy(runner.fast_window, used))
    fast = spleen.run(volume).mask
    assert used == [True]  # the window sums went straight to the inversion
    with runner.fast_paths_disabled():
        reference = spleen.run(volume).mask
    assert np.array_equal(fast, reference)
    assert 0 < np.count_nonzero(fast) < fast.size  # random weights still label some voxels, not all


class _Spy:
    def __init__(self, inner: FastSlidingWindow, used: list[bool]) -> None:
        self.inner, self.used = inner, used

    def __call__(self, inputs: torch.Tensor, network):
        out = self.inner(inputs, network)
        self.used.append(out is not None)
        return out


class _FakeCudaEvent:
    """Stands in for torch.cuda.Event on a CPU machine: 'records' a clock reading."""

    recorded = 0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at: float | None = None

    def record(self) -> None:
        _FakeCudaEvent.recorded += 1
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        assert self.at is not None

    def elapsed_time(self, end: _FakeCudaEvent) -> float:
        assert self.at is not None and end.at is not None
        return (end.at - self.at) * 1000  # milliseconds, as CUDA reports them


def test_forward_clock_on_cuda_times_with_events_not_per_call_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sync() -> None:
        raise AssertionError("a device-wide synchronize per forward call stalls the host")

    monkeypatch.setattr(torch.cuda, "Event", _FakeCudaEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    _FakeCudaEvent.recorded = 0
    net = _Net().eval()
    clock = ForwardClock(net, torch.device("cuda"))
    with torch.inference_mode():
        for _ in range(3):
            net(torch.zeros(1, 1, 8, 8, 8))
    assert clock.calls == 3 and _FakeCudaEvent.recorded == 6
    first = clock.seconds
    assert first > 0
    assert clock.seconds == first  # read once; later reads do not count the same calls again
    clock.reset()
    assert clock.calls == 0 and clock.seconds == 0.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runner_stages_on_cuda_time_work_not_launches(seg_bundle: Path) -> None:
    """On a real GPU: the forward calls are timed by events and the window stage, measured after one
    synchronize per volume, is never negative; the mask is the CPU's up to autocast's borderline voxels."""
    from ai_models.bundle import load_model

    _, volume = _volume(923, *GEOMETRIES[0], nodules=2)
    gpu = load_model(seg_bundle, name="chest-ct-seg", device="cuda")
    result, stages = gpu.run_timed(volume)
    assert stages["forward"] > 0 and stages["window"] >= 0
    assert gpu._runner.clock.calls > 0  # type: ignore[attr-defined]
    cpu_mask = load_model(seg_bundle, name="chest-ct-seg", device="cpu").run(volume).mask
    assert np.mean(result.mask == cpu_mask) > 0.99

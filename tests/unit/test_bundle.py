"""Bundles run as the model zoo ships them: own network, transforms and inversion, result on the source grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ai_models.bundle import (
    RUNNERS,
    BundleContext,
    bundle_hash,
    load_model,
    make_parser,
    read_metadata,
    register_runner,
)
from ai_models.phantom import generate_phantom, to_volume
from ai_models.types import ClassificationResult, ModelError, SegmentationResult, Volume

ZOO = Path(__file__).resolve().parents[2] / ".." / "shared" / "bundles"  # the checkout's sibling ../shared
needs_zoo = pytest.mark.skipif(not ZOO.is_dir(), reason="model-zoo configs not present (../shared/bundles)")


def _zoo_copy(name: str, tmp_path: Path, *, torchscript: bool = False) -> Path:
    """A copy of a zoo bundle with random (seeded) weights, as a state dict or TorchScript."""
    dst = tmp_path / name
    shutil.copytree(ZOO / name, dst)
    torch.manual_seed(0)
    net = make_parser(dst).get_parsed_content("network_def").eval()
    (dst / "models").mkdir()
    if torchscript:
        torch.jit.trace(net, torch.zeros(1, 1, 32, 32, 32)).save(str(dst / "models" / "model.ts"))
    else:
        torch.save(net.state_dict(), dst / "models" / "model.pt")
    return dst


@pytest.fixture(scope="module")
def small_volume() -> Volume:
    ph = generate_phantom(1, shape=(16, 56, 64), spacing=(2.5, 1.2, 1.1), n_nodules=0)
    return to_volume(ph, origin=(-35.0, -30.0, 12.0))


def _check_mask(result: object, volume: Volume, labels: dict[int, str]) -> np.ndarray:
    assert isinstance(result, SegmentationResult)
    mask = result.mask
    assert mask.dtype == np.uint8 and mask.shape == volume.array.shape
    assert set(np.unique(mask).tolist()) <= {0, *labels}
    return mask


@needs_zoo
def test_spleen_bundle_runs_unmodified(tmp_path: Path, small_volume: Volume) -> None:
    bundle = _zoo_copy("spleen_ct_segmentation", tmp_path)
    before = {p: p.read_bytes() for p in (bundle / "configs").iterdir()}
    model = load_model(bundle, name="spleen")
    ident = model.identity
    assert ident.name == "spleen" and ident.version == "0.5.9" and ident.task == "segmentation"
    assert ident.labels == {1: "spleen"} and ident.device == "cpu"
    assert ident.bundle_hash == bundle_hash(bundle) and len(ident.bundle_hash) == 64
    mask = _check_mask(model.run(small_volume), small_volume, ident.labels)
    # random weights still give some output; a second run with the loaded network is identical
    assert np.array_equal(mask, model.run(small_volume).mask)
    assert {p: p.read_bytes() for p in (bundle / "configs").iterdir()} == before  # nothing written


@needs_zoo
@pytest.mark.slow
def test_swin_unetr_bundle_runs_unmodified(tmp_path: Path, small_volume: Volume) -> None:
    bundle = _zoo_copy("swin_unetr_btcv_segmentation", tmp_path)
    model = load_model(bundle)
    assert model.identity.name == "Swin UNETR BTCV segmentation"
    assert len(model.identity.labels) == 13 and model.identity.labels[6] == "Liver"
    _check_mask(model.run(small_volume), small_volume, model.identity.labels)


@needs_zoo
def test_torchscript_weights_match_state_dict(tmp_path: Path, small_volume: Volume) -> None:
    ts_bundle = _zoo_copy("spleen_ct_segmentation", tmp_path / "ts", torchscript=True)
    pt_bundle = _zoo_copy("spleen_ct_segmentation", tmp_path / "pt")
    assert not (ts_bundle / "models" / "model.pt").exists()
    ts_mask = _check_mask(load_model(ts_bundle).run(small_volume), small_volume, {1: "spleen"})
    pt_mask = load_model(pt_bundle).run(small_volume).mask
    assert np.mean(ts_mask == pt_mask) > 0.999
    assert bundle_hash(ts_bundle) != bundle_hash(pt_bundle)


@needs_zoo
def test_metadata_is_read_without_weights() -> None:
    info = read_metadata(ZOO / "wholeBody_ct_segmentation")
    assert info.task == "segmentation" and info.version == "0.2.5"
    assert len(info.labels) == 104 and info.labels[1] == "spleen" and 0 not in info.labels


# ----------------------------------------------------------------------------- geometry, own test bundle

_THRESHOLD_CONFIG = {
    "image_key": "image",
    "device": "$torch.device('cpu')",
    "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [1.1, 1.1, 1.6], "mode": "bilinear"},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "@image_key",
                "a_min": -1000,
                "a_max": 0,
                "b_min": 0,
                "b_max": 1,
                "clip": True,
            },
        ],
    },
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "sw_batch_size": 2},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "@image_key",
                "nearest_interp": False,
            },
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "/nonexistent"},
        ],
    },
}


def _threshold_bundle(tmp_path: Path, *, with_invert: bool = True, task: str = "segmentation") -> Path:
    """A bundle whose network thresholds intensity at -500 HU: every voxel's answer is known, so any
    misplacement by the in-memory I/O or the inversion shows up as disagreement with the input."""
    root = tmp_path / "threshold"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    config = json.loads(json.dumps(_THRESHOLD_CONFIG))
    if not with_invert:
        post = config["postprocessing"]["transforms"]
        config["postprocessing"]["transforms"] = [t for t in post if t["_target_"] != "Invertd"]
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    meta = {
        "name": "threshold",
        "version": "1.2.3",
        "task": task,
        "network_data_format": {"outputs": {"pred": {"channel_def": {"0": "background", "1": "dense"}}}},
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    state = {"weight": torch.tensor([-20.0, 20.0]).reshape(2, 1, 1, 1, 1), "bias": torch.tensor([5.0, -5.0])}
    torch.save(state, root / "models" / "model.pt")
    return root


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


@pytest.mark.parametrize(
    ("row", "col"),
    [
        ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # axial
        ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),  # coronal, flipped
        ((0.0, 0.8, 0.6), (0.0, -0.6, 0.8)),  # oblique
    ],
)
@pytest.mark.parametrize("with_invert", [True, False])
def test_mask_lands_on_source_grid(
    tmp_path: Path, row: tuple[float, float, float], col: tuple[float, float, float], with_invert: bool
) -> None:
    ph = generate_phantom(3, shape=(20, 60, 52), spacing=(2.0, 1.3, 0.8), n_nodules=0)
    volume = to_volume(ph, origin=(10.0, -50.0, 30.0), row_cosines=row, column_cosines=col)
    model = load_model(_threshold_bundle(tmp_path, with_invert=with_invert))
    assert model.identity.labels == {1: "dense"} and model.identity.version == "1.2.3"
    mask = _check_mask(model.run(volume), volume, {1: "dense"})
    expected = volume.array > -500
    dice = _dice(mask == 1, expected)
    assert dice > 0.93
    # and it is best aligned where it is: shifting by one voxel along any axis only makes it worse
    for axis in range(3):
        for shift in (-1, 1):
            assert _dice(np.roll(mask == 1, shift, axis=axis), expected) < dice


# ----------------------------------------------------------------------------- registry


def test_runner_registry_dispatches_on_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[BundleContext] = []

    def factory(ctx: BundleContext):
        seen.append(ctx)
        return lambda volume: ClassificationResult(ctx.identity, "dense", float(volume.array.mean() > -500))

    monkeypatch.setitem(RUNNERS, "classification", RUNNERS.get("classification"))
    register_runner("classification", factory)
    bundle = _threshold_bundle(tmp_path, task="dense classification")
    model = load_model(bundle)
    assert model.identity.task == "classification" and seen and seen[0].parsed("image_key") == "image"
    result = model.run(to_volume(generate_phantom(2, shape=(8, 128, 128), n_nodules=0)))
    assert isinstance(result, ClassificationResult) and result.probability in (0.0, 1.0)


def test_unknown_task_and_broken_bundles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _threshold_bundle(tmp_path, task="nodule detection")
    monkeypatch.delitem(RUNNERS, "detection", raising=False)
    with pytest.raises(ModelError, match="no runner for task 'detection'"):
        load_model(bundle)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing")
    bundle = _threshold_bundle(tmp_path / "second")
    torch.save({"weight": torch.zeros(3, 1, 1, 1, 1)}, bundle / "models" / "model.pt")
    with pytest.raises(ModelError, match="does not fit network_def"):
        load_model(bundle)
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(ModelError, match=r"neither models/model.pt"):
        load_model(bundle)


def test_labels_forms(tmp_path: Path) -> None:
    root = tmp_path / "b"
    (root / "configs").mkdir(parents=True)
    meta_path = root / "configs" / "metadata.json"
    meta_path.write_text(json.dumps({"name": "x", "version": "2", "labels": {"1": "lung", "2": "nodule"}}))
    info = read_metadata(root)
    assert info.labels == {1: "lung", 2: "nodule"} and info.task == "segmentation"
    meta_path.write_text(
        json.dumps(
            {
                "version": "3",
                "task": "Lung nodule detection",
                "network_data_format": {"outputs": {"box": {"channel_def": {"0": "nodule"}}}},
            }
        )
    )
    info = read_metadata(root)
    assert info.task == "detection" and info.labels == {0: "nodule"} and info.name == "b"


def test_hash_tracks_configs_and_weights(tmp_path: Path) -> None:
    bundle = _threshold_bundle(tmp_path)
    first = bundle_hash(bundle)
    assert bundle_hash(bundle) == first
    torch.save({"weight": torch.ones(2, 1, 1, 1, 1), "bias": torch.zeros(2)}, bundle / "models" / "model.pt")
    second = bundle_hash(bundle)
    assert second != first
    (bundle / "configs" / "metadata.json").write_text("{}")
    assert bundle_hash(bundle) != second


@needs_zoo
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_spleen_on_cuda_matches_cpu(tmp_path: Path, small_volume: Volume) -> None:
    bundle = _zoo_copy("spleen_ct_segmentation", tmp_path)
    gpu = load_model(bundle, device="cuda")
    assert gpu.identity.device == "cuda:0"
    gpu_mask = _check_mask(gpu.run(small_volume), small_volume, {1: "spleen"})
    cpu_mask = load_model(bundle, device="cpu").run(small_volume).mask
    assert np.mean(gpu_mask == cpu_mask) > 0.99  # autocast (fp16) may flip a few borderline voxels

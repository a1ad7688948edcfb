"""Test-only torch modules that fail on demand, and bundles that use them.

A bundle's ``network_def`` targets ``tests.fault_models.FaultNet`` (the node runs with the repo root as its
working directory, so ``tests.`` imports). The network is a 1x1x1 convolution that thresholds intensity
(a known, non-empty answer) unless told to fail: raise CUDA out-of-memory, raise MemoryError, raise a plain
RuntimeError, or block. With ``flag_file`` set it misbehaves only while that file exists, so a test can
"fix" the model and retry the job.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

FAILURES = ("none", "cuda_oom", "memory", "runtime", "block")


class FaultNet(torch.nn.Module):
    def __init__(self, failure: str = "none", flag_file: str = "", block_seconds: float = 120.0) -> None:
        super().__init__()
        if failure not in FAILURES:
            raise ValueError(f"failure must be one of {FAILURES}, got {failure!r}")
        self.conv = torch.nn.Conv3d(1, 2, kernel_size=1)
        self.failure = failure
        self.flag_file = flag_file
        self.block_seconds = block_seconds

    def _armed(self) -> bool:
        return self.failure != "none" and (not self.flag_file or Path(self.flag_file).exists())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._armed():
            if self.failure == "cuda_oom":
                raise torch.cuda.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.15 GiB total capacity; "
                    "70.02 GiB already allocated)"
                )
            if self.failure == "memory":
                raise MemoryError("Unable to allocate 64.0 GiB for an array with shape (1, 2, 4096, 4096, 512)")
            if self.failure == "runtime":
                raise RuntimeError("fault model: forward failed on purpose")
            deadline = time.monotonic() + self.block_seconds
            while self._armed() and time.monotonic() < deadline:  # "block": a long inference the test ends
                time.sleep(0.02)
        return self.conv(x)


def _inference_config(failure: str, flag_file: str) -> dict[str, object]:
    return {
        "image_key": "image",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "tests.fault_models.FaultNet", "failure": failure, "flag_file": flag_file},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
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
        "inferer": {"_target_": "SimpleInferer"},
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
            ],
        },
    }


def write_fault_bundle(root: Path, name: str, failure: str = "none", flag_file: Path | None = None) -> Path:
    """A MONAI bundle (model-zoo layout) around FaultNet; label 1 "dense" is everything above -750 HU."""
    bundle = root / name
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    config = _inference_config(failure, str(flag_file) if flag_file else "")
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    meta = {
        "name": name,
        "version": "0.0.1",
        "task": "segmentation",
        "network_data_format": {"outputs": {"pred": {"channel_def": {"0": "background", "1": "dense"}}}},
    }
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    state = {"conv.weight": torch.tensor([-20.0, 20.0]).reshape(2, 1, 1, 1, 1), "conv.bias": torch.tensor([5.0, -5.0])}
    torch.save(state, bundle / "models" / "model.pt")
    return bundle

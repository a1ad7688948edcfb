"""Study-level classification (is a nodule present?): a MONAI DenseNet scored patch by patch, and the
bundle runner.

A nodule is a few voxels in a volume of millions, so a whole-volume classifier would have to find it
through global pooling. Instead the bundle's inferer, ``PatchMaxInferer``, tiles the working image into
overlapping patches (overlap wider than the largest nodule, so every nodule lies whole in some patch),
runs the network on each and keeps the largest logit: the study is positive when any patch is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer
from torch import Tensor, nn

from ai_models.bundle import BundleContext, preprocess
from ai_models.fastpath import FastPreprocessing
from ai_models.types import ClassificationResult, ModelError, Volume


def patch_starts(size: int, roi: int, step: int) -> list[int]:
    """Patch starts along one axis covering [0, size): regular steps plus one flush with the end."""
    if size <= roi:
        return [0]
    starts = list(range(0, size - roi + 1, step))
    if starts[-1] != size - roi:
        starts.append(size - roi)
    return starts


class PatchMaxInferer(Inferer):
    """network(patch) -> (n, K) logits for every overlapping roi-sized patch; returns the max per class,
    (B, K). Images smaller than the roi are padded with ``cval`` (air after the bundle's scaling)."""

    def __init__(
        self, roi_size: Sequence[int], overlap: float = 0.3, sw_batch_size: int = 8, cval: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.roi_size = tuple(int(r) for r in roi_size)
        self.steps = tuple(max(1, round(r * (1.0 - overlap))) for r in self.roi_size)
        self.sw_batch_size = int(sw_batch_size)
        self.cval = float(cval)

    def patches(self, image: Tensor) -> Tensor:
        """(C, *spatial) -> (n, C, *roi) patches, padded to the roi where the image is smaller."""
        spatial = image.shape[1:]
        pad = [max(0, r - s) for s, r in zip(spatial, self.roi_size, strict=True)]
        if any(pad):
            widths: list[int] = []
            for p in reversed(pad):
                widths += [0, p]
            image = torch.nn.functional.pad(image, widths, value=self.cval)
        starts = [patch_starts(s, r, st) for s, r, st in zip(image.shape[1:], self.roi_size, self.steps, strict=True)]
        rx, ry, rz = self.roi_size
        tiles = [image[:, x : x + rx, y : y + ry, z : z + rz] for x in starts[0] for y in starts[1] for z in starts[2]]
        return torch.stack(tiles)

    def __call__(self, inputs: Tensor, network: Any, *args: Any, **kwargs: Any) -> Tensor:
        out = []
        for image in inputs:
            tiles = self.patches(image)
            logits = torch.cat(
                [network(tiles[i : i + self.sw_batch_size]) for i in range(0, len(tiles), self.sw_batch_size)]
            )
            out.append(logits.max(dim=0).values)
        return torch.stack(out)


class ClassificationRunner:
    """preprocessing -> inferer(network) -> postprocessing (sigmoid) -> probability of the finding."""

    def __init__(self, ctx: BundleContext) -> None:
        from monai.transforms import Compose

        self.ctx = ctx
        self.image_key = str(ctx.parsed("image_key", "image"))
        self.network: nn.Module = ctx.load_network()
        self.preprocessing = ctx.required("preprocessing")
        self.fast_pre = FastPreprocessing.of(self.preprocessing, self.image_key)
        self.inferer = ctx.required("inferer")
        self.postprocessing = ctx.parsed("postprocessing") or Compose([])
        self.threshold = float(ctx.parsed("threshold", 0.5))
        labels = ctx.identity.labels
        if len(labels) != 1:
            raise ModelError(f"a presence classifier needs exactly one label, the bundle has {labels}")
        ((self.channel, self.label),) = labels.items()

    def probability(self, volume: Volume) -> float:
        with torch.inference_mode():
            data = preprocess(volume, self.image_key, self.preprocessing, self.fast_pre)
            image = torch.as_tensor(data[self.image_key]).float()
            if image.numel() == 0:  # nothing but air: no body, no nodule
                return 0.0
            with self.ctx.autocast():
                logits = self.inferer(image.unsqueeze(0).to(self.ctx.device), self.network)
            data["pred"] = logits[0].float()
            pred = torch.as_tensor(self.postprocessing(data)["pred"]).reshape(-1)
        if self.channel >= pred.numel():
            raise ModelError(f"classifier gave {pred.numel()} outputs, label {self.channel} has none")
        prob = float(pred[self.channel])
        if not np.isfinite(prob) or not 0.0 <= prob <= 1.0:
            raise ModelError(f"classifier output {prob} is not a probability (postprocessing lacks a sigmoid?)")
        return prob

    def __call__(self, volume: Volume) -> ClassificationResult:
        return ClassificationResult(
            identity=self.ctx.identity, label=self.label, probability=self.probability(volume), threshold=self.threshold
        )

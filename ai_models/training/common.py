"""Helpers shared by the training scripts: phantom cases through a bundle's own preprocessing, Dice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ai_models.bundle import volume_to_metatensor
from ai_models.phantom import Phantom, to_volume

TRAIN_SEED_BASE = 1_000_000  # training case i of run seed s uses phantom seed s * TRAIN_SEED_BASE + i
EVAL_SEED_BASE = 2_000_000_000  # held-out cases: far from every training seed


def train_seed(run_seed: int, index: int) -> int:
    return run_seed * TRAIN_SEED_BASE + index


def eval_seed(run_seed: int, index: int) -> int:
    return EVAL_SEED_BASE + run_seed * 1000 + index


@dataclass(frozen=True)
class PreparedCase:
    """One phantom on the model's working grid: image as the network sees it, label map to match."""

    image: torch.Tensor  # float32 (1, X, Y, Z), after the bundle's preprocessing
    label: torch.Tensor  # uint8 (X, Y, Z)


def prepare_case(preprocessing: Any, phantom: Phantom, image_key: str = "image") -> PreparedCase:
    """Run the bundle's preprocessing on the phantom's image and carry the labels onto the same grid.

    Labels are resampled as one-hot (bilinear) onto the preprocessed image's grid and argmaxed, which
    keeps small nodules' shape better than nearest-neighbour picking.
    """
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    volume = to_volume(phantom)
    with torch.no_grad():
        data = preprocessing({image_key: volume_to_metatensor(volume)})
        image = data[image_key]
        src = volume_to_metatensor(volume)  # for the source affine
        onehot = np.stack([phantom.labels == k for k in range(3)]).astype(np.float32).transpose(0, 3, 2, 1)
        label_src = MetaTensor(torch.from_numpy(np.ascontiguousarray(onehot)), meta=dict(src.meta))
        resampled = ResampleToMatch(mode="bilinear", padding_mode="border")(label_src, img_dst=image)
        label = torch.as_tensor(resampled).argmax(dim=0).to(torch.uint8)
    return PreparedCase(image=torch.as_tensor(image).float().contiguous(), label=label.contiguous())


def dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty (nothing to score)."""
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return None
    return float(2 * np.logical_and(pred, truth).sum() / total)

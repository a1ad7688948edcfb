"""The shipped chest CT bundle (committed weights) reaches its targets on held-out phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ai_models.bundle import read_metadata
from ai_models.phantom import generate_phantom, to_volume
from tests.fixtures.phantom_training.common import dice, eval_seed


def test_metadata_and_size(seg_bundle: Path) -> None:
    info = read_metadata(seg_bundle)
    assert info.task == "segmentation" and info.labels == {1: "lung", 2: "nodule"}
    assert info.version and info.metadata["eval_metrics"]["mean_dice_lung"] >= 0.95
    assert info.metadata["eval_metrics"]["mean_dice_nodule"] >= 0.75
    assert (seg_bundle / "models" / "model.pt").stat().st_size < 5_000_000
    json.loads((seg_bundle / "configs" / "inference.json").read_text())


@pytest.mark.parametrize(
    ("index", "shape", "spacing"),
    [(900, (70, 200, 200), (2.0, 1.1, 1.1)), (901, (90, 160, 176), (1.5, 1.4, 1.4))],
)
def test_shipped_model_reaches_targets(model, index: int, shape, spacing) -> None:
    """Seeds from the held-out range: the training script never generates these phantoms."""
    ph = generate_phantom(eval_seed(0, index), shape=shape, spacing=spacing, n_nodules=2)
    result = model.run(to_volume(ph, origin=(-120.0, -110.0, -300.0)))
    assert result.identity.name == "chest-ct-seg"
    assert result.mask.shape == ph.labels.shape and result.mask.dtype == np.uint8
    assert dice(result.mask == 1, ph.labels == 1) >= 0.95
    assert dice(result.mask == 2, ph.labels == 2) >= 0.75

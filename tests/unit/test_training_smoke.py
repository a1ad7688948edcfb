"""The training script stays runnable: a few steps on tiny phantoms write weights the node can load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ai_models.bundle import load_model, read_metadata
from ai_models.phantom import generate_phantom
from tests.fixtures.phantom_training import train_chest_ct_seg
from tests.fixtures.phantom_training.common import eval_seed, prepare_case, train_seed


def test_training_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    threads = torch.get_num_threads()
    try:
        rc = train_chest_ct_seg.main(
            [
                "--out",
                str(out),
                "--steps",
                "3",
                "--train-cases",
                "2",
                "--crops-per-case",
                "2",
                "--patch",
                "32",
                "--eval-cases",
                "1",
                "--case-shape",
                "40",
                "128",
                "128",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    metrics = read_metadata(out).metadata["eval_metrics"]
    assert metrics["train_steps"] == 3 and 0.0 <= metrics["mean_dice_lung"] <= 1.0
    assert json.loads((out / "configs" / "metadata.json").read_text())["labels"] == {"1": "lung", "2": "nodule"}
    model = load_model(out)
    assert model.identity.labels == {1: "lung", 2: "nodule"}


def test_held_out_seeds_never_train() -> None:
    train = {train_seed(s, i) for s in range(3) for i in range(1000)}
    held_out = {eval_seed(s, i) for s in range(3) for i in range(100)}
    assert not train & held_out


def test_prepared_labels_follow_the_image() -> None:
    """Labels land on the preprocessed image's grid: lung voxels are the lung-dark ones there."""
    from ai_models.bundle import make_parser

    parser = make_parser(train_chest_ct_seg.SHIPPED)
    ph = generate_phantom(7, shape=(30, 128, 128), spacing=(2.0, 1.0, 1.0), n_nodules=1)
    case = prepare_case(parser.get_parsed_content("preprocessing"), ph)
    assert case.image.shape[1:] == case.label.shape
    img = case.image[0].numpy()
    lung = case.label.numpy() == 1
    # scaled [-1000, -400] -> [0, 1]: lung (-900..-750) sits near 0.17-0.42, air at 0, tissue at 1
    assert 0.1 < float(np.median(img[lung])) < 0.5
    assert float(np.median(img[case.label.numpy() == 2])) > 0.9
    assert float(np.median(img[case.label.numpy() == 0])) < 0.05 or float(np.median(img[case.label.numpy() == 0])) > 0.9

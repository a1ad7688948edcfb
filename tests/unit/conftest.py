"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

_SEG_BUNDLE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "phantom_bundles" / "chest_ct_seg"


@pytest.fixture(scope="session")
def seg_bundle() -> Path:
    """The shipped chest CT segmentation bundle's folder."""
    return _SEG_BUNDLE


@pytest.fixture(scope="session")
def model(seg_bundle: Path) -> Any:
    """The shipped segmentation bundle, loaded once on the CPU. Shared by every test that asks for it:
    change it only through monkeypatch or ``fast_paths_disabled()``, which put it back."""
    from ai_models.bundle import load_model

    return load_model(seg_bundle, name="chest-ct-seg", device="cpu")


@pytest.fixture
def restore_torch_state() -> Iterator[None]:
    """The training script sets one thread and deterministic algorithms for the process: undo that."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)

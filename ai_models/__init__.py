"""Models for dicom-node: DICOM series -> volume, MONAI bundles -> plain results.

Heavy modules (torch, MONAI) load only when their names are first used, so importing the phantom or
the volume reader stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_model": "ai_models.bundle",
    "read_metadata": "ai_models.bundle",
    "LoadedModel": "ai_models.bundle",
    "BundleInfo": "ai_models.bundle",
    "load_series": "ai_models.volume",
    "resolve_device": "ai_models.device",
    "generate_phantom": "ai_models.phantom",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ai_models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

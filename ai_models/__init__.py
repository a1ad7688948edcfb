"""Models for dicom-node: DICOM series -> volume, MONAI bundles -> plain results.

Heavy modules (torch, MONAI) load only when their names are first used, so importing the phantom or
the volume reader stays cheap.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Large tensors on transparent huge pages. PyTorch's CPU allocator asks for them only when this is set,
# and reads it once, before its first allocation: set it before torch is imported (a value the user set
# wins). A fresh 400 MB working buffer (sliding-window sums, resampled volume) then costs ~40 ms to touch
# instead of ~190 ms of 4 KiB page faults; results are unchanged.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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

"""Reference masks the real-CT benchmark scores the models against (no model involved).

- ``classical_lung_mask``: the textbook threshold + connected-component lung mask: air (< -320 HU) inside the
  body (not connected to the outside air through any axial slice's border), minus the airways (the trachea
  and main bronchi are thin, found as small parts after a slight opening), keeping the two largest parts.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ai_models.types import Volume

LUNG_HU = -320.0


def classical_lung_mask(volume: Volume) -> np.ndarray:
    """bool (z, y, x): the lungs by threshold and connected parts, airways removed."""
    air = volume.array < LUNG_HU
    inside = np.zeros_like(air)
    for z in range(air.shape[0]):  # air touching a slice's border is outside the body
        labels, _ = ndimage.label(air[z])
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        inside[z] = air[z] & ~np.isin(labels, border)
    opened = ndimage.binary_opening(inside, structure=np.ones((1, 5, 5), dtype=bool))
    labels, count = ndimage.label(opened)
    if count == 0:
        return opened
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(-sizes)[:2] + 1
    keep = [k for k in keep if sizes[k - 1] >= 0.1 * sizes.max()]
    lungs = np.isin(labels, keep)
    return ndimage.binary_fill_holes(lungs) & inside | lungs

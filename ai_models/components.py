"""Connected components of a sparse 3D mask in plain numpy (the node does not depend on scipy).

Works on the foreground voxels only: neighbour pairs are found by sorted-index lookups (13 half-neighbour
offsets for 26-connectivity, 3 for 6-connectivity) and labels are merged by min-label propagation with
pointer jumping, which converges in a few rounds. Cost grows with the foreground, not the volume, which is
what a thresholded nodule map is: a few thousand voxels in millions.
"""

from __future__ import annotations

from itertools import product

import numpy as np


def _offsets(connectivity: int) -> list[tuple[int, int, int]]:
    if connectivity == 6:
        return [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    if connectivity != 26:
        raise ValueError(f"connectivity must be 6 or 26, got {connectivity}")
    # one of each pair (d, -d): the first non-zero coordinate positive
    return [d for d in product((-1, 0, 1), repeat=3) if d > (0, 0, 0)]


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """int32 labels 1..n of the components of a boolean 3D mask (0 = background), numbered in the order of
    their first voxel in C order, and n."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D mask, got shape {mask.shape}")
    labels = np.zeros(mask.shape, dtype=np.int32)
    coords = np.argwhere(mask)
    n = len(coords)
    if n == 0:
        return labels, 0
    shape = np.asarray(mask.shape, dtype=np.int64)
    padded = shape + 2  # linear indices in a grid padded by one, so offsets never wrap
    lin = ((coords[:, 0] + 1) * padded[1] + coords[:, 1] + 1) * padded[2] + coords[:, 2] + 1  # sorted (C order)
    a_list, b_list = [], []
    for dz, dy, dx in _offsets(connectivity):
        target = lin + (dz * padded[1] + dy) * padded[2] + dx
        pos = np.searchsorted(lin, target)
        pos_c = np.minimum(pos, n - 1)
        hit = lin[pos_c] == target
        a_list.append(np.nonzero(hit)[0])
        b_list.append(pos_c[hit])
    a = np.concatenate(a_list)
    b = np.concatenate(b_list)
    parent = np.arange(n, dtype=np.int64)
    while True:
        low = np.minimum(parent[a], parent[b])
        new = parent.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = np.minimum(new, new[new])  # hook each root to the smallest label it reached
        while True:  # pointer jumping: every voxel straight to its root
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, parent):
            break
        parent = new
    roots, compact = np.unique(parent, return_inverse=True)
    labels[coords[:, 0], coords[:, 1], coords[:, 2]] = compact.astype(np.int32) + 1
    return labels, len(roots)

"""The phantom follows the CT chest convention of DESIGN.md §4 and is deterministic per seed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ai_models.phantom import LABELS, generate_phantom


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for axis in range(3):
        for shift in (1, -1):
            rolled = np.roll(mask, shift, axis=axis)
            # do not wrap around the volume edge
            edge = [slice(None)] * 3
            edge[axis] = slice(0, 1) if shift == 1 else slice(-1, None)
            rolled[tuple(edge)] = False
            out |= rolled
    return out


def test_labels_constant() -> None:
    assert LABELS == {1: "lung", 2: "nodule"}


def test_deterministic_per_seed() -> None:
    a = generate_phantom(5, shape=(40, 128, 128))
    b = generate_phantom(5, shape=(40, 128, 128))
    c = generate_phantom(6, shape=(40, 128, 128))
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert a.nodules == b.nodules and a.spacing == b.spacing
    assert not np.array_equal(a.hu, c.hu)


@pytest.mark.parametrize("seed", range(12))
def test_random_draws_follow_convention(seed: int) -> None:
    p = generate_phantom(seed, shape=(48, 144, 160) if seed % 2 else None)
    nz, ny, nx = p.hu.shape
    assert 40 <= nz <= 300 and 128 <= ny <= 512 and 128 <= nx <= 512
    assert 1.0 <= p.spacing[0] <= 3.0 and 0.5 <= p.spacing[1] <= 1.6 and 0.5 <= p.spacing[2] <= 1.6
    assert p.hu.dtype == np.int16 and p.labels.dtype == np.uint8 and p.labels.shape == p.hu.shape
    assert set(np.unique(p.labels)) <= {0, 1, 2}
    assert 0 <= len(p.nodules) <= 4
    # air outside the body, noise around -1000
    corner = p.hu[:, :4, :4].astype(np.float64)
    assert abs(corner.mean() + 1000) < 20
    lung = p.hu[p.labels == 1].astype(np.float64)
    assert -900 - 40 <= lung.mean() <= -750 + 40
    assert (p.labels == 1).any()
    # body width 60-85 % of the field of view: the body's extent along the central row (near its centre)
    inside = np.flatnonzero(p.hu[nz // 2, ny // 2].astype(np.float64) > -500)
    width = (inside[-1] - inside[0] + 1) / nx
    assert 0.55 <= width <= 0.87


@pytest.mark.parametrize("seed", range(8))
def test_nodules_inside_lung_and_labelled(seed: int) -> None:
    p = generate_phantom(seed, shape=(60, 160, 160), spacing=(2.0, 0.9, 0.9), n_nodules=3)
    assert len(p.nodules) == 3
    nodule = p.labels == 2
    # every nodule voxel's neighbours are lung or nodule: fully inside a lung
    ring = _dilate(nodule) & ~nodule
    assert np.all(p.labels[ring] == 1)
    for n in p.nodules:
        assert 3.0 <= n.radius_mm <= 12.0
        z, y, x = (round(v) for v in n.center_zyx)
        assert p.labels[z, y, x] == 2
        assert 10 - 60 <= float(p.hu[z, y, x]) <= 90 + 60
    # the labelled volume matches the spheres' volumes
    expected = sum(4 / 3 * np.pi * n.radius_mm**3 for n in p.nodules)
    voxel = float(np.prod(p.spacing))
    assert abs(nodule.sum() * voxel - expected) / expected < 0.35


def test_explicit_geometry_and_no_nodules() -> None:
    p = generate_phantom(3, shape=(40, 128, 130), spacing=(3.0, 1.2, 1.1), n_nodules=0)
    assert p.hu.shape == (40, 128, 130) and p.spacing == (3.0, 1.2, 1.1)
    assert p.nodules == () and not (p.labels == 2).any()


def test_min_radius_respected() -> None:
    p = generate_phantom(11, shape=(80, 192, 192), spacing=(1.5, 1.0, 1.0), n_nodules=2, min_nodule_radius_mm=8)
    assert all(n.radius_mm >= 8 for n in p.nodules) and len(p.nodules) == 2


def test_impossible_nodule_request_raises() -> None:
    with pytest.raises(ValueError, match="cannot fit"):
        generate_phantom(1, shape=(4, 128, 128), spacing=(1.0, 0.5, 0.5), n_nodules=2, min_nodule_radius_mm=12)


def test_large_phantom_is_fast() -> None:
    start = time.perf_counter()
    p = generate_phantom(2, shape=(300, 512, 512))
    elapsed = time.perf_counter() - start
    assert p.hu.shape == (300, 512, 512)
    assert elapsed < 10.0

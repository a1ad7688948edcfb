"""Synthetic chest CT phantoms with exact labels (DESIGN.md §4, "CT chest phantom convention").

The shipped models are trained and tested on these, and the node's demos and tests send them as DICOM, so
everything the convention names is varied per seed: matrix, slice count, spacing, body ellipse, lungs,
spine, optional table, 0-4 nodules fully inside a lung, noise. Arrays are (z, y, x) like the rest of
ai_models: y grows towards the patient's posterior (DICOM axial rows), x towards the patient's left.
Generation is vectorised and works on bounding boxes, so a 300x512x512 phantom takes a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ai_models.types import Volume, float3

LABELS: dict[int, str] = {1: "lung", 2: "nodule"}

HU_MIN, HU_MAX = -1024, 3071  # what int16 / uint16-with-intercept-1024 storage can carry

_MAX_NODULE_RADIUS_MM = 12.0
_MAX_NODULES = 4


@dataclass(frozen=True)
class Nodule:
    center_zyx: tuple[float, float, float]  # voxel indices (z, y, x)
    radius_mm: float


@dataclass(frozen=True)
class Phantom:
    hu: np.ndarray  # int16 (z, y, x) Hounsfield units, already realistic (air -1000)
    labels: np.ndarray  # uint8 (z, y, x): 0 background, 1 lung, 2 nodule
    spacing: tuple[float, float, float]  # (slice spacing z, row spacing y, column spacing x) mm
    nodules: tuple[Nodule, ...]


@dataclass(frozen=True)
class _Ellipsoid:
    """Axis-aligned ellipsoid in millimetres, (z, y, x) order."""

    center: np.ndarray  # (3,) mm
    semi: np.ndarray  # (3,) mm

    def value(self, pts_mm: np.ndarray) -> np.ndarray:
        """Implicit function: <= 1 inside."""
        return np.sum(((pts_mm - self.center) / self.semi) ** 2, axis=-1)


def _draw_shape_spacing(
    rng: np.random.Generator,
    shape: tuple[int, int, int] | None,
    spacing: tuple[float, float, float] | None,
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if shape is None:
        nz = int(rng.integers(40, 301))
        rows = int(rng.integers(128, 513))
        cols = rows if rng.random() < 0.7 else int(rng.integers(128, 513))
        shape = (nz, rows, cols)
    if spacing is None:
        dz = float(np.round(rng.uniform(1.0, 3.0), 3))
        dy = float(np.round(rng.uniform(0.5, 1.6), 4))
        dx = dy if rng.random() < 0.8 else float(np.round(rng.uniform(0.5, 1.6), 4))
        spacing = (dz, dy, dx)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive mm values, got {spacing}")
    return (int(shape[0]), int(shape[1]), int(shape[2])), (
        float(spacing[0]),
        float(spacing[1]),
        float(spacing[2]),
    )


def _axis_mm(n: int, step: float) -> np.ndarray:
    return np.arange(n, dtype=np.float32) * np.float32(step)


def _box(center: float, half: float, step: float, n: int) -> slice:
    """Index range along one axis that covers center ± half (mm), clipped to the volume."""
    lo = max(0, int(np.floor((center - half) / step)))
    hi = min(n, int(np.ceil((center + half) / step)) + 1)
    return slice(lo, max(lo, hi))


def _ellipsoid_mask(
    ell: _Ellipsoid, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Boolean mask of an ellipsoid, restricted to its bounding box (returned with the box)."""
    box = tuple(_box(float(ell.center[i]), float(ell.semi[i]), spacing[i], shape[i]) for i in range(3))
    z = (_axis_mm(shape[0], spacing[0])[box[0]] - ell.center[0]) / ell.semi[0]
    y = (_axis_mm(shape[1], spacing[1])[box[1]] - ell.center[1]) / ell.semi[1]
    x = (_axis_mm(shape[2], spacing[2])[box[2]] - ell.center[2]) / ell.semi[2]
    inplane = y[:, None] ** 2 + x[None, :] ** 2  # (y, x)
    mask = inplane[None, :, :] <= (1.0 - z**2)[:, None, None]
    return (box[0], box[1], box[2]), mask


def _sphere_points(n: int = 256) -> np.ndarray:
    """Near-uniform unit vectors (Fibonacci sphere), for containment checks."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(phi), np.sin(phi) * np.sin(theta), np.sin(phi) * np.cos(theta)], axis=-1)


_UNIT_SPHERE = _sphere_points()


def _place_nodules(
    rng: np.random.Generator,
    lungs: list[_Ellipsoid],
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    n_nodules: int,
    min_radius: float,
    strict: bool,
) -> list[tuple[np.ndarray, float]]:
    """Centres (mm) and radii of nodules that lie fully inside one lung and inside the volume."""
    extent = np.array([(shape[i] - 1) * spacing[i] for i in range(3)])
    # one voxel of margin: every voxel of the nodule and its direct neighbours lie inside the lung
    margin = float(max(spacing))
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(n_nodules):
        done = False
        for _attempt in range(200):
            lung = lungs[int(rng.integers(len(lungs)))]
            # the largest sphere that fits in the lung (within the volume) bounds the radius
            room = min(float(np.min(lung.semi)) * 0.8, float(np.min(extent)) / 2 - margin)
            r_hi = min(_MAX_NODULE_RADIUS_MM, room - margin)
            if r_hi < min_radius:
                continue
            r = float(rng.uniform(min_radius, r_hi))
            u = rng.normal(size=3)
            u /= np.linalg.norm(u)
            c = lung.center + u * rng.random() ** (1 / 3) * np.maximum(lung.semi - r - margin, 0.0)
            surface = c + _UNIT_SPHERE * (r + margin)
            if np.any(lung.value(surface) > 1.0):
                continue
            if np.any(surface < 0) or np.any(surface > extent):
                continue
            if any(np.linalg.norm(c - pc) < r + pr + 2 * margin + 1.0 for pc, pr in placed):
                continue
            placed.append((c, r))
            done = True
            break
        if not done:
            if strict:
                raise ValueError(f"cannot fit {n_nodules} nodules of radius >= {min_radius} mm in this phantom's lungs")
            break
    return placed


def generate_phantom(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    n_nodules: int | None = None,
    min_nodule_radius_mm: float = 3.0,
) -> Phantom:
    """A chest CT phantom, deterministic per seed; None draws the value from the convention's ranges."""
    if n_nodules is not None and not 0 <= n_nodules <= _MAX_NODULES:
        raise ValueError(f"n_nodules must be 0..{_MAX_NODULES}, got {n_nodules}")
    if not 0 < min_nodule_radius_mm <= _MAX_NODULE_RADIUS_MM:
        raise ValueError(f"min_nodule_radius_mm must be in (0, {_MAX_NODULE_RADIUS_MM}]")
    rng = np.random.default_rng(seed)
    shape, spacing = _draw_shape_spacing(rng, shape, spacing)
    nz, ny, nx = shape
    dz, dy, dx = spacing
    fov_y, fov_x, len_z = ny * dy, nx * dx, nz * dz

    # body: elliptical cross-section, 60-85 % of the field of view wide, a bit flatter front to back
    body_a = rng.uniform(0.60, 0.85) * fov_x / 2  # half width (x)
    body_b = min(body_a * rng.uniform(0.6, 0.85), 0.46 * fov_y)  # half depth (y)
    body_cx = fov_x / 2 + rng.uniform(-0.03, 0.03) * fov_x
    body_cy = fov_y / 2 + rng.uniform(-0.06, 0.02) * fov_y
    y = _axis_mm(ny, dy)
    x = _axis_mm(nx, dx)
    body2d = ((y[:, None] - body_cy) / body_b) ** 2 + ((x[None, :] - body_cx) / body_a) ** 2 <= 1.0

    hu = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    hu[:, body2d] = rng.uniform(0.0, 80.0)

    # table: a slab under the (supine) patient's back, posterior = larger y
    table_top = body_cy + body_b + rng.uniform(1.0, 15.0)
    if rng.random() < 0.6 and table_top < fov_y - 4 * dy:
        thick = rng.uniform(5.0, 25.0)
        rows = (y >= table_top) & (y <= table_top + thick)
        cols = np.abs(x - body_cx) <= rng.uniform(0.8, 1.1) * body_a
        hu[:, rows[:, None] & cols[None, :]] = rng.uniform(-300.0, 200.0)

    # spine: posterior cylinder in the midline (constant along z)
    spine_r = rng.uniform(0.06, 0.09) * body_a
    spine_cy = body_cy + body_b - spine_r - rng.uniform(0.08, 0.18) * body_b
    spine2d = ((y[:, None] - spine_cy) ** 2 + (x[None, :] - body_cx) ** 2) <= spine_r**2
    hu[:, spine2d] = rng.uniform(300.0, 1000.0)

    # lungs: one ellipsoid either side of the midline, clear of the spine and inside the body
    lungs: list[_Ellipsoid] = []
    for side in (-1.0, 1.0):
        semi_x = rng.uniform(0.26, 0.34) * body_a
        semi_y = rng.uniform(0.55, 0.72) * body_b
        semi_z = rng.uniform(0.35, 0.6) * len_z
        cx = body_cx + side * (0.12 * body_a + semi_x) * rng.uniform(1.0, 1.08)
        cy = body_cy + rng.uniform(-0.12, 0.06) * body_b
        cz = len_z / 2 + rng.uniform(-0.1, 0.1) * len_z
        ell = _Ellipsoid(np.array([cz, cy, cx]), np.array([semi_z, semi_y, semi_x]))
        box, mask = _ellipsoid_mask(ell, shape, spacing)
        hu[box][mask] = rng.uniform(-900.0, -750.0)
        labels[box][mask] = 1
        lungs.append(ell)

    strict = n_nodules is not None
    count = int(rng.integers(0, _MAX_NODULES + 1)) if n_nodules is None else n_nodules
    placed = _place_nodules(rng, lungs, shape, spacing, count, min_nodule_radius_mm, strict)
    nodules: list[Nodule] = []
    for c, r in placed:
        ell = _Ellipsoid(c, np.array([r, r, r]))
        box, mask = _ellipsoid_mask(ell, shape, spacing)
        hu[box][mask] = rng.uniform(10.0, 90.0)
        labels[box][mask] = 2
        nodules.append(
            Nodule(
                center_zyx=(float(c[0] / dz), float(c[1] / dy), float(c[2] / dx)),
                radius_mm=float(r),
            )
        )

    sigma = rng.uniform(5.0, 25.0)
    noise = rng.standard_normal(size=shape, dtype=np.float32)
    noise *= np.float32(sigma)
    hu += noise
    del noise
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    hu_i16 = np.rint(hu, out=hu).astype(np.int16)
    return Phantom(hu=hu_i16, labels=labels, spacing=spacing, nodules=tuple(nodules))


def to_volume(
    phantom: Phantom,
    *,
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    row_cosines: tuple[float, float, float] = (1.0, 0.0, 0.0),
    column_cosines: tuple[float, float, float] = (0.0, 1.0, 0.0),
    uid_prefix: str = "2.25.1",
) -> Volume:
    """The Volume load_series would return for this phantom written as an axial series (no DICOM
    round trip), so training and tests see exactly what the node sees."""
    normal = float3(np.cross(row_cosines, column_cosines))
    nz = phantom.hu.shape[0]
    return Volume(
        array=phantom.hu.astype(np.float32),
        spacing=phantom.spacing,
        origin=origin,
        row_cosines=row_cosines,
        column_cosines=column_cosines,
        normal=normal,
        sop_instance_uids=tuple(f"{uid_prefix}.3.{i + 1}" for i in range(nz)),
        series_instance_uid=f"{uid_prefix}.2",
        study_instance_uid=f"{uid_prefix}.1",
        frame_of_reference_uid=f"{uid_prefix}.4",
    )

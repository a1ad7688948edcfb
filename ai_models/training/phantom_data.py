"""Phantoms on a bundle's working grid with their nodules as spheres, for the detection and
classification training scripts.

Nodule centres are carried from source voxel indices to working-grid indices through the affines the
bundle's preprocessing leaves on the MetaTensor (source index -> world -> working index), so whatever
orientation, resampling and cropping the preprocessing does, the targets follow it exactly.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai_models.bundle import source_affine_xyz, volume_to_metatensor
from ai_models.phantom import Phantom, generate_phantom, to_volume
from ai_models.types import Volume


@dataclass(frozen=True)
class WorkingCase:
    """One phantom as the network sees it, plus its nodules on that grid."""

    image: torch.Tensor  # float32 (1, X, Y, Z) after the bundle's preprocessing
    centres: np.ndarray  # (N, 3) nodule centres, working (x, y, z) voxel-centre indices
    radii: np.ndarray  # (N, 3) nodule radii in working voxels per axis
    radii_mm: np.ndarray  # (N,)


def nodules_on_grid(phantom: Phantom, volume: Volume, work_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) working (x, y, z) centres and (N, 3) per-axis radii in working voxels."""
    if not phantom.nodules:
        return np.zeros((0, 3)), np.zeros((0, 3))
    src_xyz = np.array([n.center_zyx[::-1] for n in phantom.nodules], dtype=np.float64)
    to_work = np.linalg.inv(np.asarray(work_affine, dtype=np.float64)) @ source_affine_xyz(volume)
    centres = (np.c_[src_xyz, np.ones(len(src_xyz))] @ to_work.T)[:, :3]
    spacing = np.linalg.norm(np.asarray(work_affine, dtype=np.float64)[:3, :3], axis=0)
    radii = np.array([n.radius_mm for n in phantom.nodules])[:, None] / spacing[None, :]
    return centres, radii


def prepare_working_case(preprocessing: Any, phantom: Phantom, image_key: str = "image") -> WorkingCase:
    volume = to_volume(phantom)
    with torch.no_grad():
        image = preprocessing({image_key: volume_to_metatensor(volume)})[image_key]
    affine = np.asarray(torch.as_tensor(image.affine), dtype=np.float64)
    centres, radii = nodules_on_grid(phantom, volume, affine)
    return WorkingCase(
        image=torch.as_tensor(image).float().contiguous(),
        centres=centres,
        radii=radii,
        radii_mm=np.array([n.radius_mm for n in phantom.nodules], dtype=np.float64),
    )


def draw_training_phantom(
    seed: int, *, max_matrix: int | None = None, max_slices: int | None = None, n_nodules: int | None = None
) -> Phantom:
    """A phantom from the convention's ranges; optional caps keep smoke tests small."""
    rng = np.random.default_rng(seed + 7)
    shape = None
    if max_matrix is not None or max_slices is not None:
        mm = max_matrix or 512
        ms = max_slices or 300
        rows = int(rng.integers(min(128, mm), mm + 1))
        shape = (int(rng.integers(min(40, ms), ms + 1)), rows, rows)
    return generate_phantom(seed, shape=shape, n_nodules=n_nodules)


def build_pool(
    preprocessing: Any,
    seeds: Iterable[int],
    *,
    max_matrix: int | None = None,
    max_slices: int | None = None,
    log: Any = None,
) -> list[WorkingCase]:
    start = time.perf_counter()
    cases = [
        prepare_working_case(preprocessing, draw_training_phantom(s, max_matrix=max_matrix, max_slices=max_slices))
        for s in seeds
    ]
    if log is not None:
        log(f"prepared {len(cases)} phantoms in {time.perf_counter() - start:.1f} s")
    return cases


def crop_start(
    shape: Sequence[int],
    size: Sequence[int],
    rng: np.random.Generator,
    around: np.ndarray | None,
    overhang: int = 0,
) -> np.ndarray:
    """Start of a crop of `size` in a volume of `shape` (may be negative / overhang: caller pads).

    around: a point to keep inside, at a random offset. Otherwise the crop lies anywhere, reaching up to
    `overhang` voxels past the volume, so the volume's own edges (where inference pads) are seen too."""
    shape_a, size_a = np.asarray(shape), np.asarray(size)
    if around is None:
        hi = np.maximum(shape_a - size_a, 0) + overhang
        return np.array([int(rng.integers(-overhang, h + 1)) for h in hi])
    margin = np.minimum(size_a // 4, 8)
    lo = np.floor(around).astype(int) - (size_a - margin) + 1
    hi = np.floor(around).astype(int) - margin
    return np.array([int(rng.integers(a, max(a, b) + 1)) for a, b in zip(lo, hi, strict=True)])


def crop(image: torch.Tensor, start: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """(1, X, Y, Z) crop at start of size, zero padded (air after scaling) where it leaves the volume."""
    out = torch.zeros((image.shape[0], *size), dtype=image.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + np.asarray(size), image.shape[1:])
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[:, dst_lo[0] : dst_hi[0], dst_lo[1] : dst_hi[1], dst_lo[2] : dst_hi[2]] = image[
        :, src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]
    ]
    return out


def update_json(path: Path, update: dict[str, Any]) -> None:
    """Merge ``update`` into a bundle's JSON config (training records thresholds and eval_metrics)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(update)
    path.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")


def smoke_bundle(bundle: Path, prefix: str) -> Path:
    """A temporary copy of a bundle's configs with an empty models/, so a smoke run never touches the weights."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.copytree(bundle / "configs", tmp / "configs")
    (tmp / "models").mkdir()
    return tmp

"""The DSB 2017 nodule identifier's 3D probability map of a volume, computed once and shared.

The bundle's preprocessing (MONAI transforms in its inference.json) puts the volume on the model's training
grid: LPS-ordered axes (as the LUNA16 .mhd arrays it was trained on), 2 mm isotropic, HU clipped to
[-1000, 400], scaled to [0, 1] and shifted by -0.028. The map is then built slice by slice: the 2 mm slice z
is predicted from the slab z-4 ... z+3, whose slice 4 it is (training used ``masks[:, :, dim // 2]`` as the
slab's target, and the source's inference code ``zsel = dim // 2``); the slab is padded past the volume's
ends by repeating the end slice, so the first and last 8 mm are predicted too. The network runs only on the
box around the air the body encloses (the lungs; chest wall, neck and abdomen below add time, never lung
nodules), with a margin of tissue, padded with air to a multiple of 4.

The detection, segmentation and classification runners each hold this model; a route running all three
pays for the map once: ``shared_map`` keeps the last few maps keyed by the weights' digest, the map settings
and the very Volume object the worker passes to each model of a job.
"""

from __future__ import annotations

import hashlib
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai_models.bundle import BundleContext, preprocess
from ai_models.fastpath import FastPreprocessing
from ai_models.nodule_net import CENTRE, DIVISOR, SLAB
from ai_models.types import ModelError, Volume

AIR = -0.028  # -1000 HU after the model's scaling


@dataclass(frozen=True)
class MapSettings:
    """How the map is built (the bundle's inference.json ``map`` item); part of the cache key."""

    body_threshold: float = 0.33  # scaled value above which a voxel is body (about -500 HU)
    margin: int = 4  # working voxels of tissue kept around the enclosed air's box
    min_enclosed_air_voxels: int = 12  # fewer enclosed air voxels on a 2 mm slice than this (48 mm^2): no lung
    batch: int = 4  # slabs per forward pass: bounds memory (about 150 MB per slab at 200x200)
    z_padding: str = "replicate"  # "replicate": predict the end slices from slabs padded by repetition; "none"

    @classmethod
    def of(cls, raw: Any) -> MapSettings:
        raw = dict(raw or {})
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ModelError(f"unknown map settings {sorted(unknown)}")
        settings = cls(**raw)
        if settings.z_padding not in ("replicate", "none") or settings.batch < 1 or settings.margin < 0:
            raise ModelError(f"map settings {settings} are not usable")
        return settings


@dataclass(frozen=True)
class NoduleMap:
    """Nodule probability on the working grid, (z, y, x) float32, with the grid's 4x4 RAS affine in MONAI's
    (x, y, z) index order (as ``detection.boxes_to_source`` takes it). ``timings``: seconds per stage."""

    prob: np.ndarray
    affine_xyz: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def _lung_box(image: torch.Tensor, settings: MapSettings) -> tuple[slice, slice, slice] | None:
    """(z, y, x) slices of the box around the air the body encloses (the lungs, with airways and any bowel gas
    in view), with ``margin`` working voxels of tissue in y and x and a slab's reach in z, or None when no
    slice encloses air. Nodules of the lung lie in it; outside it the map is 0 (chest wall, neck, abdomen)."""
    from ai_models.lung import enclosed_air_boxes

    body = (image > settings.body_threshold).cpu().numpy()
    boxes = enclosed_air_boxes(body, settings.min_enclosed_air_voxels)
    zs = [z for z, box in enumerate(boxes) if box is not None]
    if not zs:
        return None
    m = settings.margin
    nz, ny, nx = image.shape
    inside = [box for box in boxes if box is not None]
    return (
        slice(max(0, zs[0] - CENTRE), min(nz, zs[-1] + 1 + CENTRE)),
        slice(max(0, min(b[0] for b in inside) - m), min(ny, max(b[1] for b in inside) + m)),
        slice(max(0, min(b[2] for b in inside) - m), min(nx, max(b[3] for b in inside) + m)),
    )


def slab_probabilities(
    network: torch.nn.Module, image: torch.Tensor, settings: MapSettings, device: torch.device
) -> torch.Tensor:
    """(Z, Y, X) working image -> (Z, Y, X) probability, slice z from the slab z-4 ... z+3."""
    nz, ny, nx = image.shape
    py, px = -ny % DIVISOR, -nx % DIVISOR
    if py or px:
        image = torch.nn.functional.pad(image, (0, px, 0, py), value=AIR)
    before, after = CENTRE, SLAB - CENTRE - 1
    if settings.z_padding == "replicate":
        padded = torch.cat([image[:1].expand(before, -1, -1), image, image[-1:].expand(after, -1, -1)])
        centres = range(nz)
    else:
        padded = image
        centres = range(before, nz - after)
    out = torch.zeros((nz, ny + py, nx + px), dtype=torch.float32)
    slabs = padded.unfold(0, SLAB, 1).permute(0, 3, 1, 2)  # (n, 8, Y, X) view: slab n = padded[n : n + 8]
    first = centres.start - (before if settings.z_padding == "none" else 0)
    count = len(centres)
    for i in range(0, count, settings.batch):
        n = min(settings.batch, count - i)
        batch = slabs[first + i : first + i + n].unsqueeze(1).to(device=device, dtype=torch.float32)
        batch = batch.contiguous(memory_format=torch.channels_last_3d)
        out[centres.start + i : centres.start + i + n] = network(batch)[:, 0].float().cpu()
    return out[:, :ny, :nx]


def compute_map(
    volume: Volume,
    network: torch.nn.Module,
    preprocessing: Any,
    fast: FastPreprocessing | None,
    image_key: str,
    settings: MapSettings,
    device: torch.device,
) -> NoduleMap:
    """Preprocess the volume as the bundle says and run the slabs over the box where lung can be."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        data = preprocess(volume, image_key, preprocessing, fast)
        image = data[image_key]
        affine = np.asarray(torch.as_tensor(image.affine).cpu(), dtype=np.float64)
        tensor = torch.as_tensor(image)
        if tensor.ndim != 4 or tensor.shape[0] != 1:
            raise ModelError(f"preprocessing gave shape {tuple(tensor.shape)}, expected (1, x, y, z)")
        work = tensor[0].permute(2, 1, 0).float()  # (z, y, x) view
        prob = torch.zeros(work.shape, dtype=torch.float32)
        t1 = time.perf_counter()
        box = _lung_box(work, settings)
        if box is not None:
            prob[box] = slab_probabilities(network, work[box].contiguous(), settings, device)
        t2 = time.perf_counter()
    return NoduleMap(prob=prob.numpy(), affine_xyz=affine, timings={"pre": t1 - t0, "forward": t2 - t1})


def weights_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _MapCache:
    """The last few maps, keyed by (weights digest, settings, preprocessing config, id of the Volume); an
    entry counts only while its Volume object is alive and the same (ids are reused after collection).
    One lock per key, so two runners asking at once compute once."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Any, ...], tuple[weakref.ref[Volume], NoduleMap]] = OrderedDict()
        self._key_locks: dict[tuple[Any, ...], threading.Lock] = {}
        self.computed = 0  # maps computed (not served from the cache), for tests and logs

    def get(self, key: tuple[Any, ...], volume: Volume, compute: Any) -> tuple[NoduleMap, bool]:
        """The map for (key, volume) and whether it was computed by this call."""
        full = (*key, id(volume))
        with self._lock:
            key_lock = self._key_locks.setdefault(full, threading.Lock())
        with key_lock:
            with self._lock:
                hit = self._entries.get(full)
                if hit is not None and hit[0]() is volume:
                    self._entries.move_to_end(full)
                    return hit[1], False
            result = compute()
            with self._lock:
                self._entries[full] = (weakref.ref(volume), result)
                self._entries.move_to_end(full)
                while len(self._entries) > self.size:
                    old, _ = self._entries.popitem(last=False)
                    self._key_locks.pop(old, None)
                self.computed += 1
            return result, True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._key_locks.clear()


MAP_CACHE = _MapCache()


class NoduleMapModel:
    """What every DSB 2017 runner holds: the network, the bundle's preprocessing and map settings, and the
    cache key; ``map(volume)`` is the shared map (``timings`` of this call: zero forward when shared)."""

    def __init__(self, ctx: BundleContext) -> None:
        self.ctx = ctx
        self.image_key = str(ctx.parsed("image_key", "image"))
        self.network = ctx.load_network()
        if ctx.device.type == "cpu":
            self.network = self.network.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's stubs omit it
        self.preprocessing = ctx.required("preprocessing")
        self.fast_pre = FastPreprocessing.of(self.preprocessing, self.image_key)
        self.settings = MapSettings.of(ctx.parsed("map"))
        weights = ctx.bundle_dir / "models" / "model.pt"
        preprocessing_config = repr(ctx.parser.config.get("preprocessing"))
        self.key = (weights_digest(weights), self.settings, preprocessing_config, str(ctx.device))

    def map(self, volume: Volume) -> tuple[NoduleMap, dict[str, float]]:
        def compute() -> NoduleMap:
            with self.ctx.autocast():
                return compute_map(
                    volume,
                    self.network,
                    self.preprocessing,
                    self.fast_pre,
                    self.image_key,
                    self.settings,
                    self.ctx.device,
                )

        result, computed = MAP_CACHE.get(self.key, volume, compute)
        timings = dict(result.timings) if computed else {"pre": 0.0, "forward": 0.0}
        return result, timings

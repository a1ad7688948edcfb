"""MONAI bundles (model-zoo layout) -> loaded models that turn a Volume into a result.

A bundle is run with its own ``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing`` as the
config files on disk say, so a model-zoo bundle behaves here as under ``monai.bundle run``. Only the I/O
changes, in memory: LoadImage(d) is replaced by a MetaTensor built from the Volume exactly as MONAI's ITK
reader would build it from a file (array axes (x, y, z), RAS affine), and SaveImage(d) is dropped.

Tasks plug in through ``RUNNERS``: task name -> factory taking a ``BundleContext`` and returning a
callable ``Volume -> ModelResult``. Segmentation lives here; detection and classification live in their
own modules and are registered with one line each in the ``RUNNERS`` literal below, through
``_lazy_runner(module, attribute)`` so those modules can import this one without an import cycle (a
plug-in may instead call ``register_runner`` at import time).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai_models.device import resolve_device
from ai_models.types import ModelError, ModelIdentity, ModelResult, SegmentationResult, Task, Volume

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
WEIGHT_NAMES = ("model.pt", "model.ts")
_LOAD_TARGETS = {"LoadImaged", "LoadImage"}
_SAVE_TARGETS = {"SaveImaged", "SaveImage"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# constructor arguments that zoo configs still pass but newer MONAI removed (after deprecating them as
# ignored): dropped in memory only when the installed class no longer accepts them
_REMOVED_ARGS = {"SwinUNETR": ("img_size",)}


@dataclass(frozen=True)
class BundleInfo:
    """What metadata.json says about a bundle; reading it loads no weights."""

    name: str
    version: str
    task: Task
    labels: dict[int, str]  # label value -> name, background excluded
    description: str
    metadata: dict[str, Any]


# ---------------------------------------------------------------------------------------------- metadata


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def _task_of(meta: dict[str, Any]) -> Task:
    """metadata "task" is free text in the zoo ("Decathlon spleen segmentation"); default segmentation."""
    text = str(meta.get("task", "")).lower()
    if "detect" in text:
        return "detection"
    if "classif" in text:
        return "classification"
    return "segmentation"


def _labels_of(meta: dict[str, Any], task: Task) -> dict[int, str]:
    """Label names: our explicit "labels" map, else the zoo's outputs.pred.channel_def (or the first
    output's), dropping a background channel."""
    explicit = meta.get("labels")
    raw: Any = explicit if isinstance(explicit, dict) else None
    if raw is None:
        outputs = meta.get("network_data_format", {}).get("outputs", {})
        if isinstance(outputs, dict) and outputs:
            first = outputs.get("pred") or next(iter(outputs.values()))
            if isinstance(first, dict):
                raw = first.get("channel_def")
    labels: dict[int, str] = {}
    if isinstance(raw, dict):
        for key, value in raw.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                continue
            name = str(value).strip()
            if name.lower() == "background" or (index == 0 and task == "segmentation"):
                continue
            labels[index] = name
    elif isinstance(raw, list):
        labels = {i: str(v) for i, v in enumerate(raw) if i or task != "segmentation"}
    return dict(sorted(labels.items()))


def read_metadata(bundle_dir: str | Path) -> BundleInfo:
    """Name, version, task, labels and description of a bundle, from configs/metadata.json."""
    root = Path(bundle_dir)
    meta = _read_json(root / "configs" / "metadata.json")
    task = _task_of(meta)
    return BundleInfo(
        name=str(meta.get("name") or root.name),
        version=str(meta.get("version", "0")),
        task=task,
        labels=_labels_of(meta, task),
        description=str(meta.get("description", "")),
        metadata=meta,
    )


def find_config(bundle_dir: Path) -> Path:
    for name in CONFIG_NAMES:
        path = bundle_dir / "configs" / name
        if path.is_file():
            return path
    raise ModelError(f"{bundle_dir} has no configs/inference.json or .yaml")


def bundle_hash(bundle_dir: str | Path) -> str:
    """sha256 over every file in configs/ and models/ (relative name and content), in name order, so
    any change to the configs or weights changes the identity written into results."""
    root = Path(bundle_dir)
    digest = hashlib.sha256()
    files = sorted(
        p for sub in ("configs", "models") if (root / sub).is_dir() for p in (root / sub).rglob("*") if p.is_file()
    )
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- in-memory I/O


def volume_to_metatensor(volume: Volume, name: str = "") -> Any:
    """The MetaTensor LoadImage(reader=ITKReader) would give for this series: no channel, axes (x, y, z),
    affine in RAS. Shares memory with volume.array (a transposed view)."""
    from monai.data import MetaTensor
    from monai.utils import MetaKeys, SpaceKeys

    array = np.asarray(volume.array, dtype=np.float32).transpose(2, 1, 0)
    affine = torch.as_tensor(_LPS_TO_RAS @ volume.affine_lps(), dtype=torch.float64)
    meta = {
        MetaKeys.ORIGINAL_AFFINE: affine.clone(),
        MetaKeys.AFFINE: affine,
        MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
        MetaKeys.SPACE: SpaceKeys.RAS,
        "filename_or_obj": name or volume.series_instance_uid,
    }
    return MetaTensor(torch.from_numpy(array), meta=meta)


def _target_name(item: Any) -> str:
    target = item.get("_target_", "") if isinstance(item, dict) else ""
    return str(target).rsplit(".", 1)[-1]


def _drop_transforms(parser: Any, key: str, names: set[str]) -> int:
    """Remove transforms whose _target_ is in names from the Compose at key (in memory only)."""
    if key not in parser.config:
        return 0
    section = parser[key]
    if not isinstance(section, dict) or not isinstance(section.get("transforms"), list):
        raise ModelError(f"bundle '{key}' is not a Compose with a transforms list")
    kept = [t for t in section["transforms"] if _target_name(t) not in names]
    removed = len(section["transforms"]) - len(kept)
    parser[f"{key}#transforms"] = kept
    return removed


# ---------------------------------------------------------------------------------------------- context


@dataclass
class BundleContext:
    """Everything a task runner needs, prepared once per loaded model."""

    bundle_dir: Path
    info: BundleInfo
    identity: ModelIdentity
    parser: Any  # monai.bundle.ConfigParser with file I/O transforms removed
    device: torch.device

    def parsed(self, key: str, default: Any = None) -> Any:
        """A parsed config item, or default when the config has none."""
        if key not in self.parser.config:
            return default
        try:
            return self.parser.get_parsed_content(key)
        except Exception as exc:  # MONAI raises many types from user configs
            raise ModelError(f"bundle item '{key}' cannot be instantiated: {exc}") from exc

    def required(self, key: str) -> Any:
        """A parsed config item the runner cannot do without."""
        value = self.parsed(key)
        if value is None:
            raise ModelError(f"bundle has no '{key}'")
        return value

    def load_network(self) -> torch.nn.Module:
        """The network in eval mode on the device: network_def + models/model.pt (state dict), or
        models/model.ts (TorchScript) when there is no state dict."""
        models = self.bundle_dir / "models"
        pt, ts = models / "model.pt", models / "model.ts"
        if pt.is_file() and "network_def" in self.parser.config:
            net = self.parsed("network_def")
            try:
                state = torch.load(pt, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, ValueError) as exc:
                raise ModelError(f"cannot load {pt}: {exc}") from exc
            for wrapper in ("model", "state_dict", "network"):
                if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                    state = state[wrapper]
            if not isinstance(state, dict):
                raise ModelError(f"{pt} is not a state dict")
            state = {k.removeprefix("module."): v for k, v in state.items()}
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ModelError(f"{pt} does not fit network_def: {exc}") from exc
        elif ts.is_file():
            try:
                net = torch.jit.load(str(ts), map_location=self.device)
            except (OSError, RuntimeError, ValueError) as exc:
                raise ModelError(f"cannot load {ts}: {exc}") from exc
        else:
            raise ModelError(f"{self.bundle_dir} has neither models/model.pt (with network_def) nor models/model.ts")
        return net.to(self.device).eval()

    def autocast(self) -> Any:
        """Mixed precision on CUDA (as the zoo's evaluators run with amp), none on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()


Runner = Callable[[Volume], ModelResult]
RunnerFactory = Callable[[BundleContext], Runner]


# ---------------------------------------------------------------------------------------------- fast inversion
#
# MONAI's Invertd resamples every score channel onto the source grid with grid_sample over a dense
# coordinate grid (seconds for a 512x512x300 CT). When the working grid differs from the source grid by
# Orientation + Spacing only and the two grids are axis-aligned, the same trilinear interpolation is
# separable: each source axis reads two taps on one working axis. Doing that per axis with index gathers
# (chunked along the slice axis, argmax per chunk) gives the labels Invertd + argmax would give, in a
# fraction of the time and memory. Any other geometry or postprocessing keeps the bundle's own Invertd.

_FAST_OPS = {"Orientation", "SpatialResample"}
_LINEAR_MODES = {"bilinear", "trilinear"}
_FAST_PADDING = {"border", "zeros"}
_AXIS_TOLERANCE_VOXELS = 1e-3  # largest index error over the volume for "axis-aligned"
_CHUNK_VOXELS = 1 << 22  # source voxels per chunk per channel (16 MiB of float32)


@dataclass(frozen=True)
class AxisTaps:
    """Linear interpolation along one axis: out[j] = w0[j] * in[i0[j]] + w1[j] * in[i1[j]]."""

    i0: torch.Tensor
    i1: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor
    identity: bool  # out == in (same size, integer taps): nothing to do


@dataclass(frozen=True)
class FastInvertPlan:
    """Working-grid scores (C, x', y', z') -> source grid (z, y, x): for source axes x, y, z, the working
    axis each one reads and its taps."""

    working_axes: tuple[int, int, int]
    taps: tuple[AxisTaps, AxisTaps, AxisTaps]
    source_shape: tuple[int, int, int]  # (x, y, z)


def axis_aligned_maps(
    source_affine: np.ndarray, working_affine: np.ndarray, source_shape: tuple[int, int, int]
) -> list[tuple[int, float, float]] | None:
    """For source axes x, y, z: (working axis, scale, offset) with working index = scale * j + offset, or
    None when the grids are not related by a permutation/flip + per-axis scale + offset."""
    try:
        m = np.linalg.solve(np.asarray(working_affine, dtype=np.float64), np.asarray(source_affine, dtype=np.float64))
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(m)):
        return None
    extent = max(max(source_shape), 1)
    maps: list[tuple[int, float, float]] = []
    for s in range(3):
        column = m[:3, s]
        w = int(np.argmax(np.abs(column)))
        if abs(column[w]) < 1e-9 or np.abs(np.delete(column, w)).max() * extent > _AXIS_TOLERANCE_VOXELS:
            return None
        maps.append((w, float(column[w]), float(m[w, 3])))
    if sorted(w for w, _, _ in maps) != [0, 1, 2]:
        return None
    return maps


def linear_taps(scale: float, offset: float, n_out: int, n_in: int, padding: str, device: torch.device) -> AxisTaps:
    """Taps of grid_sample's linear interpolation (align_corners=False, voxel-centre affines) along one axis;
    "border" clamps the coordinate, "zeros" drops taps that fall outside."""
    c = scale * np.arange(n_out, dtype=np.float64) + offset
    if padding == "border":
        c = np.clip(c, 0.0, n_in - 1)
    f = np.floor(c)
    w1 = c - f
    i0 = f.astype(np.int64)
    i1 = i0 + 1
    w0 = 1.0 - w1
    if padding == "zeros":
        w0 = np.where((i0 >= 0) & (i0 < n_in), w0, 0.0)
        w1 = np.where((i1 >= 0) & (i1 < n_in), w1, 0.0)
    i0, i1 = np.clip(i0, 0, n_in - 1), np.clip(i1, 0, n_in - 1)
    identity = n_out == n_in and bool(np.all(i0 == np.arange(n_in)) and np.all(w0 == 1.0) and np.all(w1 == 0.0))

    def tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(a, dtype=dtype, device=device)

    return AxisTaps(
        tensor(i0, torch.int64),
        tensor(i1, torch.int64),
        tensor(w0, torch.float32),
        tensor(w1, torch.float32),
        identity,
    )


def _fast_invert_head(transforms: Any, preprocessing: Any, image_key: str) -> Callable[[Any], Any] | None:
    """The transforms to run before our own inversion, when the postprocessing is activations -> Invertd
    (linear, of the preprocessing, keyed on the image) -> optionally AsDiscreted(argmax); else None."""
    from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd

    transforms = list(transforms)
    index = next((i for i, t in enumerate(transforms) if isinstance(t, Invertd)), None)
    if index is None:
        return None
    head, invert, tail = transforms[:index], transforms[index], transforms[index + 1 :]
    if not all(isinstance(t, Activationsd) for t in head):
        return None
    if (
        tuple(invert.keys) != ("pred",)
        or tuple(invert.orig_keys) != (image_key,)
        or invert.transform is not preprocessing
        or any(invert.nearest_interp)
        or any(d is not None for d in invert.device)
        or any(f is not None for f in invert.post_func)
    ):
        return None
    for t in tail:
        if not (
            isinstance(t, AsDiscreted)
            and tuple(t.keys) == ("pred",)
            and all(t.argmax)
            and all(v is None for v in (*t.to_onehot, *t.threshold, *t.rounding))
        ):
            return None
    return Compose(head)


def _fast_invert_plan(image: Any, pred: Any, volume: Volume) -> FastInvertPlan | None:
    """The plan when the image got only Orientation + linear Spacing on its way to the working grid and
    that grid is axis-aligned with the source; None sends the run through the bundle's Invertd."""
    from monai.utils import TraceKeys

    if getattr(image, "pending_operations", None) or pred.ndim != 4 or pred.shape[0] < 2:
        return None
    if tuple(pred.shape[1:]) != tuple(image.shape[1:]):
        return None
    padding = "border"
    for op in image.applied_operations:
        name = op.get(TraceKeys.CLASS_NAME)
        if name not in _FAST_OPS:
            return None
        if name == "SpatialResample":
            extra = op.get(TraceKeys.EXTRA_INFO, {})
            if str(extra.get("mode")) not in _LINEAR_MODES or extra.get("align_corners") not in (False, TraceKeys.NONE):
                return None
            padding = str(extra.get("padding_mode"))
            if padding not in _FAST_PADDING:
                return None
    return build_plan(
        _LPS_TO_RAS @ volume.affine_lps(),
        volume.array.shape[::-1],
        torch.as_tensor(image.affine).detach().cpu().numpy(),
        pred.shape[1:],
        padding,
        pred.device,
    )


def build_plan(
    source_affine: np.ndarray,
    source_shape: Any,
    working_affine: np.ndarray,
    working_shape: Any,
    padding: str,
    device: torch.device,
) -> FastInvertPlan | None:
    """Plan to resample working-grid scores onto the source grid (shapes in affine axis order), or None
    when the grids are not axis-aligned."""
    src = (int(source_shape[0]), int(source_shape[1]), int(source_shape[2]))
    work = (int(working_shape[0]), int(working_shape[1]), int(working_shape[2]))
    maps = axis_aligned_maps(source_affine, working_affine, src)
    if maps is None:
        return None
    tx, ty, tz = (
        linear_taps(scale, offset, src[s], work[w], padding, device) for s, (w, scale, offset) in enumerate(maps)
    )
    return FastInvertPlan(working_axes=(maps[0][0], maps[1][0], maps[2][0]), taps=(tx, ty, tz), source_shape=src)


def _interpolate(data: torch.Tensor, dim: int, taps: AxisTaps, rows: slice | None = None) -> torch.Tensor:
    """Linear interpolation of data along dim by taps (or the rows slice of them). The innermost dim uses
    torch.gather, several times faster there than index_select; rows with a zero second weight (every other
    one for a 2x grid) read one tap only."""
    if taps.identity:
        return data if rows is None else data.narrow(dim, rows.start, rows.stop - rows.start)
    i0, i1, w0, w1 = taps.i0, taps.i1, taps.w0, taps.w1
    if rows is not None:
        i0, i1, w0, w1 = i0[rows], i1[rows], w0[rows], w1[rows]
    shape = [1] * data.ndim
    shape[dim] = -1

    def pick(index: torch.Tensor) -> torch.Tensor:
        if dim == data.ndim - 1:
            size = list(data.shape)
            size[dim] = index.numel()
            return torch.gather(data, dim, index.view(shape).expand(size))
        return data.index_select(dim, index)

    out = pick(i0).mul_(w0.view(shape))
    second = torch.nonzero(w1).flatten()
    if second.numel() == w1.numel():
        out.addcmul_(pick(i1), w1.view(shape))
    elif second.numel():
        part = pick(i1[second]).mul_(w1[second].view(shape))
        out.index_add_(dim, second, part)
    return out


def _argmax_channels(scores: torch.Tensor) -> torch.Tensor:
    """uint8 argmax over dim 0 (first channel wins ties), as a running maximum: several times faster on the
    CPU than torch.max/argmax over the outer dim."""
    label = torch.gt(scores[1], scores[0]).to(torch.uint8)
    if scores.shape[0] > 2:
        best = torch.maximum(scores[0], scores[1])
        for k in range(2, scores.shape[0]):
            above = torch.gt(scores[k], best)
            label.mul_(~above).add_(above.to(torch.uint8).mul_(k))
            if k + 1 < scores.shape[0]:
                torch.maximum(best, scores[k], out=best)
    return label


def invert_argmax_axis_aligned(scores: torch.Tensor, plan: FastInvertPlan) -> np.ndarray:
    """Argmax over channels of the scores interpolated onto the source grid: uint8 (z, y, x)."""
    if scores.shape[0] > 256:
        raise ModelError("more than 255 labels do not fit a uint8 mask")
    wx, wy, wz = plan.working_axes
    # working axes in source (x, y, z) order: a view for RAS working grids (Orientationd), flips are in the taps
    data = scores.float().permute(0, 1 + wx, 1 + wy, 1 + wz)
    if (wx, wy, wz) != (0, 1, 2):
        data = data.contiguous()
    nx, ny, nz = plan.source_shape
    tx, ty, tz = plan.taps
    out = torch.empty((nx, ny, nz), dtype=torch.uint8)
    step = max(1, _CHUNK_VOXELS // max(ny * nz, 1))
    for start in range(0, nx, step):
        rows = slice(start, min(start + step, nx))
        # x planes, then z (innermost: gathers slowest, so while y is still coarse), then y rows
        chunk = _interpolate(data, 1, tx, rows)
        chunk = _interpolate(chunk, 3, tz)
        chunk = _interpolate(chunk, 2, ty)
        out[rows] = _argmax_channels(chunk).cpu()
    # one uint8 transpose to the mask's (z, y, x) is cheaper than transposing float scores
    return out.permute(2, 1, 0).contiguous().numpy()


# ---------------------------------------------------------------------------------------------- segmentation


class SegmentationRunner:
    """The bundle's preprocessing -> inferer(network) -> postprocessing, inverted onto the source grid."""

    def __init__(self, ctx: BundleContext) -> None:
        from monai.transforms import Compose, Invertd

        self.ctx = ctx
        self.image_key = str(ctx.parsed("image_key", "image"))
        self.network = ctx.load_network()
        self.preprocessing = ctx.required("preprocessing")
        self.inferer = ctx.required("inferer")
        self.postprocessing = ctx.parsed("postprocessing") or Compose([])
        transforms = self.postprocessing.flatten().transforms if isinstance(self.postprocessing, Compose) else []
        self.fallback_invert = None
        if not any(isinstance(t, Invertd) for t in transforms):
            # the bundle does not map back itself: do it, nearest-neighbour on the discrete output
            self.fallback_invert = Invertd(
                keys="pred", transform=self.preprocessing, orig_keys=self.image_key, nearest_interp=True
            )
        self.label_values = np.array(sorted(ctx.identity.labels), dtype=np.int64)
        self.fast_head = _fast_invert_head(transforms, self.preprocessing, self.image_key)

    def __call__(self, volume: Volume) -> SegmentationResult:
        from monai.data import MetaTensor

        with torch.inference_mode():
            data = self.preprocessing({self.image_key: volume_to_metatensor(volume)})
            image = data[self.image_key]
            batch = image.unsqueeze(0).to(self.ctx.device)
            with self.ctx.autocast():
                pred = self.inferer(batch, self.network)
            pred = pred[0].float()
            if not isinstance(pred, MetaTensor):
                pred = MetaTensor(pred, meta=image.meta)
            plan = None if self.fast_head is None else _fast_invert_plan(image, pred, volume)
            if plan is not None and self.fast_head is not None:
                data["pred"] = pred
                scores = torch.as_tensor(self.fast_head(data)["pred"])
                labels = invert_argmax_axis_aligned(scores, plan)
                return SegmentationResult(identity=self.ctx.identity, mask=self._labels_to_mask(labels))
            data["pred"] = pred
            data = self.postprocessing(data)
            if self.fallback_invert is not None:
                data = self.fallback_invert(data)
            out = data["pred"]
        return SegmentationResult(identity=self.ctx.identity, mask=self._to_mask(out, volume))

    def _to_mask(self, out: Any, volume: Volume) -> np.ndarray:
        """(C, x, y, z) scores or (1, x, y, z) labels -> uint8 (z, y, x); values outside the labels -> 0."""
        arr = torch.as_tensor(out).detach()
        if arr.ndim == 4 and arr.shape[0] > 1:
            if arr.shape[0] > 256:
                raise ModelError("more than 255 labels do not fit a uint8 mask")
            # torch.max over channels is ~10x faster than argmax on the CPU for (C, N) layouts
            labels = torch.max(arr, dim=0).indices.to(torch.uint8)
        else:
            if arr.ndim == 4:
                arr = arr[0]
            labels = torch.round(arr.float()).clamp_(0, 255).to(torch.uint8)
        if labels.ndim != 3:
            raise ModelError(f"segmentation output has shape {tuple(out.shape)}, expected (C, x, y, z)")
        expected = volume.array.shape[::-1]
        if tuple(labels.shape) != expected:
            raise ModelError(f"segmentation output {tuple(labels.shape)} is not on the source grid {expected}")
        return self._labels_to_mask(np.ascontiguousarray(labels.cpu().numpy().transpose(2, 1, 0)))

    def _labels_to_mask(self, labels: np.ndarray) -> np.ndarray:
        """uint8 (z, y, x) label values -> the mask; values outside the bundle's labels -> 0."""
        lut = np.zeros(256, dtype=np.uint8)
        lut[self.label_values[self.label_values < 256]] = self.label_values[self.label_values < 256]
        return lut[labels]


# ---------------------------------------------------------------------------------------------- registry


def _lazy_runner(module: str, attr: str) -> RunnerFactory:
    """A factory that imports module.attr on first use, so task modules may import this one."""

    def factory(ctx: BundleContext) -> Runner:
        return getattr(importlib.import_module(module), attr)(ctx)

    return factory


RUNNERS: dict[str, RunnerFactory] = {
    "segmentation": SegmentationRunner,
    "detection": _lazy_runner("ai_models.detection", "DetectionRunner"),
    "classification": _lazy_runner("ai_models.classification", "ClassificationRunner"),
}


def register_runner(task: str, factory: RunnerFactory) -> None:
    """Let a task module plug its runner in (load_model picks the runner by the bundle's task)."""
    RUNNERS[task] = factory


# ---------------------------------------------------------------------------------------------- loading


class LoadedModel:
    """A bundle ready to run: network loaded once on its device, transforms instantiated once."""

    def __init__(self, identity: ModelIdentity, runner: Runner) -> None:
        self.identity = identity
        self._runner = runner
        self._lock = threading.Lock()  # transforms and networks are not safe to share across threads

    def run(self, volume: Volume) -> ModelResult:
        with self._lock:
            try:
                return self._runner(volume)
            except ModelError:
                raise
            except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
                raise ModelError(f"{self.identity.name} failed: {exc}") from exc


@contextmanager
def _quiet_monai() -> Iterator[None]:
    """ConfigParser logs at INFO while parsing; keep it from cluttering the node's log."""
    import logging

    logger = logging.getLogger("monai")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _drop_removed_args(parser: Any) -> None:
    import inspect

    import monai.networks.nets as nets

    net_def = parser.config.get("network_def")
    name = _target_name(net_def)
    cls = getattr(nets, name, None)
    if cls is None or name not in _REMOVED_ARGS:
        return
    accepted = inspect.signature(cls.__init__).parameters
    for arg in _REMOVED_ARGS[name]:
        if arg in net_def and arg not in accepted:
            del parser.config["network_def"][arg]


def make_parser(bundle_dir: str | Path, device: str = "cpu") -> Any:
    """The bundle's ConfigParser as load_model uses it: file I/O transforms removed, device set.
    Training scripts and tests use it to build exactly the network and transforms the node runs."""
    root = Path(bundle_dir).resolve()
    return _make_parser(root, _read_json(root / "configs" / "metadata.json"), device)


def _make_parser(bundle_dir: Path, metadata: dict[str, Any], device: str) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(find_config(bundle_dir))
    parser.read_meta(metadata)
    _drop_removed_args(parser)
    parser["bundle_root"] = str(bundle_dir)
    parser["device"] = f"$torch.device('{device}')"
    if isinstance(parser.config.get("inferer"), dict) and "device" in parser["inferer"]:
        parser["inferer#device"] = "@device"  # the zoo hard-codes cuda:0 for stitching in some configs
    _drop_transforms(parser, "preprocessing", _LOAD_TARGETS)
    _drop_transforms(parser, "postprocessing", _SAVE_TARGETS)
    return parser


def load_model(bundle_dir: str | Path, *, name: str | None = None, device: str = "auto") -> LoadedModel:
    """Load a bundle for inference; name overrides the metadata name in the result's identity."""
    root = Path(bundle_dir).resolve()
    if not root.is_dir():
        raise ModelError(f"bundle folder {root} does not exist")
    info = read_metadata(root)
    dev = resolve_device(device)
    factory = RUNNERS.get(info.task)
    if factory is None:
        raise ModelError(f"no runner for task {info.task!r} (known: {', '.join(sorted(RUNNERS))})")
    identity = ModelIdentity(
        name=name or info.name,
        version=info.version,
        task=info.task,
        labels=info.labels,
        bundle_hash=bundle_hash(root),
        device=dev,
        description=info.description,
    )
    with _quiet_monai():
        parser = _make_parser(root, info.metadata, dev)
        ctx = BundleContext(root, info, identity, parser, torch.device(dev))
        runner = factory(ctx)
    return LoadedModel(identity, runner)

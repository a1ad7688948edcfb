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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ai_models.device import resolve_device
from ai_models.fastpath import (
    FastPreprocessing,
    FastSlidingWindow,
    ForwardClock,
    HeadActivation,
    head_activation,
    linear_trace_padding,
)
from ai_models.grid import MAX_LABELS, FastInvertPlan, build_plan, invert_argmax_axis_aligned
from ai_models.types import (
    ModelError,
    ModelIdentity,
    ModelResult,
    SegmentationResult,
    Task,
    Volume,
    at_operating_point,
)

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
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
    min_score: float | None = None  # metadata "operating_point": {"min_score": ...}, chosen by its authors


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


def _min_score_of(meta: dict[str, Any], path: Path) -> float | None:
    point = meta.get("operating_point")
    if point is None:
        return None
    value = point.get("min_score") if isinstance(point, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelError(f"{path}: operating_point.min_score must be a number")
    return float(value)


def read_metadata(bundle_dir: str | Path) -> BundleInfo:
    """Name, version, task, labels, description and operating point of a bundle, from configs/metadata.json."""
    root = Path(bundle_dir)
    path = root / "configs" / "metadata.json"
    meta = _read_json(path)
    task = _task_of(meta)
    return BundleInfo(
        name=str(meta.get("name") or root.name),
        version=str(meta.get("version", "0")),
        task=task,
        labels=_labels_of(meta, task),
        description=str(meta.get("description", "")),
        metadata=meta,
        min_score=_min_score_of(meta, path),
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


def source_affine_xyz(volume: Volume) -> np.ndarray:
    """4x4 RAS affine of the source grid in MONAI's (x, y, z) index order, as volume_to_metatensor builds."""
    return _LPS_TO_RAS @ volume.affine_lps()


def volume_to_metatensor(volume: Volume, name: str = "") -> Any:
    """The MetaTensor LoadImage(reader=ITKReader) would give for this series: no channel, axes (x, y, z),
    affine in RAS. Shares memory with volume.array (a transposed view)."""
    from monai.data import MetaTensor
    from monai.utils import MetaKeys, SpaceKeys

    array = np.asarray(volume.array, dtype=np.float32).transpose(2, 1, 0)
    affine = torch.as_tensor(source_affine_xyz(volume), dtype=torch.float64)
    meta = {
        MetaKeys.ORIGINAL_AFFINE: affine.clone(),
        MetaKeys.AFFINE: affine,
        MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
        MetaKeys.SPACE: SpaceKeys.RAS,
        "filename_or_obj": name or volume.series_instance_uid,
    }
    return MetaTensor(torch.from_numpy(array), meta=meta)


def preprocess(volume: Volume, image_key: str, preprocessing: Any, fast: FastPreprocessing | None) -> dict[str, Any]:
    """The bundle's preprocessing of the volume: ``fast`` (FastPreprocessing.of(preprocessing)) when it
    reproduces this input exactly, else the bundle's own Compose. Every task runner goes through here."""
    source = {image_key: volume_to_metatensor(volume)}
    if fast is not None:
        data = fast(source)
        if data is not None:
            return data
    return preprocessing(source)


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


# ---------------------------------------------------------------------------------------------- fast paths
#
# MONAI's Spacingd and Invertd resample with grid_sample over a dense coordinate grid (seconds for a
# 512x512x300 CT), and its sliding window stitches through full-size weight and count maps. When the
# bundle has the common shape (Orientation + linear Spacing, constant-blend sliding window, activation ->
# Invertd -> optional argmax) and the grids are axis-aligned, ai_models.fastpath and ai_models.grid do the
# same work separably: the same working grid and trace, the same window sums, the labels Invertd + argmax
# give. Anything else runs the bundle's own transforms.


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


def _fast_invert_plan(image: Any, pred_shape: Any, volume: Volume, device: torch.device) -> FastInvertPlan | None:
    """The plan when the image got only Orientation + one linear Spacing on its way to the working grid,
    the prediction (C, x, y, z) has several channels on that grid and the grid is axis-aligned with the
    source; None sends the run through the bundle's Invertd."""
    shape = tuple(int(s) for s in pred_shape)
    if getattr(image, "pending_operations", None) or len(shape) != 4 or not 2 <= shape[0] <= MAX_LABELS:
        return None  # one channel, or 256 (a uint8 mask's whole range; grid reserves one code): MONAI's path
    if shape[1:] != tuple(image.shape[1:]):
        return None
    padding = linear_trace_padding(image.applied_operations)
    if padding is None:
        return None
    return build_plan(
        source_affine_xyz(volume),
        volume.array.shape[::-1],
        torch.as_tensor(image.affine).detach().cpu().numpy(),
        shape[1:],
        padding,
        device,
    )


# ---------------------------------------------------------------------------------------------- segmentation


class SegmentationRunner:
    """The bundle's preprocessing -> inferer(network) -> postprocessing, inverted onto the source grid.

    ``timings`` holds the last run's stages in seconds: pre (preprocessing), forward (inside the network's
    forward calls only), window (the inferer's own work around them), post (activation, inversion, label
    map)."""

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
        self.fast_activation = (
            head_activation(self.fast_head) if self.fast_head is not None else HeadActivation.UNSUPPORTED
        )
        self.fast_pre = FastPreprocessing.of(self.preprocessing, self.image_key)
        self.fast_window = FastSlidingWindow.of(self.inferer)
        self.clock = ForwardClock(self.network, ctx.device)
        self.timings: dict[str, float] = {}

    def __call__(self, volume: Volume) -> SegmentationResult:
        from monai.data import MetaTensor

        t0 = time.perf_counter()
        with torch.inference_mode():
            data = self._preprocess(volume)
            image = data[self.image_key]
            batch = image.unsqueeze(0).to(self.ctx.device)
            t1 = time.perf_counter()
            self.clock.reset()
            with self.ctx.autocast():
                window = self.fast_window(batch, self.clock.predictor) if self.fast_window is not None else None
                pred = self.inferer(batch, self.clock.predictor) if window is None else None
            if batch.device.type == "cuda":
                torch.cuda.synchronize()  # once per volume, so the window stage's time is the work's, not the launches'
            t2 = time.perf_counter()
            plan = None
            if self.fast_head is not None:
                shape = window.sums.shape if window is not None else pred.shape[1:]  # type: ignore[union-attr]
                plan = _fast_invert_plan(image, shape, volume, batch.device)
            if plan is not None and window is not None and self.fast_activation is not HeadActivation.UNSUPPORTED:
                # window sums straight to labels: division and activation only where a boundary needs them
                labels = invert_argmax_axis_aligned(
                    window.sums, plan, counts=window.counts, activation=self.fast_activation.grid_name
                )
                mask = self._labels_to_mask(labels, window.sums.shape[0])
            else:
                if pred is None:
                    pred = window.averaged(batch)  # type: ignore[union-attr]
                pred = pred[0].float()
                if not isinstance(pred, MetaTensor):
                    pred = MetaTensor(pred, meta=image.meta)
                data["pred"] = pred
                if plan is not None and self.fast_head is not None:
                    scores = torch.as_tensor(self.fast_head(data)["pred"])
                    mask = self._labels_to_mask(invert_argmax_axis_aligned(scores, plan), scores.shape[0])
                else:
                    data = self.postprocessing(data)
                    inverted = data if self.fallback_invert is None else self.fallback_invert(data)
                    mask = self._to_mask(inverted["pred"], volume)
        t3 = time.perf_counter()
        forward = self.clock.seconds
        self.timings = {
            "pre": t1 - t0,
            "forward": forward,
            "window": (t2 - t1) - forward,
            "post": t3 - t2,
        }
        return SegmentationResult(identity=self.ctx.identity, mask=mask)

    @contextmanager
    def fast_paths_disabled(self) -> Iterator[None]:
        """Inside the block, runs MONAI's own transforms (pre-processing, sliding window, Invertd): the
        reference the fast paths must match. The fast paths come back on leaving it."""
        saved = self.fast_head, self.fast_pre, self.fast_window
        self.fast_head = self.fast_pre = self.fast_window = None
        try:
            yield
        finally:
            self.fast_head, self.fast_pre, self.fast_window = saved

    def _preprocess(self, volume: Volume) -> dict[str, Any]:
        return preprocess(volume, self.image_key, self.preprocessing, self.fast_pre)

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
        channels = int(arr.shape[0]) if arr.ndim == 4 and arr.shape[0] > 1 else None
        return self._labels_to_mask(np.ascontiguousarray(labels.cpu().numpy().transpose(2, 1, 0)), channels)

    def _labels_to_mask(self, labels: np.ndarray, channels: int | None = None) -> np.ndarray:
        """uint8 (z, y, x) label values (below channels, when known) -> the mask; values outside the bundle's
        labels -> 0. No pass over the volume when the channels are the labels, as in most bundles."""
        lut = np.zeros(256, dtype=np.uint8)
        keep = self.label_values[self.label_values < 256]
        lut[keep] = keep
        present = channels if channels is not None else (int(labels.max()) + 1 if labels.size else 0)
        if np.array_equal(lut[:present], np.arange(present)):
            return labels
        return np.take(lut, labels)


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
    # runners a bundle names itself (inference.json "runner"), for models the task's default does not fit
    "dsb2017_detection": _lazy_runner("ai_models.nodule_runners", "NoduleDetectionRunner"),
    "dsb2017_segmentation": _lazy_runner("ai_models.nodule_runners", "NoduleSegmentationRunner"),
    "dsb2017_classification": _lazy_runner("ai_models.nodule_runners", "NoduleClassificationRunner"),
}


def register_runner(task: str, factory: RunnerFactory) -> None:
    """Let a task module plug its runner in (load_model picks the runner by the bundle's task)."""
    RUNNERS[task] = factory


# ---------------------------------------------------------------------------------------------- loading


class LoadedModel:
    """A bundle ready to run: network loaded once on its device, transforms instantiated once. Detections
    and classifications come out at ``min_score``, the operating point (None: as the runner made them)."""

    def __init__(self, identity: ModelIdentity, runner: Runner, min_score: float | None = None) -> None:
        self.identity = identity
        self.min_score = min_score
        self._runner = runner
        self._lock = threading.Lock()  # transforms and networks are not safe to share across threads

    def run(self, volume: Volume) -> ModelResult:
        return self.run_timed(volume)[0]

    def run_timed(self, volume: Volume) -> tuple[ModelResult, dict[str, float]]:
        """The result and the runner's own stage timings in seconds (empty when the runner keeps none), so
        the worker can log where inference time goes (the network's forward pass vs. the rest)."""
        with self._lock:
            try:
                result = self._runner(volume)
            except ModelError:
                raise
            except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
                raise ModelError(f"{self.identity.name} failed: {exc}") from exc
            timings = getattr(self._runner, "timings", None)
            if self.min_score is not None:
                result = at_operating_point(result, self.min_score)
            return result, dict(timings) if isinstance(timings, dict) else {}


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
    if isinstance(parser.get("inferer"), dict) and "device" in parser["inferer"]:
        parser["inferer#device"] = "@device"  # the zoo hard-codes cuda:0 for stitching in some configs
    _drop_transforms(parser, "preprocessing", _LOAD_TARGETS)
    _drop_transforms(parser, "postprocessing", _SAVE_TARGETS)
    return parser


def load_model(
    bundle_dir: str | Path, *, name: str | None = None, device: str = "auto", min_score: float | None = None
) -> LoadedModel:
    """Load a bundle for inference; name overrides the metadata name in the result's identity, min_score the
    bundle's operating point (detection and classification only)."""
    root = Path(bundle_dir).resolve()
    if not root.is_dir():
        raise ModelError(f"bundle folder {root} does not exist")
    info = read_metadata(root)
    dev = resolve_device(device)
    if min_score is not None and info.task == "segmentation":
        raise ModelError(f"min_score applies to detection and classification models, not to {info.name!r}")
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
        named = parser.config.get("runner")  # a bundle may name its runner; else its task's runs it
        factory = RUNNERS.get(str(named or info.task))
        if factory is None:
            what = f"runner {named!r}" if named else f"runner for task {info.task!r}"
            raise ModelError(f"no {what} (known: {', '.join(sorted(RUNNERS))})")
        ctx = BundleContext(root, info, identity, parser, torch.device(dev))
        runner = factory(ctx)
    return LoadedModel(identity, runner, min_score if min_score is not None else info.min_score)

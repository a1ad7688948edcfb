# Replaces MONAI Spacingd 14x (4.0 -> 0.29 s), SlidingWindowInferer 1.9x (0.37 -> 0.20 s); reference: test_fastpath.py
"""Faster equivalents of the common MONAI bundle steps around a segmentation network.

Most CT segmentation bundles (the shipped chest_ct_seg, the zoo's spleen and BTCV configs) share one
shape: ``Orientationd`` + ``Spacingd`` (bilinear) + ``ScaleIntensityRanged``, a constant-blend
``SlidingWindowInferer``, then ``Activationsd`` + ``Invertd``. MONAI runs the resampling with
``grid_sample`` over a dense coordinate grid in float64 and stitches windows through full-size weight
and count maps: on the CPU that is several times the cost of everything else but the network.

Each piece here recognises its MONAI counterpart exactly (class, keys and arguments), produces what MONAI
would (the same grid, affine and applied-operation trace, so ``Invertd`` and the inversion fast path
still work; the same window sums), and says "not mine" for anything else, so the caller runs MONAI's
own transform. Nothing here changes which model runs or on what grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import product
from typing import Any

import numpy as np
import torch

from ai_models.grid import build_plan, resample_linear

_SPATIAL = ("Orientationd", "Spacingd")
_LINEAR_MODES = {"bilinear", "trilinear"}
_PADDING = {"border", "zeros"}


_TRACE_OPS = frozenset({"Orientation", "SpatialResample"})


def linear_trace_padding(ops: Sequence[dict[str, Any]]) -> str | None:
    """The padding mode with which ``resample_linear`` reproduces a recorded trace of Orientation and at most
    one SpatialResample in linear mode without align_corners, padding border or zeros ("border" when there
    is no resample), else None. The pre-processing and the inversion fast paths accept a trace by this one
    rule (two interpolations are not one)."""
    from monai.utils import TraceKeys

    padding, resamples = "border", 0
    for op in ops:
        name = op.get(TraceKeys.CLASS_NAME)
        if name not in _TRACE_OPS:
            return None
        if name == "SpatialResample":
            resamples += 1
            extra = op.get(TraceKeys.EXTRA_INFO, {})
            padding = str(extra.get("padding_mode"))
            if (
                resamples > 1
                or str(extra.get("mode")) not in _LINEAR_MODES
                or extra.get("align_corners") not in (False, TraceKeys.NONE)
                or padding not in _PADDING
            ):
                return None
    return padding


def _name(obj: Any) -> str:
    return type(obj).__name__


def _keys_are(transform: Any, key: str) -> bool:
    return tuple(getattr(transform, "keys", ())) == (key,)


# ---------------------------------------------------------------------------------------------- pre-processing


def _eager_record(op: dict[str, Any]) -> dict[str, Any]:
    """The applied-operation record an eager call writes, from the pending record of a lazy call (the same
    dict without the lazy geometry, marked not lazy)."""
    from monai.utils import LazyAttr, TraceKeys

    out = {k: v for k, v in op.items() if k not in (LazyAttr.SHAPE, LazyAttr.AFFINE)}
    out[TraceKeys.LAZY] = False
    return out


def _scale_in_place(image: torch.Tensor, scaler: Any) -> None:
    """MONAI's ScaleIntensityRange, the same float32 operations in the same order, without temporaries."""
    image.sub_(scaler.a_min).div_(scaler.a_max - scaler.a_min)
    if scaler.b_min is not None and scaler.b_max is not None:
        image.mul_(scaler.b_max - scaler.b_min).add_(scaler.b_min)
    if scaler.clip:
        image.clamp_(scaler.b_min, scaler.b_max)


def _scaler_supported(transform: Any, key: str) -> bool:
    scaler: Any = getattr(transform, "scaler", None)
    return (
        _name(transform) == "ScaleIntensityRanged"
        and _keys_are(transform, key)
        and _name(scaler) == "ScaleIntensityRange"
        and scaler.a_max - scaler.a_min != 0
        and scaler.dtype in (np.float32, torch.float32, "float32")
        and not (scaler.clip and (scaler.b_min is None or scaler.b_max is None))
    )


class FastPreprocessing:
    """A bundle's pre-processing Compose with its Orientationd/Spacingd runs done by ``resample_linear`` and
    ScaleIntensityRanged done in place; every other transform is MONAI's own, called as the Compose would.

    ``__call__`` returns None when the input or the recorded geometry is not one it reproduces exactly
    (not axis-aligned, a non-linear mode, align_corners, an unchanged grid...): the caller then runs the
    whole Compose as MONAI does."""

    def __init__(self, steps: list[tuple[str, list[Any]]], key: str) -> None:
        self.steps = steps
        self.key = key

    @classmethod
    def of(cls, compose: Any, key: str) -> FastPreprocessing | None:
        """The fast version of compose, or None when it has no Orientationd/Spacingd on key or runs
        anything lazily (MONAI's lazy resampling gives other values)."""
        from monai.transforms import Compose

        if type(compose) is not Compose or compose.lazy or compose.overrides or not compose.map_items:
            return None
        transforms = list(compose.flatten().transforms)
        if any(getattr(t, "lazy", False) for t in transforms):
            return None
        steps: list[tuple[str, list[Any]]] = []
        for t in transforms:
            if _name(t) in _SPATIAL and _keys_are(t, key):
                if steps and steps[-1][0] == "spatial":
                    steps[-1][1].append(t)
                else:
                    steps.append(("spatial", [t]))
            elif _scaler_supported(t, key):
                steps.append(("scale", [t]))
            else:
                steps.append(("monai", [t]))
        if not any(kind == "spatial" for kind, _ in steps):
            return None
        return cls(steps, key)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any] | None:
        d = dict(data)
        owned = False  # d[key] is our own tensor (not the caller's volume): safe to change in place
        fused = -1  # index of a scale step already applied slab by slab inside the resampling
        for i, (kind, transforms) in enumerate(self.steps):
            if i == fused:
                continue
            if kind == "spatial":
                after = self.steps[i + 1] if i + 1 < len(self.steps) else None
                scaler = after[1][0].scaler if after is not None and after[0] == "scale" else None
                out = self._spatial(d, transforms, scaler)
                if out is None:
                    return None
                d, owned = out, True
                fused = i + 1 if scaler is not None else -1
            elif kind == "scale":
                image = d[self.key]
                if owned and image.dtype == torch.float32:
                    _scale_in_place(image.as_tensor() if hasattr(image, "as_tensor") else image, transforms[0].scaler)
                else:
                    d = transforms[0](d)
                    owned = True
            else:
                before = d.get(self.key)
                d = transforms[0](d)
                owned = owned and d.get(self.key) is before
        return d

    def _spatial(self, d: dict[str, Any], transforms: list[Any], scaler: Any = None) -> dict[str, Any] | None:
        """Orientationd/Spacingd run lazily (MONAI computes the output grid and the trace, no pixels), then
        the recorded resampling done separably; a ScaleIntensityRange that follows is applied to each slab
        while it is in cache (the same operations MONAI's does, on the same float32 values)."""
        from monai.data import MetaTensor
        from monai.data.utils import AFFINE_TOL
        from monai.utils import LazyAttr, TraceKeys

        image = d.get(self.key)
        if not isinstance(image, MetaTensor) or image.pending_operations or image.ndim != 4:
            return None
        if "pixdim" in image.meta:  # eager MONAI would rewrite it too; our in-memory images carry none
            return None
        lazy = dict(d)
        try:
            for t in transforms:
                lazy = t(lazy, lazy=True)
        except (NotImplementedError, ValueError, TypeError, RuntimeError):
            return None
        pending = lazy[self.key].pending_operations
        padding = linear_trace_padding(pending)
        if not pending or padding is None:
            return None
        for op in pending:
            if op.get(TraceKeys.CLASS_NAME) == "SpatialResample":
                xform = torch.as_tensor(op[LazyAttr.AFFINE])
                extra = op.get(TraceKeys.EXTRA_INFO, {})
                unchanged = tuple(op[LazyAttr.SHAPE]) == tuple(op[TraceKeys.ORIG_SIZE]) and (
                    np.allclose(xform.numpy(), np.eye(4), atol=AFFINE_TOL)
                    or np.allclose(extra["src_affine"], (extra["src_affine"] @ xform).numpy(), atol=AFFINE_TOL)
                )
                if unchanged:  # eager MONAI keeps the image and its affine as they are
                    return None
        # the grid the pending operations lead to, composed in float64 as eager MONAI composes it
        affine = lazy[self.key].peek_pending_affine()
        shape = tuple(int(s) for s in lazy[self.key].peek_pending_shape())
        plan = build_plan(affine.numpy(), shape, image.affine.numpy(), tuple(image.shape[1:]), padding, image.device)
        if plan is None:
            return None
        epilogue = None if scaler is None else (lambda part: _scale_in_place(part, scaler))
        out = resample_linear(image.as_tensor(), plan, epilogue)
        meta = dict(lazy[self.key].meta)
        meta["affine"] = affine.to(device=torch.device("cpu"), dtype=torch.float64)
        applied = [*image.applied_operations, *(_eager_record(op) for op in pending)]
        lazy[self.key] = MetaTensor(out, meta=meta, applied_operations=applied)
        return lazy


# ---------------------------------------------------------------------------------------------- sliding window


@dataclass
class WindowSums:
    """Sliding-window output before MONAI's division by the overlap count: sums (C, *spatial) and, per
    spatial axis, how many windows cover each index (the count map is their outer product)."""

    sums: torch.Tensor
    counts: tuple[torch.Tensor, ...]

    def averaged(self, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """What MONAI's sliding_window_inference returns for inputs: (1, C, *spatial), sums / count map,
        a MetaTensor carrying the inputs' metadata when they are one."""
        cx, cy, cz = self.counts
        count = cx[:, None, None] * cy[None, :, None] * cz[None, None, :]
        out = (self.sums / count[None])[None]
        if inputs is not None and hasattr(inputs, "copy_meta_from"):
            from monai.data import MetaTensor
            from monai.utils import convert_to_dst_type

            like = MetaTensor([]).copy_meta_from(inputs, copy_attr=False)
            out = convert_to_dst_type(out, like, device=out.device)[0]
        return out


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class _NotMine(Exception):
    """The network's output is not one tensor on the window's grid: let MONAI stitch it."""


class FastSlidingWindow:
    """MONAI's SlidingWindowInferer in constant blend mode without its full-size weight and count maps: the
    same windows (MONAI's own scan and slice helpers), the same batches and the same additions in the same
    order, so the sums are bit for bit MONAI's. The division by the count is left to the caller (the
    inversion needs it only near label boundaries)."""

    def __init__(self, inferer: Any) -> None:
        self.inferer = inferer

    @classmethod
    def of(cls, inferer: Any) -> FastSlidingWindow | None:
        from monai.inferers import SlidingWindowInferer
        from monai.utils import BlendMode

        if type(inferer) is not SlidingWindowInferer:
            return None
        if BlendMode(inferer.mode) != BlendMode.CONSTANT or inferer.with_coord:
            return None
        if inferer.buffer_steps is not None and inferer.buffer_steps > 0:
            return None
        return cls(inferer)

    def __call__(self, inputs: torch.Tensor, network: Callable[[torch.Tensor], Any]) -> WindowSums | None:
        """Window sums for inputs (1, C, *spatial), or None when MONAI would pad, stitch on another device
        or get something other than one tensor per window (then call the inferer itself)."""
        from monai.data.utils import dense_patch_slices
        from monai.utils import ensure_tuple_rep, fall_back_tuple

        try:  # MONAI's own scan helper, so the windows are exactly its windows
            from monai.inferers.utils import _get_scan_interval
        except ImportError:
            return None

        inf = self.inferer
        if inputs.ndim != 5 or inputs.shape[0] != 1:
            return None
        image_size = tuple(int(s) for s in inputs.shape[2:])
        roi = fall_back_tuple(inf.roi_size, image_size)
        if any(r > s for r, s in zip(roi, image_size, strict=True)):
            return None  # MONAI pads, then crops
        device = inf.device
        if device is None and inf.cpu_thresh is not None and inputs.shape[2:].numel() > inf.cpu_thresh:
            device = "cpu"
        for dev in (device, inf.sw_device):
            if dev is not None and not _same_device(torch.device(dev), inputs.device):
                return None
        overlap = ensure_tuple_rep(inf.overlap, 3)
        if any(not 0 <= o < 1 for o in overlap):
            return None  # MONAI raises its own error
        scan = _get_scan_interval(image_size, roi, 3, overlap)
        slices = dense_patch_slices(image_size, roi, scan, return_slice=True)
        starts = [sorted({s[d].start for s in slices}) for d in range(3)]
        grid = [tuple(slice(a, a + r) for a, r in zip(combo, roi, strict=True)) for combo in product(*starts)]
        if grid != [tuple(slice(s.start, s.stop) for s in w) for w in slices]:
            return None  # not the product of the per-axis starts in lexicographic order: MONAI's own loop
        data = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        try:
            sums = self._accumulate(data, network, slices, roi, starts)
        except _NotMine:
            return None
        counts = []
        for d in range(3):
            c = torch.zeros(image_size[d], dtype=sums.dtype, device=sums.device)
            for s in starts[d]:
                c[s : s + roi[d]] += 1
            counts.append(c)
        return WindowSums(sums, tuple(counts))

    def _accumulate(
        self,
        data: torch.Tensor,
        network: Callable[[torch.Tensor], Any],
        slices: list[tuple[slice, ...]],
        roi: Sequence[int],
        starts: list[list[int]],
    ) -> torch.Tensor:
        """Sum the windows' outputs in MONAI's order. MONAI adds every window into a zeroed buffer; here the
        part of a window no earlier window covered is copied instead (0 + p is p), so the buffer needs no
        zeroing pass and a third of the additions become copies. ``slices`` are the product of ``starts``
        in lexicographic order (checked by the caller)."""
        batch = max(1, int(self.inferer.sw_batch_size))
        fresh = _first_cover(slices, starts, roi)
        sums: torch.Tensor | None = None
        for first in range(0, len(slices), batch):
            group = slices[first : first + batch]
            index = [(slice(0, 1), slice(None), *s) for s in group]
            windows = data[index[0]] if len(group) == 1 else torch.cat([data[i] for i in index])
            out = network(windows)
            if not isinstance(out, torch.Tensor) or out.ndim != 5 or tuple(out.shape[2:]) != tuple(roi):
                raise _NotMine
            if sums is None:
                sums = torch.empty((out.shape[1], *data.shape[2:]), dtype=data.dtype, device=data.device)
            for k, s in enumerate(group):
                new, old = fresh[first + k]
                sums[(slice(None), *_shift(new, s, 0))].copy_(out[k][(slice(None), *_shift(new, s, 1))])
                for box in old:
                    sums[(slice(None), *_shift(box, s, 0))] += out[k][(slice(None), *_shift(box, s, 1))]
        assert sums is not None
        return sums


def _shift(box: tuple[slice, ...], window: tuple[slice, ...], local: int) -> tuple[slice, ...]:
    """box in volume coordinates (local=0) or in the window's own coordinates (local=1)."""
    if not local:
        return box
    return tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, window, strict=True))


def _first_cover(
    slices: list[tuple[slice, ...]], starts: list[list[int]], roi: Sequence[int]
) -> list[tuple[tuple[slice, ...], list[tuple[slice, ...]]]]:
    """For each window, in MONAI's (lexicographic) order: the box of voxels it is the first to cover, and the
    boxes of its voxels an earlier window already covered. Along each axis the voxels a window is first to
    cover start where the previous window along that axis ends (the windows are the product of the
    per-axis starts)."""
    out = []
    for window in slices:
        lo = []
        for d, s in enumerate(window):
            j = starts[d].index(s.start)
            lo.append(s.start if j == 0 else max(s.start, starts[d][j - 1] + roi[d]))
        new = tuple(slice(lo[d], window[d].stop) for d in range(3))
        old = []
        for d in range(3):
            if lo[d] > window[d].start:
                # earlier axes inside the new box, this axis before it, later axes the whole window
                box = tuple(
                    new[e] if e < d else slice(window[d].start, lo[d]) if e == d else window[e] for e in range(3)
                )
                old.append(box)
        out.append((new, old))
    return out


class HeadActivation(Enum):
    """The per-voxel activation a bundle's post-processing head applies before the argmax, as far as the
    inversion fast path can reproduce it; UNSUPPORTED sends the scores through MONAI's own head."""

    NONE = "none"
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    UNSUPPORTED = "unsupported"

    @property
    def grid_name(self) -> str | None:
        """The name ``grid.invert_argmax_axis_aligned`` takes (None: no activation)."""
        if self is HeadActivation.UNSUPPORTED:
            raise ValueError("no fast-path activation for an unsupported head")
        return None if self is HeadActivation.NONE else self.value


def head_activation(head: Any) -> HeadActivation:
    """What a Compose of Activationsd on "pred" applies per voxel: softmax, sigmoid, nothing, or something
    the fast path does not reproduce (UNSUPPORTED)."""
    from monai.transforms import Compose

    transforms = list(head.flatten().transforms) if isinstance(head, Compose) else [head]
    if not transforms:
        return HeadActivation.NONE
    if len(transforms) != 1 or _name(transforms[0]) != "Activationsd" or not _keys_are(transforms[0], "pred"):
        return HeadActivation.UNSUPPORTED
    t = transforms[0]
    conv = t.converter
    if conv.sigmoid or conv.softmax or conv.other is not None or conv.kwargs.get("dim", 0) != 0:
        return HeadActivation.UNSUPPORTED
    sigmoid, softmax, other = bool(t.sigmoid[0]), bool(t.softmax[0]), t.other[0]
    if other is not None or (sigmoid and softmax):
        return HeadActivation.UNSUPPORTED
    return HeadActivation.SOFTMAX if softmax else HeadActivation.SIGMOID if sigmoid else HeadActivation.NONE


# ---------------------------------------------------------------------------------------------- timing


class ForwardClock:
    """Seconds spent inside the network's forward calls (hooks on a Module; a wrapper for TorchScript,
    which takes no hooks). On CUDA each call is bracketed by events on the current stream and the times are
    read once, when ``seconds`` is asked for: synchronising around every call would stall the host until
    the GPU is idle, so the next window batch could not be prepared while this one runs."""

    def __init__(self, network: Any, device: torch.device) -> None:
        self.calls = 0
        self._seconds = 0.0
        self._cuda = device.type == "cuda"
        self._pending: list[tuple[Any, Any]] = []  # (start, end) CUDA events not yet read
        self._start: Any = 0.0
        self.network = network
        self.predictor: Callable[..., Any] = network
        if isinstance(network, torch.jit.ScriptModule) or not isinstance(network, torch.nn.Module):
            self.predictor = self._wrapped  # scripted or traced modules skip Python hooks
        else:
            network.register_forward_pre_hook(self._before)
            network.register_forward_hook(self._after)

    @property
    def seconds(self) -> float:
        if self._pending:
            self._pending[-1][1].synchronize()  # the last call's end: every earlier event has completed too
            self._seconds += sum(start.elapsed_time(end) for start, end in self._pending) / 1000
            self._pending.clear()
        return self._seconds

    def reset(self) -> None:
        self._seconds, self.calls = 0.0, 0
        self._pending.clear()

    def _before(self, *_: Any) -> None:
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def _after(self, *_: Any) -> None:
        if self._cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end))
        else:
            self._seconds += time.perf_counter() - self._start
        self.calls += 1

    def _wrapped(self, *args: Any, **kwargs: Any) -> Any:
        self._before()
        try:
            return self.network(*args, **kwargs)
        finally:
            self._after()

"""Nodule detection: a MONAI RetinaNet on a small 3D ResNet + FPN backbone, and the bundle runner.

MONAI's ``resnet_fpn_feature_extractor`` / ``BackboneWithFPN`` import torchvision, which cannot be installed
here, so the backbone is built from plain torch layers plus MONAI's own ``FeaturePyramidNetwork`` (which
imports only torch). The bundle's ``network_def`` names ``build_retinanet`` (or RetinaNet with
``TinyResNetFPN`` as feature extractor), its ``detector`` a ``RetinaNetDetector`` with an anchor generator,
and its ``detector_ops`` the target keys and box selector settings, as model-zoo detection bundles do.

Boxes leave the detector in MONAI's ``xyzxyz`` mode on the working grid (array axes (x, y, z) after the
bundle's preprocessing; coordinates are voxel-centre indices, so a box is [centre - r, centre + r]). The
runner maps their corners through the working grid's affine to world and back through the source affine,
which undoes whatever orientation, resampling and cropping the preprocessing did, and reports each box as
inclusive (z, y, x) voxel indices on the source grid.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from itertools import pairwise, product
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ai_models.bundle import BundleContext, preprocess, source_affine_xyz
from ai_models.fastpath import FastPreprocessing
from ai_models.types import Detection, DetectionResult, ModelError, Volume

# ---------------------------------------------------------------------------------------------- network


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


class _ResBlock(nn.Module):
    """Basic 3D residual block (two 3x3x3 convolutions), optionally strided with a 1x1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin, cout, stride)
        self.conv2 = nn.Conv3d(cout, cout, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv3d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm3d(cout)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


class TinyResNetFPN(nn.Module):
    """3D ResNet-ish encoder + FPN. Stage i halves the resolution (stride 2 ** (i + 1)); the FPN merges
    the stages listed in ``fpn_stages`` and returns one map per listed stage, finest first.

    ``out_channels`` is what ``RetinaNet`` reads to size its heads; every level has that many channels.
    A full-resolution stem keeps the few-voxel nodules of a coarse working grid visible, and the heads run
    only on the coarser levels, which is where a CPU spends its time.
    """

    def __init__(
        self,
        in_channels: int = 1,
        stem_channels: int = 8,
        channels: Sequence[int] = (16, 32, 64),
        fpn_stages: Sequence[int] = (1, 2),
        fpn_channels: int = 24,
    ) -> None:
        super().__init__()
        from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork

        if not fpn_stages or any(not 0 <= i < len(channels) for i in fpn_stages):
            raise ValueError(f"fpn_stages {fpn_stages} must index channels {channels}")
        self.stem = _conv_bn_relu(in_channels, stem_channels)
        stages = []
        cin = stem_channels
        for cout in channels:
            stages.append(_ResBlock(cin, cout, stride=2))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.fpn_stages = tuple(sorted(int(i) for i in fpn_stages))
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=3, in_channels_list=[channels[i] for i in self.fpn_stages], out_channels=fpn_channels
        )
        self.out_channels = fpn_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.stem(x)
        feats: OrderedDict[str, Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.fpn_stages:
                feats[f"p{i}"] = x
        return self.fpn(feats)


def build_retinanet(
    num_classes: int = 1,
    num_anchors: int = 2,
    stem_channels: int = 8,
    channels: Sequence[int] = (16, 32, 64),
    fpn_stages: Sequence[int] = (1, 2),
    fpn_channels: int = 24,
) -> nn.Module:
    """A RetinaNet whose input size must be divisible by 2 ** len(channels) on every axis (the detector
    pads to that)."""
    from monai.apps.detection.networks.retinanet_network import RetinaNet

    extractor = TinyResNetFPN(1, stem_channels, channels, fpn_stages, fpn_channels)
    return RetinaNet(
        spatial_dims=3,
        num_classes=num_classes,
        num_anchors=num_anchors,
        feature_extractor=extractor,
        size_divisible=2 ** len(channels),
    )


# ---------------------------------------------------------------------------------------------- geometry


def boxes_to_source(boxes_xyz: np.ndarray, work_affine: np.ndarray, volume: Volume) -> np.ndarray:
    """(N, 6) xyzxyz boxes on the working grid -> (N, 6) continuous (z, y, x) min/max on the source grid.

    Every corner is mapped (working index -> world -> source index), then the axis-aligned hull is taken,
    so flips and permutations by Orientation transforms come out right."""
    if len(boxes_xyz) == 0:
        return np.zeros((0, 6))
    to_src = np.linalg.inv(source_affine_xyz(volume)) @ np.asarray(work_affine, dtype=np.float64)
    out = np.empty((len(boxes_xyz), 6))
    for n, box in enumerate(np.asarray(boxes_xyz, dtype=np.float64)):
        pts = np.array([[box[i + 3 * s[i]] for i in range(3)] for s in product((0, 1), repeat=3)])
        src = (np.c_[pts, np.ones(len(pts))] @ to_src.T)[:, :3][:, ::-1]  # (x, y, z) -> (z, y, x)
        out[n, :3] = src.min(axis=0)
        out[n, 3:] = src.max(axis=0)
    return out


def to_inclusive(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Continuous extent [lo, hi] (voxel-centre coordinates) -> inclusive voxel indices in the volume,
    so a consumer computing ``hi - lo + 1`` voxels recovers the physical size."""
    centre = (lo + hi) / 2.0
    a = np.minimum(lo + 0.5, centre)
    b = np.maximum(hi - 0.5, centre)
    upper = np.asarray(shape, dtype=np.float64) - 1.0
    return np.clip(a, 0.0, upper), np.clip(b, 0.0, upper)


# ---------------------------------------------------------------------------------------------- runner


def tile_cores(size: int, tile: int, overlap: int) -> list[tuple[int, float, float]]:
    """(start, core_lo, core_hi) per tile along one axis: tiles of `tile` voxels overlapping by at least
    `overlap`; the cores [core_lo, core_hi) (continuous voxel-centre coordinates) split the axis between
    them at the middle of each overlap, so every point belongs to exactly one tile and lies at least
    overlap / 2 from that tile's inner edges. The outer cores are open-ended."""
    from ai_models.classification import patch_starts

    starts = patch_starts(size, tile, max(1, tile - overlap))
    bounds = [-np.inf] + [(nxt + cur + tile) // 2 - 0.5 for cur, nxt in pairwise(starts)] + [np.inf]
    return [(s, float(bounds[i]), float(bounds[i + 1])) for i, s in enumerate(starts)]


class DetectionRunner:
    """preprocessing -> RetinaNetDetector on overlapping tiles of the working image -> boxes above the
    bundle's ``score_threshold`` on the source grid.

    The tiles bound memory on large studies. Each tile is a whole detector pass with its own anchors
    (MONAI's sliding-window path, tried first, returned coarse FPN maps whose size did not match the
    anchors for image sizes that are not multiples of the roi); a box is kept only from the tile whose
    core holds its centre, and the overlap (``tile_overlap``) exceeds the largest nodule, so every nodule
    is seen whole by the tile that reports it.
    """

    def __init__(self, ctx: BundleContext) -> None:
        self.ctx = ctx
        self.image_key = str(ctx.parsed("image_key", "image"))
        self.network = ctx.load_network()
        self.preprocessing = ctx.required("preprocessing")
        self.fast_pre = FastPreprocessing.of(self.preprocessing, self.image_key)
        detector = ctx.required("detector")
        detector.network = self.network  # the loaded weights, whatever the config's reference resolved to
        self.detector = detector
        ctx.parsed("detector_ops")  # set_target_keys / set_box_selector_parameters on @detector
        self.detector.eval()
        self.score_threshold = float(ctx.parsed("score_threshold", 0.5))
        self.tile = tuple(int(t) for t in ctx.parsed("tile_size", (160, 160, 160)))
        self.overlap = int(ctx.parsed("tile_overlap", 32))
        if len(self.tile) != 3 or not 0 <= self.overlap < min(self.tile):
            raise ModelError(f"tile_size {self.tile} / tile_overlap {self.overlap} are not usable")
        labels = ctx.identity.labels
        self.label_names = {int(k): v for k, v in labels.items()} or {0: "nodule"}

    def detect_working(self, volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (N, 6 xyzxyz), scores, labels on the working grid, and that grid's affine."""
        det = self.detector
        boxes, scores, labels = [np.zeros((0, 6))], [np.zeros(0)], [np.zeros(0, dtype=np.int64)]
        with torch.inference_mode():
            data = preprocess(volume, self.image_key, self.preprocessing, self.fast_pre)
            image = data[self.image_key]
            affine = np.asarray(torch.as_tensor(image.affine).cpu(), dtype=np.float64)
            tensor = torch.as_tensor(image).float()
            if tensor.numel() == 0:  # nothing but air: the body crop is empty
                return boxes[0], scores[0], labels[0], affine
            axes = [tile_cores(n, t, self.overlap) for n, t in zip(tensor.shape[1:], self.tile, strict=True)]
            for tx, ty, tz in product(*axes):
                lo = np.array([tx[0], ty[0], tz[0]])
                sub = tensor[
                    :, lo[0] : lo[0] + self.tile[0], lo[1] : lo[1] + self.tile[1], lo[2] : lo[2] + self.tile[2]
                ]
                with self.ctx.autocast():
                    out = det([sub.to(self.ctx.device)], use_inferer=False)[0]
                b = out[det.target_box_key].float().cpu().numpy().reshape(-1, 6) + np.r_[lo, lo]
                centre = (b[:, :3] + b[:, 3:]) / 2
                core_lo = np.array([tx[1], ty[1], tz[1]])
                core_hi = np.array([tx[2], ty[2], tz[2]])
                keep = np.all((centre >= core_lo) & (centre < core_hi), axis=1)
                boxes.append(b[keep])
                scores.append(out[det.pred_score_key].float().cpu().numpy().reshape(-1)[keep])
                labels.append(out[det.target_label_key].cpu().numpy().reshape(-1).astype(np.int64)[keep])
        return np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels), affine

    def __call__(self, volume: Volume) -> DetectionResult:
        boxes, scores, labels, affine = self.detect_working(volume)
        keep = scores >= self.score_threshold
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        src = boxes_to_source(boxes, affine, volume)
        order = np.argsort(-scores, kind="stable")
        detections: list[Detection] = []
        for i in order:
            lo, hi = to_inclusive(src[i, :3], src[i, 3:], volume.array.shape)
            name = self.label_names.get(int(labels[i]))
            if name is None:
                raise ModelError(f"detector returned label {int(labels[i])} not in the bundle's labels")
            detections.append(
                Detection(
                    label=name,
                    score=float(scores[i]),
                    box_min=(float(lo[0]), float(lo[1]), float(lo[2])),
                    box_max=(float(hi[0]), float(hi[1]), float(hi[2])),
                )
            )
        return DetectionResult(identity=self.ctx.identity, detections=tuple(detections))


class _AbsentTorchvisionClass:
    """Stands in for torchvision's Matcher / BalancedPositiveNegativeSampler: never instantiated, so
    RetinaNetDetector's ``isinstance`` checks are False and it takes its MONAI (ATSS, hard negative) paths."""


def _without_torchvision_placeholders() -> None:
    """RetinaNetDetector.compute_loss tests ``isinstance(matcher, torchvision Matcher)`` first; without
    torchvision that name is an optional-import placeholder that raises on use. Replace it (training only;
    inference never touches it)."""
    from monai.apps.detection.networks import retinanet_detector as rd
    from monai.utils import OptionalImportError

    for name in ("Matcher", "BalancedPositiveNegativeSampler"):
        try:
            isinstance(None, getattr(rd, name))
        except (OptionalImportError, TypeError):
            setattr(rd, name, _AbsentTorchvisionClass)


def configure_detector(detector: Any) -> Any:
    """Training setup shared by the training script and tests: ATSS matcher, hard negative sampler."""
    _without_torchvision_placeholders()
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
    detector.set_target_keys(box_key="box", label_key="label")
    return detector

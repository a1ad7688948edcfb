"""Detection, segmentation and classification runners over the DSB 2017 nodule map.

All three read the same probability map (``ai_models.nodule_map``, computed once per volume) and turn it into
nodule candidates the same way (``find_candidates``): connected components (26-connected) of the map above
``threshold``, components under ``min_voxels`` dropped, then components whose boxes are closer than
``merge_distance_mm`` (one nodule's size) merged into one candidate.

Score: the network saturates (nearly every component reaches 0.99+), so its peak probability does not rank
candidates; what separates nodules from the specks it also marks (vessel crossings, partial volume) is how
much of the map they hold. The score is ``mean probability x (1 - exp(-(d / d0) ** 3))`` with d the diameter of
the sphere of the candidate's soft volume (sum of probabilities x voxel volume) and ``d0 = size_mm``: a
monotone size-and-confidence ranking in [0, 1), about 0.63 at d = d0. It is not calibrated (no held-out
annotated set was available to calibrate it on); the operating point in metadata.json was chosen from the
measured scores of real nodules and false candidates, not from a probability of malignancy or presence.

The runners report candidates from ``floor_score`` up; the node's worker drops detections below the model's
``min_score`` (the operating point). The segmentation draws only candidates at or above ``segment_min_score``
(the same operating point), so the SEG and the SR show the same nodules; the classifier's probability is the
top candidate's score with the operating point as its threshold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ai_models.bundle import BundleContext, source_affine_xyz
from ai_models.detection import boxes_to_source, to_inclusive
from ai_models.nodule_map import NoduleMap, NoduleMapModel
from ai_models.types import (
    ClassificationResult,
    Detection,
    DetectionResult,
    ModelError,
    SegmentationResult,
    Volume,
    int3,
)


@dataclass(frozen=True)
class CandidateSettings:
    """The bundle's ``components`` item."""

    threshold: float = 0.5  # map probability a voxel must exceed to belong to a candidate
    min_voxels: int = 3  # smaller components are dropped (working voxels, 8 mm^3 each at 2 mm)
    merge_distance_mm: float = 10.0  # boxes closer than this (gap between them) are one nodule
    size_mm: float = 6.0  # d0 of the score
    floor_score: float = 0.05  # candidates below this are not reported at all

    @classmethod
    def of(cls, raw: Any) -> CandidateSettings:
        raw = dict(raw or {})
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ModelError(f"unknown components settings {sorted(unknown)}")
        s = cls(**raw)
        if not 0.0 < s.threshold < 1.0 or s.min_voxels < 1 or s.merge_distance_mm < 0 or s.size_mm <= 0:
            raise ModelError(f"components settings {s} are not usable")
        return s


@dataclass(frozen=True)
class Candidate:
    """A nodule candidate on the working grid: inclusive (z, y, x) voxel box, the component labels it holds."""

    box_min: tuple[int, int, int]
    box_max: tuple[int, int, int]
    labels: tuple[int, ...]
    voxels: int
    soft_volume_mm3: float
    mean_prob: float
    max_prob: float
    score: float


def _score(mean_prob: float, soft_volume_mm3: float, size_mm: float) -> float:
    diameter = (6.0 * soft_volume_mm3 / np.pi) ** (1.0 / 3.0)
    return float(mean_prob * (1.0 - np.exp(-((diameter / size_mm) ** 3))))


def _gap_mm(a_min: np.ndarray, a_max: np.ndarray, b_min: np.ndarray, b_max: np.ndarray, spacing: np.ndarray) -> float:
    """Distance between two inclusive voxel boxes, mm (0 when they touch or overlap)."""
    gap = np.maximum(0, np.maximum(a_min - b_max, b_min - a_max) - 1) * spacing
    return float(np.sqrt(np.sum(gap**2)))


def find_candidates(nodule_map: NoduleMap, settings: CandidateSettings) -> tuple[list[Candidate], np.ndarray]:
    """Candidates (best score first) and the component label map on the working grid."""
    prob = nodule_map.prob
    labels, n = ndimage.label(prob > settings.threshold, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return [], labels
    spacing = np.linalg.norm(nodule_map.affine_xyz[:3, :3], axis=0)[::-1]  # (z, y, x) mm
    voxel_mm3 = float(np.prod(spacing))
    idx = np.nonzero(labels)
    lab = labels[idx] - 1
    p = prob[idx].astype(np.float64)
    counts = np.bincount(lab, minlength=n)
    sums = np.bincount(lab, weights=p, minlength=n)
    maxes = np.zeros(n)
    np.maximum.at(maxes, lab, p)
    coords = np.stack(idx, axis=1)
    lo = np.full((n, 3), np.iinfo(np.int64).max)
    hi = np.full((n, 3), -1)
    for axis in range(3):
        np.minimum.at(lo[:, axis], lab, coords[:, axis])
        np.maximum.at(hi[:, axis], lab, coords[:, axis])
    kept = [i for i in range(n) if counts[i] >= settings.min_voxels]
    # merge kept components whose boxes are closer than the nodule size (union-find over the few kept)
    parent = {i: i for i in kept}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for ai, i in enumerate(kept):
        for j in kept[ai + 1 :]:
            if _gap_mm(lo[i], hi[i], lo[j], hi[j], spacing) < settings.merge_distance_mm:
                ri, rj = root(i), root(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in kept:
        groups.setdefault(root(i), []).append(i)
    candidates = []
    for members in groups.values():
        count = int(counts[members].sum())
        total = float(sums[members].sum())
        soft = total * voxel_mm3
        mean = total / count
        candidates.append(
            Candidate(
                box_min=int3(lo[members].min(axis=0)),
                box_max=int3(hi[members].max(axis=0)),
                labels=tuple(int(m) + 1 for m in members),
                voxels=count,
                soft_volume_mm3=soft,
                mean_prob=mean,
                max_prob=float(maxes[members].max()),
                score=_score(mean, soft, settings.size_mm),
            )
        )
    candidates.sort(key=lambda c: -c.score)
    return candidates, labels


def candidate_boxes_source(candidates: list[Candidate], nodule_map: NoduleMap, volume: Volume) -> np.ndarray:
    """(N, 6) continuous (z, y, x) min/max extents of the candidates' voxels on the source grid."""
    if not candidates:
        return np.zeros((0, 6))
    boxes = np.array([[*c.box_min[::-1], *c.box_max[::-1]] for c in candidates], dtype=np.float64)
    boxes[:, :3] -= 0.5  # voxel centres -> the voxels' outer faces, in xyzxyz
    boxes[:, 3:] += 0.5
    return boxes_to_source(boxes, nodule_map.affine_xyz, volume)


def _sample_trilinear(values: np.ndarray, zyx: np.ndarray) -> np.ndarray:
    """values (Z, Y, X) at continuous (N, 3) (z, y, x) points; 0 outside."""
    base = np.floor(zyx).astype(np.int64)
    frac = zyx - base
    out = np.zeros(len(zyx))
    shape = np.asarray(values.shape)
    for corner in np.ndindex(2, 2, 2):
        c = np.asarray(corner)
        idx = base + c
        inside = np.all((idx >= 0) & (idx < shape), axis=1)
        w = np.prod(np.where(c, frac, 1.0 - frac), axis=1)
        v = np.zeros(len(zyx))
        v[inside] = values[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
        out += w * v
    return out


def paint_candidates(
    candidates: list[Candidate],
    labels: np.ndarray,
    nodule_map: NoduleMap,
    volume: Volume,
    threshold: float,
    value: int = 1,
) -> np.ndarray:
    """uint8 (z, y, x) mask on the source grid: source voxels where the map of the candidates' own components,
    interpolated trilinearly, exceeds threshold. Only the candidates' boxes are visited."""
    mask = np.zeros(volume.array.shape, dtype=np.uint8)
    if not candidates:
        return mask
    src_to_work = np.linalg.inv(nodule_map.affine_xyz) @ source_affine_xyz(volume)
    extents = candidate_boxes_source(candidates, nodule_map, volume)
    shape = np.asarray(volume.array.shape)
    for cand, ext in zip(candidates, extents, strict=True):
        own = np.where(np.isin(labels, cand.labels), nodule_map.prob, 0.0).astype(np.float32)
        lo = np.clip(np.floor(ext[:3]).astype(int) - 1, 0, shape - 1)
        hi = np.clip(np.ceil(ext[3:]).astype(int) + 1, 0, shape - 1)
        zz, yy, xx = np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)), indexing="ij")
        pts = np.stack([xx.ravel(), yy.ravel(), zz.ravel(), np.ones(zz.size)], axis=1) @ src_to_work.T
        inside = _sample_trilinear(own, pts[:, 2::-1]) > threshold
        sub = mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
        sub[inside.reshape(zz.shape)] = value
    return mask


class _NoduleRunner:
    """Shared part: the map model, candidate settings, stage timings of the last run."""

    def __init__(self, ctx: BundleContext) -> None:
        self.ctx = ctx
        self.model = NoduleMapModel(ctx)
        self.settings = CandidateSettings.of(ctx.parsed("components"))
        self.timings: dict[str, float] = {}

    def candidates(self, volume: Volume) -> tuple[list[Candidate], np.ndarray, NoduleMap, float]:
        nodule_map, self.timings = self.model.map(volume)
        t0 = time.perf_counter()
        candidates, labels = find_candidates(nodule_map, self.settings)
        candidates = [c for c in candidates if c.score >= self.settings.floor_score]
        return candidates, labels, nodule_map, t0

    def _done(self, t0: float) -> None:
        self.timings["post"] = time.perf_counter() - t0


class NoduleDetectionRunner(_NoduleRunner):
    """Candidates as Detections: inclusive (z, y, x) voxel boxes on the source grid, score as above."""

    def __init__(self, ctx: BundleContext) -> None:
        super().__init__(ctx)
        labels = ctx.identity.labels
        self.label = next(iter(labels.values()), "nodule")

    def __call__(self, volume: Volume) -> DetectionResult:
        candidates, _, nodule_map, t0 = self.candidates(volume)
        extents = candidate_boxes_source(candidates, nodule_map, volume)
        detections = []
        for cand, ext in zip(candidates, extents, strict=True):
            lo, hi = to_inclusive(ext[:3], ext[3:], volume.array.shape)
            detections.append(
                Detection(
                    label=self.label,
                    score=cand.score,
                    box_min=(float(lo[0]), float(lo[1]), float(lo[2])),
                    box_max=(float(hi[0]), float(hi[1]), float(hi[2])),
                )
            )
        self._done(t0)
        return DetectionResult(identity=self.ctx.identity, detections=tuple(detections))


class NoduleSegmentationRunner(_NoduleRunner):
    """The candidates at or above ``segment_min_score`` as one label on the source grid."""

    def __init__(self, ctx: BundleContext) -> None:
        super().__init__(ctx)
        if len(ctx.identity.labels) != 1:
            raise ModelError(f"the nodule segmentation needs exactly one label, the bundle has {ctx.identity.labels}")
        self.value = next(iter(ctx.identity.labels))
        self.min_score = float(ctx.parsed("segment_min_score", 0.5))
        self.threshold = float(ctx.parsed("segment_threshold", self.settings.threshold))

    def __call__(self, volume: Volume) -> SegmentationResult:
        candidates, labels, nodule_map, t0 = self.candidates(volume)
        shown = [c for c in candidates if c.score >= self.min_score]
        mask = paint_candidates(shown, labels, nodule_map, volume, self.threshold, self.value)
        self._done(t0)
        return SegmentationResult(identity=self.ctx.identity, mask=mask)


class NoduleClassificationRunner(_NoduleRunner):
    """Nodule present: the top candidate's score, thresholded at the operating point (``threshold``)."""

    def __init__(self, ctx: BundleContext) -> None:
        super().__init__(ctx)
        labels = ctx.identity.labels
        if len(labels) != 1:
            raise ModelError(f"a presence classifier needs exactly one label, the bundle has {labels}")
        self.label = next(iter(labels.values()))
        self.threshold = float(ctx.parsed("threshold", 0.5))

    def __call__(self, volume: Volume) -> ClassificationResult:
        candidates, _, _, t0 = self.candidates(volume)
        probability = max((c.score for c in candidates), default=0.0)
        self._done(t0)
        return ClassificationResult(
            identity=self.ctx.identity, label=self.label, probability=probability, threshold=self.threshold
        )

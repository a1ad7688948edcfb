"""Plain values that cross the ai_models boundary.

Arrays are numpy, indexed (z, y, x): z follows the sorted slice order, y the rows, x the columns of the
source DICOM series. Geometry is in DICOM patient coordinates (LPS, millimetres), so results can be
placed back on the source grid and frame of reference without knowing anything about the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, SupportsFloat, SupportsInt

import numpy as np

Task = Literal["segmentation", "detection", "classification"]


def float3(values: Iterable[SupportsFloat]) -> tuple[float, float, float]:
    """Three numbers (a position, a direction) as the 3-tuple the records hold; ValueError for any other count."""
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"expected 3 values, got {len(out)}")
    return out[0], out[1], out[2]


def int3(values: Iterable[SupportsInt]) -> tuple[int, int, int]:
    """Three voxel indices as a 3-tuple; ValueError for any other count."""
    out = tuple(int(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"expected 3 values, got {len(out)}")
    return out[0], out[1], out[2]


class ModelError(Exception):
    """A model could not be loaded or run."""


class InvalidGeometryError(ValueError):
    """A series cannot be assembled into a volume (inconsistent or absurd geometry)."""


@dataclass(frozen=True)
class Volume:
    """A CT series as a volume of Hounsfield units on its own grid."""

    array: np.ndarray  # float32 (z, y, x), rescale applied
    spacing: tuple[float, float, float]  # (slice step along normal, row spacing, column spacing) in mm
    origin: tuple[float, float, float]  # LPS position of voxel (0, 0, 0), mm
    row_cosines: tuple[float, float, float]  # direction of increasing x (column index)
    column_cosines: tuple[float, float, float]  # direction of increasing y (row index)
    normal: tuple[float, float, float]  # direction of increasing z (sorted slice order)
    sop_instance_uids: tuple[str, ...]  # one per z, in order
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    # what the series' headers got wrong that was tolerated (e.g. several FrameOfReferenceUIDs), for the
    # caller to log: plain sentences, empty for a clean series
    warnings: tuple[str, ...] = ()

    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping (x, y, z, 1) voxel indices to LPS millimetres."""
        m = np.eye(4)
        m[:3, 0] = np.asarray(self.row_cosines) * self.spacing[2]
        m[:3, 1] = np.asarray(self.column_cosines) * self.spacing[1]
        m[:3, 2] = np.asarray(self.normal) * self.spacing[0]
        m[:3, 3] = self.origin
        return m

    def index_to_lps(self, zyx: np.ndarray) -> np.ndarray:
        """Map (..., 3) continuous (z, y, x) indices to (..., 3) LPS millimetres."""
        zyx = np.asarray(zyx, dtype=np.float64)
        xyz1 = np.concatenate([zyx[..., ::-1], np.ones((*zyx.shape[:-1], 1))], axis=-1)
        return (xyz1 @ self.affine_lps().T)[..., :3]


@dataclass(frozen=True)
class ModelIdentity:
    """What the result says about the algorithm that made it (IHE AI Results algorithm identification)."""

    name: str
    version: str
    task: Task
    labels: dict[int, str]  # label value -> name (background 0 excluded)
    bundle_hash: str  # sha256 of the bundle's configs and weights, hex
    device: str = "cpu"
    description: str = ""


@dataclass(frozen=True)
class SegmentationResult:
    identity: ModelIdentity
    mask: np.ndarray  # uint8 (z, y, x) label map on the source grid, values from identity.labels or 0


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box_min: tuple[float, float, float]  # (z, y, x) voxel indices on the source grid, inclusive
    box_max: tuple[float, float, float]  # (z, y, x) voxel indices, inclusive


@dataclass(frozen=True)
class DetectionResult:
    identity: ModelIdentity
    detections: tuple[Detection, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ClassificationResult:
    identity: ModelIdentity
    label: str  # the finding the probability is about, e.g. "nodule"
    probability: float
    threshold: float = 0.5

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


ModelResult = SegmentationResult | DetectionResult | ClassificationResult


def at_operating_point(result: ModelResult, min_score: float) -> ModelResult:
    """The result as reported at an operating point: detections scoring below min_score dropped; a
    classification reported present from min_score on. A segmentation has no score: unchanged."""
    if isinstance(result, DetectionResult):
        kept = tuple(d for d in result.detections if d.score >= min_score)
        return DetectionResult(identity=result.identity, detections=kept)
    if isinstance(result, ClassificationResult):
        return ClassificationResult(result.identity, result.label, result.probability, threshold=min_score)
    return result

"""Measuring model results against references: plain functions for the bench and the tests.

Lungs are scored against ``classical_lung_mask``, the textbook threshold + connected-component lung mask: air
(< -320 HU) inside the body (not connected to the outside air through an axial slice's border), a slight
opening that cuts the airways off, the two largest parts kept. No model involved.

Nodules are scored against radiologists' outlines.
The outlines are LIDC-IDRI reader annotations as exported to JSON (``annotations`` -> ``contours`` with
``points_col_row`` pixel points, the slice's ``sop_instance_uid`` and ``image_z_position``, an ``inclusion``
flag). A reader's mask is every pixel whose centre lies inside one of its inclusion contours (even-odd rule)
plus the contour points themselves (LIDC readers trace the nodule's outer boundary pixels), minus its
exclusion contours; the consensus is the voxels marked by at least ``min_readers`` readers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ai_models.types import Detection, Volume


def polygon_mask(points_col_row: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (rows, cols) mask of a closed polygon given as (col, row) pixel points: pixel centres inside
    it (even-odd rule) and the points themselves."""
    pts = np.asarray(points_col_row, dtype=np.float64).reshape(-1, 2)
    mask = np.zeros(shape, dtype=bool)
    if len(pts) == 0:
        return mask
    c0, r0 = np.maximum(np.floor(pts.min(axis=0)).astype(int), 0)
    c1 = min(int(np.ceil(pts[:, 0].max())), shape[1] - 1)
    r1 = min(int(np.ceil(pts[:, 1].max())), shape[0] - 1)
    rows, cols = np.mgrid[r0 : r1 + 1, c0 : c1 + 1]
    inside = np.zeros(rows.shape, dtype=bool)
    xa, ya = pts[:, 0], pts[:, 1]
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    for x1, y1, x2, y2 in zip(xa, ya, xb, yb, strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > rows) != (y2 > rows)
        x_at = x1 + (rows - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (cols < x_at)
    mask[r0 : r1 + 1, c0 : c1 + 1] = inside
    ci, ri = pts[:, 0].round().astype(int), pts[:, 1].round().astype(int)
    ok = (ri >= 0) & (ri < shape[0]) & (ci >= 0) & (ci < shape[1])
    mask[ri[ok], ci[ok]] = True
    return mask


def _slice_index(contour: dict[str, Any], volume: Volume, uid_index: dict[str, int]) -> int | None:
    uid = contour.get("sop_instance_uid")
    if uid in uid_index:
        return uid_index[uid]
    z = contour.get("image_z_position")
    if z is None:
        return None
    # the slice whose centre is nearest along the normal, if within half a slice
    origin = np.asarray(volume.origin)
    normal = np.asarray(volume.normal)
    k = (float(z) - origin[2]) / (normal[2] * volume.spacing[0]) if abs(normal[2]) > 1e-6 else None
    if k is None or abs(k - round(k)) > 0.5 or not 0 <= round(k) < volume.array.shape[0]:
        return None
    return round(k)


def reader_masks(annotations: dict[str, Any], volume: Volume) -> list[np.ndarray]:
    """One boolean (z, y, x) mask per reader annotation, on the volume's grid (contours on slices the volume
    does not hold are skipped)."""
    uid_index = {uid: k for k, uid in enumerate(volume.sop_instance_uids)}
    shape = volume.array.shape
    masks = []
    for ann in annotations.get("annotations", []):
        mask = np.zeros(shape, dtype=bool)
        exclusions = []
        for contour in ann.get("contours", []):
            k = _slice_index(contour, volume, uid_index)
            if k is None:
                continue
            poly = polygon_mask(np.asarray(contour["points_col_row"]), shape[1:])
            if contour.get("inclusion", True):
                mask[k] |= poly
            else:
                exclusions.append((k, poly))
        for k, poly in exclusions:
            mask[k] &= ~poly
        masks.append(mask)
    return masks


def consensus_mask(annotations_json: str | Path | dict[str, Any], volume: Volume, min_readers: int = 2) -> np.ndarray:
    """Boolean (z, y, x) mask of the voxels at least min_readers readers outlined."""
    data = annotations_json if isinstance(annotations_json, dict) else json.loads(Path(annotations_json).read_text())
    masks = reader_masks(data, volume)
    if not masks:
        return np.zeros(volume.array.shape, dtype=bool)
    return np.sum(masks, axis=0) >= min_readers


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (nonzero = inside); 1.0 when both are empty."""
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def mask_centroid_lps(mask: np.ndarray, volume: Volume) -> np.ndarray:
    """LPS mm centroid of a nonempty (z, y, x) mask."""
    idx = np.argwhere(np.asarray(mask) != 0)
    if len(idx) == 0:
        raise ValueError("empty mask has no centroid")
    return volume.index_to_lps(idx.mean(axis=0))


def detection_centre_lps(detection: Detection, volume: Volume) -> np.ndarray:
    """LPS mm centre of a detection's inclusive (z, y, x) voxel box."""
    centre = (np.asarray(detection.box_min) + np.asarray(detection.box_max)) / 2.0
    return volume.index_to_lps(centre)


@dataclass(frozen=True)
class DetectionMatch:
    """A nodule is found when a detection's box centre lies within ``radius_mm`` of its centre; every other
    detection (including a second one on a found nodule) is false."""

    found: tuple[bool, ...]  # per nodule
    distances_mm: tuple[float | None, ...]  # per nodule: the nearest detection centre, or None without detections
    false_detections: int
    scores: tuple[float, ...]  # per detection, in the given order
    true: tuple[bool, ...]  # per detection


def match_detections(
    detections: list[Detection] | tuple[Detection, ...],
    volume: Volume,
    nodule_centres_lps: list[np.ndarray] | np.ndarray,
    radius_mm: float = 10.0,
    min_score: float = 0.0,
) -> DetectionMatch:
    """Match the detections at or above min_score to the nodules (greedy, best score first)."""
    dets = sorted((d for d in detections if d.score >= min_score), key=lambda d: -d.score)
    centres = np.asarray(nodule_centres_lps, dtype=np.float64).reshape(-1, 3)
    det_centres = np.array([detection_centre_lps(d, volume) for d in dets]).reshape(-1, 3)
    dist = np.linalg.norm(det_centres[:, None, :] - centres[None, :, :], axis=2) if len(dets) else np.zeros((0, 0))
    found = [False] * len(centres)
    true = [False] * len(dets)
    for i in range(len(dets)):
        for j in np.argsort(dist[i]) if len(centres) else []:
            if dist[i, j] <= radius_mm and not found[j]:
                found[j] = True
                true[i] = True
                break
    nearest = tuple(float(dist[:, j].min()) if len(dets) else None for j in range(len(centres)))
    return DetectionMatch(
        found=tuple(found),
        distances_mm=nearest,
        false_detections=sum(not t for t in true),
        scores=tuple(d.score for d in dets),
        true=tuple(true),
    )


LUNG_HU = -320.0  # classical lung threshold


def classical_lung_mask(volume: Volume) -> np.ndarray:
    """bool (z, y, x): the lungs by threshold and connected parts, airways removed."""
    air = volume.array < LUNG_HU
    inside = np.zeros_like(air)
    for z in range(air.shape[0]):  # air touching a slice's border is outside the body
        labels, _ = ndimage.label(air[z])
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        inside[z] = air[z] & ~np.isin(labels, border)
    opened = ndimage.binary_opening(inside, structure=np.ones((1, 5, 5), dtype=bool))
    labels, count = ndimage.label(opened)
    if count == 0:
        return opened
    sizes = np.bincount(labels.ravel())[1:]
    largest = np.argsort(-sizes)[:2] + 1
    keep = [k for k in largest if sizes[k - 1] >= 0.1 * sizes.max()]
    lungs = np.isin(labels, keep)
    return ndimage.binary_fill_holes(lungs) & inside | lungs

"""SegmentationResult -> DICOM SEG (binary), in the source study, referencing the source series.

Segments: one per label that has at least one voxel, numbered 1..N in ascending label value. Empty labels
get no segment (a segment without frames says nothing to a viewer, and an all-empty SEG cannot be
encoded once empty frames are omitted); the SR reports them as "Absent" instead. Use
``segment_numbers`` for the label -> segment mapping both objects share.

Encoding: seg_fast.py for stacks of single-frame CT/MR/PET images (about 20x faster than highdicom and
with the same content); highdicom for anything else. highdicom gets a uint8 label map, never a one-hot
array: its overlap check on one-hot input costs about 3x the encode time (DESIGN §5).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import pydicom

from ai_models.types import ModelIdentity, SegmentationResult

from .codes import coding_scheme_identification, segment_coding
from .colors import segment_color
from .equipment import NodeIdentity, equipment_kwargs, seg_algorithm_identification
from .seg_fast import fast_binary_seg
from .uids import derive_uid


class EmptySegmentationError(ValueError):
    """The mask has no labelled voxel, so there is nothing to put in a SEG (the SR says "Absent")."""


# Per-slice counting by comparison (one vectorised pass per value) beats np.bincount (which first widens
# every voxel to int64) for label maps up to this many values; larger ones use bincount.
_COMPARE_MAX_VALUE = 32


def slice_label_counts(mask: np.ndarray) -> np.ndarray:
    """Voxel count per (slice, uint8 value): shape (slices, 256); a 0-d or 1-d mask counts as one slice.

    Empty slices cost one vectorised max; a slice whose largest value is small is counted one value at
    a time (compare + count_nonzero, ~30 us per value for 512x512), others by np.bincount.
    """
    if mask.dtype != np.uint8:
        raise TypeError(f"segmentation mask must be uint8, got {mask.dtype}")
    planes = mask.reshape(mask.shape[0], -1) if mask.ndim > 1 else mask.reshape(1, -1)
    counts = np.zeros((planes.shape[0], 256), dtype=np.int64)
    if planes.shape[1] == 0:
        return counts
    plane_max = planes.max(axis=1)
    for z in np.flatnonzero(plane_max):
        plane, top = planes[z], int(plane_max[z])
        if top <= _COMPARE_MAX_VALUE:
            for value in range(1, top + 1):
                counts[z, value] = np.count_nonzero(plane == value)
        else:
            counts[z] = np.bincount(plane, minlength=256)
    counts[:, 0] = planes.shape[1] - counts[:, 1:].sum(axis=1)
    return counts


def label_voxel_counts(mask: np.ndarray) -> np.ndarray:
    """Voxel count per uint8 value (length 256), without ever widening the whole volume."""
    return slice_label_counts(mask).sum(axis=0)


def segment_numbers(result: SegmentationResult, counts: np.ndarray | None = None) -> dict[int, int]:
    """Label value -> segment number for the labels present in the mask (ascending label value).

    Raises ValueError if the mask holds a value that is not one of the model's labels.
    """
    counts = label_voxel_counts(result.mask) if counts is None else counts
    present = [int(v) for v in np.flatnonzero(counts) if v != 0]
    unknown = sorted(set(present) - set(result.identity.labels))
    if unknown:
        raise ValueError(f"mask holds values {unknown} that are not labels of model {result.identity.name}")
    return {label: number for number, label in enumerate(present, start=1)}


def _content_label(identity: ModelIdentity) -> str:
    """ContentLabel is CS: upper case, digits, underscore, space; at most 16 characters."""
    label = re.sub(r"[^A-Z0-9_ ]", "_", identity.name.upper())[:16].strip()
    return label or "AI_SEGMENTATION"


def segment_tracking(source_series_uid: str, identity: ModelIdentity, label: int) -> tuple[str, str]:
    """(Tracking UID, Tracking ID) of one label's segment, shared by the SEG segment and the SR's measurement
    group about it (PS3.3 C.8.20.2: one finding, one tracking UID across objects). It depends on the series,
    model and label only, so a re-run after late arrivals tracks the same structure under the same UID."""
    name = identity.labels[label]
    return (
        derive_uid("segment-tracking", source_series_uid, identity.name, str(label), name),
        f"{name} ({identity.name})"[:64],
    )


def segment_descriptions(
    result: SegmentationResult, numbers: dict[int, int], source_series_uid: str
) -> list[hd.seg.SegmentDescription]:
    algorithm = seg_algorithm_identification(result.identity)
    descriptions = []
    for label, number in numbers.items():
        name = result.identity.labels[label]
        coding = segment_coding(name)
        tracking_uid, tracking_id = segment_tracking(source_series_uid, result.identity, label)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=coding.category,
            segmented_property_type=coding.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=tracking_uid,
            tracking_id=tracking_id,
            display_color=segment_color(name),
        )
        if coding.modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                coding.modifier
            ]
        descriptions.append(description)
    return descriptions


def _check_grid(source: Sequence[pydicom.Dataset], mask: np.ndarray) -> None:
    if not source:
        raise ValueError("no source images")
    expected = (len(source), int(source[0].Rows), int(source[0].Columns))
    if mask.shape != expected:
        raise ValueError(f"mask shape {mask.shape} does not match the source grid {expected}")


def _prepare(
    source: Sequence[pydicom.Dataset],
    result: SegmentationResult,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    node: NodeIdentity,
    series_description: str | None,
    instance_number: int,
) -> tuple[np.ndarray, dict[int, int], dict[str, Any]]:
    """Checks shared by both encoders: (per-slice counts, label -> segment number, highdicom keywords)."""
    _check_grid(source, result.mask)
    slice_counts = slice_label_counts(result.mask)
    numbers = segment_numbers(result, slice_counts.sum(axis=0))
    if not numbers:
        raise EmptySegmentationError(f"segmentation by {result.identity.name} is empty")
    identity = result.identity
    kwargs: dict[str, Any] = {
        "segment_descriptions": segment_descriptions(result, numbers, str(source[0].SeriesInstanceUID)),
        "series_instance_uid": series_uid,
        "series_number": series_number,
        "sop_instance_uid": sop_uid,
        "instance_number": instance_number,
        "content_label": _content_label(identity),
        "content_description": f"{identity.name} {identity.version}"[:64],
        "content_creator_name": "dicom-node^AI",
        "series_description": (series_description or f"AI SEG {identity.name} {identity.version}")[:64],
        "coding_schemes": coding_scheme_identification(segment_coding(identity.labels[label]) for label in numbers),
        **equipment_kwargs(node),
    }
    return slice_counts, numbers, kwargs


def build_seg(
    source: Sequence[pydicom.Dataset],
    result: SegmentationResult,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    node: NodeIdentity,
    series_description: str | None = None,
    instance_number: int = 1,
) -> pydicom.Dataset:
    """Encode ``result`` as a binary SEG on the grid of ``source`` (sorted in the mask's z order).

    Single-frame CT/MR/PET stacks take the fast encoder (seg_fast.py, same content as highdicom's);
    anything else goes through highdicom (``build_seg_highdicom``).
    Raises EmptySegmentationError when no label is present, ValueError on a mask/grid mismatch.
    """
    slice_counts, numbers, kwargs = _prepare(
        source,
        result,
        series_uid=series_uid,
        sop_uid=sop_uid,
        series_number=series_number,
        node=node,
        series_description=series_description,
        instance_number=instance_number,
    )
    fast = fast_binary_seg(source, result.mask, slice_counts, numbers, kwargs)
    if fast is not None:
        return fast
    return _highdicom_seg(source, result.mask, numbers, kwargs)


def build_seg_highdicom(
    source: Sequence[pydicom.Dataset],
    result: SegmentationResult,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    node: NodeIdentity,
    series_description: str | None = None,
    instance_number: int = 1,
) -> hd.seg.Segmentation:
    """``build_seg`` entirely through highdicom: the fallback, and the reference the fast encoder must match."""
    _, numbers, kwargs = _prepare(
        source,
        result,
        series_uid=series_uid,
        sop_uid=sop_uid,
        series_number=series_number,
        node=node,
        series_description=series_description,
        instance_number=instance_number,
    )
    return _highdicom_seg(source, result.mask, numbers, kwargs)


def _highdicom_seg(
    source: Sequence[pydicom.Dataset], mask: np.ndarray, numbers: dict[int, int], kwargs: dict[str, Any]
) -> hd.seg.Segmentation:
    if any(label != number for label, number in numbers.items()):
        lut = np.zeros(256, dtype=np.uint8)
        for label, number in numbers.items():
            lut[label] = number
        mask = lut[mask]
    return hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        omit_empty_frames=True,
        **kwargs,
    )

"""A picture of a job's result: key source slices with its SEG segments drawn over them, and its SR's findings.

Key slices: the one with the most lung (segments labelled as lung), then the centre slice of each lesion
(a connected region of any other segment), at most MAX_LESIONS of them, largest first. Each segment has a
fixed colour from PALETTE: a translucent fill and an opaque outline in exactly that colour.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from scipy import ndimage

from ai_models.volume import read_series

PALETTE = ((0, 200, 83), (41, 121, 255), (255, 23, 68), (255, 214, 0), (213, 0, 249), (0, 229, 255))
MAX_LESIONS = 6
MIN_LESION_VOXELS = 10  # smaller specks of a segment are not shown as lesions of their own
WINDOW = (-600.0, 1500.0)  # lung window: level, width (HU)
FILL_ALPHA = 0.35


@dataclass(frozen=True)
class Segment:
    label: str
    model: str
    colour: tuple[int, int, int]

    @property
    def hex(self) -> str:
        return "#" + "".join(f"{c:02x}" for c in self.colour)


@dataclass(frozen=True)
class KeySlice:
    caption: str
    png: bytes


@dataclass(frozen=True)
class Picture:
    slices: tuple[KeySlice, ...]
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Finding:
    group: str
    finding: str
    details: tuple[str, ...]


def render(series_paths: list[Path], segs: list[tuple[str, Path]]) -> Picture:
    """``segs``: (model name, SEG file) of one job; the source series is read as the worker reads it."""
    volume, _ = read_series(series_paths)
    uids = list(volume.sop_instance_uids)
    masks: list[np.ndarray] = []
    segments: list[Segment] = []
    for model, path in segs:
        seg = hd.seg.segread(path)
        numbers = list(seg.segment_numbers)
        arr = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=numbers,
            combine_segments=False,
            skip_overlap_checks=True,
            ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,
        )
        for i, n in enumerate(numbers):
            masks.append(np.asarray(arr[..., i]) > 0)
            segments.append(
                Segment(seg.get_segment_description(n).segment_label, model, PALETTE[len(segments) % len(PALETTE)])
            )
    gray = _window(volume.array)
    z_mm = volume.spacing[0]
    picks: list[tuple[str, int]] = []
    lung = [m for m, s in zip(masks, segments, strict=True) if "lung" in s.label.lower()]
    if lung:
        area = np.sum([m.sum(axis=(1, 2)) for m in lung], axis=0)
        picks.append((f"largest lung slice ({int(np.argmax(area)) + 1} of {len(uids)})", int(np.argmax(area))))
    lesions = []
    for m, s in zip(masks, segments, strict=True):
        if "lung" in s.label.lower() or not m.any():
            continue
        labelled, n = ndimage.label(m)
        sizes = ndimage.sum_labels(m, labelled, range(1, n + 1))
        for size, box in zip(sizes, ndimage.find_objects(labelled), strict=True):
            if size < MIN_LESION_VOXELS:
                continue
            z0, z1 = box[0].start, box[0].stop  # the slices the region spans
            lesions.append((float(size), s.label, (z0 + z1 - 1) // 2, (z1 - z0) * z_mm))
    for size, label, z, extent in sorted(lesions, reverse=True)[:MAX_LESIONS]:
        picks.append((f"{label}: centre slice {z + 1} of {len(uids)} ({int(size)} voxels, {extent:.0f} mm in z)", z))
    if not picks and masks:
        area = np.sum([m.sum(axis=(1, 2)) for m in masks], axis=0)
        picks.append((f"largest segmented slice ({int(np.argmax(area)) + 1})", int(np.argmax(area))))
    if not picks:
        picks.append((f"middle slice ({len(uids) // 2 + 1}; nothing segmented)", len(uids) // 2))
    slices = tuple(KeySlice(caption, _png(gray[z], [m[z] for m in masks], segments)) for caption, z in picks)
    return Picture(slices=slices, segments=tuple(segments))


def _window(hu: np.ndarray) -> np.ndarray:
    level, width = WINDOW
    out = (hu - (level - width / 2)) / width
    return (np.clip(out, 0.0, 1.0) * 255).astype(np.uint8)


def _png(gray: np.ndarray, masks: list[np.ndarray], segments: list[Segment]) -> bytes:
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for m, s in zip(masks, segments, strict=True):
        if not m.any():
            continue
        colour = np.asarray(s.colour, dtype=np.float32)
        rgb[m] = rgb[m] * (1 - FILL_ALPHA) + colour * FILL_ALPHA
        edge = m & ~ndimage.binary_erosion(m)
        rgb[edge] = colour
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(buf, "PNG", optimize=False)
    return buf.getvalue()


def sr_findings(path: Path) -> list[Finding]:
    """The SR's measurement groups as rows: tracking identifier, finding, then each measurement and
    evaluation as "name: value unit"."""
    ds = pydicom.dcmread(path)
    rows: list[Finding] = []
    for item in _walk(ds.get("ContentSequence", [])):
        if _name(item) != "Measurement Group":
            continue
        group, finding, details = "", "", []
        for child in item.get("ContentSequence", []):
            name, kind = _name(child), child.get("ValueType", "")
            if name == "Tracking Identifier":
                group = str(child.get("TextValue", ""))
            elif name == "Finding" and kind == "CODE":
                finding = _code(child)
            elif kind == "NUM":
                mv = child.MeasuredValueSequence[0]
                unit = mv.MeasurementUnitsCodeSequence[0].CodeValue
                details.append(f"{name}: {float(mv.NumericValue):.4g} {'' if unit == '1' else unit}".rstrip())
            elif kind == "CODE" and name.lower() not in ("finding category", "finding site", "algorithm family"):
                details.append(f"{name}: {_code(child)}")
            elif name.lower() == "finding site" and kind == "CODE":
                details.append(f"site: {_code(child)}")
        rows.append(Finding(group=group, finding=finding, details=tuple(details)))
    return rows


def _walk(seq: Iterable[pydicom.Dataset]) -> Iterator[pydicom.Dataset]:
    for item in seq:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _name(item: pydicom.Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeMeaning) if seq else ""


def _code(item: pydicom.Dataset) -> str:
    seq = item.get("ConceptCodeSequence")
    return str(seq[0].CodeMeaning) if seq else ""

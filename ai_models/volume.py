"""DICOM CT series -> Volume of Hounsfield units on the series' own grid.

Geometry is checked from the headers before any pixel data is decoded, so a malformed or hostile series
(inconsistent matrix, two frames of reference, duplicate slices, absurd sizes) costs a header read, not a
decode or an allocation. The volume is allocated once and filled one slice at a time, so peak memory is
the float32 volume plus one decoded slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ai_models.types import InvalidGeometryError, Volume

MAX_MATRIX = 8192  # rows or columns beyond this are not CT
MAX_SLICES = 20_000
_COS_TOL = 1e-4  # orientation cosines must agree to this
_SPACING_REL_TOL = 1e-3  # pixel spacing must agree to this fraction
_STEP_REL_TOL = 0.1  # slice steps may differ by this fraction of the mean step


@dataclass(frozen=True)
class _Header:
    path: Path
    sop_instance_uid: str
    position: np.ndarray  # (3,) LPS mm
    slope: float
    intercept: float


def _geometry_error(why: str) -> InvalidGeometryError:
    return InvalidGeometryError(f"invalid geometry: {why}")


def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise _geometry_error(f"{path.name} has no {keyword}")
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _geometry_error(f"{path.name} has a malformed {keyword}") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise _geometry_error(f"{path.name} has a malformed {keyword}")
    return arr


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise InvalidGeometryError(f"invalid geometry: cannot read {path.name}: {exc}") from exc


def _check_matrix(ds: Dataset, path: Path) -> tuple[int, int]:
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise _geometry_error(f"{path.name} has no Rows/Columns")
    rows, cols = int(rows), int(cols)
    if not (1 <= rows <= MAX_MATRIX and 1 <= cols <= MAX_MATRIX):
        raise _geometry_error(f"{path.name} has an absurd matrix {rows}x{cols}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise _geometry_error(f"{path.name} is multi-frame ({frames} frames); only single-frame CT is read")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise _geometry_error(f"{path.name} is not monochrome")
    if int(ds.get("BitsAllocated", 16)) not in (8, 16, 32):
        raise _geometry_error(f"{path.name} has BitsAllocated {ds.get('BitsAllocated')}")
    return rows, cols


def _orientation(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray]:
    iop = _floats(ds, "ImageOrientationPatient", 6, path)
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise _geometry_error(f"{path.name} has non-orthonormal ImageOrientationPatient")
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def load_series(paths: Sequence[str | Path], *, max_voxels: int = 1_500_000_000) -> Volume:
    """Read one CT series (single-frame instances, any order) into a float32 HU volume, sorted along
    the slice normal. Raises InvalidGeometryError for anything that is not one regular grid."""
    files = [Path(p) for p in paths]
    if not files:
        raise _geometry_error("no instances")
    if len(files) > MAX_SLICES:
        raise _geometry_error(f"{len(files)} instances is more than {MAX_SLICES}")

    first = _read_header(files[0])
    rows, cols = _check_matrix(first, files[0])
    if rows * cols * len(files) > max_voxels:
        raise _geometry_error(f"{rows}x{cols}x{len(files)} voxels exceeds the limit of {max_voxels}")
    row_cos, col_cos = _orientation(first, files[0])
    pixel_spacing = _floats(first, "PixelSpacing", 2, files[0])
    if np.any(pixel_spacing <= 0):
        raise _geometry_error(f"{files[0].name} has non-positive PixelSpacing")
    for_uid = str(first.get("FrameOfReferenceUID", "") or "")
    if not for_uid:
        raise _geometry_error(f"{files[0].name} has no FrameOfReferenceUID")
    series_uid = str(first.get("SeriesInstanceUID", ""))
    study_uid = str(first.get("StudyInstanceUID", ""))

    headers: list[_Header] = []
    for i, path in enumerate(files):
        ds = first if i == 0 else _read_header(path)
        if _check_matrix(ds, path) != (rows, cols):
            raise _geometry_error(f"{path.name} has a different matrix than {files[0].name}")
        r, c = _orientation(ds, path)
        if np.max(np.abs(r - row_cos)) > _COS_TOL or np.max(np.abs(c - col_cos)) > _COS_TOL:
            raise _geometry_error(f"{path.name} has a different ImageOrientationPatient")
        ps = _floats(ds, "PixelSpacing", 2, path)
        if np.max(np.abs(ps - pixel_spacing) / pixel_spacing) > _SPACING_REL_TOL:
            raise _geometry_error(f"{path.name} has a different PixelSpacing")
        if str(ds.get("FrameOfReferenceUID", "") or "") != for_uid:
            raise _geometry_error("more than one FrameOfReferenceUID")
        if str(ds.get("SeriesInstanceUID", "")) != series_uid:
            raise _geometry_error("instances from more than one series")
        headers.append(
            _Header(
                path=path,
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                position=_floats(ds, "ImagePositionPatient", 3, path),
                slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
                intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
            )
        )

    normal = np.cross(row_cos, col_cos)
    along = np.array([h.position @ normal for h in headers])
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    along = along[order]
    pixel_min = float(np.min(pixel_spacing))
    if len(headers) > 1:
        steps = np.diff(along)
        if np.any(steps < 1e-3):
            raise _geometry_error("duplicate slice positions")
        step = float(np.mean(steps))
        if np.max(np.abs(steps - step)) > _STEP_REL_TOL * step:
            raise _geometry_error("irregular slice spacing (missing or extra slices)")
        # positions must advance along the normal only (no gantry tilt / shear)
        offsets = np.array([h.position - headers[0].position for h in headers])
        inplane = np.abs(offsets @ np.stack([row_cos, col_cos], axis=1))
        if np.max(inplane) > max(0.01, 0.1 * pixel_min):
            raise _geometry_error("slice positions are not along the slice normal (tilted or sheared)")
    else:
        step = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 1.0)
    if len({h.sop_instance_uid for h in headers}) != len(headers):
        raise _geometry_error("duplicate SOPInstanceUID")

    volume = np.empty((len(headers), rows, cols), dtype=np.float32)
    for k, h in enumerate(headers):
        try:
            ds = pydicom.dcmread(h.path)
            pixels = ds.pixel_array
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, RuntimeError) as exc:
            raise InvalidGeometryError(f"invalid geometry: cannot decode {h.path.name}: {exc}") from exc
        if pixels.shape != (rows, cols):
            raise _geometry_error(f"{h.path.name} decodes to {pixels.shape}, header says {(rows, cols)}")
        out = volume[k]
        out[...] = pixels
        if h.slope != 1.0:
            out *= np.float32(h.slope)
        if h.intercept != 0.0:
            out += np.float32(h.intercept)

    return Volume(
        array=volume,
        spacing=(step, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin=tuple(float(v) for v in headers[0].position),  # type: ignore[arg-type]
        row_cosines=tuple(float(v) for v in row_cos),  # type: ignore[arg-type]
        column_cosines=tuple(float(v) for v in col_cos),  # type: ignore[arg-type]
        normal=tuple(float(v) for v in normal),  # type: ignore[arg-type]
        sop_instance_uids=tuple(h.sop_instance_uid for h in headers),
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        frame_of_reference_uid=for_uid,
    )

"""DICOM CT series -> Volume of Hounsfield units on the series' own grid.

Geometry is checked from the headers before any pixel data is decoded, so a malformed or hostile series
(inconsistent matrix, two frames of reference, duplicate slices, absurd sizes) costs a header read, not a
decode or an allocation. The volume is allocated once and filled one slice at a time (by a few threads),
so peak memory is the float32 volume plus a decoded slice per reader thread.

Each file's header is parsed once (pydicom, up to the pixel data) and kept: ``read_series`` hands the
headers to the caller, which needs them for the SEG/SR references. Uncompressed little-endian pixel data
is then read straight from its offset into numpy, with the same bit handling as pydicom's decoder; any
other transfer syntax, or anything unexpected at that offset, goes through pydicom's decoder.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ai_models.types import InvalidGeometryError, Volume

MAX_MATRIX = 8192  # rows or columns beyond this are not CT
MAX_SLICES = 20_000
_COS_TOL = 1e-4  # orientation cosines must agree to this
_SPACING_REL_TOL = 1e-3  # pixel spacing must agree to this fraction
_STEP_REL_TOL = 0.1  # slice steps may differ by this fraction of the mean step
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
# elements every slice of a series must share (the checks below and the pixel layout): compared as raw
# bytes first, so a regular series costs no value conversion per slice (pydicom's DS/IS parsing is slow)
_SHARED_TAGS = (
    0x00280002,  # SamplesPerPixel
    0x00280008,  # NumberOfFrames
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280030,  # PixelSpacing
    0x00280100,  # BitsAllocated
    0x00280101,  # BitsStored
    0x00280103,  # PixelRepresentation
    0x00281052,  # RescaleIntercept
    0x00281053,  # RescaleSlope
    0x00200037,  # ImageOrientationPatient
    0x00200052,  # FrameOfReferenceUID
    0x0020000E,  # SeriesInstanceUID
)
_NATIVE = {ExplicitVRLittleEndian: True, ImplicitVRLittleEndian: False}  # syntax -> explicit VR


def raw_values(ds: Dataset, tags: Sequence[int], *, missing_ok: bool = True) -> tuple[object, ...] | None:
    """The elements' still-encoded values (VR, byte order, bytes), in tags order, or None when one is
    already decoded (or absent, unless missing_ok: then an absent element reads as None). Slices of one
    series carry byte-identical shared elements, so comparing these tuples stands in for decoding and
    comparing each slice's values (pydicom's DS/IS parsing is slow)."""
    out: list[object] = []
    for tag in tags:
        elem = ds.get_item(tag)
        if elem is None and missing_ok:
            out.append(None)
        elif isinstance(elem, RawDataElement):
            out.append((elem.VR, elem.is_little_endian, elem.value))
        else:
            return None
    return tuple(out)


@dataclass(frozen=True)
class _Pixels:
    """How a slice's pixel data is laid out: transfer syntax and the bits pydicom's decoder looks at."""

    syntax: str
    bits: int
    stored: int
    signed: int


def _pixels_of(ds: Dataset) -> _Pixels:
    meta = getattr(ds, "file_meta", None)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    return _Pixels(
        syntax=str(getattr(meta, "TransferSyntaxUID", "") or ""),
        bits=bits,
        stored=int(ds.get("BitsStored", bits) or bits),
        signed=int(ds.get("PixelRepresentation", 0) or 0),
    )


@dataclass(frozen=True)
class _Header:
    path: Path
    sop_instance_uid: str
    position: np.ndarray  # (3,) LPS mm
    slope: float
    intercept: float
    dataset: Dataset  # the header as parsed (no pixel data)
    pixel_offset: int | None  # file offset where the pixel data element starts, when known
    pixels: _Pixels


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


def _read_header(path: Path) -> tuple[Dataset, int | None]:
    """The header up to the pixel data and the file offset where pydicom stopped (the pixel data element,
    if there is one; checked again before it is used)."""
    try:
        with path.open("rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            return ds, fh.tell()
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise InvalidGeometryError(f"invalid geometry: cannot read {path.name}: {exc}") from exc


def _native_pixels(h: _Header, rows: int, cols: int) -> np.ndarray | None:
    """The slice's stored values as pydicom's decoder would give them, read from the pixel data offset, for
    uncompressed little-endian data; None when anything differs from that (then pydicom decodes)."""
    explicit = _NATIVE.get(h.pixels.syntax)
    bits, stored, signed = h.pixels.bits, h.pixels.stored, h.pixels.signed
    if explicit is None or h.pixel_offset is None or bits not in (8, 16, 32) or not 1 <= stored <= bits:
        return None
    if signed not in (0, 1):
        return None
    nbytes = rows * cols * bits // 8
    with h.path.open("rb") as fh:
        fh.seek(h.pixel_offset)
        head = fh.read(12 if explicit else 8)
        if head[:4] != _PIXEL_DATA_TAG:
            return None
        if explicit:
            if head[4:6] not in (b"OW", b"OB") or head[6:8] != b"\0\0" or len(head) < 12:
                return None
            length = struct.unpack("<I", head[8:12])[0]
        else:
            if len(head) < 8:
                return None
            length = struct.unpack("<I", head[4:8])[0]
        if not nbytes <= length <= nbytes + 1:  # undefined length (encapsulated) and short data: pydicom
            return None
        raw = fh.read(nbytes)
    if len(raw) != nbytes:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    arr = np.frombuffer(raw, dtype=dtype).reshape(rows, cols)
    if stored < bits:  # as pydicom: unused high bits masked (unsigned) or sign-extended (signed)
        shift = bits - stored
        arr = (arr << shift) >> shift if signed else arr & dtype.type((1 << stored) - 1)
    return arr


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
    return read_series(paths, max_voxels=max_voxels)[0]


def read_series(paths: Sequence[str | Path], *, max_voxels: int = 1_500_000_000) -> tuple[Volume, list[Dataset]]:
    """load_series plus each instance's header (pixel data not read), in the volume's slice order: the
    caller gets them without parsing every file a second time."""
    files = [Path(p) for p in paths]
    if not files:
        raise _geometry_error("no instances")
    if len(files) > MAX_SLICES:
        raise _geometry_error(f"{len(files)} instances is more than {MAX_SLICES}")

    first, first_offset = _read_header(files[0])
    first_raw = raw_values(first, _SHARED_TAGS)  # before any value below is decoded
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

    first_pixels = _pixels_of(first)
    slope = float(first.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(first.get("RescaleIntercept", 0.0) or 0.0)
    syntax = first_pixels.syntax

    headers: list[_Header] = []
    for i, path in enumerate(files):
        ds, offset = (first, first_offset) if i == 0 else _read_header(path)
        same = i == 0 or (first_raw is not None and raw_values(ds, _SHARED_TAGS) == first_raw)
        if same and str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "") == syntax:
            # byte-identical to the first slice's checked elements: same geometry, layout and rescale
            headers.append(
                _Header(
                    path=path,
                    sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                    position=_floats(ds, "ImagePositionPatient", 3, path),
                    slope=slope,
                    intercept=intercept,
                    dataset=ds,
                    pixel_offset=offset,
                    pixels=first_pixels,
                )
            )
            continue
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
                dataset=ds,
                pixel_offset=offset,
                pixels=_pixels_of(ds),
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

    def fill(k: int) -> None:
        h = headers[k]
        try:
            pixels = _native_pixels(h, rows, cols)
            if pixels is None:
                pixels = pydicom.dcmread(h.path).pixel_array
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

    # reading a file and converting its slice release the GIL: a few threads keep the page cache reads and
    # the conversions busy together (a slice at a time each)
    if len(headers) > 1:
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2), thread_name_prefix="load-series") as pool:
            for _ in pool.map(fill, range(len(headers))):
                pass
    elif headers:
        fill(0)

    result = Volume(
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
    return result, [h.dataset for h in headers]

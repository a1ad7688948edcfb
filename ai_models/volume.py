"""DICOM CT series -> Volume of Hounsfield units on the series' own grid.

Geometry is checked from the headers before any pixel data is decoded, so a malformed or hostile series
(inconsistent matrix, duplicate or missing slices, tilted positions, absurd sizes) costs a header read, not a
decode or an allocation. The volume is allocated once and filled one slice at a time (by a few threads),
so peak memory is the float32 volume plus a decoded slice per reader thread.

Each file's header is parsed once (pydicom, up to the pixel data) and kept: ``read_series`` hands the
headers to the caller, which needs them for the SEG/SR references. Uncompressed little-endian pixel data
is then read straight from its offset into numpy, with the same bit handling as pydicom's decoder; any
other transfer syntax, or anything unexpected at that offset, goes through pydicom's decoder.

Real series as they come: what a series gets wrong without harm to the volume (a FrameOfReferenceUID per
slice, in-plane drift of the positions under half a pixel) is read, and said in ``Volume.warnings``; what
no volume holds without resampling or guessing (a gap, two slices at one position, gantry tilt) is refused
with an error that says where and how much.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
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

from ai_models.types import InvalidGeometryError, Volume, float3

MAX_MATRIX = 8192  # rows or columns beyond this are not CT
MAX_SLICES = 20_000
_COS_TOL = 1e-4  # orientation cosines must agree to this
_SPACING_REL_TOL = 1e-3  # pixel spacing must agree to this fraction
_STEP_REL_TOL = 0.1  # slice steps may differ by this fraction of the series' step
_DUPLICATE_MM = 0.01  # slices closer than this along the normal are at one position
_SILENT_DRIFT_PX = 0.1  # in-plane drift of the slice positions, in pixels, below which nothing is said
_MAX_DRIFT_PX = 0.5  # ... and beyond which the series is refused (see _check_tilt)
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
    0x0020000E,  # SeriesInstanceUID
)
_NATIVE: dict[str, bool] = {ExplicitVRLittleEndian: True, ImplicitVRLittleEndian: False}  # syntax -> explicit VR


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


def _syntax(ds: Dataset) -> str:
    return str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")


def _pixels_of(ds: Dataset) -> _Pixels:
    bits = int(ds.get("BitsAllocated", 0) or 0)
    return _Pixels(
        syntax=_syntax(ds),
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
    frame_of_reference_uid: str
    dataset: Dataset  # the header as parsed (no pixel data)
    pixel_offset: int | None  # file offset where the pixel data element starts, when known
    pixels: _Pixels


@dataclass(frozen=True)
class _Grid:
    """What every slice of a series must share, taken from its first file."""

    rows: int
    cols: int
    row_cos: np.ndarray  # (3,) unit
    col_cos: np.ndarray  # (3,) unit
    pixel_spacing: np.ndarray  # (2,) mm: between rows, between columns
    series_uid: str
    study_uid: str

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cos, self.col_cos)


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
    caller gets them without parsing every file a second time.

    The headers carry the volume's FrameOfReferenceUID, so whatever is built from them (SEG, SR) is in
    that one frame even where the files disagree (see ``_frame_of_reference``); what was tolerated is
    in ``Volume.warnings``."""
    files = [Path(p) for p in paths]
    if not files:
        raise _geometry_error("no instances")
    if len(files) > MAX_SLICES:
        raise _geometry_error(f"{len(files)} instances is more than {MAX_SLICES}")
    grid, headers = _read_headers(files, max_voxels)
    headers, along = _sorted_along(headers, grid.normal)
    warnings: list[str] = []
    if len(headers) > 1:
        _check_duplicates(headers, along)
        step = _slice_step(headers, along)
        warnings += _check_tilt(headers, along, grid)
    else:
        first = headers[0].dataset
        step = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 1.0)
    if len({h.sop_instance_uid for h in headers}) != len(headers):
        raise _geometry_error("duplicate SOPInstanceUID")
    for_uid, for_warnings = _frame_of_reference(headers)
    warnings += for_warnings
    volume = Volume(
        array=_decode(headers, grid.rows, grid.cols),
        spacing=(step, float(grid.pixel_spacing[0]), float(grid.pixel_spacing[1])),
        origin=float3(headers[0].position),
        row_cosines=float3(grid.row_cos),
        column_cosines=float3(grid.col_cos),
        normal=float3(grid.normal),
        sop_instance_uids=tuple(h.sop_instance_uid for h in headers),
        series_instance_uid=grid.series_uid,
        study_instance_uid=grid.study_uid,
        frame_of_reference_uid=for_uid,
        warnings=tuple(warnings),
    )
    return volume, [h.dataset for h in headers]


# ---- headers -------------------------------------------------------------------------------------------


def _grid_of(first: Dataset, path: Path, n_files: int, max_voxels: int) -> _Grid:
    rows, cols = _check_matrix(first, path)
    if rows * cols * n_files > max_voxels:
        raise _geometry_error(f"{rows}x{cols}x{n_files} voxels exceeds the limit of {max_voxels}")
    row_cos, col_cos = _orientation(first, path)
    pixel_spacing = _floats(first, "PixelSpacing", 2, path)
    if np.any(pixel_spacing <= 0):
        raise _geometry_error(f"{path.name} has non-positive PixelSpacing")
    return _Grid(
        rows,
        cols,
        row_cos,
        col_cos,
        pixel_spacing,
        str(first.get("SeriesInstanceUID", "")),
        str(first.get("StudyInstanceUID", "")),
    )


def _read_headers(files: list[Path], max_voxels: int) -> tuple[_Grid, list[_Header]]:
    """Every file's header, checked against the first file's grid. A slice whose shared elements are
    byte-identical to the first's takes the first's checked values; any other is checked in full."""
    first, first_offset = _read_header(files[0])
    first_raw = raw_values(first, _SHARED_TAGS)  # before any value below is decoded
    grid = _grid_of(first, files[0], len(files), max_voxels)
    first_pixels = _pixels_of(first)
    slope = float(first.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(first.get("RescaleIntercept", 0.0) or 0.0)
    headers: list[_Header] = []
    for i, path in enumerate(files):
        ds, offset = (first, first_offset) if i == 0 else _read_header(path)
        same = i == 0 or (first_raw is not None and raw_values(ds, _SHARED_TAGS) == first_raw)
        if same and _syntax(ds) == first_pixels.syntax:
            headers.append(_header(ds, path, offset, slope, intercept, first_pixels))
        else:
            _check_same_grid(ds, path, grid, files[0])
            headers.append(
                _header(
                    ds,
                    path,
                    offset,
                    float(ds.get("RescaleSlope", 1.0) or 1.0),
                    float(ds.get("RescaleIntercept", 0.0) or 0.0),
                    _pixels_of(ds),
                )
            )
    return grid, headers


def _header(ds: Dataset, path: Path, offset: int | None, slope: float, intercept: float, pixels: _Pixels) -> _Header:
    for_uid = str(ds.get("FrameOfReferenceUID", "") or "")
    if not for_uid:
        raise _geometry_error(f"{path.name} has no FrameOfReferenceUID")
    # the file meta's copy stands in for a SOPInstanceUID that de-identification emptied
    sop_uid = str(ds.get("SOPInstanceUID", "") or "") or str(
        getattr(getattr(ds, "file_meta", None), "MediaStorageSOPInstanceUID", "") or ""
    )
    return _Header(
        path=path,
        sop_instance_uid=sop_uid,
        position=_floats(ds, "ImagePositionPatient", 3, path),
        slope=slope,
        intercept=intercept,
        frame_of_reference_uid=for_uid,
        dataset=ds,
        pixel_offset=offset,
        pixels=pixels,
    )


def _check_same_grid(ds: Dataset, path: Path, grid: _Grid, first: Path) -> None:
    if _check_matrix(ds, path) != (grid.rows, grid.cols):
        raise _geometry_error(f"{path.name} has a different matrix than {first.name}")
    r, c = _orientation(ds, path)
    if np.max(np.abs(r - grid.row_cos)) > _COS_TOL or np.max(np.abs(c - grid.col_cos)) > _COS_TOL:
        raise _geometry_error(f"{path.name} has a different ImageOrientationPatient than {first.name}")
    ps = _floats(ds, "PixelSpacing", 2, path)
    if np.max(np.abs(ps - grid.pixel_spacing) / grid.pixel_spacing) > _SPACING_REL_TOL:
        raise _geometry_error(f"{path.name} has a different PixelSpacing than {first.name}")
    if str(ds.get("SeriesInstanceUID", "")) != grid.series_uid:
        raise _geometry_error("instances from more than one series")


# ---- positions -----------------------------------------------------------------------------------------


def _sorted_along(headers: list[_Header], normal: np.ndarray) -> tuple[list[_Header], np.ndarray]:
    """The headers sorted by their distance along the slice normal, and those distances (mm)."""
    along = np.array([h.position @ normal for h in headers])
    order = np.argsort(along, kind="stable")
    return [headers[i] for i in order], along[order]


def _check_duplicates(headers: list[_Header], along: np.ndarray) -> None:
    """Two slices at one position are two reconstructions or acquisitions mixed in one series: no single
    volume holds both, and picking one would be a guess."""
    same = np.flatnonzero(np.diff(along) < _DUPLICATE_MM)
    if len(same):
        i = int(same[0])
        raise _geometry_error(
            f"duplicate slice positions: {len(same)} slice(s) share a position with another, e.g. "
            f"{headers[i].path.name} and {headers[i + 1].path.name} at {along[i]:.2f} mm along the slice normal "
            "(two reconstructions or acquisitions in one series?)"
        )


def _slice_step(headers: list[_Header], along: np.ndarray) -> float:
    """The series' slice step (mm) when its slices lie on one regular grid along the normal.

    A gap is refused, not filled: interpolated slices under a diagnostic overlay would show what was never
    scanned. The error says where the slices are missing so the sender can resend them."""
    steps = np.diff(along)
    nominal = _nominal_step(steps)
    tol = _STEP_REL_TOL * nominal
    off = np.flatnonzero(np.abs(steps - nominal) > tol)
    if len(off):
        multiple = np.rint(steps[off] / nominal)
        if np.all((multiple >= 2) & (np.abs(steps[off] - multiple * nominal) <= tol)):
            i = int(off[0])
            missing = [along[i] + nominal * k for k in range(1, int(multiple[0]))]
            at = ", ".join(f"{v:.2f}" for v in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise _geometry_error(
                f"missing slices: {int(np.sum(multiple - 1))} slice(s) missing in {len(off)} gap(s) of a series "
                f"stepping {nominal:.3g} mm; the first gap is {steps[i]:.3g} mm between {headers[i].path.name} "
                f"and {headers[i + 1].path.name}, missing at {at} mm along the slice normal"
            )
        i = int(off[0])
        raise _geometry_error(
            f"irregular slice spacing: {steps[i]:.3g} mm between {headers[i].path.name} and "
            f"{headers[i + 1].path.name} ({along[i]:.2f} and {along[i + 1]:.2f} mm along the slice normal) in a "
            f"series stepping {nominal:.3g} mm (extra slices, or slices of another reconstruction?)"
        )
    step = float(along[-1] - along[0]) / (len(along) - 1)
    drift = np.abs(along - along[0] - step * np.arange(len(along)))
    if np.max(drift) > _STEP_REL_TOL * step:
        k = int(np.argmax(drift))
        raise _geometry_error(
            f"irregular slice spacing: {headers[k].path.name} lies {drift[k]:.3g} mm off a regular {step:.3g} mm "
            "grid along the slice normal"
        )
    return step


def _nominal_step(steps: np.ndarray) -> float:
    """The step most slices follow: the median, or the smallest step where that fits more of them (a
    series of three slices with one gap has no majority step, and gaps only lengthen steps)."""
    best, best_count = 0.0, -1
    for candidate in (float(np.median(steps)), float(np.min(steps))):
        count = int(np.count_nonzero(np.abs(steps - candidate) <= _STEP_REL_TOL * candidate))
        if count > best_count:
            best, best_count = candidate, count
    return best


def _check_tilt(headers: list[_Header], along: np.ndarray, grid: _Grid) -> list[str]:
    """Refuse slices that drift in-plane (gantry tilt, shear) by more than half a pixel; warn below that.

    The volume puts slice k at the first slice's position plus k steps along the normal; a slice whose
    real position is off that line in-plane by less than half a pixel is still nearest to the voxels it
    is stored in (the SEG's frames keep each slice's own position). Beyond that, the volume would be
    sheared: holding it needs resampling, which would change what the radiologist sees under the overlay."""
    inplane = (np.stack([h.position for h in headers]) - headers[0].position) @ np.stack(
        [grid.row_cos, grid.col_cos], axis=1
    )
    drift = np.linalg.norm(inplane, axis=1)
    k = int(np.argmax(drift))
    pixel = float(np.min(grid.pixel_spacing))
    if drift[k] <= _SILENT_DRIFT_PX * pixel:
        return []
    angle = float(np.degrees(np.arctan2(drift[k], along[k] - along[0])))
    what = (
        f"slice positions drift {drift[k]:.3g} mm in-plane over {along[k] - along[0]:.4g} mm along the slice normal "
        f"(gantry tilt or shear of {angle:.2g} degrees)"
    )
    if drift[k] > _MAX_DRIFT_PX * pixel:
        raise _geometry_error(
            f"{what}: more than half a pixel ({_MAX_DRIFT_PX * pixel:.3g} mm), so no volume holds it without "
            "resampling; send an untilted reconstruction"
        )
    return [f"{what}: under half a pixel, read as untilted"]


def _frame_of_reference(headers: list[_Header]) -> tuple[str, list[str]]:
    """One FrameOfReferenceUID for the volume, and a warning when its slices carry several.

    Slices whose orientation, spacing and positions make one regular volume are in one frame whatever UIDs
    they carry (de-identification that gives each file its own UID is common; viewers and ITK load such a
    series as one volume), so the UID most slices carry is used, ties going to the first slice along the
    normal: it does not depend on file order, and a few stray slices cannot lend the volume their UID.
    The headers are given that UID, so the SEG and SR built from them are in one frame."""
    counts = Counter(h.frame_of_reference_uid for h in headers)  # in slice order: max() keeps the first tie
    uid = max(counts, key=counts.__getitem__)
    if len(counts) == 1:
        return uid, []
    for h in headers:
        if h.frame_of_reference_uid != uid:
            h.dataset.FrameOfReferenceUID = uid
    return uid, [
        f"{len(counts)} FrameOfReferenceUIDs in one series of regular geometry: read as one volume in {uid}, "
        f"the UID of {counts[uid]} of {len(headers)} slices"
        + (" (the first along the slice normal)" if counts[uid] == 1 else "")
    ]


# ---- pixels --------------------------------------------------------------------------------------------


def _decode(headers: list[_Header], rows: int, cols: int) -> np.ndarray:
    """The float32 HU volume, allocated once and filled a slice at a time."""
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
    else:
        fill(0)
    return volume

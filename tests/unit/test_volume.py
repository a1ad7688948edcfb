"""load_series: geometry checked from headers, slices sorted along the normal, HU restored exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from ai_models.phantom import generate_phantom
from ai_models.types import InvalidGeometryError
from ai_models.volume import load_series


def _write_series(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    folder: Path,
    *,
    unsigned: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    row_cos: tuple[float, ...] = (1.0, 0.0, 0.0),
    col_cos: tuple[float, ...] = (0.0, 1.0, 0.0),
    origin: tuple[float, float, float] = (-100.0, -120.0, 50.0),
) -> list[Path]:
    """One CT file per z slice, written in reverse order so the reader must sort."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    normal = np.cross(row_cos, col_cos)
    paths: list[Path] = []
    for z in reversed(range(hu.shape[0])):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{z}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.ImageOrientationPatient = [*row_cos, *col_cos]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + normal * spacing[0] * z]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        if unsigned:
            ds.PixelRepresentation, ds.RescaleIntercept = 0, -1024
            pixels = (hu[z].astype(np.int32) + 1024).astype(np.uint16)
        else:
            ds.PixelRepresentation, ds.RescaleIntercept = 1, 0
            pixels = hu[z].astype(np.int16)
        ds.RescaleSlope = 1
        ds.PixelData = pixels.tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, pixels)
        path = folder / f"{z}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(4, shape=(12, 64, 80), spacing=(2.5, 0.8, 0.7), n_nodules=0)


def test_round_trip_sorted_and_exact(phantom, tmp_path: Path) -> None:
    paths = _write_series(phantom.hu, phantom.spacing, tmp_path)
    vol = load_series(paths)
    assert vol.array.dtype == np.float32 and vol.array.shape == phantom.hu.shape
    assert np.array_equal(vol.array, phantom.hu.astype(np.float32))
    assert vol.spacing == pytest.approx(phantom.spacing)
    assert vol.origin == pytest.approx((-100.0, -120.0, 50.0))
    assert vol.normal == pytest.approx((0.0, 0.0, 1.0))
    assert len(vol.sop_instance_uids) == 12 and len(set(vol.sop_instance_uids)) == 12
    first = pydicom.dcmread(paths[-1], stop_before_pixels=True)  # z = 0 was written last
    assert vol.sop_instance_uids[0] == first.SOPInstanceUID
    assert vol.frame_of_reference_uid == first.FrameOfReferenceUID
    assert vol.series_instance_uid == first.SeriesInstanceUID
    # the affine puts voxel (z=3) where that slice's ImagePositionPatient says
    assert vol.index_to_lps(np.array([3.0, 0.0, 0.0])) == pytest.approx([-100.0, -120.0, 50.0 + 3 * 2.5])


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_and_unsigned(phantom, tmp_path: Path, syntax: str) -> None:
    hu = phantom.hu[:3]
    paths = _write_series(hu, phantom.spacing, tmp_path, unsigned=True, transfer_syntax=syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    vol = load_series(paths)
    assert np.array_equal(vol.array, hu.astype(np.float32))


def test_oblique_orientation_sorted_along_normal(phantom, tmp_path: Path) -> None:
    c, s = np.cos(0.3), np.sin(0.3)
    row, col = (c, s, 0.0), (0.0, 0.0, -1.0)  # a tilted coronal plane
    paths = _write_series(phantom.hu[:5], phantom.spacing, tmp_path, row_cos=row, col_cos=col)
    vol = load_series(list(reversed(paths)))
    assert np.array_equal(vol.array, phantom.hu[:5].astype(np.float32))
    assert vol.normal == pytest.approx(tuple(np.cross(row, col)))


def _edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        ({"Rows": 32}, "different matrix"),
        ({"FrameOfReferenceUID": "1.2.3.4"}, "FrameOfReferenceUID"),
        ({"PixelSpacing": [0.5, 0.5]}, "PixelSpacing"),
        ({"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, "ImageOrientationPatient"),
        ({"ImagePositionPatient": [-100.0, -120.0, 50.0]}, "duplicate slice positions"),
        ({"ImagePositionPatient": [-100.0, -120.0, 51.2]}, "irregular slice spacing"),
        ({"ImagePositionPatient": [-90.0, -120.0, 50.0 + 2.5]}, "not along the slice normal"),
        ({"Columns": 60_000}, "absurd matrix"),
        ({"NumberOfFrames": 7}, "multi-frame"),
        ({"SeriesInstanceUID": "1.2.3.5"}, "more than one series"),
    ],
)
def test_bad_geometry_rejected(phantom, tmp_path: Path, edit: dict, why: str) -> None:
    paths = _write_series(phantom.hu[:4], phantom.spacing, tmp_path)
    _edit(tmp_path / "1.dcm", **edit)
    with pytest.raises(InvalidGeometryError, match=f"invalid geometry: .*{why}"):
        load_series(paths)


def test_geometry_checked_before_decoding(phantom, tmp_path: Path) -> None:
    """Too many voxels is refused from the headers alone: the (garbage) pixel data is never decoded."""
    paths = _write_series(phantom.hu[:4], phantom.spacing, tmp_path)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PixelData = b"\x01\x02"  # undecodable
        ds.save_as(p)
    with pytest.raises(InvalidGeometryError, match="exceeds the limit"):
        load_series(paths, max_voxels=4 * 64 * 80 - 1)
    with pytest.raises(InvalidGeometryError, match="cannot decode"):
        load_series(paths)


def test_empty_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(InvalidGeometryError, match="no instances"):
        load_series([])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(InvalidGeometryError, match="cannot read"):
        load_series([junk])


def test_single_slice_uses_thickness(phantom, tmp_path: Path) -> None:
    paths = _write_series(phantom.hu[:1], phantom.spacing, tmp_path)
    vol = load_series(paths)
    assert vol.array.shape == (1, 64, 80) and vol.spacing[0] == pytest.approx(2.5)


def _bits_series(
    folder: Path, stored: np.ndarray, *, bits: int, bits_stored: int, signed: int, syntax: str
) -> list[Path]:
    """Slices whose stored words carry junk above BitsStored, in an uncompressed little-endian syntax."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    paths = []
    for z in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = syntax
        ds = FileDataset(str(folder / f"{z}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * z]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits_stored, bits_stored - 1, signed
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024 if not signed else 0
        ds.PixelData = stored[z].astype(dtype).tobytes()
        ds.save_as(folder / f"{z}.dcm", enforce_file_format=True)
        paths.append(folder / f"{z}.dcm")
    return paths


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])  # explicit, implicit VR
@pytest.mark.parametrize(
    ("bits", "bits_stored", "signed"), [(16, 16, 1), (16, 12, 1), (16, 12, 0), (16, 16, 0), (8, 8, 0), (8, 6, 1)]
)
def test_native_pixels_are_what_pydicom_decodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syntax: str, bits: int, bits_stored: int, signed: int
) -> None:
    """Uncompressed little endian is read from the pixel data offset, never through pydicom's decoder, and
    gives its values exactly: junk above BitsStored masked (unsigned) or sign-extended (signed)."""
    rng = np.random.default_rng(bits * 100 + bits_stored * 10 + signed)
    words = rng.integers(0, 2**bits, size=(3, 10, 12), dtype=np.uint64)  # every bit, high ones included
    paths = _bits_series(tmp_path, words, bits=bits, bits_stored=bits_stored, signed=signed, syntax=syntax)
    expected = np.stack([pydicom.dcmread(p).pixel_array.astype(np.float32) for p in paths])
    expected += np.float32(-1024 if not signed else 0)
    full_reads: list[object] = []
    original = pydicom.dcmread

    def spy(path, *args, **kwargs):
        if not kwargs.get("stop_before_pixels"):
            full_reads.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr("ai_models.volume.pydicom.dcmread", spy)
    vol = load_series(paths)
    assert full_reads == []
    assert np.array_equal(vol.array, expected)


def test_read_series_hands_back_headers_in_slice_order(phantom, tmp_path: Path) -> None:
    from ai_models.volume import read_series

    paths = _write_series(phantom.hu[:6], phantom.spacing, tmp_path)  # written in reverse z order
    vol, headers = read_series(paths)
    assert [str(h.SOPInstanceUID) for h in headers] == list(vol.sop_instance_uids)
    assert all("PixelData" not in h for h in headers)
    assert np.array_equal(vol.array, phantom.hu[:6].astype(np.float32))


def test_pixel_offset_mismatch_falls_back_to_pydicom(phantom, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ai_models.volume as volume

    paths = _write_series(phantom.hu[:3], phantom.spacing, tmp_path)
    original = volume._read_header
    monkeypatch.setattr(volume, "_read_header", lambda p: (original(p)[0], 10))  # not the pixel data element
    assert np.array_equal(load_series(paths).array, phantom.hu[:3].astype(np.float32))


def test_per_slice_rescale_is_honoured(phantom, tmp_path: Path) -> None:
    """Slices whose shared elements differ (here the intercept) take the checked, per-slice path."""
    paths = _write_series(phantom.hu[:4], phantom.spacing, tmp_path, unsigned=True)
    _edit(tmp_path / "2.dcm", RescaleIntercept=-1000)
    vol = load_series(paths)
    expected = phantom.hu[:4].astype(np.float32)
    expected[2] += 24
    assert np.array_equal(vol.array, expected)

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
from ai_models.volume import load_series, read_series


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
    table: tuple[float, float, float] | None = None,
    frames: list[str] | None = None,
) -> list[Path]:
    """One CT file per z slice, written in reverse order so the reader must sort. Slice z lies at origin + z
    steps along ``table`` (the slice normal unless given: a gantry tilt moves the table off the normal);
    ``frames`` gives each slice its own FrameOfReferenceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    normal = np.cross(row_cos, col_cos) if table is None else np.asarray(table)
    paths: list[Path] = []
    for z in reversed(range(hu.shape[0])):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{z}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame if frames is None else frames[z]
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
        ({"Rows": 32}, "1.dcm has a different matrix than 3.dcm"),
        ({"PixelSpacing": [0.5, 0.5]}, "1.dcm has a different PixelSpacing"),
        ({"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, "1.dcm has a different ImageOrientationPatient"),
        ({"FrameOfReferenceUID": ""}, "1.dcm has no FrameOfReferenceUID"),
        (
            {"ImagePositionPatient": [-100.0, -120.0, 50.0]},
            r"duplicate slice positions: 1 slice\(s\) share a position with another, e.g. (0.dcm and 1.dcm|1.dcm and "
            r"0.dcm) at 50.00 mm",
        ),
        (
            {"ImagePositionPatient": [-100.0, -120.0, 51.2]},
            r"irregular slice spacing: 1.2 mm between 0.dcm and 1.dcm \(50.00 and 51.20 mm along the slice normal\) "
            r"in a series stepping 2.5 mm",
        ),
        (
            {"ImagePositionPatient": [-90.0, -120.0, 50.0 + 2.5]},
            r"slice positions drift 10 mm in-plane over 2.5 mm along the slice normal \(gantry tilt or shear of 76 "
            r"degrees\): more than half a pixel \(0.35 mm\)",
        ),
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


# ---- real series as they come -------------------------------------------------------------------------

REALDATA = Path(__file__).resolve().parents[3] / "shared" / "realdata" / "ct"


@pytest.mark.parametrize("order", ["written", "sorted", "shuffled"])
def test_own_frame_of_reference_per_slice_is_one_volume(phantom, tmp_path: Path, order: str) -> None:
    """De-identification that gives every slice its own FrameOfReferenceUID: one volume, with a warning, in
    the UID of the first slice along the normal, whatever the file order; the headers carry it too."""
    frames = [generate_uid() for _ in range(6)]
    paths = _write_series(phantom.hu[:6], phantom.spacing, tmp_path, frames=frames)
    if order == "sorted":
        paths = sorted(paths)
    elif order == "shuffled":
        paths = [paths[i] for i in np.random.default_rng(3).permutation(len(paths))]
    vol, headers = read_series(paths)
    assert np.array_equal(vol.array, phantom.hu[:6].astype(np.float32))
    assert vol.frame_of_reference_uid == frames[0]
    assert vol.warnings == (
        f"6 FrameOfReferenceUIDs in one series of regular geometry: read as one volume in {frames[0]}, the UID of "
        "1 of 6 slices (the first along the slice normal)",
    )
    assert {str(h.FrameOfReferenceUID) for h in headers} == {frames[0]}


def test_most_common_frame_of_reference_wins(phantom, tmp_path: Path) -> None:
    main, stray = generate_uid(), generate_uid()
    paths = _write_series(phantom.hu[:4], phantom.spacing, tmp_path, frames=[stray, main, main, main])
    vol, headers = read_series(paths)
    assert vol.frame_of_reference_uid == main
    assert "2 FrameOfReferenceUIDs" in vol.warnings[0] and "the UID of 3 of 4 slices" in vol.warnings[0]
    assert {str(h.FrameOfReferenceUID) for h in headers} == {main}


def test_one_frame_of_reference_has_no_warning(phantom, tmp_path: Path) -> None:
    vol = load_series(_write_series(phantom.hu[:3], phantom.spacing, tmp_path))
    assert vol.warnings == ()


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        ({"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, "1.dcm has a different ImageOrientationPatient"),
        ({"PixelSpacing": [0.5, 0.5]}, "1.dcm has a different PixelSpacing"),
        ({"ImagePositionPatient": [-100.0, -119.0, 52.5]}, r"slice positions drift 1 mm in-plane .* of 22 degrees"),
    ],
)
def test_frames_of_reference_do_not_excuse_inconsistent_geometry(phantom, tmp_path: Path, edit: dict, why: str) -> None:
    paths = _write_series(phantom.hu[:4], phantom.spacing, tmp_path, frames=[generate_uid() for _ in range(4)])
    _edit(tmp_path / "1.dcm", **edit)
    with pytest.raises(InvalidGeometryError, match=f"invalid geometry: {why}"):
        load_series(paths)


def test_missing_slices_are_located(phantom, tmp_path: Path) -> None:
    """A gap is refused, never filled: the error says how many slices are missing and where."""
    paths = _write_series(phantom.hu[:10], phantom.spacing, tmp_path)  # z = 50.0, 52.5, ..., 72.5
    for z in (4, 5, 8):
        (tmp_path / f"{z}.dcm").unlink()
    with pytest.raises(
        InvalidGeometryError,
        match=r"invalid geometry: missing slices: 3 slice\(s\) missing in 2 gap\(s\) of a series stepping 2.5 mm; the "
        r"first gap is 7.5 mm between 3.dcm and 6.dcm, missing at 60.00, 62.50 mm along the slice normal$",
    ):
        load_series([p for p in paths if p.exists()])


def test_a_gap_in_three_slices_is_a_gap(phantom, tmp_path: Path) -> None:
    paths = _write_series(phantom.hu[:4], phantom.spacing, tmp_path)
    (tmp_path / "1.dcm").unlink()
    with pytest.raises(InvalidGeometryError, match=r"missing slices: 1 slice\(s\) .* missing at 52.50 mm"):
        load_series([p for p in paths if p.exists()])


def test_two_reconstructions_in_one_series_are_refused(phantom, tmp_path: Path) -> None:
    """A second reconstruction at the same positions (same series and frame) doubles every position."""
    paths = _write_series(phantom.hu[:3], phantom.spacing, tmp_path / "a")
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    again = _write_series(phantom.hu[:3], phantom.spacing, tmp_path / "b")
    for p in again:
        _edit(p, SeriesInstanceUID=first.SeriesInstanceUID, FrameOfReferenceUID=first.FrameOfReferenceUID)
    with pytest.raises(InvalidGeometryError, match=r"duplicate slice positions: 3 slice\(s\) share a position"):
        load_series(paths + again)


def _tilted(tilt_degrees: float) -> dict[str, tuple[float, float, float]]:
    """Gantry tilt: the image plane tilts about the row direction while the table moves along the patient."""
    t = np.radians(tilt_degrees)
    return {"col_cos": (0.0, float(np.cos(t)), float(np.sin(t))), "table": (0.0, 0.0, 1.0)}


def test_gantry_tilt_beyond_half_a_pixel_is_refused_with_its_angle(phantom, tmp_path: Path) -> None:
    paths = _write_series(phantom.hu, phantom.spacing, tmp_path, **_tilted(2.0))  # 12 slices, 2.5 mm: 0.96 mm
    with pytest.raises(InvalidGeometryError, match=r"gantry tilt or shear of 2 degrees\): more than half a pixel"):
        load_series(paths)


def test_slight_tilt_within_half_a_pixel_is_read_with_a_warning(phantom, tmp_path: Path) -> None:
    paths = _write_series(phantom.hu, phantom.spacing, tmp_path, **_tilted(0.6))  # 0.29 mm over 11 steps
    vol = load_series(paths)
    assert np.array_equal(vol.array, phantom.hu.astype(np.float32))
    assert len(vol.warnings) == 1 and "tilt or shear of 0.6 degrees): under half a pixel" in vol.warnings[0]
    # the grid's slice step is the spacing along the normal, not along the table
    assert vol.spacing[0] == pytest.approx(2.5 * np.cos(np.radians(0.6)))


def test_deidentified_jpeg2000_without_sop_instance_uid(phantom, tmp_path: Path) -> None:
    """As the TotalSegmentator example: JPEG 2000 lossless, the dataset's SOPInstanceUID emptied by
    de-identification; the file meta's Media Storage SOP Instance UID names each slice."""
    hu = phantom.hu[:3]
    paths = _write_series(hu, phantom.spacing, tmp_path, unsigned=True, transfer_syntax=JPEG2000Lossless)
    for p in paths:
        _edit(p, SOPInstanceUID="")
    vol = load_series(paths)
    assert np.array_equal(vol.array, hu.astype(np.float32))
    metas = [str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID) for p in paths]
    assert vol.sop_instance_uids == tuple(reversed(metas))  # written from the last z down


def _needs(name: str) -> Path:
    folder = REALDATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is not here (../shared is optional)")
    return folder


def test_real_jpeg2000_series_is_what_pydicom_decodes() -> None:
    paths = sorted(_needs("totalsegmentator_example_ct_dicom").iterdir())
    vol = load_series(paths)
    assert vol.array.shape == (20, 512, 512)
    by_uid = {}
    for p in paths:
        ds = pydicom.dcmread(p)
        hu = ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)
        by_uid[str(ds.file_meta.MediaStorageSOPInstanceUID)] = (float(ds.ImagePositionPatient[2]), hu)
    assert [by_uid[u][0] for u in vol.sop_instance_uids] == sorted(z for z, _ in by_uid.values())
    assert np.array_equal(vol.array, np.stack([by_uid[u][1] for u in vol.sop_instance_uids]))
    assert -1100 < vol.array.min() < -900 and vol.array.max() > 1000  # air and bone: HU, not stored values


def test_real_series_with_a_frame_of_reference_per_slice() -> None:
    paths = sorted(_needs("LIDC-IDRI-0314-slab").iterdir())
    vol, headers = read_series(paths)
    assert vol.array.shape == (64, 512, 512) and vol.spacing[0] == pytest.approx(1.0)
    first = min(paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    assert vol.frame_of_reference_uid == pydicom.dcmread(first, stop_before_pixels=True).FrameOfReferenceUID
    assert vol.warnings[0].startswith("64 FrameOfReferenceUIDs in one series of regular geometry")
    assert {str(h.FrameOfReferenceUID) for h in headers} == {vol.frame_of_reference_uid}

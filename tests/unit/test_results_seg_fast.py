"""The fast SEG encoder against highdicom (the reference) and against a plain pydicom decode.

build_seg takes seg_fast.py for stacks of single-frame images; build_seg_highdicom is the highdicom path.
Both must give the same DICOM: same module attributes, same frames in the same order with the same
references, positions and dimension indices, same bits. Independently of highdicom, the masks must
decode back by hand: unpack PixelData LSB first, frames back to back, and place each frame by its
Segment Identification and its Derivation Image source reference (and by its plane position).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, SecondaryCaptureImageStorage

from ai_models.types import SegmentationResult
from dicom_node.results.seg import build_seg, build_seg_highdicom, label_voxel_counts, slice_label_counts
from dicom_node.results.seg_fast import fast_binary_seg, pack_frames

from .results_helpers import NODE, dciodvfy_errors, identity, lung_nodule_mask, make_ct_series, sphere, write

UIDS = {"series_uid": "2.25.11", "sop_uid": "2.25.12", "series_number": 901, "node": NODE}
# Differ between any two encodings by design (creation time, random dimension organization UID).
VOLATILE = {
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "ContributingEquipmentSequence",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
    "PixelData",
}


def _round_trip(ds: pydicom.Dataset, transfer_syntax: str | None = None) -> pydicom.Dataset:
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buf.getvalue()))


def _assert_same_as_highdicom(
    source: list[pydicom.Dataset],
    mask: np.ndarray,
    labels: dict[int, str] | None = None,
) -> pydicom.Dataset:
    result = SegmentationResult(identity(labels=labels), mask)
    fast = build_seg(source, result, **UIDS)
    assert not isinstance(fast, hd.seg.Segmentation), "expected the fast path"
    ours, ref = _round_trip(fast), _round_trip(build_seg_highdicom(source, result, **UIDS))
    assert set(ours.dir()) == set(ref.dir())
    for keyword in sorted(set(ref.dir()) - VOLATILE):
        assert ours[keyword] == ref[keyword], keyword
    assert [d.DimensionIndexPointer for d in ours.DimensionIndexSequence] == [
        d.DimensionIndexPointer for d in ref.DimensionIndexSequence
    ]
    n_bytes = (int(ref.NumberOfFrames) * ref.Rows * ref.Columns + 7) // 8  # highdicom pads with "0", we with NUL
    assert ours.PixelData[:n_bytes] == ref.PixelData[:n_bytes]
    assert len(ours.PixelData) == len(ref.PixelData) and len(ours.PixelData) % 2 == 0
    return ours


def _decode_by_hand(seg: pydicom.Dataset, source: list[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """Segment-number label maps placed (by source reference, by plane position), plain pydicom and numpy."""
    rows, cols, n_frames = seg.Rows, seg.Columns, int(seg.NumberOfFrames)
    bits = np.unpackbits(np.frombuffer(seg.PixelData, dtype=np.uint8), bitorder="little")
    frames = bits[: n_frames * rows * cols].reshape(n_frames, rows, cols)
    by_uid = {ds.SOPInstanceUID: z for z, ds in enumerate(source)}
    by_position = {tuple(round(float(v), 4) for v in ds.ImagePositionPatient): z for z, ds in enumerate(source)}
    shared = seg.SharedFunctionalGroupsSequence[0]
    by_ref = np.zeros((len(source), rows, cols), dtype=np.uint8)
    by_pos = np.zeros_like(by_ref)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        ident = (
            item.SegmentIdentificationSequence
            if "SegmentIdentificationSequence" in item
            else (shared.SegmentIdentificationSequence)
        )
        number = int(ident[0].ReferencedSegmentNumber)
        refs = item.DerivationImageSequence[0].SourceImageSequence
        assert len(refs) == 1 and refs[0].SpatialLocationsPreserved == "YES"
        z_ref = by_uid[refs[0].ReferencedSOPInstanceUID]
        z_pos = by_position[tuple(round(float(v), 4) for v in item.PlanePositionSequence[0].ImagePositionPatient)]
        assert frame.any(), "empty frame stored"
        assert not (by_ref[z_ref][frame == 1]).any(), "overlapping frames"
        by_ref[z_ref][frame == 1] = number
        by_pos[z_pos][frame == 1] = number
    return by_ref, by_pos


def _renumbered(mask: np.ndarray) -> np.ndarray:
    """Label values -> segment numbers 1..N in ascending label order (what the SEG stores)."""
    lut = np.zeros(256, dtype=np.uint8)
    for number, label in enumerate(np.flatnonzero(label_voxel_counts(mask))[1:], start=1):
        lut[label] = number
    return lut[mask]


@pytest.fixture(scope="module")
def series() -> list[pydicom.Dataset]:
    return make_ct_series(20, 64, 64, with_pixels=False)


def test_matches_highdicom_and_decodes_by_hand(series: list[pydicom.Dataset], tmp_path: Path) -> None:
    mask = lung_nodule_mask((20, 64, 64))
    seg = _assert_same_as_highdicom(series, mask)
    by_ref, by_pos = _decode_by_hand(seg, series)
    np.testing.assert_array_equal(by_ref, mask)
    np.testing.assert_array_equal(by_pos, mask)
    assert dciodvfy_errors(write(seg, tmp_path / "seg.dcm")) == []


def test_descending_source_order_matches_highdicom(series: list[pydicom.Dataset]) -> None:
    source = series[::-1]
    mask = lung_nodule_mask((20, 64, 64))
    mask[:6] = 0  # asymmetric in z
    seg = _assert_same_as_highdicom(source, mask)
    np.testing.assert_array_equal(_decode_by_hand(seg, source)[0], mask)


def test_single_segment_uses_shared_identification_and_3d_organisation(
    series: list[pydicom.Dataset], tmp_path: Path
) -> None:
    mask = np.zeros((20, 64, 64), dtype=np.uint8)
    mask[sphere((20, 64, 64), (10, 20, 40), (3, 5, 5))] = 2  # nodule only -> segment 1
    seg = _assert_same_as_highdicom(series, mask)
    assert "SegmentIdentificationSequence" in seg.SharedFunctionalGroupsSequence[0]
    assert "SegmentIdentificationSequence" not in seg.PerFrameFunctionalGroupsSequence[0]
    assert seg.DimensionOrganizationType == "3D"
    np.testing.assert_array_equal(_decode_by_hand(seg, series)[0], _renumbered(mask))
    assert dciodvfy_errors(write(seg, tmp_path / "one.dcm")) == []


def test_frame_size_not_a_multiple_of_8_runs_frames_together(tmp_path: Path) -> None:
    shape = (9, 63, 61)
    source = make_ct_series(*shape, with_pixels=False, seed=4)
    mask = lung_nodule_mask(shape)
    seg = _assert_same_as_highdicom(source, mask)
    np.testing.assert_array_equal(_decode_by_hand(seg, source)[0], mask)
    assert dciodvfy_errors(write(seg, tmp_path / "odd.dcm")) == []
    decoded = hd.seg.segread(tmp_path / "odd.dcm").get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source], combine_segments=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(decoded, mask)


def test_irregular_spacing_oblique_and_declared_spacing_match_highdicom() -> None:
    shape = (8, 32, 32)
    mask = lung_nodule_mask(shape)
    gap = make_ct_series(*shape, with_pixels=False, seed=5)
    for ds in gap[4:]:  # a missing slice: no regular spacing, so no SpacingBetweenSlices
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 2.5]
    assert (
        "SpacingBetweenSlices"
        not in _assert_same_as_highdicom(gap, mask).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    )

    oblique = make_ct_series(*shape, with_pixels=False, seed=6)
    c, s = np.cos(0.3), np.sin(0.3)
    row, col = np.array([c, s, 0.0]), np.array([-s * 0.8, c * 0.8, 0.6])
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    for k, ds in enumerate(oblique):
        ds.ImageOrientationPatient = [*row.round(6), *col.round(6)]
        ds.ImagePositionPatient = list((np.array([-10.0, 5.0, 30.0]) + 1.7 * k * normal).round(4))
    _assert_same_as_highdicom(oblique, mask)

    declared = make_ct_series(*shape, with_pixels=False, seed=7)
    for ds in declared:
        ds.SpacingBetweenSlices = 2.5
    _assert_same_as_highdicom(declared, mask)


def test_sparse_label_values_renumbered_like_highdicom(series: list[pydicom.Dataset]) -> None:
    labels = {3: "liver", 40: "spleen", 200: "wobble"}
    mask = np.zeros((20, 64, 64), dtype=np.uint8)
    mask[2:6, 10:20, 10:20] = 40
    mask[5:9, 30:40, 30:40] = 200
    seg = _assert_same_as_highdicom(series, mask, labels)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["spleen", "wobble"]
    np.testing.assert_array_equal(_decode_by_hand(seg, series)[0], _renumbered(mask))


def test_raw_sequences_read_in_memory_and_after_other_transfer_syntax(series: list[pydicom.Dataset]) -> None:
    mask = lung_nodule_mask((20, 64, 64))
    result = SegmentationResult(identity(), mask)
    seg = build_seg(series, result, **UIDS)
    in_memory = hd.seg.Segmentation.from_dataset(seg, copy=True)  # parses the raw elements
    uids = [ds.SOPInstanceUID for ds in series]
    kwargs = {"combine_segments": True, "assert_missing_frames_are_empty": True}
    np.testing.assert_array_equal(in_memory.get_pixels_by_source_instance(uids, **kwargs), mask)
    assert len(seg.SourceImageSequence) == len(series)
    assert [r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence] == uids
    implicit = _round_trip(build_seg(series, result, **UIDS), ImplicitVRLittleEndian)  # raw -> re-encoded
    np.testing.assert_array_equal(
        hd.seg.Segmentation.from_dataset(implicit).get_pixels_by_source_instance(uids, **kwargs), mask
    )


def test_sources_outside_the_fast_path_fall_back_to_highdicom(series: list[pydicom.Dataset]) -> None:
    mask = lung_nodule_mask((20, 64, 64))
    result = SegmentationResult(identity(), mask)
    other = [pydicom.Dataset(ds) for ds in series]
    for ds in other:
        ds.SOPClassUID = SecondaryCaptureImageStorage
    seg = build_seg(other, result, **UIDS)
    assert isinstance(seg, hd.seg.Segmentation)
    dup = [pydicom.Dataset(ds) for ds in series]
    dup[3].ImagePositionPatient = dup[2].ImagePositionPatient
    counts = slice_label_counts(mask)
    assert fast_binary_seg(dup, mask, counts, {1: 1, 2: 2}, {}) is None
    with pytest.raises(ValueError, match="duplicates"):
        build_seg(dup, result, **UIDS)  # highdicom's error, as before


def test_slice_label_counts_match_bincount() -> None:
    rng = np.random.default_rng(1)
    small = rng.integers(0, 5, (6, 17, 13), dtype=np.uint8)
    small[2] = 0
    wide = rng.integers(0, 256, (3, 40, 40), dtype=np.uint8)  # above the compare limit: bincount path
    for mask in (small, wide):
        expected = np.stack([np.bincount(p.ravel(), minlength=256) for p in mask])
        np.testing.assert_array_equal(slice_label_counts(mask), expected)
        np.testing.assert_array_equal(label_voxel_counts(mask), expected.sum(axis=0))
    np.testing.assert_array_equal(label_voxel_counts(np.array([0, 3, 3], dtype=np.uint8))[:4], [1, 0, 0, 2])
    with pytest.raises(TypeError):
        slice_label_counts(small.astype(np.int16))


@pytest.mark.parametrize("shape", [(4, 8, 8), (5, 3, 7)])
def test_pack_frames_is_one_lsb_first_bitstream(shape: tuple[int, int, int]) -> None:
    mask = np.random.default_rng(2).integers(0, 3, shape, dtype=np.uint8)
    frames = [(1, 0), (2, 0), (1, 3), (2, 4 % shape[0])]
    packed = pack_frames(mask, frames)
    stream = np.concatenate([(mask[z] == label).ravel() for label, z in frames])
    expected = np.packbits(stream, bitorder="little").tobytes()
    assert packed[: len(expected)] == expected and len(packed) % 2 == 0
    assert set(packed[len(expected) :]) <= {0}

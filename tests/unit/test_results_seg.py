"""DICOM SEG from segmentation results: valid (dciodvfy), decodes back to the input, coded, deterministic."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from ai_models.bundle import read_metadata
from ai_models.types import SegmentationResult
from dicom_node.results import EmptySegmentationError, build_seg, derive_uid
from dicom_node.results.codes import PRIVATE_SCHEME, normalise_label, segment_coding
from tests.unit.test_bundle import ZOO

from .results_helpers import (
    NODE,
    dciodvfy_errors,
    identity,
    lung_nodule_mask,
    make_ct_series,
    seg_uids,
    sphere,
    sr_uids,
    write,
)

SHAPE = (20, 64, 64)


def _build(source: list[pydicom.Dataset], result: SegmentationResult, **kw: object) -> pydicom.Dataset:
    uids = seg_uids(source, result.identity)
    return build_seg(
        source, result, series_uid=uids.series_uid, sop_uid=uids.sop_uid, series_number=901, node=NODE, **kw
    )


def _decoded_label_map(seg: hd.seg.Segmentation, source: list[pydicom.Dataset]) -> np.ndarray:
    """Segment-number label map on the source grid, one plane per source instance in order."""
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in source],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )


@pytest.fixture(scope="module")
def source() -> list[pydicom.Dataset]:
    return make_ct_series(*SHAPE, with_pixels=False)  # worker reads headers only


@pytest.fixture(scope="module")
def lung_seg_file(tmp_path_factory: pytest.TempPathFactory, source: list[pydicom.Dataset]) -> tuple[Path, np.ndarray]:
    mask = lung_nodule_mask(SHAPE)
    seg = _build(source, SegmentationResult(identity(), mask), series_description="Lungs and nodules")
    return write(seg, tmp_path_factory.mktemp("seg") / "seg.dcm"), mask


def test_seg_passes_dciodvfy(lung_seg_file: tuple[Path, np.ndarray]) -> None:
    path, _ = lung_seg_file
    assert dciodvfy_errors(path) == []


def test_seg_decodes_to_input_mask_on_source_grid(
    lung_seg_file: tuple[Path, np.ndarray], source: list[pydicom.Dataset]
) -> None:
    path, mask = lung_seg_file
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    np.testing.assert_array_equal(_decoded_label_map(seg, source), mask)
    # only frames with content are stored: one per (non-empty slice, segment)
    expected_frames = sum(int(np.any(mask[z] == s)) for z in range(SHAPE[0]) for s in (1, 2))
    assert int(seg.NumberOfFrames) == expected_frames < 2 * SHAPE[0]


def test_seg_references_source_study_series_and_frame(
    lung_seg_file: tuple[Path, np.ndarray], source: list[pydicom.Dataset]
) -> None:
    seg = hd.seg.segread(lung_seg_file[0])
    first = source[0]
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.PatientID == first.PatientID and seg.PatientName == first.PatientName
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    assert seg.SeriesNumber == 901 and seg.SeriesDescription == "Lungs and nodules"
    assert seg.Manufacturer == NODE.manufacturer and seg.SoftwareVersions == NODE.software_version
    assert seg.DeviceSerialNumber == NODE.device_serial_number
    assert seg.ContentLabel == "CHEST_CT_SEG"


def test_seg_segments_are_coded_with_algorithm_identification(lung_seg_file: tuple[Path, np.ndarray]) -> None:
    seg = hd.seg.segread(lung_seg_file[0])
    assert seg.get_segment_numbers() == [1, 2]
    lung, nodule = seg.get_segment_description(1), seg.get_segment_description(2)
    assert (lung.segment_label, lung.segmented_property_type.value) == ("lung", "39607008")
    assert lung.segmented_property_category.value == "91723000"
    assert (nodule.segment_label, nodule.segmented_property_type.value) == ("nodule", "786838002")
    assert nodule.segmented_property_category.value == "49755003"
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "chest-ct-seg"
        assert algorithm.AlgorithmVersion == "1.0.0 sha256:ab12cd34ef56"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence


def test_only_present_labels_become_segments_renumbered(source: list[pydicom.Dataset], tmp_path: Path) -> None:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[sphere(SHAPE, (10, 20, 40), (3, 5, 5))] = 2  # nodule only, no lung
    seg = hd.seg.segread(write(_build(source, SegmentationResult(identity(), mask)), tmp_path / "s.dcm"))
    assert seg.get_segment_numbers() == [1]
    assert seg.get_segment_description(1).segment_label == "nodule"
    np.testing.assert_array_equal(_decoded_label_map(seg, source), (mask == 2).astype(np.uint8))


def test_btcv_labels_coded_with_laterality_and_private_fallback(source: list[pydicom.Dataset], tmp_path: Path) -> None:
    labels = {1: "spleen", 2: "Left Kideny", 3: "Portal and Splenic Veins", 4: "Right adrenal gland", 5: "wobble"}
    mask = np.zeros(SHAPE, dtype=np.uint8)
    for label in labels:
        mask[label * 3 : label * 3 + 2, 10:20, 10:20] = label
    path = write(_build(source, SegmentationResult(identity(labels=labels), mask)), tmp_path / "btcv.dcm")
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    items = {int(i.SegmentNumber): i for i in ds.SegmentSequence}
    types = {n: i.SegmentedPropertyTypeCodeSequence[0] for n, i in items.items()}
    assert (types[1].CodeValue, types[1].CodingSchemeDesignator) == ("78961009", "SCT")
    assert types[2].CodeValue == "64033007"  # kidney + Left modifier
    assert types[2].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    assert types[4].CodeValue == "23451007"
    assert types[4].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    assert types[3].CodingSchemeDesignator == PRIVATE_SCHEME
    assert types[5].CodingSchemeDesignator == PRIVATE_SCHEME and types[5].CodeMeaning == "wobble"
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
    np.testing.assert_array_equal(_decoded_label_map(hd.seg.segread(path), source), mask)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("Liver", "10200004"),
        ("Gallbladder", "28231008"),
        ("Esophagus", "32849002"),
        ("Stomach", "69695003"),
        ("Aorta", "15825003"),
        ("IVC", "64131007"),
        ("Pancreas", "15776009"),
        ("lung", "39607008"),
    ],
)
def test_btcv_organs_have_snomed_codes(name: str, code: str) -> None:
    coding = segment_coding(name)
    assert (coding.type.value, coding.type.scheme_designator, coding.category.value) == (code, "SCT", "91723000")


@pytest.mark.parametrize(
    ("name", "code", "side"),
    [  # TotalSegmentator's class names, as the model zoo's wholeBody_ct_segmentation carries them
        ("vertebrae_L5", "49668003", None),
        ("vertebrae_C1", "14806007", None),
        ("vertebrae_T12", "23215003", None),
        ("rib_left_1", "113197003", "7771000"),
        ("rib_right_12", "113197003", "24028007"),
        ("lung_upper_lobe_left", "45653009", "7771000"),
        ("lung_middle_lobe_right", "72481006", None),
        ("iliac_vena_right", "244411005", "24028007"),
        ("heart_ventricle_left", "87878005", None),
        ("clavicula_left", "51299004", "7771000"),
        ("urinary_bladder", "89837001", None),
        ("small_bowel", "30315005", None),
    ],
)
def test_totalsegmentator_classes_have_snomed_codes(name: str, code: str, side: str | None) -> None:
    coding = segment_coding(name)
    assert (coding.type.value, coding.type.scheme_designator, coding.category.value) == (code, "SCT", "91723000")
    assert (coding.modifier.value if coding.modifier else None) == side


@pytest.mark.skipif(not (ZOO / "wholeBody_ct_segmentation").is_dir(), reason="model-zoo configs not present")
def test_most_whole_body_classes_are_coded_in_snomed() -> None:
    """Of the 104 classes, only those SNOMED CT as DICOM ships it has no concept for stay private (the
    gluteal, iliopsoas and autochthonous muscles, the myocardium, and the BTCV-style portal+splenic vein)."""
    labels = read_metadata(ZOO / "wholeBody_ct_segmentation").labels.values()
    private = sorted(n for n in labels if segment_coding(n).type.scheme_designator == PRIVATE_SCHEME)
    assert len(private) == 12, private
    assert all(n.split("_")[0] in {"gluteus", "autochthon", "iliopsoas", "heart", "portal"} for n in private), private
    assert not any(n.startswith(("vertebrae", "rib", "lung")) for n in private)


def test_unknown_label_codes_are_stable_and_distinct() -> None:
    assert normalise_label("  Left_Kideny ") == "left kidney"
    a, b = segment_coding("thing one"), segment_coding("thing two")
    assert a.type.value != b.type.value and len(a.type.value) <= 16
    assert segment_coding("Thing_One").type.value == a.type.value


def test_empty_segmentation_is_refused(source: list[pydicom.Dataset]) -> None:
    with pytest.raises(EmptySegmentationError):
        _build(source, SegmentationResult(identity(), np.zeros(SHAPE, dtype=np.uint8)))


def test_mask_grid_mismatch_and_unknown_values_are_refused(source: list[pydicom.Dataset]) -> None:
    with pytest.raises(ValueError, match="source grid"):
        _build(source, SegmentationResult(identity(), np.ones((19, 64, 64), dtype=np.uint8)))
    bad = np.zeros(SHAPE, dtype=np.uint8)
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        _build(source, SegmentationResult(identity(), bad))


def test_derive_uid_is_deterministic_valid_and_sensitive() -> None:
    uid = derive_uid("1.2.3", "model", "1.0")
    assert uid == derive_uid("1.2.3", "model", "1.0")
    assert UID(uid).is_valid and len(uid) <= 64 and uid.startswith("2.25.")
    assert uid != derive_uid("1.2.3", "model", "1.1")
    assert derive_uid("a", "bc") != derive_uid("ab", "c")


def test_seg_uids_repeat_for_same_inputs_and_change_with_model_version(source: list[pydicom.Dataset]) -> None:
    mask = lung_nodule_mask(SHAPE)
    first = _build(source, SegmentationResult(identity(), mask))
    again = _build(source, SegmentationResult(identity(), mask))
    newer = _build(source, SegmentationResult(identity(version="1.1.0"), mask))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert first.SegmentSequence[0].TrackingUID == again.SegmentSequence[0].TrackingUID
    assert first.SOPInstanceUID != newer.SOPInstanceUID
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID
    sr = sr_uids(source, "chest", [identity()])
    assert sr.sop_uid != first.SOPInstanceUID


def test_seg_from_headers_read_without_pixels_in_descending_z(tmp_path: Path) -> None:
    """Headers as the worker reads them (stop_before_pixels), sorted top-down: frames follow source order."""
    files = [write(ds, tmp_path / f"ct{k}.dcm") for k, ds in enumerate(make_ct_series(*SHAPE, seed=3))]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in reversed(files)]
    assert all("PixelData" not in ds for ds in headers)
    mask = lung_nodule_mask(SHAPE)
    mask[:5] = 0  # asymmetric in z, so a flipped mapping would show
    path = write(_build(headers, SegmentationResult(identity(), mask)), tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    np.testing.assert_array_equal(_decoded_label_map(hd.seg.segread(path), headers), mask)

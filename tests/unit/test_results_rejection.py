"""The IOCM rejection note: a Key Object Selection Document titled "Rejected for Quality Reasons" that references
exactly the superseded results, valid for dciodvfy and read back by highdicom."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, KeyObjectSelectionDocumentStorage, SegmentationStorage

from dicom_node.results.rejection import build_rejection_note

from .results_helpers import NODE, dciodvfy_errors, make_ct_series


def _ref(study_uid: str, sop_class: str, series_uid: str, sop_uid: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    return ds


def test_the_note_rejects_exactly_the_superseded_seg_and_findings_sr(tmp_path: Path) -> None:
    source = make_ct_series(3, with_pixels=False)
    study = str(source[0].StudyInstanceUID)
    rejected = [
        _ref(study, SegmentationStorage, "2.25.11", "2.25.12"),
        _ref(study, ComprehensiveSRStorage, "2.25.21", "2.25.22"),
    ]
    note = build_rejection_note(
        source[0],
        rejected,
        series_uid="2.25.31",
        sop_uid="2.25.32",
        series_number=9200,
        instance_number=2,
        node=NODE,
        reason="Superseded by the AI results of job 7",
    )
    path = tmp_path / "ko.dcm"
    note.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    ko = hd.ko.KeyObjectSelectionDocument.from_dataset(back)
    assert back.SOPClassUID == KeyObjectSelectionDocumentStorage and back.Modality == "KO"
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113001",
        "DCM",
        "Rejected for Quality Reasons",
    )
    # same patient and study as the results it rejects (IOCM), in its own series
    assert (back.StudyInstanceUID, back.PatientID, back.PatientName) == (study, "PH001", "Phantom^Chest")
    assert (back.SeriesInstanceUID, back.SeriesNumber, back.InstanceNumber) == ("2.25.31", 9200, 2)
    (evidence,) = back.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == study
    listed = {
        (s.SeriesInstanceUID, r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID)
        for s in evidence.ReferencedSeriesSequence
        for r in s.ReferencedSOPSequence
    }
    assert listed == {("2.25.11", SegmentationStorage, "2.25.12"), ("2.25.21", ComprehensiveSRStorage, "2.25.22")}
    in_content = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in back.ContentSequence if i.ValueType == "COMPOSITE"
    }
    assert in_content == {"2.25.12", "2.25.22"}
    assert [ko.resolve_reference(u)[1] for u in ("2.25.12", "2.25.22")] == ["2.25.11", "2.25.21"]
    assert back.Manufacturer == NODE.manufacturer and back.DeviceSerialNumber == NODE.device_serial_number


def test_a_note_for_nothing_or_for_another_study_is_refused() -> None:
    source = make_ct_series(2, with_pixels=False)
    kw = dict(series_uid="2.25.1", sop_uid="2.25.2", series_number=9200, instance_number=2, node=NODE, reason="x")
    with pytest.raises(ValueError, match="at least one"):
        build_rejection_note(source[0], [], **kw)
    with pytest.raises(ValueError, match="is not of study"):
        build_rejection_note(source[0], [_ref("2.25.99", SegmentationStorage, "2.25.3", "2.25.4")], **kw)

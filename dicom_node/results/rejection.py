"""IHE IOCM rejection note: a Key Object Selection Document that retires superseded result objects at the PACS.

A re-run after late arrivals replaces a study's SEGs and findings SR with new instances. The full SR names its
predecessor, but a SEG has no such link and viewers (OHIF) list every SEG and SR of a study, so the old ones
would stay on screen next to the new ones. IOCM's answer is a KOS whose Document Title comes from CID 7011 and
that references the instances to hide. Of CID 7011's titles, (113001, DCM, "Rejected for Quality Reasons") is
the one for a correct object of the right patient and order that was replaced by a better one (IOCM's retake
case): an archive hides it from normal display and may keep it. "Rejected for Patient Safety Reasons" (113037)
and "Incorrect Modality Worklist Entry" (113038) say the object is about the wrong patient or order, and "Data
Retention Policy Expired" (113039) asks for deletion; none of those is true of an outdated AI result.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from .equipment import NodeIdentity, equipment_kwargs

REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons  # (113001, DCM), CID 7011

# Patient and study attributes the note shares with the study (IOCM: same patient, same study)
_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "SpecificCharacterSet",
)


def build_rejection_note(
    study_header: pydicom.Dataset,
    rejected: Sequence[pydicom.Dataset],
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int,
    node: NodeIdentity,
    reason: str,
) -> pydicom.Dataset:
    """A KOS rejection note for ``rejected`` (each with StudyInstanceUID, SeriesInstanceUID, SOPClassUID and
    SOPInstanceUID, all of the study of ``study_header``); ``reason`` becomes its Key Object Description."""
    if not rejected:
        raise ValueError("a rejection note needs at least one rejected instance")
    study_uid = str(study_header.StudyInstanceUID)
    evidence = []
    for ref in rejected:
        if str(ref.StudyInstanceUID) != study_uid:
            raise ValueError(f"rejected instance {ref.SOPInstanceUID} is not of study {study_uid}")
        item = pydicom.Dataset()
        for keyword in _STUDY_KEYWORDS:
            if keyword in study_header:
                setattr(item, keyword, study_header[keyword].value)
        for keyword in ("StudyDate", "StudyTime", "StudyID", "AccessionNumber", "PatientBirthDate", "PatientSex"):
            if keyword not in item:  # Type 2 in the KOS: present, possibly empty
                setattr(item, keyword, "")
        item.SeriesInstanceUID, item.SOPClassUID = ref.SeriesInstanceUID, ref.SOPClassUID
        item.SOPInstanceUID = ref.SOPInstanceUID
        evidence.append(item)
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=evidence,
        description=reason[:1024],
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        series_description="AI results rejected (superseded)",
        **equipment_kwargs(node),
    )

"""Header values the operator's view shows and searches (accession number, date, description), read once per
study from one of its instances and kept in storage (storage/overview.py), so a search is one query."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pydicom
from pydicom.errors import InvalidDicomError

from storage.records import StudyInfo

if TYPE_CHECKING:
    from dicom_node.web.app import WebContext

log = logging.getLogger("dicom_node.web")
TAGS = ["AccessionNumber", "StudyDate", "StudyDescription", "Modality", "PatientName", "PatientID"]


def read_info(study_uid: str, path: str, calling_ae: str, ctx: WebContext) -> StudyInfo:
    if not path:
        return StudyInfo(study_uid=study_uid, calling_ae=calling_ae)
    try:
        ds = pydicom.dcmread(ctx.rt.files.absolute(path), stop_before_pixels=True, specific_tags=TAGS)
    except (OSError, InvalidDicomError) as exc:  # purged meanwhile, or unreadable: shown without header values
        log.warning("study_header_unreadable", extra={"fields": {"study_uid": study_uid, "error": str(exc)}})
        return StudyInfo(study_uid=study_uid, calling_ae=calling_ae)

    def text(keyword: str, size: int) -> str:
        return str(ds.get(keyword, "") or "")[:size]

    return StudyInfo(
        study_uid=study_uid,
        accession_number=text("AccessionNumber", 64),
        study_date=text("StudyDate", 16),
        study_description=text("StudyDescription", 128),
        modalities=text("Modality", 64),
        patient_name=text("PatientName", 128),
        patient_id=text("PatientID", 64),
        calling_ae=calling_ae,
    )


def index_new_studies(ctx: WebContext) -> int:
    """Read the header values of studies received since the last call; returns how many."""
    todo = ctx.overview.unindexed()
    if todo:
        ctx.overview.save_info([read_info(uid, path, ae, ctx) for uid, path, ae in todo])
    return len(todo)

"""Thin DIMSE handlers: check, write, record, answer a status. Nothing else happens here.

Success (0x0000) is answered only after the bytes are on disk (fsync + rename) and the index row is
committed. Every failure answers a DICOM failure status and leaves neither a partial file nor a row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.logs import log_event
from storage.files import FileStore, StorageFullError, UnsafeNameError, check_uid
from storage.jobstore import JobStore
from storage.records import NewInstance

log = logging.getLogger("dicom_node.listener")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
OUT_OF_RESOURCES_DB = 0xA701
OUT_OF_RESOURCES_TOO_LARGE = 0xA702
CANNOT_UNDERSTAND = 0xC210
INVALID_UID = 0xC211
UID_MISMATCH = 0xC212
MISSING_UID = 0xC213

_HEADER_TAGS = [0x00080016, 0x00080018, 0x0020000D, 0x0020000E]  # SOPClass, SOPInstance, Study, Series


class RejectedInstance(Exception):
    """An instance cannot be accepted; carries the DIMSE status to answer."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class StoreSettings:
    late_arrivals: str = "rerun"
    duplicate_policy: str = "keep_first"
    max_instance_bytes: int = 2048 << 20


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def parse_header(raw: bytes, command_sop_uid: str, command_class_uid: str) -> tuple[str, str, str, str]:
    """Return (study, series, sop, sop class) UIDs after checking them against the command and UID syntax."""
    try:
        ds = dcmread(BytesIO(raw), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        values = {kw: ds.get(kw) for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")}
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError, OverflowError) as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}") from exc
    for kw, v in values.items():
        if v is None or str(v) == "":
            raise RejectedInstance(MISSING_UID, f"missing {kw}")
    study, series, sop, sop_class = (str(values[k]) for k in
                                     ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"))
    try:
        for uid, what in ((study, "StudyInstanceUID"), (series, "SeriesInstanceUID"), (sop, "SOPInstanceUID"),
                          (sop_class, "SOPClassUID")):
            check_uid(uid, what)
    except UnsafeNameError as exc:
        raise RejectedInstance(INVALID_UID, str(exc)) from exc
    if sop != command_sop_uid:
        raise RejectedInstance(UID_MISMATCH, "SOPInstanceUID differs from the C-STORE request")
    if sop_class != command_class_uid:
        raise RejectedInstance(UID_MISMATCH, "SOPClassUID differs from the C-STORE request")
    return study, series, sop, sop_class


def store_instance(raw: bytes, *, command_sop_uid: str, command_class_uid: str, transfer_syntax: str,
                   calling_ae: str, files: FileStore, jobs: JobStore, settings: StoreSettings) -> tuple[int, str]:
    """Write and index one received instance; returns (status, outcome or reason)."""
    if len(raw) > settings.max_instance_bytes:
        raise RejectedInstance(OUT_OF_RESOURCES_TOO_LARGE, "instance exceeds node.max_instance_mb")
    study, series, sop, sop_class = parse_header(raw, command_sop_uid, command_class_uid)
    existing = jobs.get_instance(sop)
    if existing is not None and settings.duplicate_policy == "keep_first":
        return SUCCESS, "duplicate_kept_first"
    try:
        files.check_space(len(raw))
        path = files.instance_path(study, series, sop)
        if existing is not None and existing.path != files.relative(path):
            raise RejectedInstance(UID_MISMATCH, "SOPInstanceUID already stored under another study or series")
        size = files.write_atomic(path, raw)
    except StorageFullError as exc:
        raise RejectedInstance(OUT_OF_RESOURCES, f"storage full: {exc}") from exc
    except OSError as exc:
        raise RejectedInstance(OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}") from exc
    try:
        outcome = jobs.record_instance(
            NewInstance(sop_instance_uid=sop, study_uid=study, series_uid=series, sop_class_uid=sop_class,
                        transfer_syntax=transfer_syntax, path=files.relative(path), size=size, calling_ae=calling_ae),
            late_arrivals=settings.late_arrivals,
        )
    except SQLAlchemyError as exc:
        if existing is None:
            files.remove(path)  # never leave a file without its row
        raise RejectedInstance(OUT_OF_RESOURCES_DB, f"cannot index: {type(exc).__name__}") from exc
    return SUCCESS, outcome


class Handlers:
    """Bound to one listener; pynetdicom calls these from its association threads."""

    def __init__(self, files: FileStore, jobs: JobStore, settings: StoreSettings) -> None:
        self.files = files
        self.jobs = jobs
        self.settings = settings

    def on_echo(self, event: Any) -> int:
        return SUCCESS

    def on_store(self, event: Any) -> Dataset | int:
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        class_uid = str(req.AffectedSOPClassUID or "")
        assoc = event.assoc
        calling = assoc.requestor.ae_title if assoc else ""
        try:
            raw = event.encoded_dataset(include_meta=True)
            ts = str(event.context.transfer_syntax)
            status, outcome = store_instance(
                raw, command_sop_uid=sop_uid, command_class_uid=class_uid, transfer_syntax=ts, calling_ae=calling,
                files=self.files, jobs=self.jobs, settings=self.settings)
        except RejectedInstance as exc:
            log_event(log, "instance_rejected", logging.WARNING, sop_instance_uid=sop_uid[:80],
                      status=f"0x{exc.status:04X}", reason=exc.comment, calling_ae=calling)
            return _status(exc.status, exc.comment)
        except Exception as exc:  # a handler must answer a status, never crash the association
            log.exception("store_failed", extra={"fields": {"sop_instance_uid": sop_uid[:80]}})
            return _status(OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")
        if outcome != "stored":
            log_event(log, "instance_" + outcome, sop_instance_uid=sop_uid, calling_ae=calling)
        else:
            log_event(log, "instance_stored", logging.DEBUG, sop_instance_uid=sop_uid, calling_ae=calling)
        return status

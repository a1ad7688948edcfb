"""Frozen records handed out by the job store (never ORM rows)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NewInstance:
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str  # relative to the file store root
    size: int
    calling_ae: str = ""


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    received_at: float


@dataclass(frozen=True)
class StudyRecord:
    study_uid: str
    state: str
    generation: int
    first_received_at: float
    last_received_at: float
    instance_count: int


@dataclass(frozen=True)
class NewJob:
    route: str
    series_uid: str
    models: tuple[str, ...]
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class JobRecord:
    id: int
    study_uid: str
    route: str
    generation: int
    series_uid: str
    models: tuple[str, ...]
    destinations: tuple[str, ...]
    state: str
    attempts: int
    not_before: float
    lease_owner: str
    lease_expires_at: float
    error: str
    created_at: float
    updated_at: float
    timings: str = ""


@dataclass(frozen=True)
class NewResult:
    kind: str  # seg | sr | rejection (an IOCM rejection note retiring an earlier run's results)
    model: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str  # relative to the file store root


@dataclass(frozen=True)
class ResultRecord:
    id: int
    job_id: int
    kind: str
    model: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    job_id: int
    destination: str
    state: str
    attempts: int
    not_before: float
    last_status: str
    error: str
    result: ResultRecord


@dataclass(frozen=True)
class StudyInfo:
    """Header values of a study for the operator's view (patient fields shown only where configured)."""

    study_uid: str
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""
    modalities: str = ""
    patient_name: str = ""
    patient_id: str = ""
    calling_ae: str = ""


@dataclass(frozen=True)
class SeriesCount:
    series_uid: str
    sop_class_uid: str
    instances: int
    bytes: int

"""Tables of the job store. ORM rows never leave storage/: callers get frozen records."""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class InstanceRow(Base):
    __tablename__ = "instances"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), ForeignKey("studies.study_uid"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")


class StudyRow(Base):
    __tablename__ = "studies"
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # receiving | complete
    generation: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("study_uid", "route", "generation", name="uq_job_study_route_generation"),
        Index("ix_jobs_claim", "state", "not_before"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    route: Mapped[str] = mapped_column(String(128))
    generation: Mapped[int] = mapped_column(Integer)
    series_uid: Mapped[str] = mapped_column(String(64))
    models: Mapped[str] = mapped_column(Text)  # comma-separated model names
    destinations: Mapped[str] = mapped_column(Text)  # comma-separated destination names
    state: Mapped[str] = mapped_column(String(16))  # queued | running | done | failed | cancelled
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[float] = mapped_column(Float, default=0.0)
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    timings: Mapped[str] = mapped_column(Text, default="")


class ResultRow(Base):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("job_id", "kind", "model", name="uq_result_job_kind_model"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # seg | sr
    model: Mapped[str] = mapped_column(String(128), default="")
    study_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class DeliveryRow(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("result_id", "destination", name="uq_delivery_result_destination"),
        Index("ix_deliveries_claim", "state", "not_before"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(Integer, ForeignKey("results.id"), index=True)
    job_id: Mapped[int] = mapped_column(Integer, index=True)
    destination: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))  # pending | sending | done | failed | refused
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[float] = mapped_column(Float, default=0.0)
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_status: Mapped[str] = mapped_column(String(16), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[float] = mapped_column(Float)


class StudyPurgeRow(Base):
    """What retention deleted of a study: kept with the study's rows, so a late arrival after the purge can be
    told from a whole study sent again (``series_counts``: JSON {series UID: instances purged, at most})."""

    __tablename__ = "study_purges"
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_counts: Mapped[str] = mapped_column(Text, default="{}")
    received_purged_at: Mapped[float] = mapped_column(Float, default=0.0)
    results_purged_at: Mapped[float] = mapped_column(Float, default=0.0)
    received_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    results_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    reason: Mapped[str] = mapped_column(String(32), default="")


class PurgeFileRow(Base):
    """A file whose index row a purge removed and that it has yet to unlink: committed with the removal, so a
    crash in between leaves a note of the file (removed at the next start), never an unindexed file."""

    __tablename__ = "purge_files"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(Text)
    inode: Mapped[int] = mapped_column(BigInteger, default=0)  # the file's, when purged: a file stored since differs
    created_at: Mapped[float] = mapped_column(Float)


class StudyInfoRow(Base):
    """What the operator's view shows and searches a study by, read once from one of its instances' headers
    (storage/overview.py); rows of studies that are gone are pruned there too."""

    __tablename__ = "study_info"
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    study_date: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(128), default="")
    modalities: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(128), default="")
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")

"""What an admin asks of the node, whether from the CLI or the web (REST API and dashboard): one
implementation each, returning plain values the caller prints or serialises. Actions are audited here."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dicom_node.audit import AuditLog
from dicom_node.config import Config

if TYPE_CHECKING:
    from dicom_node.runtime import Runtime
    from storage.records import JobRecord

JOB_ACTIONS = ("retry", "cancel")


@dataclass(frozen=True)
class EchoResult:
    destination: str
    ae_title: str
    host: str
    port: int
    ok: bool
    detail: str


def job_json(rt: Runtime, job: JobRecord) -> dict[str, Any]:
    """A job with its timings as an object and its deliveries (`status --json`, the REST API)."""
    out: dict[str, Any] = dict(job.__dict__)
    out["models"], out["destinations"] = list(job.models), list(job.destinations)
    with contextlib.suppress(ValueError):  # else an older row's free text, kept as it is
        out["timings"] = json.loads(job.timings) if job.timings else {}
    out["deliveries"] = [
        {
            "id": d.id,
            "kind": d.result.kind,
            "model": d.result.model,
            "destination": d.destination,
            "state": d.state,
            "attempts": d.attempts,
            "last_status": d.last_status,
            "error": d.error,
            "sop_instance_uid": d.result.sop_instance_uid,
        }
        for d in rt.jobs.deliveries_of_job(job.id)
    ]
    return out


def storage_status(cfg: Config, rt: Runtime) -> dict[str, Any]:
    """Disk use against the watermarks, and what the retention rules would purge now."""
    from dicom_node.housekeeping import Housekeeper
    from storage.retention import RetentionStore

    keeper = Housekeeper(cfg, rt.files, RetentionStore(rt.jobs.engine, rt.files))
    out: dict[str, Any] = {}
    if rt.files.root.is_dir():
        d = keeper.disk()
        out["disk"] = {
            "used_percent": round(d.percent, 1),
            "free_mb": d.free >> 20,
            "total_mb": d.total >> 20,
            "high_watermark_percent": cfg.retention.high_watermark_percent,
            "low_watermark_percent": cfg.retention.low_watermark_percent,
            "floor_mb": cfg.node.min_free_mb,
        }
    else:
        out["disk"] = {"used_percent": "-", "free_mb": "-"}
    plan = keeper.plan()
    out["eligible"] = {
        "studies": len({p.study_uid for p in plan if p.what != "history"}),
        "received_mb": round(sum(p.bytes for p in plan) / (1 << 20), 1),
        "result_files": sum(p.files for p in plan if p.what == "results"),
        "history": sum(p.what == "history" for p in plan),
    }
    return out


def job_action(cfg: Config, rt: Runtime, action: str, job_id: int, *, actor: str) -> JobRecord:
    """Retry or cancel a job (storage.jobstore.JobStoreError says why not), with its audit record."""
    from storage.jobstore import JobStoreError

    if action not in JOB_ACTIONS:
        raise ValueError(f"unknown job action {action!r}")
    audit = AuditLog.from_config(cfg)
    try:
        try:
            job: JobRecord = getattr(rt.jobs, f"{action}_job")(job_id)
        except JobStoreError as exc:
            audit.record("admin_action", actor=actor, action=action, job_id=job_id, outcome="refused", reason=str(exc))
            raise
        audit.record(
            "admin_action",
            actor=actor,
            action=action,
            job_id=job_id,
            outcome="done",
            study_uid=job.study_uid,
            state=job.state,
        )
    finally:
        audit.close()
    return job


def job_action_message(action: str, job: JobRecord) -> str:
    if action == "cancel":
        return f"job {job.id} cancelled"
    return f"job {job.id} queued again" if job.state == "queued" else f"job {job.id}: results queued for re-sending"


def echo_destination(cfg: Config, name: str, *, actor: str) -> EchoResult:
    """C-ECHO a configured destination (KeyError: no such destination), audited."""
    from dicom_node.delivery.scu import echo
    from dicom_node.delivery.sender import destination_peer

    if name not in {d.name for d in cfg.destinations}:
        raise KeyError(name)
    peer = destination_peer(cfg, name)
    ok, detail = echo(peer)
    audit = AuditLog.from_config(cfg)
    audit.record(
        "admin_action", actor=actor, action="echo", destination=name, outcome="ok" if ok else "failed", detail=detail
    )
    audit.close()
    return EchoResult(destination=name, ae_title=peer.ae_title, host=peer.host, port=peer.port, ok=ok, detail=detail)


def models(cfg: Config) -> list[dict[str, Any]]:
    """The configured models as `dicom-node models` lists them (from their metadata; nothing is loaded)."""
    from ai_models.bundle import read_metadata
    from ai_models.device import resolve_device
    from ai_models.types import ModelError

    out: list[dict[str, Any]] = []
    for m in cfg.models:
        try:
            info = read_metadata(cfg.bundle_path(m.name))
            device = resolve_device(m.device or cfg.worker.device)
        except ModelError as exc:
            out.append({"name": m.name, "error": str(exc)})
            continue
        point = m.operating_point if m.operating_point is not None else info.min_score
        out.append(
            {
                "name": m.name,
                "task": info.task,
                "version": info.version,
                "device": device,
                "min_score": None if point is None or info.task == "segmentation" else point,
                "labels": {str(k): v for k, v in sorted(info.labels.items())},
                "error": None,
            }
        )
    return out

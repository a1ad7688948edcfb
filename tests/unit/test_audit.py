"""The audit trail: one JSON line per record from several writers, rotated by size without losing a line."""

from __future__ import annotations

import json
from pathlib import Path

from dicom_node.audit import AuditLog


def test_rotation_keeps_every_record_across_writers(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    a, b = AuditLog(path, max_bytes=4096, backups=50), AuditLog(path, max_bytes=4096, backups=50)
    for i in range(400):
        (a if i % 2 else b).record("association", calling_ae="SCANNER", peer="127.0.0.1:1", instances=i)
    files = sorted(tmp_path.glob("audit.jsonl*"))
    assert len(files) > 5 and all(f.stat().st_size <= 4096 for f in files)
    seen = sorted(json.loads(line)["instances"] for f in files for line in f.read_text().splitlines())
    assert seen == list(range(400))


def test_backups_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=4096, backups=2)
    for i in range(400):
        log.record("admin_action", actor="cli:root", action="retry", job_id=i)
    assert sorted(p.name for p in tmp_path.glob("audit.jsonl*") if not p.name.endswith(".lock")) == [
        "audit.jsonl",
        "audit.jsonl.1",
        "audit.jsonl.2",
    ]
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["job_id"] == 399 and last["event"] == "admin_action"

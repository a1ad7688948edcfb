"""Results land in the source study at a real PACS (Orthanc from Debian's packages), once.

Orthanc 1.10 listens on all interfaces, so the round trip runs in a private network namespace.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.peers import REPO


def test_results_arrive_in_the_same_study_at_orthanc_exactly_once(tmp_path: Path) -> None:
    cmd = f"ip link set lo up && exec {sys.executable} -m tests.acceptance.orthanc_roundtrip {tmp_path}"
    proc = subprocess.run(["unshare", "-n", "bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["study_count"] == 1  # the results joined the source study, not a new one
    assert report["modalities"] == {"CT": 49, "SEG": 1, "SR": 1}  # 48 axial + 1 localizer
    assert report["dciodvfy"] == {"SEG": [], "SR": []}
    # the retried job rebuilt identical UIDs: Orthanc still holds one SEG and one SR
    assert report["retry_rc"] == 0
    assert report["modalities_after_resend"] == {"CT": 49, "SEG": 1, "SR": 1}

"""A radiologist's viewer shows the node's results: OHIF Viewer (npm @ohif/app, its prebuilt dist/) in headless
Chromium, over Orthanc's DICOMweb plugin, opens the study, the SEG (its segments listed) and the findings SR
(its findings listed in the measurement panel, labelled with the finding and its certainty), with no error.

Runs in a private network namespace (Orthanc listens on all interfaces). The study is the committed real chest
CT (tests/data/lidc_idri_0314) through the shipped models, or the folder named by DICOM_NODE_VIEWER_STUDY.
Screenshots and the report go
to test-artifacts/ohif/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.acceptance.ohif_check import ERROR_BOUNDARY
from tests.peers import REPO

ARTIFACTS = REPO / "test-artifacts" / "ohif"


def test_ohif_opens_the_seg_and_the_findings_sr(tmp_path: Path) -> None:
    study = os.environ.get("DICOM_NODE_VIEWER_STUDY", "")
    cmd = f"ip link set lo up && exec {sys.executable} -m tests.acceptance.ohif_check {tmp_path} {study}"
    proc = subprocess.run(["unshare", "-n", "bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=900)
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    for f in [*tmp_path.glob("*.png"), *tmp_path.glob("report.json"), *tmp_path.glob("*.log")]:
        shutil.copy(f, ARTIFACTS / f.name)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    expected, seen = report["expected"], report["study"]
    assert expected["segments"] and expected["findings"], expected  # the study must give both to look at
    assert set(seen) == {f"seg-{i}" for i in range(1, len(expected["segments"]) + 1)} | {"sr"}
    for step, text in seen.items():
        assert ERROR_BOUNDARY not in text, (step, report["console"][-20:])
    for i, labels in enumerate(expected["segments"].values(), 1):  # each SEG's segments, once it is opened
        panel = seen[f"seg-{i}"].split("Segmentations", 1)[1]
        assert [s for s in labels if s in panel] == labels, panel
    listed = re.search(r"Measurements \((\d+)\)", seen["sr"])
    assert listed is not None and int(listed.group(1)) == len(expected["findings"]), seen["sr"][-2000:]
    labels = re.findall(r"^(.+ \(certainty \d+ %\))$", seen["sr"], re.MULTILINE)
    want = sorted(f"{f['finding']} (certainty {f['certainty']:.0f} %)" for f in expected["findings"])
    assert sorted(labels) == want

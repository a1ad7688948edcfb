"""Driver run inside a private network namespace: a study through the node into Orthanc (DICOMweb plugin), then
OHIF Viewer in headless Chromium opens it, loads the node's SEG and SR, and says what it shows. Writes
report.json and screenshots to OUT_DIR.

    unshare -n bash -c 'ip link set lo up && python -m tests.acceptance.ohif_check OUT_DIR [STUDY_DIR]'

STUDY_DIR: a folder of DICOM files of one study (any CT the node's chest route takes; JPEG 2000 is proposed);
without it, the committed real chest CT (tests/data/lidc_idri_0314) through the shipped config's models and
route. What the viewer must show is read from the objects Orthanc holds (SEG segment labels, the SR's
findings), not from the models.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom

from tests.browser import Browser
from tests.ohif import OHIF_VERSION, ViewerServer, dicomweb_plugin_config
from tests.orthanc import Orthanc
from tests.peers import NodeProcess, free_port, running, shipped_models_and_route, storescu, wait_for, write_config

REAL_CT = Path(__file__).resolve().parents[1] / "data" / "lidc_idri_0314"
ERROR_BOUNDARY = "Something went wrong"


def _study(study_dir: Path) -> list[Path]:
    return sorted(p for p in study_dir.rglob("*.dcm") if p.is_file() and not p.name.startswith("."))


def _results(pacs: Orthanc, study_uid: str, out: Path) -> dict[str, list[Path]]:
    """The node's SEG and SR objects as Orthanc holds them, by modality."""
    found: dict[str, list[Path]] = {}
    for study in pacs.get("/studies?expand"):
        if study["MainDicomTags"].get("StudyInstanceUID") != study_uid:
            continue
        for sid in study["Series"]:
            series = pacs.get(f"/series/{sid}")
            modality = series["MainDicomTags"]["Modality"]
            if modality not in ("SEG", "SR", "KO"):
                continue
            for iid in series["Instances"]:
                path = out / "results" / f"{modality}-{iid}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{pacs.http_port}/instances/{iid}/file", timeout=30
                ) as rsp:
                    path.write_bytes(rsp.read())
                found.setdefault(modality, []).append(path)
    return found


def _expected(results: dict[str, list[Path]]) -> dict[str, Any]:
    """What the viewer should list, read from the objects themselves: segment labels; the findings with
    geometry (their finding type and certainty) of the SR that OHIF shows (the series' last instance)."""
    segs = sorted((hd.seg.segread(p) for p in results.get("SEG", [])), key=lambda s: int(s.SeriesNumber))
    labels = {
        str(s.SeriesDescription): [s.get_segment_description(n).segment_label for n in s.segment_numbers] for s in segs
    }
    findings = []
    for path in results.get("SR", []):
        ds = pydicom.dcmread(path)
        if not str(ds.SeriesDescription).startswith("AI findings"):
            continue
        report = hd.sr.srread(path)
        for group in report.content.get_image_measurement_groups():
            score = next((m.value for m in group.get_measurements() if m.name.value == "111012"), None)
            findings.append(
                {
                    "sr": str(ds.SOPInstanceUID),
                    "finding": group.finding_type.meaning,
                    "certainty": None if score is None else float(score),
                }
            )
    return {"segments": labels, "findings": findings}


def _by_text(selector: str, text: str) -> str:
    """JavaScript for the innermost element matching ``selector`` whose text contains ``text``."""
    return (
        f"Array.from(document.querySelectorAll({json.dumps(selector)}))"
        f".filter(e => e.innerText.includes({json.dumps(text)})).pop()"
    )


THUMBNAILS = '[data-cy^="study-browser-thumbnail"]'
PANELS = {"seg": "panelSegmentation-btn", "sr": "trackedMeasurements-btn"}


def _open(browser: Browser, viewer: ViewerServer, study_uid: str, out: Path, segs: list[str]) -> dict[str, Any]:
    """Open the study, then each SEG in turn (series descriptions ``segs``; answering OHIF's "open this
    Segmentation?" with Yes), then the findings SR (and "track measurements?" Yes); the page's text and a
    screenshot after each step (seg-1.png, seg-2.png ..., sr.png)."""
    browser.goto(viewer.url(f"/viewer?StudyInstanceUIDs={study_uid}"))
    browser.wait_js(f"document.querySelectorAll('{THUMBNAILS}').length > 0", 120, "the study browser's thumbnails")
    browser.settle(2)
    browser.click(_by_text("button", "Skip all"))  # the first-visit tour
    steps: dict[str, Any] = {}
    seg_steps = [(f"seg-{i}", desc, "open this Segmentation", "seg") for i, desc in enumerate(segs, 1)]
    for name, thumbnail, question, panel in (*seg_steps, ("sr", "AI findings", "tracking measurements", "sr")):
        browser.click(_by_text(THUMBNAILS, thumbnail), double=True)
        browser.wait_js(
            f"document.body.innerText.includes({json.dumps(question)}) || "
            f"document.body.innerText.includes({json.dumps(ERROR_BOUNDARY)})",
            60,
            f"OHIF's {name} prompt",
        )
        browser.click(_by_text("button", "Yes"))
        browser.settle(6)
        # the right-hand panel that lists what was loaded: segments, or measurements
        browser.click(f"document.querySelector('[data-cy=\"{PANELS[panel]}\"]')")
        browser.settle(3)
        browser.screenshot(out / f"{name}.png")
        steps[name] = browser.text()
    return steps


def main(out: Path, study_dir: Path) -> int:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    paths = _study(study_dir)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    pacs = Orthanc(out / "orthanc", extra=dicomweb_plugin_config()).start()
    port = free_port()
    models, route = shipped_models_and_route()
    cfg = write_config(
        out / "config.toml",
        port=port,
        data_dir=out / "var",
        models=models,
        routes=route.replace('send_to = ["pacs"]', 'send_to = ["orthanc"]'),
        destinations=[{"name": "orthanc", "port": pacs.dicom_port}],
    )
    node = NodeProcess(cfg, port, out / "node.log").start(timeout=180)
    viewer = ViewerServer(pacs.http_port).start()
    browser = Browser()
    report: dict[str, Any] = {"ohif": OHIF_VERSION, "study_uid": study_uid}
    with running(pacs, node, viewer, browser):
        # the scanner archives the study at the PACS and sends it to the node (-xv: JPEG 2000, as stored)
        storescu(pacs.dicom_port, paths, called="PACS", flags=("-xv",))
        storescu(port, paths, flags=("-xv",))
        wait_for(lambda: "job_done" in node.log_text() or "job_failed" in node.log_text(), 600, "the node's job")
        if "job_done" not in node.log_text():
            raise AssertionError(f"the node's job failed:\n{node.log_text()[-3000:]}")
        done = [ln for ln in node.log_text().splitlines() if "job_done" in ln][-1]
        n_results = len(done.split("results=", 1)[1].split()[0].split(","))
        wait_for(lambda: node.log_text().count("result_delivered") >= n_results, 120, "the results at Orthanc")
        timings["results"] = round(time.monotonic() - t0, 1)
        results = _results(pacs, study_uid, out)
        report["expected"] = _expected(results)
        browser.start()
        t1 = time.monotonic()
        report["study"] = _open(browser, viewer, study_uid, out, list(report["expected"]["segments"]))
        timings["viewer"] = round(time.monotonic() - t1, 1)
        report["console"] = [c for c in browser.console if not c.startswith(("log:", "debug:", "info:"))][-200:]
    report["timings"] = timings
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else REAL_CT))

"""Driver run inside a private network namespace: storescu -> node -> Orthanc; writes what Orthanc holds as JSON.

unshare -n bash -c 'ip link set lo up && python -m tests.acceptance.orthanc_roundtrip OUT_DIR'
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from ai_models.phantom import generate_phantom
from dicom_node.synth import StudyIds, localizer_datasets, phantom_datasets, write_datasets
from tests.orthanc import Orthanc
from tests.peers import NodeProcess, dciodvfy_errors, free_port, running, storescu, wait_for, write_config


def main(out: Path) -> int:
    ph = generate_phantom(77, shape=(48, 160, 160), spacing=(2.5, 1.6, 1.6), n_nodules=2, min_nodule_radius_mm=6.0)
    ids = StudyIds.new("orthanc-77")
    paths = write_datasets([*phantom_datasets(ph, ids), *localizer_datasets(ph, ids)], out / "in")
    pacs = Orthanc(out / "orthanc").start()
    port = free_port()
    cfg = write_config(
        out / "config.toml",
        port=port,
        data_dir=out / "var",
        destinations=[{"name": "orthanc", "port": pacs.dicom_port}],
    )
    node = NodeProcess(cfg, port, out / "node.log").start()
    with running(pacs, node):
        storescu(pacs.dicom_port, paths, called="PACS")  # the scanner archives the study at the PACS ...
        storescu(port, paths)  # ... and sends it to the node

        def series_by_modality() -> dict[str, list[str]]:
            studies = pacs.get("/studies?expand")
            found = [s for s in studies if s["MainDicomTags"].get("StudyInstanceUID") == ids.study_uid]
            if not found:
                return {}
            out_: dict[str, list[str]] = {}
            for sid in found[0]["Series"]:
                s = pacs.get(f"/series/{sid}")
                out_.setdefault(s["MainDicomTags"]["Modality"], []).extend(s["Instances"])
            return out_

        series = wait_for(
            lambda: (m := series_by_modality()) and "SEG" in m and "SR" in m and m,
            600,
            "SEG and SR in the study at Orthanc",
        )
        # send the results again by retrying the job: same UIDs, Orthanc must still hold one copy of each
        job_id = node.cli("status", "--json")
        report = {
            "study_count": len(
                [s for s in pacs.get("/studies?expand") if s["MainDicomTags"].get("StudyInstanceUID") == ids.study_uid]
            ),
            "modalities": {k: len(v) for k, v in series.items()},
            "dciodvfy": {},
            "status": job_id.stdout,
        }
        for kind in ("SEG", "SR"):
            iid = series[kind][0]
            with urllib.request.urlopen(f"http://127.0.0.1:{pacs.http_port}/instances/{iid}/file", timeout=10) as r:
                f = out / f"{kind}.dcm"
                f.write_bytes(r.read())
            report["dciodvfy"][kind] = dciodvfy_errors(f)
        jobs = json.loads(job_id.stdout)["jobs"]
        retry = node.cli("retry", str(jobs[0]["id"]))
        report["retry_rc"] = retry.returncode
        wait_for(lambda: node.log_text().count("result_delivered") >= 4, 300, "the re-sent results")
        report["modalities_after_resend"] = {k: len(v) for k, v in series_by_modality().items()}
        report["job_started_count"] = node.log_text().count("job_started")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))

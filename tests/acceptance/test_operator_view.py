"""The operator's view of a running `dicom-node serve` (two listener processes) after real storescu sends: the
REST API, Prometheus metrics and the audit trail; then the dashboard in headless Chromium (Selenium), from
login to pressing retry on a failed job. Screenshots go to test-artifacts/operator_view/ (gitignored)."""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ai_models.phantom import generate_phantom
from dicom_node.synth import StudyIds, phantom_datasets, write_datasets
from dicom_node.web.overlay import PALETTE
from tests.browser import CHROMEDRIVER, CHROMIUM, Browser
from tests.fault_models import write_fault_bundle
from tests.peers import (
    BUNDLES,
    DCMTK_ENV,
    ECHOSCU,
    REPO,
    NodeProcess,
    StoreSCP,
    free_port,
    storescu,
    wait_for,
    write_config,
)

ARTIFACTS = REPO / "test-artifacts" / "operator_view"


@dataclass
class Running:
    node: NodeProcess
    base: str
    token: str
    audit: Path
    flag: Path
    good: StudyIds
    bad: StudyIds
    sent: int  # instances sent, both studies

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(self.base + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=30, **kw)

    def job(self, job_id: int) -> dict:
        return self.get(f"/api/jobs/{job_id}").json()

    def jobs_of(self, ids: StudyIds) -> list[dict]:
        return [j for j in self.get("/api/jobs?limit=100").json() if j["study_uid"] == ids.study_uid]


def _study(tmp: Path, name: str, seed: int, nodules: int) -> tuple[StudyIds, list[Path]]:
    ph = generate_phantom(
        seed, shape=(32, 128, 128), spacing=(2.5, 2.0, 2.0), n_nodules=nodules, min_nodule_radius_mm=6.0
    )
    ids = StudyIds.new(f"opview-{name}-{seed}")
    datasets = phantom_datasets(ph, ids)
    for ds in datasets:
        ds.PatientID = f"ZZ{name.upper()}PID"
        ds.AccessionNumber = f"ACC-OV-{name.upper()}"
    return StudyIds(
        **{**ids.__dict__, "patient_id": f"ZZ{name.upper()}PID", "accession": f"ACC-OV-{name.upper()}"}
    ), write_datasets(datasets, tmp / name)


@pytest.fixture()
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A node per test: tests/conftest.py ends every peer process after each test."""
    tmp = tmp_path_factory.mktemp("operator_view")
    pacs = StoreSCP(tmp / "pacs").start()
    port, http_port = free_port(), free_port()
    token = secrets.token_urlsafe(24)
    (tmp / "token").write_text(token + "\n")
    (tmp / "token").chmod(0o600)
    flag = tmp / "model-broken"
    flag.touch()
    fault = write_fault_bundle(tmp / "bundles", "fault-seg", "runtime", flag)
    models = "".join(
        f'[[models]]\nname = "{n}"\nbundle = "{p}"\n'
        for n, p in (
            ("chest-ct-seg", BUNDLES / "chest_ct_seg"),
            ("chest-ct-det", BUNDLES / "chest_ct_det"),
            ("fault-seg", fault),
        )
    )
    routes = (
        '[[routes]]\nname = "chest"\nmatch = { PatientID = "ZZGOODPID" }\nmodels = ["chest-ct-seg", "chest-ct-det"]\n'
        'send_to = ["pacs"]\n[[routes]]\nname = "broken"\nmatch = { PatientID = "ZZBADPID" }\n'
        'models = ["fault-seg"]\nsend_to = ["pacs"]\n'
    )
    audit = tmp / "audit.jsonl"
    cfg = write_config(
        tmp / "config.toml",
        port=port,
        data_dir=tmp / "var",
        destinations=[{"name": "pacs", "port": pacs.port}],
        models=models,
        routes=routes,
        node_extra="listener_processes = 2",
        http=f'port = {http_port}\ntoken_file = "{tmp / "token"}"',
        extra=f'[audit]\npath = "{audit}"\n',
    )
    node = NodeProcess(cfg, port, tmp / "node.log").start()
    try:
        good, good_paths = _study(tmp, "good", 71, nodules=2)
        bad, bad_paths = _study(tmp, "bad", 72, nodules=0)
        storescu(port, good_paths)
        storescu(port, bad_paths)
        r = Running(
            node, f"http://127.0.0.1:{http_port}", token, audit, flag, good, bad, len(good_paths) + len(bad_paths)
        )
        wait_for(lambda: httpx.get(r.base + "/healthz", timeout=5).status_code == 200, 30, "the HTTP server")

        def settled() -> bool:
            g, b = r.jobs_of(good), r.jobs_of(bad)
            return (
                len(g) == 1
                and g[0]["state"] == "done"
                and all(d["state"] == "done" for d in g[0]["deliveries"])
                and len(g[0]["deliveries"]) == 3  # SEG, the full SR, the findings SR for viewers
                and len(b) == 1
                and b[0]["state"] == "failed"
            )

        wait_for(settled, 90, "the good study done and delivered, the broken one failed", interval=0.5)
        yield r
    finally:
        node.stop()
        pacs.stop()
        if node.proc is not None and node.proc.returncode not in (0, None):
            print(node.log_text()[-4000:])


def _metrics(r: Running) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(r.base + "/metrics", timeout=30).text  # open: http.metrics_require_token = false
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_rest_api_metrics_and_audit(running: Running) -> None:
    r = running
    # without the token: refused, except the probes
    for path in ("/api/studies", "/api/jobs", "/api/health", "/api/openapi.json", "/", "/studies"):
        assert httpx.get(r.base + path, timeout=10).status_code == 401, path
        assert (
            httpx.get(r.base + path, headers={"Authorization": "Bearer wrong-token-123456"}, timeout=10).status_code
            == 401
        ), path
    for path in ("/api/jobs/1/retry", "/api/destinations/pacs/echo"):
        assert httpx.post(r.base + path, timeout=10).status_code == 401, path
    assert httpx.get(r.base + "/healthz", timeout=10).json()["ok"] is True

    studies = r.get("/api/studies", params={"search": "ACC-OV-GOOD"}).json()
    assert [s["study_uid"] for s in studies] == [r.good.study_uid]
    assert "patient_name" not in studies[0] and "patient_id" not in studies[0]
    assert r.get("/api/studies", params={"search": r.bad.study_uid[:20]}).json()[0]["study_uid"] == r.bad.study_uid
    study = r.get(f"/api/studies/{r.good.study_uid}").json()
    assert study["state"] == "complete" and study["generation"] == 0 and study["accession_number"] == "ACC-OV-GOOD"
    assert [(s["instances"]) for s in study["series"]] == [32] and study["instances"] == 32
    (job,) = study["jobs"]
    assert job["state"] == "done" and job["attempts"] == 1 and job["models"] == ["chest-ct-seg", "chest-ct-det"]
    assert {"load", "inference", "seg_encode", "sr_encode"} <= set(job["timings"])
    assert sorted((d["kind"], d["state"], d["last_status"]) for d in job["deliveries"]) == [
        ("seg", "done", "0x0000"),
        ("sr", "done", "0x0000"),
        ("sr", "done", "0x0000"),  # the full report and the findings SR for viewers
    ]
    (failed,) = r.get("/api/jobs", params={"state": "failed"}).json()
    assert failed["study_uid"] == r.bad.study_uid and failed["attempts"] == 3 and "failed on purpose" in failed["error"]
    assert r.get("/api/jobs", params={"state": "bogus"}).status_code == 400
    refused = httpx.post(f"{r.base}/api/jobs/{failed['id']}/cancel", headers={"Authorization": f"Bearer {r.token}"})
    assert refused.status_code == 409 and "already failed" in refused.json()["error"]

    schema = r.get("/api/openapi.json").json()
    assert schema["openapi"].startswith("3.") and "/api/jobs/{id}/retry" in schema["paths"]
    assert [m["name"] for m in r.get("/api/models").json()] == ["chest-ct-seg", "chest-ct-det", "fault-seg"]
    assert r.get("/api/destinations").json()[0]["port"] > 0
    echo = httpx.post(
        r.base + "/api/destinations/pacs/echo", headers={"Authorization": f"Bearer {r.token}"}, timeout=30
    )
    assert echo.status_code == 200 and echo.json()["ok"] is True
    health = r.get("/api/health").json()
    assert health["ok"] and health["listeners"]["alive"] == 2 and len(health["listeners"]["pids"]) == 2
    assert health["loops"]["worker"] and health["loops"]["sender"] and health["database"]["ok"]

    # a refused association (wrong called AE title), counted and audited
    echo_refused = subprocess.run(
        [ECHOSCU, "-aet", "SCANNER", "-aec", "NOT_THE_NODE", "127.0.0.1", str(r.node.port)],
        capture_output=True,
        env=DCMTK_ENV,
        timeout=30,
    )
    assert echo_refused.returncode != 0
    wait_for(lambda: r.audit.exists() and '"outcome":"refused"' in r.audit.read_text(), 10, "the refusal audited")

    m = _metrics(r)
    assert m[("dicom_node_instances_received_total", (("status", "0x0000"),))] == r.sent
    assert m[("dicom_node_cstore_handling_seconds_count", ())] == r.sent
    assert m[("dicom_node_received_bytes_total", ())] > r.sent * 128 * 128 * 2
    assert m[("dicom_node_associations_total", (("outcome", "accepted"), ("reason", "")))] == 2  # the two sends
    assert m[("dicom_node_associations_total", (("outcome", "refused"), ("reason", "called_ae_not_recognised")))] == 1
    assert m[("dicom_node_jobs", (("state", "done"),))] == 1 and m[("dicom_node_jobs", (("state", "failed"),))] == 1
    assert m[("dicom_node_studies", (("state", "complete"),))] == 2
    assert m[("dicom_node_queue_depth", ())] == 0 and m[("dicom_node_oldest_queued_job_age_seconds", ())] == 0
    assert m[("dicom_node_deliveries_total", (("destination", "pacs"), ("outcome", "done")))] == 3
    assert m[("dicom_node_job_attempts_total", (("outcome", "retry"),))] == 2
    assert m[("dicom_node_job_attempts_total", (("outcome", "failed"),))] == 1
    assert m[("dicom_node_retries_total", (("kind", "job"),))] == 2
    assert m[("dicom_node_stage_seconds_count", (("stage", "load"),))] == 1
    assert m[("dicom_node_inference_seconds_count", (("model", "chest-ct-seg"),))] == 1
    assert m[("dicom_node_send_seconds_count", (("destination", "pacs"),))] >= 1
    assert m[("dicom_node_model_load_seconds", (("model", "chest-ct-seg"),))] > 0
    assert m[("dicom_node_disk_free_bytes", ())] > 0 and m[("dicom_node_listener_processes_alive", ())] == 2

    records = [json.loads(line) for line in r.audit.read_text().splitlines()]
    assocs = [a for a in records if a["event"] == "association" and a["calling_ae"] == "SCANNER"]
    assert sorted(a["instances"] for a in assocs if a["outcome"] == "accepted") == [32, 32]
    assert all(a["ended"] == "released" for a in assocs if a["outcome"] == "accepted")
    assert [a["reason"] for a in assocs if a["outcome"] == "refused"] == ["called_ae_not_recognised"]
    sent = [a for a in records if a["event"] == "result_sent"]
    assert sorted((a["kind"], a["outcome"]) for a in sent) == [("seg", "done"), ("sr", "done"), ("sr", "done")]
    assert any(
        a["event"] == "admin_action" and a["action"] == "echo" and a["actor"] == "api@127.0.0.1" for a in records
    )
    assert any(a["event"] == "admin_action" and a["action"] == "cancel" and a["outcome"] == "refused" for a in records)
    text = r.audit.read_text()
    for private in ("ZZGOODPID", "ZZBADPID", str(r.good.patient_name)):
        assert private not in text


def _shot(browser: Browser, name: str) -> Path:
    return browser.screenshot(ARTIFACTS / f"{name}.png", full_page=True)


@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="Debian chromium and chromium-driver (tests/run.sh installs them)",
)
def test_dashboard_in_chromium(running: Running) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    def wait(seconds: float) -> WebDriverWait:  # the old page's elements go stale while the next one loads
        reloading = (NoSuchElementException, StaleElementReferenceException)
        return WebDriverWait(driver, seconds, ignored_exceptions=reloading)

    r = running
    browser = Browser(1400, 900).start()
    driver = browser.driver
    try:
        # without the token every page is refused: the login form, not the page
        driver.get(r.base + "/studies")
        assert driver.title.startswith("Log in") and r.good.study_uid not in driver.page_source
        driver.find_element(By.ID, "token").send_keys("not-the-token-at-all")
        driver.find_element(By.ID, "login").click()  # the answer is a new page: wait for it, not for the click
        wait(15).until(lambda d: "not the node's token" in d.page_source)
        _shot(browser, "login")
        driver.find_element(By.ID, "token").send_keys(r.token)
        driver.find_element(By.ID, "login").click()
        wait(15).until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Overview")
        assert driver.find_element(By.ID, "health").text.splitlines()[1] == "OK"
        assert r.bad.study_uid in driver.find_element(By.ID, "failures").text
        _shot(browser, "overview")

        driver.get(r.base + "/studies")
        driver.find_element(By.ID, "q").send_keys("ACC-OV-GOOD")
        driver.find_element(By.ID, "search").click()
        WebDriverWait(driver, 10).until(lambda d: "q=ACC-OV-GOOD" in d.current_url)
        rows = driver.find_elements(By.CSS_SELECTOR, "#studies tr")[1:]
        assert len(rows) == 1 and r.good.study_uid in rows[0].text and "ZZGOODPID" not in driver.page_source
        _shot(browser, "studies")
        rows[0].find_element(By.CSS_SELECTOR, "a.uid").click()
        wait(30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "img.overlay"))
        imgs = driver.find_elements(By.CSS_SELECTOR, "img.overlay")
        captions = [f.text for f in driver.find_elements(By.CSS_SELECTOR, ".slices figcaption")]
        assert len(imgs) >= 2 and captions[0].startswith("largest lung slice"), captions
        assert any("nodule" in c for c in captions[1:]), captions
        assert all(
            driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) == 128 for i in imgs
        )
        assert len(driver.find_elements(By.CSS_SELECTOR, "table.findings tr")) > 1
        assert str(r.good.patient_name) not in driver.page_source and "ZZGOODPID" not in driver.page_source
        _shot(browser, "study")
        cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
        colours = set()
        for i in imgs:
            png = httpx.get(i.get_attribute("src"), cookies=cookies, timeout=30)
            assert png.status_code == 200 and png.headers["content-type"] == "image/png" and len(png.content) > 1000
            px = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")).reshape(-1, 3)
            colours |= {c for c in PALETTE[:2] if (px == c).all(axis=1).sum() > 10}
        assert colours == set(PALETTE[:2])  # the lung's and the nodule's outlines
        assert httpx.get(imgs[0].get_attribute("src"), timeout=10).status_code == 401  # the picture needs the token

        # forged CSRF: the session cookie alone does not make a POST
        (failed,) = r.jobs_of(r.bad)
        for data in ({}, {"csrf": "0" * 64}):
            forged = httpx.post(f"{r.base}/jobs/{failed['id']}/retry", data=data, cookies=cookies, timeout=10)
            assert forged.status_code == 403
        assert httpx.post(f"{r.base}/jobs/{failed['id']}/retry", timeout=10).status_code == 401
        assert r.job(failed["id"])["state"] == "failed"

        # press retry on the failed job, its model fixed meanwhile: queued again, then done
        r.flag.unlink()
        driver.get(f"{r.base}/studies/{r.bad.study_uid}")
        assert "failed on purpose" in driver.find_element(By.ID, f"job-{failed['id']}").text
        driver.find_element(By.ID, f"retry-{failed['id']}").click()
        flash = f"job {failed['id']} queued again"
        wait(15).until(lambda d: flash in d.find_element(By.ID, "flash").text)
        _shot(browser, "study_after_retry")
        after = r.job(failed["id"])
        assert after["state"] in ("queued", "running", "done") and after["error"] == ""
        wait_for(lambda: r.job(failed["id"])["state"] == "done", 30, "the retried job done")
        records = [json.loads(line) for line in r.audit.read_text().splitlines()]
        assert any(
            a["event"] == "admin_action"
            and a["action"] == "retry"
            and a["actor"] == "dashboard@127.0.0.1"
            and a["outcome"] == "done"
            and a["job_id"] == failed["id"]
            for a in records
        )
        driver.get(f"{r.base}/studies/{r.bad.study_uid}")
        _shot(browser, "study_retried_done")
    finally:
        browser.stop()


def test_https_with_the_dicom_tls_rules(tmp_path: Path) -> None:
    """http.tls_cert_file set: the API answers over HTTPS only (TLS 1.2 or newer, the certificate verified
    against its CA); a plain-HTTP client gets no answer, and the token is still required."""
    import ssl

    from tests.integration.tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    port, http_port = free_port(), free_port()
    token = secrets.token_hex(16)
    (tmp_path / "token").write_text(token)
    (tmp_path / "token").chmod(0o600)
    http = (
        f'port = {http_port}\ntoken_file = "{tmp_path / "token"}"\n'
        f'tls_cert_file = "{pki.server_cert}"\ntls_key_file = "{pki.server_key}"\n'
    )
    cfg = write_config(
        tmp_path / "config.toml", port=port, data_dir=tmp_path / "var", destinations=[], models="", routes="", http=http
    )
    node = NodeProcess(cfg, port, tmp_path / "node.log").start()
    try:
        base = f"https://127.0.0.1:{http_port}"
        verify = ssl.create_default_context(cafile=str(pki.ca_cert))
        wait_for(lambda: httpx.get(base + "/healthz", verify=verify, timeout=5).status_code == 200, 30, "HTTPS")
        assert httpx.get(base + "/api/jobs", verify=verify, timeout=5).status_code == 401
        ok = httpx.get(base + "/api/jobs", verify=verify, timeout=5, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        old = ssl.create_default_context(cafile=str(pki.ca_cert))
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/healthz", verify=old, timeout=5)
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError)):
            httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5)
    finally:
        node.stop()

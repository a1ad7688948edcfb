"""Who gets in: AE titles, host allow-lists, association limits, DICOM TLS, and what the logs and disk reveal."""

from __future__ import annotations

import logging
import socket
import ssl
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom import uid as pduid
from pynetdicom import AE

from ai_models.phantom import generate_phantom
from dicom_node.config import ConfigError, parse_config
from dicom_node.receive.access import AccessPolicy
from dicom_node.synth import StudyIds, phantom_datasets, write_datasets
from tests.integration.listeners import listener_config
from tests.integration.tls_certs import Pki, make_pki
from tests.peers import DCMTK_ENV, ECHOSCU, storescu, wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"


def _associate(port: int, calling: str = "SCANNER", called: str = "DICOM_NODE") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = 5
    return ae.associate("127.0.0.1", port, ae_title=called)


def _rj(assoc: Any) -> tuple[int, int, int]:
    p = assoc.acceptor.primitive
    return int(p.result), int(p.result_source), int(p.diagnostic)


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == name]


# ---- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("security", "key"),
    [
        ({"allowed_hosts": {"CT1": ["10.0.0.300"]}}, "security.allowed_hosts.CT1[0]"),
        ({"allowed_hosts": {"CT1": ["scanner.example.org"]}}, "security.allowed_hosts.CT1[0]"),
        ({"allowed_hosts": {"CT1": []}}, "security.allowed_hosts.CT1"),
        ({"allowed_hosts": {"CT1": "10.0.0.1"}}, "security.allowed_hosts.CT1"),
        ({"allowed_calling_ae_titles": ["CT2"], "allowed_hosts": {"CT1": ["10.0.0.1"]}}, "security.allowed_hosts.CT1"),
        ({"allowed_hosts": {"A\\B": ["10.0.0.1"]}}, "security.allowed_hosts.A\\B"),
        ({"tls_key_file": "k.pem"}, "security.tls_key_file"),
        ({"tls_cert_file": "c.pem"}, "security.tls_key_file"),
        ({"tls_cert_file": "missing.pem", "tls_key_file": "k.pem"}, "security.tls_cert_file"),
        ({"tls_require_client_cert": True}, "security.tls_require_client_cert"),
        ({"tls_min_version": "1.1"}, "security.tls_min_version"),
        ({"allowed_host": {}}, "security.allowed_host"),
    ],
)
def test_bad_security_config_names_the_key(tmp_path: Path, security: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        listener_config(tmp_path, 11112, security)
    assert str(err.value).startswith(key + ":") or str(err.value).startswith(key + "[")


def test_tls_with_client_certs_requires_a_ca(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"^security\.tls_ca_file"):
        tls = {"tls_cert_file": "c.pem", "tls_key_file": "k.pem", "tls_require_client_cert": True}
        listener_config(tmp_path, 11112, tls)


def test_policy_decisions() -> None:
    cfg = parse_config(
        {
            "security": {
                "allowed_calling_ae_titles": ["CT1", "MR1"],
                "allowed_hosts": {"CT1": ["10.1.2.3", "fd00::/8"], "*": ["192.168.0.0/16"]},
            }
        },
        Path("."),
    )
    p = AccessPolicy.from_config(cfg)
    assert p.check("CT1", "DICOM_NODE", "10.1.2.3") is None
    assert p.check("CT1", "DICOM_NODE", "::ffff:10.1.2.3") is None  # dual-stack socket view of an IPv4 peer
    assert p.check("CT1", "DICOM_NODE", "fd00::1") is None
    assert p.check("CT1", "DICOM_NODE", "10.1.2.4").why == "host_not_allowed"
    assert p.check("MR1", "DICOM_NODE", "192.168.7.7") is None  # "*" covers titles without their own entry
    assert p.check("MR1", "DICOM_NODE", "10.1.2.3").why == "host_not_allowed"
    assert p.check("XA1", "DICOM_NODE", "192.168.7.7").why == "calling_ae_not_allowed"
    assert p.check("CT1", "OTHER", "10.1.2.3").why == "called_ae_not_recognised"
    assert p.check("CT1", "DICOM_NODE", "not-an-address").why == "host_not_allowed"


# ---- access ------------------------------------------------------------------------------------------------


def test_unknown_calling_ae_is_rejected_permanent_reason_3(make_listener, caplog) -> None:
    lis = make_listener({"allowed_calling_ae_titles": ["CT1"]})
    caplog.set_level(logging.INFO, logger="dicom_node")
    assoc = _associate(lis.port, calling="INTRUDER")
    assert assoc.is_rejected
    assert _rj(assoc) == (1, 1, 3)
    ok = _associate(lis.port, calling="CT1")
    assert ok.is_established
    ok.release()
    ev = _events(caplog, "association_rejected")
    assert ev and ev[0]["calling_ae"] == "INTRUDER" and ev[0]["reason"] == "calling_ae_not_allowed"


def test_wrong_called_ae_is_rejected_reason_7(make_listener, caplog) -> None:
    lis = make_listener()
    caplog.set_level(logging.INFO, logger="dicom_node")
    assoc = _associate(lis.port, called="SOMEONE_ELSE")
    assert assoc.is_rejected
    assert _rj(assoc) == (1, 1, 7)
    assert _events(caplog, "association_rejected")[0]["reason"] == "called_ae_not_recognised"


def test_host_allow_list_per_ae(make_listener, caplog) -> None:
    lis = make_listener(
        {
            "allowed_calling_ae_titles": ["CT1", "LOCAL"],
            "allowed_hosts": {"CT1": ["10.0.0.0/8"], "LOCAL": ["127.0.0.0/8"]},
        }
    )
    caplog.set_level(logging.INFO, logger="dicom_node")
    refused = _associate(lis.port, calling="CT1")  # CT1 may only come from 10/8; we are 127.0.0.1
    assert refused.is_rejected
    assert _rj(refused) == (1, 1, 3)
    ev = _events(caplog, "association_rejected")[0]
    assert ev["reason"] == "host_not_allowed" and ev["peer"].startswith("127.0.0.1:")
    ok = _associate(lis.port, calling="LOCAL")
    assert ok.is_established
    ok.release()


def test_dcmtk_is_refused_from_a_host_not_allowed(make_listener) -> None:
    lis = make_listener({"allowed_hosts": {"*": ["192.0.2.0/24"]}})
    proc = subprocess.run(
        [ECHOSCU, "-aec", "DICOM_NODE", "-aet", "ANY", "127.0.0.1", str(lis.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stderr


# ---- limits ------------------------------------------------------------------------------------------------


def test_excess_associations_rejected_transient_and_released(make_listener, caplog) -> None:
    lis = make_listener(max_associations=2)
    caplog.set_level(logging.INFO, logger="dicom_node")
    held = [_associate(lis.port) for _ in range(2)]
    assert all(a.is_established for a in held)
    for _ in range(3):
        extra = _associate(lis.port)
        assert extra.is_rejected
        assert _rj(extra) == (2, 3, 2)  # rejected-transient, service-provider (presentation), local limit exceeded
    assert _events(caplog, "association_rejected")[0]["reason"] == "too_many_associations"
    for a in held:
        a.release()
    # every socket of the rejected and released associations is given back, so a new one fits again
    wait_for(lambda: lis.server.active_associations() == 0, 10, "connections to close")
    again = _associate(lis.port)
    assert again.is_established
    again.release()


def test_a_connection_flood_is_capped_and_does_not_stop_the_listener(make_listener, caplog) -> None:
    lis = make_listener(max_associations=2, acse_timeout=30)
    caplog.set_level(logging.INFO, logger="dicom_node")
    cap = lis.server.guard.max_negotiating
    socks = [socket.create_connection(("127.0.0.1", lis.port), timeout=5) for _ in range(cap + 5)]
    try:
        wait_for(lambda: len(_events(caplog, "connection_cut")) >= 5, 10, "the oldest silent connections cut")
        assert len(lis.server.negotiating()) <= cap
        closed = 0
        for s in socks[:5]:  # oldest first
            s.settimeout(5)
            closed += s.recv(1) == b""
        assert closed == 5
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: lis.server.negotiating() == [], 10, "silent connections to go")
    ok = _associate(lis.port)
    assert ok.is_established
    ok.release()


# ---- TLS ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_security(pki: Pki, require_client: bool = True) -> dict[str, Any]:
    return {
        "tls_cert_file": str(pki.server_cert),
        "tls_key_file": str(pki.server_key),
        "tls_ca_file": str(pki.ca_cert),
        "tls_require_client_cert": require_client,
    }


def _echo_tls(port: int, pki: Pki, cert: Path | None = None, key: Path | None = None) -> int:
    tls = ["+tls", str(key), str(cert)] if cert is not None else ["+tla"]
    proc = subprocess.run(
        [ECHOSCU, *tls, "+cf", str(pki.ca_cert), "-aec", "DICOM_NODE", "127.0.0.1", str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode


def test_dcmtk_tls_echo_and_store_with_client_certificate(make_listener, pki: Pki, tmp_path: Path) -> None:
    lis = make_listener(_tls_security(pki))
    assert _echo_tls(lis.port, pki, pki.client_cert, pki.client_key) == 0
    sent = write_datasets(
        phantom_datasets(generate_phantom(1, shape=(3, 32, 32), n_nodules=0), StudyIds.new(1)), tmp_path / "in"
    )
    storescu(lis.port, sent, flags=["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert)])
    assert len(lis.rt.jobs.all_instances()) == len(sent)


def test_tls_refuses_plain_untrusted_and_anonymous_clients_and_keeps_serving(make_listener, pki: Pki, caplog) -> None:
    lis = make_listener(_tls_security(pki))
    caplog.set_level(logging.INFO, logger="dicom_node")
    plain = subprocess.run(
        [ECHOSCU, "-to", "5", "-ta", "5", "-aec", "DICOM_NODE", "127.0.0.1", str(lis.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.returncode != 0
    assert _echo_tls(lis.port, pki, pki.rogue_cert, pki.rogue_key) != 0  # certificate from an unknown CA
    assert _echo_tls(lis.port, pki) != 0  # no certificate at all
    failures = _events(caplog, "tls_handshake_failed")
    assert len(failures) == 3
    assert _echo_tls(lis.port, pki, pki.client_cert, pki.client_key) == 0  # and the node still serves
    assert lis.rt.jobs.all_instances() == []


def test_tls_without_client_certificates_and_a_silent_client_does_not_block_others(make_listener, pki: Pki) -> None:
    lis = make_listener(_tls_security(pki, require_client=False) | {"tls_ca_file": ""}, acse_timeout=30)
    with socket.create_connection(("127.0.0.1", lis.port)):  # connects, never starts the handshake
        assert _echo_tls(lis.port, pki) == 0  # served meanwhile: the handshake is not in the accept loop
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    with (
        socket.create_connection(("127.0.0.1", lis.port)) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.cipher()[0].startswith(("TLS_", "ECDHE", "DHE"))


# ---- privacy -----------------------------------------------------------------------------------------------


def test_no_patient_name_or_id_in_info_logs(make_listener, tmp_path: Path, caplog) -> None:
    lis = make_listener({"allowed_calling_ae_titles": ["SCANNER"]})
    caplog.set_level(logging.DEBUG)  # stricter than INFO: not even debug lines may carry them
    ids = StudyIds.new(7)
    ds_list = phantom_datasets(generate_phantom(7, shape=(3, 32, 32), n_nodules=0), ids)
    for ds in ds_list:
        ds.PatientName = "Zyxwvut^Qponmlk"
        ds.PatientID = "PID-5551234"
    sent = write_datasets(ds_list, tmp_path / "in")
    sent.append(sent[0])  # a duplicate, logged at INFO
    storescu(lis.port, sent)
    bad = dcmread(sent[1])
    bad.StudyInstanceUID = "1.2.3.abc"  # a rejection, logged at WARNING
    bad.save_as(tmp_path / "bad.dcm")
    storescu(lis.port, [tmp_path / "bad.dcm"], check=False)
    denied = _associate(lis.port, calling="Zyxwvut")  # AE titles are logged; fine, they are not patients
    assert denied.is_rejected
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')} {r.exc_text or ''}" for r in caplog.records)
    assert "instance_rejected" in text and "duplicate" in text  # the log did capture the events
    assert "Qponmlk" not in text and "5551234" not in text
    stored = dcmread(lis.rt.files.absolute(lis.rt.jobs.all_instances()[0].path))
    assert str(stored.PatientName) == "Zyxwvut^Qponmlk"  # and the data itself is untouched


def test_data_dir_database_and_files_are_private(make_listener, tmp_path: Path) -> None:
    (tmp_path / "var").mkdir(mode=0o755)  # even a pre-existing, world-readable data_dir is closed
    (tmp_path / "var").chmod(0o755)
    lis = make_listener()
    ds = phantom_datasets(
        generate_phantom(2, shape=(2, 16, 16), n_nodules=0),
        StudyIds.new(2),
        transfer_syntax=pduid.ExplicitVRLittleEndian,
    )
    storescu(lis.port, write_datasets(ds, tmp_path / "in"))
    data_dir = lis.cfg.data_dir
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    leaks = [p for p in data_dir.rglob("*") if p.stat().st_mode & (0o007 if p.is_dir() else 0o077)]
    # group may traverse nothing either: any file a member of the group could read is a leak
    leaks += [p for p in data_dir.rglob("*") if p.is_file() and p.stat().st_mode & 0o044]
    assert (data_dir / "node.db").exists()
    assert sorted(set(leaks)) == [], f"readable by others: {sorted(set(leaks))}"


def test_key_file_readable_by_others_is_warned_about(make_listener, pki: Pki, tmp_path: Path, caplog) -> None:
    key = tmp_path / "loose.key"
    key.write_bytes(pki.server_key.read_bytes())
    key.chmod(0o644)
    caplog.set_level(logging.INFO, logger="dicom_node")
    make_listener(_tls_security(pki, require_client=False) | {"tls_key_file": str(key)})
    assert _events(caplog, "tls_key_readable_by_others")


def test_malformed_patient_values_handled_by_the_node_are_not_quoted_in_its_log(tmp_path: Path, capsys) -> None:
    from pydicom.dataset import Dataset

    from dicom_node.logs import configure_logging

    ds = phantom_datasets(generate_phantom(3, shape=(2, 16, 16), n_nodules=0), StudyIds.new(3))[0]
    [path] = write_datasets([ds], tmp_path / "in")
    raw = path.read_bytes().replace(b"19600101", b"1960QQ01")  # not a DA: what a misconfigured modality sends
    assert raw.count(b"1960QQ01") == 1
    path.write_bytes(raw)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("INFO")
        source = dcmread(path)
        result = Dataset()
        result.PatientBirthDate = source.PatientBirthDate  # as highdicom copies the patient module into SEG/SR
    finally:
        root.handlers[:], root.level = saved
        logging.captureWarnings(False)
    assert "1960QQ01" not in capsys.readouterr().err

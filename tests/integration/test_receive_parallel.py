"""The streaming receive path with real peers: parallel associations share group commits, a large instance
spans many PDUs, an aborted transfer leaves nothing behind, a duplicate sent twice at once is kept once."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import threading
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom import uid as pduid
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from ai_models.phantom import generate_phantom
from dicom_node.config import parse_config
from dicom_node.receive.listener import start_listener
from dicom_node.runtime import open_runtime
from dicom_node.synth import StudyIds, phantom_datasets, write_datasets
from storage.batching import InstanceBatch
from storage.files import TMP_PREFIX
from tests.peers import DCMTK_ENV, STORESCU, free_port, wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture()
def listener(tmp_path: Path):
    port = free_port()
    cfg = parse_config(
        {
            "node": {
                "port": port,
                "bind": "127.0.0.1",
                "data_dir": str(tmp_path / "var"),
                "min_free_mb": 0,
                "max_pdu_size": 16384,
            }
        },
        tmp_path,
    )
    rt = open_runtime(cfg)
    ae, server = start_listener(cfg, rt.files, rt.jobs)
    yield rt, server, port
    server.shutdown()
    ae.shutdown()


def _big_instance(out: Path) -> Path:
    """One 8 MiB multi-frame instance: ~500 PDUs at the listener's 16 KiB maximum."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.99.1", "1.2.3.99", "1.2.3.99.2"
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "OT", 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(1).integers(0, 4096, (16, 512, 512), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pduid.ExplicitVRLittleEndian
    path = out / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_four_parallel_associations_store_everything_once(listener, tmp_path: Path) -> None:
    rt, _, port = listener
    ph = generate_phantom(5, shape=(40, 32, 32), n_nodules=0)
    files = write_datasets(phantom_datasets(ph, StudyIds.new(5)), tmp_path / "in")
    big = _big_instance(tmp_path)
    shares = [files[i::4] for i in range(4)]
    shares[0].append(big)
    procs = [
        subprocess.Popen(
            [STORESCU, "-aec", "DICOM_NODE", "127.0.0.1", str(port), *map(str, share)],
            env=DCMTK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for share in shares
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode(errors="replace")[-2000:]
    stored = {i.sop_instance_uid: i for i in rt.jobs.all_instances()}
    assert len(stored) == len(files) + 1
    study = rt.jobs.get_study(StudyIds.new(5).study_uid)
    assert study is not None and study.instance_count == len(files)
    for src in [*files, big]:
        want = dcmread(src)
        inst = stored[want.SOPInstanceUID]
        got = dcmread(rt.files.absolute(inst.path))
        assert got.PixelData == want.PixelData
        assert inst.size == rt.files.absolute(inst.path).stat().st_size
    assert not list(rt.files.root.rglob(".tmp-*"))


def _store_rq_pdus(ds: Dataset, context_id: int, max_pdu: int) -> list[bytes]:
    req = C_STORE()
    req.MessageID, req.AffectedSOPClassUID, req.AffectedSOPInstanceUID, req.Priority = 1, CT, ds.SOPInstanceUID, 2
    req.DataSet = BytesIO(encode(ds, False, True))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    out = []
    for pdata in msg.encode_msg(context_id, max_pdu):
        body = b"".join(
            (len(v) + 1).to_bytes(4, "big") + bytes([cid]) + v for cid, v in pdata.presentation_data_value_list
        )
        out.append(b"\x04\x00" + len(body).to_bytes(4, "big") + body)
    return out


def _ct(sop: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.4", "CT"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation = 100, 1000, 16, 0
    ds.PixelData = bytes(200_000)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pduid.ExplicitVRLittleEndian
    return ds


def test_abort_mid_dataset_leaves_no_file_and_no_row(listener) -> None:
    rt, server, port = listener
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT, [pduid.ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established
    pdus = _store_rq_pdus(_ct("1.2.3.4.7"), assoc.accepted_contexts[0].context_id, 16384)
    assert len(pdus) > 4
    for pdu in pdus[:4]:  # the command and part of the dataset, then the peer gives up
        assoc.dul.socket.send(pdu)
    wait_for(lambda: list(rt.files.root.rglob(".tmp-*")), 10, "the temp file of the partial instance")
    assoc.abort()
    wait_for(lambda: server.active_associations() == 0, 10, "the association to end")
    assert rt.jobs.all_instances() == []
    assert not [p for p in rt.files.root.rglob("*") if p.is_file()]


def test_same_instance_on_two_associations_at_once_is_kept_once(listener) -> None:
    rt, _, port = listener
    statuses: list[int] = []

    def send() -> None:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CT, [pduid.ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
        try:
            for _ in range(5):
                rsp = assoc.send_c_store(_ct("1.2.3.4.8"))
                statuses.append(int(rsp.Status))
        finally:
            assoc.release()

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [0] * 10
    rows = rt.jobs.all_instances()
    assert len(rows) == 1
    study = rt.jobs.get_study("1.2.3")
    assert study is not None and study.instance_count == 1
    assert dcmread(rt.files.absolute(rows[0].path)).SOPInstanceUID == "1.2.3.4.8"
    assert not list(rt.files.root.rglob(".tmp-*"))


def test_repeated_association_request_reuses_the_negotiated_answer(listener, tmp_path: Path) -> None:
    rt, server, port = listener
    ph = generate_phantom(6, shape=(3, 16, 16), n_nodules=0)
    files = write_datasets(phantom_datasets(ph, StudyIds.new(6)), tmp_path / "in")
    for path in files:  # three associations with byte-identical requests
        proc = subprocess.run(
            [STORESCU, "-aec", "DICOM_NODE", "127.0.0.1", str(port), str(path)],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
    assert len(server.accepted_cache) == 1
    assert len(rt.jobs.all_instances()) == len(files)
    # a cached request still goes through the checks: with no association allowed, it is rejected
    server.limits = dataclasses.replace(server.limits, max_associations=0)
    refused = subprocess.run(
        [STORESCU, "-aec", "DICOM_NODE", "127.0.0.1", str(port), str(files[0])],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert len(rt.jobs.all_instances()) == len(files)


def test_index_failure_answers_a701_leaves_nothing_and_the_next_instance_is_stored(listener, monkeypatch) -> None:
    rt, _, port = listener
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT, [pduid.ExplicitVRLittleEndian])

    def disk_io_error(*_args: object, **_kwargs: object) -> list[str]:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(InstanceBatch, "record", disk_io_error)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    try:
        assert int(assoc.send_c_store(_ct("1.2.3.4.9")).Status) == 0xA701
        # renamed into place before the index was tried: the failure removes it again, and nothing else is left
        # but the empty temp file the association keeps ready for its next instance
        assert rt.jobs.all_instances() == []
        left = [p for p in rt.files.root.rglob("*") if p.is_file()]
        assert [p for p in left if p.stat().st_size or not p.name.startswith(TMP_PREFIX)] == []
        assert len(left) <= 1
        monkeypatch.undo()  # the index works again: the committer's fresh connection stores the resend
        assert int(assoc.send_c_store(_ct("1.2.3.4.9")).Status) == 0
    finally:
        assoc.release()
    [inst] = rt.jobs.all_instances()
    assert inst.sop_instance_uid == "1.2.3.4.9" and rt.files.absolute(inst.path).is_file()

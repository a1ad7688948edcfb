"""The listener with real peers: DCMTK storescu in, bytes stored as received, failures answered with status."""

from __future__ import annotations

import os
import subprocess
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom import uid as pduid
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from ai_models.phantom import generate_phantom
from dicom_node.config import parse_config
from dicom_node.receive.listener import start_listener
from dicom_node.runtime import open_runtime
from dicom_node.synth import StudyIds, phantom_datasets, write_datasets
from tests.peers import DCMTK_ENV, ECHOSCU, free_port, storescu, wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture()
def listener(tmp_path: Path):
    port = free_port()
    cfg = parse_config(
        {"node": {"port": port, "bind": "127.0.0.1", "data_dir": str(tmp_path / "var"), "min_free_mb": 0}}, tmp_path
    )
    rt = open_runtime(cfg)
    ae, server = start_listener(cfg, rt.files, rt.jobs)
    yield cfg, rt, port
    server.shutdown()
    ae.shutdown()


def _series(tmp_path: Path, ts: str, seed: int = 3) -> list[Path]:
    ph = generate_phantom(seed, shape=(6, 64, 64), n_nodules=0)
    if ts == pduid.JPEGLosslessSV1:  # pydicom cannot encode it: DCMTK's dcmcjpeg does (lossless, SV1)
        plain = write_datasets(phantom_datasets(ph, StudyIds.new(seed)), tmp_path / f"plain-{seed}")
        out = tmp_path / f"in-{seed}"
        out.mkdir()
        for p in plain:
            subprocess.run(["/usr/bin/dcmcjpeg", "+e1", str(p), str(out / p.name)], check=True)
        return sorted(out.iterdir())
    return write_datasets(phantom_datasets(ph, StudyIds.new(seed), transfer_syntax=ts), tmp_path / f"in-{seed}")


@pytest.mark.parametrize(
    ("ts", "flags"),
    [
        (pduid.ExplicitVRLittleEndian, []),
        (pduid.RLELossless, ["-xr"]),
        (pduid.JPEG2000Lossless, ["-xv"]),
        (pduid.JPEGLSLossless, ["-xt"]),
        (pduid.JPEGLosslessSV1, ["-xs"]),
        (pduid.DeflatedExplicitVRLittleEndian, ["-xd"]),
    ],
)
def test_storescu_files_are_stored_byte_identical_and_indexed(listener, tmp_path: Path, ts, flags) -> None:
    _cfg, rt, port = listener
    sent = _series(tmp_path, ts)
    storescu(port, sent, flags=flags)
    stored = rt.jobs.all_instances()
    assert len(stored) == len(sent)
    for inst in stored:
        assert inst.transfer_syntax == ts
        path = rt.files.absolute(inst.path)
        src = next(p for p in sent if p.stem == inst.sop_instance_uid)
        # same dataset bytes as sent (the file meta group is the node's own, the dataset is untouched)
        got, want = dcmread(path), dcmread(src)
        assert got.file_meta.TransferSyntaxUID == ts
        assert got.PixelData == want.PixelData
        assert path.stat().st_mode & 0o077 == 0
    assert not list(rt.files.root.rglob(".tmp-*"))


def test_echo_with_dcmtk(listener) -> None:
    _, _, port = listener
    proc = subprocess.run(
        [ECHOSCU, "-aec", "DICOM_NODE", "127.0.0.1", str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr


def _send(port: int, ds: Dataset, sop_class: str = CT, called: str = "DICOM_NODE") -> int | None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class, [pduid.ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        assoc.release()


def _good(sop: str = "1.2.3.4.5.6") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pduid.ExplicitVRLittleEndian
    return ds


@pytest.mark.parametrize(
    ("field", "value", "status"),
    [
        ("StudyInstanceUID", "1.2.3/../../etc", 0xC211),
        ("SeriesInstanceUID", "1.2.abc", 0xC211),
        ("StudyInstanceUID", "1." + "2" * 70, 0xC211),
        ("StudyInstanceUID", "", 0xC213),
    ],
)
def test_hostile_uids_get_failure_status_and_store_nothing(listener, field, value, status) -> None:
    _, rt, port = listener
    ds = _good()
    setattr(ds, field, value)
    assert _send(port, ds) == status
    assert rt.jobs.all_instances() == []
    assert not [p for p in rt.files.root.rglob("*") if p.is_file()]


def test_dataset_uid_differing_from_command_is_refused(listener) -> None:
    _, rt, port = listener
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT, [pduid.ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established
    req = C_STORE()  # built by hand: send_c_store would take the command's UID from the dataset
    req.MessageID = 1
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = "1.2.3.4.5.99"
    req.Priority = 2
    req.DataSet = BytesIO(encode(_good("1.2.3.4.5.7"), False, True))
    # pause the association's reactor as pynetdicom's send_c_store does, or it may take the response first
    assoc._reactor_checkpoint.clear()
    wait_for(lambda: assoc._is_paused, 10, "the association reactor to pause")
    assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
    _, rsp = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    assoc.release()
    assert rsp is not None and int(rsp.Status) == 0xC212
    assert rt.jobs.all_instances() == []


def test_wrong_called_ae_title_is_rejected(listener) -> None:
    _, _, port = listener
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT)
    assoc = ae.associate("127.0.0.1", port, ae_title="NOT_THE_NODE")
    assert assoc.is_rejected


def test_storage_failure_answers_a700_and_leaves_nothing(listener, tmp_path: Path) -> None:
    _, rt, port = listener
    if os.geteuid() == 0:
        # root ignores permissions: make the target a file so the directory cannot be created
        blocker = rt.files.root / "incoming"
        blocker.write_bytes(b"")
    else:  # pragma: no cover - CI runs as root
        rt.files.root.chmod(0o500)
    assert _send(port, _good()) == 0xA700
    assert rt.jobs.all_instances() == []
    assert not list(rt.files.root.rglob(".tmp-*"))


def test_free_space_floor_refuses_with_a700(tmp_path: Path) -> None:
    port = free_port()
    cfg = parse_config(
        {"node": {"port": port, "bind": "127.0.0.1", "data_dir": str(tmp_path / "var"), "min_free_mb": 1 << 30}},
        tmp_path,
    )  # a floor no disk meets
    rt = open_runtime(cfg)
    ae, server = start_listener(cfg, rt.files, rt.jobs)
    try:
        assert _send(port, _good()) == 0xA700
        assert rt.jobs.all_instances() == []
    finally:
        server.shutdown()
        ae.shutdown()


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A real 3 MiB filesystem (tmpfs; CI runs as root) so the disk can actually fill up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_answers_a700_leaves_nothing_and_recovers_when_space_is_back(small_disk: Path) -> None:
    port = free_port()
    cfg = parse_config(
        {"node": {"port": port, "bind": "127.0.0.1", "data_dir": str(small_disk / "var"), "min_free_mb": 0}}, small_disk
    )
    rt = open_runtime(cfg)
    ae, server = start_listener(cfg, rt.files, rt.jobs)
    try:
        ph = generate_phantom(8, shape=(2, 512, 512), n_nodules=0)
        first, second = phantom_datasets(ph, StudyIds.new("full-disk"))  # ~512 KiB each
        assert _send(port, first) == 0
        filler = small_disk / "filler"
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 200_000))  # leave less than one instance
        assert _send(port, second) == 0xA700
        assert [i.sop_instance_uid for i in rt.jobs.all_instances()] == [first.SOPInstanceUID]
        assert not list(rt.files.root.rglob(".tmp-*"))
        assert not any(p.name.startswith(str(second.SOPInstanceUID)) for p in rt.files.root.rglob("*.dcm"))
        filler.unlink()  # space is back: the same instance is accepted without restarting anything
        assert _send(port, second) == 0
        assert len(rt.jobs.all_instances()) == 2
    finally:
        server.shutdown()
        ae.shutdown()
        rt.jobs.engine.dispose()

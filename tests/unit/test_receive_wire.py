"""The receive path's own parsing and encoding, checked against pydicom/pynetdicom and the job store."""

from __future__ import annotations

import random
from io import BytesIO
from pathlib import Path

import pytest
import sqlalchemy.exc
from pydicom import dcmread
from pydicom import uid as pduid
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.receive import upper_layer as ul
from dicom_node.receive.dataset_check import SERIES, SOP_CLASS, SOP_INSTANCE, STUDY, check_bytes
from storage.batching import KeptConnection, instance_batch
from storage.db import make_engine
from storage.jobstore import JobStore
from storage.records import NewInstance

CT = "1.2.840.10008.5.1.4.1.1.2"


def _dataset(with_sequence: bool) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.StudyDate = "20260101"
    ds.Modality = "CT"
    if with_sequence:  # undefined-length sequence with undefined-length items, before the UIDs we need
        item = Dataset()
        item.ReferencedSOPClassUID = CT
        item.ReferencedSOPInstanceUID = "1.2.3.9"
        inner = Dataset()
        inner.CodeValue = "X"
        item.PurposeOfReferenceCodeSequence = DicomSequence([inner])
        ds.ReferencedImageSequence = DicomSequence([item, item])
        ds["ReferencedImageSequence"].is_undefined_length = True
        for it in ds.ReferencedImageSequence:
            it.is_undefined_length_sequence_item = True
    ds.PatientName = "A^B"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.PixelRepresentation = 16, 0
    ds.PixelData = b"\0\1" * 64
    return ds


def _encode(ds: Dataset, explicit: bool, little: bool = True) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = little, not explicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _defined_lengths(raw: bytes, explicit: bool, little: bool) -> bytes:
    """The same dataset with every sequence and item of defined length (pydicom writes them undefined)."""
    ds = read_dataset(BytesIO(raw), is_implicit_VR=not explicit, is_little_endian=little)
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = False
            for item in elem.value:
                item.is_undefined_length_sequence_item = False
    return _encode(ds, explicit, little)


@pytest.mark.parametrize(("explicit", "little"), [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("with_sequence", [False, True])
@pytest.mark.parametrize("defined", [False, True])
def test_walked_uids_equal_pydicom(explicit: bool, little: bool, with_sequence: bool, defined: bool) -> None:
    raw = _encode(_dataset(with_sequence), explicit, little)
    if defined:
        raw = _defined_lengths(raw, explicit, little)
        assert b"\xff\xff\xff\xff" not in raw
    ds = read_dataset(BytesIO(raw), is_implicit_VR=not explicit, is_little_endian=little)
    why, got = check_bytes(raw, explicit=explicit, big_endian=not little)
    assert why is None
    assert got == {
        SOP_CLASS: ds.SOPClassUID,
        SOP_INSTANCE: ds.SOPInstanceUID,
        STUDY: ds.StudyInstanceUID,
        SERIES: ds.SeriesInstanceUID,
    }
    # cut inside an element (the first, the pixel data), it is refused
    for cut in (9, len(raw) - 1):
        assert check_bytes(raw[:cut], explicit=explicit, big_endian=not little)[0] is not None


def test_walk_reports_missing_and_empty_values() -> None:
    ds = _dataset(False)
    del ds.SeriesInstanceUID
    ds.StudyInstanceUID = ""
    why, got = check_bytes(_encode(ds, True), explicit=True)
    assert why is None and got is not None and SERIES not in got and got[STUDY] == ""


def test_walk_never_raises_on_garbage() -> None:
    rng = random.Random(7)
    raw = _encode(_dataset(True), True)
    for _ in range(2000):
        buf = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        why, out = check_bytes(
            bytes(buf[: rng.randint(0, len(buf))]), explicit=rng.random() < 0.5, big_endian=rng.random() < 0.2
        )
        assert why is None or isinstance(why, str)
        assert out is None or isinstance(out, dict)


def test_response_command_decodes_with_pydicom() -> None:
    raw = ul.encode_response(ul.C_STORE_RQ, 7, 0xC211, CT.encode(), b"1.2.3.4.5", comment="bad UID")
    ds = read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 7, 0xC211)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID, ds.ErrorComment) == (CT, "1.2.3.4.5", "bad UID")
    assert ds.CommandDataSetType == 0x0101


def test_pynetdicom_pdata_is_split_into_command_and_dataset() -> None:
    req = C_STORE()
    req.MessageID, req.AffectedSOPClassUID, req.AffectedSOPInstanceUID, req.Priority = 3, CT, "1.2.3.4.5.6.7", 2
    dataset = _encode(_dataset(False), True) * 50
    req.DataSet = BytesIO(dataset)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    command, data = bytearray(), bytearray()
    for pdata in msg.encode_msg(1, 1000):
        pdu = pdata.presentation_data_value_list  # [(context id, header byte + value)]
        body = b"".join((len(v) + 1).to_bytes(4, "big") + bytes([cid]) + v for cid, v in pdu)
        for pdv in ul.iter_pdvs(memoryview(body)):
            assert pdv.context_id == 1
            (command if pdv.is_command else data).extend(body[pdv.start : pdv.end])
    cmd = ul.parse_command(bytes(command))
    assert ul.command_us(cmd, 0x0100) == ul.C_STORE_RQ and ul.command_us(cmd, 0x0110) == 3
    assert ul.command_str(cmd, 0x1000) == "1.2.3.4.5.6.7" and ul.command_str(cmd, 0x0002) == CT
    assert bytes(data) == dataset


def test_file_meta_makes_a_part10_file(tmp_path: Path) -> None:
    raw = _encode(_dataset(False), True)
    path = tmp_path / "x.dcm"
    path.write_bytes(
        ul.file_meta(
            CT.encode(),
            b"1.2.3.4.5.6.7\0",
            pduid.ExplicitVRLittleEndian,
            "1.2.826.0.1.3680043.10.1234.1",
            "DICOMNODE_1",
            "SCANNER",
        )
        + raw
    )
    ds = dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pduid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5.6.7"
    assert ds.file_meta.SourceApplicationEntityTitle == "SCANNER"
    assert ds.SOPInstanceUID == "1.2.3.4.5.6.7" and ds.PixelData == b"\0\1" * 64


@pytest.mark.parametrize("sop", [b"1.2.3.4.5.6.7\0", b"1.2.3.4.5.6.77", b"1.2.3.4.5.6.777 "])
def test_file_meta_group_length_and_instance_uid_for_each_instance(sop: bytes) -> None:
    """Everything but the instance UID is built once per SOP class and AE: each instance still gets its own
    UID and an exact group length."""
    meta = ul.file_meta(
        CT.encode(), sop, pduid.ExplicitVRLittleEndian, "1.2.826.0.1.3680043.10.1234.1", "DICOMNODE_1", "SCANNER"
    )
    assert meta[:132] == b"\0" * 128 + b"DICM"
    group_length = int.from_bytes(meta[140:144], "little")
    assert group_length == len(meta) - 144
    info = dcmread(BytesIO(meta)).file_meta
    assert info.MediaStorageSOPInstanceUID == sop.rstrip(b"\0 ").decode()
    assert info.MediaStorageSOPClassUID == CT
    assert info.FileMetaInformationGroupLength == group_length


def _inst(sop: str, study: str = "1.2.3") -> NewInstance:
    return NewInstance(sop, study, study + ".4", CT, pduid.ExplicitVRLittleEndian, f"x/{sop}.dcm", 10, "SCU")


def _state(js: JobStore) -> tuple:
    studies = []
    for uid in ("1.2.3", "1.2.9"):
        s = js.get_study(uid)
        studies.append(None if s is None else (s.state, s.generation, s.instance_count))
    return tuple(studies), sorted((i.sop_instance_uid, i.path, i.size) for i in js.all_instances())


@pytest.mark.parametrize("late_arrivals", ["rerun", "ignore"])
def test_batch_equals_one_record_instance_per_instance(tmp_path: Path, late_arrivals: str) -> None:
    """Same outcomes and same rows as JobStore.record_instance, including re-opened and replaced."""
    stores = []
    for name in ("one", "batch"):
        js = JobStore(make_engine(f"sqlite:///{tmp_path / name / 'node.db'}"))
        js.create_schema()
        stores.append(js)
    one, batch = stores
    rounds = [
        [_inst("1.2.3.4.1"), _inst("1.2.3.4.2"), _inst("1.2.9.4.1", "1.2.9")],
        [_inst("1.2.3.4.3"), _inst("1.2.3.4.1"), _inst("1.2.3.4.3")],
    ]
    for k, instances in enumerate(rounds):
        if k == 1:  # the study was processed in between: a late arrival re-opens it (or not)
            for js in stores:
                st = js.get_study("1.2.3")
                assert st is not None
                js.complete_study("1.2.3", st.generation, [])
        want = [one.record_instance(i, late_arrivals=late_arrivals) for i in instances]
        with instance_batch(batch.engine) as tx:
            got = tx.record(instances, late_arrivals=late_arrivals)
        assert got == want
        assert _state(batch) == _state(one)


@pytest.mark.parametrize("kept", [False, True])
def test_instance_batch_rolls_back_on_any_error_and_wraps_sqlite_ones(tmp_path: Path, kept: bool) -> None:
    """A failed block leaves no row; SQLite's own errors come out as SQLAlchemy's, others unchanged; the
    connection (kept or borrowed) is usable afterwards."""
    js = JobStore(make_engine(f"sqlite:///{tmp_path / 'node.db'}"))
    js.create_schema()
    keep = KeptConnection(js.engine)
    raw = keep.get() if kept else None
    with pytest.raises(ValueError, match="not a database error"), instance_batch(js.engine, raw=raw) as tx:
        tx.record([_inst("1.2.3.4.1")])
        raise ValueError("not a database error")
    with pytest.raises(sqlalchemy.exc.OperationalError), instance_batch(js.engine, raw=raw) as tx:
        tx.record([_inst("1.2.3.4.1")])
        tx._db.rows("SELECT * FROM no_such_table", {})
    assert js.all_instances() == []
    with instance_batch(js.engine, raw=raw) as tx:
        assert tx.record([_inst("1.2.3.4.1")]) == ["stored"]
    assert [i.sop_instance_uid for i in js.all_instances()] == ["1.2.3.4.1"]
    keep.discard()

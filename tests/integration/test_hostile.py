"""Hostile datasets through the listener: a failure status, nothing stored, the node unharmed.

Datasets are sent byte for byte as written here (pynetdicom's chunked send streams the file after its meta
header without parsing it), so malformed encodings reach the node exactly as an attacker would send them.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom import uid as pduid
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pynetdicom import AE, _config

from ai_models.phantom import generate_phantom
from ai_models.types import InvalidGeometryError
from ai_models.volume import load_series
from dicom_node.config import parse_config
from dicom_node.jobs.assembly import Assembler, series_infos
from dicom_node.jobs.routing import select_series
from dicom_node.receive.listener import start_listener
from dicom_node.runtime import open_runtime
from dicom_node.synth import StudyIds, phantom_datasets, write_datasets
from tests.peers import PHANTOM_SEG_BUNDLE, free_port, storescu

CT = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
EXPLICIT = pduid.ExplicitVRLittleEndian
DEFLATED = pduid.DeflatedExplicitVRLittleEndian
STUDY = b"1.2.826.0.1.3680043.10.99.1"
SERIES, SOP = STUDY + b".2", STUDY + b".2.3"
_LONG = frozenset(str(vr).encode() for vr in EXPLICIT_VR_LENGTH_32)


def el(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element; ``length`` overrides the encoded length (to lie about it)."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    n = len(value) if length is None else length
    if vr in _LONG:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, n) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, n) + value


def body(
    *,
    sop_class: bytes = CT.encode(),
    sop: bytes | None = SOP,
    study: bytes | None = STUDY,
    series: bytes | None = SERIES,
    modality: bytes = b"CT",
    before_study: bytes = b"",
    tail: bytes = b"",
) -> bytes:
    out = el(0x00080016, b"UI", sop_class)
    if sop is not None:
        out += el(0x00080018, b"UI", sop)
    out += el(0x00080060, b"CS", modality) + before_study
    if study is not None:
        out += el(0x0020000D, b"UI", study)
    if series is not None:
        out += el(0x0020000E, b"UI", series)
    return out + tail


def image_pixels(
    rows: int, cols: int, pixels: bytes, *, frames: bytes | None = None, photometric: bytes = b"MONOCHROME2"
) -> bytes:
    """An Image Pixel module (16 bits allocated) and native pixel data, whose element lengths all hold."""
    out = el(0x00280002, b"US", struct.pack("<H", 1)) + el(0x00280004, b"CS", photometric)
    if frames is not None:
        out += el(0x00280008, b"IS", frames)
    out += el(0x00280010, b"US", struct.pack("<H", rows)) + el(0x00280011, b"US", struct.pack("<H", cols))
    return out + el(0x00280100, b"US", struct.pack("<H", 16)) + el(0x7FE00010, b"OW", pixels)


def dicom_file(path: Path, dataset: bytes, *, sop_class: str = CT, sop: str = SOP.decode(), ts: str = EXPLICIT) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(buf.getvalue() + dataset)
    return path


@pytest.fixture()
def make_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send files byte for byte
    started: list[Any] = []

    def make(**node: Any) -> Any:
        port = free_port()
        cfg = parse_config(
            {
                "node": {
                    "port": port,
                    "bind": "127.0.0.1",
                    "data_dir": str(tmp_path / "var"),
                    "min_free_mb": 0,
                    **node,
                },
                "completion": {"stable_seconds": 0},
                "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
                "models": [{"name": "seg", "bundle": str(PHANTOM_SEG_BUNDLE)}],
                "routes": [{"name": "all", "models": ["seg"], "send_to": ["pacs"]}],  # matches every study
            },
            tmp_path,
        )
        rt = open_runtime(cfg)
        ae, server = start_listener(cfg, rt.files, rt.jobs)
        started.append((ae, server))
        return port, rt, cfg

    yield make
    for ae, server in started:
        server.shutdown()
        ae.shutdown()


@pytest.fixture()
def node(make_node: Any) -> Any:
    return make_node()


def send(port: int, path: Path, *, sop_class: str = CT, ts: str = EXPLICIT) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class, [ts])
    ae.dimse_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        assert rsp is not None and "Status" in rsp, "no response from the node"
        return int(rsp.Status)
    finally:
        assoc.release()


def stored_files(rt: Any) -> list[Path]:
    return [p for p in rt.files.root.rglob("*") if p.is_file()]


def assert_nothing_stored(rt: Any) -> None:
    assert rt.jobs.all_instances() == []
    assert stored_files(rt) == []


def nested(levels: int) -> bytes:
    """(0008,1115) holding ``levels`` undefined-length sequences, each inside the previous one's item."""
    open_ = b"".join(
        struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        for _ in range(levels)
    )
    close = (struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)) * levels
    return open_ + close


def nested_defined(levels: int) -> bytes:
    """(0008,1115) holding ``levels`` defined-length sequences, each inside the previous one's defined-length item."""
    inner = b""
    for _ in range(levels):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, len(item)) + item
    return inner


def defined_sequence(content: bytes, *, item_length: int | None = None, tag: int = 0x00081140) -> bytes:
    """A defined-length sequence of one defined-length item holding ``content``; ``item_length`` lies."""
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(content) if item_length is None else item_length) + content
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, len(item)) + item


REF = el(0x00081150, b"UI", CT.encode()) + el(0x00081155, b"UI", SOP)


@pytest.mark.parametrize(
    ("dataset", "status"),
    [
        pytest.param(body(study=b"1.2..3"), 0xC211, id="double-dot"),
        pytest.param(body(study=b"../../../etc"), 0xC211, id="dot-dot-slash"),
        pytest.param(body(series=b"1.2/3"), 0xC211, id="slash"),
        pytest.param(body(series=b"1.2.abc"), 0xC211, id="letters"),
        pytest.param(body(study=b"1.2\x003.4"), 0xC211, id="nul-inside"),
        pytest.param(body(study=b"1." + b"2" * 70), 0xC211, id="over-64-chars"),
        pytest.param(body(study=None), 0xC213, id="missing-study"),
        pytest.param(body(series=None), 0xC213, id="missing-series"),
        pytest.param(body(sop=None), 0xC213, id="missing-sop"),
        pytest.param(body(tail=el(0x7FE00010, b"OW", b"\0" * 1000))[:-500], 0xC210, id="truncated-pixel-data"),
        pytest.param(body()[:-7], None, id="truncated-in-header"),
        pytest.param(body(tail=el(0x00280010, b"US", b"\x00\x02", length=0x100)), 0xC210, id="length-past-end"),
        pytest.param(body(before_study=el(0x00081030, b"LO", b"x" * 10, length=3)), None, id="length-short"),
        pytest.param(body(before_study=nested(10_000)), 0xC210, id="nested-10000"),
        pytest.param(
            body(tail=struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)), 0xC210, id="open-sequence"
        ),
        pytest.param(b"\xff" * 64, None, id="garbage"),
        pytest.param(body(tail=image_pixels(16, 16, b"\0" * 400)), 0xC210, id="pixel-data-shorter-than-the-image"),
        pytest.param(body(tail=image_pixels(16, 16, b"\0" * 1024, frames=b"3")), 0xC210, id="frames-missing"),
        pytest.param(body(before_study=nested_defined(65)), 0xC210, id="defined-nested-65"),
        pytest.param(body(before_study=nested_defined(5000)), 0xC210, id="defined-nested-5000"),
        pytest.param(body(before_study=defined_sequence(REF, item_length=500)), 0xC210, id="item-past-its-sequence"),
        pytest.param(
            body(before_study=defined_sequence(REF, item_length=len(REF) - 6)), 0xC210, id="element-past-its-item"
        ),
        pytest.param(body(before_study=defined_sequence(REF[:-2])), 0xC210, id="element-past-defined-item-end"),
    ],
)
def test_hostile_dataset_gets_failure_and_stores_nothing(
    node, tmp_path: Path, dataset: bytes, status: int | None
) -> None:
    port, rt, _ = node
    t0 = time.monotonic()
    got = send(port, dicom_file(tmp_path / "x.dcm", dataset))
    assert time.monotonic() - t0 < 10
    if status is None:
        assert got >= 0xA000, hex(got)  # any failure status
    else:
        assert got == status, hex(got)
    assert_nothing_stored(rt)
    assert send(port, dicom_file(tmp_path / "ok.dcm", body())) == 0  # and the node keeps serving


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(image_pixels(16, 16, b"\0" * 512), id="exact"),
        pytest.param(image_pixels(16, 16, b"\0" * 514), id="padded"),
        pytest.param(image_pixels(16, 16, b"\0" * 1024, frames=b"2"), id="two-frames"),
        pytest.param(image_pixels(16, 16, b"\0" * 256, photometric=b"YBR_FULL_422"), id="subsampled-colour"),
    ],
)
def test_pixel_data_the_image_module_accounts_for_is_accepted(node, tmp_path: Path, tail: bytes) -> None:
    port, rt, _ = node
    assert send(port, dicom_file(tmp_path / "ok.dcm", body(tail=tail))) == 0
    assert len(rt.jobs.all_instances()) == 1


def test_uid_padded_with_a_trailing_nul_is_valid(node, tmp_path: Path) -> None:
    port, rt, _ = node
    assert len(STUDY) % 2 == 1  # so el() pads it with the NUL the standard prescribes
    assert send(port, dicom_file(tmp_path / "x.dcm", body())) == 0
    assert [i.study_uid for i in rt.jobs.all_instances()] == [STUDY.decode()]


def test_moderate_nesting_is_accepted(node, tmp_path: Path) -> None:
    port, rt, _ = node
    assert send(port, dicom_file(tmp_path / "x.dcm", body(before_study=nested(20)))) == 0
    assert len(rt.jobs.all_instances()) == 1


def test_moderate_defined_length_nesting_is_accepted_and_readable(node, tmp_path: Path) -> None:
    port, rt, _ = node
    dataset = body(before_study=el(0x00081110, b"SQ", b"") + nested_defined(20) + defined_sequence(REF))
    assert send(port, dicom_file(tmp_path / "x.dcm", dataset)) == 0
    [inst] = rt.jobs.all_instances()
    ds = dcmread(rt.files.absolute(inst.path))
    assert ds.ReferencedSeriesSequence[0].ReferencedSeriesSequence[0].ReferencedSeriesSequence is not None
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == SOP.decode()


# ---- other transfer syntaxes: Big Endian, Deflated, encapsulated ---------------------------------------------

BIG_ENDIAN = pduid.ExplicitVRBigEndian
RLE = pduid.RLELossless


def el_be(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One Explicit VR Big Endian element (values given already in big-endian byte order)."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    n = len(value) if length is None else length
    if vr in _LONG:
        return struct.pack(">HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, n) + value
    return struct.pack(">HH2sH", tag >> 16, tag & 0xFFFF, vr, n) + value


def body_be(tail: bytes = b"", before_study: bytes = b"") -> bytes:
    return (
        el_be(0x00080016, b"UI", CT.encode())
        + el_be(0x00080018, b"UI", SOP)
        + el_be(0x00080060, b"CS", b"CT")
        + before_study
        + el_be(0x0020000D, b"UI", STUDY)
        + el_be(0x0020000E, b"UI", SERIES)
        + tail
    )


def image_be(rows: int, cols: int, pixels: bytes) -> bytes:
    return (
        el_be(0x00280002, b"US", struct.pack(">H", 1))
        + el_be(0x00280004, b"CS", b"MONOCHROME2")
        + el_be(0x00280010, b"US", struct.pack(">H", rows))
        + el_be(0x00280011, b"US", struct.pack(">H", cols))
        + el_be(0x00280100, b"US", struct.pack(">H", 16))
        + el_be(0x7FE00010, b"OW", pixels)
    )


def nested_be(levels: int) -> bytes:
    open_ = b"".join(
        struct.pack(">HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF) + struct.pack(">HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        for _ in range(levels)
    )
    return open_ + (struct.pack(">HHI", 0xFFFE, 0xE00D, 0) + struct.pack(">HHI", 0xFFFE, 0xE0DD, 0)) * levels


def _item(length: int, value: bytes = b"") -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, length) + value


SEQ_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
RLE_FRAGMENT = struct.pack("<16I", 1, 64, *([0] * 14)) + b"\x7f" + b"\0" * 128 + b"\0"  # header, one segment


def encapsulated(*items: bytes) -> bytes:
    """An RLE image module and encapsulated pixel data holding ``items`` (basic offset table first)."""
    module = (
        el(0x00280002, b"US", struct.pack("<H", 1))
        + el(0x00280004, b"CS", b"MONOCHROME2")
        + el(0x00280010, b"US", struct.pack("<H", 8))
        + el(0x00280011, b"US", struct.pack("<H", 16))
        + el(0x00280100, b"US", struct.pack("<H", 8))
    )
    return module + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + b"".join(items)


def _deflated(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("ts", "dataset", "ok"),
    [
        pytest.param(BIG_ENDIAN, body_be(image_be(16, 16, b"\0" * 512)), True, id="big-endian"),
        pytest.param(
            BIG_ENDIAN, body_be(image_be(16, 16, b"\0" * 1000))[:-500], False, id="big-endian-truncated-pixels"
        ),
        pytest.param(BIG_ENDIAN, body_be(image_be(16, 16, b"\0" * 400)), False, id="big-endian-pixels-short"),
        pytest.param(BIG_ENDIAN, body_be(before_study=nested_be(200)), False, id="big-endian-nested-200"),
        pytest.param(BIG_ENDIAN, body(), False, id="little-endian-sent-as-big"),
        pytest.param(
            RLE, body(tail=encapsulated(_item(0), _item(len(RLE_FRAGMENT), RLE_FRAGMENT), SEQ_END)), True, id="rle"
        ),
        pytest.param(RLE, body(tail=encapsulated(_item(0), _item(5000, b"\0" * 64))), False, id="rle-fragment-cut"),
        pytest.param(
            RLE, body(tail=encapsulated(_item(0), _item(len(RLE_FRAGMENT), RLE_FRAGMENT))), False, id="rle-no-delimiter"
        ),
        pytest.param(
            RLE,
            body(tail=encapsulated(_item(400, b"\0" * 4), _item(len(RLE_FRAGMENT), RLE_FRAGMENT), SEQ_END)),
            False,
            id="rle-offset-table-past-its-item",
        ),
        pytest.param(
            RLE,
            body(tail=encapsulated(_item(0), el(0x00080060, b"CS", b"CT"), SEQ_END)),
            False,
            id="rle-element-among-fragments",
        ),
        pytest.param(RLE, body(before_study=nested_defined(70)), False, id="rle-defined-nested-70"),
        pytest.param(
            DEFLATED,
            _deflated(body(before_study=nested(30), tail=image_pixels(16, 16, b"\0" * 512))),
            True,
            id="deflated",
        ),
        pytest.param(
            DEFLATED,
            _deflated(body(tail=el(0x7FE00010, b"OW", b"\0" * 1000))[:-500]),
            False,
            id="deflated-truncated-pixels",
        ),
        pytest.param(
            DEFLATED, _deflated(body(tail=image_pixels(16, 16, b"\0" * 400))), False, id="deflated-pixels-short"
        ),
        pytest.param(DEFLATED, _deflated(body(before_study=nested(200))), False, id="deflated-nested-200"),
    ],
)
def test_every_transfer_syntax_gets_the_structure_check(
    node, tmp_path: Path, ts: str, dataset: bytes, ok: bool
) -> None:
    port, rt, _ = node
    status = send(port, dicom_file(tmp_path / "x.dcm", dataset, ts=ts), ts=ts)
    if not ok:
        assert status == 0xC210, hex(status)
        assert_nothing_stored(rt)
        return
    assert status == 0, hex(status)
    [inst] = rt.jobs.all_instances()
    ds = dcmread(rt.files.absolute(inst.path))
    assert ds.SOPInstanceUID == SOP.decode()
    assert ds.file_meta.TransferSyntaxUID == ts


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def test_deflate_bomb_is_refused_without_inflating_it_in_memory(make_node, tmp_path: Path) -> None:
    port, rt, _ = make_node(max_instance_mb=16)
    bomb = _deflate(body(tail=el(0x7FE00010, b"OB", b"\0" * (64 << 20))))
    assert len(bomb) < 1 << 20  # 64 MiB of zeros in well under 1 MiB
    path = dicom_file(tmp_path / "bomb.dcm", bomb, ts=DEFLATED)
    tracemalloc.start()
    try:
        status = send(port, path, ts=DEFLATED)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 0xC210
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated"
    assert_nothing_stored(rt)


def test_truncated_deflate_stream_is_refused(node, tmp_path: Path) -> None:
    port, rt, _ = node
    data = _deflate(body(tail=el(0x7FE00010, b"OB", bytes(range(256)) * 64)))
    assert send(port, dicom_file(tmp_path / "t.dcm", data[:-40], ts=DEFLATED), ts=DEFLATED) == 0xC210
    assert_nothing_stored(rt)
    assert send(port, dicom_file(tmp_path / "ok.dcm", data, ts=DEFLATED), ts=DEFLATED) == 0
    assert len(rt.jobs.all_instances()) == 1


# ---- duplicates ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["keep_first", "replace"])
def test_duplicate_sop_instance_follows_policy_and_makes_no_second_job(make_node, tmp_path: Path, policy: str) -> None:
    port, rt, _ = make_node(duplicate_policy=policy)
    first = dicom_file(tmp_path / "a.dcm", body(modality=b"CT"))
    second = dicom_file(tmp_path / "b.dcm", body(modality=b"MR"))
    assert send(port, first) == 0
    assert send(port, second) == 0
    [inst] = rt.jobs.all_instances()
    assert dcmread(rt.files.absolute(inst.path)).Modality == ("CT" if policy == "keep_first" else "MR")
    assert len(stored_files(rt)) == 1


def test_duplicate_after_completion_is_kept_first_and_queues_nothing(make_node, tmp_path: Path) -> None:
    port, rt, cfg = make_node(duplicate_policy="keep_first")
    ids = StudyIds.new(5)
    sent = write_datasets(phantom_datasets(generate_phantom(5, shape=(12, 32, 32), n_nodules=0), ids), tmp_path / "s")
    storescu(port, sent)
    assembler = Assembler(cfg, rt.files, rt.jobs)
    assert assembler.run_once(now=time.time() + 60) == 1
    jobs_before = rt.jobs.list_jobs(limit=100)
    assert len(jobs_before) == 1
    storescu(port, sent[:3])  # a modality re-sends part of the series
    assert assembler.run_once(now=time.time() + 120) == 0
    assert len(rt.jobs.list_jobs(limit=100)) == 1
    assert len(rt.jobs.all_instances()) == len(sent)


# ---- non-image objects -----------------------------------------------------------------------------------


def test_sr_and_pdf_are_stored_but_never_routed_to_a_model(node, tmp_path: Path) -> None:
    port, rt, cfg = node
    sr_uid, pdf_uid = SOP + b".10", SOP + b".11"
    sr = body(sop_class=BASIC_TEXT_SR.encode(), sop=sr_uid, modality=b"SR", series=SERIES + b".5")
    pdf = body(
        sop_class=ENCAPSULATED_PDF.encode(),
        sop=pdf_uid,
        modality=b"DOC",
        series=SERIES + b".6",
        tail=el(0x00420011, b"OB", b"%PDF-1.4\n%%EOF\n"),
    )
    assert (
        send(
            port,
            dicom_file(tmp_path / "sr.dcm", sr, sop_class=BASIC_TEXT_SR, sop=sr_uid.decode()),
            sop_class=BASIC_TEXT_SR,
        )
        == 0
    )
    assert (
        send(
            port,
            dicom_file(tmp_path / "pdf.dcm", pdf, sop_class=ENCAPSULATED_PDF, sop=pdf_uid.decode()),
            sop_class=ENCAPSULATED_PDF,
        )
        == 0
    )
    assert len(rt.jobs.all_instances()) == 2
    infos = series_infos(rt.files, rt.jobs.instances_of_study(STUDY.decode()))
    assert len(infos) == 2
    # even with a minimum of one slice, neither is a series a volume model may be given
    route = cfg.routes[0].__class__(name="any", models=("seg",), send_to=("pacs",), min_slices=1)
    assert select_series(route, infos) is None
    assert Assembler(cfg, rt.files, rt.jobs).run_once(now=time.time() + 60) == 1
    assert rt.jobs.list_jobs(limit=10) == []


# ---- absurd geometry (the worker's volume loader) ----------------------------------------------------------


def _ct_files(tmp_path: Path, n: int = 3) -> list[Path]:
    return write_datasets(
        phantom_datasets(generate_phantom(9, shape=(n, 16, 16), n_nodules=0), StudyIds.new(9)), tmp_path / "geom"
    )


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"Rows": 65535, "Columns": 65535}, "absurd matrix"),
        ({"Rows": 0}, "absurd matrix"),
        ({"NumberOfFrames": "1000000000"}, "multi-frame"),
        ({"BitsAllocated": 64}, "BitsAllocated"),
        ({"PixelSpacing": ["0", "0"]}, "PixelSpacing"),
        ({"ImageOrientationPatient": ["1", "0", "0", "1", "0", "0"]}, "ImageOrientationPatient"),
    ],
)
def test_volume_loader_refuses_absurd_geometry_before_allocating(
    tmp_path: Path, changes: dict[str, Any], why: str
) -> None:
    files = _ct_files(tmp_path)
    for f in files:
        ds = dcmread(f)
        for k, v in changes.items():
            setattr(ds, k, v)
        ds.save_as(f)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidGeometryError, match="invalid geometry") as err:
            load_series(files)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert why in str(err.value)
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB allocated"


def test_volume_loader_refuses_a_voxel_count_over_the_limit(tmp_path: Path) -> None:
    files = _ct_files(tmp_path, n=4)
    with pytest.raises(InvalidGeometryError, match=r"invalid geometry: .*exceeds the limit"):
        load_series(files, max_voxels=16 * 16 * 3)
    vol = load_series(files)  # and the same files load within the limit
    assert np.asarray(vol.array).size == 16 * 16 * 4

"""Fuzz the node's own input handling: a received dataset (IncomingInstance: write fragments, finish) and the
header walkers, on mutated bytes. Never anything but RejectedInstance, never a file outside the storage root,
never a partial file left behind. Bounded: a fixed number of derandomized examples."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from dicom_node.receive import dataset_check
from dicom_node.receive.dataset_check import check_and_find, check_structure
from dicom_node.receive.incoming import IncomingInstance, RejectedInstance, StoreSettings
from storage.files import FileStore

CT = b"1.2.840.10008.5.1.4.1.1.2"
SOP = b"1.2.826.0.1.3680043.10.77.1.2.3"
EXPLICIT, IMPLICIT, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"


def _el(tag: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr.decode() in EXPLICIT_VR_LENGTH_32:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _seed() -> bytes:
    """A small but complete dataset: UIDs, a nested undefined-length sequence, a name, pixel data."""
    item = _el(0x00081150, b"UI", CT) + _el(0x00081155, b"UI", SOP + b".9")
    seq = (
        struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + item
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    return (
        _el(0x00080016, b"UI", CT)
        + _el(0x00080018, b"UI", SOP)
        + _el(0x00080060, b"CS", b"CT")
        + seq
        + _el(0x00100010, b"PN", b"Fuzz^Patient")
        + _el(0x0020000D, b"UI", b"1.2.826.0.1.3680043.10.77.1")
        + _el(0x0020000E, b"UI", b"1.2.826.0.1.3680043.10.77.1.2")
        + _el(0x00280010, b"US", b"\x04\x00")
        + _el(0x7FE00010, b"OW", bytes(range(32)))
    )


SEED = _seed()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEED)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "len"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x2E, 0x2F, 0x41, 0xFE, 0xE0]))
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=24))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif pos + 4 <= len(data):  # a 16- or 32-bit length-looking field gets an extreme value
            data[pos : pos + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF])))
    return bytes(data)


@pytest.fixture(scope="module")
def store_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="fuzz-store-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _receive(files: FileStore, data: bytes, ts: str, chunk: int, sop: bytes = SOP) -> None:
    """Receive ``data`` as the node does and check the invariants whatever the outcome."""
    inc = IncomingInstance(
        files,
        StoreSettings(max_instance_bytes=1 << 20),
        command_sop_uid=sop,
        command_class_uid=CT,
        transfer_syntax=ts,
        calling_ae="FUZZ",
    )
    for i in range(0, len(data), chunk):
        inc.write(memoryview(data)[i : i + chunk])
    root = files.root.resolve()
    try:
        pending = inc.finish()
    except RejectedInstance as exc:
        assert 0xA000 <= exc.status <= 0xCFFF
        left = [p for p in files.root.rglob("*") if p.is_file()]
        assert left == [], f"rejected ({exc.comment}) but left {left}"
        return
    assert pending.path.resolve().is_relative_to(root)
    assert pending.tmp.resolve().is_relative_to(root)
    assert [p for p in files.root.rglob("*") if p.is_file()] == [pending.tmp]
    os.close(pending.fd)
    pending.tmp.unlink()


def _fresh(root: Path) -> FileStore:
    for p in root.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return FileStore(root)


FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(data=mutated(), chunk=st.sampled_from([7, 64, 1 << 16]))
def test_mutated_explicit_dataset(store_root: Path, data: bytes, chunk: int) -> None:
    _receive(_fresh(store_root), data, EXPLICIT, chunk)


@FUZZ
@given(data=mutated())
def test_mutated_bytes_read_as_implicit(store_root: Path, data: bytes) -> None:
    _receive(_fresh(store_root), data, IMPLICIT, 1 << 16)


@FUZZ
@given(data=mutated(), cut=st.integers(0, 64))
def test_mutated_deflated_dataset(store_root: Path, data: bytes, cut: int) -> None:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = c.compress(data) + c.flush()
    _receive(_fresh(store_root), deflated[: len(deflated) - cut], DEFLATED, 1 << 16)


@FUZZ
@given(data=st.binary(max_size=512), sop=st.sampled_from([SOP, b"../../x", b"1.2/3", b"", b"1.2\x00.3", b"\xff\xfe"]))
def test_random_bytes_and_command_uids(store_root: Path, data: bytes, sop: bytes) -> None:
    _receive(_fresh(store_root), data, EXPLICIT, 1 << 16, sop=sop)


@FUZZ
@given(data=mutated(), explicit=st.booleans(), big=st.booleans(), head=st.integers(0, 600))
def test_header_walker_never_raises(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, explicit: bool, big: bool, head: int
) -> None:
    path = tmp_path_factory.getbasetemp() / "walk.bin"
    path.write_bytes(b"meta" + data)
    kw = {"explicit": explicit, "big_endian": big and explicit}
    why = check_structure(path, 4, len(data) + 4, **kw)
    assert why is None or isinstance(why, str)
    # the walk from bytes already in memory (the listener's case) decides exactly as from the file, also
    # when it has to switch from the head to the file midway (small windows force that here)
    assert check_structure(path, 4, len(data) + 4, head=data[:head], **kw) == why
    # the listener takes the identifying UIDs from that same walk, which decides the same way
    why_too, uids = check_and_find(path, 4, len(data) + 4, head=data[:head], **kw)
    assert why_too == why
    assert uids is None or isinstance(uids, dict)
    saved = dataset_check._WINDOW
    try:
        dataset_check._WINDOW = 64
        assert check_structure(path, 4, len(data) + 4, head=data[:head], **kw) == why
        assert check_structure(path, 4, len(data) + 4, **kw) == why
    finally:
        dataset_check._WINDOW = saved


def test_the_seed_itself_is_accepted(store_root: Path) -> None:
    files = _fresh(store_root)
    inc = IncomingInstance(
        files, StoreSettings(), command_sop_uid=SOP, command_class_uid=CT, transfer_syntax=EXPLICIT, calling_ae="FUZZ"
    )
    inc.write(memoryview(SEED))
    pending = inc.finish()
    assert pending.instance.sop_instance_uid == SOP.decode()
    os.close(pending.fd)
    pending.tmp.unlink()

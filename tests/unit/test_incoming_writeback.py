"""A large instance's bytes are queued for disk while later fragments still arrive (so its fsync finds most
of it written), over contiguous ranges from the start of the file; the file is the same either way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from dicom_node.receive import incoming as handlers
from dicom_node.receive.incoming import WRITEBACK_BYTES, IncomingInstance, StoreSettings
from storage.files import FileStore

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
SOP = "1.2.3.4.5.6.7"


def _dataset(pixel_bytes: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT, SOP
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.4", "CT"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation = pixel_bytes // 1024, 512, 16, 0
    ds.PixelData = bytes(range(256)) * (pixel_bytes // 256)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


@pytest.mark.parametrize(("pixel_bytes", "expect_calls"), [(512 * 1024, True), (32 * 1024, False)])
def test_writeback_covers_the_file_in_order_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pixel_bytes: int, expect_calls: bool
) -> None:
    calls: list[tuple[int, int]] = []
    real = handlers.start_writeback

    def record(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        real(fd, offset, length)  # the real call too: it must not disturb the write

    monkeypatch.setattr(handlers, "start_writeback", record)
    files = FileStore(tmp_path / "store")
    data = _dataset(pixel_bytes)
    inc = IncomingInstance(
        files,
        StoreSettings(),
        command_sop_uid=SOP.encode(),
        command_class_uid=CT.encode(),
        transfer_syntax=EXPLICIT,
        calling_ae="SCU",
    )
    for i in range(0, len(data), 16384):  # storescu's default PDU size
        inc.write(memoryview(data)[i : i + 16384])
    pending = inc.finish()
    try:
        size = os.fstat(pending.fd).st_size
        assert pending.tmp.read_bytes().endswith(data)
    finally:
        os.close(pending.fd)
    assert bool(calls) is expect_calls
    end = 0
    for offset, length in calls:
        assert offset == end and length >= WRITEBACK_BYTES
        end = offset + length
    assert end <= size
    if expect_calls:
        assert size - end < WRITEBACK_BYTES  # only the tail is left for the fsync

"""Thin C-STORE handling: stream to a temp file, check the header, place and index, answer a status.

Success (0x0000) is answered only after the bytes are on disk (fsync, rename, fsync of the folder) and
the index row is committed (see group_commit). Every failure answers a DICOM failure status and leaves
neither a partial file nor a row. Data fragments go to disk as they arrive, so memory stays bounded
whatever the instance size.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node import __version__
from dicom_node.receive.dataset_check import (
    SERIES,
    SOP_CLASS,
    SOP_INSTANCE,
    STUDY,
    MalformedDataset,
    check_and_find,
    inflate_into,
)
from dicom_node.receive.upper_layer import file_meta
from storage.files import FileStore, StorageFullError, UnsafeNameError, check_uid, start_writeback
from storage.records import NewInstance

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
OUT_OF_RESOURCES_DB = 0xA701
OUT_OF_RESOURCES_TOO_LARGE = 0xA702
CANNOT_UNDERSTAND = 0xC210
INVALID_UID = 0xC211
UID_MISMATCH = 0xC212
MISSING_UID = 0xC213

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1234.1"
WRITEBACK_BYTES = 128 << 10  # queue a large instance's bytes for disk this often as they arrive
IMPLEMENTATION_VERSION = f"DICOMNODE_{__version__}"[:16]
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
SNIFF_BYTES = 64 << 10  # the dataset's first bytes kept in memory: the walk reads its element headers from them

_KEYWORDS = {
    SOP_CLASS: "SOPClassUID",
    SOP_INSTANCE: "SOPInstanceUID",
    STUDY: "StudyInstanceUID",
    SERIES: "SeriesInstanceUID",
}
_HEADER_TAGS = list(_KEYWORDS)


class RejectedInstance(Exception):
    """An instance cannot be accepted; carries the DIMSE status to answer."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class StoreSettings:
    late_arrivals: str = "rerun"
    reopen_classes: frozenset[str] | None = None  # SOP classes whose late arrival re-runs a study; None: any
    duplicate_policy: str = "keep_first"
    max_instance_bytes: int = 2048 << 20


@dataclass(frozen=True)
class Pending:
    """A complete temp file whose header passed the checks, still open (``fd``) and not yet flushed: the
    group committer places it, flushes it and indexes it, and closes ``fd`` whatever happens."""

    tmp: Path
    path: Path
    fd: int
    instance: NewInstance


def check_header(values: dict[int, str], command_sop_uid: str, command_class_uid: str) -> tuple[str, str, str, str]:
    """(study, series, sop, sop class) after checking presence, UID syntax and agreement with the command."""
    for tag in (STUDY, SERIES, SOP_INSTANCE, SOP_CLASS):
        if not values.get(tag):
            raise RejectedInstance(MISSING_UID, f"missing {_KEYWORDS[tag]}")
    study, series, sop, sop_class = values[STUDY], values[SERIES], values[SOP_INSTANCE], values[SOP_CLASS]
    try:
        for tag in (STUDY, SERIES, SOP_INSTANCE, SOP_CLASS):
            check_uid(values[tag], _KEYWORDS[tag])
    except UnsafeNameError as exc:
        raise RejectedInstance(INVALID_UID, str(exc)) from exc
    if sop != command_sop_uid:
        raise RejectedInstance(UID_MISMATCH, "SOPInstanceUID differs from the C-STORE request")
    if sop_class != command_class_uid:
        raise RejectedInstance(UID_MISMATCH, "SOPClassUID differs from the C-STORE request")
    return study, series, sop, sop_class


def read_header_uids(path: Path) -> dict[int, str]:
    """The identifying UIDs read by pydicom (the slow path: deflated, big endian, very long headers)."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        out = {}
        for tag, kw in _KEYWORDS.items():
            v = ds.get(kw)
            if v is not None:
                out[tag] = str(v)
        return out
    except (
        InvalidDicomError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        OSError,
        OverflowError,
        RecursionError,
    ) as exc:
        raise RejectedInstance(CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}") from exc


class IncomingInstance:
    """One C-STORE dataset being received: fragments are written to a temp file as they arrive."""

    def __init__(
        self,
        files: FileStore,
        settings: StoreSettings,
        *,
        command_sop_uid: bytes,
        command_class_uid: bytes,
        transfer_syntax: str,
        calling_ae: str,
        temp: tuple[int, Path] | None = None,
    ) -> None:
        """``temp``: an empty temp file (fd, path) from ``FileStore.open_temp`` made ahead of time, now owned
        by this instance; otherwise one is made when the first fragment arrives."""
        self.files = files
        self.settings = settings
        self.sop_raw = command_sop_uid
        self.class_raw = command_class_uid
        self.sop_uid = command_sop_uid.decode("ascii", errors="replace").rstrip("\0 ")
        self.class_uid = command_class_uid.decode("ascii", errors="replace").rstrip("\0 ")
        self.transfer_syntax = transfer_syntax
        self.calling_ae = calling_ae
        self.fd: int | None = temp[0] if temp else None
        self.tmp: Path | None = temp[1] if temp else None
        self.started = False  # file meta written
        self.size = 0  # dataset bytes received
        self.file_size = 0
        self.written_back = 0  # bytes already queued for writeback (see storage.files.start_writeback)
        self.head = bytearray()
        self.error: RejectedInstance | None = None

    def write(self, data: memoryview) -> None:
        """Append one data fragment; after a failure the rest of the dataset is read and dropped."""
        if self.error is not None:
            return
        self.size += len(data)
        try:
            if self.size > self.settings.max_instance_bytes:
                raise RejectedInstance(OUT_OF_RESOURCES_TOO_LARGE, "instance exceeds node.max_instance_mb")
            if not self.started:
                if self.fd is None:
                    self.fd, self.tmp = self.files.open_temp()
                self._write_all(
                    memoryview(
                        file_meta(
                            self.class_raw,
                            self.sop_raw,
                            self.transfer_syntax,
                            IMPLEMENTATION_UID,
                            IMPLEMENTATION_VERSION,
                            self.calling_ae,
                        )
                    )
                )
                self.started = True
            if len(self.head) < SNIFF_BYTES:
                self.head += data[: SNIFF_BYTES - len(self.head)]
            self._write_all(data)
        except RejectedInstance as exc:
            self._fail(exc)
        except StorageFullError as exc:
            self._fail(RejectedInstance(OUT_OF_RESOURCES, f"storage full: {exc}"))
        except OSError as exc:
            self._fail(RejectedInstance(OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}"))

    def _write_all(self, view: memoryview) -> None:
        """Append to the temp file; every WRITEBACK_BYTES, start writing what has arrived to disk."""
        fd = self.fd
        assert fd is not None
        while view:
            try:
                n = os.write(fd, view)
            except OSError as exc:
                if exc.errno == 28:
                    raise StorageFullError(28, "no space left on device") from exc
                raise
            view = view[n:]
            self.file_size += n
        if self.file_size - self.written_back >= WRITEBACK_BYTES:
            start_writeback(fd, self.written_back, self.file_size - self.written_back)
            self.written_back = self.file_size

    def _fail(self, exc: RejectedInstance) -> None:
        self.error = exc
        self.discard()

    def discard(self) -> None:
        """Close and remove the temp file (an aborted association, a rejected instance)."""
        fd, tmp, self.fd, self.tmp = self.fd, self.tmp, None, None
        self.files.discard_temp(fd, tmp)

    def _check_structure(self) -> dict[int, str] | None:
        """Reject a dataset whose elements do not tile it exactly (see dataset_check) and return the
        identifying UIDs the same walk found (None: ask pydicom). Every transfer syntax is walked: the
        encapsulated ones as Explicit VR Little Endian outside their fragments; a deflated one inflated
        (within node.max_instance_mb) into an unnamed file beside the temp file, never into memory."""
        assert self.tmp is not None
        start = self.file_size - self.size
        ts = self.transfer_syntax
        try:
            if ts == DEFLATED_LE:
                with tempfile.TemporaryFile(dir=self.tmp.parent) as inflated:
                    size = inflate_into(self.tmp, start, inflated, max_total=self.settings.max_instance_bytes)
                    inflated.seek(0)
                    head = inflated.read(SNIFF_BYTES)
                    why, values = check_and_find(
                        f"/proc/self/fd/{inflated.fileno()}", 0, size, explicit=True, head=head
                    )
                if not why and values is None:
                    why = "identifying UIDs not readable at the start of the inflated dataset"
            else:
                native = ts in (EXPLICIT_LE, IMPLICIT_LE, BIG_ENDIAN)
                why, values = check_and_find(
                    self.tmp,
                    start,
                    self.file_size,
                    explicit=ts != IMPLICIT_LE,
                    big_endian=ts == BIG_ENDIAN,
                    native=native,
                    head=self.head,
                )
            if why:
                raise MalformedDataset(why)
        except MalformedDataset as exc:
            raise RejectedInstance(CANNOT_UNDERSTAND, f"malformed dataset: {exc}") from exc
        return values

    def finish(self) -> Pending:
        """Check the header; raises RejectedInstance (temp file removed). The file is flushed later, by the
        group committer, after its rename: on a journaling file system one commit then covers data, inode
        and name."""
        try:
            if self.error is not None:
                raise self.error
            if self.fd is None or self.tmp is None or not self.started:
                raise RejectedInstance(CANNOT_UNDERSTAND, "empty dataset")
            values = self._check_structure()  # security: truncation, bad lengths, deep nesting, deflate bombs
            if values is None:
                values = read_header_uids(self.tmp)
            study, series, sop, sop_class = check_header(values, self.sop_uid, self.class_uid)
            try:
                self.files.check_space(0)
                path = self.files.instance_path(study, series, sop)
            except StorageFullError as exc:
                raise RejectedInstance(OUT_OF_RESOURCES, f"storage full: {exc}") from exc
        except BaseException:
            self.discard()
            raise
        tmp, self.tmp = self.tmp, None
        fd, self.fd = self.fd, None
        return Pending(
            tmp=tmp,
            path=path,
            fd=fd,
            instance=NewInstance(
                sop_instance_uid=sop,
                study_uid=study,
                series_uid=series,
                sop_class_uid=sop_class,
                transfer_syntax=self.transfer_syntax,
                path=self.files.relative(path),
                size=self.file_size,
                calling_ae=self.calling_ae,
            ),
        )

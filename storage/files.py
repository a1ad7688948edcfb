"""Received and produced DICOM files on disk: safe names, atomic durable writes.

A file is visible under its final name only once its bytes are on disk (write to a temp file in the same
folder, fsync, rename, fsync the folder). Names derive from UIDs that are validated first, so no input can
point outside the storage root.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
TMP_PREFIX = ".tmp-"


class UnsafeNameError(ValueError):
    """A UID cannot be used as a file name (not a valid DICOM UID)."""


class StorageFullError(OSError):
    """Free space is below the configured floor, or the disk is full."""


@functools.lru_cache(maxsize=4096)  # a study's and series' UIDs come with every instance, a SOP UID twice
def is_valid_uid(uid: str) -> bool:
    return 0 < len(uid) <= 64 and UID_RE.match(uid) is not None


def check_uid(uid: str, what: str) -> str:
    if not isinstance(uid, str) or not is_valid_uid(uid):
        raise UnsafeNameError(f"{what} is not a valid UID: {uid!r:.80}")
    return uid


def _shared_flock(path: Path, *, wait: bool) -> bool:
    """Take and drop a shared flock on the file at ``path``: False when ``open_temp``'s exclusive one is held
    (only without ``wait``), True once it is free or the file is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _storage_error(exc: OSError) -> OSError:
    return StorageFullError(28, "no space left on device") if exc.errno == 28 else exc


def _libc(name: str, argtypes: tuple[type, ...]) -> Callable[..., int] | None:
    """A C library function of Linux's (None elsewhere, or where this libc lacks it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))
_SYNC_FILE_RANGE_WRITE = 2  # queue the range for writeback, do not wait
# glibc 2.28+
_renameat2 = _libc("renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint))
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_no_replace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` atomically, raising FileExistsError if ``dst`` exists (never replacing it)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # a file system without the flag: link below
            raise OSError(err, os.strerror(err), dst)  # EEXIST makes a FileExistsError
    os.link(src, dst)  # the same guarantee: link never replaces; a crash in between leaves a temp name
    os.unlink(src)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` to disk without waiting (Linux; elsewhere nothing), so the
    fsync that makes the file durable later finds most of it written: a large instance's earlier fragments
    go to disk while its later ones are still arriving."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # advisory: the fsync later decides


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpaceGuard(Protocol):
    """Told the data volume's use by every free-space check; may free space (evict finished studies)."""

    def pressure(self, free: int, used: int, incoming: int) -> bool:
        """True when it freed space, so the caller measures again."""
        ...


class FileStore:
    """Files under ``root``: ``incoming/<study>/<series>/<sop>.dcm`` and ``results/<study>/<sop>.dcm``."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0, create: bool = True) -> None:
        """``create=False``: for readers (admin commands), which must not make the folder."""
        self.root = Path(root)
        self._root_str = str(self.root)
        self.min_free_bytes = min_free_bytes
        self.guard: SpaceGuard | None = None  # set by the listener: evicts before anything is refused
        if create:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._known_dirs: set[str] = set()
        self._incoming = self.root / "incoming"
        self._incoming_prefix = f"{self._incoming}/{TMP_PREFIX}"

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        check_uid(study_uid, "StudyInstanceUID")
        check_uid(series_uid, "SeriesInstanceUID")
        check_uid(sop_uid, "SOPInstanceUID")
        return Path(f"{self._root_str}/incoming/{study_uid}/{series_uid}/{sop_uid}.dcm")  # one parse, not four

    def result_path(self, study_uid: str, sop_uid: str) -> Path:
        check_uid(study_uid, "StudyInstanceUID")
        check_uid(sop_uid, "SOPInstanceUID")
        return self.root / "results" / study_uid / f"{sop_uid}.dcm"

    def relative(self, path: Path) -> str:
        text = str(path)
        if text.startswith(self._root_str + "/"):  # the common case, without pathlib's parsing
            return text[len(self._root_str) + 1 :]
        return path.relative_to(self.root).as_posix()

    def absolute(self, relative: str) -> Path:
        p = (self.root / relative).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise UnsafeNameError(f"path escapes the storage root: {relative!r}")
        return p

    def usage(self) -> tuple[int, int]:
        """(free, used) bytes of the data volume, as df counts them (free: what this user may still write)."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize

    def check_space(self, incoming_bytes: int = 0) -> None:
        """One statvfs: below the floor (after the guard, if any, freed what it could) raises StorageFullError."""
        if not self.min_free_bytes and self.guard is None:
            return
        free, used = self.usage()
        if self.guard is not None and self.guard.pressure(free, used, incoming_bytes):
            free, used = self.usage()
        if self.min_free_bytes and free - incoming_bytes < self.min_free_bytes:
            raise StorageFullError(f"free space below the floor of {self.min_free_bytes // (1 << 20)} MiB")

    def ensure_dir(self, folder: str | Path) -> None:
        """Create ``folder`` and make its new entries durable; remembered, so repeat calls cost nothing."""
        key = str(folder)  # a str key: hashing a fresh Path per received instance costs more than the lookup
        if key in self._known_dirs:
            return
        created = []
        p = Path(folder)
        while not p.exists():
            created.append(p)
            p = p.parent
        for c in reversed(created):  # one by one: mkdir(parents=True) gives the parents the umask's mode
            c.mkdir(exist_ok=True, mode=0o700)
        for c in reversed(created):  # make the new directory entries themselves durable
            _fsync_dir(c.parent)
        self._known_dirs.add(key)

    def _forget_dir(self, folder: str | Path) -> None:
        """A remembered folder was removed since (a purge empties and removes study folders): make it again."""
        self._known_dirs.discard(str(folder))
        self.ensure_dir(folder)

    def write_atomic(self, path: Path, chunks: bytes | memoryview | list[bytes]) -> int:
        """Write bytes durably under ``path``; return the size. Leaves nothing behind on failure."""
        self.ensure_dir(path.parent)
        if not path.parent.is_dir():
            self._forget_dir(path.parent)
        tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                parts = chunks if isinstance(chunks, list) else [chunks]
                for part in parts:
                    view = memoryview(part)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        size += n
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if exc.errno == 28:  # ENOSPC
                raise StorageFullError(28, "no space left on device") from exc
            raise
        return size

    # ---- streamed writes: temp file first, placed under its final name once the header is known -----------

    def open_temp(self) -> tuple[int, Path]:
        """A new private temp file under ``incoming/`` (same file system as the final names); (fd, path).
        It stays locked (flock) until ``fd`` is closed, so that another process finding it under its final
        name can tell it is still being stored (``being_written``)."""
        self.ensure_dir(self._incoming)
        name = f"{self._incoming_prefix}{os.urandom(16).hex()}"  # one per received instance: kept cheap
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise _storage_error(exc) from exc
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
        return fd, Path(name)

    def place_new(self, tmp: Path, path: Path) -> bool:
        """Rename ``tmp`` to ``path`` unless a file already has that name: then False, and ``tmp`` stays."""
        folder = os.path.dirname(path)
        try:
            self.ensure_dir(folder)
            try:
                rename_no_replace(str(tmp), str(path))
            except FileNotFoundError:
                if not os.path.exists(tmp):
                    raise
                self._forget_dir(folder)
                rename_no_replace(str(tmp), str(path))
        except FileExistsError:
            return False
        except OSError as exc:
            raise _storage_error(exc) from exc
        return True

    @staticmethod
    def being_written(path: Path) -> bool:
        """Whether the file at ``path`` is still open in the process that made it with ``open_temp``."""
        return not _shared_flock(path, wait=False)

    @staticmethod
    def wait_until_written(path: Path) -> None:
        """Return once no process holds the file at ``path`` open from ``open_temp`` (at once if it is gone)."""
        _shared_flock(path, wait=True)

    def place(self, tmp: Path, path: Path) -> None:
        """Rename a complete, fsynced temp file to ``path``; durable once ``sync_dirs`` covered its folder."""
        folder = os.path.dirname(path)
        try:
            self.ensure_dir(folder)
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                if not os.path.exists(tmp):
                    raise
                self._forget_dir(folder)
                os.replace(tmp, path)
        except OSError as exc:
            raise _storage_error(exc) from exc

    def sync_dirs(self, folders: Iterable[str | Path]) -> None:
        """fsync each folder once: one call makes every rename done in it so far durable."""
        for folder in folders:
            _fsync_dir(folder)

    def remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def discard_temp(self, fd: int | None, tmp: Path | None) -> None:
        """Close and remove a temp file from ``open_temp`` that will not be placed (either part may be gone)."""
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if tmp is not None:
            self.remove(tmp)

    def clean_temp_files(self) -> int:
        """Remove temp files left by a crash mid-write; none of them was ever acknowledged."""
        n = 0
        for p in self.root.rglob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
        return n

"""Two listener processes storing the same SOP Instance UID at once: neither replaces the other's file while
it is in flight, so an acknowledged instance never loses its file (here two committers with their own
file stores stand in for two processes: flock and rename see no difference)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from dicom_node.receive.group_commit import GroupCommitter
from dicom_node.receive.incoming import SUCCESS, Pending, StoreSettings
from storage.db import make_engine
from storage.files import FileStore, rename_no_replace
from storage.jobstore import JobStore
from storage.records import NewInstance

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def _pending(files: FileStore, body: bytes) -> Pending:
    fd, tmp = files.open_temp()
    os.write(fd, body)
    path = files.instance_path(STUDY, SERIES, SOP)
    return Pending(
        tmp=tmp,
        path=path,
        fd=fd,
        instance=NewInstance(
            sop_instance_uid=SOP,
            study_uid=STUDY,
            series_uid=SERIES,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax="1.2.840.10008.1.2.1",
            path=files.relative(path),
            size=len(body),
        ),
    )


@pytest.fixture
def two_processes(tmp_path: Path):
    jobs = JobStore(make_engine(f"sqlite:///{tmp_path / 'node.db'}"))
    jobs.create_schema()
    committers = [GroupCommitter(FileStore(tmp_path / "files"), jobs.engine, StoreSettings()) for _ in range(2)]
    yield committers, jobs
    for c in committers:
        c.close()
    jobs.engine.dispose()


def _index_held(committer: GroupCommitter, release: threading.Event, fail: bool = False) -> threading.Event:
    """Hold ``committer``'s index stage until ``release`` (its instance placed, not yet indexed); then index,
    or fail as a database error would."""
    reached = threading.Event()
    index = committer._index_batch

    def held(batch: list) -> None:
        reached.set()
        assert release.wait(10)
        if fail:
            raise OperationalError("INSERT", {}, Exception("disk I/O error"))
        index(batch)

    committer._index_stage.work = committer._guarded(held)
    return reached


@pytest.mark.parametrize("first_fails", [False, True])
def test_a_second_process_waits_for_the_first_and_never_replaces_its_file(two_processes, first_fails: bool) -> None:
    (a, b), jobs = two_processes
    release = threading.Event()
    reached = _index_held(a, release, fail=first_fails)
    outcomes: dict[str, tuple[int, str]] = {}
    ta = threading.Thread(target=lambda: outcomes.__setitem__("a", a.commit(_pending(a.files, b"first"))))
    ta.start()
    assert reached.wait(10)  # a's file is under its final name, its row not yet committed
    tb = threading.Thread(target=lambda: outcomes.__setitem__("b", b.commit(_pending(b.files, b"second"))))
    tb.start()
    tb.join(0.5)
    assert tb.is_alive()  # b waits for a instead of renaming over a's file
    path = a.files.instance_path(STUDY, SERIES, SOP)
    assert path.read_bytes() == b"first"
    release.set()
    ta.join(10)
    tb.join(10)
    [row] = jobs.all_instances()
    if first_fails:  # a answered a failure and left nothing: b stores its own
        assert outcomes["a"][0] != SUCCESS
        assert outcomes["b"] == (SUCCESS, "stored") and path.read_bytes() == b"second"
    else:  # a acknowledged: b is judged against it (keep_first) and a's file stays
        assert outcomes["a"] == (SUCCESS, "stored")
        assert outcomes["b"] == (SUCCESS, "duplicate_kept_first") and path.read_bytes() == b"first"
    assert a.files.absolute(row.path) == path
    assert not list(path.parent.parent.parent.glob(".tmp-*"))


def test_a_file_nobody_is_storing_is_replaced_as_a_resend_would(two_processes) -> None:
    (a, _), jobs = two_processes
    path = a.files.instance_path(STUDY, SERIES, SOP)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"left by a crash before its row")  # never acknowledged: no row
    assert a.commit(_pending(a.files, b"resent")) == (SUCCESS, "stored")
    assert path.read_bytes() == b"resent" and len(jobs.all_instances()) == 1


def test_rename_no_replace_refuses_an_existing_name(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"new")
    (tmp_path / "dst").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        rename_no_replace(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert (tmp_path / "dst").read_bytes() == b"old" and (tmp_path / "src").exists()
    rename_no_replace(str(tmp_path / "src"), str(tmp_path / "moved"))
    assert (tmp_path / "moved").read_bytes() == b"new" and not (tmp_path / "src").exists()

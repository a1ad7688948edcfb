"""The listener's index connections (SQLite and PostgreSQL): a database error fails that batch only; the next
look-up and commit run on fresh connections, and the rows committed are the ones the store reads back."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from storage.batching import InstanceIndex
from storage.db import make_engine
from storage.jobstore import JobStore
from storage.records import NewInstance


def _instance(n: int) -> NewInstance:
    return NewInstance(
        sop_instance_uid=f"1.2.3.4.{n}",
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        path=f"1.2.3/1.2.3.4/1.2.3.4.{n}.dcm",
        size=100 + n,
    )


def _break(kept: object) -> None:
    """Close the DBAPI connection under a kept one (SQLite: a pool entry; PostgreSQL: a Connection)."""
    dbapi = kept.connection.dbapi_connection if isinstance(kept, Connection) else kept.dbapi_connection
    dbapi.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'node.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    jobs = JobStore(make_engine(url))
    jobs.create_schema()
    idx = InstanceIndex(jobs.engine)
    yield idx, jobs
    idx.close()
    jobs.engine.dispose()


def test_a_broken_connection_fails_one_batch_and_is_replaced(index) -> None:
    idx, jobs = index
    assert idx.record([_instance(1)], late_arrivals="rerun") == ["stored"]
    assert idx.existing_paths(["1.2.3.4.1", "9.9"]) == {"1.2.3.4.1": "1.2.3/1.2.3.4/1.2.3.4.1.dcm"}
    _break(idx._commit.get())  # as a connection left unusable by an I/O error (or a server restart) would be
    _break(idx._lookup.get())
    with pytest.raises(SQLAlchemyError):
        idx.record([_instance(2)], late_arrivals="rerun")
    with pytest.raises(SQLAlchemyError):
        idx.existing_paths(["1.2.3.4.1"])
    assert idx.record([_instance(2), _instance(1)], late_arrivals="rerun") == ["stored", "replaced"]
    assert idx.existing_paths(["1.2.3.4.2"]) == {"1.2.3.4.2": "1.2.3/1.2.3.4/1.2.3.4.2.dcm"}
    assert sorted(i.sop_instance_uid for i in jobs.all_instances()) == ["1.2.3.4.1", "1.2.3.4.2"]


def test_commits_queue_on_the_writer_lock_of_the_database_file(index, tmp_path: Path) -> None:
    idx, jobs = index
    if jobs.engine.dialect.name != "sqlite":
        assert idx._writers is None  # PostgreSQL: row locks, no file lock
        return
    assert (tmp_path / "node.db.writers.lock").exists()
    idx.close()
    memory = InstanceIndex(make_engine("sqlite://"))
    assert memory._writers is None  # nothing to share with other processes
    memory.close()

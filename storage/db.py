"""One SQLAlchemy engine per process, configured for durability.

SQLite runs in WAL mode with a busy timeout and a configurable synchronous level (FULL by default: a
committed row survives power loss). Every transaction starts with BEGIN IMMEDIATE so two processes never
both read a job as free and then race to claim it.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, CursorResult, Engine, Result, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import ConnectionPoolEntry

SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, *, synchronous: str = "FULL") -> Engine:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, future=True)
    if u.database and u.database != ":memory:":
        db_path = Path(u.database)
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not db_path.exists():
            fd = os.open(db_path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})
    level = synchronous.upper()

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect in a new file: purged rows' pages go back
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={level}")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched. ``Session.execute`` is typed to return a plain ``Result``, though for
    these statements it returns a ``CursorResult``, the class that carries the count."""
    if not isinstance(result, CursorResult):
        raise TypeError(f"no row count: {type(result).__name__} is not the result of an UPDATE or DELETE")
    return result.rowcount


def sqlite_pragmas(engine: Engine) -> dict[str, str]:
    """Report the pragmas in force (for `dicom-node status` and tests)."""
    with engine.connect() as conn:
        return {
            p: str(conn.exec_driver_sql(f"PRAGMA {p}").scalar())
            for p in ("journal_mode", "synchronous", "busy_timeout")
        }


def integrity_check(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql("PRAGMA integrity_check").scalar())

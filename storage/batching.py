"""Group commit for received instances: many index rows in one transaction (one WAL fsync).

``JobStore.record_instance`` commits once per instance; with several associations receiving at once
the listener instead gathers the instances whose files are already durable and indexes them together.
The rules are those of ``record_instance`` applied in order (a new study row, a complete study
re-opened by a late arrival, a replaced instance), so the result equals calling it once per instance.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError

from storage.locks import WriterLock
from storage.records import NewInstance

_NEW_STUDY = (
    "INSERT INTO studies (study_uid, state, generation, first_received_at, last_received_at, instance_count) "
    "VALUES (:study_uid, 'receiving', 0, :now, :now, 0)"
)
_TOUCH_STUDY = (
    "UPDATE studies SET state = :state, generation = :generation, last_received_at = :now, "
    "instance_count = instance_count + :added WHERE study_uid = :study_uid"
)
_NEW_INSTANCE = (
    "INSERT INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, path, size, "
    "received_at, calling_ae) VALUES (:sop_instance_uid, :study_uid, :series_uid, :sop_class_uid, "
    ":transfer_syntax, :path, :size, :now, :calling_ae)"
)
_REPLACE_INSTANCE = (
    "UPDATE instances SET path = :path, size = :size, received_at = :now, transfer_syntax = :transfer_syntax "
    "WHERE sop_instance_uid = :sop_instance_uid"
)


def _in(column: str, values: Sequence[str]) -> tuple[str, dict[str, object]]:
    """``column IN (:p0, :p1, ...)`` and its parameters (named style works for SQLAlchemy and sqlite3)."""
    params: dict[str, object] = {f"p{i}": v for i, v in enumerate(dict.fromkeys(values))}
    return f"{column} IN ({', '.join(':' + k for k in params)})", params


class _Executor(Protocol):
    concurrent: bool  # other writers' transactions may run beside ours (no database-wide write lock)

    def rows(self, sql: str, params: dict[str, object]) -> list[tuple]: ...

    def many(self, sql: str, params: list[dict[str, object]]) -> None: ...


class _CoreExecutor:
    concurrent = True  # PostgreSQL: row locks only

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def rows(self, sql: str, params: dict[str, object]) -> list[tuple]:
        return [tuple(r) for r in self.conn.execute(text(sql), params)]

    def many(self, sql: str, params: list[dict[str, object]]) -> None:
        self.conn.execute(text(sql), params)


class _SqliteExecutor:
    """The DBAPI cursor itself: SQLAlchemy's per-statement work is most of the cost of a small batch."""

    concurrent = False  # BEGIN IMMEDIATE: one writer at a time

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.cur = cursor

    def rows(self, sql: str, params: dict[str, object]) -> list[tuple]:
        return self.cur.execute(sql, params).fetchall()

    def many(self, sql: str, params: list[dict[str, object]]) -> None:
        self.cur.executemany(sql, params)


class _PyformatExecutor:
    """A DBAPI cursor of a pyformat-style driver (psycopg) under a kept SQLAlchemy Connection: SQLAlchemy's
    per-statement work would be most of the Python cost of a one-instance batch here too. The driver's
    errors surface as SQLAlchemy's, as they do through the engine."""

    concurrent = True  # PostgreSQL: row locks only

    def __init__(self, cursor: Any, dbapi: Any) -> None:
        self.cur = cursor
        self.dbapi = dbapi

    def rows(self, sql: str, params: dict[str, object]) -> list[tuple]:
        try:
            self.cur.execute(_pyformat(sql), params)
            return self.cur.fetchall()
        except self.dbapi.Error as exc:
            raise _wrap(exc, self.dbapi) from exc

    def many(self, sql: str, params: list[dict[str, object]]) -> None:
        try:
            self.cur.executemany(_pyformat(sql), params)
        except self.dbapi.Error as exc:
            raise _wrap(exc, self.dbapi) from exc


@functools.lru_cache(maxsize=1024)  # one entry per statement and IN-list length
def _pyformat(sql: str) -> str:
    """``:name`` parameters (as written here for sqlite3 and SQLAlchemy) in pyformat style, ``%(name)s``."""
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql.replace("%", "%%"))


@contextmanager
def _kept_executor(kept: Connection) -> Iterator[_Executor]:
    """Statements on a kept Connection: on its driver's own cursor where that takes pyformat parameters
    (psycopg), else through SQLAlchemy Core. Transactions stay the Connection's."""
    dbapi = kept.dialect.dbapi
    if dbapi is None or getattr(dbapi, "paramstyle", "") != "pyformat":
        yield _CoreExecutor(kept)
        return
    try:
        cur = kept.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    except dbapi.Error as exc:  # a connection an earlier error left unusable: the caller replaces it
        raise _wrap(exc, dbapi) from exc
    with contextlib.closing(cur):
        yield _PyformatExecutor(cur, dbapi)


def reopens(instance: NewInstance, reopen_classes: Collection[str] | None) -> bool:
    """Whether ``instance``, arriving after its study completed, re-opens it. The caller names the SOP classes
    that can change what the study's jobs read; anything else (the node's own SEG and SR forwarded back by
    the PACS, presentation states, key object notes) is stored without re-running the study."""
    return reopen_classes is None or instance.sop_class_uid in reopen_classes


class InstanceBatch:
    """One open transaction: look up what exists, then record a batch of instances."""

    def __init__(self, db: _Executor) -> None:
        self._db = db

    def existing_paths(self, sop_instance_uids: Sequence[str]) -> dict[str, str]:
        """{SOP Instance UID: stored relative path} for those already indexed."""
        if not sop_instance_uids:
            return {}
        where, params = _in("sop_instance_uid", sop_instance_uids)
        return dict(self._db.rows(f"SELECT sop_instance_uid, path FROM instances WHERE {where}", params))

    def record(
        self,
        instances: Sequence[NewInstance],
        *,
        late_arrivals: str = "rerun",
        reopen_classes: Collection[str] | None = None,
        now: float | None = None,
    ) -> list[str]:
        """Index the instances in order; per instance "stored", "replaced" or "reopened". Only an instance of
        ``reopen_classes`` (default: any) re-opens a complete study: see ``reopens``."""
        if not instances:
            return []
        now = time.time() if now is None else now
        study_uids = list(dict.fromkeys(i.study_uid for i in instances))
        where, params = _in("study_uid", study_uids)
        select_studies = f"SELECT study_uid, state, generation FROM studies WHERE {where}"
        if self._db.concurrent:
            # Another machine's listener may be indexing the same new study at this moment, or its assembler
            # completing it: create missing study rows without failing on theirs, then lock the rows for the
            # read-modify-write below, in one order so two batches never wait on each other in a cycle.
            self._db.many(
                _NEW_STUDY + " ON CONFLICT (study_uid) DO NOTHING",
                [{"study_uid": uid, "now": now} for uid in sorted(study_uids)],
            )
            select_studies += " ORDER BY study_uid FOR UPDATE"
        found = self._db.rows(select_studies, params)
        known = set(self.existing_paths([i.sop_instance_uid for i in instances]))  # as of holding the study rows
        studies: dict[str, list] = {uid: [state, gen, 0] for uid, state, gen in found}  # [state, generation, added]
        new_studies = [uid for uid in study_uids if uid not in studies]
        for uid in new_studies:
            studies[uid] = ["receiving", 0, 0]
        outcomes: list[str] = []
        inserts: list[dict[str, object]] = []
        replaces: list[dict[str, object]] = []
        for inst in instances:
            row = {**inst.__dict__, "now": now}
            study = studies[inst.study_uid]
            outcome = "replaced" if inst.sop_instance_uid in known else "stored"
            if study[0] == "complete" and late_arrivals == "rerun" and reopens(inst, reopen_classes):
                study[0] = "receiving"
                study[1] += 1
                outcome = "reopened" if outcome == "stored" else outcome
            if outcome == "replaced":
                replaces.append(row)
            else:
                known.add(inst.sop_instance_uid)
                study[2] += 1
                inserts.append(row)
            outcomes.append(outcome)
        if new_studies:
            self._db.many(_NEW_STUDY, [{"study_uid": uid, "now": now} for uid in new_studies])
        self._db.many(
            _TOUCH_STUDY,
            [
                {"study_uid": uid, "state": s[0], "generation": s[1], "added": s[2], "now": now}
                for uid, s in studies.items()
            ],
        )
        if inserts:
            self._db.many(_NEW_INSTANCE, inserts)
        if replaces:
            self._db.many(_REPLACE_INSTANCE, replaces)
        return outcomes


def existing_paths(engine: Engine, sop_instance_uids: Sequence[str], *, raw: Any = None) -> dict[str, str]:
    """{SOP Instance UID: stored relative path}, read without taking SQLite's write lock (WAL readers run
    beside the writer), so a lookup never waits for a commit in progress. ``raw``: a DBAPI connection the
    caller keeps for such lookups (see ``KeptConnection``) instead of one from the pool each time."""
    if not sop_instance_uids:
        return {}
    where, params = _in("sop_instance_uid", sop_instance_uids)
    sql = f"SELECT sop_instance_uid, path FROM instances WHERE {where}"
    if engine.dialect.name != "sqlite":
        if raw is not None:  # a kept connection in autocommit mode: the SELECT is all that crosses the wire
            with _kept_executor(raw) as db:
                return dict(db.rows(sql, params))
        with engine.connect() as core:
            return {sop: path for sop, path in core.execute(text(sql), params)}
    # ``raw``: a kept connection, else one borrowed from the pool for this call. The pool's connections carry
    # the engine's pragmas and run in autocommit mode: the SELECT is its own read transaction.
    conn = raw if raw is not None else engine.raw_connection()
    try:
        try:
            cur = conn.cursor()
        except sqlite3.Error as exc:  # a connection an earlier error left unusable: the caller replaces it
            raise _wrap(exc) from exc
        try:
            return dict(cur.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise _wrap(exc) from exc
        finally:
            cur.close()
    finally:
        if raw is None:
            conn.close()


class KeptConnection:
    """A pooled connection kept checked out by one group-commit stage: checking one out and back in (with
    its reset, and on PostgreSQL the pool's liveness ping) per batch costs about as much as the batch's own
    statements. Only the stage's current leader uses it, so it is never used by two threads at once; after
    an error it is replaced. SQLite: the DBAPI connection itself; other databases: a SQLAlchemy Connection,
    in autocommit mode if ``autocommit`` (for look-ups that need no transaction of their own)."""

    def __init__(self, engine: Engine, *, autocommit: bool = False) -> None:
        self.engine = engine
        self.autocommit = autocommit
        self._conn: Any = None

    def get(self) -> Any:
        if self._conn is None:
            if self.engine.dialect.name == "sqlite":
                self._conn = self.engine.raw_connection()
            else:
                conn = self.engine.connect()
                self._conn = conn.execution_options(isolation_level="AUTOCOMMIT") if self.autocommit else conn
        return self._conn

    def discard(self) -> None:
        """Drop the connection (after an error, or at shutdown); the next ``get`` opens a fresh one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
            if isinstance(conn, Connection):
                with contextlib.suppress(Exception):
                    conn.close()


class InstanceIndex:
    """What one listener process keeps open to index received instances: a connection for look-ups and one
    for commits (each used by one group-commit stage's leader at a time, replaced after a database error),
    and for a SQLite file the lock that queues the commits of all listener processes (``WriterLock``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lookup = KeptConnection(engine, autocommit=True)
        self._commit = KeptConnection(engine)
        db = engine.url.database if engine.dialect.name == "sqlite" else None
        self._writers = WriterLock(Path(db + ".writers.lock")) if db and db != ":memory:" else None

    def existing_paths(self, sop_instance_uids: Sequence[str]) -> dict[str, str]:
        """As ``existing_paths``, on the kept look-up connection."""
        try:
            return existing_paths(self.engine, sop_instance_uids, raw=self._lookup.get())
        except SQLAlchemyError:
            self._lookup.discard()
            raise

    def record(
        self, instances: Sequence[NewInstance], *, late_arrivals: str, reopen_classes: Collection[str] | None = None
    ) -> list[str]:
        """``InstanceBatch.record`` in one transaction of its own, committed before it returns."""
        try:
            with self._writers or contextlib.nullcontext(), instance_batch(self.engine, raw=self._commit.get()) as tx:
                return tx.record(instances, late_arrivals=late_arrivals, reopen_classes=reopen_classes)
        except SQLAlchemyError:
            self._commit.discard()
            raise

    def close(self) -> None:
        """Give back the kept connections and the lock's file (at shutdown)."""
        self._lookup.discard()
        self._commit.discard()
        if self._writers is not None:
            self._writers.close()
            self._writers = None


def instance_batch(engine: Engine, *, raw: Any = None) -> AbstractContextManager[InstanceBatch]:
    """One transaction; committed (durably, per the engine's settings) when the block exits normally.

    SQLite errors surface as SQLAlchemy's DBAPIError subclasses, as they do through the engine. ``raw``: a
    kept DBAPI connection (see ``KeptConnection``) instead of one from the pool."""
    if engine.dialect.name != "sqlite":
        return _core_batch(engine, raw)
    return _SqliteBatch(engine, raw)


@contextmanager
def _core_batch(engine: Engine, kept: Connection | None) -> Iterator[InstanceBatch]:
    if kept is not None:
        with kept.begin(), _kept_executor(kept) as db:
            yield InstanceBatch(db)
        return
    with engine.begin() as conn:
        yield InstanceBatch(_CoreExecutor(conn))


class _SqliteBatch:
    """BEGIN IMMEDIATE ... COMMIT on a DBAPI cursor, as a plain class: it runs once per received instance
    on one association, where a generator-based context manager costs as much as the statements' Python."""

    def __init__(self, engine: Engine, raw: Any) -> None:
        self._engine = engine
        self._raw = raw
        self._conn: Any = None
        self._cur: sqlite3.Cursor | None = None

    def __enter__(self) -> InstanceBatch:
        self._conn = self._raw if self._raw is not None else self._engine.raw_connection()
        try:
            self._cur = self._conn.cursor()
            self._cur.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._close()
            raise _wrap(exc) from exc
        except BaseException:
            self._close()
            raise
        return InstanceBatch(_SqliteExecutor(self._cur))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        assert self._cur is not None
        try:
            if exc_type is None:
                try:
                    self._cur.execute("COMMIT")
                    return
                except sqlite3.Error as err:
                    exc = err
            with contextlib.suppress(sqlite3.Error):
                self._cur.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):  # the body's or COMMIT's: as SQLAlchemy would raise it
                raise _wrap(exc) from exc
        finally:
            self._close()

    def _close(self) -> None:
        cur, self._cur = self._cur, None
        if cur is not None:
            with contextlib.suppress(sqlite3.Error):
                cur.close()
        if self._raw is None and self._conn is not None:
            self._conn.close()
        self._conn = None


def _wrap(exc: Exception, dbapi: Any = sqlite3) -> DBAPIError:
    kind = IntegrityError if isinstance(exc, dbapi.IntegrityError) else OperationalError
    return kind("instance batch", None, exc)

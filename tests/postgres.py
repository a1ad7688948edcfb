"""A throwaway PostgreSQL server for the tests, from Debian's package (`tests/run.sh` installs it).

Its cluster lives in a temp folder and it listens on a Unix socket in that folder only (no TCP port), so
nothing outside this machine's test run can reach it. As root, the server runs as the package's `postgres`
user (PostgreSQL refuses to run as root). One server per test session; a fresh database per test.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PG_ROOT = Path("/usr/lib/postgresql")
PORT = 5432  # names the socket file in our own folder; no TCP listener is opened


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin folder, or None."""
    found = sorted((p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()), key=lambda p: int(p.parent.name))
    return found[-1] if found else None


class PostgresServer:
    def __init__(self) -> None:
        bin_dir = pg_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed: run tests/run.sh, or apt-get install postgresql")
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.socket_dir = self.root / "sock"
        self._names = itertools.count(1)
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            self._as_owner = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self._as_owner, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")

    def start(self) -> PostgresServer:
        data = self.root / "data"
        self.socket_dir.mkdir()
        if self._as_owner:
            for p in (self.root, self.socket_dir):
                shutil.chown(p, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "node", "-E", "UTF8", "--no-sync")
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-c listen_addresses='' -k {self.socket_dir} -p {PORT} -c max_connections=200",
            "start",
        )
        return self

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://node@/{database}?host={self.socket_dir}&port={PORT}"

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(
            host=str(self.socket_dir), port=PORT, user="node", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

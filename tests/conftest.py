"""Suite-wide hygiene: no peer process (storescp, Orthanc, a node) outlives the test that started it; and the
PostgreSQL server for the tests that run the job store on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers import kill_leftovers
from tests.postgres import PostgresServer


@pytest.fixture(autouse=True)
def _no_leftover_peers() -> Iterator[None]:
    yield
    kill_leftovers()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """SQLAlchemy URL of a fresh, empty PostgreSQL database."""
    return postgres.new_database()

"""Suite-wide hygiene: no peer process (storescp, Orthanc, a node) outlives the test that started it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers import kill_leftovers


@pytest.fixture(autouse=True)
def _no_leftover_peers() -> Iterator[None]:
    yield
    kill_leftovers()

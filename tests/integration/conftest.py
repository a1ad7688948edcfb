"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.listeners import Listener


@pytest.fixture()
def make_listener(tmp_path: Path) -> Iterator[Any]:
    """make_listener(security=None, **node) -> a started Listener; all are stopped after the test."""
    started: list[Listener] = []

    def make(security: dict[str, Any] | None = None, **node: Any) -> Listener:
        lis = Listener(tmp_path, security, **node)
        started.append(lis)
        return lis

    yield make
    for lis in started:
        lis.stop()

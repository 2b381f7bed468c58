"""Fault-matrix tests: real daemons, a fault-injecting proxy, recovery, one invariant."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "daemon"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: fault-matrix cells (real daemons, seconds each)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "faults" in item.path.parts:
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.daemon)

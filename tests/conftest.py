"""Run fast tests first: unit (sans-IO), then daemon (loopback), then system, then the fault matrix."""

from __future__ import annotations

import pytest

_LAYER_ORDER = {"unit": 0, "daemon": 1, "system": 2, "faults": 3, "fuzz": 4}


def _layer(item: pytest.Item) -> int:
    parts = item.path.parts
    for name, rank in _LAYER_ORDER.items():
        if name in parts:
            return rank
    return 3


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_layer)  # stable: keeps file order inside a layer
    for item in items:
        if "daemon" in item.path.parts:
            item.add_marker(pytest.mark.daemon)
        elif "system" in item.path.parts:
            item.add_marker(pytest.mark.system)

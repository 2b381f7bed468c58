from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import DaemonProc


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[DaemonProc]]:
    """Factory-ish fixture: append DaemonProc objects; all are cleaned up, even on failure."""
    created: list[DaemonProc] = []
    yield created
    for d in created:
        d.cleanup()


@pytest.fixture
def host(tmp_path: Path, daemons: list[DaemonProc]) -> DaemonProc:
    """One daemon: host A on 127.0.0.1."""
    d = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    daemons.append(d)
    d.start()
    return d


@pytest.fixture
def pair(tmp_path: Path, daemons: list[DaemonProc]) -> tuple[DaemonProc, DaemonProc]:
    """Two daemons: host A on 127.0.0.1, host B on 127.0.0.2."""
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2")
    daemons.extend([a, b])
    a.start()
    b.start()
    return a, b

"""settle's guard: an in-doubt migration is settled by hand only when its peer cannot settle it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relocd.engine.journal import Journal
from relocd.errors import DomainBusy
from relocd.protocol.records import OutcomeState
from relocd.server import settle


class FakeChannel:
    async def close(self) -> None:
        pass


def entry(tmp_path: Path, role: str) -> Any:
    journal = Journal(tmp_path / f"{role}.sqlite")
    mid = "5d1e0f6e-9c1a-4c57-9a53-3c2c7d4d8b10"
    journal.begin(mid, role, "web", "7c9e6679-7425-40de-944b-e07fc1f90ae7", "127.0.0.2:8002", True)
    return journal.get(mid)


async def never_dialled(_entry: Any) -> Any:
    raise AssertionError("the guard dialled")


@pytest.mark.parametrize("state", [OutcomeState.PREPARED, OutcomeState.RESUMED, OutcomeState.ABORTED,
                                   OutcomeState.UNKNOWN, OutcomeState.DONE])  # fmt: skip
async def test_a_target_that_answers_settles_it_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       state: OutcomeState) -> None:  # fmt: skip
    async def answers(reconnect: Any, mid: str) -> Any:
        return state, FakeChannel()

    monkeypatch.setattr(settle, "ask", answers)
    with pytest.raises(DomainBusy, match=f"answers \\({state.name}\\)"):
        await settle._guard(entry(tmp_path, "source"), never_dialled, None, force=True)  # type: ignore[arg-type]


async def test_a_target_waiting_for_the_operator_needs_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def receiving(reconnect: Any, mid: str) -> Any:
        return OutcomeState.RECEIVING, FakeChannel()

    monkeypatch.setattr(settle, "ask", receiving)
    e = entry(tmp_path, "source")
    with pytest.raises(DomainBusy, match="--force"):
        await settle._guard(e, never_dialled, None, force=False)  # type: ignore[arg-type]
    await settle._guard(e, never_dialled, None, force=True)  # type: ignore[arg-type]


async def test_a_target_gone_lets_the_operator_decide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def refused(reconnect: Any, mid: str) -> Any:
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(settle, "ask", refused)
    await settle._guard(entry(tmp_path, "source"), never_dialled, None, force=False)  # type: ignore[arg-type]


async def test_a_target_side_entry_is_refused_while_its_source_listens(tmp_path: Path) -> None:
    async def up(address: str) -> bool:
        return True

    async def down(address: str) -> bool:
        return False

    e = entry(tmp_path, "target")
    with pytest.raises(DomainBusy, match="reachable"):
        await settle._guard(e, never_dialled, up, force=True)
    await settle._guard(e, never_dialled, down, force=False)

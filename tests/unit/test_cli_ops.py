"""The operator commands of issue 12 (abort, job, history, migrate-set, evacuate, migrate's
new options, Ctrl-C) against a real ControlServer with fake handlers written to the ops'
contract.  The daemon tests (tests/daemon/test_cli_*.py) run them against real daemons.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from relocd import cli
from relocd.errors import RelocdError
from relocd.server.control import ControlServer, ProgressSink

REPO = Path(__file__).resolve().parents[2]


def migration_result(status: str = "completed", error: str | None = None, domain: str = "web1",
                     **extra: Any) -> dict[str, Any]:
    return {"status": status, "domain": domain, "live": True, "iterations": 3,
            "pages_sent": 1000, "bytes_sent": 4_096_000, "total_ms": 250.0,
            "downtime_ms": 5.0, "verified": None, "error": error, "target": "hostb:8002",
            **extra}


class FakeOps:
    """The issue 12 ops as their contract says, recording their arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.abort_requested = asyncio.Event()
        self.listen = ["127.0.0.1:8002"]
        #: migrate waits for an abort (or this long) before it completes
        self.migrate_wait_s = 0.0

    def args_of(self, op: str) -> list[dict[str, Any]]:
        return [a for o, a in self.calls if o == op]

    def handlers(self) -> dict[str, Any]:
        def recorded(op: str, fn: Any) -> Any:
            async def handler(args: dict[str, Any], sink: ProgressSink) -> Any:
                self.calls.append((op, args))
                return await fn(args, sink)
            return handler

        async def status(args: dict[str, Any], sink: ProgressSink) -> Any:
            return {"version": "test", "listen": self.listen}

        async def list_(args: dict[str, Any], sink: ProgressSink) -> Any:
            return [{"name": "web1", "state": "running", "memory_mib": 64, "vcpus": 1,
                     "driver": "sim"}]

        async def create(args: dict[str, Any], sink: ProgressSink) -> Any:
            return {"name": args["name"], "uuid": "u", "state": "running"}

        async def restore(args: dict[str, Any], sink: ProgressSink) -> Any:
            return {"domain": "web1", "uuid": "u", "file": args["file"], "memory_mib": 64}

        async def migrate(args: dict[str, Any], sink: ProgressSink) -> Any:
            await sink.emit(phase="reserve")
            await sink.emit(phase="precopy", round=1, percent=10.0, eta_s=5.0,
                            round_bytes_sent=1 << 20, round_bytes_total=10 << 20,
                            bytes_sent=1 << 20, bandwidth=1e8)
            if self.migrate_wait_s:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.abort_requested.wait(), self.migrate_wait_s)
                if self.abort_requested.is_set():
                    return migration_result("cancelled", total_ms=1200.0)
            return migration_result(downtime_target_ms=300,
                                    downtime_warning="predicted downtime 700 ms, over 2x the target")

        async def abort(args: dict[str, Any], sink: ProgressSink) -> Any:
            if args.get("name") == "ghost":
                raise RelocdError("no migration of 'ghost' in flight")
            self.abort_requested.set()
            if args.get("all"):
                return {"aborted": ["web1"], "refused": {"db": "past GO: the target runs it"}}
            if args["name"] == "saving":
                return {"aborted": ["saving"], "refused": {},
                        "results": {"saving": {"domain": "saving", "file": "/x.sav"}}}
            return {"aborted": [args["name"]], "refused": {}}

        async def job(args: dict[str, Any], sink: ProgressSink) -> Any:
            if args["name"] != "web1":
                raise RelocdError(f"no migration of {args['name']!r} in flight")
            await sink.emit(phase="precopy", round=2, percent=50.0, eta_s=1.0, pages_left=10)
            return migration_result()

        async def history(args: dict[str, Any], sink: ProgressSink) -> Any:
            return [{"migration_id": "m1", "kind": "migrate", "domain": "web1", "peer": "hostb:8002",
                     "live": True, "status": "completed", "started_at": 1_700_000_000.0,
                     "finished_at": 1_700_000_001.0, "iterations": 3, "bytes_sent": 4_096_000,
                     "downtime_ms": 5.0, "stop_reason": "dirty pages below 50", "error": None}]

        async def migrate_set(args: dict[str, Any], sink: ProgressSink) -> Any:
            return {"name": args["name"], "downtime_ms": args.get("downtime_ms", 300),
                    "max_bandwidth": args.get("max_bandwidth")}

        async def evacuate(args: dict[str, Any], sink: ProgressSink) -> Any:
            for name in ("web1", "db", "mail"):
                await sink.emit(domain=name, phase="precopy", round=1, percent=50.0,
                                bytes_sent=1 << 20)
            return {"moved": ["web1", "db"], "failed": {"mail": "target refused: no memory"},
                    "results": [migration_result(domain="web1"), migration_result(domain="db"),
                                migration_result("failed", "target refused: no memory",
                                                 domain="mail")]}

        ops = {"status": status, "list": list_, "create": create, "restore": restore,
               "migrate": migrate, "abort": abort, "job": job, "history": history,
               "migrate_set": migrate_set, "evacuate": evacuate}
        return {op: recorded(op, fn) for op, fn in ops.items()}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def ops(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeOps]:
    fake = FakeOps()
    monkeypatch.setenv("RELOCD_CONTROL", str(sock_dir / "control.sock"))
    with structlog.testing.capture_logs():
        async with ControlServer(sock_dir / "control.sock", fake.handlers()):
            yield fake


async def relocd(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- abort -------------------------------------------------------------------------------


async def test_abort_one(ops: FakeOps, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await relocd(capsys, "abort", "web1")
    assert (code, err) == (0, "")
    assert out == "Aborted the migration of web1: it stays on this host\n"
    assert ops.args_of("abort") == [{"name": "web1"}]
    code, out, _ = await relocd(capsys, "abort", "saving")
    assert (code, out) == (0, "Aborted the save of saving: it stays on this host\n")


async def test_abort_all_with_a_refusal_exits_1(ops: FakeOps, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await relocd(capsys, "abort", "--all")
    assert code == 1 and "web1" in out
    assert err == "relocd: not aborted: db: past GO: the target runs it\n"
    assert ops.args_of("abort") == [{"all": True}]
    code, out, _ = await relocd(capsys, "abort", "--all", "--json")
    assert code == 1 and json.loads(out)["aborted"] == ["web1"]


async def test_abort_nothing_in_flight_is_one_line(ops: FakeOps, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await relocd(capsys, "abort", "ghost")
    assert (code, out) == (1, "") and err == "relocd: no migration of 'ghost' in flight\n"


@pytest.mark.parametrize("argv", [["abort"], ["abort", "web1", "--all"]])
def test_abort_needs_name_or_all(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "relocd: abort: give NAME or --all (not both)\n"


# --- job ---------------------------------------------------------------------------------


async def test_job_shows_progress_and_the_summary(ops: FakeOps, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await relocd(capsys, "watch", "web1")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("round 2 [precopy]: 50%, ETA 1 s, 10 pages dirty")
    assert lines[1].startswith("Migrated web1 to hostb:8002 (live) in 250 ms")
    code, out, _ = await relocd(capsys, "job", "web1", "--json")
    assert code == 0 and json.loads(out) == migration_result()
    code, out, err = await relocd(capsys, "job", "db")
    assert (code, out) == (1, "") and err == "relocd: no migration of 'db' in flight\n"


# --- history -----------------------------------------------------------------------------


async def test_history(ops: FakeOps, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await relocd(capsys, "history")
    assert code == 0
    head, row = out.splitlines()
    assert head.split()[:4] == ["When", "Domain", "Kind", "Peer"]
    assert "web1" in row and "hostb:8002" in row and "dirty pages below 50" in row
    code, out, _ = await relocd(capsys, "history", "web1", "--limit", "5", "--json")
    assert code == 0 and json.loads(out)[0]["migration_id"] == "m1"
    assert ops.args_of("history") == [{}, {"name": "web1", "limit": 5}]


# --- migrate-set -------------------------------------------------------------------------


async def test_migrate_set(ops: FakeOps, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await relocd(capsys, "migrate-set", "web1", "--downtime-ms", "50",
                                "--max-bandwidth", "100MB/s")
    assert code == 0
    assert out == "web1: downtime target 50 ms, bandwidth cap 100MB/s from the next round\n"
    assert ops.args_of("migrate_set") == [{"name": "web1", "downtime_ms": 50,
                                           "max_bandwidth": "100MB/s"}]
    code, out, _ = await relocd(capsys, "migrate-set", "web1", "--downtime-ms", "20", "--json")
    assert code == 0 and json.loads(out) == {"name": "web1", "downtime_ms": 20, "max_bandwidth": None}


@pytest.mark.parametrize("argv,why", [
    (["migrate-set", "web1"], "give --downtime-ms and/or --max-bandwidth"),
    (["migrate-set", "web1", "--max-bandwidth", "100"], "say the unit"),
])
def test_migrate_set_usage(argv: list[str], why: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert why in capsys.readouterr().err


# --- evacuate ----------------------------------------------------------------------------


async def test_evacuate(ops: FakeOps, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await relocd(capsys, "evacuate", "hostb", "hostc", "--parallel", "2", "-l")
    assert code == 1  # mail did not move
    assert ops.args_of("evacuate") == [{"hosts": ["hostb", "hostc"], "parallel": 2, "live": True,
                                        "ssl": None}]  # neither --ssl nor --no-ssl: the config decides
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["web1", "db", "mail"]  # one per domain
    assert lines[3].startswith("Migrated web1 to hostb:8002") and lines[4].startswith("Migrated db")
    assert lines[5] == "Evacuated 2 of 3 domains to hostb, hostc."
    assert err == "relocd: 1 domain not moved: mail: target refused: no memory\n"
    code, out, _ = await relocd(capsys, "evacuate", "hostb", "--ssl", "-p", "9003", "--json")
    assert code == 1 and json.loads(out)["moved"] == ["web1", "db"]
    assert ops.args_of("evacuate")[-1] == {"hosts": ["hostb"], "parallel": 1, "live": False,
                                           "ssl": True, "port": 9003}


# --- migrate: new options, this host, create and restore ---------------------------------------


async def test_migrate_timeout_and_the_downtime_warning(
    ops: FakeOps, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await relocd(capsys, "migrate", "web1", "hostb", "-l", "--timeout", "30",
                                  "--timeout-action", "stop")
    assert (code, err) == (0, "")
    (args,) = ops.args_of("migrate")
    assert args["timeout"] == 30.0 and args["timeout_action"] == "stop" and args["live"] is True
    summary = out.splitlines()[-2:]
    assert "downtime 5.0 ms (target 300 ms)" in summary[0]
    assert summary[1] == "warning: predicted downtime 700 ms, over 2x the target"
    assert "[reserve]" not in out  # off a terminal: only lines with numbers


async def test_migrate_to_this_host_says_so(ops: FakeOps, capsys: pytest.CaptureFixture[str]) -> None:
    for target in ("127.0.0.1", "127.0.0.1:8002", "localhost"):
        code, out, err = await relocd(capsys, "migrate", "web1", target)
        assert (code, out) == (1, "")
        assert err == (f"relocd: {target.split(':')[0]} is this host (the local daemon listens on "
                       "127.0.0.1:8002): migrate to another host\n")
    code, out, _ = await relocd(capsys, "migrate", "web1", "127.0.0.1", "--json")
    assert code == 1 and "is this host" in json.loads(out)["error"]
    assert ops.args_of("migrate") == []
    # another daemon on this machine, on another port, is another host
    code, _, _ = await relocd(capsys, "migrate", "web1", "127.0.0.1", "-p", "9002")
    assert code == 0 and len(ops.args_of("migrate")) == 1


async def test_create_prints_its_driver_and_restore_its_name(
    ops: FakeOps, capsys: pytest.CaptureFixture[str], sock_dir: Path
) -> None:
    code, out, _ = await relocd(capsys, "create", "web1", "--memory", "64M")
    assert (code, out) == (0, "Created web1: 64 MiB, 1 vCPU, driver sim\n")
    code, out, _ = await relocd(capsys, "restore", str(sock_dir / "web1.sav"))
    assert (code, out) == (0, f"Restored web1 from {sock_dir / 'web1.sav'}\n")


# --- Ctrl-C -----------------------------------------------------------------------------------


def _env(sock_dir: Path) -> dict[str, str]:
    return dict(os.environ, RELOCD_CONTROL=str(sock_dir / "control.sock"), PYTHONUNBUFFERED="1",
                PYTHONPATH=str(REPO), COLUMNS="80", LINES="24")


async def test_ctrl_c_without_a_terminal_aborts_at_once(ops: FakeOps, sock_dir: Path) -> None:
    ops.migrate_wait_s = 20.0
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relocd", "migrate", "web1", "hostb", "--live",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=_env(sock_dir))
    assert proc.stdout is not None and proc.stderr is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert first.startswith(b"round 1 [precopy]: 10%")
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert ops.args_of("abort") == [{"name": "web1"}]
    assert err.decode() == ("relocd: aborting the migration of web1\n"
                            "relocd: migration of web1 to hostb was cancelled after 1.20 s; "
                            "web1 stays on this host\n")


async def test_ctrl_c_with_json_aborts_and_prints_the_object(ops: FakeOps, sock_dir: Path) -> None:
    ops.migrate_wait_s = 20.0
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relocd", "migrate", "web1", "hostb", "--json",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=_env(sock_dir))
    for _ in range(200):  # until the migrate request has reached the daemon
        if ops.args_of("migrate"):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1 and json.loads(out)["status"] == "cancelled"
    assert ops.args_of("abort") == [{"name": "web1"}]


class Terminal:
    """A subprocess on a pseudo-terminal, read without blocking the event loop."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.text = ""

    async def read_until(self, needle: str, timeout: float = 20.0) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while needle not in self.text:
            ready = asyncio.Event()
            loop.add_reader(self.master, ready.set)
            try:
                await asyncio.wait_for(ready.wait(), max(deadline - loop.time(), 0.01))
            except asyncio.TimeoutError:
                raise AssertionError(f"no {needle!r} in {self.text!r}") from None
            finally:
                loop.remove_reader(self.master)
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the other end closed
                raise AssertionError(f"no {needle!r} in {self.text!r}") from None
            self.text += chunk.decode(errors="replace")
        return self.text

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())


async def _on_a_terminal(sock_dir: Path) -> tuple[asyncio.subprocess.Process, Terminal]:
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relocd", "migrate", "web1", "hostb", "--live",
        stdin=slave, stdout=slave, stderr=slave, env=_env(sock_dir), start_new_session=True)
    os.close(slave)
    return proc, Terminal(master)


@pytest.mark.parametrize("answer", ["y", "n"])
async def test_ctrl_c_on_a_terminal_asks_first(ops: FakeOps, sock_dir: Path, answer: str) -> None:
    ops.migrate_wait_s = 6.0 if answer == "n" else 20.0
    proc, term = await _on_a_terminal(sock_dir)
    try:
        await term.read_until("round 1 [precopy]: 10%")
        proc.send_signal(signal.SIGINT)
        await term.read_until("abort the migration of web1? [y/N] ")
        term.type(answer + "\n")
        if answer == "y":
            text = await term.read_until("stays on this host")
            assert "relocd: aborting the migration of web1" in text
            assert "was cancelled" in text
            assert ops.args_of("abort") == [{"name": "web1"}]
            assert await asyncio.wait_for(proc.wait(), 20) == 1
        else:
            text = await term.read_until("Migrated web1 to hostb", timeout=30)
            assert ops.args_of("abort") == []
            assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(term.master)


async def test_a_second_ctrl_c_at_the_question_leaves(ops: FakeOps, sock_dir: Path) -> None:
    ops.migrate_wait_s = 20.0
    proc, term = await _on_a_terminal(sock_dir)
    try:
        await term.read_until("round 1 [precopy]: 10%")
        proc.send_signal(signal.SIGINT)
        await term.read_until("[y/N] ")
        proc.send_signal(signal.SIGINT)
        text = await term.read_until("goes on in the daemon")
        assert "relocd abort web1 to cancel it" in text
        assert await asyncio.wait_for(proc.wait(), 20) == 130
        assert ops.args_of("abort") == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(term.master)

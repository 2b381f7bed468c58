"""`relocd` against a real ControlServer on a temporary socket with fake handlers.

The CLI runs its own event loop (asyncio.run), so each invocation runs in a
worker thread while the server runs in the test's loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import sys
import tempfile
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from relocd import cli
from relocd.errors import ConfigError, DomainNotFound
from relocd.progress import MigrationProgress, describe, summarize_migration
from relocd.server.control import ControlServer, ProgressSink

DOMAINS = [
    {"name": "web1", "state": "running", "memory_mib": 512, "vcpus": 1, "driver": "sim"},
    {"name": "db", "state": "migrating", "memory_mib": 2048, "vcpus": 4, "driver": "kvm"},
    {"name": "mail", "state": "incoming", "memory_mib": 256, "vcpus": 1, "driver": "sim"},
]


def migration_result(status: str = "completed", error: str | None = None) -> dict[str, Any]:
    return {"status": status, "domain": "web1", "live": True, "iterations": 4,
            "pages_sent": 140_000, "bytes_sent": 573_440_000, "total_ms": 1530.5,
            "downtime_ms": 12.25, "verified": True, "error": error}


class FakeDaemon:
    """Handlers that record what they were asked and answer canned results."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.migrate_status = "completed"

    def handlers(self) -> dict[str, Any]:
        async def record(op: str, args: dict[str, Any]) -> None:
            self.calls.append((op, args))

        async def list_(args: dict[str, Any], sink: ProgressSink) -> Any:
            await record("list", args)
            return DOMAINS

        async def migrate(args: dict[str, Any], sink: ProgressSink) -> Any:
            await record("migrate", args)
            if args["name"] == "ghost":
                raise DomainNotFound("no domain named 'ghost'")
            for rnd, left in ((1, 5000), (2, 800), (3, 90)):
                await sink.emit(phase="precopy", round=rnd, pages_left=left,
                                dirty_rate=10.24e6, bandwidth=1.2e9, expected_downtime_ms=3.0)
            await sink.emit(phase="stop-and-copy", round=4, pages_left=90)
            error = None if self.migrate_status == "completed" else "target refused: no memory"
            return migration_result(self.migrate_status, error)

        async def generic(args: dict[str, Any], sink: ProgressSink, op: str = "") -> Any:
            await record(op, args)
            return {"name": args.get("name", "restored1"), "state": "running"}

        async def crash(args: dict[str, Any], sink: ProgressSink) -> Any:
            raise KeyError("internal detail")

        async def config_error(args: dict[str, Any], sink: ProgressSink) -> Any:
            raise ConfigError("argument memory: expected int")

        def op(name: str) -> Any:
            async def handler(args: dict[str, Any], sink: ProgressSink) -> Any:
                return await generic(args, sink, name)
            return handler

        handlers: dict[str, Any] = {name: op(name) for name in (
            "create", "save", "restore", "destroy", "inspect", "status", "pause")}
        handlers.update(list=list_, migrate=migrate)
        handlers["status"] = crash
        handlers["pause"] = config_error
        return handlers


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def daemon(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDaemon]:
    fake = FakeDaemon()
    monkeypatch.setenv("RELOCD_CONTROL", str(sock_dir / "control.sock"))
    with structlog.testing.capture_logs():  # keep the server's log off stdout
        async with ControlServer(sock_dir / "control.sock", fake.handlers()):
            yield fake


async def relocd(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- parsing -------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["serve", "--config", "/x.sxp", "--address", "::", "--port", "8002",
     "--control", "/tmp/c.sock", "--state-dir", "/tmp/s", "--log-format", "json"],
    ["create", "web1", "--memory", "512", "--vcpus", "2", "--driver", "kvm",
     "--workload", "uniform:rate=100MB/s", "--vif", "mac=00:16:3e:00:00:01,ip=10.0.0.5",
     "--vif", "bridge=xenbr0"],
    ["list", "--json"],
    ["migrate", "web1", "hostb", "--port", "8002", "--live", "--ssl", "--verify", "--json",
     "--policy", "downtime", "--downtime-ms", "50", "--max-bandwidth", "1GB/s"],
    ["save", "web1", "web1.sav", "--checkpoint", "--json"],
    ["restore", "web1.sav", "--json"],
    ["destroy", "web1"],
    ["inspect", "web1.sav", "--json"],
    ["check-config", "--config", "/etc/relocd/relocd-config.sxp"],
    ["status"],
])
def test_every_command_parses(argv: list[str]) -> None:
    ns = cli.build_parser().parse_args(argv)
    assert ns.command == argv[0]
    assert callable(ns.func)


def test_parsed_values() -> None:
    ns = cli.build_parser().parse_args(
        ["migrate", "web1", "hostb", "--downtime-ms", "50", "--max-bandwidth", "1GB/s"])
    assert (ns.live, ns.verify, ns.ssl, ns.port, ns.downtime_ms) == (False, False, None, None, 50)
    assert ns.max_bandwidth == "1GB/s"
    ns = cli.build_parser().parse_args(["create", "w", "--memory", "1GiB"])
    assert (ns.memory, ns.vcpus, ns.driver, ns.workload, ns.vif) == (1024, 1, None, "idle", None)


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["create", "web1"],  # --memory is required
    ["create", "web1", "--memory", "0"],
    ["create", "web1", "--memory", "1.5KiB"],
    ["create", "web1", "--memory", "64", "--vcpus", "0"],
    ["create", "web1", "--memory", "64", "--driver", "vmware"],
    ["create", "web1", "--memory", "64", "--vif", "nonsense"],
    ["migrate", "web1"],
    ["migrate", "web1", "hostb", "--port", "70000"],
    ["migrate", "web1", "hostb", "--policy", "fast"],
    ["migrate", "web1", "hostb", "--max-bandwidth", "lots"],
    ["migrate", "web1", "hostb", "--downtime-ms", "-1"],
    ["save", "web1"],
    ["list", "extra"],
    ["serve", "--log-format", "xml"],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "usage:" in err and "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "migrate" in capsys.readouterr().out


@pytest.mark.parametrize("text,expected", [
    ("hostb", ("hostb", None)),
    ("hostb:9000", ("hostb", 9000)),
    ("[fd00::2]:9000", ("fd00::2", 9000)),
    ("fd00::2", ("fd00::2", None)),
    ("[fd00::2]", ("fd00::2", None)),
])
def test_split_host_port(text: str, expected: tuple[str, int | None]) -> None:
    assert cli.split_host_port(text, None) == expected


def test_control_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELOCD_CONTROL", "/env.sock")
    assert cli.control_path("/flag.sock") == Path("/flag.sock")
    assert cli.control_path(None) == Path("/env.sock")
    monkeypatch.delenv("RELOCD_CONTROL")
    monkeypatch.setenv("RELOCD_CONFIG", "/nonexistent/relocd-config.sxp")
    assert cli.control_path(None) == Path("/run/relocd/control.sock")


# --- against a daemon --------------------------------------------------------


async def test_list_table(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await relocd(capsys, "list")
    assert code == 0 and err == ""
    header, *rows = out.splitlines()
    assert header.split() == ["Name", "Mem(MiB)", "VCPUs", "State", "Driver"]
    assert rows[0].split() == ["web1", "512", "1", "running", "sim"]
    assert rows[1].split() == ["migrating-db", "2048", "4", "migrating", "kvm"]
    assert rows[2].split() == ["mail", "256", "1", "incoming", "sim"]


async def test_list_json_is_the_daemons_list(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await relocd(capsys, "list", "--json")
    assert code == 0
    assert json.loads(out) == DOMAINS


async def test_migrate_json_prints_one_object(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await relocd(capsys, "migrate", "web1", "hostb:9000", "--live",
                                  "--verify", "--json", "--max-bandwidth", "1GB/s")
    assert code == 0 and err == ""
    assert len(out.strip().splitlines()) == 1
    assert json.loads(out) == migration_result()
    op, args = daemon.calls[-1]
    assert op == "migrate"
    assert args == {"name": "web1", "host": "hostb", "port": 9000, "live": True, "ssl": None,
                    "verify": True, "policy": None, "downtime_ms": None,
                    "max_bandwidth": "1GB/s"}


@pytest.mark.parametrize("status", ["failed", "rolled-back"])
async def test_migrate_exit_code_follows_status(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], status: str
) -> None:
    daemon.migrate_status = status
    code, out, err = await relocd(capsys, "migrate", "web1", "hostb", "--json")
    assert code == 1
    assert json.loads(out)["status"] == status
    assert err.count("\n") == 1
    outcome = "failed" if status == "failed" else "rolled back after 1.53 s"
    kept = "" if status == "failed" else "; web1 stays on this host"
    assert err == f"relocd: migration of web1 to hostb {outcome}: target refused: no memory{kept}\n"


async def test_failed_migration_is_reported_once(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.migrate_status = "failed"
    code, out, err = await relocd(capsys, "migrate", "web1", "hostb")
    assert code == 1
    assert "target refused" not in out  # on stderr, once
    assert err == "relocd: migration of web1 to hostb failed: target refused: no memory\n"


async def test_migrate_json_when_daemon_refuses_still_prints_object(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await relocd(capsys, "migrate", "ghost", "hostb", "--json")
    assert code == 1
    result = json.loads(out)
    assert result["status"] == "failed" and result["domain"] == "ghost"
    assert result["error"] == "no domain named 'ghost'"
    assert err == "relocd: no domain named 'ghost'\n"


async def test_migrate_progress_without_tty(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await relocd(capsys, "migrate", "web1", "hostb", "--live")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert "\r" not in out and "\x1b" not in out
    assert lines[0].startswith("round 1 [precopy]: 5,000 pages dirty")
    assert "dirtying 10.2 MB/s" in lines[0] and "sending 1.2 GB/s" in lines[0]
    assert "expected downtime 3.0 ms" in lines[0]
    # the rounds that follow within a few seconds print nothing more off a terminal
    assert len(lines) == 2
    assert lines[-1].startswith("Migrated web1 to hostb (live) in 1.53 s: 4 rounds")
    assert "downtime 12.2 ms" in lines[-1] and "memory verified" in lines[-1]


async def test_operation_error_is_one_line_exit_1(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await relocd(capsys, "migrate", "ghost", "hostb")
    assert code == 1
    assert err == "relocd: no domain named 'ghost'\n"


async def test_internal_error_is_hidden(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await relocd(capsys, "status")
    assert code == 1 and out == ""
    assert err == "relocd: internal error: KeyError: 'internal detail'\n"


async def test_daemon_usage_error_exits_2(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await relocd(capsys, "pause", "web1")
    assert code == 2 and err == "relocd: argument memory: expected int\n"


async def test_unreachable_daemon(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sock_dir / "none.sock"
    code, out, err = await relocd(capsys, "list", "--control", str(path))
    assert code == 1 and out == ""
    assert err == (f"relocd: cannot reach relocd at {path}: is the daemon running? "
                   "(relocd serve)\n")


async def test_create_save_restore_destroy_args(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    sock_dir: Path,
) -> None:
    monkeypatch.chdir(sock_dir)
    assert (await relocd(capsys, "create", "web1", "--memory", "1GiB", "--vif",
                         "mac=00:16:3e:00:00:01,ip=10.0.0.5"))[0] == 0
    assert (await relocd(capsys, "save", "web1", "web1.sav", "--checkpoint"))[0] == 0
    code, out, _ = await relocd(capsys, "restore", "web1.sav", "--json")
    assert code == 0 and json.loads(out) == {"name": "restored1", "state": "running"}
    code, out, _ = await relocd(capsys, "destroy", "web1")
    assert code == 0 and out == "Destroyed web1\n"
    calls = dict(daemon.calls)
    assert calls["create"] == {"name": "web1", "memory": 1024, "vcpus": 1, "driver": None,
                               "workload": "idle",
                               "vifs": ["mac=00:16:3e:00:00:01,ip=10.0.0.5"]}
    # relative paths are resolved here: the daemon's cwd is not ours
    assert calls["save"] == {"name": "web1", "file": str(sock_dir / "web1.sav"),
                             "checkpoint": True}
    assert calls["restore"] == {"file": str(sock_dir / "web1.sav")}


async def test_keyboard_interrupt_exits_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.common, "ask", interrupted)
    code, out, err = await relocd(capsys, "list")
    assert code == 130 and out == "" and "Traceback" not in err


def test_cli_bug_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("oops\nsecond line")

    monkeypatch.setattr(cli.common, "ask", broken)
    assert cli.main(["list"]) == 1
    assert capsys.readouterr().err == "relocd: internal error: RuntimeError: oops second line\n"


# --- serve and check-config ------------------------------------------------------


def test_serve_builds_settings_and_runs_daemon(
    monkeypatch: pytest.MonkeyPatch, sock_dir: Path
) -> None:
    seen: list[Any] = []
    fake = types.ModuleType("relocd.server.daemon")

    def run_daemon(settings: Any) -> int:
        seen.append(settings)
        return 0

    fake.run_daemon = run_daemon  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "relocd.server.daemon", fake)
    config = sock_dir / "relocd-config.sxp"
    config.write_text("(xend-relocation-port 8002)\n(relocd-state-dir /var/lib/relocd)\n")
    monkeypatch.setenv("RELOCD_CONFIG", str(config))
    monkeypatch.delenv("RELOCD_CONTROL", raising=False)
    code = cli.main(["serve", "--port", "9002", "--address", "127.0.0.1",
                     "--control", str(sock_dir / "c.sock"), "--state-dir", str(sock_dir)])
    assert code == 0
    (settings,) = seen
    assert settings.relocation_port == 9002
    assert settings.relocation_address == "127.0.0.1"
    assert Path(settings.control_socket) == sock_dir / "c.sock"
    assert Path(settings.state_dir) == sock_dir


def test_serve_with_missing_config_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--config", "/nonexistent/relocd.sxp"]) == 2
    assert capsys.readouterr().err == "relocd: /nonexistent/relocd.sxp: no such file\n"


def test_check_config(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = sock_dir / "good.sxp"
    good.write_text("(xend-relocation-server yes)\n(xend-relocation-port 8002)\n")
    assert cli.main(["check-config", "--config", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok\n"
    bad = sock_dir / "bad.sxp"
    bad.write_text("(xend-relocation-server yes)\n(xend-relocation-port banana)\n"
                   "(xend-relocation-hosts-allow '^hostb$')\n")
    assert cli.main(["check-config", "--config", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("relocd: ") and "line 2" in err and err.count("\n") == 1


# --- the progress display on its own ------------------------------------------------


def test_tty_progress_redraws_one_line() -> None:
    out = io.StringIO()
    clock = iter([0.0, 0.05, 0.2, 0.3])
    display = MigrationProgress(out, tty=True, clock=lambda: next(clock))
    display.update({"phase": "precopy", "round": 1, "pages_left": 10})
    display.update({"phase": "precopy", "round": 2, "pages_left": 9})  # too soon: skipped
    display.update({"phase": "precopy", "round": 3, "pages_left": 8})
    display.finish()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "round 3" in text and "round 2" not in text


def test_describe_and_summary() -> None:
    assert describe({}) == "working"
    assert describe({"phase": "handoff"}) == "[handoff]"
    text = summarize_migration(migration_result("rolled-back", "peer vanished"), "hostb")
    assert text == ("migration of web1 to hostb rolled back after 1.53 s: "
                    "peer vanished; web1 stays on this host.")


def test_a_source_copy_in_its_handoff_still_lists_as_migrating_name() -> None:
    from relocd.cli import format_domain_table

    table = format_domain_table(
        [{"name": "web1--migratedaway", "state": "migrating", "memory_mib": 256, "vcpus": 1, "driver": "sim"}]
    )
    assert "migrating-web1 " in table and "--migratedaway" not in table

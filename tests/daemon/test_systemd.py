"""The daemon under systemd: sd_notify (READY, STATUS, WATCHDOG, STOPPING), SIGHUP
reloads, exit status 2 on a bad config, the shutdown grace, journald priorities,
and migration_id on every line of a migration.

systemd itself is played by the test: a unix datagram socket in $NOTIFY_SOCKET,
$WATCHDOG_USEC, and $JOURNAL_STREAM naming the daemon's log file.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import DaemonProc

IDLE = "idle"
REFUSE_LOOPBACK = r"(xend-relocation-hosts-allow '^10\\.9\\.9\\.9$')"


class FakeSystemd:
    """The notify socket of a Type=notify service: collects what the daemon sends."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sd", dir="/tmp"))  # sun_path is short
        self.path = str(self.dir / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        #: (arrival time, fields) of every datagram so far
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self) -> list[tuple[float, dict[str, str]]]:
        self.sock.setblocking(False)
        while True:
            try:
                data = self.sock.recv(4096).decode()
            except BlockingIOError:
                return self.messages
            self.messages.append((time.monotonic(), dict(line.split("=", 1) for line in data.split("\n"))))

    def wait_for(self, pred: Callable[[dict[str, str]], bool], timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            msgs = self.drain()
            for _, fields in msgs[seen:]:
                if pred(fields):
                    return fields
            seen = len(msgs)
            time.sleep(0.05)
        raise AssertionError(f"no such message; got {[m for _, m in self.messages][-10:]}")

    def statuses(self) -> list[str]:
        return [m["STATUS"] for _, m in self.drain() if "STATUS" in m]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def systemd() -> Iterator[Callable[[], FakeSystemd]]:
    made: list[FakeSystemd] = []

    def make() -> FakeSystemd:
        made.append(FakeSystemd())
        return made[-1]

    yield make
    for fake in made:
        fake.close()


async def statuses_in_order(fake: FakeSystemd, *lines: str, timeout: float = 20.0) -> None:
    """Wait until the STATUS= lines sent so far hold ``lines`` in this order."""
    deadline = time.monotonic() + timeout
    while True:
        sent = iter(fake.statuses())
        if all(line in sent for line in lines):  # a subsequence
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"STATUS= lines {fake.statuses()} lack {lines} in order")
        await asyncio.sleep(0.05)


def under_systemd(fake: FakeSystemd, **env: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": fake.path, **env}


def json_lines(d: DaemonProc) -> list[dict[str, Any]]:
    """The daemon's log, one JSON object a line (a journald <N> prefix dropped)."""
    out = []
    for line in d.log_text().splitlines():
        if line.startswith("<") and ">" in line[:4]:
            line = line[line.index(">") + 1 :]
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def wait_for_log(d: DaemonProc, event: str, after: int = 0, timeout: float = 15.0) -> dict[str, Any]:
    """The first line with this event among the lines after the first ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in json_lines(d)[after:]:
            if line.get("event") == event:
                return line
        await asyncio.sleep(0.05)
    raise AssertionError(f"{d.name} logged no {event!r}:\n{d.log_text()[-3000:]}")


def rewrite_config(d: DaemonProc, extra: str) -> None:
    """Put ``extra`` in front of the harness's own options (the first occurrence wins)."""
    harness_part = d.config.read_text().split("(xend-relocation-server yes)", 1)[1]
    d.config.write_text(f"# test daemon {d.name}\n{extra}\n(xend-relocation-server yes){harness_part}")


def hup(d: DaemonProc) -> None:
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)


# --- sd_notify ---------------------------------------------------------------------


async def test_ready_status_and_watchdog_pings(
    tmp_path: Path, daemons: list[DaemonProc], systemd: Callable[[], FakeSystemd]
) -> None:
    sd_a, sd_b = systemd(), systemd()
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1", env=under_systemd(sd_a, WATCHDOG_USEC="2000000"))
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2", env=under_systemd(sd_b))
    daemons.extend([a, b])
    a.start()
    b.start()
    ready = sd_a.wait_for(lambda m: "READY" in m)
    assert ready["STATUS"] == "serving; 0 domains; 0 outgoing, 0 incoming migrations"
    assert a.proc is not None and ready["MAINPID"] == str(a.proc.pid)
    assert "systemd watchdog on" in a.log_text()

    # WATCHDOG_USEC=2s: a ping every second (half of it), well within the 2 s.
    assert sd_a.wait_for(lambda m: m.get("WATCHDOG") == "1")
    start = time.monotonic()
    while time.monotonic() < start + 4.5:  # arrival times, to the 50 ms
        sd_a.drain()
        await asyncio.sleep(0.05)
    pings = [t for t, m in sd_a.messages if m.get("WATCHDOG") == "1" and t >= start]
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:])]
    assert len(pings) >= 3 and min(gaps) > 0.7 and max(gaps) < 2.0, gaps
    assert not any("WATCHDOG" in m for _, m in sd_b.drain()), "B was given no WATCHDOG_USEC"

    # STATUS= follows a migration on both sides.
    await a.call("create", name="web1", memory=64, workload=IDLE)
    result = await a.call("migrate", name="web1", host=b.address, port=b.port, live=True)
    assert result["status"] == "completed", result
    await statuses_in_order(
        sd_a,
        "serving; 1 domain; 1 outgoing, 0 incoming migrations",
        "serving; 0 domains; 0 outgoing, 0 incoming migrations",
    )
    await statuses_in_order(
        sd_b,
        "serving; 0 domains; 0 outgoing, 0 incoming migrations",
        "serving; 1 domain; 0 outgoing, 1 incoming migrations",  # web1--incoming, reserved
        "serving; 1 domain; 0 outgoing, 0 incoming migrations",
    )

    assert a.stop() == 0
    stopping = [m for _, m in sd_a.drain() if "STOPPING" in m]
    assert stopping and stopping[0]["STATUS"].startswith("shutting down; 0 domains")


# --- SIGHUP --------------------------------------------------------------------------


async def test_sighup_applies_a_good_file_and_refuses_a_bad_one(
    tmp_path: Path, daemons: list[DaemonProc], systemd: Callable[[], FakeSystemd]
) -> None:
    sd_b = systemd()
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2", env=under_systemd(sd_b))
    daemons.extend([a, b])
    a.start()
    b.start()
    await a.call("create", name="web1", memory=32, workload=IDLE)

    # A good change: hosts-allow now refuses 127.0.0.1, and a restart-only option.
    rewrite_config(b, f"{REFUSE_LOOPBACK}\n(relocd-max-incoming 2)\n(relocd-state-dir {tmp_path}/elsewhere)")
    mark = len(json_lines(b))
    hup(b)
    reloaded = await wait_for_log(b, "config reloaded", mark)
    assert sorted(reloaded["applied"]) == ["relocd-max-incoming", "xend-relocation-hosts-allow"]
    restart = await wait_for_log(b, "config options not applied until a restart", mark)
    assert restart["options"] == ["relocd-state-dir"] and restart["level"] == "warning"
    sd_b.wait_for(lambda m: m.get("RELOADING") == "1" and "MONOTONIC_USEC" in m)
    told = [m for _, m in sd_b.drain()]
    reloading = next(i for i, m in enumerate(told) if "RELOADING" in m)
    assert any("READY" in m for m in told[reloading:]), "READY=1 ends the reload"
    result = await a.call("migrate", name="web1", host=b.address, port=b.port, live=True)
    assert result["status"] == "failed", result
    await wait_for_log(b, "connection refused by hosts-allow", mark)
    assert [d["name"] for d in await a.call("list")] == ["web1"]

    # A bad file: refused in one line, the daemon serves on with the old settings.
    rewrite_config(b, "(xend-relocation-hosts-allow '')\n(xend-relocation-port abc)")
    mark = len(json_lines(b))
    hup(b)
    refused = await wait_for_log(b, "config not reloaded, old settings kept", mark)
    assert refused["level"] == "error"
    assert refused["error"] == f"{b.config} line 3: xend-relocation-port: not a port number: 'abc'"
    assert b.alive and await b.call("status")
    errors = [line for line in b.log_text().splitlines()[-20:] if "not a port number" in line]
    assert len(errors) == 1, "one line, no traceback"
    result = await a.call("migrate", name="web1", host=b.address, port=b.port, live=True)
    assert result["status"] == "failed", "the old hosts-allow still refuses"

    # SIGHUP again, many times at once, with the file fixed: it lets A in.
    rewrite_config(b, "")
    mark = len(json_lines(b))
    for _ in range(5):
        hup(b)
    reloaded = await wait_for_log(b, "config reloaded", mark)
    assert "xend-relocation-hosts-allow" in reloaded["applied"]
    # the restart-only change was undone in the file: nothing pending any more
    result = await a.call("migrate", name="web1", host=b.address, port=b.port, live=True)
    assert result["status"] == "completed", result
    assert b.alive
    assert b.stop() == 0


async def test_sighup_changes_the_log_level(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    daemons.append(a)
    a.start()
    await a.call("create", name="one", memory=16, workload=IDLE)
    await wait_for_log(a, "domain created")
    rewrite_config(a, "(relocd-log-level warning)")
    hup(a)
    await asyncio.sleep(1.0)  # "config reloaded" is an info line: no longer written
    mark = len(json_lines(a))
    await a.call("create", name="two", memory=16, workload=IDLE)
    await a.call("destroy", name="two")
    assert [line["event"] for line in json_lines(a)[mark:]] == []
    rewrite_config(a, "(relocd-log-level debug)")
    hup(a)
    assert (await wait_for_log(a, "config reloaded", mark))["applied"] == ["relocd-log-level"]


async def test_watchdog_abort_leaves_the_stacks_in_the_log(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    daemons.append(a)
    a.start()
    assert a.proc is not None
    a.proc.send_signal(signal.SIGABRT)  # what systemd sends when the pings stop
    assert a.proc.wait(20) == -signal.SIGABRT
    text = a.log_text()
    assert "Fatal Python error: Aborted" in text
    assert "relocd/server/daemon.py" in text, "the main thread's stack shows where the loop was"


# --- exit status and shutdown ---------------------------------------------------------


def test_serve_exits_2_on_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.sxp"
    config.write_text("(relocd-shutdown-grace soon)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "relocd", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2  # RestartPreventExitStatus=2: systemd does not retry it
    assert proc.stderr.strip().splitlines() == [
        f"relocd: {config} line 1: relocd-shutdown-grace: not a number: 'soon'"
    ]


async def test_shutdown_grace_bounds_the_stop(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1", extra_config="(relocd-shutdown-grace 1)")
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2")
    daemons.extend([a, b])
    a.start()
    b.start()
    await a.call("create", name="slow", memory=64, workload=IDLE)
    migration = asyncio.ensure_future(
        a.call("migrate", name="slow", host=b.address, port=b.port, live=True, max_bandwidth="2MB/s")
    )
    await wait_for_log(b, "reservation granted")
    t0 = time.monotonic()
    assert a.stop(timeout=20) == 0
    took = time.monotonic() - t0
    assert took < 12, f"a stop with relocd-shutdown-grace 1 took {took:.1f} s"
    assert (await wait_for_log(a, "shutting down"))["grace_s"] == 1.0
    try:
        answer = await asyncio.wait_for(migration, 10)
    except Exception:  # the daemon went away under the client
        pass
    else:
        assert answer["status"] != "completed", answer
    a.start()
    assert [(d["name"], d["state"]) for d in await a.call("list")] == [("slow", "running")]


UNIT = Path(__file__).parents[2] / "systemd" / "relocd.service"


def unit_settings() -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith(("#", " ", "["))
    )


def test_unit_matches_the_daemon() -> None:
    from relocd.config.settings import Settings

    unit = unit_settings()
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    assert unit["WatchdogSec"] == "30s"
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["RestartPreventExitStatus"] == "2"
    assert unit["ExecStart"] == "/opt/relocd/bin/relocd serve"  # the venv of README's install
    assert unit["TimeoutStopSec"] == "90s"
    assert Settings().shutdown_grace + 60 == 90, "TimeoutStopSec is the default grace plus a minute"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "relocd.service"  # with an ExecStart that exists here
    unit.write_text(UNIT.read_text().replace(
        "ExecStart=/opt/relocd/bin/relocd serve", f"ExecStart={sys.executable} -m relocd serve"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- logs ---------------------------------------------------------------------------


async def test_journald_lines_carry_their_priority(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1", extra_config="(relocd-log-level debug)")
    a.log.touch()
    st = os.stat(a.log)  # the daemon's stderr is this file: journald's stream, for the test
    a.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    a.env["NOTIFY_SOCKET"] = str(tmp_path / "nobody-listens")  # READY=1 fails: a debug line
    daemons.append(a)
    a.start()
    rewrite_config(a, "(relocd-log-level debug)\n(xend-relocation-port 99999)")
    hup(a)
    await wait_for_log(a, "config not reloaded, old settings kept")
    rewrite_config(a, f"(relocd-log-level debug)\n(relocd-control-socket {tmp_path}/other.sock)")
    hup(a)
    await wait_for_log(a, "config options not applied until a restart")
    priority = {"debug": "7", "info": "6", "warning": "4", "error": "3"}
    seen = set()
    lines = a.log_text().splitlines()
    for line in lines:
        assert line.startswith("<") and line[2] == ">", line
        fields = json.loads(line[3:])
        assert line[1] == priority[fields["level"]], line
        seen.add(fields["level"])
    assert seen >= {"debug", "info", "warning", "error"}, seen


def lines_of_migration(lines: list[dict[str, Any]], opened: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The lines after the one that opened the migration (nothing else runs on the daemon then)."""
    start = next(i for i, line in enumerate(lines) if opened(line))
    return lines[start + 1 :]


async def test_every_line_of_a_migration_carries_its_id(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    await a.call("create", name="web1", memory=64, workload="hotset:size=16MiB,rate=20MB/s")
    result = await a.call("migrate", name="web1", host=b.address, port=b.port, live=True)
    assert result["status"] == "completed", result
    mid = result["migration_id"]
    await asyncio.sleep(1.0)  # the target's last lines (announce) are written after the answer
    # The source's lines from the control request on (its own line is the
    # request's, logged before there is a migration), the last one included;
    # the target's from the connection on (the accept is logged before the
    # HELLO that carries the id).
    source = lines_of_migration(json_lines(a), lambda x: x["event"] == "control request" and x.get("op") == "migrate")
    target = lines_of_migration(json_lines(b), lambda x: x["event"] == "connection accepted")
    assert source[-1]["event"] == "migration finished", source[-1]
    assert any(x["event"] == "reservation granted" for x in target)
    assert result["channels"] == 4  # the extra page channels' connections are in these lines too
    for name, lines in (("source", source), ("target", target)):
        # every connection's accept comes before its HELLO says which migration it is for
        strays = [f"{x.get('logger')}: {x['event']}" for x in lines
                  if x.get("migration_id") != mid and x["event"] != "connection accepted"]
        assert strays == [], f"{name}: lines of the migration without its migration_id: {strays}"

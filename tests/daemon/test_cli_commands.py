"""The `relocd` command against real daemons: migrate and its failures, job, abort, migrate-set,
history, evacuate, Ctrl-C, create, save and restore.

Each command runs as a subprocess (`python -m relocd ... --control SOCK`), as an operator runs it.
A test of an op the daemon does not have yet skips, saying so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import DaemonProc, free_port

REPO = Path(__file__).resolve().parents[2]
#: Slow enough to act on while it runs: 64 MiB at 8 MB/s is about 8 s of round 1.
SLOW = ("--max-bandwidth", "8MB/s")


def relocd(d: DaemonProc, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relocd", *args, "--control", str(d.control)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=_env())


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", COLUMNS="80")


def background(d: DaemonProc, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "relocd", *args, "--control", str(d.control)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=_env())


def needs_op(d: DaemonProc, op: str) -> None:
    proc = relocd(d, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    probe = subprocess.run(
        [sys.executable, "-c", f"import asyncio,sys; from relocd.server.control import call\n"
         f"try: asyncio.run(call(sys.argv[1], {op!r}, {{}}))\nexcept Exception as e: print(e)",
         str(d.control)], capture_output=True, text=True, timeout=60, env=_env())
    assert "unknown operation" not in probe.stdout, f"the daemon has no op {op!r}"


def wait_until_moving(d: DaemonProc, name: str, timeout: float = 30) -> None:
    """Until ``name`` shows as migrating (its precopy has begun)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = json.loads(relocd(d, "list", "--json").stdout)
        if any(x["name"].startswith(name) and x["state"] == "migrating" for x in listed):
            time.sleep(0.5)  # well into round 1
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} never started migrating")


def settles(check: Any, timeout: float = 15) -> bool:
    """``check()`` comes true within ``timeout`` (a target drops its copy after the source ends)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def names(d: DaemonProc) -> dict[str, str]:
    return {x["name"]: x["state"] for x in json.loads(relocd(d, "list", "--json").stdout)}


@pytest.fixture
def web1(pair: tuple[DaemonProc, DaemonProc]) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    a, b = pair
    made = relocd(a, "create", "web1", "--memory", "64M", "--workload", "uniform:rate=4MB/s")
    assert made.returncode == 0, made.stderr
    assert made.stdout == "Created web1: 64 MiB, 1 vCPU, driver sim\n"
    yield a, b


def target(b: DaemonProc) -> str:
    return f"{b.address}:{b.port}"


# --- migrate -------------------------------------------------------------------------------


def test_migrate_and_history(web1: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = web1
    proc = relocd(a, "migrate", "-l", "web1", target(b), "--verify")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith(f"Migrated web1 to {target(b)} (live) in ")
    assert "memory verified" in lines[-1] and "(target 20 ms)" in lines[-1]
    assert not any(line.startswith("[") for line in lines)  # no bare [reserve] lines
    assert names(b) == {"web1": "running"} and names(a) == {}

    needs_op(a, "history")
    hist = relocd(a, "history", "web1", "--json")
    assert hist.returncode == 0, hist.stderr
    (entry,) = json.loads(hist.stdout)
    assert entry["kind"] == "migrate" and entry["status"] == "completed" and entry["live"] is True
    table = relocd(a, "history").stdout.splitlines()
    assert table[0].split()[:3] == ["When", "Domain", "Kind"]
    assert "web1" in table[1] and target(b) in table[1] and "completed" in table[1]


def test_a_failed_migration_is_one_line_in_the_systems_words(
    web1: tuple[DaemonProc, DaemonProc]
) -> None:
    a, _ = web1
    refused = relocd(a, "migrate", "web1", "127.0.0.1:1")
    unknown = relocd(a, "migrate", "web1", "nosuch.invalid")
    for proc in (refused, unknown):
        assert proc.returncode == 1 and proc.stdout == ""
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("relocd: migration of web1 to ")
    assert names(a) == {"web1": "running"}
    words = (refused.stderr.lower(), unknown.stderr.lower())
    assert words[0].endswith("connection refused\n")
    assert words[1].endswith("name or service not known\n")
    assert "(" not in refused.stderr and "[errno" not in words[1]


def test_migrate_to_this_host_says_so(web1: tuple[DaemonProc, DaemonProc]) -> None:
    a, _ = web1
    for host in (a.address, f"{a.address}:{a.port}", "localhost"):
        proc = relocd(a, "migrate", "web1", host)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr == (f"relocd: {host.split(':')[0]} is this host (the local daemon "
                               f"listens on {a.address}:{a.port}): migrate to another host\n")
    assert names(a) == {"web1": "running"}


def test_save_and_restore_print_the_domain(web1: tuple[DaemonProc, DaemonProc], tmp_path: Path) -> None:
    a, _ = web1
    file = tmp_path / "web1.sav"
    saved = relocd(a, "save", "web1", str(file))
    assert (saved.returncode, saved.stdout) == (0, f"Saved web1 to {file}\n"), saved.stderr
    restored = relocd(a, "restore", str(file))
    assert (restored.returncode, restored.stdout) == (0, f"Restored web1 from {file}\n"), restored.stderr


# --- operators' control of a migration in flight ---------------------------------------------------


def test_abort_from_a_second_client(web1: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = web1
    needs_op(a, "abort")
    mig = background(a, "migrate", "-l", "web1", target(b), "--json", *SLOW)
    try:
        wait_until_moving(a, "web1")
        aborted = relocd(a, "abort", "web1")
        assert aborted.returncode == 0, aborted.stderr
        assert aborted.stdout == "Aborted the migration of web1: it stays on this host\n"
        out, err = mig.communicate(timeout=60)
    finally:
        mig.kill()
    assert mig.returncode == 1
    assert json.loads(out)["status"] == "cancelled"
    assert len(err.splitlines()) == 1 and "was cancelled" in err
    assert names(a) == {"web1": "running"} and settles(lambda: names(b) == {}), names(b)
    again = relocd(a, "abort", "web1")
    assert again.returncode == 1 and len(again.stderr.splitlines()) == 1


def test_job_and_migrate_set_from_a_second_client(web1: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = web1
    needs_op(a, "job")
    needs_op(a, "migrate_set")
    mig = background(a, "migrate", "-l", "web1", target(b), "--json", *SLOW)
    try:
        wait_until_moving(a, "web1")
        watcher = background(a, "job", "web1")
        time.sleep(1.0)
        changed = relocd(a, "migrate-set", "web1", "--max-bandwidth", "1GB/s", "--downtime-ms", "200")
        assert changed.returncode == 0, changed.stderr
        assert changed.stdout.startswith("web1: downtime target 200 ms, bandwidth cap ")
        watched, werr = watcher.communicate(timeout=60)
        out, _ = mig.communicate(timeout=60)
    finally:
        mig.kill()
    assert mig.returncode == 0 and json.loads(out)["status"] == "completed"
    assert watcher.returncode == 0, werr
    lines = watched.splitlines()
    assert lines[-1].startswith("Migrated web1 to ")
    assert any("%" in line for line in lines[:-1])  # the same progress as migrate's
    assert names(b) == {"web1": "running"}


def test_ctrl_c_without_a_terminal_aborts(web1: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = web1
    needs_op(a, "abort")
    mig = background(a, "migrate", "-l", "web1", target(b), *SLOW)
    try:
        wait_until_moving(a, "web1")
        mig.send_signal(signal.SIGINT)
        out, err = mig.communicate(timeout=60)
    finally:
        mig.kill()
    assert mig.returncode == 1
    assert err.splitlines()[0] == "relocd: aborting the migration of web1"
    assert "was cancelled" in err.splitlines()[-1] and "stays on this host" in err
    assert names(a) == {"web1": "running"} and settles(lambda: names(b) == {}), names(b)


def common_port(*addresses: str) -> int:
    """A port free on every one of ``addresses`` (evacuate gives all its targets one port)."""
    import socket

    for _ in range(50):
        port = free_port(addresses[0])
        try:
            for address in addresses[1:]:
                with socket.socket() as s:
                    s.bind((address, port))
        except OSError:
            continue
        return port
    raise AssertionError("no common free port")


def test_evacuate_to_two_targets_one_refusing(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    port = common_port("127.0.0.2", "127.0.0.3")
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2", port=port)
    c = DaemonProc(tmp_path, "hostC", "127.0.0.3", port=port, extra_config="(relocd-max-memory 16M)")
    daemons.extend([a, b, c])
    for d in (a, b, c):
        d.start()
    needs_op(a, "evacuate")
    for name in ("web1", "web2", "web3"):
        assert relocd(a, "create", name, "--memory", "32M").returncode == 0
    proc = relocd(a, "evacuate", "127.0.0.3", "127.0.0.2", "--parallel", "2", "-l", "-p", str(port),
                  timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "Evacuated 3 of 3 domains to 127.0.0.3, 127.0.0.2."
    assert sum(line.startswith("Migrated web") for line in lines) == 3
    assert names(a) == {} and set(names(b)) == {"web1", "web2", "web3"} and names(c) == {}
    as_json = relocd(a, "evacuate", "127.0.0.2", "-p", str(port), "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["moved"] == []


def test_completion_offers_the_daemons_domains(web1: tuple[DaemonProc, DaemonProc],
                                               tmp_path: Path) -> None:
    pytest.importorskip("argcomplete")
    a, _ = web1
    out = tmp_path / "offered"
    line = "relocd migrate w"
    env = dict(_env(), _ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
               _ARGCOMPLETE_IFS="\n", _ARGCOMPLETE_STDOUT_FILENAME=str(out),
               RELOCD_CONTROL=str(a.control))
    subprocess.run([sys.executable, "-m", "relocd"], env=env, capture_output=True, timeout=60,
                   stdin=subprocess.DEVNULL)
    assert [w.strip() for w in out.read_text().split("\n")] == ["web1"]  # a space: the word is whole


@pytest.mark.parametrize("action", ["abort", "stop"])
def test_migrate_timeout_both_ways(web1: tuple[DaemonProc, DaemonProc], action: str) -> None:
    a, b = web1
    proc = relocd(a, "migrate", "-l", "web1", target(b), "--timeout", "1",
                  "--timeout-action", action, "--max-bandwidth", "16MB/s")
    if action == "abort":
        assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc
        assert proc.stderr.startswith("relocd: migration of web1 to ")
        assert "stays on this host" in proc.stderr
        assert names(a) == {"web1": "running"} and settles(lambda: names(b) == {}), names(b)
    else:
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        (summary,) = [i for i, line in enumerate(lines) if line.startswith("Migrated web1 to ")]
        # stopping early overshoots the downtime target: the summary's last line says so
        assert all(line.startswith("warning: ") for line in lines[summary + 1:])
        assert names(b) == {"web1": "running"}

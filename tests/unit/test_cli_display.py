"""What `relocd` prints, without a daemon: the live display, summaries, tables, sizes and rates."""

from __future__ import annotations

import argparse
import io
import re
from collections.abc import Iterator
from typing import Any

import pytest

from relocd.cli import args as cli_args
from relocd.cli import build_parser, format_history_table
from relocd.cli.moving import own_listener
from relocd.progress import MigrationProgress, describe, describe_failure, summarize_migration
from relocd.units import format_duration, has_unit, parse_rate, parse_size

ROUND = {"phase": "precopy", "round": 1, "pages_left": 120_000, "dirty_rate": 10.24e6,
         "bandwidth": 1.2e9, "expected_downtime_ms": 3.0, "bytes_sent": 700 << 20,
         "round_bytes_sent": 700 << 20, "round_bytes_total": 2 << 30, "percent": 34.2,
         "eta_s": 4.4, "bytes_remaining": 1348 << 20, "bytes_total": 2 << 30}


def ticking(*times: float) -> Iterator[float]:
    yield from times


def clock(*times: float) -> Any:
    it = ticking(*times)
    return lambda: next(it)


# --- sizes and rates -----------------------------------------------------------------


@pytest.mark.parametrize("text,mib", [
    ("512", 512), ("512M", 512), ("512m", 512), ("2G", 2048), ("2g", 2048), ("1GiB", 1024),
    ("512MiB", 512), ("1T", 1 << 20), ("2048K", 2),
])
def test_memory_reads_as_xl_reads_it(text: str, mib: int) -> None:
    assert cli_args.memory_mib(text) == mib


@pytest.mark.parametrize("text,why", [
    ("1GB", "MB and GB are decimal"), ("0", "at least 1 MiB"), ("1.5K", "whole number"),
    ("lots", "not a size"), ("5Q", "unknown size unit"),
])
def test_memory_refusals_say_why(text: str, why: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        cli_args.memory_mib(text)


def test_size_units_one_rule() -> None:
    assert parse_size("16M") == 16 << 20 and parse_size("16MiB") == 16 << 20
    assert parse_size("16MB") == 16_000_000 and parse_size("1kB") == 1000
    assert parse_size("4096") == 4096 and parse_size("4", default_unit=1 << 20) == 4 << 20


@pytest.mark.parametrize("text,value", [
    ("100MB/s", 100_000_000), ("1GiB/s", 1 << 30), ("10Gbit/s", 1_250_000_000),
    ("100Mbps", 12_500_000), ("1GB/s", 10**9), ("100M/s", 100 << 20),
])
def test_rates(text: str, value: int) -> None:
    assert parse_rate(text) == value


def test_a_rate_must_say_its_unit() -> None:
    assert not has_unit("100") and not has_unit("100/s") and has_unit("100MB/s")
    with pytest.raises(argparse.ArgumentTypeError, match=r"say the unit of '100', e.g. 100MB/s"):
        cli_args.rate("100")
    assert cli_args.rate("500MB/s") == "500MB/s"


def test_durations() -> None:
    assert [format_duration(s) for s in (0.4, 42, 185, 3723)] == ["0 s", "42 s", "3:05", "1:02:03"]


# --- the live display -----------------------------------------------------------------


def test_describe_has_percent_eta_and_the_numbers() -> None:
    line = describe(ROUND)
    assert line.startswith("round 1 [precopy]: 34% of 2.0 GiB, ETA 4 s, 120,000 pages dirty")
    for part in ("dirtying 10.2 MB/s", "sending 1.2 GB/s", "700.0 MiB sent",
                 "1.3 GiB left", "expected downtime 3.0 ms"):
        assert part in line


def test_percent_from_round_bytes_when_the_daemon_gives_none() -> None:
    event = {"phase": "precopy", "round": 2, "round_bytes_sent": 1, "round_bytes_total": 4}
    assert describe(event) == "round 2 [precopy]: 25% of 4 B"


@pytest.mark.parametrize("width", [80, 60, 40, 24])
def test_describe_fits_the_width_keeping_what_matters(width: int) -> None:
    line = describe(ROUND, width)
    assert len(line) <= width
    if width >= 40:
        assert "34%" in line and "ETA 4 s" in line  # the last to go


def test_partial_events_are_merged_and_a_new_round_forgets_the_last() -> None:
    """As the daemon sends them: a phase change, then the byte counts of its round."""
    out = io.StringIO()
    display = MigrationProgress(out, tty=False, interval_s=0.0, clock=clock(*range(10)))
    display.update({"phase": "reserve", "domain": "w1"})
    display.update({"phase": "precopy", "round": 1, "pages_left": 32768, "domain": "w1"})
    display.update({"round": 1, "bytes_sent": 8 << 20, "round_bytes_sent": 8 << 20,
                    "round_bytes_total": 128 << 20, "percent": 6.2, "eta_s": 2.0, "domain": "w1"})
    display.update({"round": 1, "bytes_sent": 9 << 20, "bytes_remaining": 119 << 20,
                    "domain": "w1"})
    display.update({"phase": "stop-and-copy", "domain": "w1"})
    display.update({"round": 4, "bytes_sent": 200 << 20, "percent": 100.0, "domain": "w1"})
    display.update({"phase": "prepare", "domain": "w1"})
    lines = out.getvalue().splitlines()
    assert lines[0] == "round 1 [precopy]: 32,768 pages dirty"
    assert lines[1] == "round 1 [precopy]: 6% of 128.0 MiB, ETA 2 s, 32,768 pages dirty, 8.0 MiB sent"
    assert lines[2] == "round 1 [precopy]: 6% of 128.0 MiB, ETA 2 s, 9.0 MiB sent, 119.0 MiB left"
    assert lines[3] == "round 4 [stop-and-copy]: 100%, 200.0 MiB sent"
    assert len(lines) == 4  # the bare [reserve], [stop-and-copy] and [prepare] printed nothing
    tty = io.StringIO()
    display = MigrationProgress(tty, tty=True, interval_s=0.0, clock=clock(*range(10)),
                                width=lambda: 80)
    display.update({"phase": "precopy", "round": 4, "percent": 100.0, "bytes_sent": 200 << 20})
    display.update({"phase": "prepare"})
    assert tty.getvalue().split("\r")[-1] == "[prepare]: 200.0 MiB sent\x1b[K"


def test_describe_without_numbers() -> None:
    assert describe({}) == "working"
    assert describe({"phase": "handoff"}) == "[handoff]"
    assert describe({"phase": "reserve"}, label="web1") == "web1: [reserve]"


def test_tty_redraws_one_line_in_place_within_the_width() -> None:
    out = io.StringIO()
    display = MigrationProgress(out, tty=True, clock=clock(0.0, 0.05, 0.2, 0.3), width=lambda: 50)
    display.update({**ROUND, "round": 1})
    display.update({**ROUND, "round": 2})  # too soon: kept, not drawn
    display.update({**ROUND, "round": 3})
    display.finish()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "round 3" in text and "round 2" not in text
    for frame in text.strip("\n").split("\r")[1:]:
        assert len(frame.removesuffix("\x1b[K")) <= 49


def test_tty_finish_draws_the_last_event_not_yet_drawn() -> None:
    out = io.StringIO()
    display = MigrationProgress(out, tty=True, clock=clock(0.0, 0.01, 0.02), width=lambda: 80)
    display.update({**ROUND, "round": 1})
    display.update({**ROUND, "round": 7})
    display.finish()
    assert "round 7" in out.getvalue().split("\r")[-1]


def test_plain_output_no_bare_phase_lines_and_at_most_one_line_per_interval() -> None:
    out = io.StringIO()
    display = MigrationProgress(out, tty=False, clock=clock(0.0, 0.1, 1.0, 2.0, 3.5, 3.6, 9.0))
    display.update({"phase": "reserve"})  # no numbers: nothing
    display.update({**ROUND, "round": 1})  # the first with numbers: shown
    display.update({**ROUND, "round": 2})
    display.update({**ROUND, "round": 3})
    display.update({**ROUND, "round": 4})  # 3.4 s after the first: shown
    display.update({"phase": "stop-and-copy"})
    display.update({**ROUND, "round": 5, "phase": "stop-and-copy"})  # 9.0: shown
    display.finish()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "round 1 [precopy]", "round 4 [precopy]", "round 5 [stop-and-copy]"]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_evacuate_shows_one_line_per_domain() -> None:
    out = io.StringIO()
    display = MigrationProgress(out, tty=True, multi=True, interval_s=0.0, width=lambda: 80,
                                clock=clock(0.0, 1.0, 2.0, 3.0))
    display.update({**ROUND, "domain": "web1"})
    display.update({**ROUND, "domain": "db", "round": 2})
    display.update({**ROUND, "domain": "web1", "round": 3})
    display.finish()
    last = out.getvalue().split("\x1b[1A")[-1]  # the last redraw: up one line, both lines
    assert re.search(r"web1: round 3 \[precopy\]", last) and re.search(r"db: round 2", last)
    plain = io.StringIO()
    display = MigrationProgress(plain, tty=False, multi=True, clock=clock(0.0, 0.1, 0.2))
    display.update({**ROUND, "domain": "web1"})
    display.update({**ROUND, "domain": "db"})
    display.update({**ROUND, "domain": "web1"})  # web1 again within 3 s: not shown
    assert [line.split(":")[0] for line in plain.getvalue().splitlines()] == ["web1", "db"]


def test_suspend_leaves_the_line_for_a_question_and_resume_redraws() -> None:
    out = io.StringIO()
    display = MigrationProgress(out, tty=True, interval_s=0.0, width=lambda: 80,
                                clock=clock(*[float(i) for i in range(10)]))
    display.update({**ROUND, "round": 1})
    display.suspend()
    assert out.getvalue().endswith("\n")
    display.update({**ROUND, "round": 2})  # while asking: not drawn
    assert "round 2" not in out.getvalue()
    display.resume()
    assert "round 2" in out.getvalue()


# --- after the migration -------------------------------------------------------------------


def result(**extra: Any) -> dict[str, Any]:
    base = {"status": "completed", "domain": "web1", "live": True, "iterations": 4,
            "pages_sent": 140_000, "bytes_sent": 573_440_000, "total_ms": 1530.5,
            "downtime_ms": 12.25, "verified": True, "error": None}
    return {**base, **extra}


def test_summary_shows_the_downtime_target_and_its_warning() -> None:
    text = summarize_migration(result(downtime_target_ms=300, stop_reason="dirty pages below 50",
                                      downtime_warning="predicted downtime 900 ms, 3x the target"),
                               "hostb")
    first, second = text.splitlines()
    assert first.startswith("Migrated web1 to hostb (live) in 1.53 s: 4 rounds, 140,000 pages sent")
    assert "downtime 12.2 ms (target 300 ms), memory verified." in first
    assert first.endswith("Precopy stopped: dirty pages below 50.")
    assert second == "warning: predicted downtime 900 ms, 3x the target"


@pytest.mark.parametrize("status,error,expected", [
    ("failed", "cannot connect to hostb port 8002: connection refused",
     "migration of web1 to hostb failed: cannot connect to hostb port 8002: connection refused"),
    ("rolled-back", "peer vanished",
     "migration of web1 to hostb rolled back after 1.53 s: peer vanished; web1 stays on this host"),
    ("cancelled", None, "migration of web1 to hostb was cancelled after 1.53 s; "
                        "web1 stays on this host"),
])
def test_failure_is_one_line(status: str, error: str | None, expected: str) -> None:
    assert describe_failure(result(status=status, error=error), "hostb") == expected


# --- tables ---------------------------------------------------------------------------------


HISTORY = [
    {"migration_id": "1", "kind": "migrate", "domain": "web1", "peer": "hostb:8002", "live": True,
     "status": "completed", "started_at": 1_700_000_000.0, "finished_at": 1_700_000_002.0,
     "iterations": 4, "bytes_sent": 573_440_000, "downtime_ms": 12.25,
     "stop_reason": "dirty pages below 50", "error": None},
    {"migration_id": "2", "kind": "save", "domain": "db", "peer": "/var/save/db.sav", "live": False,
     "status": "failed", "started_at": "2023-11-15T00:00:00+00:00", "finished_at": None,
     "iterations": 1, "bytes_sent": 0, "downtime_ms": None, "stop_reason": None,
     "error": "no space left on device"},
]


def test_history_table_newest_first() -> None:
    lines = format_history_table(HISTORY).splitlines()
    assert lines[0].split() == ["When", "Domain", "Kind", "Peer", "Live", "Status", "Rounds",
                                "Bytes", "Downtime", "Stop", "reason", "Error"]
    assert "db" in lines[1] and "save" in lines[1] and lines[1].endswith("no space left on device")
    assert "web1" in lines[2] and "546.9 MiB" in lines[2] and "12.2 ms" in lines[2]
    assert "dirty pages below 50" in lines[2] and " yes " in lines[2]
    table = format_history_table(HISTORY, show_domain=False, width=60)
    assert "Domain" not in table and all(len(line) <= 60 for line in table.splitlines())


# --- migrating to this host ---------------------------------------------------------------


@pytest.mark.parametrize("addresses,port,listen,hit", [
    ({"127.0.0.1"}, None, ["127.0.0.1:8002"], "127.0.0.1:8002"),
    ({"127.0.0.1"}, 8002, ["127.0.0.1:8002"], "127.0.0.1:8002"),
    ({"127.0.0.1"}, 9002, ["127.0.0.1:8002"], None),  # another daemon on another port
    ({"127.0.0.2"}, None, ["127.0.0.1:8002"], None),
    ({"127.0.0.2"}, None, ["[::]:8002"], "[::]:8002"),  # all interfaces: loopback reaches it
    ({"::1"}, None, ["0.0.0.0:8002"], "0.0.0.0:8002"),
    ({"10.0.0.2"}, None, ["[::]:8002"], None),  # the daemon's to know
    ({"fd00::1"}, None, ["[fd00::1]:8003"], "[fd00::1]:8003"),
])
def test_own_listener(addresses: set[str], port: int | None, listen: list[str],
                      hit: str | None) -> None:
    assert own_listener(addresses, port, listen) == hit


# --- help ----------------------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_commands_help_has_an_example_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    for name, sub in subcommands().items():
        text = sub.format_help()
        assert "example:\n  " in text and "relocd " in text.split("example:")[1], name
    help_of = {name: " ".join(sub.format_help().split()) for name, sub in subcommands().items()}
    assert "--vcpus N virtual CPUs (default: 1)" in help_of["create"]
    assert "--parallel N migrations at a time (default: 1)" in help_of["evacuate"]
    assert "-l, --live" in help_of["migrate"] and "-p N, --port N" in help_of["migrate"]
    assert "--ssl, --no-ssl" in help_of["migrate"] and "--ssl, --no-ssl" in help_of["evacuate"]
    assert "MB/s and GB/s are decimal" in help_of["migrate"]
    assert "a number is MiB" in help_of["create"]


def test_short_forms_and_no_ssl() -> None:
    ns = build_parser().parse_args(["migrate", "-l", "-p", "9002", "--no-ssl", "web1", "hostb"])
    assert (ns.live, ns.port, ns.ssl) == (True, 9002, False)
    assert build_parser().parse_args(["save", "-c", "web1", "f"]).checkpoint is True
    ns = build_parser().parse_args(["watch", "web1"])
    assert ns.command == "job"


def test_auto_converge_shows_in_the_line_and_the_summary() -> None:
    line = describe({"phase": "precopy", "round": 5, "pages_left": 900, "throttle_pct": 45.0})
    assert line == "round 5 [precopy]: 900 pages dirty, guest throttled 45%"
    assert "throttled" not in describe({"phase": "precopy", "round": 2, "pages_left": 9, "throttle_pct": 0.0})
    text = summarize_migration(result(stop_reason="downtime", throttle_pct=60.0), "hostb")
    assert text.endswith("Precopy stopped: downtime. Auto-converge throttled the guest to 40% of its speed.")

"""relocd.logs: journald priorities (sd-daemon(3) <N> prefixes), levels, set_level."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from relocd.logs import configure_logging, is_journal_stream, set_level, syslog_priority


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == "relocd":
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def emit_each_level() -> None:
    log = structlog.get_logger("relocd.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    logging.getLogger("some.library").critical("c")


def test_priorities_of_sd_daemon() -> None:
    assert [syslog_priority(n) for n in (5, 10, 20, 25, 30, 40, 50, 60)] == [7, 7, 6, 6, 4, 3, 2, 2]


def test_journal_lines_start_with_their_priority() -> None:
    buf = io.StringIO()
    configure_logging("json", "debug", stream=buf, journal=True)
    emit_each_level()
    lines = buf.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["d", "i", "w", "e", "c"]


def test_no_prefix_outside_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # someone else's stream
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    emit_each_level()
    assert all(line.startswith("{") for line in buf.getvalue().splitlines())


def test_every_line_of_a_console_traceback_is_prefixed() -> None:
    buf = io.StringIO()
    configure_logging("console", "info", stream=buf, journal=True)
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        structlog.get_logger("relocd.test").exception("crashed")
    lines = buf.getvalue().splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines
    assert any("ZeroDivisionError" in line for line in lines)


def test_journal_stream_is_recognised_by_device_and_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream, (tmp_path / "other").open("w") as other:
        st = path.stat()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert is_journal_stream(stream)
        assert not is_journal_stream(other)  # stderr redirected away from the journal
        assert not is_journal_stream(io.StringIO())
        configure_logging("json", "info", stream=stream)
        structlog.get_logger("relocd.test").warning("to the journal")
    assert path.read_text().startswith('<4>{"event": "to the journal"')
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    with path.open("a") as stream:
        assert not is_journal_stream(stream)
    monkeypatch.delenv("JOURNAL_STREAM")
    with path.open("a") as stream:
        assert not is_journal_stream(stream)


def test_set_level_changes_what_is_written() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    emit_each_level()
    assert [json.loads(x)["event"] for x in buf.getvalue().splitlines()] == ["i", "w", "e", "c"]
    set_level("error")
    buf.seek(0)
    buf.truncate()
    emit_each_level()
    assert [json.loads(x)["event"] for x in buf.getvalue().splitlines()] == ["e", "c"]
    set_level("debug")
    assert logging.getLogger("asyncio").level == logging.WARNING  # its chatter stays out
    with pytest.raises(ValueError, match="log level must be one of"):
        set_level("chatty")
    with pytest.raises(ValueError):
        set_level("")

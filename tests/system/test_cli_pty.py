"""`relocd migrate` in a real pseudo-terminal, 80 columns wide, between two real daemons.

The live display must fit the terminal (every redraw at most 79 columns) and
update within a round (round 1 of a guest sent under a bandwidth cap shows
several percentages, not one line at its end). Ctrl-C there asks before it
aborts, as `virsh migrate` does.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.harness import DaemonProc

REPO = Path(__file__).resolve().parents[2]
COLUMNS = 80
_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    a = DaemonProc(tmp_path, "hostA", "127.0.0.1")
    b = DaemonProc(tmp_path, "hostB", "127.0.0.2")
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.cleanup()
        b.cleanup()


class Terminal:
    """A command on a pseudo-terminal of COLUMNS x 24."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TERM="xterm")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.text = ""

    def read_until(self, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} in {self.text[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the command ended
                    chunk = b""
                if not chunk:
                    if self.proc.poll() is not None:
                        raise AssertionError(f"ended without {pattern!r}: {self.text[-2000:]!r}")
                    time.sleep(0.05)
                self.text += chunk.decode(errors="replace")
        return self.text

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        os.close(self.master)


def relocd_argv(d: DaemonProc, *args: str) -> list[str]:
    return [sys.executable, "-m", "relocd", *args, "--control", str(d.control)]


def frames(text: str) -> list[str]:
    """The live display's redraws (the text between carriage returns), escapes removed."""
    live = text.split("Migrated ")[0]
    out = []
    for piece in live.split("\r"):
        shown = _ESCAPE.sub("", piece).strip("\n")
        if shown:
            out.append(shown)
    return out


def create(d: DaemonProc, name: str) -> None:
    made = subprocess.run(relocd_argv(d, "create", name, "--memory", "96M", "--workload",
                                      "uniform:rate=4MB/s"), capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert made.returncode == 0, made.stderr


def test_live_display_fits_80_columns_and_updates_within_a_round(
    pair: tuple[DaemonProc, DaemonProc]
) -> None:
    a, b = pair
    create(a, "web1")
    term = Terminal(relocd_argv(a, "migrate", "-l", "web1", f"{b.address}:{b.port}",
                                "--max-bandwidth", "24MB/s"))
    try:
        text = term.read_until(r"Migrated web1 to .*\n", timeout=120)
        assert term.proc.wait(30) == 0
    finally:
        term.close()
    shown = frames(text)
    assert shown, text
    too_wide = [f for f in shown if len(f) > COLUMNS - 1]
    assert not too_wide, too_wide
    round1 = [f for f in shown if f.startswith("round 1 ")]
    percents = {m.group(1) for f in round1 if (m := re.search(r": (\d+)%", f))}
    assert len(percents) >= 3, round1  # round 1 moved on screen, not only at its end
    assert "ETA" in " ".join(round1)
    assert any(f.startswith("round 2 ") for f in shown)
    assert "\r\n" in text.split("Migrated ")[0][-40:]  # the summary starts on a fresh line


def test_ctrl_c_asks_and_yes_aborts(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    create(a, "web1")
    term = Terminal(relocd_argv(a, "migrate", "-l", "web1", f"{b.address}:{b.port}",
                                "--max-bandwidth", "8MB/s"))
    try:
        term.read_until(r"round 1 \[precopy\]: \d+%")
        term.proc.send_signal(signal.SIGINT)
        term.read_until(r"abort the migration of web1\? \[y/N\] ")
        term.type("y\n")
        text = term.read_until(r"stays on this host")
        code = term.proc.wait(60)
    finally:
        term.close()
    if "unknown operation 'abort'" in text:
        pytest.skip("the daemon has no op 'abort' yet")
    assert code == 1
    assert "relocd: aborting the migration of web1" in text
    assert "relocd: migration of web1 to" in text and "was cancelled" in text
    listed = subprocess.run(relocd_argv(a, "list"), capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO))).stdout
    assert re.search(r"^web1 .* running", listed, re.M), listed

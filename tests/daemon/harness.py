"""Real relocd daemons in subprocesses, on loopback addresses, for tests and demos."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relocd.server.control import call


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def kill_processes_mentioning(marker: str) -> int:
    """Kill every process whose command line mentions marker (domain processes of a test)."""
    killed = 0
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


class DaemonProc:
    """One `relocd serve` process with its own config, state dir and control socket."""

    def __init__(
        self,
        root: Path,
        name: str,
        address: str,
        port: int | None = None,
        extra_config: str = "",
        *,
        argv_prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.port = port or free_port(address)
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.control = self.dir / "control.sock"
        self.state_dir = self.dir / "state"
        self.config = self.dir / "relocd-config.sxp"
        self.log = self.dir / "daemon.log"
        #: run the daemon under this (e.g. ``ip netns exec NS``) and with these extra variables
        self.argv_prefix = list(argv_prefix)
        self.env = dict(env or {})
        # extra_config comes first: the first occurrence of an option wins, so
        # a test's options override the harness's defaults below.
        self.config.write_text(
            f"""# test daemon {name}
{extra_config}
(xend-relocation-server yes)
(xend-relocation-address '{address}')
(xend-relocation-port {self.port})
(relocd-control-socket {self.control})
(relocd-state-dir {self.state_dir})
(relocd-handshake-timeout 5)
(relocd-idle-timeout 10)
(relocd-log-format json)
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [*self.argv_prefix, sys.executable, "-m", "relocd", "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited at startup:\n{self.log.read_text()[-3000:]}")
            if self._ping():
                return
            time.sleep(0.1)
        raise RuntimeError(f"daemon {self.name} did not start:\n{self.log.read_text()[-3000:]}")

    def _ping(self) -> bool:
        """A blocking status request (works inside and outside an event loop)."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(self.control))
                s.sendall(json.dumps({"op": "status", "args": {}}).encode() + b"\n")
                reply = s.makefile().readline()
            return bool(json.loads(reply).get("ok"))
        except (OSError, ValueError):
            return False

    async def call(self, op: str, **args: Any) -> Any:
        return await call(self.control, op, args)

    def call_sync(self, op: str, **args: Any) -> Any:
        return asyncio.run(self.call(op, **args))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        """Stop the daemon and every domain process it started."""
        self.kill()
        kill_processes_mentioning(str(self.state_dir))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

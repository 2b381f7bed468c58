"""Real etcd servers (Debian's etcd-server) on loopback, for the cluster-store tests.

Each member is a process this module started, stopped by its PID; its data
directory lives under the test's temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def etcd_missing() -> str | None:
    if shutil.which("etcd") is None:
        return "needs etcd (Debian: apt-get install etcd-server)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdCluster:
    def __init__(self, root: Path, members: int = 3) -> None:
        self.root = root
        self.names = [f"e{i}" for i in range(members)]
        self.client = {n: _free_port() for n in self.names}
        self.peer = {n: _free_port() for n in self.names}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"127.0.0.1:{self.client[n]}" for n in self.names)

    def start(self, names: list[str] | None = None, timeout: float = 30.0) -> None:
        """Start these members (all by default) together: a lone member of a dead cluster has no quorum."""
        names = self.names if names is None else names
        initial = ",".join(f"{n}=http://127.0.0.1:{self.peer[n]}" for n in self.names)
        for n in names:
            data = self.root / n
            state = "existing" if data.exists() else "new"
            log = open(self.root / f"{n}.log", "ab")
            self.procs[n] = subprocess.Popen(
                ["etcd", "--name", n, "--data-dir", str(data),
                 "--listen-client-urls", f"http://127.0.0.1:{self.client[n]}",
                 "--advertise-client-urls", f"http://127.0.0.1:{self.client[n]}",
                 "--listen-peer-urls", f"http://127.0.0.1:{self.peer[n]}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer[n]}",
                 "--initial-cluster", initial, "--initial-cluster-state", state,
                 "--initial-cluster-token", f"relocd-{os.getpid()}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            log.close()
        deadline = time.monotonic() + timeout
        for n in names:
            while not self.healthy(n):
                if time.monotonic() > deadline or self.procs[n].poll() is not None:
                    raise RuntimeError(f"etcd {n} did not start:\n{(self.root / f'{n}.log').read_text()[-2000:]}")
                time.sleep(0.2)

    def healthy(self, name: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.client[name]}/health", timeout=1) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for n in list(self.procs):
            self.kill(n)

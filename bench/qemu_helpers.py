"""QEMU's own migration, driven over QMP, as a yardstick for bench_vs_qemu.py.

Two ``qemu-system-x86_64`` processes on loopback: a source whose guest RAM is
a file of random bytes (``memory-backend-file``, ``share=on``), paused from
the start (``-S``, never run, no disk, no devices), and a target started with
``-incoming defer`` and fresh anonymous RAM (``memory-backend-ram``).  Both
are TCG (``-accel tcg``): no KVM is needed, and a paused guest never executes
an instruction, so the accelerator does not matter for what is measured.

The QMP client is a few lines of blocking JSON over a unix socket; it skips
asynchronous events and raises on an ``error`` reply.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"
#: bytes/s; QEMU 7.2's default max-bandwidth is 128 MiB/s, which would make
#: the comparison one against a rate limit (libvirt lifts it the same way)
UNLIMITED_BANDWIDTH = 1 << 40
POLL_S = 0.005


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], check=False, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def random_file(path: Path, nbytes: int, chunk: int = 4 << 20) -> float:
    """Write ``nbytes`` of random bytes to ``path`` (the source guest's RAM); seconds taken."""
    rand: Callable[[int], bytes]
    try:
        import numpy as np

        rand = np.random.default_rng().bytes  # far faster than os.urandom here; random enough for no page to be zero
    except ImportError:
        rand = os.urandom
    t0 = time.monotonic()
    with open(path, "wb") as f:
        for off in range(0, nbytes, chunk):
            f.write(rand(min(chunk, nbytes - off)))
    return time.monotonic() - t0


class QMPError(RuntimeError):
    pass


class QMP:
    """A blocking QMP client on a unix socket."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rwb", buffering=0)
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise QMPError("QMP connection closed")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def cmd(self, name: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise QMPError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


class QemuVM:
    """One QEMU process (source or target of a migration) and its QMP connection."""

    def __init__(self, binary: str, workdir: Path, name: str, memory_mib: int, *,
                 ram_file: Path | None = None, incoming: bool = False) -> None:
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"
        self.log_path = workdir / f"{name}.log"
        if ram_file is not None:
            backend = f"memory-backend-file,id=mem,size={memory_mib}M,mem-path={ram_file},share=on"
        else:
            backend = f"memory-backend-ram,id=mem,size={memory_mib}M"
        argv = [
            binary, "-accel", "tcg", "-S", "-nodefaults", "-display", "none", "-no-user-config",
            "-m", f"{memory_mib}M", "-object", backend, "-machine", "pc,memory-backend=mem",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if incoming:
            argv += ["-incoming", "defer"]
        with contextlib.suppress(FileNotFoundError):
            self.qmp_path.unlink()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            self.qmp = self._connect()
        except Exception:
            self.kill()
            raise

    def _connect(self, timeout: float = 30.0) -> QMP:
        deadline = time.monotonic() + timeout
        while not self.qmp_path.exists():
            if self.proc.poll() is not None:
                raise QMPError(f"{self.name}: qemu exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise QMPError(f"{self.name}: no QMP socket after {timeout:.0f}s")
            time.sleep(0.02)
        return QMP(self.qmp_path, timeout)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def quit(self) -> None:
        try:
            self.qmp.cmd("quit")
        except (OSError, QMPError, AttributeError):
            pass
        if hasattr(self, "qmp"):
            self.qmp.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def qemu_migration(binary: str, workdir: Path, memory_mib: int, ram_file: Path, port: int,
                   *, multifd_channels: int = 0, timeout: float = 300.0) -> dict[str, Any]:
    """One migration between a fresh source and a fresh target; what it took.

    ``wall_s`` runs from the ``migrate`` command to the source's
    ``query-migrate`` saying ``completed`` (polled every 5 ms; the target is
    not polled meanwhile, since its incoming side runs in its main loop);
    ``target_done_s`` is when the target's own ``query-migrate`` said
    ``completed`` as well.  ``cpu_s`` is both processes' utime + stime over
    the same span (until the target completed).
    """
    src = QemuVM(binary, workdir, "qemu-src", memory_mib, ram_file=ram_file)
    try:
        dst = QemuVM(binary, workdir, "qemu-dst", memory_mib, incoming=True)
    except Exception:
        src.kill()
        raise
    try:
        caps = [{"capability": "multifd", "state": bool(multifd_channels)}]
        params: dict[str, Any] = {"max-bandwidth": UNLIMITED_BANDWIDTH}
        if multifd_channels:
            params["multifd-channels"] = multifd_channels
        for vm in (dst, src):
            vm.qmp.cmd("migrate-set-capabilities", capabilities=caps)
            vm.qmp.cmd("migrate-set-parameters", **params)
        uri = f"tcp:127.0.0.1:{port}"
        dst.qmp.cmd("migrate-incoming", uri=uri)
        cpu0 = cpu_seconds(src.pid) + cpu_seconds(dst.pid)
        t0 = time.monotonic()
        src.qmp.cmd("migrate", uri=uri)
        deadline = t0 + timeout
        while True:
            info = src.qmp.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                wall = time.monotonic() - t0
                break
            if status in ("failed", "cancelled"):
                raise QMPError(f"qemu migration {status}: {info.get('error-desc', info)}")
            if time.monotonic() > deadline:
                raise QMPError(f"qemu migration still {status} after {timeout:.0f}s")
            time.sleep(POLL_S)
        while True:
            dinfo = dst.qmp.cmd("query-migrate")
            if dinfo.get("status") == "completed":
                target_done = time.monotonic() - t0
                break
            if dinfo.get("status") in ("failed", "cancelled"):
                raise QMPError(f"qemu target migration {dinfo.get('status')}: {dinfo}")
            if time.monotonic() > deadline:
                raise QMPError(f"qemu target still {dinfo.get('status')} after {timeout:.0f}s")
            time.sleep(POLL_S)
        cpu = cpu_seconds(src.pid) + cpu_seconds(dst.pid) - cpu0
        run_state = dst.qmp.cmd("query-status")
        src_state = src.qmp.cmd("query-status")
        if run_state.get("running"):
            raise QMPError(f"target is running after migrating a paused guest: {run_state}")
        ram = info.get("ram", {})
        return {
            "wall_s": wall,
            "target_done_s": target_done,
            "total_time_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"),
            "setup_time_ms": info.get("setup-time"),
            "ram_transferred": ram.get("transferred"),
            "ram_normal_pages": ram.get("normal"),
            "ram_duplicate_pages": ram.get("duplicate"),
            "mbps": ram.get("mbps"),
            "cpu_s": cpu,
            "target_state": run_state.get("status"),
            "source_state": src_state.get("status"),
            "multifd_channels": multifd_channels,
        }
    finally:
        src.quit()
        dst.quit()

"""The nested Xen lab, host side: build the image, boot Xen under QEMU, drive dom0.

Xen 4.17 (Debian's hypervisor package) boots under QEMU as a multiboot kernel
with Debian's kernel as a PV dom0; its first serial port is QEMU's stdio, and
dom0's console (hvc0) reaches it through Xen.  dom0 runs a plain shell on that
console (``dom0-init.sh``), which ``XenLab.run`` drives by writing a command
and reading up to a marker that carries the exit status.

A second, read-only virtio disk (the payload) is made afresh for every boot
from the working tree: relocd's package and this directory's dom0 scripts, so
editing relocd needs no image rebuild.

    python tests/xenlab/lab.py run 'xl info' 'xl list'     # boot, run, power off
    python tests/xenlab/lab.py shell                       # commands from stdin
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

#: Xen's own command line: console on the first serial port, a fixed-size dom0.
XEN_ARGS = "cet=0 console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2 loglvl=warning guest_loglvl=warning"
#: dom0's command line (no commas: QEMU's multiboot -initrd splits on them).
DOM0_ARGS = "console=hvc0 earlyprintk=xen root=/dev/vda rw rootfstype=ext4 init=/sbin/xenlab-boot loglevel=3"

#: The CPU QEMU's TCG emulates for Xen: AMD's SVM with nested paging, so Xen
#: offers HVM and PVH guests (``virt_caps: pv hvm hap shadow``).  The Intel
#: model used before (``Haswell-noTSX``) has no VMX under TCG: PV only.
#: ``-monitor`` keeps Xen off MONITOR/MWAIT (``-cpu EPYC`` panics Xen in
#: mwait_idle); the SSE bits are what Debian's userland expects of x86-64.
#: ``RELOCD_XENLAB_CPU`` overrides it (a comparison run on another model).
TCG_CPU = "qemu64,+svm,+npt,-monitor,+ssse3,+sse4.1,+sse4.2,+popcnt"
#: the model the two-host lab (PV only) was proven on
PV_TCG_CPU = "Haswell-noTSX"

#: Console output after which nothing useful follows.
FATAL = re.compile(rb"KVM internal error|Panic on CPU \d+|Kernel panic - not syncing")


class LabUnavailable(Exception):
    """The lab cannot run on this host (missing tools or packages); the reason is the message."""


class LabBuildFailed(Exception):
    """The image build failed with every prerequisite there: a failure to report, never a skip."""


class LabCommandFailed(Exception):
    """A dom0 command exited non-zero."""


def missing_tools() -> list[str]:
    tools = ["qemu-system-x86_64", "debootstrap", "mkfs.ext4", "cpio", "gzip"]
    missing = [t for t in tools if shutil.which(t) is None]
    if not Path("/bin/busybox").exists():
        missing.append("busybox-static")
    # build-image.sh fetches relocd's wheels with the host's `python3 -m pip`.
    if shutil.which("python3") is None:
        missing.append("python3")
    elif subprocess.run(["python3", "-m", "pip", "--version"], capture_output=True, check=False).returncode:
        missing.append("python3-pip")
    return missing


#: Where build-image.sh fetches from (keep in step with it): Debian's mirror and suite, pip's index.
DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_PACKAGE_INDEX = "https://pypi.org/simple"
#: How much of a failed build's output the failure shows.
BUILD_TAIL_LINES = 30


def _reachable(url: str, timeout: float = 15.0) -> str | None:
    """None if ``url`` answers a HEAD request, else why not (one line)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {getattr(exc, 'reason', exc)}"


def sources_problem() -> str | None:
    """Why the build cannot fetch what it needs (the Debian mirror, pip's index), or None."""
    mirror = os.environ.get("RELOCD_XENLAB_MIRROR", DEFAULT_MIRROR).rstrip("/")
    problem = _reachable(f"{mirror}/dists/{DEBIAN_SUITE}/Release")
    if problem:
        return f"Debian mirror unreachable: {problem}"
    index = os.environ.get("PIP_INDEX_URL", DEFAULT_PACKAGE_INDEX).rstrip("/")
    problem = _reachable(f"{index}/structlog/")  # one of the wheels build-image.sh installs
    if problem:
        return f"Python package index unreachable: {problem}"
    return None


def build_outcome(
    returncode: int | None, stdout: str, stderr: str, sources: Callable[[], str | None] = sources_problem
) -> Path:
    """The image directory build-image.sh reported, or the exception that says why there is none.

    LabUnavailable (a skip) only for a missing prerequisite: the script's exit
    status 3 (a tool or root), or a source the build fetches from that does not
    answer (asked only once the build has failed).  Any other failure, a
    timeout (``returncode`` None) included, is LabBuildFailed with the build's
    last lines.
    """
    lines = stdout.strip().splitlines()
    if returncode == 0 and lines:
        return Path(lines[-1])
    if returncode == 3:
        raise LabUnavailable(stderr.strip() or "build-image.sh: prerequisites missing")
    problem = sources()
    if problem:
        raise LabUnavailable(problem)
    what = "timed out" if returncode is None else f"exited {returncode}"
    if returncode == 0:
        what = "exited 0 without naming the image directory"
    tail = (stderr.strip() or stdout.strip() or "(no output)").splitlines()[-BUILD_TAIL_LINES:]
    raise LabBuildFailed(f"build-image.sh {what}; its last output:\n" + "\n".join(tail))


def build_image(timeout: float = 1800.0) -> Path:
    """The cached image directory, built first if needed (see build-image.sh)."""
    missing = missing_tools()
    if missing:
        raise LabUnavailable(f"missing on this host: {', '.join(missing)}")
    if os.geteuid() != 0:
        raise LabUnavailable("building the Xen lab image needs root")
    try:
        proc = subprocess.run(
            [str(HERE / "build-image.sh")], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        return build_outcome(None, _text(exc.stdout), _text(exc.stderr))
    return build_outcome(proc.returncode, proc.stdout, proc.stderr)


def _text(output: bytes | str | None) -> str:
    """What a timed-out subprocess.run had captured (bytes even with text=True)."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def image_or_skip() -> Path:
    """For the lab's pytest fixtures: the cached image; a skip only for a missing prerequisite.

    A build that fails where the tools, root and the sources are all there is
    a failure, with the build's last lines: as a skip it would hide a broken
    build-image.sh behind "lab unavailable".
    """
    import pytest

    if os.environ.get("RELOCD_XENLAB", "1") == "0":
        pytest.skip("RELOCD_XENLAB=0")
    try:
        return build_image()
    except LabUnavailable as exc:
        pytest.skip(f"Xen lab unavailable: {exc}")
    except LabBuildFailed as exc:
        pytest.fail(f"Xen lab image build failed: {exc}", pytrace=False)


def build_payload(dest: Path, host_env: dict[str, str] | None = None) -> Path:
    """An ext4 image with relocd's package and the dom0 scripts, from the working tree.

    ``host_env`` becomes ``/lab/host.env``, which dom0-init.sh reads: the
    dom0's name (``LAB_HOSTNAME``) and its address on the lab network
    (``LAB_ADDRESS``, CIDR).
    """
    stage = dest / "payload"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "relocd", stage / "relocd", ignore=ignore)
    shutil.copytree(HERE, stage / "xenlab", ignore=ignore)
    if host_env:
        (stage / "host.env").write_text("".join(f"{k}='{v}'\n" for k, v in host_env.items()))
    image = dest / "payload.img"
    image.unlink(missing_ok=True)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "xenlab-payload", "-d", str(stage), str(image), "64M"],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(stage)
    return image


def free_tcp_port() -> int:
    """A loopback TCP port nobody holds now (for QEMU's socket network)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tcp_link() -> tuple[str, str, int]:
    """The netdev options of two labs joined by one virtual Ethernet wire, and its port.

    QEMU's ``-netdev socket`` over a TCP stream: the first lab listens, the
    second connects (start it once ``wait_listening(port)`` returns).  A
    stream loses no frame when a busy QEMU reads late, where the UDP form
    drops whatever overflows its socket buffer and the guests' TCP backs off.
    """
    port = free_tcp_port()
    return f"listen=127.0.0.1:{port}", f"connect=127.0.0.1:{port}", port


def wait_listening(port: int, timeout: float = 30.0) -> None:
    """Until something listens on loopback TCP ``port`` (read from /proc: a probe connect would take the line)."""
    want = f"0100007F:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1] == want and fields[3] == "0A":  # 0A: LISTEN
                    return
        time.sleep(0.1)
    raise LabUnavailable(f"QEMU did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def pick_accel() -> str:
    """TCG unless RELOCD_XENLAB_ACCEL=kvm.

    Under this machine's (itself nested) KVM, Xen 4.17 dies before its first
    console line: KVM fails to emulate a CET instruction (``rdsspq``, a NOP
    without CET) early in Xen's boot, whatever Xen's ``cet=`` option says.
    """
    return "kvm" if os.environ.get("RELOCD_XENLAB_ACCEL") == "kvm" else "tcg"


class XenLab:
    """One booted lab: QEMU running Xen, dom0 waiting on its console."""

    def __init__(
        self,
        image: Path,
        workdir: Path,
        *,
        accel: str | None = None,
        memory_mib: int = 3072,
        xen_args: str = XEN_ARGS,
        net: str | None = None,
        mac: str = "52:54:00:12:34:56",
        host_env: dict[str, str] | None = None,
        cpu: str | None = None,
    ) -> None:
        """``net``: options of a ``-netdev socket`` (see ``udp_link``); None: no NIC.

        ``cpu``: the TCG CPU model (default ``TCG_CPU``, or ``RELOCD_XENLAB_CPU``).
        """
        self.image = image
        self.net = net
        self.mac = mac
        self.host_env = host_env
        self.xen_args = xen_args
        self.workdir = workdir
        self.accel = accel or pick_accel()
        self.memory_mib = memory_mib
        self.log_path = workdir / "serial.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = bytearray()
        self._cursor = 0
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._token = 0
        self._t0 = 0.0
        self.cpu = cpu
        self.boot_s = 0.0

    # -- life ----------------------------------------------------------------

    def qemu_argv(self, payload: Path) -> list[str]:
        cpu = "host" if self.accel == "kvm" else (self.cpu or os.environ.get("RELOCD_XENLAB_CPU", TCG_CPU))
        return [
            "qemu-system-x86_64",
            "-accel", self.accel, "-cpu", cpu, "-smp", "2", "-m", str(self.memory_mib),
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(self.image / "xen"), "-append", self.xen_args,
            "-initrd", f"{self.image / 'vmlinuz'} {DOM0_ARGS},{self.image / 'initrd.img'}",
            "-drive", f"file={self.image / 'root.img'},if=virtio,format=raw,snapshot=on",
            "-drive", f"file={payload},if=virtio,format=raw,readonly=on",
        ] + self.nic_argv()  # fmt: skip

    def nic_argv(self) -> list[str]:
        if self.net is None:
            return ["-nic", "none"]
        return ["-netdev", f"socket,id=lab0,{self.net}", "-device", f"virtio-net-pci,netdev=lab0,mac={self.mac}"]

    def start(self, boot_timeout: float = 600.0) -> None:
        self.launch()
        self.wait_ready(boot_timeout)

    def launch(self) -> None:
        """Start QEMU and return at once (``wait_ready`` waits for dom0): labs boot side by side."""
        payload = build_payload(self.workdir, self.host_env)
        self._t0 = time.monotonic()
        self._proc = subprocess.Popen(
            self.qemu_argv(payload), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, name="xenlab-serial", daemon=True)
        self._reader.start()

    def wait_ready(self, boot_timeout: float = 600.0) -> None:
        self.expect(rb"XENLAB-READY", boot_timeout)
        self.boot_s = time.monotonic() - self._t0

    def close(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self.send("echo o >/proc/sysrq-trigger\n")
                proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- the serial line -----------------------------------------------------

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        out = self._proc.stdout
        with open(self.log_path, "ab") as log:
            while True:
                chunk = os.read(out.fileno(), 65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                with self._cond:
                    self._buf += chunk
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def send(self, text: str) -> None:
        """Type text into dom0's console, slowly enough for Xen's serial receive ring."""
        assert self._proc is not None and self._proc.stdin is not None
        data = text.encode()
        for i in range(0, len(data), 32):
            self._proc.stdin.write(data[i : i + 32])
            self._proc.stdin.flush()
            time.sleep(0.01)

    def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        """Wait for pattern in the output after the last match; the cursor moves past it."""
        regex = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = regex.search(self._buf, self._cursor)
                if m is not None:
                    self._cursor = m.end()
                    return m
                fatal = FATAL.search(self._buf, max(0, self._cursor - 200))
                if fatal is not None:
                    raise LabUnavailable(f"lab crashed ({fatal.group().decode()}); see {self.log_path}")
                if self._proc is None or self._proc.poll() is not None:
                    raise LabUnavailable(f"QEMU exited (status {self._proc and self._proc.returncode}); see {self.log_path}")
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = bytes(self._buf[-1500:]).decode(errors="replace")
                    raise TimeoutError(f"no {regex.pattern!r} within {timeout:.0f}s; console tail:\n{tail}")
                self._cond.wait(min(left, 1.0))

    def run(self, command: str, timeout: float = 120.0, check: bool = True) -> str:
        """Run a shell command in dom0; returns its output (stdout and stderr)."""
        self._token += 1
        token = f"t{self._token}x{os.getpid()}"
        with self._cond:
            start = self._cursor = len(self._buf)
        self.send(f"{command}\necho @@$?@@{token}@@\n")
        regex = re.compile(rb"@@(\d+)@@" + token.encode() + rb"@@")
        m = self.expect(regex, timeout)
        output = bytes(self._buf[start : m.start()]).decode(errors="replace").replace("\r", "")
        rc = int(m.group(1))
        if check and rc != 0:
            raise LabCommandFailed(f"dom0: {command!r} exited {rc}:\n{output[-2000:]}")
        return output

    # -- the domU and relocd in this dom0 -----------------------------------

    def console_counts(self) -> list[int]:
        """Every ``count N`` the domU printed here, over each console log it had on this host.

        xenconsoled names a guest's log when it connects the console ring, so a
        copy restored under a temporary name (``domu--incoming``) logs to that
        name's file after the move.
        """
        out = self.run("cat /var/log/xen/console/guest-domu*.log 2>/dev/null | tr -d '\\r' | grep '^count ' || true")
        return [int(m) for m in re.findall(r"^count (\d+)$", out, re.MULTILINE)]

    def domu_copies(self) -> list[str]:
        return [line.split()[0] for line in self.run("xl list").splitlines() if line.startswith("domu")]

    def relocd(self, daemon: str, args: str, timeout: float = 120) -> Any:
        """``relocd ARGS --json`` against the daemon NAME of relocd-daemons.sh; its JSON."""
        out = self.run(f"python3 -m relocd {args} --json --control /run/relocd-{daemon}/control.sock", timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "shell"):
        print(__doc__)
        return 2
    image = build_image()
    with tempfile.TemporaryDirectory(prefix="xenlab-") as tmp:
        lab = XenLab(image, Path(tmp))
        print(f"booting ({lab.accel}) from {image}", file=sys.stderr)
        try:
            lab.start()
            print(f"dom0 ready after {lab.boot_s:.1f}s", file=sys.stderr)
            commands = argv[1:] if argv[0] == "run" else (line.rstrip("\n") for line in sys.stdin)
            for command in commands:
                t0 = time.monotonic()
                print(f"### {command}", flush=True)
                out = lab.run(command, timeout=600, check=False)
                print(out, end="" if out.endswith("\n") or not out else "\n")
                print(f"### ({time.monotonic() - t0:.1f}s)", flush=True)
        finally:
            lab.close()
            shutil.copy(lab.log_path, "/tmp/xenlab-serial.log")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""check-config and serve agree: what one refuses (exit 2), the other refuses; what one accepts, the other runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import DaemonProc, free_port
from relocd.tools.certs import make_ca, make_host_cert

REPO = Path(__file__).resolve().parents[2]


def relocd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relocd", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def config(tmp_path: Path, name: str, text: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    path = d / "relocd-config.sxp"
    path.write_text(f"(relocd-state-dir {d}/state)\n(relocd-control-socket {d}/control.sock)\n"
                    f"(xend-relocation-hosts-allow '^127\\\\.0\\\\.0\\\\.1$')\n"
                    f"(xend-relocation-port {free_port()})\n(xend-relocation-ssl-port {free_port()})\n"
                    f"(relocd-log-format json)\n{text}")
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d)
    make_host_cert(d, "hosta", ips=("127.0.0.1",))
    return d


BAD = {
    "tls key missing": "(xend-relocation-ssl-server yes)\n"
                       "(xend-relocation-server-ssl-key-file {pki}/gone.key)\n"
                       "(xend-relocation-server-ssl-cert-file {pki}/hosta.pem)\n",
    "tls listener without key": "(xend-relocation-ssl-server yes)\n",
    "not this host's address": "(xend-relocation-server yes)\n(xend-relocation-address 192.0.2.77)\n",
    "no such interface": "(xend-relocation-server yes)\n(xend-relocation-address nosuchif0)\n",
    "bad value": "(xend-relocation-server yes)\n(relocd-max-iterations none)\n",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_what_check_config_refuses_serve_refuses(case: str, tmp_path: Path, pki: Path) -> None:
    path = config(tmp_path, "bad", BAD[case].format(pki=pki))
    checked = relocd("check-config", "--config", str(path))
    assert checked.returncode == 2, checked
    assert checked.stdout == "" and "Traceback" not in checked.stderr
    try:
        served = relocd("serve", "--config", str(path), timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"serve started with a file check-config refuses ({case})") from None
    assert served.returncode == 2, served


def test_what_check_config_accepts_serve_runs(tmp_path: Path, pki: Path,
                                              daemons: list[DaemonProc]) -> None:
    tls = (f"(xend-relocation-ssl-server yes)\n(xend-relocation-server-ssl-key-file {pki}/hosta.key)\n"
           f"(xend-relocation-server-ssl-cert-file {pki}/hosta.pem)\n"
           f"(relocd-relocation-ssl-ca-file {pki}/ca.pem)\n")
    d = DaemonProc(tmp_path, "good", "127.0.0.1", extra_config=tls)
    daemons.append(d)
    checked = relocd("check-config", "--config", str(d.config))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == f"{d.config}: ok\n"
    d.start()  # raises if it exits or does not answer
    assert d.alive

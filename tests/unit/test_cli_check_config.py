"""`relocd check-config`: every error and warning of a file, by the checks `serve` runs.

tests/daemon/test_cli_check_config.py checks that `serve` refuses what this refuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relocd import cli
from relocd.cli.checkconfig import address_problem, check_file
from relocd.tools.certs import make_ca, make_host_cert

BASE = "(xend-relocation-hosts-allow '^hostb$')\n(relocd-state-dir {dir}/state)\n" \
       "(relocd-control-socket {dir}/control.sock)\n"


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relocd-config.sxp"
    path.write_text(BASE.format(dir=tmp_path) + text)
    return path


def run(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    code = cli.main(["check-config", "--config", str(path)])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def test_every_error_is_reported_not_only_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, "(xend-relocation-server yes)\n(xend-relocation-port banana)\n"
                            "(relocd-max-iterations 0)\n(relocd-dirty-treshold 5)\n"
                            "(relocd-downtime-ms 5 6)\n(dom0-cpus 0)\n(frobnicate 1)\n")
    code, out, err = run(path, capsys)
    assert code == 2 and out == ""
    errors = [line for line in err if not line.startswith("relocd: warning:")]
    warnings = [line for line in err if line.startswith("relocd: warning:")]
    assert [e.split(": ")[1] for e in errors] == [f"{path} line {n}" for n in (5, 6, 7, 8)]
    assert "xend-relocation-port: not a port number" in errors[0]
    assert "relocd-max-iterations" in errors[1]
    assert "did you mean relocd-dirty-threshold?" in errors[2]
    assert "expected one value, got 2" in errors[3]
    assert len(warnings) == 1 and "unknown option 'frobnicate' ignored" in warnings[0]


def test_a_good_file_is_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config(tmp_path, "(xend-relocation-server yes)\n(xend-relocation-address 127.0.0.1)\n")
    assert run(path, capsys) == (0, f"{path}: ok\n", [])


def test_a_missing_tls_key_is_an_error_as_serve_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_ca(tmp_path)
    host = make_host_cert(tmp_path, "hosta", ips=("127.0.0.1",))
    missing_key = tmp_path / "gone.key"
    path = config(tmp_path, f"(xend-relocation-ssl-server yes)\n"
                            f"(xend-relocation-server-ssl-key-file {missing_key})\n"
                            f"(xend-relocation-server-ssl-cert-file {host.cert})\n")
    code, out, err = run(path, capsys)
    assert code == 2 and out == ""
    (line,) = [e for e in err if "TLS listener cannot start" in e]
    assert str(missing_key) in line and "no such file" in line
    # the same files, but good: ok
    good = config(tmp_path, f"(xend-relocation-ssl-server yes)\n"
                            f"(xend-relocation-server-ssl-key-file {host.key})\n"
                            f"(xend-relocation-server-ssl-cert-file {host.cert})\n"
                            f"(relocd-relocation-ssl-ca-file {tmp_path / 'ca.pem'})\n")
    assert run(good, capsys)[0] == 0


def test_tls_listener_without_key_and_ca_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, "(xend-relocation-ssl-server yes)\n(xend-relocation-ssl yes)\n"
                            f"(relocd-relocation-ssl-ca-file {tmp_path / 'none.pem'})\n")
    errors, warnings = check_file(path)
    assert any("TLS listener cannot start" in e and "key-file" in e for e in errors)
    assert any("xend-relocation-ssl is on, but outgoing TLS cannot start" in e
               and "none.pem: no such file" in e for e in errors)


def test_a_tls_file_only_migrate_ssl_uses_is_a_warning(tmp_path: Path) -> None:
    path = config(tmp_path, f"(relocd-relocation-ssl-ca-file {tmp_path / 'none.pem'})\n")
    errors, warnings = check_file(path)
    assert errors == []
    assert any("migrate --ssl will fail" in w and "none.pem" in w for w in warnings)


def test_listen_addresses(tmp_path: Path) -> None:
    assert address_problem("") is None and address_problem("127.0.0.1") is None
    assert address_problem("lo") is None
    assert address_problem("nosuchif0") == "no such address or interface: 'nosuchif0'"
    assert address_problem("192.0.2.77") == "192.0.2.77 is not an address of this host"
    path = config(tmp_path, "(xend-relocation-server yes)\n(xend-relocation-address 192.0.2.77)\n")
    errors, _ = check_file(path)
    assert errors == [f"{path}: xend-relocation-address: 192.0.2.77 is not an address of this host"]
    # not listening: the address does not matter
    path = config(tmp_path, "(xend-relocation-address 192.0.2.77)\n")
    assert check_file(path)[0] == []


def test_unreadable_or_not_sxp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.sxp"
    path.write_text("(xend-relocation-port 8002\n")
    code, out, err = run(path, capsys)
    assert code == 2 and len(err) == 1 and str(path) in err[0]
    assert cli.main(["check-config", "--config", str(tmp_path / "none.sxp")]) == 2
    assert capsys.readouterr().err == f"relocd: {tmp_path / 'none.sxp'}: no such file\n"


def test_unknown_default_driver_is_a_warning(tmp_path: Path) -> None:
    path = config(tmp_path, "(relocd-default-driver vmware)\n")
    errors, warnings = check_file(path)
    assert errors == [] and any("no driver named 'vmware'" in w for w in warnings)

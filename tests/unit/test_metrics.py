"""Metrics (issue 12): the option, and what each observed event does to the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from relocd.config.options import parse_host_port
from relocd.config.settings import load_settings
from relocd.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relocd-config.sxp"
    path.write_text(text)
    return path


# --- relocd-metrics-address ------------------------------------------------------


def test_metrics_are_off_by_default() -> None:
    assert load_settings(None).metrics_address is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9782", ("127.0.0.1", 9782)),
        ("'[::1]:9782'", ("::1", 9782)),
        ("'[0:0::1]:9782'", ("::1", 9782)),
        ("'[::]:1'", ("::", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("localhost:9782", ("localhost", 9782)),
        ("''", None),
        ("none", None),
    ],
)
def test_metrics_address_values(tmp_path: Path, value: str, expected: tuple[str, int] | None) -> None:
    s = load_settings(write(tmp_path, f"# metrics\n(relocd-metrics-address {value})\n"))
    assert s.metrics_address == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("9782", "expected HOST:PORT"),
        (":9782", "expected HOST:PORT"),
        ("127.0.0.1:", "not a port number"),
        ("127.0.0.1:0", "not a port number (must be 1 to 65535)"),
        ("127.0.0.1:65536", "not a port number"),
        ("127.0.0.1:http", "not a port number"),
        ("::1:9782", "write an IPv6 address in brackets"),
        ("'[1.2.3.4]:9782'", "not an IPv6 address in brackets"),
        ("'[::1:9782'", "write an IPv6 address in brackets"),
        ("'bad host:9782'", "not an IP address or host name"),
        ("[::1]:9782", "quote a value that has brackets"),  # sxp splits at brackets
    ],
)
def test_bad_metrics_address_is_a_config_error_with_file_and_line(tmp_path: Path, value: str, reason: str) -> None:
    path = write(tmp_path, f"# metrics\n\n(relocd-metrics-address {value})\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.message.startswith(f"{path} line 3: relocd-metrics-address: "), info.value.message
    assert reason in info.value.message


def test_parse_host_port_directly() -> None:
    assert parse_host_port(" 10.0.0.1:80 ") == ("10.0.0.1", 80)
    with pytest.raises(ValueError):
        parse_host_port("[::1]")

"""Settings from sxp files: xend's files load, relocd's options check, errors point at lines."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from relocd.config import OPTIONS, Settings, check_config, load_settings
from relocd.config.options import parse_bool
from relocd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

#: A xend-config.sxp as Xen 4.x shipped it (bridged setup, relocation on),
#: with the many options relocd has no use for.
XEN4_XEND_CONFIG = r"""# -*- sh -*-

#
# Xend configuration file.
#

# Commented out entries show the default for that entry, unless otherwise
# specified.

#(logfile /var/log/xen/xend.log)
#(loglevel DEBUG)

# Xen-API server: unix socket with PAM authentication, as shipped.
#  (xen-api-server ((9363 pam '^localhost$ example\\.com$')
#                   (unix none)))
(xen-api-server ((unix)))

#(xend-http-server no)
#(xend-unix-server no)
#(xend-tcp-xmlrpc-server no)
#(xend-unix-xmlrpc-server yes)
(xend-relocation-server yes)
#(xend-relocation-ssl-server no)
#(xend-udev-event-server no)

#(xend-unix-path /var/lib/xend/xend-socket)

# Address and port for the XML-RPC over TCP server.
#(xend-tcp-xmlrpc-server-address 'localhost')
#(xend-tcp-xmlrpc-server-port 8006)

# SSL key and certificate for the XML-RPC server.
#(xend-tcp-xmlrpc-server-ssl-key-file  xmlrpc.key)
#(xend-tcp-xmlrpc-server-ssl-cert-file xmlrpc.crt)

#(xend-port            8000)
(xend-relocation-port 8002)
#(xend-relocation-ssl-port 8003)

# SSL key and certificate for the relocation server.
#(xend-relocation-server-ssl-key-file  xmlrpc.key)
#(xend-relocation-server-ssl-cert-file xmlrpc.crt)

# Whether to use SSL as default when relocating.
#(xend-relocation-ssl no)

#(xend-address '')
#(xend-address localhost)
(xend-relocation-address '')

# The hosts allowed to talk to the relocation port.
#  (xend-relocation-hosts-allow '^localhost$ ^.*\\.example\\.org$')
#(xend-relocation-hosts-allow '')
(xend-relocation-hosts-allow '^localhost$ ^localhost\\.localdomain$ ^192\\.168\\.1\\.[0-9]+$')

# The limit (in kilobytes) on the size of the console buffer
#(console-limit 1024)

(network-script network-bridge)
(vif-script vif-bridge)

## Routed or NAT networking instead of bridged:
#(network-script network-route)
#(vif-script     vif-route)

(dom0-min-mem 196)
(enable-dom0-ballooning yes)
(total_available_memory 0)
(dom0-cpus 0)

#(enable-dump no)
#(external-migration-tool '')
#(vnc-listen '127.0.0.1')
(vncpasswd '')
#(vnc-tls 1)
#(vnc-x509-cert-dir /etc/xen/vnc)
#(vnc-x509-verify 1)
(keymap 'en-us')
#(resource-label-change-script '')
#(xend-domains-path /var/lib/xend/domains)
#(qemu-dm-logrotate-count 10)
(device-create-timeout 100)
(device-destroy-timeout 100)
#(xend-domain-lock no)
#(xend-domain-lock-path /var/lib/xen/images/vm_locks)
#(xend-domain-lock-utility domain-lock)
"""


def write(tmp_path: Path, text: str, name: str = "relocd-config.sxp") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    return exc.value.message.replace(str(path), "FILE")


# --- defaults ---------------------------------------------------------------


def test_defaults_are_xends_and_relocds() -> None:
    s = load_settings(None)
    assert s == Settings.default()
    assert s.relocation_server is False  # xend's default
    assert (s.relocation_port, s.relocation_ssl_port) == (8002, 8003)
    assert s.relocation_address == "" and s.hosts_allow == ()
    assert s.relocation_ssl_server is False and s.relocation_ssl is False
    assert s.ssl_key_file is None and s.ssl_cert_file is None and s.ssl_ca_file is None
    assert s.control_socket == Path("/run/relocd/control.sock")
    assert s.state_dir == Path("/var/lib/relocd")
    assert (s.max_iterations, s.max_factor, s.dirty_threshold) == (29, 3.0, 50)
    assert s.precopy_policy == "downtime" and s.downtime_ms == 20 and s.auto_converge is True and s.migration_channels == 4
    assert s.max_bandwidth is None and s.max_memory is None
    assert (s.handshake_timeout, s.idle_timeout, s.reservation_timeout, s.dns_timeout) == (10, 60, 30, 2)
    assert s.max_frame == 16 << 20 and s.max_incoming == 4
    assert (s.announce_rounds, s.announce_initial_ms, s.announce_step_ms) == (5, 50, 100)
    assert s.log_format == "auto" and s.default_driver == "sim"
    assert s.config_file is None


def test_settings_are_frozen() -> None:
    s = Settings.default()
    with pytest.raises(ValidationError):
        setattr(s, "relocation_port", 1)


def test_every_option_fills_a_field_and_every_field_has_an_option() -> None:
    fields = set(Settings.model_fields) - {"config_file"}
    assert {opt.field for opt in OPTIONS.values()} == fields
    assert len({opt.field for opt in OPTIONS.values()}) == len(OPTIONS)


def test_every_option_is_documented_and_in_the_example() -> None:
    reference = (REPO / "docs" / "config.md").read_text()
    example = (REPO / "etc" / "relocd-config.sxp").read_text()
    for keyword in OPTIONS:
        assert f"`{keyword}`" in reference, keyword
        assert f"({keyword} " in example, keyword


def test_shipped_example_loads_with_documented_defaults(tmp_path: Path) -> None:
    example = REPO / "etc" / "relocd-config.sxp"
    s = load_settings(example)
    assert s.relocation_server is True
    # Every other option is shown commented out, at its default.
    assert s.model_dump(exclude={"relocation_server", "config_file", "hosts_allow"}) == Settings.default().model_dump(
        exclude={"relocation_server", "config_file", "hosts_allow"}
    )
    # Uncommented, the first entry of each option is the default it documents
    # (options unset by default show an example value instead).
    uncommented = example.read_text().replace("\n#(", "\n(")
    s2 = load_settings(write(tmp_path, uncommented))
    examples = {"config_file", "hosts_allow", "ssl_key_file", "ssl_cert_file", "ssl_ca_file", "max_bandwidth", "max_memory"}
    assert s2.model_dump(exclude=examples) == Settings.default().model_dump(exclude=examples)
    assert s2.max_bandwidth == 1_000_000_000 and s2.ssl_ca_file == Path("/etc/relocd/ca.pem")


# --- xend's files -----------------------------------------------------------


def test_whole_xen4_xend_config_loads(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, XEN4_XEND_CONFIG, "xend-config.sxp"))
    assert s.relocation_server is True
    assert s.relocation_port == 8002
    assert s.relocation_address == ""
    assert s.hosts_allow == (r"^localhost$", r"^localhost\.localdomain$", r"^192\.168\.1\.[0-9]+$")
    assert s.config_file == tmp_path / "xend-config.sxp"


def test_xen4_config_has_no_errors_and_only_expected_warnings(tmp_path: Path) -> None:
    warnings = check_config(write(tmp_path, XEN4_XEND_CONFIG))
    assert warnings == []


def test_first_occurrence_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "(xend-relocation-port 8102)\n(xend-relocation-port 9999)\n(relocd-max-incoming 2)\n(relocd-max-incoming 7)\n")
    s = load_settings(path)
    assert s.relocation_port == 8102 and s.max_incoming == 2
    warnings = check_config(path)
    assert f"{path} line 2: xend-relocation-port repeated; the first one (line 1) wins, as in xend" in warnings


def test_repeated_option_is_not_parsed(tmp_path: Path) -> None:
    # xend never looked at the second one; neither do we.
    s = load_settings(write(tmp_path, "(xend-relocation-port 8102)\n(xend-relocation-port abc)\n"))
    assert s.relocation_port == 8102


@pytest.mark.parametrize(
    ("text", "value"),
    [(t, True) for t in ("yes", "YES", "Yes", "on", "ON", "true", "True", "1", "y", "t")]
    + [(t, False) for t in ("no", "NO", "off", "Off", "false", "FALSE", "0", "n", "f")],
)
def test_bool_spellings(tmp_path: Path, text: str, value: bool) -> None:
    assert parse_bool(text) is value
    assert load_settings(write(tmp_path, f"(xend-relocation-server {text})")).relocation_server is value


def test_unknown_xend_options_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "(xend-http-server yes)\n(frobnicate (deeply (nested list)))\n(xend-relocation-port 8010)\n")
    assert load_settings(path).relocation_port == 8010
    assert f"{path} line 2: unknown option 'frobnicate' ignored" in check_config(path)


def test_unknown_option_warning_suggests_a_fix(tmp_path: Path) -> None:
    path = write(tmp_path, "(xend-relocaton-port 8010)\n")
    assert check_config(path) == [
        f"{path} line 1: unknown option 'xend-relocaton-port' ignored (did you mean xend-relocation-port?)",
        f"{path}: xend-relocation-server and xend-relocation-ssl-server are both off: "
        "this host will not accept incoming migrations",
    ]


def test_unknown_relocd_option_is_an_error(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "(xend-relocation-server yes)\n\n(relocd-max-iteration 5)\n")
    assert msg == "FILE line 3: unknown option 'relocd-max-iteration' (did you mean relocd-max-iterations?)"


# --- values -----------------------------------------------------------------


def test_relocd_options_parse(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    text = """
    (relocd-relocation-ssl-ca-file certs/ca.pem)
    (xend-relocation-server-ssl-key-file /etc/relocd/key.pem)
    (relocd-control-socket /tmp/r/control.sock)
    (relocd-state-dir state)
    (relocd-max-iterations 10)
    (relocd-max-factor 2.5)
    (relocd-dirty-threshold 0)
    (relocd-precopy-policy XEND)
    (relocd-downtime-ms 50)
    (relocd-max-bandwidth 1GB/s)
    (relocd-handshake-timeout 2.5)
    (relocd-idle-timeout 5s)
    (relocd-max-frame 4MiB)
    (relocd-max-incoming 1)
    (relocd-reservation-timeout 1)
    (relocd-max-memory 2GiB)
    (relocd-dns-timeout 0.5)
    (relocd-announce-rounds 0)
    (relocd-announce-initial-ms 10)
    (relocd-announce-step-ms 0)
    (relocd-log-format json)
    (relocd-default-driver kvm)
    (xend-relocation-address fd00::1)
    """
    s = load_settings(write(tmp_path, text))
    assert s.ssl_ca_file == tmp_path / "certs" / "ca.pem"  # relative to the config file
    assert s.ssl_key_file == Path("/etc/relocd/key.pem")
    assert s.control_socket == Path("/tmp/r/control.sock")
    assert s.state_dir == tmp_path / "state"
    assert (s.max_iterations, s.max_factor, s.dirty_threshold) == (10, 2.5, 0)
    assert s.precopy_policy == "xend" and s.downtime_ms == 50
    assert s.max_bandwidth == 1_000_000_000
    assert (s.handshake_timeout, s.idle_timeout) == (2.5, 5.0)
    assert s.max_frame == 4 << 20 and s.max_incoming == 1 and s.reservation_timeout == 1.0
    assert s.max_memory == 2 << 30 and s.dns_timeout == 0.5
    assert (s.announce_rounds, s.announce_initial_ms, s.announce_step_ms) == (0, 10, 0)
    assert s.log_format == "json" and s.default_driver == "kvm"
    assert s.relocation_address == "fd00::1"


@pytest.mark.parametrize("text", ["", "none", "unlimited"])
def test_unset_bandwidth(tmp_path: Path, text: str) -> None:
    assert load_settings(write(tmp_path, f"(relocd-max-bandwidth '{text}')")).max_bandwidth is None


def test_hosts_allow_double_space_is_not_allow_all(tmp_path: Path) -> None:
    path = write(tmp_path, "(xend-relocation-server yes)\n(xend-relocation-hosts-allow '^a\\\\.example$  ^b\\\\.example$ ')\n")
    s = load_settings(path)
    assert s.hosts_allow == (r"^a\.example$", r"^b\.example$")
    assert any("line 2: xend-relocation-hosts-allow: empty pattern" in w for w in check_config(path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("\n\n(xend-relocation-port abc)", "FILE line 3: xend-relocation-port: not a port number: 'abc'"),
        ("(xend-relocation-port 0)", "FILE line 1: xend-relocation-port: not a port number (must be 1 to 65535): '0'"),
        ("(xend-relocation-port 70000)", "FILE line 1: xend-relocation-port: not a port number (must be 1 to 65535): '70000'"),
        ("(xend-relocation-port -1)", "FILE line 1: xend-relocation-port: not a port number: '-1'"),
        ("(xend-relocation-server maybe)", "FILE line 1: xend-relocation-server: expected yes or no: 'maybe'"),
        ("(xend-relocation-server)", "FILE line 1: xend-relocation-server: expected one value, got 0"),
        ("(xend-relocation-port 1 2)", "FILE line 1: xend-relocation-port: expected one value, got 2 (quote a value that has spaces)"),
        ("(xend-relocation-hosts-allow ^a$ ^b$)",
         "FILE line 1: xend-relocation-hosts-allow: expected one value, got 2 (quote a value that has spaces)"),
        ("(xend-relocation-port (8002))", "FILE line 1: xend-relocation-port: expected one value, got 1"),
        ("(xend-relocation-address 'not an address')",
         "FILE line 1: xend-relocation-address: not an address, host name or interface name: 'not an address'"),
        ("(xend-relocation-hosts-allow '^ok$ ^bad($')",
         "FILE line 1: xend-relocation-hosts-allow: bad regular expression '^bad($': "
         "missing ), unterminated subpattern at position 4"),
        ("(relocd-max-bandwidth fast)", "FILE line 1: relocd-max-bandwidth: not a rate such as 100MB/s: 'fast'"),
        ("(relocd-max-frame 1KiB)", "FILE line 1: relocd-max-frame: size out of range (must be 65536 to 1073741824 bytes): '1KiB'"),
        ("(relocd-max-memory lots)", "FILE line 1: relocd-max-memory: not a size: 'lots'"),
        ("(relocd-precopy-policy fastest)", "FILE line 1: relocd-precopy-policy: expected one of downtime, xend: 'fastest'"),
        ("(relocd-log-format xml)", "FILE line 1: relocd-log-format: expected one of auto, json, console: 'xml'"),
        ("(relocd-max-iterations 0)", "FILE line 1: relocd-max-iterations: not an integer (must be 1 to 10000): '0'"),
        ("(relocd-max-factor 0.5)", "FILE line 1: relocd-max-factor: out of range (must be 1 to 1000): '0.5'"),
        ("(relocd-dns-timeout never)", "FILE line 1: relocd-dns-timeout: not a number: 'never'"),
        ("(relocd-state-dir '')", "FILE line 1: relocd-state-dir: empty path"),
        ("(relocd-default-driver 'Sim Driver')", "FILE line 1: relocd-default-driver: not a driver name: 'Sim Driver'"),
        ("(xend-relocation-server yes", "FILE line 1: unbalanced parenthesis: '(' never closed"),
        ("(xend-relocation-hosts-allow '^a$)\n", "FILE line 1: unterminated string"),
    ],
)  # fmt: skip
def test_every_error_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    assert error_of(tmp_path, text) == message


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sxp"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: cannot read: No such file")):
        load_settings(missing)
    bad = tmp_path / "latin1.sxp"
    bad.write_bytes(b"(xend-relocation-port 8002)\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad} line 2: not UTF-8 text")):
        load_settings(bad)


# --- overrides --------------------------------------------------------------


def test_overrides_beat_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "(xend-relocation-port 8002)\n(xend-relocation-address 10.1.1.1)\n")
    s = load_settings(path, {"relocation_address": "127.0.0.2", "relocation_port": 8102, "state_dir": None})
    assert (s.relocation_address, s.relocation_port) == ("127.0.0.2", 8102)
    assert s.state_dir == Path("/var/lib/relocd")  # None = not given
    s2 = load_settings(None, {"state_dir": str(tmp_path), "control_socket": tmp_path / "c.sock", "relocation_server": True})
    assert s2.state_dir == tmp_path and s2.control_socket == tmp_path / "c.sock" and s2.relocation_server


def test_override_hosts_allow_as_text() -> None:
    s = load_settings(None, {"hosts_allow": "^a$  ^b$"})
    assert s.hosts_allow == ("^a$", "^b$")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"relocation_port": 70000}, "command line: relocation_port: Input should be less than or equal to 65535"),
        ({"relocation_address": "no such address!"}, "command line: relocation_address: Value error, "),
        ({"hosts_allow": "(("}, "command line: hosts_allow: Value error, bad regular expression"),
        ({"no_such_setting": 1}, "command line: unknown setting 'no_such_setting'"),
    ],
)
def test_bad_overrides(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(None, overrides)
    assert exc.value.message.startswith(message)


# --- check_config -------------------------------------------------------------


def test_check_config_warns_about_loose_hosts_allow(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "(xend-relocation-server yes)\n"
        "(xend-relocation-hosts-allow '^10.0.0.1$ ^trusted\\\\.example\\\\.org ^ok\\\\.example$ ^(a|b)$')\n",
    )
    warnings = check_config(path)
    assert warnings == [
        f"{path} line 2: xend-relocation-hosts-allow: in '^10.0.0.1$' an unescaped '.' matches any "
        "character; write '\\\\.' in the file",
        f"{path} line 2: xend-relocation-hosts-allow: '^trusted\\\\.example\\\\.org' is not anchored "
        "with '$' and also matches longer names and addresses",
    ]


def test_check_config_warns_about_open_server_and_missing_files(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "(xend-relocation-server yes)\n(xend-relocation-ssl-server yes)\n"
        "(xend-relocation-server-ssl-key-file key.pem)\n(relocd-relocation-ssl-ca-file /nonexistent/ca.pem)\n",
    )
    warnings = check_config(path)
    assert f"{path} line 3: xend-relocation-server-ssl-key-file: {tmp_path / 'key.pem'} does not exist" in warnings
    assert f"{path} line 4: relocd-relocation-ssl-ca-file: /nonexistent/ca.pem does not exist" in warnings
    assert any("ssl key or cert file is not set" in w for w in warnings)
    assert any("xend-relocation-hosts-allow is empty" in w for w in warnings)


def test_check_config_warns_about_stray_values(tmp_path: Path) -> None:
    path = write(tmp_path, "(xend-relocation-server yes)\n(xend-relocation-hosts-allow '^a$')\nstray\n()\n")
    assert check_config(path) == [
        f"{path}: stray value 'stray' outside any (option value) ignored",
        f"{path} line 4: form without an option name ignored",
    ]


def test_check_config_raises_on_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "(xend-relocation-server yes)\n(xend-relocation-port abc)\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path} line 2: xend-relocation-port: not a port number: 'abc'")):
        check_config(path)


# --- hostile files ------------------------------------------------------------

_FILE_TOKENS = ["(", ")", "'", '"', "\\", "#", " ", "\n", "x", "yes", "8002", "''", "relocd-x"] + list(OPTIONS)[:12]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_FILE_TOKENS), max_size=30).map("".join))
def test_any_file_loads_or_raises_config_error_with_file_name(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.sxp"
        path.write_text(text)
        try:
            check_config(path)
            load_settings(path)
        except ConfigError as e:
            assert e.message.startswith(f"{path} line ") or e.message.startswith(f"{path}: ")

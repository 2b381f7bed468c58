"""DomainConfig <-> sxp: exact round trips, and hostile text gives ConfigError only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relocd.config.domain import (
    MAX_CONFIG_TEXT,
    config_from_sxp,
    config_to_sxp,
    format_vif_spec,
    parse_vif_spec,
)
from relocd.config.sxp import parse
from relocd.drivers.base import DomainConfig, Vif
from relocd.errors import ConfigError

UUID = "6f1c1e4e-2a47-4c39-9b1e-2f1f0c9f6a10"

WEB1 = DomainConfig(
    name="web1",
    uuid=UUID,
    memory_mib=256,
    vcpus=2,
    driver="sim",
    workload="hotset:size=64MiB,rate=100MB/s",
    vifs=(
        Vif(mac="00:16:3e:01:02:03", ips=("10.0.0.5", "fd00::5"), bridge="xenbr0"),
        Vif(mac="00:16:3e:0a:0b:0c"),
    ),
    cpu_features=("sse2", "avx2"),
    extra={"on_crash": "restart", "note": "two words (and parens) 'quoted'"},
)


def test_known_text() -> None:
    text = config_to_sxp(WEB1)
    assert text == (
        f"(domain (name web1) (uuid {UUID}) (memory 256) (vcpus 2) (driver sim) "
        "(workload hotset:size=64MiB,rate=100MB/s) "
        "(vif (mac 00:16:3e:01:02:03) (ip 10.0.0.5) (ip fd00::5) (bridge xenbr0)) "
        "(vif (mac 00:16:3e:0a:0b:0c)) (cpu_features sse2 avx2) "
        "(extra (note 'two words (and parens) \\'quoted\\'') (on_crash restart)))"
    )
    assert config_from_sxp(text) == WEB1


def test_minimal_config_round_trips_with_defaults() -> None:
    cfg = DomainConfig(name="a", uuid=UUID, memory_mib=1)
    back = config_from_sxp(config_to_sxp(cfg))
    assert back == cfg
    assert (back.vcpus, back.driver, back.workload, back.vifs) == (1, "sim", "idle", ())


def test_reads_xend_style_layout_with_comments() -> None:
    text = f"""
    # written by hand
    (domain
      (name db-2)            # the name
      (uuid '{UUID}')
      (memory 1024)
      (cpu_features (sse2 sse4_2))
      (vif (bridge br0) (ip "192.168.1.7") (mac 00:16:3E:AA:BB:CC))
    )
    """
    cfg = config_from_sxp(text)
    assert cfg.name == "db-2" and cfg.memory_mib == 1024
    assert cfg.cpu_features == ("sse2", "sse4_2")
    assert cfg.vifs == (Vif(mac="00:16:3E:AA:BB:CC", ips=("192.168.1.7",), bridge="br0"),)


names = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
macs = st.lists(st.integers(0, 255), min_size=5, max_size=5).map(
    lambda b: "02:" + ":".join(f"{x:02x}" for x in b)
)
ips = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
vifs = st.builds(
    Vif,
    mac=macs,
    ips=st.lists(ips, max_size=3).map(tuple),
    bridge=st.one_of(st.none(), st.from_regex(r"[a-z0-9]{1,15}", fullmatch=True)),
)
configs = st.builds(
    DomainConfig,
    name=names,
    uuid=st.uuids().map(str),
    memory_mib=st.integers(1, 1 << 22),
    vcpus=st.integers(1, 512),
    driver=st.sampled_from(["sim", "kvm"]),
    workload=st.text(max_size=40),
    vifs=st.lists(vifs, max_size=3).map(tuple),
    cpu_features=st.lists(st.from_regex(r"[a-z0-9_]{1,10}", fullmatch=True), max_size=5).map(tuple),
    extra=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(configs)
def test_round_trip(cfg: DomainConfig) -> None:
    assert config_from_sxp(config_to_sxp(cfg)) == cfg


GOOD = f"(domain (name x) (uuid {UUID}) (memory 64))"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "expected exactly one (domain ...) form"),
        (GOOD + GOOD, "expected exactly one (domain ...) form"),
        ("domain", "expected exactly one (domain ...) form"),
        (f"(vm (name x) (uuid {UUID}) (memory 64))", "expected a (domain ...) form"),
        ("()", "expected a (domain ...) form"),
        (f"(domain (uuid {UUID}) (memory 64))", "no name"),
        ("(domain (name x) (memory 64))", "no uuid"),
        (f"(domain (name x) (uuid {UUID}))", "no memory"),
        (f"(domain (name x) (name y) (uuid {UUID}) (memory 64))", "field 'name' given twice"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) (evil 1))", "unknown field 'evil'"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) loose)", "expected (key value) forms only"),
        (f"(domain (name x y) (uuid {UUID}) (memory 64))", "(name ...): expected exactly one value"),
        (f"(domain (name (x)) (uuid {UUID}) (memory 64))", "(name ...): expected exactly one value"),
        (f"(domain (name x) (uuid {UUID}) (memory -1))", "memory: not a number"),
        (f"(domain (name x) (uuid {UUID}) (memory 1e9))", "memory: not a number"),
        (f"(domain (name x) (uuid {UUID}) (memory \u0663))", "memory: not a number"),
        (f"(domain (name x) (uuid {UUID}) (memory 99999999999999))", "memory: not a number"),
        (f"(domain (name x) (uuid {UUID}) (memory 0))", "memory_mib: Input should be greater than or equal to 1"),
        (f"(domain (name x) (uuid {UUID}) (memory 99999999))", "memory_mib: Input should be less than"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) (vcpus 0))", "vcpus: Input should be greater"),
        (f"(domain (name '../etc') (uuid {UUID}) (memory 64))", "name: String should match pattern"),
        (f"(domain (name '') (uuid {UUID}) (memory 64))", "name: String should have at least 1 character"),
        ("(domain (name x) (uuid not-a-uuid) (memory 64))", "uuid: Value error"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) (vif (ip 10.0.0.1)))", "vif: no mac"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) (vif (mac zz:16:3e:01:02:03)))", "vif mac: not a MAC address"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) (vif (mac 01:16:3e:01:02:03)))", "vif mac: multicast MAC"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) (vif (mac 00:16:3e:01:02:03) (ip 10.0.0.256)))",
         "vif ip: not an IP address"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) (vif (mac 00:16:3e:01:02:03) (ip fe80::1%eth0)))",
         "vif ip: scoped IP address"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) (vif (mac 00:16:3e:01:02:03) (bridge 'br 0')))",
         "vif bridge: not a bridge name"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) (vif (mac 00:16:3e:01:02:03) (mtu 9000)))",
         "unknown field 'mtu'"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) (cpu_features 'a b'))", "cpu_features: not a CPU feature name"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) (extra (a)))", "extra: expected (key value) pairs"),
        (f"(domain (name x) (uuid {UUID}) (memory 64) (extra (a 1) (a 2)))", "extra: key 'a' given twice"),
        ("(domain (name x)", "unbalanced parenthesis"),
        ("(domain (name 'x", "unterminated string"),
        ("(" * 100, "nested deeper than"),
    ],
)  # fmt: skip
def test_bad_input_is_a_config_error(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_sxp(text)
    assert exc.value.message.startswith("domain config")
    assert reason in exc.value.message


def test_too_long_text_is_refused_before_parsing() -> None:
    text = GOOD[:-1] + " (extra (k '" + "a" * MAX_CONFIG_TEXT + "')))"
    with pytest.raises(ConfigError, match="longer than"):
        config_from_sxp(text)


def test_too_many_vifs() -> None:
    vifs = " ".join("(vif (mac 00:16:3e:00:00:01))" for _ in range(65))
    with pytest.raises(ConfigError, match="more than 64 vifs"):
        config_from_sxp(GOOD[:-1] + " " + vifs + ")")


def test_error_points_at_the_line() -> None:
    text = f"(domain\n (name x)\n (uuid {UUID})\n (memory 64)\n (vif (mac 00:16:3e:01:02:03)\n   (ip nope)))"
    with pytest.raises(ConfigError) as exc:
        config_from_sxp(text)
    assert exc.value.message == "domain config line 6: vif ip: not an IP address: 'nope'"


hostile_alphabet = st.sampled_from(
    list("()'\"\\# \n") + ["domain", "name", "uuid", "memory", "vif", "mac", "ip", "extra", "x", "64", UUID, "00:16:3e:01:02:03"]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(hostile_alphabet, max_size=40).map("".join))
def test_hostile_token_soup_raises_only_config_error(text: str) -> None:
    try:
        cfg = config_from_sxp(text)
    except ConfigError:
        return
    assert config_from_sxp(config_to_sxp(cfg)) == cfg


@settings(max_examples=200, deadline=None)
@given(configs, st.integers(0, 10_000), st.text(max_size=5))
def test_mutated_configs_raise_only_config_error(cfg: DomainConfig, at: int, junk: str) -> None:
    text = config_to_sxp(cfg)
    at %= len(text) + 1
    try:
        config_from_sxp(text[:at] + junk + text[at + len(junk) :])
    except ConfigError:
        pass


# --- xm's vif spec ------------------------------------------------------------


def test_vif_spec() -> None:
    vif = parse_vif_spec("mac=00:16:3E:01:02:03, ip=10.0.0.5 10.0.0.6 FD00::0005, bridge=xenbr0")
    assert vif == Vif(mac="00:16:3e:01:02:03", ips=("10.0.0.5", "10.0.0.6", "fd00::5"), bridge="xenbr0")
    assert format_vif_spec(vif) == "mac=00:16:3e:01:02:03, ip=10.0.0.5 10.0.0.6 fd00::5, bridge=xenbr0"
    assert parse_vif_spec(format_vif_spec(vif)) == vif


def test_vif_spec_ignores_xm_keys_and_empty_pieces() -> None:
    vif = parse_vif_spec("bridge=br1, script=vif-bridge, vifname=web1.0, model=e1000, ,")
    assert vif.bridge == "br1" and vif.ips == ()
    assert vif.mac.startswith("00:16:3e:")  # made up in Xen's range, as xend did
    assert int(vif.mac.split(":")[3], 16) < 0x80


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("mac=00:16:3e:01:02", "not a MAC address"),
        ("mac=ff:ff:ff:ff:ff:ff", "multicast MAC"),
        ("ip=10.0.0.1 banana", "not an IP address: 'banana'"),
        ("ip=10.0.0.1, ip=10.0.0.2", "ip given twice"),
        ("bridge=this-name-is-far-too-long", "not a bridge name"),
        ("brdge=xenbr0", "unknown key 'brdge'"),
        ("mac", "expected key=value"),
        ("=x", "expected key=value"),
    ],
)
def test_bad_vif_spec(spec: str, reason: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_vif_spec(spec)
    assert exc.value.message.startswith(f"vif {spec!r}: ")
    assert reason in exc.value.message


def test_written_text_is_one_sxp_value() -> None:
    assert len(parse(config_to_sxp(WEB1))) == 1

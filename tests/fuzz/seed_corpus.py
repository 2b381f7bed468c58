#!/usr/bin/env python3
"""Write the starting corpus (real streams and configs) into tests/fuzz/corpus/.

Seeds are named ``seed-*``; inputs kept from fuzzing runs (run.sh --keep) are
named by libFuzzer's sha1.  Rerun after a protocol change.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from relocd.config.domain import config_to_sxp
from relocd.drivers.base import DomainConfig, Vif
from relocd.errors import Reason
from relocd.protocol.codec import PREAMBLE, encode, encode_pages_header
from relocd.protocol.codes import DigestAlgo, OutcomeState, Role
from relocd.protocol.records import (
    Abort,
    Commit,
    Config,
    Digest,
    Done,
    EndRound,
    Go,
    Hello,
    Outcome,
    Prepared,
    Query,
    Refuse,
    Reserve,
    Reserved,
    Resumed,
    Stop,
    VcpuState,
)  # fmt: skip
from relocd.units import PAGE_SIZE

HERE = Path(__file__).resolve().parent
MID = bytes(range(1, 17))  # the harness queries this id
# mode byte: bit0 no preamble, bit1 npages limit, bits2-3 our role (0 TARGET, 1 SOURCE, 2 QUERY), bits4-7 chunking
AS_TARGET, AS_SOURCE, AS_QUERY = 0x00, 0x04, 0x08


def pages(round_no: int, data: list[int], zero: list[int]) -> bytes:
    d = np.array(data, dtype=np.uint64)
    z = np.array(zero, dtype=np.uint64)
    return encode_pages_header(round_no, d, z) + bytes(range(256)) * (len(data) * PAGE_SIZE // 256)


def codec_seeds() -> dict[str, bytes]:
    cfg = DomainConfig(name="web", uuid=str(uuid.UUID(bytes=MID)), memory_mib=16, vifs=(Vif(mac="00:16:3e:00:00:01", bridge="br0"),))
    reserve = Reserve({"name": "web", "uuid": cfg.uuid, "memory_bytes": 16 << 20, "vcpus": 1, "driver": "sim", "live": True})
    source = [Hello.current(Role.SOURCE, MID, "hosta"), reserve, Config(config_to_sxp(cfg))]
    live = b"".join(encode(r) for r in source) + pages(1, [0, 1, 2, 9], [3, 4]) + encode(EndRound(1, 4, 2))
    live += pages(2, [1], []) + encode(EndRound(2, 1, 0)) + encode(Stop(3)) + pages(3, [5], [6])
    live += b"".join(encode(r) for r in (VcpuState("sim", b"\x01" * 40), Digest(DigestAlgo.SHA256, b"\xaa" * 32), Commit(), Go(), Done()))
    cold = b"".join(encode(r) for r in source) + encode(Stop(1)) + pages(1, [0], [1]) + encode(VcpuState("sim", b"")) + encode(Commit())
    target = [Hello.current(Role.TARGET, bytes(16), "hostb"), Reserved({"reservation": "r", "expires_ms": 30000}),
              Prepared(), Resumed(True, {"announced": ["10.0.0.1"]})]  # fmt: skip
    query_i = [Hello.current(Role.QUERY, MID, "hosta"), Query(MID), Go()]
    query_r = [Hello.current(Role.TARGET, bytes(16), "hostb"), Outcome(MID, OutcomeState.PREPARED), Resumed(False, {"error": "x"})]
    return {
        "seed-live-migration": bytes([AS_TARGET | 0x20]) + PREAMBLE + live,
        "seed-live-migration-bytewise": bytes([AS_TARGET | 0x02]) + PREAMBLE + live[:2000],
        "seed-cold-migration": bytes([AS_TARGET | 0x03 | 0x40]) + cold,
        "seed-target-answers": bytes([AS_SOURCE | 0xF0]) + PREAMBLE + b"".join(encode(r) for r in target),
        "seed-refuse": bytes([AS_SOURCE]) + PREAMBLE + encode(target[0]) + encode(Refuse(Reason.NO_MEMORY, "not enough memory")),
        "seed-abort": bytes([AS_TARGET | 0x10]) + PREAMBLE + encode(source[0]) + encode(Abort(Reason.CANCELLED, "operator")),
        "seed-query": bytes([AS_TARGET | 0x30]) + PREAMBLE + b"".join(encode(r) for r in query_i),
        "seed-query-answer": bytes([AS_QUERY | 0x50]) + PREAMBLE + b"".join(encode(r) for r in query_r),
        "seed-xend-sxp": bytes([AS_TARGET]) + b"(receive (domain (name x)))",
        "seed-huge-length": bytes([AS_TARGET]) + PREAMBLE + b"\x01\x00\x00\x00\xff\xff\xff\xff\x00\x00\x00\x00",
    }


def sxp_seeds() -> dict[str, bytes]:
    full = DomainConfig(
        name="db-1", memory_mib=2048, vcpus=4, driver="kvm", workload="hotset:size=64MiB,rate=200MB/s",
        vifs=(Vif(mac="00:16:3e:aa:bb:cc", bridge="xenbr0", ip="192.0.2.7"), Vif(mac="00:16:3e:aa:bb:cd")),
        cpu_features=("sse4_2", "avx2"), extra={"on_crash": "restart", "note": "it's \"quoted\"\n"},
    )  # fmt: skip
    return {
        "seed-domain-minimal": config_to_sxp(DomainConfig(name="web", memory_mib=16)).encode(),
        "seed-domain-full": config_to_sxp(full).encode(),
        "seed-domain-multiline": b"# a domain\n(domain\n  (name web)   # its name\n  (memory 256)\n  (vcpus 2)\n"
        b"  (vif (mac 00:16:3e:00:00:01) (bridge br0))\n)\n",
        "seed-daemon-config": (HERE.parent.parent / "etc" / "relocd-config.sxp").read_bytes(),
        "seed-escapes": b"(a 'x\\n\\t\\\\\\'\\x41\\101' \"dq \\\" q\" \\. (b (c (d))))",
        "seed-hosts-allow": b"(xend-relocation-hosts-allow '^localhost$ ^.*\\\\.example\\\\.org$')\n",
        "seed-deep": b"(" * 60 + b"x" + b")" * 60,
        "seed-unterminated": b"(domain (name 'web",
    }


def write(directory: Path, seeds: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("seed-*"):
        old.unlink()
    for name, data in seeds.items():
        (directory / name).write_bytes(data)


if __name__ == "__main__":
    write(HERE / "corpus" / "codec", codec_seeds())
    write(HERE / "corpus" / "sxp", sxp_seeds())
    print("seeds written")

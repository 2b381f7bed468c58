#!/usr/bin/env python3
"""Fuzz the sxp reader and the domain config reader (CONFIG records come from peers).

Anything but ConfigError escaping is a crash; so is a parse that does not
survive dumps() and parse() again, or a DomainConfig that does not survive
config_to_sxp() and config_from_sxp() again.

    python tests/fuzz/fuzz_sxp.py -max_total_time=60 WORKDIR tests/fuzz/corpus/sxp
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzzlib import instrumented, main

with instrumented():
    from relocd.config.domain import config_from_sxp, config_to_sxp
    from relocd.config.sxp import SxpList, dumps_all, parse
    from relocd.errors import ConfigError


def _plain(value: object) -> object:
    """Parsed values without line numbers, for comparison."""
    if isinstance(value, SxpList):
        return [_plain(v) for v in value]
    return value


def one_input(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    try:
        values = parse(text, "fuzz")
    except ConfigError:
        values = None
    if values is not None:
        again = parse(dumps_all(values), "fuzz-again")
        assert _plain(again) == _plain(values), f"sxp round trip changed {values!r} into {again!r}"
    try:
        config = config_from_sxp(text)
    except ConfigError:
        return
    back = config_from_sxp(config_to_sxp(config))
    assert back == config, f"config round trip changed {config!r} into {back!r}"


if __name__ == "__main__":
    main(one_input)

"""Argument types: each bad value becomes a usage error (exit 2) naming what was wrong."""

from __future__ import annotations

import argparse
import math

from relocd.errors import RelocdError
from relocd.units import RATE_UNITS_HELP, has_unit, parse_rate, parse_size

MIB = 1 << 20


def port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def channels(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 16:
        raise argparse.ArgumentTypeError(f"not a channel count from 1 to 16: {text!r}")
    return int(text)


def seconds(text: str) -> float:
    t = text.strip().removesuffix("s")
    try:
        value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def memory_mib(text: str) -> int:
    """As xl and xm read memory: ``512`` is MiB; ``512M``, ``2G``, ``1GiB`` are binary."""
    try:
        size = parse_size(text, default_unit=MIB)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size % MIB:
        hint = ""
        if text.strip().lower().endswith(("kb", "mb", "gb", "tb")):
            hint = " (MB and GB are decimal: write 512M, 2G or 2GiB for binary)"
        raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}{hint}")
    mib = size // MIB
    if mib < 1:
        raise argparse.ArgumentTypeError(f"memory must be at least 1 MiB: {text!r}")
    return mib


def rate(text: str) -> str:
    """A rate that says its unit (``100MB/s``, ``1GiB/s``, ``10Gbit/s``); the daemon gets the text."""
    if not has_unit(text):
        raise argparse.ArgumentTypeError(
            f"say the unit of {text!r}, e.g. {text.strip().removesuffix('/s')}MB/s ({RATE_UNITS_HELP})")
    try:
        value = parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive rate: {text!r}")
    return text


def vif(text: str) -> str:
    """A Xen vif spec (``mac=00:16:3e:01:02:03,ip=10.0.0.5 fd00::5,bridge=xenbr0``),
    checked here so a typo is a usage error; the daemon gets the text."""
    from relocd.config import parse_vif_spec

    try:
        parse_vif_spec(text)
    except RelocdError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text

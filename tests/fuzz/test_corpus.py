"""The kept fuzz corpus, run once through each harness (the fuzzing itself is tests/fuzz/run.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fuzz_codec
import fuzz_sxp
from fuzzlib import each_kept_input, mutate

HARNESSES = {"codec": fuzz_codec.one_input, "sxp": fuzz_sxp.one_input}


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_kept_corpus_runs_clean(name: str) -> None:
    inputs = list(each_kept_input(HERE / "corpus" / name))
    assert len(inputs) >= 8, "the kept corpus is missing"
    assert len(inputs) <= 60, "the kept corpus should stay a few dozen files: run.sh --keep minimises it"
    for filename, data in inputs:
        try:
            HARNESSES[name](data)
        except Exception as exc:  # pragma: no cover - a crash
            raise AssertionError(f"corpus/{name}/{filename}: {type(exc).__name__}: {exc}") from exc


def test_harness_oracles_can_fail() -> None:
    """The harnesses report a crash for anything but the allowed error (and pass it on)."""
    from relocd.config import sxp

    def broken(text: str, filename: str = "") -> list[object]:
        raise IndexError("a bug in the reader")

    real = sxp.parse
    try:
        fuzz_sxp.parse = broken  # type: ignore[assignment]
        with pytest.raises(IndexError):
            fuzz_sxp.one_input(b"(a)")
    finally:
        fuzz_sxp.parse = real  # type: ignore[assignment]


def test_mutations_stay_bounded() -> None:
    import random

    rng = random.Random(1)
    pool = [b"(a b)", bytes(100)]
    for _ in range(2000):
        assert len(mutate(rng.choice(pool), rng, pool)) <= 1 << 16

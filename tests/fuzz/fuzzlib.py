"""Shared driver for the fuzz harnesses: atheris when it is installed, else a mutation loop.

A harness defines ``one_input(data: bytes) -> None`` that raises only on a
crash (any exception the code under test may not raise), then calls
``main(one_input)``.  Command line, libFuzzer style in both modes::

    python fuzz_codec.py [-max_total_time=SECONDS] [-seed=N] [CORPUS_DIR ...]
    python fuzz_codec.py --fallback ...     # the plain loop even with atheris

atheris adds new coverage-increasing inputs to the first corpus directory;
the fallback loop only reads the corpus.  A crash is written to
``crash-<sha1>`` in the current directory (libFuzzer's habit) and re-raised.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import atheris  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the machine
    atheris = None

OneInput = Callable[[bytes], None]

_INTERESTING_U32 = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def instrumented() -> contextlib.AbstractContextManager[Any]:
    """Import the code under test inside this block so atheris can trace its coverage."""
    if atheris is None or "--fallback" in sys.argv or not _running_a_harness():
        return contextlib.nullcontext()  # e.g. imported by the pytest run over the corpus
    manager: contextlib.AbstractContextManager[Any] = atheris.instrument_imports(include=["relocd"])
    return manager


def _running_a_harness() -> bool:
    return Path(sys.argv[0]).name.startswith("fuzz_")


def corpus_files(dirs: list[Path]) -> list[Path]:
    return sorted(p for d in dirs if d.is_dir() for p in d.iterdir() if p.is_file())


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """One to eight stacked byte-level mutations (libFuzzer's simplest ones)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(8)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # an interesting byte
            buf[rng.randrange(len(buf))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, 0x28, 0x29, 0x27, 0x5C))
        elif op == 2 and len(buf) >= 4:  # an interesting big-endian u32 (lengths, counts)
            i = rng.randrange(len(buf) - 3)
            buf[i : i + 4] = rng.choice(_INTERESTING_U32).to_bytes(4, "big")
        elif op == 3:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and buf:  # delete a range
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 64)]
        elif op == 5 and buf:  # duplicate a range
            i = rng.randrange(len(buf))
            j = min(len(buf), i + rng.randint(1, 256))
            buf[i:i] = buf[i:j]
        elif op == 6 and pool:  # splice with another input
            other = rng.choice(pool)
            cut, cut2 = rng.randrange(len(buf) + 1), rng.randrange(len(other) + 1)
            buf = buf[:cut] + other[cut2:]
        elif op == 7 and len(buf) > 1:  # truncate
            del buf[rng.randrange(len(buf)) :]
    return bytes(buf[: 1 << 16])


def _crash(data: bytes) -> Path:
    path = Path(f"crash-{hashlib.sha1(data).hexdigest()}")
    path.write_bytes(data)
    return path


def fallback_loop(one_input: OneInput, dirs: list[Path], seconds: float, seed: int) -> int:
    """Mutate corpus inputs at random for ``seconds``; returns the number of runs."""
    rng = random.Random(seed)
    pool = [p.read_bytes() for p in corpus_files(dirs)] or [b""]
    for data in pool:  # the corpus itself first
        _run(one_input, data)
    deadline = time.monotonic() + seconds
    runs = len(pool)
    while time.monotonic() < deadline:
        for _ in range(200):
            _run(one_input, mutate(rng.choice(pool), rng, pool))
        runs += 200
    return runs


def _run(one_input: OneInput, data: bytes) -> None:
    try:
        one_input(data)
    except BaseException:
        path = _crash(data)
        print(f"==CRASH== input written to {path}", file=sys.stderr)
        raise


def _option(argv: list[str], name: str, default: str) -> str:
    for arg in argv:
        if arg.startswith(f"-{name}="):
            return arg.split("=", 1)[1]
    return default


def main(one_input: OneInput) -> None:
    argv = list(sys.argv)
    if atheris is not None and "--fallback" not in argv:
        atheris.Setup(argv, one_input)
        atheris.Fuzz()
        return
    argv = [a for a in argv if a != "--fallback"]
    seconds = float(_option(argv, "max_total_time", "60"))
    seed = int(_option(argv, "seed", str(int(time.time()))))
    dirs = [Path(a) for a in argv[1:] if not a.startswith("-")]
    start = time.monotonic()
    runs = fallback_loop(one_input, dirs, seconds, seed)
    print(f"fallback fuzzing: {runs} runs in {time.monotonic() - start:.0f} s, seed {seed}, no crash")


def each_kept_input(corpus: Path) -> Iterator[tuple[str, bytes]]:
    """The kept corpus, for the one pytest run over it."""
    for path in corpus_files([corpus]):
        yield path.name, path.read_bytes()

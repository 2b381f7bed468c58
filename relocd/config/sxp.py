"""S-expressions as xend wrote them: the syntax of ``xend-config.sxp``.

What the reader accepts is what xend's own parser (``xen/xend/sxp.py``)
accepts: ``#`` comments to the end of the line (inside lists too), strings in
``'`` or ``"`` with backslash escapes (``\\n``, ``\\t``, ``\\\\``, ``\\'``,
``\\xHH``, octal ``\\NNN``, ...), nested lists and bare atoms.  Every value is
a string; lists remember the line where they opened, so callers can report
``FILE line N: reason``.

Where xend was buggy the reader does the sane thing instead:

* an unknown escape such as ``\\.`` keeps both characters (xend dropped the
  character after the backslash), so ``'\\.'`` and ``'\\\\.'`` both read ``\\.``;
* ``\\xHH`` gives the right value (xend's hex escapes mis-decoded ``A``-``F``);
* lists nest at most :data:`MAX_DEPTH` deep, because domain configs come from
  untrusted peers.

The reader is iterative and raises nothing but :class:`ConfigError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Union

from relocd.errors import ConfigError

__all__ = [
    "MAX_DEPTH",
    "SxpList",
    "SxpValue",
    "SxpInput",
    "parse",
    "dumps",
    "dumps_all",
]

#: Deepest list nesting accepted; real configs use three or four levels.
MAX_DEPTH = 64

SxpValue = Union[str, "SxpList"]
#: What :func:`dumps` writes: strings, ints and (nested) sequences of them.
SxpInput = Union[str, int, Sequence["SxpInput"]]


class SxpList(list[SxpValue]):
    """A parsed list; ``line`` is the 1-based line of its opening parenthesis."""

    __slots__ = ("line",)

    def __init__(self, items: Iterable[SxpValue] = (), line: int = 0) -> None:
        super().__init__(items)
        self.line = line

    def __repr__(self) -> str:
        return f"SxpList({list.__repr__(self)}, line={self.line})"


_SPACE = " \t\n\v\f\r"
_QUOTES = "'\""
#: Whitespace and comments between values (xend's whitespace class, no more).
_SKIP = re.compile(r"(?:[ \t\n\v\f\r]+|#[^\n]*)*")
#: The rest of an atom: anything up to a separator, whitespace or a comment.
_ATOM_TAIL = re.compile(r"[^ \t\n\v\f\r{}()<>\[\]!;#]*")
_STRING_RUN = {q: re.compile(r"[^\\" + q + "]*") for q in _QUOTES}
_HEX = re.compile(r"[0-9a-fA-F]{1,2}")
_OCT = re.compile(r"[0-7]{1,3}")

_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "t": "\t",
    "n": "\n",
    "v": "\v",
    "f": "\f",
    "r": "\r",
    "\\": "\\",
    "'": "'",
    '"': '"',
}
_ESCAPES_REV = {v: k for k, v in _ESCAPES.items() if k not in "'\""}


class _Reader:
    """One pass over a text; ``pos`` and ``line`` track where we are."""

    def __init__(self, text: str, filename: str) -> None:
        self.text = text
        self.filename = filename
        self.pos = 0
        self.line = 1

    def error(self, line: int, reason: str) -> ConfigError:
        return ConfigError(f"{self.filename} line {line}: {reason}")

    def skip_blank(self) -> None:
        m = _SKIP.match(self.text, self.pos)
        assert m is not None  # the pattern matches the empty string
        self.line += self.text.count("\n", self.pos, m.end())
        self.pos = m.end()

    def read_all(self) -> list[SxpValue]:
        text = self.text
        top: list[SxpValue] = []
        stack: list[SxpList] = []
        while True:
            self.skip_blank()
            if self.pos >= len(text):
                if stack:
                    raise self.error(stack[-1].line, "unbalanced parenthesis: '(' never closed")
                return top
            c = text[self.pos]
            into = stack[-1] if stack else top
            if c == "(":
                if len(stack) >= MAX_DEPTH:
                    raise self.error(self.line, f"lists nested deeper than {MAX_DEPTH}")
                lst = SxpList(line=self.line)
                into.append(lst)
                stack.append(lst)
                self.pos += 1
            elif c == ")":
                if not stack:
                    raise self.error(self.line, "unbalanced parenthesis: ')' without '('")
                stack.pop()
                self.pos += 1
            elif c in _QUOTES:
                into.append(self.read_string())
            elif c.isprintable():
                m = _ATOM_TAIL.match(text, self.pos + 1)
                assert m is not None
                into.append(c + m.group())
                self.pos = m.end()
            else:
                raise self.error(self.line, f"invalid character U+{ord(c):04X}")

    def read_string(self) -> str:
        text = self.text
        delim = text[self.pos]
        start_line = self.line
        run = _STRING_RUN[delim]
        parts: list[str] = []
        self.pos += 1
        while True:
            m = run.match(text, self.pos)
            assert m is not None
            parts.append(m.group())
            self.line += m.group().count("\n")
            self.pos = m.end()
            if self.pos >= len(text):
                raise self.error(start_line, "unterminated string")
            if text[self.pos] == delim:
                self.pos += 1
                return "".join(parts)
            # A backslash: decode one escape.
            self.pos += 1
            if self.pos >= len(text):
                raise self.error(start_line, "unterminated string")
            parts.append(self.read_escape())

    def read_escape(self) -> str:
        text = self.text
        e = text[self.pos]
        if e in _ESCAPES:
            self.pos += 1
            return _ESCAPES[e]
        if e == "x":
            m = _HEX.match(text, self.pos + 1)
            if m is None:
                raise self.error(self.line, "invalid hex escape: '\\x' without hex digits")
            self.pos = m.end()
            return chr(int(m.group(), 16))
        m = _OCT.match(text, self.pos)
        if m is not None:
            value = int(m.group(), 8)
            if value > 0xFF:
                raise self.error(self.line, f"invalid octal escape: out of range '\\{m.group()}'")
            self.pos = m.end()
            return chr(value)
        # Unknown escape: keep the backslash; the character is read as usual.
        return "\\"


def parse(text: str, filename: str = "<string>") -> list[SxpValue]:
    """Read every value in ``text``; errors read ``FILENAME line N: reason``."""
    return _Reader(text, filename).read_all()


_BARE_ATOM = re.compile(r"[A-Za-z0-9._:/~@+=,-]+\Z")


def _quote(s: str) -> str:
    out = ["'"]
    for ch in s:
        if ch == "\\" or ch == "'":
            out.append("\\" + ch)
        elif ch in _ESCAPES_REV:
            out.append("\\" + _ESCAPES_REV[ch])
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append("'")
    return "".join(out)


def dumps(value: SxpInput) -> str:
    """Write one value on one line; ``parse(dumps(v)) == [v]`` for strings and lists."""
    if isinstance(value, str):
        return value if _BARE_ATOM.match(value) else _quote(value)
    if isinstance(value, bool):
        raise TypeError("sxp has no booleans; write 'yes' or 'no'")
    if isinstance(value, int):
        return str(value)
    return "(" + " ".join(dumps(item) for item in value) + ")"


def dumps_all(values: Iterable[SxpInput]) -> str:
    """Write several top-level values, one per line (a config file's shape)."""
    return "".join(dumps(v) + "\n" for v in values)

"""docs/protocol.md and the code must agree: tables and hex examples are checked."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from relocd.errors import Reason
from relocd.protocol import codec, fields, records
from relocd.protocol.codec import (
    HEADER_SIZE,
    PAGES_FIXED_SIZE,
    PREAMBLE,
    decode_body,
    decode_pages,
    encode,
    encode_pages_header,
    parse_header,
)
from relocd.protocol.records import (
    RECORD_CLASSES,
    Feature,
    OutcomeState,
    Record,
    RecordType,
)
from relocd.protocol.state import ABORTABLE, TRANSITIONS, ConversationState, Side, Step

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
TEXT = DOC.read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\s*$", TEXT, re.MULTILINE)
    assert match, f"no section {title!r} in {DOC.name}"
    level = len(match.group(1))
    rest = TEXT[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def table_rows(text: str) -> list[list[str]]:
    """Data rows of the first markdown table in ``text`` (cells stripped, backticks removed)."""
    rows: list[list[str]] = []
    started = False
    for line in text.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r"-+", c) for c in cells):
                rows.append(cells)
        elif started:
            break
    return rows[1:]  # drop the heading row


def test_type_code_table_matches_registry() -> None:
    rows = table_rows(section("Record types"))
    documented = {int(code, 16): (name, cls) for code, name, cls, *_ in rows}
    assert len(documented) == len(rows), "duplicate codes in the table"
    assert documented == {
        rtype.value: (rtype.name, RECORD_CLASSES[rtype].__name__) for rtype in RecordType
    }


def test_every_record_type_has_a_body_section() -> None:
    headings = re.findall(r"^### (0x[0-9a-f]{2}(?:.*))$", TEXT, re.MULTILINE)
    covered = {
        int(code, 16) for heading in headings for code in re.findall(r"0x[0-9a-f]{2}", heading)
    }
    assert covered == {rtype.value for rtype in RecordType}


def body_rows(rtype: RecordType) -> list[list[str]]:
    title = next(
        t
        for t in re.findall(r"^### (0x.*)$", TEXT, re.MULTILINE)
        if f"0x{rtype.value:02x} {rtype.name}" in t
    )
    return table_rows(section(title))


@pytest.mark.parametrize(
    "rtype",
    [t for t in RecordType if RECORD_CLASSES[t].MIN_BODY == RECORD_CLASSES[t].MAX_BODY],
    ids=lambda t: t.name,
)
def test_fixed_body_tables_add_up(rtype: RecordType) -> None:
    cls = RECORD_CLASSES[rtype]
    rows = body_rows(rtype) if cls.MAX_BODY else []
    offset = 0
    for row in rows:
        assert int(row[0]) == offset, f"{rtype.name}: field {row[3]} at offset {row[0]}"
        offset += int(row[1])
    assert offset == cls.MIN_BODY


def test_hello_and_pages_fixed_parts_add_up() -> None:
    for rtype, fixed_size in ((RecordType.HELLO, 33), (RecordType.PAGES, PAGES_FIXED_SIZE)):
        offset = 0
        for row in body_rows(rtype):
            if not row[1].isdigit():
                break
            assert int(row[0]) == offset
            offset += int(row[1])
        assert offset == fixed_size


def test_header_table_and_preamble() -> None:
    rows = table_rows(section("Record header"))
    assert [int(r[0]) for r in rows] == [0, 1, 2, 4, 8]
    assert sum(int(r[1]) for r in rows) == HEADER_SIZE
    assert [r[3] for r in rows] == ["type", "flags", "reserved", "length", "crc"]
    match = re.search(r"Preamble \(hex\): `([0-9a-f ]+)`", TEXT)
    assert match and bytes.fromhex(match.group(1)) == PREAMBLE
    assert sum(int(r[1]) for r in table_rows(section("Preamble"))) == len(PREAMBLE)


def test_feature_and_outcome_tables() -> None:
    hello = section("0x01 HELLO")
    features = table_rows(hello[hello.index("Feature bits") :])
    assert {(1 << int(bit), name) for bit, name, _ in features} == {
        (f.value, f.name) for f in Feature
    }
    outcome = section("0x32 OUTCOME")
    states = table_rows(outcome[outcome.index("| value |") :])
    assert {(int(v), name) for v, name, _ in states} == {(s.value, s.name) for s in OutcomeState}


def test_reason_table_matches_errors_module() -> None:
    rows = table_rows(section("Reason codes"))
    assert [(int(code), name) for code, name, _ in rows] == [(r.value, r.name) for r in Reason]


def test_limits_table_matches_constants() -> None:
    rows = table_rows(section("Limits"))
    assert rows
    for name, value, _ in rows:
        module = codec if hasattr(codec, name) else fields
        assert getattr(module, name) == int(value), name


def test_state_table_matches_transitions() -> None:
    steps = {step.value: step for step in Step}
    documented = {}
    for state, sender, step, nxt in table_rows(section("State table")):
        key = (ConversationState(state), Side(sender), steps[step])
        assert key not in documented, f"duplicate row {key}"
        documented[key] = ConversationState(nxt)
    abort_line = re.search(r"^ABORT states: (.+)$", TEXT, re.MULTILINE)
    assert abort_line
    abortable = {ConversationState(s.strip()) for s in abort_line.group(1).split(",")}
    assert abortable == ABORTABLE
    for abortable_state in abortable:
        for side in Side:
            documented[(abortable_state, side, Step.ABORT)] = ConversationState.ABORTED
    assert documented == TRANSITIONS


EXAMPLE = re.compile(r"^### Example: `(?P<expr>[^`]+)`\n(?P<prose>.*?)```hex\n(?P<hex>.*?)```", re.MULTILINE | re.DOTALL)


def examples() -> list[tuple[str, bytes]]:
    found = []
    for match in EXAMPLE.finditer(TEXT):
        lines = [line.split("#", 1)[0] for line in match.group("hex").splitlines()]
        found.append((match.group("expr"), bytes.fromhex(" ".join(lines))))
    return found


def evaluate(expr: str) -> Any:
    namespace: dict[str, Any] = {name: getattr(records, name) for name in dir(records)}
    namespace.update(
        Reason=Reason,
        MID=bytes.fromhex("00112233445566778899aabbccddeeff"),
        encode_pages_header=encode_pages_header,
    )
    return eval(expr, {"__builtins__": {"bytes": bytes}}, namespace)  # our own doc


def test_there_are_hex_examples() -> None:
    exprs = [expr for expr, _ in examples()]
    assert len(exprs) >= 8
    assert any(expr.startswith("encode_pages_header") for expr in exprs)


@pytest.mark.parametrize(("expr", "wire"), examples(), ids=[e for e, _ in examples()])
def test_hex_example_matches_codec(expr: str, wire: bytes) -> None:
    value = evaluate(expr)
    header = parse_header(wire, codec.DEFAULT_MAX_LENGTH)
    if isinstance(value, bytes):  # a PAGES header and descriptor
        assert value == wire
        pages = decode_pages(header, wire[HEADER_SIZE:])
        assert header.length == len(wire) - HEADER_SIZE + pages.payload_len
        assert isinstance(pages.data_pfns, np.ndarray)
        return
    assert isinstance(value, Record)
    assert encode(value) == wire
    assert decode_body(header, wire[HEADER_SIZE:]) == value

"""The sxp reader/writer against xend's parsing cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relocd.config.sxp import MAX_DEPTH, SxpList, dumps, dumps_all, parse
from relocd.errors import ConfigError

# (text, values) -- what xend's Parser produces for each input.
XEND_CASES = [
    ("", []),
    ("   \n\t  ", []),
    ("# only a comment", []),
    ("atom", ["atom"]),
    ("a b c", ["a", "b", "c"]),
    ("(a b)", [["a", "b"]]),
    ("()", [[]]),
    ("(a (b (c d)) e)", [["a", ["b", ["c", "d"]], "e"]]),
    ("(a # comment inside a list ) (\n b)", [["a", "b"]]),
    ("(a#comment\nb)", [["a", "b"]]),
    ("'single quoted'", ["single quoted"]),
    ('"double quoted"', ["double quoted"]),
    ("'it''s'", ["it", "s"]),
    ("'say \"hi\"'", ['say "hi"']),
    ('"it\'s"', ["it's"]),
    (r"'it\'s'", ["it's"]),
    (r'"a\"b"', ['a"b']),
    ("''", [""]),
    ("(x '')", [["x", ""]]),
    (r"'\\.'", ["\\."]),  # xend-config.sxp writes regex escapes doubled
    (r"'^.*\\.example\\.org$'", [r"^.*\.example\.org$"]),
    (r"'a\tb\nc'", ["a\tb\nc"]),
    (r"'\a\b\v\f\r'", ["\a\b\v\f\r"]),
    (r"'\x41\x4a\x4A'", ["AJJ"]),
    (r"'\101\0x'", ["A\0x"]),
    (r"'\7'", ["\7"]),
    ("'# not a comment'", ["# not a comment"]),
    ("'(not a list)'", ["(not a list)"]),
    ("'multi\nline'", ["multi\nline"]),
    ("a;b", ["a", ";b"]),  # separators end an atom and may start the next
    ("{x}", ["{x", "}"]),
    ("ab'c", ["ab'c"]),  # a quote inside an atom is part of it
    ("(xen-api-server ((9363 pam '^localhost$ example\\\\.com$') (unix none)))",
     [["xen-api-server", [["9363", "pam", r"^localhost$ example\.com$"], ["unix", "none"]]]]),
    ("(dom0-min-mem 196)", [["dom0-min-mem", "196"]]),
    ("(vncpasswd '')", [["vncpasswd", ""]]),
    ("(a\r\nb)", [["a", "b"]]),
    ("(caf\u00e9 \u00e9t\u00e9)", [["caf\u00e9", "\u00e9t\u00e9"]]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), XEND_CASES)
def test_xend_parsing_cases(text: str, expected: list[object]) -> None:
    assert parse(text) == expected


def test_unknown_escape_keeps_backslash_and_character() -> None:
    # xend dropped the character after an unknown escape; relocd keeps it.
    assert parse(r"'\.\d'") == [r"\.\d"]


def test_lists_remember_their_line() -> None:
    values = parse("# header\n\n(a\n  (b c)\n  'x\ny'\n  (d))\n(e)")
    outer, last = values
    assert isinstance(outer, SxpList) and isinstance(last, SxpList)
    assert outer.line == 3
    assert isinstance(outer[1], SxpList) and outer[1].line == 4
    assert isinstance(outer[3], SxpList) and outer[3].line == 7  # the string spans two lines
    assert last.line == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(a b", "conf.sxp line 1: unbalanced parenthesis: '(' never closed"),
        ("\n\n(a (b c)\n", "conf.sxp line 3: unbalanced parenthesis: '(' never closed"),
        ("(a))", "conf.sxp line 1: unbalanced parenthesis: ')' without '('"),
        ("\n)", "conf.sxp line 2: unbalanced parenthesis: ')' without '('"),
        ("(a 'b)\n\n", "conf.sxp line 1: unterminated string"),
        ('\n(a "b\\"', "conf.sxp line 2: unterminated string"),
        ("'abc\\", "conf.sxp line 1: unterminated string"),
        ("\n\n'\\777'", "conf.sxp line 3: invalid octal escape: out of range '\\777'"),
        ("'\\xzz'", "conf.sxp line 1: invalid hex escape: '\\x' without hex digits"),
        ("(a \x01)", "conf.sxp line 1: invalid character U+0001"),
        ("(a\n\x00)", "conf.sxp line 2: invalid character U+0000"),
        ("(" * (MAX_DEPTH + 1), f"conf.sxp line 1: lists nested deeper than {MAX_DEPTH}"),
    ],
)
def test_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(text, "conf.sxp")
    assert exc.value.message == message


def test_nesting_up_to_the_limit_is_fine() -> None:
    text = "(" * MAX_DEPTH + ")" * MAX_DEPTH
    value = parse(text)[0]
    depth = 0
    while isinstance(value, list) and value:
        value = value[0]
        depth += 1
    assert depth == MAX_DEPTH - 1


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("web1", "web1"),
        ("00:16:3e:01:02:03", "00:16:3e:01:02:03"),
        ("/var/lib/relocd", "/var/lib/relocd"),
        ("", "''"),
        ("two words", "'two words'"),
        ("it's", r"'it\'s'"),
        ("back\\slash", r"'back\\slash'"),
        ("tab\there", r"'tab\there'"),
        ("\x01", r"'\x01'"),
        ("(x)", "'(x)'"),
        ("#x", "'#x'"),
        (["a", ["b", "c d"], 5], "(a (b 'c d') 5)"),
        ([], "()"),
    ],
)
def test_dumps(value: object, text: str) -> None:
    assert dumps(value) == text  # type: ignore[arg-type]


def test_dumps_rejects_booleans() -> None:
    with pytest.raises(TypeError):
        dumps(True)


def test_dumps_all_is_a_config_file() -> None:
    text = dumps_all([["xend-relocation-port", 8002], ["xend-relocation-hosts-allow", r"^a\.b$"]])
    assert text == "(xend-relocation-port 8002)\n(xend-relocation-hosts-allow '^a\\\\.b$')\n"
    assert parse(text) == [["xend-relocation-port", "8002"], ["xend-relocation-hosts-allow", r"^a\.b$"]]


# --- properties -----------------------------------------------------------

sxp_values = st.recursive(
    st.text(max_size=12),
    lambda children: st.lists(children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(sxp_values)
def test_dumps_round_trips(value: object) -> None:
    assert parse(dumps(value)) == [value]  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("()'\"\\#x0 \n\tab;{}") + ["\x00", "\u00e9", "7"]), max_size=60))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        values = parse(text)
    except ConfigError as e:
        assert " line " in e.message and e.message.startswith("<string>")
        return
    # Whatever parses writes back to something that parses to the same values.
    assert parse(dumps_all(values)) == values


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_unicode_raises_only_config_error(text: str) -> None:
    try:
        parse(text)
    except ConfigError:
        pass

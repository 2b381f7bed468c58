"""docs/design.md's package map names exactly what is under relocd/.

The rule (written in the map's own section): a table row whose first cell
is a backticked path starting with ``relocd/`` names a module (``.py``) or a
directory (ending in ``/``); every ``.py`` file except ``__init__.py``, and
every directory, under ``relocd/`` has one.  Nothing else is parsed.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "design.md"
ROW = re.compile(r"^\|\s*`(relocd/[^`]*)`\s*\|(.*)\|\s*$")


def map_section(text: str) -> str:
    """From '## Package map' to the next level-2 heading."""
    start = text.index("\n## Package map")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def mapped_paths(section: str) -> dict[str, str]:
    """Path -> description, one per row; a repeated path fails here."""
    rows: dict[str, str] = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m is None:
            continue
        path, description = m.group(1), m.group(2).strip()
        assert path not in rows, f"design.md package map lists {path} twice"
        assert description, f"design.md package map: {path} has no description"
        rows[path] = description
    return rows


def existing_paths() -> set[str]:
    root = REPO / "relocd"
    found = {"relocd/"}
    for p in root.rglob("*"):
        if "__pycache__" in p.parts:
            continue
        rel = p.relative_to(REPO).as_posix()
        if p.is_dir():
            found.add(rel + "/")
        elif p.suffix == ".py" and p.name != "__init__.py":
            found.add(rel)
    return found


def test_map_section_parses() -> None:
    rows = mapped_paths(map_section(DOC.read_text(encoding="utf-8")))
    assert "relocd/engine/source.py" in rows  # the rule still finds the rows at all


def test_every_mapped_path_exists() -> None:
    rows = mapped_paths(map_section(DOC.read_text(encoding="utf-8")))
    missing = sorted(p for p in rows if p not in existing_paths())
    assert not missing, f"docs/design.md's package map names what is not under relocd/: {missing}"


def test_every_module_is_mapped() -> None:
    rows = mapped_paths(map_section(DOC.read_text(encoding="utf-8")))
    unmapped = sorted(existing_paths() - set(rows))
    assert not unmapped, f"docs/design.md's package map lacks a row for: {unmapped}"


def test_rule_reads_rows_only() -> None:
    section = "\n## Package map\n| `relocd/a.py` | one |\nsee `relocd/b.py` in prose\n| x | `relocd/c.py` |\n"
    assert mapped_paths(map_section(section + "\n## Next\n| `relocd/d.py` | later |\n")) == {"relocd/a.py": "one"}

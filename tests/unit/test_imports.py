"""The layers' import graph has no cycles (issue 11: server/ and engine/ none).

Counted: module-level imports that run (not under ``if TYPE_CHECKING:``,
not inside a function).  A cycle there means two modules that cannot be
understood, or tested, one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "relocd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)

    visit(tree.body)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    known = set(files)
    return {name: runtime_imports(path, known) - {name} for name, path in files.items()}


def cycles_within(prefixes: tuple[str, ...], edges: dict[str, set[str]]) -> list[list[str]]:
    nodes = {n for n in edges if n.startswith(prefixes)}
    sub = {n: {m for m in edges[n] if m in nodes} for n in nodes}
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(sub[n]):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                walk(m)
        stack.pop()
        state[n] = 2

    for n in sorted(nodes):
        if n not in state:
            walk(n)
    return found


def test_the_checker_finds_a_cycle() -> None:
    edges = {"relocd.engine.a": {"relocd.engine.b"}, "relocd.engine.b": {"relocd.engine.a"}}
    assert cycles_within(("relocd.engine",), edges) == [["relocd.engine.a", "relocd.engine.b", "relocd.engine.a"]]


def test_engine_has_no_import_cycle() -> None:
    assert cycles_within(("relocd.engine.",), graph()) == []


def test_server_has_no_import_cycle() -> None:
    assert cycles_within(("relocd.server.",), graph()) == []


def test_server_operations_never_see_the_daemon() -> None:
    """Operations, saves and recovery take the fully built host, not the daemon."""
    edges = graph()
    for name in ("relocd.server.operations", "relocd.server.saveops", "relocd.server.recovery"):
        text = (PKG / "server" / (name.rsplit(".", 1)[1] + ".py")).read_text(encoding="utf-8")
        assert "relocd.server.daemon" not in text, name
        assert "relocd.server.daemon" not in edges[name]

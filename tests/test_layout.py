"""The house plan, held by tests: which package may import which, and no import loops.

Imports are read from the source (``ast``), those inside functions too: an import put in a
function to dodge a loop is still a loop between the two modules.

- ``signing`` imports neither ``gateway`` nor ``storage``; ``storage`` never imports
  ``gateway``.
- Inside ``gateway``, the pipeline (events, keys, buffer, flusher) imports nothing from
  ``http``, ``outbox`` or ``run``; ``http`` and ``outbox`` import nothing from ``run``.
- No two modules import each other, directly or round a longer loop.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "signing", "storage")


def modules() -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The modules of the three packages that ``name`` imports, wherever the import is."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known(alias.name, known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop] if drop else base
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                # ``from package import module`` names a module; else the package itself.
                if f"{target}.{alias.name}" in known:
                    yield f"{target}.{alias.name}"
                else:
                    yield from _known(target, known)


def _known(target: str, known: dict[str, Path]) -> Iterator[str]:
    while target and target not in known:
        target = target.rpartition(".")[0]
    if target:
        yield target


def graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {t for t in imported(name, path, known) if t != name} for name, path in known.items()
    }


def test_signing_and_storage_never_import_their_callers() -> None:
    for name, targets in graph().items():
        if name.startswith("signing"):
            assert not {t for t in targets if t.startswith(("gateway", "storage"))}, name
        if name.startswith("storage"):
            assert not {t for t in targets if t.startswith("gateway")}, name


def test_the_gateway_rooms_import_downward_only() -> None:
    # What each room of gateway/ must never import (the package faces, __init__, aside).
    never = {
        "gateway.pipeline": ("gateway.http", "gateway.outbox", "gateway.run"),
        "gateway.outbox": ("gateway.http", "gateway.run"),
        "gateway.http": ("gateway.run",),
        "gateway.settings": ("gateway.http", "gateway.pipeline", "gateway.outbox", "gateway.run"),
        "gateway.metrics": ("gateway.http", "gateway.pipeline", "gateway.outbox", "gateway.run"),
    }
    wrong = [
        (name, target)
        for name, targets in graph().items()
        for room, banned in never.items()
        if name == room or name.startswith(room + ".")
        for target in targets
        if target.startswith(banned)
    ]
    assert wrong == []


def test_no_module_imports_itself_round_a_loop() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_the_graph_sees_the_imports_it_should() -> None:
    """The checks above are only as good as the graph: it must see a plain import, a
    relative one and one inside a function."""
    edges = graph()
    assert "gateway.pipeline.keyspace" in edges["gateway.pipeline.buffer"]
    assert "storage.base" in edges["storage.connect"]
    assert "storage.models" in edges["storage.pairing"] or "storage.models" in edges["storage"]
    assert "gateway.http.app" in edges["gateway.run.server"]  # imported inside a function


# A file a reader can take in one sitting (STYLE.md: "Shape"). A module that is mostly a
# data table may be longer; none is today.
MAX_MODULE_LINES = 550


def test_no_module_is_longer_than_a_sitting() -> None:
    long = {
        name: lines
        for name, path in modules().items()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}

"""The layout holds: one import name, rooms that import one way, no circle, one status table, short files.

Imports are read from the source (every `import` and `from … import`, function-local ones included), so
a circle hidden inside a function fails here as surely as one at the top of a module.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders setup.py maps into the namespace (read from it, so the test follows the mapping).
ROOMS = dict(re.findall(r'"(lookalike(?:\.\w+)?)": "(\w+)"', (ROOT / "setup.py").read_text()))

# Which rooms each room may import (itself always). Down the list of lookalike/__init__.py's docstring.
ALLOWED = {
    "core": set(),
    "catalogs": {"core"},
    "serving": {"core"},
    "transformer": {"core", "catalogs", "serving"},
    "training": {"core", "catalogs"},
    "predictor": {"core", "catalogs", "serving", "training"},
    "pipelines": {"core", "catalogs", "serving", "training", "predictor"},
    "deploy": {"core"},
    "app": {"core", "catalogs", "serving", "transformer", "training", "predictor", "pipelines", "deploy"},
    "cli": {"core", "catalogs", "serving", "transformer", "training", "predictor", "pipelines", "deploy", "app"},
}
MAX_LINES = 500
LONG_REASON = "Why this file is long:"  # a module over MAX_LINES says why, in its docstring


def modules() -> dict[str, Path]:
    """Every module of the namespace: dotted name -> file."""
    found = {}
    for package, folder in ROOMS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            if package == "lookalike" and rel and f"lookalike.{rel[0]}" in ROOMS:
                continue
            parts = [p for p in rel if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target.startswith("lookalike") and target != name:
                out.add(target)
    return out


def room_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "lookalike"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def test_one_top_level_name():
    assert ROOMS and all(name == "lookalike" or name.startswith("lookalike.") for name in ROOMS)
    for folder in ("lookalike", "transformer", "training", "predictor", "pipelines"):
        assert folder in ROOMS.values(), f"{folder}/ is not mapped into the namespace"
    # No stray top-level package: every folder with an __init__.py at the root is a mapped room.
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages <= set(ROOMS.values()), packages - set(ROOMS.values())


def test_no_import_cycle(graph):
    """Tarjan's strongly connected components: any component of two or more modules is a circle."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_rooms_import_one_way(graph):
    wrong = []
    for module, targets in graph.items():
        room = room_of(module)
        if room == "lookalike":
            assert not targets, f"lookalike/__init__.py imports {targets}: it must import nothing"
            continue
        for target in targets:
            other = room_of(target)
            if other != room and other not in ALLOWED[room]:
                wrong.append(f"{module} imports {target} ({room} may not import {other})")
    assert not wrong, "\n".join(wrong)


def test_one_status_of_and_one_wire_table():
    defs = [f"{path}" for path in modules().values() if re.search(r"^def status_of\(", path.read_text(), re.M)]
    assert [Path(d).relative_to(ROOT).as_posix() for d in defs] == ["lookalike/core/errors.py"]
    tables = [p for p in modules().values() if "StatusCode." in p.read_text()]
    assert [p.relative_to(ROOT).as_posix() for p in tables] == ["lookalike/serving/errors.py"]


def test_long_files_say_why():
    files = list(modules().values()) + sorted((ROOT / "tests").rglob("*.py")) + sorted(
        (ROOT / "benchmarks").glob("*.py"))
    long = []
    for path in files:
        text = path.read_text()
        if text.count("\n") > MAX_LINES and LONG_REASON not in text[:3000]:
            long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    assert not long, f"files over {MAX_LINES} lines without '{LONG_REASON}' in their docstring: {long}"


def test_the_namespace_imports_as_installed():
    """The rooms import under their one name (the editable install maps the folders as a wheel would)."""
    import lookalike.core.errors
    import lookalike.predictor.index
    import lookalike.transformer

    assert Path(lookalike.transformer.__file__).parent == ROOT / "transformer"
    assert Path(lookalike.predictor.index.__file__).parent == ROOT / "predictor" / "index"
    assert hasattr(lookalike.core.errors, "status_of")

"""The floors of the architecture, checked on the source: imports point down only, the
module graph has no cycle, and modules stay small enough to read in one sitting."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# schemas -> engine | relabelers -> trainers -> jobs: a floor imports only floors below it
# (engine and relabelers stand side by side and never import each other).
FLOORS = {"schemas": 0, "engine": 1, "relabelers": 1, "trainers": 2, "jobs": 3}
LONGEST_MODULE = 500
LONG_MODULE_REASON = "Why this module is long:"


@functools.cache
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the five floors."""
    found = {}
    for floor in FLOORS:
        for path in sorted((ROOT / floor).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, name: str) -> set[str]:
    """Every module of ours that `path` imports, at the top or inside a function."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return {module for module in found if module.split(".")[0] in FLOORS}


def top_level_imports(path: Path) -> set[str]:
    """Modules imported when the module itself is imported (not inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from engine import storage` imports engine.storage; `from engine.dataset
            # import Dataset` imports engine.dataset.
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules() else node.module)
    return {module for module in found if module.split(".")[0] in FLOORS}


def test_imports_point_down_the_floors():
    wrong = []
    for name, path in modules().items():
        floor = name.split(".")[0]
        for target in imports_of(path, name):
            other = target.split(".")[0]
            if other == floor:
                continue
            if FLOORS[other] >= FLOORS[floor]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_nothing_below_jobs_imports_jobs():
    below = [n for n in modules() if not n.startswith("jobs")]
    offenders = [
        f"{name} imports {target}"
        for name in below
        for target in imports_of(modules()[name], name)
        if target.split(".")[0] == "jobs"
    ]
    assert not offenders


def test_the_module_graph_has_no_cycle():
    """Module-level imports only (those inside functions run later and cannot deadlock an
    import); each import resolved to the most specific module of ours it names."""
    known = modules()

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    graph = {
        name: sorted({m for t in top_level_imports(path) if (m := resolve(t)) and m != name})
        for name, path in known.items()
    }
    done: set[str] = set()

    def find_cycle(node: str, trail: list[str]) -> list[str] | None:
        if node in trail:
            return trail[trail.index(node) :] + [node]
        if node in done:
            return None
        for nxt in graph[node]:
            cycle = find_cycle(nxt, trail + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = find_cycle(node, [])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_are_small_or_say_why(name):
    path = modules()[name]
    lines = len(path.read_text().splitlines())
    if lines <= LONGEST_MODULE:
        return
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert LONG_MODULE_REASON in docstring, (
        f"{path.relative_to(ROOT)} has {lines} lines; split it along its seams or say "
        f"'{LONG_MODULE_REASON} ...' in its docstring"
    )

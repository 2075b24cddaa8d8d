"""The import direction of ``src/ibkit``: library below, application on top, no cycles.

Reads every module's imports (function-level ones included) with ``ast`` and checks them against the
layer table, which is docs/architecture.md in code. A new top-level package must be added here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ibkit"

# part -> the parts it may import (its own part is always allowed). Root modules count as parts.
ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "data": {"models"},
    "processor": {"models", "data"},
    "convert": {"models", "data", "processor"},
    "eval": {"models", "data", "processor"},
    "metrics": {"eval"},
    "training": {"models", "data", "processor", "convert", "eval"},
    "bench": {"models", "data", "processor", "convert", "eval", "training", "__init__"},
    "app": {"models", "data", "processor", "convert", "eval", "training", "bench", "__init__"},
    "shapes": {"models", "data", "processor", "convert", "eval", "training", "app"},
    "__init__": {"models", "processor"},
    "__main__": {"app"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str], name: str | None = None) -> set[str]:
    """The ibkit modules ``path`` imports: ``from ibkit.a import b`` counts as ``ibkit.a.b`` when that is a
    module, else ``ibkit.a``; relative imports are resolved against the module's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = name or module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(name for name in targets if name == "ibkit" or name.startswith("ibkit."))
    return found


def part_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imported_modules(path, known) for name, path in modules.items()}


def test_every_part_is_in_the_layer_table():
    parts = {part_of(name) for name in all_modules()}
    assert parts <= set(ALLOWED), f"add {sorted(parts - set(ALLOWED))} to ALLOWED (and docs/architecture.md)"


def test_imports_only_go_down():
    wrong = []
    for module, targets in import_graph().items():
        source = part_of(module)
        for target in sorted(targets):
            dest = part_of(target)
            if dest != source and dest not in ALLOWED[source]:
                wrong.append(f"{module} imports {target} ({source} may import {sorted(ALLOWED[source])})")
    assert not wrong, "imports against the layer direction:\n" + "\n".join(wrong)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    # a package's __init__ re-exporting its submodules is not a cycle unless a submodule imports the
    # package itself back (that one is: the submodule then depends on every sibling)
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ibkit.training.module import X\n")
    assert imported_modules(module, {"ibkit.training.module"}, "ibkit.models.m") == {"ibkit.training.module"}
    assert "training" not in ALLOWED["models"] and "app" not in ALLOWED["data"]


@pytest.mark.parametrize("module", sorted(all_modules()))
def test_modules_stay_readable(module):
    """No module over ~500 lines, except the declarative tables listed here."""
    long_tables = {"ibkit.eval.ptb_tokenizer"}  # PTB tokenizer rules table
    lines = len(all_modules()[module].read_text().splitlines())
    assert module in long_tables or lines <= 520, f"{module} has {lines} lines"

"""The house in layers: each package of src/headstart imports only the layers below it (read from the code's own
imports, lazy and type-only ones included), nothing imports in a cycle, no module loads ours by name through
importlib, and the settings record has one field per option. docs/design.md draws the same table."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from headstart import options
from headstart.settings import Settings

SRC = Path(__file__).resolve().parents[1] / "src" / "headstart"

# Bottom first. A module may import its own layer and those listed before it.
LAYERS: list[set[str]] = [
    {"errors", "options", "settings", "paths", "progress", "text", "numeric", "records"},
    {"data"},
    {"vision"},
    {"backbones"},
    {"runtime"},
    {"cache"},
    {"heads"},
    {"evaluate"},
    {"train"},
    {"serve"},
    {"api"},
    {"tasks", "track"},
    {"cli", "__main__"},
]
RANK = {name: n for n, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every headstart module `path` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("headstart"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("headstart")}
    return {m for m in found if m in modules}


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_package_is_in_a_layer() -> None:
    assert {_layer(m) for m in _modules()} - {""} <= set(RANK), "add the new package to LAYERS (and docs/design.md)"


def test_imports_run_downwards() -> None:
    modules = _modules()
    upward = [f"{m} -> {t}" for m, path in modules.items() if _layer(m)
              for t in _imports(path, modules) if _layer(t) and RANK[_layer(t)] > RANK[_layer(m)]]
    assert upward == []


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: _imports(path, modules) - {m} for m, path in modules.items()}
    graph = {m: {t for t in deps if t != "headstart"} for m, deps in graph.items() if m != "headstart"}
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def cycle_from(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t] if t in path else [m, t]
            if t not in state and (found := cycle_from(t, path + [t])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            assert (found := cycle_from(m, [m])) is None, " -> ".join(found)


def test_no_module_loads_ours_by_name() -> None:
    """importlib may look for other packages (a weights package, a version); our own modules are imported."""
    loads = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                first = node.args[0] if node.args else None
                ours = isinstance(first, ast.Constant) and str(first.value).startswith("headstart")
                if name in ("import_module", "__import__") or (name == "find_spec" and ours):
                    loads.append(f"{path.name}:{node.lineno}")
    assert loads == []


def test_settings_has_one_field_per_option_with_its_default() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    assert fields == dict(options.DEFAULTS)

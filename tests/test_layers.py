"""The package's layers (docs/development.md) match its imports: a module imports only
from its own layer or the ones below, and no module-level import cycle exists."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clues_fl"

# Lowest first; a module belongs to the first (longest) prefix that names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("names", "plugins", "console")),
    ("config", ("config", "keytable")),
    ("core", ("data", "model", "scoring", "selection", "aggregation", "reporting.evaluation", "runtime", "export",
              "outputs")),
    ("federation", ("federation",)),
    ("rounds", ("strategies.site_rounds",)),
    ("server", ("server", "reporting")),
    ("strategy", ("strategies",)),
    ("apps", ("server_app", "client_app", "launch", "experiments")),
]


@functools.cache
def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer(name: str) -> int:
    best, where = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, where = len(prefix), index
    if where is None:
        raise AssertionError(f"clues_fl.{name} is in no layer of docs/development.md")
    return where


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The clues_fl modules `path` imports (not those under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clues_fl"):
            base = node.module.removeprefix("clues_fl").lstrip(".")
            for alias in node.names:  # `from clues_fl.x import y`: y may be a module
                full = f"{base}.{alias.name}" if base else alias.name
                out.add(full if full in modules() else base)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("clues_fl.") for a in node.names if a.name.startswith("clues_fl.")}
    return {m for m in out if m}


def test_every_module_imports_only_its_layer_and_the_ones_below():
    bad = []
    for name, path in modules().items():
        if not name:
            continue
        for target in imports(path):
            if layer(target) > layer(name):
                bad.append(f"{name} ({LAYERS[layer(name)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
    assert not bad, "\n".join(bad)


def _with_packages(names: set[str]) -> set[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    out = set(names)
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules()}
    return out


def test_no_module_level_import_cycle():
    graph = {name: _with_packages(imports(path, top_level_only=True)) for name, path in modules().items() if name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_layer_map_in_the_docs_is_this_one():
    text = (PACKAGE.parent / "docs" / "development.md").read_text()
    for name, prefixes in LAYERS:
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(f"{name} ")), None)
        assert line is not None, f"docs/development.md has no '{name}' layer line"
        for prefix in prefixes:
            assert prefix.replace(".", "/") in line, (name, prefix)

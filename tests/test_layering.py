"""The layer rule of the README, checked on every import in `elision/` (function-level imports included).

Rooms, in order: errors <- kernels <- ir <- models <- frontend <- analysis <- passes <- lowering <- apps <- cli.
A module may import its own room and the rooms before it; `runtime` (the torch-free artifact runtime) may import
only itself and `errors`. No two modules may import each other, directly or through others.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "elision"
ORDER = ["errors", "kernels", "ir", "models", "frontend", "analysis", "passes", "lowering", "apps", "cli"]
RUNTIME_MAY_IMPORT = {"runtime", "errors"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported elision module, line) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: (None if path.name == "__init__.py" else -1)]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            candidates = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for target in candidates:
            if target in mods and target != name:
                found.append((target, node.lineno))
                break
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _allowed(src: str, dst: str) -> bool:
    a, b = _room(src), _room(dst)
    if a == "" or a == b:
        return True  # the package root (`elision.compile`) delegates to any room lazily
    if b == "":
        return a == "cli"  # the root package delegates to apps: only the CLI sits above it
    if a == "runtime":
        return b in RUNTIME_MAY_IMPORT
    if b == "runtime":
        return ORDER.index(a) >= ORDER.index("lowering")
    return ORDER.index(b) < ORDER.index(a)


def test_every_module_belongs_to_a_room():
    rooms = set(ORDER) | {"runtime"}
    stray = [m for m in _modules() if m != "elision" and _room(m) not in rooms]
    assert not stray, f"modules outside the rooms of the layer rule: {stray}"


def test_nothing_imports_upward():
    mods = _modules()
    upward = []
    for name, path in sorted(mods.items()):
        for target, line in _imports(name, path, mods):
            if not _allowed(name, target):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} -> {target}")
    assert not upward, "imports against the layer rule:\n" + "\n".join(upward)


def test_no_import_cycles():
    mods = _modules()
    graph = nx.DiGraph()
    for name, path in mods.items():
        for target, _ in _imports(name, path, mods):
            # a package importing its own submodules (re-exports) is how packages are built, not a cycle
            if not target.startswith(name + "."):
                graph.add_edge(name, target)
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)

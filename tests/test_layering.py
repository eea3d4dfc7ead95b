"""The layer rule of the README, checked on every import in `elision/` (function-level imports included).

Rooms, in order: errors <- kernels <- ir <- models <- frontend <- analysis <- passes <- lowering <- apps <- cli.
A module may import its own room and the rooms before it; `runtime` (the torch-free artifact runtime) may import
only itself and `errors`. No two modules may import each other, directly or through others.

Imports sit at module top; one inside a function says why in a comment (an optional heavy dependency, an import
cycle, start-up time of the CLI), on its line or the line above (a run of imports shares the comment above it).
"""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "elision"
ORDER = ["errors", "kernels", "ir", "models", "frontend", "analysis", "passes", "lowering", "apps", "cli"]
RUNTIME_MAY_IMPORT = {"runtime", "errors"}
# rooms whose function-level imports must each carry a comment saying why they are not at module top ("" is the
# package root; the CLI's say `# lazy: ...`: what importing them costs `elision --help`, or an optional extra)
COMMENTED_LOCAL_IMPORTS = {"", *ORDER, "runtime"}


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


def _function_level_imports(tree: ast.Module) -> list[tuple[ast.stmt, ast.stmt | None]]:
    """(import statement inside a function, the statement right before it in the same block or None)."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            previous = None
            for stmt in block:
                if in_function and isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    found.append((stmt, previous))
                visit(stmt, in_function or isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)))
                previous = stmt

    visit(tree, False)
    return found


def _uncommented_local_imports(source: str) -> list[int]:
    """First lines of the function-level imports of `source` with no comment on their line or the line above
    (an import directly after a commented import of the same block shares its comment)."""
    comment_lines = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                     if tok.type == tokenize.COMMENT}
    commented: set[int] = set()
    missing = []
    for stmt, previous in _function_level_imports(ast.parse(source)):
        line = stmt.lineno
        grouped = (isinstance(previous, (ast.Import, ast.ImportFrom)) and previous.end_lineno == line - 1
                   and id(previous) in commented)
        if line in comment_lines or line - 1 in comment_lines or grouped:
            commented.add(id(stmt))
        else:
            missing.append(line)
    return missing


def test_function_level_imports_say_why():
    missing = []
    for name, path in sorted(_modules().items()):
        if _room(name) in COMMENTED_LOCAL_IMPORTS:
            for line in _uncommented_local_imports(path.read_text()):
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {path.read_text().splitlines()[line - 1].strip()}")
    assert not missing, ("function-level imports without a comment saying why (move them to module top, or say "
                         "why not: optional heavy dependency, import cycle, CLI start-up):\n" + "\n".join(missing))


def test_the_import_comment_check_finds_what_it_should():
    source = """
import os


def top():
    import json  # optional: json
    import re

    x = 1
    import csv


def group():
    # cycle: the next two
    from a import b
    from c import d


def nested():
    try:  # optional dependency
        import yaml
    except ImportError:
        import toml
"""
    lines = source.splitlines()
    assert [lines[n - 1].strip() for n in _uncommented_local_imports(source)] == ["import csv", "import toml"]

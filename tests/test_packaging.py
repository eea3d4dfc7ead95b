"""pyproject.toml declares what the code imports, and the metadata builds without setuptools warnings.

* Every third-party module imported anywhere in `elision/` or `tools/` (function-level imports included) belongs to
  a distribution named in `dependencies` or in an extra (`importlib.metadata` maps modules to the installed
  distributions; `make test` installs every extra).
* The `gpu` extra is ONNX Runtime's CUDA wheel, in step with the CPU wheel it replaces, and only one of the two
  provides the `onnxruntime` module here; elision runs artifacts on the providers that runtime reports.
* The setuptools backend writes the editable metadata with no warning (what `pip install -e .` runs).
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import onnxruntime as ort

from elision.errors import EXTRA_MODULES
from elision.runtime.artifact import select_providers

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCANNED = ("elision", "tools")


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string (PEP 503: lowercase, runs of -_. become -)."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, str]:
    """distribution name -> where it is declared ("dependencies" or "extra NAME")."""
    where = {_name(r): "dependencies" for r in PYPROJECT["project"]["dependencies"]}
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        for r in requirements:
            where.setdefault(_name(r), f"extra {extra}")
    return where


def _local_modules() -> set[str]:
    """Modules of this repository that scripts import by path (tools/ and tests/ put their folders on sys.path), and
    the folders themselves (imported as namespace packages from the repository root: `from tools.arch_zoo import`)."""
    return {"tools", "tests"} | {p.stem for folder in ("tools", "tests") for p in (ROOT / folder).rglob("*.py")}


def _imported_modules(folders: tuple[str, ...] = SCANNED) -> dict[str, str]:
    """Top-level module -> first file:line importing it, for every absolute import in `folders`."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_third_party_import_is_declared():
    declared = _declared()
    providers = importlib.metadata.packages_distributions()
    skip = set(sys.stdlib_module_names) | {"__future__", "elision"} | _local_modules()
    undeclared = []
    for module, where in sorted(_imported_modules().items()):
        if module in skip:
            continue
        dists = {_name(d) for d in providers.get(module, [])} or {_name(module)}
        if not dists & declared.keys():
            undeclared.append(f"{where}: imports {module} (distribution {', '.join(sorted(dists))}) not declared")
    assert not undeclared, "declare these in pyproject.toml (dependencies or an extra):\n" + "\n".join(undeclared)


def test_the_missing_extra_errors_know_every_optional_module_elision_imports():
    """`elision.errors.EXTRA_MODULES`, which turns a failed import into "needs the 'X' extra: pip install ...", lists
    each module that `elision/` imports from an extra's distributions (and only from an extra), under that extra."""
    declared = _declared()
    providers = importlib.metadata.packages_distributions()
    want: dict[str, set[str]] = {}
    for module in _imported_modules(("elision",)):
        where = {declared[d] for d in {_name(d) for d in providers.get(module, [])} if d in declared}
        if where and "dependencies" not in where:
            assert len(where) == 1, f"{module} is declared in several extras: {sorted(where)}"
            want.setdefault(where.pop().removeprefix("extra "), set()).add(module)
    assert {extra: set(modules) for extra, modules in EXTRA_MODULES.items()} == want


def test_the_import_scan_sees_function_level_and_optional_imports():
    found = _imported_modules()
    # torch-mlir is imported only inside functions of the lowering, ray only by the serve application
    assert found["torch_mlir"].startswith("elision/lowering/mlir_export.py")
    assert "ray" in found and "onnx_ir" in found and "scipy" in found
    assert "drafting_reference" in _local_modules()


def test_torch_and_triton_are_pinned_to_a_range():
    deps = {_name(r): r for r in PYPROJECT["project"]["dependencies"]}
    for name in ("torch", "triton"):
        spec = deps[name].split(";")[0]
        assert ">=" in spec and "<" in spec.replace("<=", "") and "==" not in spec, f"{name}: {deps[name]!r}"
    installed_torch = importlib.metadata.version("torch").split("+")[0]
    lower = re.search(r">=\s*([0-9.]+)", deps["torch"]).group(1)
    upper = re.search(r"<\s*([0-9.]+)", deps["torch"]).group(1)
    as_tuple = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    assert as_tuple(lower) <= as_tuple(installed_torch) < as_tuple(upper), "the tests run on a torch outside the range"


def test_gpu_extra_is_the_cuda_wheel_of_the_same_runtime():
    gpu = PYPROJECT["project"]["optional-dependencies"]["gpu"]
    cpu = next(r for r in PYPROJECT["project"]["dependencies"] if _name(r) == "onnxruntime")
    assert [_name(r) for r in gpu] == ["onnxruntime-gpu"]
    assert gpu[0].removeprefix("onnxruntime-gpu") == cpu.removeprefix("onnxruntime"), "keep the two in step"


def test_one_onnxruntime_wheel_provides_the_module_and_its_providers_are_used():
    wheels = {_name(d) for d in importlib.metadata.packages_distributions()["onnxruntime"]}
    assert len(wheels & {"onnxruntime", "onnxruntime-gpu"}) == 1, (
        f"both {sorted(wheels)} are installed: one overwrote the other's files (README: GPU)")
    available = ort.get_available_providers()
    assert "CPUExecutionProvider" in available
    chosen = select_providers()
    assert chosen[-1] == "CPUExecutionProvider" and set(chosen) <= set(available)
    assert ("CUDAExecutionProvider" in chosen) == ("CUDAExecutionProvider" in available)


def test_setuptools_builds_the_editable_metadata_without_warnings(tmp_path):
    script = ("import sys; from setuptools import build_meta; "
              "print(build_meta.prepare_metadata_for_build_editable(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-W", "always", "-c", script, str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings)
    metadata = (tmp_path / result.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "Provides-Extra: gpu" in metadata and "Requires-Dist: onnx-ir" in metadata
    entry_points = (tmp_path / result.stdout.strip().splitlines()[-1] / "entry_points.txt").read_text()
    assert "elision = elision.cli.entry:run" in entry_points
    assert "[torch_dynamo_backends]\nelision = elision.apps.compile.backend:elision_backend" in entry_points

"""Loading or running IR text never executes code it names: `py.*` ops resolve only through the allow-list,
torch ops only in allowed namespaces (no file access), and dimension expressions are plain arithmetic before sympy
evaluates them. Each hostile input would create a marker file if it ran; the error names the op or the text.
"""
from __future__ import annotations

import pytest
import torch

from elision.ir import IRError, Module, interpret, parse, to_fx, verify
from elision.ir.core import Function, Node, Value
from elision.ir.ops import PYTHON_CALLABLES, UnknownOpError, check_op, op_name, resolve_op
from elision.ir.serialize import load_module
from elision.ir.symbolic import to_sympy
from elision.ir.types import ScalarType, TensorType

T = TensorType("f32", (2,))


def _call_ir(op: str, args: str) -> str:
    return ("func @forward(%x : f32[2]) {\n"
            f"  %r : f32[2] = {op}({args})\n"
            "  return (%x)\n}\n")


def _hostile_calls(marker) -> list[tuple[str, str]]:
    cmd = f'"touch {marker}"'
    return [
        ("py.os.system", cmd),
        ("py.posix.system", cmd),
        ("py.subprocess.run", f'["touch", "{marker}"]'),
        ("py.builtins.exec", f'"open(\'{marker}\', \'w\')"'),
        ("py.builtins.eval", f'"open(\'{marker}\', \'w\')"'),
        ("py.builtins.open", f'"{marker}", "w"'),
        ("py.importlib.import_module", '"antigravity"'),
        ("py.operator.methodcaller", '"system"'),
        ("py.operator.attrgetter", '"__class__"'),
        ("py.pathlib.Path.touch", f'"{marker}"'),
        ("py.torch.save", f'%x, "{marker}"'),
        ("aten.from_file.default", f'"{marker}"'),
        ("profiler._record_function_enter.default", '"x"'),
        ("aten.__class__.__init__", "%x"),
    ]


def test_hostile_ops_do_not_parse(tmp_path):
    marker = tmp_path / "ran"
    for op, args in _hostile_calls(marker):
        with pytest.raises(IRError) as err:
            parse(_call_ir(op, args))
        assert op in str(err.value) and "line 2" in str(err.value), (op, str(err.value))
    assert not marker.exists()


def test_hostile_ops_built_in_python_do_not_run(tmp_path):
    """IR built without the parser (as a pass or a bug could): interpret, to_fx and verify refuse the node."""
    marker = tmp_path / "ran"
    x = Value("x", T)
    for op, args in [("py.os.system", (f"touch {marker}",)), ("py.builtins.exec", (f"open('{marker}', 'w')",)),
                     ("aten.from_file.default", (str(marker),)), ("py.posix.system", (f"touch {marker}",))]:
        module = Module()
        module.add_function(Function("forward", [x], [Node(op, args, {}, Value("r", ScalarType("int")))], [x]))
        for run in (lambda: interpret(module, "forward", torch.zeros(2)), lambda: to_fx(module), lambda: verify(module)):
            with pytest.raises(IRError, match=op.replace(".", r"\.")):
                run()
        with pytest.raises(UnknownOpError):
            resolve_op(op)
    assert not marker.exists()


@pytest.mark.parametrize("dim", [
    '__import__("os").system("touch MARKER")',
    "().__class__.__base__.__subclasses__()",
    "open(s0)",
    "exec(s0)",
    "s0.real",
    "[s0][0]",
    "10**10**10",
    "2**(s0)",
])
def test_hostile_dimension_expressions_are_refused(tmp_path, dim):
    marker = tmp_path / "ran"
    dim = dim.replace("MARKER", str(marker))
    text = ("func @forward(%x : f32[" + dim + "]) {\n  return (%x)\n}\n")
    with pytest.raises(IRError, match="bad type"):
        parse(text)
    scalar = ("func @forward(%x : f32[2]) {\n  %n : int<" + dim + "> = aten.sym_size.int(%x, 0)\n  return (%n)\n}\n")
    with pytest.raises(IRError, match="bad type"):
        parse(scalar)
    # a type built in Python reaches sympy only through the same check
    with pytest.raises(ValueError):
        to_sympy(dim)
    module = Module()
    x = Value("x", TensorType("f32", (dim,)))
    module.add_function(Function("forward", [x], [Node("aten.neg.default", (x,), {}, Value("y", TensorType("f32", (dim,))))], [x]))
    with pytest.raises(Exception):
        verify(module, check_types=True)
    assert not marker.exists()


def test_loading_a_hostile_ir_directory_is_an_error(tmp_path):
    marker = tmp_path / "ran"
    d = tmp_path / "ir"
    d.mkdir()
    (d / "module.ir").write_text(_call_ir("py.os.system", f'"touch {marker}"'))
    with pytest.raises(IRError, match=r"py\.os\.system"):
        load_module(d)
    assert not marker.exists()


def test_torch_constants_are_a_fixed_table():
    ok = parse("func @f(%x : f32[2]) {\n  %y : f16[2] = aten._to_copy.default(%x, dtype=torch.float16)\n  return (%y)\n}\n")
    assert ok.functions["f"].nodes[0].kwargs["dtype"] is torch.float16
    for name in ("torch.os", "torch._dynamo", "torch.load", "torch.float16.itemsize"):
        with pytest.raises(IRError, match="unknown constant"):
            parse("func @f(%x : f32[2]) {\n  %y : f16[2] = aten._to_copy.default(%x, dtype=" + name + ")\n  return (%y)\n}\n")


def test_allowed_python_callables_round_trip_and_run():
    import math
    import operator

    for target in (operator.add, operator.floordiv, math.floor, torch.sym_max, torch._check):
        name = op_name(target)
        check_op(name)
        assert resolve_op(name) is target
    assert all(name.split(".")[0] in ("operator", "math", "builtins", "torch") for name in PYTHON_CALLABLES)
    module = parse("func @f(%x : f32[4, 6]) {\n"
                   "  %a : int<4> = aten.sym_size.int(%x, 0)\n"
                   "  %b : int<6> = aten.sym_size.int(%x, 1)\n"
                   "  %c : int<10> = py.operator.add(%a, %b)\n"
                   "  %d : int<5> = py.operator.floordiv(%c, 2)\n"
                   "  return (%d)\n}\n")
    assert interpret(module, "f", torch.zeros(4, 6)) == (5,)
    with pytest.raises(UnknownOpError, match="allow-list"):
        op_name(print)

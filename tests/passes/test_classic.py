"""Golden before/after tests of the classic passes, plus numerics of each rewrite."""
import math

import pytest
import torch
from _filecheck import filecheck

from elision.ir import interpret, parse, verify
from elision.passes import Pass, PassError, PassManager, parse_pipeline, run_pipeline


def _run(text: str, pipeline: str, params=None):
    mod = parse(text, params=params)
    verify(mod, check_types=True)
    before = mod.copy()
    run_pipeline(mod, pipeline, verify_each=True, check_types=True)
    return before, mod


def _same_numerics(before, after, *inputs):
    a = interpret(before, "forward", *inputs)
    b = interpret(after, "forward", *inputs)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


CANON = """
func @forward(%x : f32[batch, 4]) {
  %a : f32[batch, 4] = aten.alias.default(%x)
  %v : f32[batch, 4] = aten.view.default(%a, [-1, 4])
  %chk : none = aten._assert_tensor_metadata.default(%v, None, None, torch.float32)
  %m : f32[batch, 4] = aten.mul.Tensor(%v, 1)
  %s : f32[batch, 4] = aten.slice.Tensor(%m, 0, 0, 9223372036854775807)
  %keep : f32[batch, 2] = aten.slice.Tensor(%s, 1, 0, 2)
  %r : f32[batch, 2] = aten.relu.default(%keep) loc("block.act")
  return (%r)
}
"""


def test_canonicalize_drops_noop_views_casts_and_asserts():
    before, after = _run(CANON, "canonicalize")
    filecheck(after.print(), """
        CHECK: func @forward(%x : f32[batch, 4]) {
        CHECK-NEXT: %keep : f32[batch, 2] = aten.slice.Tensor(%x, 1, 0, 2)
        CHECK-NEXT: %r : f32[batch, 2] = aten.relu.default(%keep) loc("block.act")
        CHECK-NEXT: return (%r)
        CHECK-NOT: aten._assert
    """)
    _same_numerics(before, after, torch.randn(5, 4))


def test_canonicalize_keeps_clone_and_real_casts():
    text = """
func @forward(%x : f32[2, 3]) {
  %c : f32[2, 3] = aten.clone.default(%x)
  %h : f16[2, 3] = aten._to_copy.default(%c, dtype=torch.float16)
  %m : f16[2, 3] = aten.mul.Tensor(%h, 2)
  return (%m)
}
"""
    before, after = _run(text, "canonicalize")
    assert after.print() == before.print()


CSE = """
func @forward(%x : f32[n, 8]) {
  %a : f32[n, 8] = aten.relu.default(%x)
  %b : f32[n, 8] = aten.relu.default(%x)
  %r1 : f32[n, 8] = aten.rand_like.default(%x)
  %r2 : f32[n, 8] = aten.rand_like.default(%x)
  %s : f32[n, 8] = aten.add.Tensor(%a, %b)
  %t : f32[n, 8] = aten.add.Tensor(%r1, %r2)
  return (%s, %t)
}
"""


def test_cse_merges_pure_duplicates_but_not_random_ops():
    before, after = _run(CSE, "cse")
    filecheck(after.print(), """
        CHECK: %a : f32[n, 8] = aten.relu.default(%x)
        CHECK-NOT: aten.relu.default
        CHECK: %r1 : f32[n, 8] = aten.rand_like.default(%x)
        CHECK-NEXT: %r2 : f32[n, 8] = aten.rand_like.default(%x)
        CHECK-NEXT: %s : f32[n, 8] = aten.add.Tensor(%a, %a)
    """)
    x = torch.randn(3, 8)
    assert torch.equal(interpret(before, "forward", x)[0], interpret(after, "forward", x)[0])


DCE = """
param "w" : f32[8, 8]
param "unused" : f32[4]
func @forward(%x : f32[n, 8]) {
  %w : f32[8, 8] = param("w")
  %u : f32[4] = param("unused")
  %dead : f32[n, 8] = aten.relu.default(%x)
  %y : f32[n, 8] = aten.mm.default(%x, %w)
  %chk : none = aten._assert_tensor_metadata.default(%y, None, None, torch.float32)
  return (%y)
}
"""


def test_dce_removes_dead_nodes_and_params_keeps_effects():
    params = {"w": torch.randn(8, 8), "unused": torch.randn(4)}
    before, after = _run(DCE, "dce", params)
    filecheck(after.print(), """
        CHECK: param "w" : f32[8, 8]
        CHECK-NOT: param "unused"
        CHECK: func @forward
        CHECK-NOT: aten.relu
        CHECK: aten.mm.default
        CHECK: aten._assert_tensor_metadata.default
    """)
    assert "unused" not in after.params
    _same_numerics(before, after, torch.randn(3, 8))


FOLD = """
param "w" : f32[6, 8]
param "b" : f32[6]
func @forward(%x : f32[n, 8]) {
  %w : f32[6, 8] = param("w")
  %b : f32[6] = param("b")
  %wt : f32[8, 6] = aten.t.default(%w)
  %b2 : f32[6] = aten.mul.Tensor(%b, 2.0)
  %y : f32[n, 6] = aten.addmm.default(%b2, %x, %wt)
  return (%y)
}
"""


def test_constant_fold_turns_parameter_only_work_into_parameters():
    params = {"w": torch.randn(6, 8), "b": torch.randn(6)}
    before, after = _run(FOLD, "constant-fold", params)
    filecheck(after.print(), """
        CHECK-DAG: param "const.forward.wt" : f32[8, 6]
        CHECK-DAG: param "const.forward.b2" : f32[6]
        CHECK: func @forward
        CHECK-NOT: aten.t.default
        CHECK-NOT: aten.mul.Tensor
        CHECK: aten.addmm.default(%b2, %x, %wt)
    """)
    assert set(after.params) == {"const.forward.wt", "const.forward.b2"}
    _same_numerics(before, after, torch.randn(4, 8))


def test_constant_fold_leaves_input_dependent_and_random_work():
    text = """
func @forward(%x : f32[n, 4]) {
  %r : f32[3, 4] = aten.rand.default([3, 4])
  %y : f32[n, 4] = aten.relu.default(%x)
  return (%y, %r)
}
"""
    _, after = _run(text, "constant-fold")
    assert "aten.rand.default" in after.print() and "aten.relu.default" in after.print()


def test_pipeline_strings_and_options():
    passes = parse_pipeline("canonicalize{keep_asserts=true}, cse ,dce,constant-fold{max_elements=10}")
    assert [p.spec() for p in passes] == ["canonicalize{keep_asserts=True}", "cse", "dce", "constant-fold{max_elements=10}"]
    for bad, msg in [("nope", "unknown pass 'nope'"), ("cse{x=1}", "has no option 'x'"),
                     ("constant-fold{max_elements=ten}", "is not an integer"), ("cse{", "unbalanced"),
                     ("canonicalize{keep_asserts=maybe}", "not a boolean")]:
        with pytest.raises(PassError, match=msg):
            parse_pipeline(bad)


def test_pass_manager_records_and_dumps(tmp_path):
    mod = parse(CSE)
    pm = PassManager(parse_pipeline("cse,dce"), verify_each=True, dump_dir=tmp_path)
    pm.run(mod)
    rep = pm.report()
    assert [r["name"] for r in rep] == ["cse", "dce"]
    assert rep[0]["nodes_before"] == 6 and rep[0]["nodes_after"] == 5 and rep[0]["changed"]
    assert (tmp_path / "00-cse.before.ir").read_text().count("aten.relu.default") == 2
    assert (tmp_path / "00-cse.after.ir").read_text().count("aten.relu.default") == 1
    assert (tmp_path / "passes.json").exists()


def test_float_constants_round_trip():
    text = """
func @forward(%x : f32[2]) {
  %a : f32[2] = aten.clamp.default(%x, -inf, inf)
  %b : f32[2] = aten.add.Tensor(%a, 1e-06)
  %c : f32[2] = aten.nan_to_num.default(%b, nan)
  return (%c)
}
"""
    mod = parse(text)
    assert parse(mod.print()).print() == mod.print()
    assert math.isinf(mod.functions["forward"].nodes[0].args[1])


class _EditsQuietly(Pass):
    """A faulty pass: it drops a node but reports no change."""

    name = "edits-quietly"

    def run(self, module) -> bool:
        fn = module.functions["forward"]
        fn.replace_all_uses(fn.nodes[1].result, fn.nodes[0].result)  # %b -> %a
        return False


class _LeavesUndefinedValue(Pass):
    """A faulty pass: it removes the producer of a value that is still used."""

    name = "leaves-undefined"

    def run(self, module) -> bool:
        fn = module.functions["forward"]
        del fn.nodes[0]  # %a, read by %s
        return True


@pytest.mark.parametrize("bad,message", [(_EditsQuietly(), "reported no change but edited the IR"),
                                         (_LeavesUndefinedValue(), "uses %a, which is never defined")])
def test_verification_after_every_pass_from_the_environment(monkeypatch, bad, message):
    """ELISION_VERIFY_IR=1 (set for the whole test suite in conftest.py) checks the IR after every pass and that a
    pass reporting no change left the graph alone; unset, a pass manager trusts its passes."""
    monkeypatch.setenv("ELISION_VERIFY_IR", "1")
    with pytest.raises(PassError, match=message):
        PassManager([bad]).run(parse(CSE))
    monkeypatch.setenv("ELISION_VERIFY_IR", "0")
    PassManager([bad]).run(parse(CSE))  # not checked: the damage goes unnoticed here
    with pytest.raises(PassError, match=message):
        PassManager([bad], verify_each=True).run(parse(CSE))


def test_a_pass_that_changes_nothing_passes_the_check():
    mod = parse(CSE)
    before = mod.print()
    _, report = run_pipeline(mod, "canonicalize,constant-fold")  # nothing to canonicalize or fold in CSE
    assert [r["changed"] for r in report] == [False, False] and mod.print() == before

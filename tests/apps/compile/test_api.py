"""elision.compile: same call signature and output type as the original model; the torch target runs inductor's
code (or a faster route) and says which.

float32 tolerance: inductor reorders reductions and fuses elementwise ops, so compiled outputs match eager within
1e-5 (absolute and relative), not bit for bit."""
import pytest
import torch
import transformers

import elision
from elision.apps.compile.select import MARGIN
from elision.errors import ElisionError
from elision.passes import PassError


def test_compile_hf_causal_lm_matches_eager():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    fast = elision.compile(model, example_inputs=(torch.randint(0, 64, (2, 6)),),
                           dynamic_dims={0: {0: "batch", 1: "seq"}}, passes="canonicalize,cse,constant-fold,dce")
    ids = torch.randint(0, 64, (3, 13))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        got = fast(ids)
    assert type(got).__name__ == "CausalLMOutputWithPast"
    torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=1e-5)
    assert [r["name"] for r in fast.pass_report] == ["canonicalize", "cse", "constant-fold", "dce"]


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


def test_compile_plain_module_returns_tensor():
    m = MLP().eval()
    fast = elision.compile(m, example_inputs=(torch.randn(3, 8),), dynamic_dims={0: {0: "batch"}}, passes="cse,dce")
    x = torch.randn(7, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)


def test_compile_rejects_bad_target_and_approximate_pass_without_consent():
    m = torch.nn.Linear(4, 4).eval()
    with pytest.raises(ElisionError, match="unknown target 'tpu'"):
        elision.compile(m, example_inputs=(torch.randn(2, 4),), target="tpu")
    with pytest.raises(PassError, match="unknown pass"):
        elision.compile(m, example_inputs=(torch.randn(2, 4),), passes="nonsense")


def _tiny_llama(layers: int = 1):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_torch_target_runs_inductor_code_for_every_declared_dynamic_shape():
    from torch._inductor.utils import run_and_get_code

    model = _tiny_llama()
    fast = elision.compile(model, example_inputs=(torch.randint(0, 64, (2, 6)),),
                           dynamic_dims={0: {0: "batch", 1: "seq"}}, select="elision+inductor")
    with torch.no_grad():
        ids = torch.randint(0, 64, (3, 9))
        got, code = run_and_get_code(fast, ids)
        torch.testing.assert_close(got.logits, model(ids, use_cache=False).logits, atol=1e-5, rtol=1e-5)
        assert code and "def call(" in code[0] and "torch.ops.elision" not in "".join(code)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for shape in ((2, 5), (4, 13)):  # one dynamic graph serves new sizes (>= 2): nothing is compiled again
            ids = torch.randint(0, 64, shape)
            got = fast(ids)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
            torch.testing.assert_close(got.logits, model(ids, use_cache=False).logits, atol=1e-5, rtol=1e-5)
    assert fast.elision_record.runs == "elision+inductor"


def test_torch_target_default_picks_the_fastest_route_and_says_which():
    m = MLP().eval()
    fast = elision.compile(m, example_inputs=(torch.randn(3, 8),), dynamic_dims={0: {0: "batch"}})
    assert fast.elision_record.runs is None  # decided on the first call
    x = torch.randn(7, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=0)
    record = fast.elision_record
    assert set(record.timings_ms) == {"elision+inductor", "inductor", "elision", "eager"}
    base = record.timings_ms["inductor"]  # inductor unless beaten by the margin, round by round and overall
    faster = {n: r for n, r in record.ratios.items() if r < 1 - MARGIN and record.timings_ms[n] < (1 - MARGIN) * base}
    assert record.runs == (min(faster, key=faster.get) if faster else "inductor") and record.fallback is None
    assert f"runs={record.runs}" in repr(fast)


def test_approximate_pipeline_is_not_checked_against_or_replaced_by_the_original_model():
    model = _tiny_llama(layers=3)
    fast = elision.compile(model, example_inputs=(torch.randint(0, 64, (2, 6)),), passes="skip-layers{layers=1},dce",
                           allow_approximate=True, select="fastest")
    with torch.no_grad():
        ids = torch.randint(0, 64, (2, 6))
        got = fast(ids).logits
        assert not torch.allclose(got, model(ids, use_cache=False).logits, atol=1e-3)  # the layer really is skipped
    assert fast.elision_record.candidates == ["elision+inductor", "elision"]
    with pytest.raises(ElisionError, match="approximate pipeline"):
        elision.compile(model, example_inputs=(torch.randint(0, 64, (2, 6)),), passes="skip-layers{layers=1}",
                        allow_approximate=True, select="inductor")


@pytest.mark.parametrize("passes,message", [
    ("cse,nonsense", r"unknown pass 'nonsense'"),
    ("skip-layers{layers=1}", r"pass 'skip-layers' changes the model's output \(approximate\)"),
])
def test_pipeline_is_checked_before_tracing(passes, message):
    # WithCond cannot be traced (data-dependent torch.cond): the pipeline error must come first, not the trace error
    from bad_input_models import WithCond

    with pytest.raises(PassError, match=message):
        elision.compile(WithCond().eval(), example_inputs=(torch.randn(3, 4),), passes=passes)

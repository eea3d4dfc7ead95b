"""elision.compile: same call signature and output type as the original model."""
import pytest
import torch
import transformers

import elision
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
    assert torch.equal(got.logits, want)
    assert [r["name"] for r in fast.pass_report] == ["canonicalize", "cse", "constant-fold", "dce"]


def test_compile_plain_module_returns_tensor():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 16)
            self.b = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.nn.functional.gelu(self.a(x)))

    m = MLP().eval()
    fast = elision.compile(m, example_inputs=(torch.randn(3, 8),), dynamic_dims={0: {0: "batch"}}, passes="cse,dce")
    x = torch.randn(7, 8)
    assert torch.equal(fast(x), m(x))


def test_compile_rejects_bad_target_and_approximate_pass_without_consent():
    m = torch.nn.Linear(4, 4).eval()
    with pytest.raises(ElisionError, match="unknown target 'tpu'"):
        elision.compile(m, example_inputs=(torch.randn(2, 4),), target="tpu")
    with pytest.raises(PassError, match="unknown pass"):
        elision.compile(m, example_inputs=(torch.randn(2, 4),), passes="nonsense")


@pytest.mark.parametrize("passes,message", [
    ("cse,nonsense", r"unknown pass 'nonsense'"),
    ("skip-layers{layers=1}", r"pass 'skip-layers' changes the model's output \(approximate\)"),
])
def test_pipeline_is_checked_before_tracing(passes, message):
    # WithCond cannot be traced (data-dependent torch.cond): the pipeline error must come first, not the trace error
    from bad_input_models import WithCond

    with pytest.raises(PassError, match=message):
        elision.compile(WithCond().eval(), example_inputs=(torch.randn(3, 4),), passes=passes)

"""Real Hugging Face classes from tiny configs: export, textual round trip, and both executors bit-identical to eager."""
import pytest
import torch
import transformers

from elision.frontend.trace import export_to_ir
from elision.apps.compile.numerics import fresh_inputs
from elision.ir import interpret, parse, to_fx, verify
from elision.passes import run_pipeline

torch.manual_seed(0)
H = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**H, num_key_value_heads=2, vocab_size=97))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**H, num_key_value_heads=2, vocab_size=97))


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**H, num_key_value_heads=1, vocab_size=97,
                                                                      sliding_window=None))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97))


def _bert():
    return transformers.BertModel(transformers.BertConfig(**H, vocab_size=97), add_pooling_layer=False)


def _vit():
    return transformers.ViTModel(transformers.ViTConfig(**H, image_size=16, patch_size=4), add_pooling_layer=False)


def _clip_vision():
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**H, image_size=16, patch_size=4))


TEXT = {0: {0: "batch", 1: "seq"}}
PIX = {0: {0: "batch"}}
CASES = {
    "llama": (_llama, lambda: (torch.randint(0, 97, (2, 7)),), TEXT),
    "qwen2": (_qwen2, lambda: (torch.randint(0, 97, (2, 7)),), TEXT),
    "mistral": (_mistral, lambda: (torch.randint(0, 97, (2, 7)),), TEXT),
    "gpt2": (_gpt2, lambda: (torch.randint(0, 97, (2, 7)),), TEXT),
    "bert": (_bert, lambda: (torch.randint(0, 97, (2, 7)),), TEXT),
    "vit": (_vit, lambda: (torch.randn(2, 3, 16, 16),), PIX),
    "clip-vision": (_clip_vision, lambda: (torch.randn(2, 3, 16, 16),), PIX),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request):
    build, example, dims = CASES[request.param]
    torch.manual_seed(0)
    model = build().eval()
    ex = example()
    return request.param, model, ex, dims, export_to_ir(model, ex, dims)


def _eager(model, x):
    with torch.no_grad():
        out = model(x, use_cache=False) if hasattr(model, "can_generate") and model.can_generate() else model(x)
    return out[0]


def test_round_trip_and_verify(exported):
    name, model, ex, dims, mod = exported
    text = mod.print()
    again = parse(text, params=mod.params)
    assert again.print() == text
    verify(again)
    f = mod.functions["forward"]
    # requested dims stayed symbolic, named as asked
    assert f.inputs[0].type.shape[0] == "batch"
    if dims is TEXT:
        assert f.inputs[0].type.shape[1] == "seq"
    # every computation node knows where in the model it came from
    located = [n for n in f.nodes if n.op not in ("param",) and n.loc]
    assert len(located) > 0.5 * len([n for n in f.nodes if n.op != "param"])


def test_executors_bit_identical_on_fresh_inputs(exported):
    name, model, ex, dims, mod = exported
    x = fresh_inputs(ex, dims, seed=7, high=97)[0]
    want = _eager(model, x)
    with torch.no_grad():
        got_interp = interpret(mod, "forward", x)[0]
        got_fx = to_fx(mod, "forward")(x)[0]
        reparsed = parse(mod.print(), params=mod.params)
        got_parsed = interpret(reparsed, "forward", x)[0]
    assert got_interp.shape == want.shape
    assert torch.equal(got_interp, want), f"{name}: interpreter differs by {(got_interp - want).abs().max()}"
    assert torch.equal(got_fx, want), f"{name}: FX differs by {(got_fx - want).abs().max()}"
    assert torch.equal(got_parsed, want)


def test_classic_pipeline_preserves_bits(exported):
    name, model, ex, dims, mod = exported
    opt = mod.copy()
    run_pipeline(opt, "canonicalize,cse,constant-fold,dce", verify_each=True)
    assert opt.node_count() < mod.node_count()
    x = fresh_inputs(ex, dims, seed=11, high=97)[0]
    with torch.no_grad():
        assert torch.equal(to_fx(opt, "forward")(x)[0], _eager(model, x))


def test_type_check_llama_symbolic_shapes():
    torch.manual_seed(0)
    model = _llama().eval()
    mod = export_to_ir(model, (torch.randint(0, 97, (2, 7)),), TEXT)
    verify(mod, check_types=True)
    f = mod.functions["forward"]
    assert str(f.outputs[0].type) == "f32[batch, seq, 97]"


def test_type_check_bounded_dim_slices_a_table():
    """BERT slices its position table [1, 512] by `seq`: type inference must know export's bound seq <= 512 (the
    module's dim_ranges), as the type check after every pass (`--verify-ir`) re-infers that slice."""
    torch.manual_seed(0)
    mod = export_to_ir(_bert().eval(), (torch.randint(0, 97, (2, 7)),), TEXT)
    assert mod.attrs["dim_ranges"]["seq"] == [2, 512]
    verify(mod, check_types=True)
    run_pipeline(mod, "canonicalize,cse,constant-fold,dce", verify_each=True, check_types=True)
    assert str(mod.functions["forward"].outputs[0].type) == "f32[batch, seq, 32]"


class _AlibiScores(torch.nn.Module):
    """BLOOM's attention scores: ``baddbmm(alibi, q, k^T)`` on [batch*heads, seq, seq], the bias broadcast from
    [batch*heads, 1, seq] (baddbmm's meta function expands it to the symbolic batch)."""

    heads = 4

    def forward(self, x):  # x: [batch, seq, 16]
        b, s, _ = x.shape
        q = x.repeat(self.heads, 1, 1)  # [heads*batch, seq, 16]
        slopes = torch.arange(1, self.heads + 1, dtype=x.dtype).repeat(b)[:, None, None]
        alibi = slopes * torch.arange(s, dtype=x.dtype)[None, None, :]  # [heads*batch, 1, seq]
        return torch.baddbmm(alibi, q, q.transpose(1, 2), beta=1.0, alpha=0.25)


def test_type_check_baddbmm_on_symbolic_sizes():
    """Type inference runs baddbmm on fake tensors with symbolic batch/seq (it used to fail in baddbmm's meta
    function: "SymIntArrayRef expected to contain only concrete integers", so `--verify-ir` stopped BLOOM)."""
    mod = export_to_ir(_AlibiScores().eval(), (torch.randn(2, 5, 16),), TEXT)
    verify(mod, check_types=True)
    run_pipeline(mod, "canonicalize,cse,constant-fold,dce", verify_each=True, check_types=True)
    assert str(mod.functions["forward"].outputs[0].type) == "f32[4*batch, seq, seq]"
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        assert torch.equal(to_fx(mod, "forward")(x)[0], _AlibiScores()(x))


def test_type_check_bloom_alibi_attention():
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=4,
                                                                   vocab_size=97)).eval()
    mod = export_to_ir(model, (torch.randint(0, 97, (2, 7)),), TEXT)
    assert any(n.op == "aten.baddbmm.default" for n in mod.functions["forward"].nodes)
    run_pipeline(mod, "canonicalize,cse,constant-fold,dce", verify_each=True, check_types=True)
    assert str(mod.functions["forward"].outputs[0].type) == "f32[batch, seq, 97]"

"""Model map recognition on real Hugging Face classes (tiny configs) and hand-written blocks."""
from __future__ import annotations

import pytest

from elision.passes import run_pipeline
from elision.analysis.model_map import build_model_map
from tests.model_map_models import exported


def _projections_found(layer) -> bool:
    a = layer.attention
    return all(p is not None for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))


@pytest.mark.parametrize("name,proj", [("llama", "q_proj"), ("qwen2", "q_proj"), ("mistral", "q_proj")])
def test_llama_family_decoders(name, proj):
    mm = build_model_map(exported(name))
    assert mm.kind == "decoder"
    assert len(mm.layers) == 2 and [ly.index for ly in mm.layers] == [0, 1]
    for i, ly in enumerate(mm.layers):
        a = ly.attention
        assert ly.loc == f"model.layers.{i}"
        assert (a.kind, a.num_heads, a.num_kv_heads, a.head_dim) == ("sdpa", 4, 2, 16)
        assert a.causal is True and a.mask_kind == "causal" and a.rotary
        assert _projections_found(ly)
        assert a.q_proj.weight == f"model.layers.{i}.self_attn.{proj}.weight"
        assert a.o_proj.weight == f"model.layers.{i}.self_attn.o_proj.weight"
        # repeat_kv was seen through: k/v before repetition have the kv head count
        assert a.k_unrepeated is not None and a.k_unrepeated.type.shape[1] == 2
        assert [n.kind for n in ly.norms] == ["rmsnorm", "rmsnorm"]
        assert ly.norms[0].weight == f"model.layers.{i}.input_layernorm.weight" and ly.norms[0].eps == 1e-6
        assert ly.mlp is not None and ly.mlp.gated and ly.mlp.activation == "silu" and len(ly.mlp.linears) == 3
        assert len(ly.residual_adds) == 2
        # residual adds really are "layer input + branch"
        add1, add2 = ly.residual_adds
        assert ly.input in add1.args and ly.attn_branch[1] in add1.args
        assert ly.output == add2.result and ly.mlp_branch[1] in add2.args
    assert mm.layers[1].input == mm.layers[0].output
    assert mm.embedding.param == "model.embed_tokens.weight" and mm.embedding.input.name == "input_ids"
    assert mm.final_norm.kind == "rmsnorm" and mm.final_norm.weight == "model.norm.weight"
    assert mm.lm_head.weight == "lm_head.weight" and mm.lm_head.out_features == 128
    assert mm.position_ids is not None and mm.position_ids.type.shape[-1] == "seq"
    assert mm.attention_mask, "the causal mask subgraph is listed"
    assert mm.unrecognized == []
    rewrites = {r: ok for r, ok, _ in mm.applicable_rewrites()}
    assert rewrites == {"speculative-decoding": True, "token-pruning": False, "layer-skipping": True,
                        "sparse-volume": False}


def test_gpt2_packed_qkv_and_conv1d():
    mm = build_model_map(exported("gpt2"))
    assert mm.kind == "decoder" and len(mm.layers) == 2
    for ly in mm.layers:
        a = ly.attention
        assert a.packed_qkv and a.q_proj is a.k_proj is a.v_proj
        assert a.q_proj.weight.endswith("attn.c_attn.weight") and a.q_proj.out_features == 192
        assert a.o_proj.weight.endswith("attn.c_proj.weight")
        assert (a.num_heads, a.num_kv_heads, a.head_dim, a.causal, a.rotary) == (4, 4, 16, True, False)
        assert [n.kind for n in ly.norms] == ["layernorm", "layernorm"] and not ly.post_norm
        assert not ly.mlp.gated and ly.mlp.activation == "gelu-tanh"
    assert mm.position_embedding.param == "transformer.wpe.weight"
    assert mm.final_norm.weight == "transformer.ln_f.weight"
    assert mm.lm_head is not None and mm.unrecognized == []


def test_bert_post_norm_encoder():
    mm = build_model_map(exported("bert"))
    assert mm.kind == "encoder" and len(mm.layers) == 2
    for i, ly in enumerate(mm.layers):
        a = ly.attention
        assert ly.post_norm and [n.kind for n in ly.norms] == ["layernorm", "layernorm"]
        assert a.causal is False and a.mask_kind == "bidirectional"
        assert a.q_proj.weight == f"encoder.layer.{i}.attention.self.query.weight"
        assert a.o_proj.weight == f"encoder.layer.{i}.attention.output.dense.weight"
        assert ly.norms[1].weight == f"encoder.layer.{i}.output.LayerNorm.weight"
        assert ly.output == ly.norms[1].output
    assert mm.layers[1].input == mm.layers[0].output
    assert mm.lm_head is None and mm.final_norm is None
    assert [e.param for e in mm.extra_embeddings] == ["embeddings.token_type_embeddings.weight"]
    assert mm.position_embedding.param == "embeddings.position_embeddings.weight"
    rewrites = {r: ok for r, ok, _ in mm.applicable_rewrites()}
    assert rewrites["token-pruning"] and not rewrites["speculative-decoding"]
    assert mm.unrecognized == []


@pytest.mark.parametrize("name,cls_param,patch_param,stack", [
    ("vit", "embeddings.cls_token", "embeddings.patch_embeddings.projection.weight", "layers"),
    ("clip_vision", "embeddings.class_embedding", "embeddings.patch_embedding.weight", "encoder.layers"),
])
def test_vision_encoders(name, cls_param, patch_param, stack):
    mm = build_model_map(exported(name))
    assert mm.kind == "vision" and len(mm.layers) == 2 and mm.embedding is None
    assert mm.patch_embed.weight == patch_param and mm.patch_embed.patch_size == (8, 8)
    assert mm.patch_embed.num_patches == 16 and mm.patch_embed.dim == 64
    assert mm.cls_token.param == cls_param and mm.cls_token.index == 0
    for ly in mm.layers:
        assert ly.stack == stack and _projections_found(ly)
        assert (ly.attention.num_heads, ly.attention.head_dim, ly.attention.causal) == (4, 16, False)
        assert [n.kind for n in ly.norms] == ["layernorm", "layernorm"] and not ly.post_norm
    assert mm.unrecognized == []
    assert {r: ok for r, ok, _ in mm.applicable_rewrites()}["token-pruning"]


def test_llava_two_stacks():
    mm = build_model_map(exported("llava"))
    assert mm.kind == "vision-language"
    assert set(mm.stacks) == {"model.vision_tower.encoder.layers", "model.language_model.layers"}
    # LLaVA reads the vision tower's second-to-last hidden state: with 2 layers only layer 0 is computed
    vision = mm.stacks["model.vision_tower.encoder.layers"]
    assert len(vision) == 1 and vision[0].attention.causal is False and vision[0].attention.num_heads == 2
    assert mm.layers is mm.stacks["model.language_model.layers"] and len(mm.layers) == 2
    for ly in mm.layers:
        a = ly.attention
        assert a.causal is True and (a.num_heads, a.num_kv_heads) == (4, 2) and a.rotary and _projections_found(ly)
    assert mm.patch_embed is not None and mm.cls_token.param == "model.vision_tower.embeddings.class_embedding"
    assert mm.image_merge is not None and mm.image_merge.op == "aten.masked_scatter.default"
    assert [p.weight for p in mm.projector] == ["model.multi_modal_projector.linear_1.weight",
                                                "model.multi_modal_projector.linear_2.weight"]
    assert mm.embedding.param == "model.language_model.embed_tokens.weight"
    assert mm.lm_head.weight == "lm_head.weight" and mm.final_norm.kind == "rmsnorm"
    assert mm.unrecognized == []


@pytest.mark.parametrize("name", ["handwritten", "handwritten_additive"])
def test_explicit_softmax_attention(name):
    mm = build_model_map(exported(name))
    assert mm.kind == "decoder" and len(mm.layers) == 2
    for ly in mm.layers:
        a = ly.attention
        assert a.kind == "explicit" and a.causal is True
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (4, 2, 8)
        assert abs(a.scale - 8 ** -0.5) < 1e-12
        assert a.k_unrepeated is not None  # repeat_interleave(dim=1) was seen through
        assert _projections_found(ly) and a.q_proj.weight == f"blocks.{ly.index}.attn.q.weight"
        assert a.mask_form == ("masked_fill" if name == "handwritten" else "additive")
    assert mm.lm_head.weight == "head.weight" and mm.unrecognized == []


def test_arbitrary_bias_from_input_is_custom_not_guessed():
    mm = build_model_map(exported("handwritten_bias"))
    for ly in mm.layers:
        a = ly.attention
        assert a.kind == "explicit" and a.mask_form == "additive" and a.mask_depends_on_input
        assert a.causal is None and a.mask_kind == "custom"
    assert mm.kind == "unknown"
    assert any("arbitrary additive score bias" in u for u in mm.unrecognized)


def test_unrecognizable_model_is_reported_not_guessed():
    mm = build_model_map(exported("mixer"))
    assert mm.kind == "unknown" and mm.layers == [] and mm.lm_head is None
    text = "\n".join(mm.unrecognized)
    assert "softmax" in text and "not part of a recognized softmax(QK^T)V attention" in text
    assert "proj: 1 linear not part of any recognized structure" in text
    assert "(no location)" in text or "einsum" in text or "score" in text
    assert not any(r[1] for r in mm.applicable_rewrites() if r[0] != "layer-skipping")


def test_describe_json_and_pass():
    mod = exported("llama")
    mm = build_model_map(mod)
    text = "\n".join(mm.describe())
    assert "model kind: decoder" in text and "heads=4 kv_heads=2" in text and "LM head: lm_head.weight" in text
    d = mm.as_dict()
    assert d["num_layers"] == 2 and d["stacks"]["model.layers"][0]["attention"]["causal"] is True
    # cached until the graph changes; the analysis pass changes nothing
    assert build_model_map(mod) is mm
    before = mod.print()
    _, report = run_pipeline(mod, "model-map")
    assert report[0]["changed"] is False and mod.print() == before


def test_dropping_a_branch_equals_skipping_it_in_eager():
    """A pass drops a residual branch by replacing the add's result with its residual input."""
    import copy

    import torch

    from elision.ir import interpret
    from tests.model_map_models import built

    model, example, _ = built("llama")
    mod = exported("llama")
    layer = build_model_map(mod).layers[1]
    fn = mod.functions["forward"]
    fn.replace_all_uses(layer.residual_adds[1].result, layer.mlp_branch[0])   # drop layer 1's MLP
    fn.replace_all_uses(layer.residual_adds[0].result, layer.attn_branch[0])  # and its attention
    got = interpret(mod, "forward", *example)[0]
    skipped = copy.deepcopy(model)
    skipped.model.layers[1].mlp.forward = lambda x: torch.zeros_like(x)
    skipped.model.layers[1].self_attn.forward = lambda hidden_states, *a, **k: (torch.zeros_like(hidden_states), None)
    with torch.no_grad():
        want = skipped(*example, use_cache=False).logits
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("name,kv_heads", [("llama", 2), ("qwen2", 2), ("gpt2", 4)])
def test_decoder_view(name, kv_heads):
    """The decoder view the kv-cache pass builds on: one SDPA site per layer with K/V before GQA repetition, the
    position ids, and the LM head's input."""
    mm = build_model_map(exported(name))
    d = mm.decoder
    assert d is not None and mm.decoder_problem is None
    assert d.num_layers == 2 and [s.layer for s in d.sites] == [0, 1]
    assert d.layer_prefix == mm.layers[0].stack
    for site, ly in zip(d.sites, mm.layers):
        assert site.node is ly.attention.node and (site.heads, site.kv_heads, site.head_dim) == (4, kv_heads, 16)
        assert site.k_src.type.shape[1] == kv_heads and site.v_src.type.shape[1] == kv_heads
    assert len(d.positions) == 1 and d.positions[0].type.rank == 2 and d.positions[0].type.shape[-1] == "seq"
    assert d.logits == mm.lm_head.output
    # the LM head reads hidden[:, 0:] (full slices, seen through): Llama's final norm; GPT-2 views the norm first
    fn = exported(name).functions["forward"]
    assert fn.producer(mm.lm_head.input).op == "aten.slice.Tensor"
    if name == "gpt2":
        assert d.hidden.name == "view_27" and fn.producer(d.hidden).args[0] == mm.final_norm.output
    else:
        assert d.hidden == mm.final_norm.output
    assert (d.seq_dim, d.batch_dim, d.dtype) == ("seq", "batch", "f32")
    assert mm.as_dict()["decoder"]["kv_heads"] == kv_heads
    assert any(line.startswith("decoder view (kv-cache): 2 attention sites") for line in mm.describe())


@pytest.mark.parametrize("name,problem", [
    ("bert", "cannot find the position ids"),  # learned positions read from a buffer, not an arange
    ("handwritten", "has no scaled_dot_product_attention"),
    ("mixer", "has no scaled_dot_product_attention"),
])
def test_no_decoder_view_says_why(name, problem):
    mm = build_model_map(exported(name))
    assert mm.decoder is None and problem in mm.decoder_problem
    assert mm.as_dict()["decoder"] is None and problem in mm.as_dict()["decoder_problem"]
    why = {r: reason for r, _, reason in mm.applicable_rewrites()}["speculative-decoding"]
    assert not {r: ok for r, ok, _ in mm.applicable_rewrites()}["speculative-decoding"]
    if name == "handwritten":  # a causal decoder with an LM head, but kv-cache needs SDPA attention
        assert why.startswith("no KV-cache view: ") and problem in why


# (parallel block, packed qkv, norm kind, norms per layer, kv heads): q/k/v reached through packed splits (GPT-NeoX),
# Falcon's per-group q/k/v view with k/v picked by a constant index, partial rotary (cat of a rotated and a passed
# slice: GPT-NeoX, GPT-J, Phi, StableLM), interleaved rotary (stack + view: GPT-J, Cohere, Helium); attention and
# MLP reading one norm (GPT-J, Phi, Cohere) or two norms of the same input (GPT-NeoX, Falcon); Cohere's written-out
# bias-free LayerNorm; Gemma 3's (1 + w) RMSNorms around each branch and on q/k
ZOO_EXPECTED = {
    "gpt_neox": (True, True, "layernorm", 2, 4),
    "gptj": (True, False, "layernorm", 1, 4),
    "falcon": (True, True, "layernorm", 2, 2),
    "stablelm": (False, False, "layernorm", 2, 2),
    "phi": (True, False, "layernorm", 1, 2),
    "cohere": (True, False, "layernorm", 1, 2),
    "helium": (False, False, "rmsnorm", 2, 2),
    "gemma3_text": (False, False, "rmsnorm", 6, 2),
}


@pytest.mark.parametrize("model_type", sorted(ZOO_EXPECTED))
def test_packed_rotary_and_parallel_blocks(model_type):
    parallel, packed, norm_kind, n_norms, kv_heads = ZOO_EXPECTED[model_type]
    mod = exported(f"zoo_{model_type}")
    mm = build_model_map(mod)
    assert mm.kind == "decoder", mm.unrecognized
    assert mm.unrecognized == []
    assert len(mm.layers) == (2 if model_type == "gemma3_text" else 1)
    for ly in mm.layers:
        a = ly.attention
        assert _projections_found(ly) and a.packed_qkv == packed
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (4, kv_heads, 16)
        assert a.rotary and a.causal is True
        assert ly.parallel == parallel
        assert [n.kind for n in ly.norms] == [norm_kind] * n_norms
        assert ly.mlp is not None and ly.mlp.linears
        assert ly.attn_branch[1] in ly.residual_adds[0].args and ly.mlp_branch[1] in ly.residual_adds[1].args
        if parallel:  # both branches start at the layer input; the output sums exactly input, attention, MLP
            assert ly.attn_branch[0] == ly.mlp_branch[0] == ly.input
            assert _summands(mod.functions["forward"], ly.output) == [ly.input, ly.attn_branch[1], ly.mlp_branch[1]]
    assert mm.lm_head is not None and mm.final_norm is not None
    assert [ly["parallel"] for ly in mm.as_dict()["stacks"][mm.layers[0].stack]] == [parallel] * len(mm.layers)
    assert any("(parallel to the attention)" in line for line in mm.describe()) == parallel


def _summands(fn, v):
    """The terms of the sum tree (adds, and a dropout's clone of a sum) that computes ``v``, in graph order."""
    p = fn.producer(v)
    if p is not None and p.op == "aten.add.Tensor":
        terms = _summands(fn, p.args[0]) + _summands(fn, p.args[1])
        return sorted(terms, key=lambda t: fn.index(fn.producer(t)) if fn.producer(t) else -1)
    if p is not None and p.op == "aten.clone.default" and fn.producer(p.args[0]).op == "aten.add.Tensor":
        return _summands(fn, p.args[0])
    return [v]


def test_gemma_scaled_embedding_and_one_plus_w_norms():
    """Gemma scales the embedding and its RMSNorm multiplies by ``1 + w``: the norm (its weight recorded with the
    offset) ends where the projections read, so the residual add around the attention is found."""
    mm = build_model_map(exported("gemma"))
    assert mm.kind == "decoder" and len(mm.layers) == 2 and mm.unrecognized == []
    for i, ly in enumerate(mm.layers):
        assert not ly.parallel and _projections_found(ly)
        assert [(n.kind, n.weight_offset) for n in ly.norms] == [("rmsnorm", 1.0)] * 2
        assert ly.norms[0].weight == f"model.layers.{i}.input_layernorm.weight"
    fn = exported("gemma").functions["forward"]
    assert fn.producer(mm.layers[0].input).op == "aten.mul.Tensor"  # the embedding times sqrt(hidden)
    assert mm.final_norm.weight_offset == 1.0 and mm.lm_head is not None


@pytest.mark.parametrize("skip", ["attn1", "mlp1", "1"])
def test_skip_layers_on_parallel_blocks(skip):
    """GPT-NeoX sums attention and MLP with one add before the residual: dropping one branch, or both, equals the
    HF model with that branch's output zeroed."""
    import copy

    import torch

    from elision.ir import interpret
    from tests.model_map_models import built

    model, example, _ = built("gpt_neox_3")
    mod = exported("gpt_neox_3")
    assert all(ly.parallel for ly in build_model_map(mod).layers)
    run_pipeline(mod, f"skip-layers{{layers={skip}}}", allow_approximate=True)
    got = interpret(mod, "forward", *example)[0]
    zeroed = copy.deepcopy(model)
    block = zeroed.gpt_neox.layers[1]
    if skip != "mlp1":
        block.attention.register_forward_hook(lambda m, args, out: (torch.zeros_like(out[0]),) + tuple(out[1:]))
    if skip != "attn1":
        block.mlp.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    with torch.no_grad():
        want = zeroed(*example, use_cache=False).logits
        full = model(*example, use_cache=False).logits
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    assert (got - full).abs().max().item() > 1e-3  # the branch mattered

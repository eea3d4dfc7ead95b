"""The onnxscript rules lowering the exported `@verify` to the in-place step graph (`elision.lowering.ort_rules`).

End-to-end numerics (the step against the compiled graph, greedy against Hugging Face) are in
tests/runtime/test_ort_step.py; here: what the rules produce, and that what they refuse is refused with a reason.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime
import pytest
import torch

from elision.apps.specdec.compiled_backend import compile_specdec, specdec_onnx_entry
from elision.lowering.onnx_export import export_program
from elision.lowering.ort_rules import StepLoweringError, lower_generation_step
from elision.lowering.ort_rules.rope_cache import RopeTableError, rope_tables
from elision.runtime.generation import step_signature as sig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported():
    """(HF model, a function returning a fresh export of its @verify) for a 1-layer Llama with head size 16."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=40,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16})
    model = transformers.LlamaForCausalLM(cfg).eval()
    proto = _export_proto(model)
    return model, lambda: ir.serde.deserialize_model(proto)


def test_every_attention_becomes_one_gqa_over_shared_buffers(exported):
    _, fresh = exported
    model = fresh()
    report = lower_generation_step(model, max_positions=40, kv_heads=2, head_dim=16)
    assert report["fusions"]["group_query_attention"] == 1 and report["fusions"]["packed_qkv"] == 1
    ops = Counter(n.op_type for n in model.graph)
    # one GEMM for q, k and v, then o, gate, up, down, and the LM head
    assert ops["GroupQueryAttention"] == 1 and ops["MatMul"] == 6 and not ops["Concat"] and not ops["Softmax"]
    assert [v.name for v in model.graph.inputs] == [
        sig.INPUT_IDS, sig.POSITION_IDS, sig.ATTENTION_BIAS, sig.past_name(0, "key"), sig.past_name(0, "value"),
        sig.SEQLENS_K, sig.TOTAL_SEQUENCE_LENGTH, sig.QUERY_SEQLENS]
    assert [v.name for v in model.graph.outputs] == [sig.LOGITS, sig.present_name(0, "key"), sig.present_name(0, "value")]
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.domain == "com.microsoft"
    assert {k: a.value for k, a in gqa.attributes.items() if k != "scale"} == {
        "num_heads": 4, "kv_num_heads": 2, "do_rotary": 1, "rotary_interleaved": 0}
    # past and present are the same buffer layout, so one OrtValue can be bound to both
    assert gqa.inputs[3] is model.graph.inputs[3] and gqa.outputs[1] is model.graph.outputs[1]
    assert gqa.inputs[1] is None and gqa.inputs[2] is None  # packed QKV
    # onnx.checker does not know ORT's contrib ops (SimplifiedLayerNormalization sits in the default domain there):
    # onnxruntime itself is the judge of the lowered graph
    onnxruntime.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])


def test_rope_tables_are_the_models_own_rotary(exported):
    """llama3 rope scaling (not the plain formula): the tables come from running the graph's own cos/sin."""
    hf, fresh = exported
    model = fresh()
    rot = next(n for n in model.graph if n.op_type == "Cos").outputs[0]
    cos4 = next(u.node for u in rot.uses() if u.node.op_type == "Unsqueeze").outputs[0]
    sin = next(n for n in model.graph if n.op_type == "Sin").outputs[0]
    sin4 = next(u.node for u in sin.uses() if u.node.op_type == "Unsqueeze").outputs[0]
    tables = rope_tables(model, cos4, sin4, 40)
    positions = torch.arange(40)[None]
    cos_ref, sin_ref = hf.model.rotary_emb(torch.zeros(1, 40, 64), positions)
    np.testing.assert_allclose(tables.cos, cos_ref[0, :, :8].numpy(), atol=1e-6)
    np.testing.assert_allclose(tables.sin, sin_ref[0, :, :8].numpy(), atol=1e-6)
    assert tables.positions.name == "positions"
    with pytest.raises(RopeTableError, match="depend on the position ids alone"):
        rope_tables(model, cos4, model.graph.inputs[3], 40)  # a past K/V input is not a function of positions


def test_graph_without_the_verify_signature_is_refused():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    node = ir.node("Relu", [x])
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 18})
    with pytest.raises(StepLoweringError, match="expected the @verify signature"):
        lower_generation_step(ir.Model(graph, ir_version=10), max_positions=8, kv_heads=1, head_dim=16)


def _qwen3_export(drop_k_norm: bool) -> ir.Model:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=97, max_position_embeddings=40)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    if drop_k_norm:
        model.model.layers[0].self_attn.k_norm = torch.nn.Identity()
    return _export(model)


def _export_proto(model):
    """The model's compiled @verify, exported to ONNX (what `lower_generation_step` receives)."""
    module, inputs, dyn, _ = specdec_onnx_entry(compile_specdec(model), "verify")
    return export_program("verify", module, inputs, dyn).model_proto


def _export(model) -> ir.Model:
    return ir.serde.deserialize_model(_export_proto(model))


def test_per_head_qk_norms_stay_in_front_of_gqa():
    """Qwen3: q and k are RMS-normalized per head before the rotary; GQA reads the normalized heads (flattened)."""
    model = _qwen3_export(drop_k_norm=False)
    report = lower_generation_step(model, max_positions=40, kv_heads=2, head_dim=16)
    assert report["fusions"]["group_query_attention"] == 1
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    for value in gqa.inputs[:2]:
        flatten = value.producer()
        assert flatten.op_type == "Reshape" and flatten.inputs[0].producer().op_type == "SimplifiedLayerNormalization"
    onnxruntime.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_norm_on_q_alone_normalizes_q_alone():
    model = _qwen3_export(drop_k_norm=True)
    assert lower_generation_step(model, max_positions=40, kv_heads=2, head_dim=16)["fusions"]["group_query_attention"] == 1
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    query, key = (value.producer() for value in gqa.inputs[:2])
    assert query.op_type == "Reshape" and query.inputs[0].producer().op_type == "SimplifiedLayerNormalization"
    assert key.op_type == "MatMul"  # k straight from its projection


def test_attention_without_rotary_becomes_gqa_without_rotary():
    """GPT-2: learned positions (no rotary), q/k/v split from one Conv1D, the batch size read off the past K's shape
    and the attention output flattened to [batch * n, hidden] for a 2-D Gemm."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=97,
                                                                 n_positions=40)).eval()
    lowered = _export(model)
    lower_generation_step(lowered, max_positions=40, kv_heads=4, head_dim=16)
    gqa = next(n for n in lowered.graph if n.op_type == "GroupQueryAttention")
    assert gqa.attributes.get_int("do_rotary") == 0 and gqa.inputs[7] is None and gqa.inputs[9] is None
    assert [u.node.op_type for u in gqa.outputs[0].uses()] == ["Reshape"]  # back to the Gemm's 2-D rows
    onnxruntime.InferenceSession(ir.serde.serialize_model(lowered).SerializeToString(), providers=["CPUExecutionProvider"])


def test_projections_split_into_groups_are_flattened_for_gqa():
    """Falcon: q/k/v come out of one fused projection as [batch, n, groups, heads per group, head_dim]."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.FalconConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_kv_heads=2,
                                    new_decoder_architecture=True, vocab_size=97, max_position_embeddings=40)
    lowered = _export(transformers.FalconForCausalLM(cfg).eval())
    report = lower_generation_step(lowered, max_positions=40, kv_heads=4, head_dim=16)
    assert report["fusions"]["group_query_attention"] == 1
    gqa = next(n for n in lowered.graph if n.op_type == "GroupQueryAttention")
    for value in gqa.inputs[:3]:  # flattened to [batch, n, -1] in front of GQA
        flatten = value.producer()
        assert flatten.op_type == "Reshape" and flatten.inputs[1].producer().attributes["value_ints"].value == (0, 0, -1)
    onnxruntime.InferenceSession(ir.serde.serialize_model(lowered).SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("head_dim, fuses", [(32, True), (16, False)])
def test_partial_rotary_becomes_gqa_tables_over_the_rotated_dims(head_dim, fuses):
    """Phi rotates half of each head: GQA gets [max_positions, rotary_dim / 2] tables when its CPU kernel can rotate
    that many dims (a multiple of 16), and the step is refused with the reason otherwise."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.PhiConfig(hidden_size=4 * head_dim, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, partial_rotary_factor=0.5, vocab_size=97,
                                 max_position_embeddings=40)
    lowered = _export(transformers.PhiForCausalLM(cfg).eval())
    if not fuses:
        with pytest.raises(StepLoweringError, match="partial rotary over 8 dims per head"):
            lower_generation_step(lowered, max_positions=40, kv_heads=4, head_dim=head_dim)
        return
    lower_generation_step(lowered, max_positions=40, kv_heads=4, head_dim=head_dim)
    gqa = next(n for n in lowered.graph if n.op_type == "GroupQueryAttention")
    assert gqa.attributes.get_int("do_rotary") == 1
    assert list(gqa.inputs[7].shape) == [40, head_dim // 4]  # cos table: half of the rotated half
    assert not any(n.op_type == "Concat" for n in lowered.graph)
    onnxruntime.InferenceSession(ir.serde.serialize_model(lowered).SerializeToString(), providers=["CPUExecutionProvider"])

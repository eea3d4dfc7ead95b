"""Tiny randomly initialised HF encoders shared by the token-pruning tests (shapes and exactness, not fidelity), and
the checks every token-reduction IR pass test repeats (apply, interpret, print/parse round trip, ONNX input dims)."""
from __future__ import annotations

import torch


def tiny_bert(num_hidden_layers: int = 4, intermediate_size: int = 64, add_pooling_layer: bool = True):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                     intermediate_size=intermediate_size, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    return BertModel(cfg, add_pooling_layer=add_pooling_layer).eval()


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=64, num_labels=5)
    cfg._attn_implementation = "sdpa"
    return ViTForImageClassification(cfg).eval()


def padded_bert_batch(lengths: tuple[int, ...], seq: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] ... [SEP] rows of the given real lengths, right-padded to `seq` (BERT uncased ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (len(lengths), seq), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, length - 1] = 102  # [SEP]
        ids[row, length:] = 0
        mask[row, length:] = 0
    return ids, mask


def apply_pipeline(module, pipeline: str):
    """A copy of the IR `module` rewritten by `pipeline` (verified after each pass, approximate passes allowed)."""
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline
    out = module.copy()
    PassManager(parse_pipeline(pipeline), verify_each=True, check_types=True, allow_approximate=True).run(out)
    return out


def run_ir(module, inputs):
    """The first output of the IR interpreter on `forward`."""
    from elision.ir import interpret

    return interpret(module, "forward", *inputs)[0]


def assert_matches_executor(model, module, inputs, pipeline: str, plan) -> None:
    """The IR `module` rewritten by `pipeline` computes bit for bit what the layer-by-layer executor computes for
    `plan`, and that output differs from the unrewritten model's (the rewrite did something)."""
    from elision.apps.tokens.executor import adapter_for, run_encoder

    expect = run_encoder(adapter_for(model), inputs, plan)
    assert torch.equal(run_ir(apply_pipeline(module, pipeline), inputs), expect)
    assert not torch.allclose(run_ir(module, inputs), expect, atol=1e-3)


def assert_round_trips(module, inputs) -> None:
    """The rewritten IR prints, parses back to the same text, verifies with types, and computes the same output."""
    from elision.ir import verify
    from elision.ir.parser import parse

    text = str(module)
    reparsed = parse(text, module.params)
    verify(reparsed, check_types=True)
    assert str(reparsed) == text
    assert torch.equal(run_ir(reparsed, inputs), run_ir(module, inputs))


def lower_and_run(module, inputs, out_dir) -> tuple[torch.Tensor, set[str]]:
    """Lower `module` to an ONNX artifact in out_dir and run it with onnxruntime; checks its first output against the
    IR interpreter (within 1e-5) and returns (that output, the op types of the emitted graphs)."""
    import onnx

    from elision.lowering.emit import emit_onnx, run_onnx_artifact

    emit_onnx(module, None, out_dir, ort_fusions=False)
    ops = {n.op_type for p in out_dir.glob("*.onnx") for n in onnx.load(str(p)).graph.node}
    got = run_onnx_artifact(out_dir, "forward", inputs)[0]
    torch.testing.assert_close(got, run_ir(module, inputs), atol=1e-5, rtol=1e-5)
    return got, ops


def onnx_input_dims(out_dir) -> list[list]:
    """Input shapes of an emitted forward.onnx, symbolic dims by name."""
    import onnx

    graph = onnx.load(str(out_dir / "forward.onnx")).graph
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]

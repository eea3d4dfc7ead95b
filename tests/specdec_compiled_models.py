"""Shared fixtures for the specdec pass / compiled-backend tests: tiny HF decoders and their compiled IR.

Exporting is the slow part (torch.export of a Hugging Face model takes seconds), so every model is exported
and run through the speculative-decoding pipeline once per test process (``functools.lru_cache``).
"""
from __future__ import annotations

import functools

import torch

from elision.frontend.trace import export_to_ir
from elision.ir.core import Module
from elision.passes import run_pipeline

VOCAB = 96
PIPELINE = "canonicalize,cse,kv-cache,tree-verify{hidden=true},dce"


def make_model(arch: str, layers: int = 2) -> torch.nn.Module:
    """A seeded random-weight tiny decoder of one of the supported architectures."""
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    elif arch == "gpt_neox":  # parallel residual: h + attn(ln1(h)) + mlp(ln2(h))
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=256))
    elif arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=layers, n_head=4,
                                                                     vocab_size=VOCAB, n_positions=256))
    else:
        raise ValueError(arch)
    model.generation_config.eos_token_id = None  # random weights: never stop early in generate()
    return model.eval()


def tree_inputs(parents: list[int], past: int, batch: int, dtype=torch.float32):
    """Depth-based positions [batch, n] and the additive bias [batch, 1, n, past + n] of a token tree."""
    n = len(parents)
    depth, anc = [], torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        depth.append(0 if p < 0 else depth[p] + 1)
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
    bias = torch.zeros(batch, 1, n, past + n, dtype=dtype)
    bias[:, :, :, past:] = torch.zeros(n, n, dtype=dtype).masked_fill(~anc, float("-inf"))
    positions = (past + torch.tensor(depth))[None].expand(batch, n).contiguous()
    return positions, bias


def path_to(parents: list[int], node: int) -> list[int]:
    """Node indices root -> node."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


# llama carries the layer-skip draft (4 layers, skip 2 and 3); the others check the kv-cache/verify rewrite
LAYERS = {"llama": 4, "qwen2": 2, "mistral": 2, "gpt2": 2}
EXTRA = {"llama": "layer-skip-draft{layers=2,3},dce"}


@functools.lru_cache(maxsize=None)
def compiled(arch: str) -> tuple[torch.nn.Module, Module]:
    """(HF model, IR module after kv-cache / tree-verify{hidden} [/ layer-skip-draft]) for ``arch``; cached."""
    return compile_arch(arch, LAYERS[arch], EXTRA.get(arch, ""))


def compile_arch(arch: str, layers: int, extra: str = "") -> tuple[torch.nn.Module, Module]:
    model = make_model(arch, layers)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    ir = export_to_ir(model, (ids,), {0: {0: "batch", 1: "seq"}})
    run_pipeline(ir, PIPELINE + ("," + extra if extra else ""))
    return model, ir


def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits

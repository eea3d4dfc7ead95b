"""Tiny models for the model-map, fusion and inspect tests: real HF classes from tiny configs, plus hand-written
blocks (explicit softmax(QK^T)V attention with several mask spellings, and a block the map must *not* recognize).

``exported(name)`` caches the IR per process: exporting is the slow part of these tests.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from elision.frontend.trace import export_to_ir
from tools.arch_zoo import BY_TYPE, build_model

SEQ = {0: {0: "batch", 1: "seq"}}
BATCH = {0: {0: "batch"}}


def _ids(vocab: int, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def _decoder(cls_name: str, cfg_name: str, **extra):
    import transformers as T

    torch.manual_seed(0)
    cfg = getattr(T, cfg_name)(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, **extra)
    return getattr(T, cls_name)(cfg).eval(), (_ids(128),), SEQ


def llama():
    return _decoder("LlamaForCausalLM", "LlamaConfig")


def qwen2():
    return _decoder("Qwen2ForCausalLM", "Qwen2Config")


def mistral():
    return _decoder("MistralForCausalLM", "MistralConfig")


def gemma(cls_name: str = "GemmaForCausalLM", cfg_name: str = "GemmaConfig"):
    """Gemma 1/2/3: RMSNorm multiplies by ``1 + weight`` (weights start at 0: set to seeded random values here so
    the multiply matters); Gemma 3 adds q/k norms and norms around each branch; Gemma 2 uses eager attention."""
    model, example, dyn = _decoder(cls_name, cfg_name, head_dim=16)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model, example, dyn


def gpt2():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(cfg).eval(), (_ids(128),), SEQ


def bert():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       vocab_size=128, max_position_embeddings=64)
    # static sequence length: BERT's learned positions bound seq <= 64, which the front end's Dim(min=1) rejects
    return T.BertModel(cfg, add_pooling_layer=False).eval(), (_ids(128),), BATCH


def vit():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      image_size=32, patch_size=8)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return T.ViTModel(cfg, add_pooling_layer=False).eval(), (px,), BATCH


def clip_vision():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.CLIPVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             image_size=32, patch_size=8)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return T.CLIPVisionModel(cfg).eval(), (px,), BATCH


LLAVA_IMAGE_TOKEN = 127


def llava():
    """LLaVA (CLIP vision tower + Llama) with 4 image tokens per image spliced into the ids."""
    import transformers as T

    torch.manual_seed(0)
    vc = T.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            image_size=16, patch_size=8, projection_dim=32)
    tc = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128)
    cfg = T.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=LLAVA_IMAGE_TOKEN, projector_hidden_act="gelu")
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 1:5] = LLAVA_IMAGE_TOKEN  # (16/8)^2 = 4 patch features per image
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return T.LlavaForConditionalGeneration(cfg).eval(), (ids, px), None


# ------------------------------------------------------------------------------------------ hand-written
class ExplicitAttention(torch.nn.Module):
    """softmax(QK^T / sqrt(d) + mask) V written out by hand, GQA through repeat_interleave."""

    def __init__(self, d: int = 32, heads: int = 4, kv_heads: int = 2, mask: str = "causal-fill"):
        super().__init__()
        self.h, self.kvh, self.hd, self.mask = heads, kv_heads, d // heads, mask
        self.q = torch.nn.Linear(d, d)
        self.k = torch.nn.Linear(d, kv_heads * self.hd)
        self.v = torch.nn.Linear(d, kv_heads * self.hd)
        self.o = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(b, n, self.kvh, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kvh, dim=1)
        v = self.v(x).view(b, n, self.kvh, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kvh, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        if self.mask == "causal-fill":
            keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~keep, float("-inf"))
        elif self.mask == "causal-additive":
            att = att + torch.full((n, n), float("-inf"), device=x.device).triu(1)
        elif self.mask == "bias":
            att = att + bias
        att = att.softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, -1))


class Block(torch.nn.Module):
    def __init__(self, d: int = 32, mask: str = "causal-fill"):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = ExplicitAttention(d, mask=mask)
        self.fc1, self.fc2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x, bias=None):
        x = x + self.attn(self.ln1(x), bias)
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class HandWrittenLM(torch.nn.Module):
    def __init__(self, mask: str = "causal-fill", vocab: int = 50, d: int = 32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList([Block(d, mask), Block(d, mask)])
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.mask = mask

    def forward(self, ids, bias=None):
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x, bias)
        return self.head(x)


def handwritten(mask: str = "causal-fill"):
    torch.manual_seed(0)
    m = HandWrittenLM(mask).eval()
    if mask == "bias":
        bias = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(3))
        return m, (_ids(50, (2, 7)), bias), {0: {0: "batch"}, 1: {0: "batch"}}
    return m, (_ids(50, (2, 7)),), SEQ


class Mixer(torch.nn.Module):
    """Token mixing by a learned matrix (no attention, no softmax) and a residual: nothing the map knows."""

    def __init__(self, n: int = 7, d: int = 32):
        super().__init__()
        self.emb = torch.nn.Embedding(50, d)
        self.mix = torch.nn.Parameter(torch.randn(n, n) / n)
        self.proj = torch.nn.Linear(d, d)
        self.score = torch.nn.Linear(d, d)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.proj(torch.einsum("ij,bjd->bid", self.mix, x))
        # a softmax that is not attention: gating weights over channels
        return x * torch.softmax(self.score(x), dim=-1)


def mixer():
    torch.manual_seed(0)
    return Mixer().eval(), (_ids(50, (2, 7)),), {0: {0: "batch"}}


def zoo(model_type: str, **config):
    """The architecture matrix's tiny model of ``model_type`` (`tools/arch_zoo.py`, norm weights perturbed), with
    ``config`` overriding its config (e.g. more layers)."""
    arch = BY_TYPE[model_type]
    model = build_model(dataclasses.replace(arch, config={**arch.config, **config}), vocab_size=128)
    return model, (_ids(128),), SEQ


# packed / fused q/k/v, partial and interleaved rotary, parallel attention + MLP blocks, written-out norms
ZOO_TYPES = ("gpt_neox", "gptj", "falcon", "stablelm", "phi", "cohere", "helium", "gemma3_text")

BUILDERS = {"llama": llama, "qwen2": qwen2, "mistral": mistral, "gpt2": gpt2, "bert": bert, "vit": vit,
            "clip_vision": clip_vision, "llava": llava, "handwritten": handwritten, "mixer": mixer,
            "handwritten_additive": lambda: handwritten("causal-additive"), "handwritten_bias": lambda: handwritten("bias"),
            "gemma": gemma, "gemma2": lambda: gemma("Gemma2ForCausalLM", "Gemma2Config"),
            "gemma3": lambda: gemma("Gemma3ForCausalLM", "Gemma3TextConfig"),
            "gpt_neox_3": lambda: zoo("gpt_neox", num_hidden_layers=3),
            **{f"zoo_{t}": functools.partial(zoo, t) for t in ZOO_TYPES}}


@functools.lru_cache(maxsize=None)
def built(name: str):
    """(model, example inputs, dynamic dims) — built once per process."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return BUILDERS[name]()


def exported(name: str):
    """A fresh IR module of ``name`` (the export itself is cached; the module is copied)."""
    return _exported(name).copy()


@functools.lru_cache(maxsize=None)
def _exported(name: str):
    model, example, dyn = built(name)
    names = ["input_ids", "pixel_values"] if name == "llava" else None
    return export_to_ir(model, example, dyn, input_names=names)

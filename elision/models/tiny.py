"""Small random-weight Hugging Face models built from configs (seeded): structure coverage, tests, and the demo.

Weights are random, so these say nothing about fidelity; the trained builtins (tiny-code-lm, fashion-vit,
vecset fixtures) are for measurements.
"""
from __future__ import annotations

import torch
import transformers

from elision.models.builtin_model import BuiltinModel


def _seeded(build):
    def wrapped():
        torch.manual_seed(0)
        return build().eval()
    return wrapped


def _tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg)


def _tiny_gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=512)
    return transformers.GPT2LMHeadModel(cfg)


def _tiny_bert():
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=256, max_position_embeddings=512)
    return transformers.BertModel(cfg, add_pooling_layer=False)


def _tiny_vit():
    cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=32, patch_size=8, num_channels=3)
    return transformers.ViTModel(cfg, add_pooling_layer=False)


def _ids(model):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, model.config.vocab_size, (2, 16), generator=g),)


def _pixels(model):
    g = torch.Generator().manual_seed(1)
    c = model.config
    return (torch.randn(2, c.num_channels, c.image_size, c.image_size, generator=g),)


BUILTINS = [
    BuiltinModel("tiny-llama", "random-weight 2-layer Llama (GQA 4/2 heads, hidden 64)", _seeded(_tiny_llama),
                 _ids, {0: {0: "batch", 1: "seq"}}, "causal-lm"),
    BuiltinModel("tiny-gpt2", "random-weight 2-layer GPT-2 (hidden 64)", _seeded(_tiny_gpt2),
                 _ids, {0: {0: "batch", 1: "seq"}}, "causal-lm"),
    BuiltinModel("tiny-bert", "random-weight 2-layer BERT encoder (hidden 64)", _seeded(_tiny_bert),
                 _ids, {0: {0: "batch", 1: "seq"}}, "encoder"),
    BuiltinModel("tiny-vit", "random-weight 2-layer ViT, 32x32 images, 8x8 patches", _seeded(_tiny_vit),
                 _pixels, {0: {0: "batch"}}, "vision"),
]

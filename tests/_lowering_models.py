"""Tiny Hugging Face models (random weights) shared by the ONNX / backend / MLIR tests.

Each builder returns (module returning one tensor, example inputs, dynamic dims in the registry's
`{input_index: {dim: name}}` form, a fresh-input factory at another shape). Configs are the smallest that
still exercise the real model classes: 1-2 layers, hidden 32-64.
"""
from __future__ import annotations

import torch


class PrimaryOutput(torch.nn.Module):
    """Calls a HF model positionally and returns its primary output tensor (logits / last hidden state)."""

    def __init__(self, model: torch.nn.Module, use_cache: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.use_cache = use_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_cache is None:
            return self.model(x)[0]
        return self.model(x, use_cache=self.use_cache)[0]


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=256, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=256, max_position_embeddings=128)
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8, num_channels=3)
    return ViTModel(cfg, add_pooling_layer=False).eval()


def token_ids(batch: int, seq: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))

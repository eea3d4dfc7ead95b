"""The attention window speculative decoding applies, read from a Hugging Face config.

The tree-verify mask (torch route, compiled @verify, ONNX Runtime step) applies one window to every layer. Models
whose config mixes sliding-window and full-attention layers (`layer_types`, e.g. Gemma 2/3) would get the window in
their full-attention layers too and decode differently from the model itself, so they are refused in one line.
"""
from __future__ import annotations

SLIDING, FULL = "sliding_attention", "full_attention"


def attention_window(cfg) -> int | None:
    """The sliding window every layer uses, or None (full attention); ValueError for per-layer mixed windows."""
    window = getattr(cfg, "sliding_window", None)
    use_window = getattr(cfg, "use_sliding_window", True)
    if not (window and use_window):
        return None
    kinds = set(getattr(cfg, "layer_types", None) or ())
    if SLIDING in kinds and FULL in kinds:
        model_type = getattr(cfg, "model_type", "this model")
        raise ValueError(f"{model_type} mixes sliding-window ({window}) and full-attention layers (config.layer_types); "
                         f"speculative decoding applies one attention window to every layer, so it would not match "
                         f"the model's own decoding")
    if kinds == {FULL}:
        return None
    return int(window)

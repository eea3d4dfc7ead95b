"""Target/draft model backends: the small tensor-only protocol the decoding loop drives.

A backend owns a KV cache of `capacity` slots per sequence and exposes:

* `forward(tokens [B,n], positions [B,n], bias [B,1,n,L+n]) -> logits [B,n,V]`: run the model on n new
  tokens at the given absolute positions, attending with a float additive bias (0 / -inf) over the L
  cached slots followed by the n new ones, and append their K/V as slots L..L+n-1.
* `select(index [B,m], start)`: slots [start, start+m) := slots index[b] of each sequence; cache length
  becomes start+m. Compaction of an accepted path, rollback and repacking are all this one gather.
* `truncate(length)`, `length`, `reset(batch_size, capacity)`.

A compiled backend (the lead's kv-cache / tree-verify passes) implements the same four calls.
`HFCausalLMBackend` implements it for any Hugging Face causal LM with attention layers: the model is
called with a 4-D FLOAT mask (a bool 4-D mask is silently wrong under the eager attention backend) and
explicit position ids, and a `SlotBufferCache` we own. `skip_layers` bypasses decoder layers (residual
only), which turns the same weights into a self-speculative draft model.
"""
from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import nn

from elision.apps.specdec.attention_window import attention_window
from elision.apps.specdec.cache import SlotBufferCache


class ModelBackend(Protocol):
    vocab_size: int
    num_layers: int
    max_positions: int | None
    sliding_window: int | None
    dtype: torch.dtype

    def reset(self, batch_size: int, capacity: int) -> None: ...

    @property
    def length(self) -> int: ...

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor: ...

    def select(self, index: torch.Tensor, start: int) -> None: ...

    def truncate(self, length: int) -> None: ...

    # optional: `layer_skip_backend(skip_layers) -> ModelBackend` sharing the weights, for drafter "layer-skip"


class _Bypass(nn.Module):
    """Stands in for a skipped decoder layer: the residual stream passes through unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of an HF causal LM (`model.layers`, GPT-2's `transformer.h`, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    base = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks", "decoder_layers"):
        mod = getattr(base, name, None)
        if isinstance(mod, nn.ModuleList) and (n is None or len(mod) == n):
            return mod
    for mod in base.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}; layer skipping needs them")


class HFCausalLMBackend:
    """Backend for a Hugging Face `*ForCausalLM` (Llama, Qwen2, Mistral, GPT-2, ...)."""

    def __init__(self, model: nn.Module, skip_layers: frozenset[int] | set[int] = frozenset()):
        cfg = model.config
        self.model = model.eval()
        self.config = cfg
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.num_layers = int(cfg.num_hidden_layers)
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.sliding_window = attention_window(cfg)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.skip_layers = frozenset(int(i) for i in skip_layers)
        if self.skip_layers:
            bad = [i for i in self.skip_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"skip_layers {sorted(bad)} out of range for a {self.num_layers}-layer model")
            self._layers = find_decoder_layers(model)
        self.cache: SlotBufferCache | None = None
        self.forward_calls = 0

    def reset(self, batch_size: int, capacity: int) -> None:
        self.cache = SlotBufferCache(self.num_layers, capacity)
        self.batch_size = batch_size

    def layer_skip_backend(self, skip_layers) -> "HFCausalLMBackend":
        """A second backend over the same weights with `skip_layers` bypassed (its own KV cache)."""
        return HFCausalLMBackend(self.model, skip_layers=skip_layers)

    @property
    def length(self) -> int:
        return self.cache.layers[self._first_kept_layer()].length if self.cache else 0

    def _first_kept_layer(self) -> int:
        for i in range(self.num_layers):
            if i not in self.skip_layers:
                return i
        return 0

    @contextlib.contextmanager
    def _skipping(self):
        if not self.skip_layers:
            yield
            return
        saved = {i: self._layers[i] for i in self.skip_layers}
        bypass = _Bypass()
        try:
            for i in saved:
                self._layers[i] = bypass
            yield
        finally:
            for i, layer in saved.items():
                self._layers[i] = layer

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        self.forward_calls += 1
        with self._skipping():
            out = self.model(
                input_ids=tokens.to(self.device),
                position_ids=positions.to(self.device),
                attention_mask=bias.to(device=self.device, dtype=self.dtype),
                cache=self.cache,
                use_cache=True,
            )
        logits = out.logits
        # half-precision logits are widened for sampling; float64 models keep float64 (exact comparisons)
        return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()

    @torch.inference_mode()  # the buffers were created under inference mode by forward()
    def select(self, index: torch.Tensor, start: int) -> None:
        self.cache.select(index.to(self.device), start)

    def truncate(self, length: int) -> None:
        self.cache.truncate(length)

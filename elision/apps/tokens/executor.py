"""Run a real HF encoder (BERT-family or ViT) layer by layer with token reduction and layer skipping applied.

This is the eager counterpart of the IR rewrites: it uses the model's own weights and sub-modules
(q/k/v projections, output projections, norms, MLPs) and calls the functions of `algorithms.py` at the
points the passes insert them. It is what the fidelity search and the benchmark execute, so everything the
tuner measures is the real computation, not a simulation.

A `ReductionPlan` says what to do:
  prune_after / keep / score   drop tokens after layer L, scored from layer L's own q and k
  merge_r / merge_start        ToMe merging of r tokens in every layer >= merge_start
  dct_after / dct_keep         Fourier low-pass of the patch grid after layer L (vision only)
  skip_attn / skip_mlp         residual branches removed
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from elision.kernels import token_reduction as alg


@dataclass(frozen=True)
class ReductionPlan:
    prune_after: int | None = None
    keep: float = 1.0
    score: str = "cls-attn"
    merge_r: int = 0
    merge_start: int = 0
    dct_after: int | None = None
    dct_keep: float = 1.0
    skip_attn: frozenset[int] = field(default_factory=frozenset)
    skip_mlp: frozenset[int] = field(default_factory=frozenset)
    seed: int = 0  # only for score="random"
    # further (after, keep) pruning stages, each keep relative to the tokens left (progressive pruning)
    extra_stages: tuple[tuple[int, float], ...] = ()

    def prune_stages(self) -> dict[int, float]:
        stages = dict(self.extra_stages)
        if self.prune_after is not None:
            stages[self.prune_after] = self.keep
        return {a: k for a, k in sorted(stages.items()) if k < 1.0}

    def describe(self) -> str:
        """The plan as a pass-pipeline string (the syntax `elision compile --passes` accepts)."""
        parts = []
        for after, keep in self.prune_stages().items():
            parts.append(f"prune-tokens{{score={self.score},after={after},keep={keep:g}}}")
        if self.merge_r:
            parts.append(f"merge-tokens{{r={self.merge_r},start={self.merge_start}}}")
        if self.dct_after is not None and self.dct_keep < 1.0:
            parts.append(f"compress-tokens{{method=dct,after={self.dct_after},keep={self.dct_keep:g}}}")
        if self.skip_attn or self.skip_mlp:
            items = [f"attn{i}" for i in sorted(self.skip_attn)] + [f"mlp{i}" for i in sorted(self.skip_mlp)]
            parts.append("skip-layers{layers=" + "+".join(items) + "}")
        return ",".join(parts) or "(unchanged)"

    def with_(self, **kw) -> "ReductionPlan":
        return replace(self, **kw)


IDENTITY = ReductionPlan()


@dataclass
class TokenState:
    hidden: torch.Tensor      # (B, N, C)
    size: torch.Tensor        # (B, N) float: tokens each slot stands for; 0 = padding / dropped
    protected: torch.Tensor   # (B, N) bool


class EncoderAdapter:
    """Uniform access to the pieces of one encoder architecture."""

    num_layers: int
    num_heads: int
    grid: tuple[int, int] | None = None  # patch grid for vision models (tokens after [CLS])
    output_kind: str = "embedding"        # what `head` returns: "embedding" (compared by cosine) or "logits"

    def embed(self, *inputs) -> TokenState: ...
    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def attn_residual(self, i: int, h: torch.Tensor, attn: torch.Tensor | None) -> torch.Tensor: ...
    def mlp_residual(self, i: int, h: torch.Tensor, skip: bool) -> torch.Tensor: ...
    def head(self, st: TokenState) -> torch.Tensor: ...

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)


class BertAdapter(EncoderAdapter):
    """BERT-family post-LN encoders (all-MiniLM-L6-v2). Output: mean-pooled sentence embedding."""

    def __init__(self, model, sep_token_id: int | None = None):
        self.m = model
        self.layers = model.encoder.layer
        self.num_layers = len(self.layers)
        self.num_heads = model.config.num_attention_heads
        self.sep_token_id = getattr(model.config, "sep_token_id", None) if sep_token_id is None else sep_token_id
        if self.sep_token_id is None:
            self.sep_token_id = 102  # BERT uncased vocab [SEP]

    def embed(self, input_ids, attention_mask=None, token_type_ids=None) -> TokenState:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.m.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        valid = attention_mask.to(torch.bool)
        # [CLS] (position 0) and [SEP] are never dropped.
        protected = (input_ids == self.sep_token_id) & valid
        protected[:, 0] = True
        return TokenState(h, valid.to(h.dtype), protected)

    def qkv(self, i, h):
        s = self.layers[i].attention.self
        return self.split_heads(s.query(h)), self.split_heads(s.key(h)), self.split_heads(s.value(h))

    def attn_residual(self, i, h, attn):
        out = self.layers[i].attention.output
        branch = out.dense(attn) if attn is not None else torch.zeros_like(h)
        return out.LayerNorm(branch + h)

    def mlp_residual(self, i, h, skip):
        layer = self.layers[i]
        branch = torch.zeros_like(h) if skip else layer.output.dense(layer.intermediate(h))
        return layer.output.LayerNorm(branch + h)

    def head(self, st):
        return alg.masked_mean_pool(st.hidden, st.size)


class ViTAdapter(EncoderAdapter):
    """HF ViT (pre-LN, [CLS] first). Output: classifier logits (or pooled [CLS] state without a head)."""

    def __init__(self, model):
        self.m = model
        self.vit = model.vit if hasattr(model, "vit") else model
        self.layers = self.vit.layers
        self.num_layers = len(self.layers)
        self.num_heads = self.vit.config.num_attention_heads
        side = self.vit.config.image_size // self.vit.config.patch_size
        self.grid = (side, side)
        self.output_kind = "logits" if hasattr(model, "classifier") else "embedding"

    def embed(self, pixel_values) -> TokenState:
        h = self.vit.embeddings(pixel_values)
        b, n, _ = h.shape
        protected = torch.zeros(b, n, dtype=torch.bool, device=h.device)
        protected[:, 0] = True
        return TokenState(h, torch.ones(b, n, dtype=h.dtype, device=h.device), protected)

    def _normed(self, i, h):
        return self.layers[i].layernorm_before(h)

    def qkv(self, i, h):
        a = self.layers[i].attention
        x = self._normed(i, h)
        return self.split_heads(a.q_proj(x)), self.split_heads(a.k_proj(x)), self.split_heads(a.v_proj(x))

    def attn_residual(self, i, h, attn):
        return h if attn is None else h + self.layers[i].attention.o_proj(attn)

    def mlp_residual(self, i, h, skip):
        layer = self.layers[i]
        return h if skip else h + layer.mlp(layer.layernorm_after(h))

    def head(self, st):
        h = self.vit.layernorm(st.hidden)
        cls = h[:, 0]
        return self.m.classifier(cls) if hasattr(self.m, "classifier") else cls


class CLIPVisionAdapter(EncoderAdapter):
    """HF CLIP vision tower (pre-LN, [CLS] first, `pre_layrnorm` after the embeddings; LLaVA's vision tower).
    Output: the pooled [CLS] state (`post_layernorm(h[:, 0])`, HF's `pooler_output`)."""

    def __init__(self, model):
        self.m = model.vision_model if hasattr(model, "vision_model") else model
        self.layers = self.m.encoder.layers
        self.num_layers = len(self.layers)
        cfg = self.m.config
        self.num_heads = cfg.num_attention_heads
        side = cfg.image_size // cfg.patch_size
        self.grid = (side, side)

    def embed(self, pixel_values) -> TokenState:
        h = self.m.pre_layrnorm(self.m.embeddings(pixel_values))
        b, n, _ = h.shape
        protected = torch.zeros(b, n, dtype=torch.bool, device=h.device)
        protected[:, 0] = True
        return TokenState(h, torch.ones(b, n, dtype=h.dtype, device=h.device), protected)

    def qkv(self, i, h):
        a = self.layers[i].self_attn
        x = self.layers[i].layer_norm1(h)
        return self.split_heads(a.q_proj(x)), self.split_heads(a.k_proj(x)), self.split_heads(a.v_proj(x))

    def attn_residual(self, i, h, attn):
        return h if attn is None else h + self.layers[i].self_attn.out_proj(attn)

    def mlp_residual(self, i, h, skip):
        layer = self.layers[i]
        return h if skip else h + layer.mlp(layer.layer_norm2(h))

    def head(self, st):
        return self.m.post_layernorm(st.hidden[:, 0])


def is_clip_vision(model) -> bool:
    m = getattr(model, "vision_model", model)
    return hasattr(m, "pre_layrnorm") and hasattr(m, "encoder") and hasattr(m.encoder, "layers")


def adapter_for(model) -> EncoderAdapter:
    """Recognise the model's structure; a clear error when there are no recognisable tokens/layers."""
    name = type(model).__name__
    if hasattr(model, "encoder_model"):  # elision.models.vision.MeanPooledEncoder
        model = model.encoder_model
    if hasattr(model, "encoder") and hasattr(getattr(model, "encoder"), "layer") and hasattr(model, "embeddings"):
        return BertAdapter(model)
    if is_clip_vision(model):
        return CLIPVisionAdapter(model)
    if hasattr(model, "vit") or (hasattr(model, "layers") and hasattr(model, "embeddings")
                                 and hasattr(getattr(model, "embeddings"), "patch_embeddings")):
        return ViTAdapter(model)
    raise alg.PruningError(
        f"{name}: no recognizable token sequence; the layer-by-layer executor (elision tune) supports BERT-family "
        "encoders, elision's ViT (builtin:fashion-vit) and HF CLIP vision towers; for LLaVA use "
        "elision.apps.tokens.vlm.prune_image_tokens (vision tokens pruned before the language model)"
    )


def _attention(q, k, v, size):
    """SDPA with padding/proportional attention as an additive float mask (fused attention stays usable)."""
    bias = alg.proportional_attention_bias(size).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def _scores(plan: ReductionPlan, q, k, st: TokenState) -> torch.Tensor:
    valid = st.size > 0
    if plan.score == "cls-attn":
        return alg.attention_row_scores(q, k, 0, valid=valid)
    if plan.score == "last-token-attn":
        return alg.attention_row_scores(q, k, alg.last_valid_index(valid), valid=valid)
    if plan.score == "key-norm":
        return alg.key_norm_scores(k)
    if plan.score == "random":
        g = torch.Generator().manual_seed(plan.seed)
        return torch.rand(st.size.shape, generator=g).to(q.device)
    raise alg.PruningError(f"score={plan.score!r}: use one of {', '.join(alg.SCORE_METHODS)}")


def check_plan(plan: ReductionPlan, adapter: EncoderAdapter, allow_edge_skips: bool = False) -> None:
    n = adapter.num_layers
    for after, keep in list(plan.extra_stages) + ([(plan.prune_after, plan.keep)] if plan.prune_after is not None else []):
        alg.check_layer_index(after, n, "after")
        alg.check_keep_ratio(keep)
    if plan.dct_after is not None:
        alg.check_layer_index(plan.dct_after, n, "after")
        alg.check_keep_ratio(plan.dct_keep)
        if adapter.grid is None:
            raise alg.PruningError("compress-tokens{method=dct} needs a vision model with a patch grid")
    if plan.merge_r < 0:
        raise alg.PruningError(f"merge r={plan.merge_r} must be >= 0")
    if plan.merge_r and plan.prune_stages() and max(plan.prune_stages()) >= plan.merge_start:
        raise alg.PruningError("prune-tokens must come before the first merging layer (after < merge start)")
    for i in set(plan.skip_attn) | set(plan.skip_mlp):
        alg.check_layer_index(i, n, "layers")
        if not allow_edge_skips and i in (0, n - 1):
            raise alg.PruningError(
                f"skipping layer {i} (the first or last layer) is refused: it is usually catastrophic; "
                "pass allow_edge_skips=True if you really want it")


@torch.no_grad()
def run_encoder(adapter: EncoderAdapter, inputs: tuple, plan: ReductionPlan = IDENTITY,
                allow_edge_skips: bool = False) -> torch.Tensor:
    """Run the encoder with `plan` applied; returns the model output (embedding or logits)."""
    check_plan(plan, adapter, allow_edge_skips)
    st = adapter.embed(*inputs)
    stages = plan.prune_stages()
    for i in range(adapter.num_layers):
        q = k = None
        needs_tap = i in stages
        merging = plan.merge_r > 0 and i >= plan.merge_start
        if i not in plan.skip_attn or needs_tap or merging:
            q, k, v = adapter.qkv(i, st.hidden)
        attn = None if i in plan.skip_attn else _attention(q, k, v, st.size)
        h = adapter.attn_residual(i, st.hidden, attn)
        if merging:
            # ToMe: between attention and MLP, keys averaged over heads as the similarity metric.
            r = min(plan.merge_r, (h.shape[1] + 1) // 2 - int(st.protected[:, 0::2].sum(1).max()))
            if r > 0:
                metric = k.mean(1)
                h, size, source = alg.tome_merge(h, st.size, metric, r, protected=st.protected)
                prot = torch.zeros_like(size, dtype=torch.bool).scatter(1, source, st.protected)
                st = TokenState(h, size, prot)
        st = TokenState(adapter.mlp_residual(i, h, i in plan.skip_mlp), st.size, st.protected)
        if needs_tap:
            scores = _scores(plan, q, k, st)
            idx, kept_valid = alg.select_tokens(scores, stages[i], st.protected, st.size > 0)
            st = TokenState(alg.gather_tokens(st.hidden, idx),
                            alg.gather_tokens(st.size, idx) * kept_valid.to(st.size.dtype),
                            alg.gather_tokens(st.protected, idx))
        if plan.dct_after == i and plan.dct_keep < 1.0:
            cls, patches = st.hidden[:, :1], st.hidden[:, 1:]
            if patches.shape[1] != adapter.grid[0] * adapter.grid[1]:
                raise alg.PruningError("compress-tokens{method=dct} must come before any token pruning/merging")
            small = alg.dct_compress(patches, adapter.grid, plan.dct_keep)
            hidden = torch.cat([cls, small], 1)
            b, n = hidden.shape[:2]
            prot = torch.zeros(b, n, dtype=torch.bool, device=hidden.device)
            prot[:, 0] = True
            st = TokenState(hidden, torch.ones(b, n, dtype=hidden.dtype, device=hidden.device), prot)
    return adapter.head(st)


def reference_output(model, adapter: EncoderAdapter, inputs: tuple) -> torch.Tensor:
    """The unmodified HF model's output in the same form as `run_encoder` (embedding or logits)."""
    with torch.no_grad():
        if isinstance(adapter, BertAdapter):
            model = getattr(model, "encoder_model", model)
            ids, mask = inputs[0], inputs[1] if len(inputs) > 1 else torch.ones_like(inputs[0])
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            return alg.masked_mean_pool(out, mask)
        out = model(pixel_values=inputs[0])
        if isinstance(adapter, CLIPVisionAdapter):
            return out.pooler_output
        return out.logits if hasattr(out, "logits") else out.last_hidden_state[:, 0]

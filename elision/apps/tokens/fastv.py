"""FastV-style image-token pruning inside the language model of a Hugging Face LLaVA, with a consistent KV cache.

FastV (Chen et al., 2024) lets every image token through the first layers of the LM and drops most of them
from layer K (`after`) on. Precisely, for an LM of N decoder layers and 1 <= K <= N-1:

* layers 0..K-1 run on the whole prompt (L tokens);
* each image token is scored by the attention the last real prompt token gives it in layer K-1 (heads
  averaged). The row is recomputed from layer K-1's own q and k (RoPE applied, GQA keys repeated), so it
  equals the eager attention weights whatever kernel (SDPA, ...) the model runs;
* the top `keep` fraction (ceil, `alg.keep_count`) of each image's tokens survives; text tokens (and padding,
  which stays masked) are never dropped; kept tokens keep their order;
* layers K..N-1 run on the shorter prompt (L' tokens).

Kept tokens keep their ORIGINAL position ids (FastV keeps the RoPE positions; prompt positions follow HF:
cumsum of the attention mask - 1), and generated token t (0-based) sits at position n_real + t, n_real being
the row's number of real prompt tokens. The KV cache thus holds L + t entries in layers < K and L' + t in
layers >= K; HF's mask construction assumes one cache length, so this module runs the decoder layers itself
with a 4-D additive mask per layer group. K=0 would be pruning before the LM: that is `prune_image_tokens`
(FasterVLM, scored in the vision tower).

Supported: LLaVA-style models (vision tower, projector, config.image_token_id) whose LM is a Llama/Qwen2-style stack (`embed_tokens`, `layers`
with `self_attn.q_proj/k_proj`, `input_layernorm`, `norm`, `rotary_emb`), full attention in every layer.
Greedy decoding only, no EOS stop (every row produces `max_new_tokens`). Approximate for keep < 1: use it when
`fastv_fidelity` is acceptable.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from elision.apps.tokens import vlm
from elision.kernels import token_reduction as alg


@dataclass
class FastVResult:
    tokens: torch.Tensor      # (B, T) greedy tokens
    logits: torch.Tensor      # (B, T, V) the next-token logits each token was picked from
    kept: torch.Tensor        # (B, L') prompt positions that run layers >= after, ascending
    image_kept: torch.Tensor  # (images, K) kept token indices within each image span, ascending
    scores: torch.Tensor      # (B, L) last-prompt-token attention in layer after-1 (head mean)
    image_tokens: int         # P: tokens per image before pruning
    prompt_len: int           # L
    tokens_per_group: tuple[int, int]  # prompt tokens in layers < after and in layers >= after: (L, L')
    after: int


@dataclass
class _Decoder:
    """The pieces of a Llama/Qwen2-style LM that the layer loop calls."""
    embed: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    rotary: torch.nn.Module
    head: torch.nn.Module
    rope: Callable  # the modeling module's apply_rotary_pos_emb(q, k, cos, sin)


@dataclass
class _Prompt:
    embeds: torch.Tensor     # (B, L, D) text embeddings with the projected image features scattered in
    valid: torch.Tensor      # (B, L) bool, real tokens
    positions: torch.Tensor  # (B, L) HF position ids (cumsum of the mask - 1, 0 on padding)
    spans: torch.Tensor      # (images, P, 2) (row, position) of every image token


def _decoder(model) -> _Decoder:
    inner = vlm._llava(model)
    lm = inner.language_model
    layers = getattr(lm, "layers", None)
    if layers is None or not all(hasattr(lm, n) for n in ("embed_tokens", "norm", "rotary_emb")):
        raise alg.PruningError(f"language model {type(lm).__name__} is not a Llama/Qwen2-style decoder stack "
                               "(needs embed_tokens, layers, norm and rotary_emb)")
    _check_full_attention(lm)
    for i, layer in enumerate(layers):
        _check_layer(i, layer)
    rope = getattr(sys.modules[type(layers[0].self_attn).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise alg.PruningError(f"{type(layers[0].self_attn).__module__} has no apply_rotary_pos_emb")
    return _Decoder(lm.embed_tokens, layers, lm.norm, lm.rotary_emb, model.get_output_embeddings(), rope)


def _check_full_attention(lm) -> None:
    # the masks below are plain causal: a window (Mistral's sliding_window, Qwen2's sliding layers) would be ignored
    window = getattr(lm.config, "sliding_window", None)
    if window or any(t != "full_attention" for t in getattr(lm.config, "layer_types", None) or ()):
        raise alg.PruningError(f"{type(lm).__name__}: sliding-window attention is not supported (sliding_window="
                               f"{window}); FastV here needs full attention in every layer")


def _check_layer(i: int, layer) -> None:
    attn = getattr(layer, "self_attn", None)
    if attn is None or not hasattr(layer, "input_layernorm") or not all(
            hasattr(attn, n) for n in ("q_proj", "k_proj", "head_dim", "scaling", "layer_idx")):
        raise alg.PruningError(f"decoder layer {i} ({type(layer).__name__}) is not a Llama/Qwen2-style layer "
                               "(needs input_layernorm and self_attn.q_proj/k_proj)")
    if attn.layer_idx != i:  # the layer finds its cache entry by layer_idx, the loop here by position
        raise alg.PruningError(f"decoder layer {i} has self_attn.layer_idx={attn.layer_idx}")
    if hasattr(attn, "q_norm") or getattr(attn, "sliding_window", None):
        raise alg.PruningError(f"decoder layer {i} ({type(attn).__name__}): q/k norms and sliding windows are not "
                               "supported (the score and the masks assume Llama/Qwen2 attention)")


def _check_options(dec: _Decoder, after: int, keep: float | None) -> None:
    n = len(dec.layers)
    if isinstance(after, bool) or not isinstance(after, int) or not 1 <= after <= n - 1:
        hint = (" (after=0 prunes before the LM: use prune_image_tokens, FasterVLM)" if after == 0 else "")
        raise alg.PruningError(f"after={after!r} is out of range: tokens are dropped from layer `after` on, "
                               f"use 1..{n - 1} for a {n}-layer language model{hint}")
    if keep is not None:
        alg.check_keep_ratio(keep)


def _prompt(model, input_ids, pixel_values, attention_mask) -> _Prompt:
    """Embed the prompt the way LlavaModel.forward does: the model's own image features, scattered in order."""
    inner = vlm._llava(model)
    if pixel_values is None:
        raise alg.PruningError("pixel_values is None: FastV prunes image tokens, pass the images")
    features = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    images = len(features)
    spans = vlm._image_spans(model, input_ids, images, features[0].shape[0])
    embeds = inner.get_input_embeddings()(input_ids.masked_fill(input_ids == model.config.image_token_id, 0))
    embeds[spans[..., 0].flatten(), spans[..., 1].flatten()] = torch.cat(features).to(embeds.dtype)
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return _Prompt(embeds, valid, positions, spans)


def _mask(key_valid: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Q, Lk) additive mask: the Q queries are the last Q keys (the cache holds the rest); query i sees the
    real keys up to itself. Keys keep sequence order in both layer groups, so causality is by index. finfo.min
    rather than -inf, as HF does, so a padding query that sees nothing gets no NaN."""
    lk = key_valid.shape[1]
    idx = torch.arange(lk, device=key_valid.device)
    causal = idx.view(1, lk) <= (lk - queries + idx[:queries]).view(queries, 1)
    allowed = causal.unsqueeze(0) & key_valid.unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _run(dec: _Decoder, layers: range, hidden, positions, key_valid, cache, pe=None):
    """Layers `layers` on `hidden` (B, Q, D) at `positions`, keys = cache entries + these Q tokens (`key_valid`)."""
    mask = _mask(key_valid, hidden.shape[1], hidden.dtype)
    pe = dec.rotary(hidden, position_ids=positions) if pe is None else pe
    for i in layers:
        hidden = dec.layers[i](hidden, attention_mask=mask, position_ids=positions, cache=cache,
                               use_cache=cache is not None, position_embeddings=pe)
    return hidden


def _last_token_scores(dec: _Decoder, layer_idx: int, hidden, pe, valid) -> torch.Tensor:
    """(B, L) attention of each row's last real token over the prompt in layer `layer_idx` (input `hidden`),
    heads averaged. Only that row's query is projected. Every real key is at or before the last real token, so the
    validity mask is also the causal mask."""
    layer = dec.layers[layer_idx]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, n, _ = x.shape
    rows, last = torch.arange(b, device=x.device), alg.last_valid_index(valid)
    cos, sin = pe
    k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
    _, k = dec.rope(k, k, cos, sin)
    q = attn.q_proj(x[rows, last].unsqueeze(1)).view(b, 1, -1, attn.head_dim).transpose(1, 2)
    q, _ = dec.rope(q, q, cos[rows, last].unsqueeze(1), sin[rows, last].unsqueeze(1))
    return alg.attention_row_scores(q, k, 0, valid=valid, scale=attn.scaling)


def _select(model, input_ids, prompt: _Prompt, scores, keep) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, L') kept prompt positions, (images, K) kept tokens per image span): top-`keep` of each image by score."""
    spans = prompt.spans
    image_scores = scores[spans[..., 0], spans[..., 1]]  # (images, P)
    image_kept = image_scores.topk(alg.keep_count(spans.shape[1], keep), dim=1).indices.sort(dim=1).values
    keep_mask, _ = vlm._keep_mask(input_ids, model.config.image_token_id, spans, image_kept)
    # every row holds as many image tokens (checked), so every row keeps as many tokens
    return keep_mask.nonzero()[:, 1].view(input_ids.shape[0], -1), image_kept


def _prefill(dec, model, input_ids, prompt: _Prompt, after, keep, cache, kept=None):
    """Prompt through the stack. Returns (hidden after the final norm (B, L', D), kept (B, L'), image_kept,
    scores). With `kept` given, that set is used and nothing is scored (the cache-free recomputation)."""
    pe = dec.rotary(prompt.embeds, position_ids=prompt.positions)
    hidden = _run(dec, range(after - 1), prompt.embeds, prompt.positions, prompt.valid, cache, pe)
    # scored on layer after-1's input, i.e. with its own q and k, before the layer runs
    scores = None if kept is not None else _last_token_scores(dec, after - 1, hidden, pe, prompt.valid)
    hidden = _run(dec, range(after - 1, after), hidden, prompt.positions, prompt.valid, cache, pe)
    image_kept = None
    if scores is not None:
        kept, image_kept = _select(model, input_ids, prompt, scores, keep)
    positions = torch.gather(prompt.positions, 1, kept)
    hidden = _run(dec, range(after, len(dec.layers)), alg.gather_tokens(hidden, kept), positions,
                  torch.gather(prompt.valid, 1, kept), cache)
    return dec.norm(hidden), kept, image_kept, scores


def _decode_step(dec: _Decoder, after: int, token, position, valid_a, valid_b, cache) -> torch.Tensor:
    """Logits (B, V) after one new token (B, 1) at `position` (B, 1), through the cache of both layer groups."""
    hidden = dec.embed(token)
    pe = dec.rotary(hidden, position_ids=position)
    hidden = _run(dec, range(after), hidden, position, valid_a, cache, pe)
    hidden = _run(dec, range(after, len(dec.layers)), hidden, position, valid_b, cache, pe)
    return dec.head(dec.norm(hidden[:, -1]))


@torch.no_grad()
def fastv_generate(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, *, after: int, keep: float,
                   max_new_tokens: int, attention_mask: torch.Tensor | None = None) -> FastVResult:
    """Greedy generation with FastV pruning from LM layer `after` on (see the module docstring for the exact
    semantics). Rows may be left- or right-padded (new tokens go after the padding, at position n_real + t) and
    must hold the same number of image tokens."""
    dec = _decoder(model)
    _check_options(dec, after, keep)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise alg.PruningError(f"max_new_tokens={max_new_tokens!r}: generate at least one token")
    prompt = _prompt(model, input_ids, pixel_values, attention_mask)
    cache = DynamicCache()  # no config: plain full-attention layers, created as each layer_idx first updates
    hidden, kept, image_kept, scores = _prefill(dec, model, input_ids, prompt, after, keep, cache)
    valid_a, valid_b = prompt.valid, torch.gather(prompt.valid, 1, kept)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    step_logits = dec.head(hidden[rows, alg.last_valid_index(valid_b)])
    position = prompt.valid.sum(1, keepdim=True)  # n_real: new tokens continue the original positions
    tokens, logits = [], []
    for t in range(max_new_tokens):
        tokens.append(step_logits.argmax(-1, keepdim=True))
        logits.append(step_logits)
        if t + 1 < max_new_tokens:
            # the new token is a real key in both groups; each group's cache already holds its own prompt length
            valid_a, valid_b = (torch.cat([v, torch.ones_like(v[:, :1])], 1) for v in (valid_a, valid_b))
            step_logits = _decode_step(dec, after, tokens[-1], position + t, valid_a, valid_b, cache)
    return FastVResult(tokens=torch.cat(tokens, 1), logits=torch.stack(logits, 1), kept=kept, image_kept=image_kept,
                       scores=scores, image_tokens=prompt.spans.shape[1], prompt_len=input_ids.shape[1],
                       tokens_per_group=(input_ids.shape[1], kept.shape[1]), after=after)


@torch.no_grad()
def fastv_forward(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, *, after: int, kept: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cache-free FastV forward with a GIVEN kept set: layers < after see all of `input_ids`, layers >= after only
    the positions `kept` (B, L') (ascending); returns the logits (B, L', V) of the kept positions. With `input_ids` =
    prompt + generated tokens and `kept` = `FastVResult.kept` + the generated positions, it recomputes what
    `fastv_generate` computed step by step through its cache."""
    dec = _decoder(model)
    _check_options(dec, after, None)
    prompt = _prompt(model, input_ids, pixel_values, attention_mask)
    hidden, *_ = _prefill(dec, model, input_ids, prompt, after, None, None, kept=kept)
    return dec.head(hidden)


@torch.no_grad()
def fastv_fidelity(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, *, after: int, keep: float,
                   new_tokens: int = 8, attention_mask: torch.Tensor | None = None) -> dict:
    """FastV vs the unpruned model: KL and top-1 agreement of the first next-token distribution, and how many
    greedy tokens agree with `model.generate` (compare left-padded batches: HF generation reads the last slot)."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    res = fastv_generate(model, input_ids, pixel_values, after=after, keep=keep,
                         max_new_tokens=max(new_tokens, 1), attention_mask=mask)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    ref_logits = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask).logits
    ref_logits = ref_logits[rows, alg.last_valid_index(mask.bool())]
    new_logits = res.logits[:, 0]
    out = {"keep": keep, "after": after, "image_tokens": res.image_tokens,
           "kept_tokens": int(res.image_kept.shape[1]), "prompt_len": res.prompt_len,
           "pruned_prompt_len": res.tokens_per_group[1],
           "kl": float(alg.kl_divergence(ref_logits.float(), new_logits.float())),
           "top1_agreement": float((ref_logits.argmax(-1) == new_logits.argmax(-1)).float().mean())}
    if new_tokens:
        ref = model.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        out["greedy_token_agreement"] = float((ref[:, input_ids.shape[1]:] == res.tokens).float().mean())
    return out


__all__ = ["FastVResult", "fastv_generate", "fastv_forward", "fastv_fidelity"]

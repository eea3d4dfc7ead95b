"""Vision-token pruning for LLaVA-style vision-language models (FasterVLM): fewer image tokens reach the LM.

Hugging Face LLaVA scatters the projected vision features into the positions of the prompt that hold
`config.image_token_id`: one run of P positions per image (the image span). FasterVLM scores every patch by
the [CLS] token's attention in the vision layer whose output LLaVA uses as features (`vision_feature_layer`,
-2 by default): that layer's own q and k are recomputed for the [CLS] row only, so it works whatever
attention kernel the tower runs. The top `keep` fraction of each image's patches is kept (raster order), and
the language model sees a shorter prompt: each image span shrinks from P to K positions, the text around it is
untouched (it is never pruned), positions are renumbered by construction (the prompt is simply shorter), and
the KV cache that generation builds from it is therefore consistent.

`prune_image_tokens` returns the pruned prompt as `inputs_embeds` (+ attention mask) for the model's own
`forward` / `generate`; `image_pruning_fidelity` measures what it costs against the unpruned model (KL of the
next-token distribution, top-1 agreement, agreement of greedy continuations). keep=1 reproduces the original
prompt embeddings exactly. Approximate: use it only when the fidelity report is acceptable. Pruning inside the
language model instead (FastV: every image token reaches the first K layers) is `fastv.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from elision.kernels import token_reduction as alg
from elision.apps.tokens.executor import CLIPVisionAdapter, is_clip_vision


@dataclass
class PrunedPrompt:
    inputs_embeds: torch.Tensor          # (B, L', D) text embeddings + kept image features, L' = L - images*(P-K)
    attention_mask: torch.Tensor | None  # (B, L') or None when none was given
    kept: torch.Tensor                   # (images, K) kept patch indices per image, ascending (raster order)
    image_tokens: int                    # P: image tokens per image before pruning
    prompt_len: int                      # L before pruning


def _llava(model):
    """The LlavaModel-like inner model of a LLaVA model (vision tower, projector, image token id), or a clear error."""
    inner = model.model if hasattr(model, "model") and hasattr(model.model, "vision_tower") else model
    if (getattr(inner, "vision_tower", None) is None or not hasattr(inner, "multi_modal_projector")
            or not hasattr(model.config, "image_token_id")):
        raise alg.PruningError(f"{type(model).__name__}: not a LLaVA-style model (needs a vision_tower, a "
                               "multi_modal_projector and config.image_token_id)")
    return inner


def _parts(model):
    """(LlavaModel-like inner model, vision tower) of a LLaVA model whose tower has a [CLS] token, or a clear error."""
    inner = _llava(model)
    tower = inner.vision_tower
    if not is_clip_vision(tower):
        raise alg.PruningError(f"vision tower {type(tower).__name__} is not a CLIP-style tower with a [CLS] token; "
                               "[CLS]-attention pruning needs one")
    return inner, tower


def _image_spans(model, input_ids: torch.Tensor, images: int, patches: int) -> torch.Tensor:
    """(images, P, 2): (row, position) of each image token, image j's span in row j. The prompt must hold one run of
    P image tokens per image, every row the same number (the pruned rows must keep one length)."""
    is_image = input_ids == model.config.image_token_id
    per_row = is_image.sum(1)
    total = int(per_row.sum())
    if total == 0:
        raise alg.PruningError(f"the prompt holds no image tokens (config.image_token_id="
                               f"{model.config.image_token_id}): there is nothing to prune")
    if total != images * patches:
        raise alg.PruningError(f"the prompt holds {total} image tokens but {images} image(s) give "
                               f"{images * patches} features ({patches} per image): build the prompt with the "
                               "model's processor")
    if per_row.unique().numel() != 1:
        raise alg.PruningError("every row of the batch must hold the same number of images (the pruned prompts "
                               "must keep one length)")
    # nonzero() lists (row, position) in order, so image j's span is entries [j*P, (j+1)*P)
    return is_image.nonzero().view(images, patches, 2)


def _keep_mask(input_ids: torch.Tensor, image_token_id: int, spans: torch.Tensor,
               kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, L) bool: the text tokens (never pruned) and the `kept` (images, K) patches of every image span,
    (images*K, 2) (row, position) of the kept patches, image by image)."""
    kept_pos = torch.gather(spans, 1, kept.unsqueeze(-1).expand(-1, -1, 2)).reshape(-1, 2)
    keep_mask = input_ids != image_token_id
    keep_mask[kept_pos[:, 0], kept_pos[:, 1]] = True
    return keep_mask, kept_pos


@torch.no_grad()
def image_token_scores(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([CLS]-attention score per patch (images, P), the patch features LLaVA projects (images, P, C))."""
    inner, tower = _parts(model)
    cfg = model.config
    layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise alg.PruningError(f"vision_feature_layer={layer}: several feature layers are not supported "
                               "(the kept patches would have to agree across layers)")
    if strategy != "default":
        raise alg.PruningError(f"vision_feature_select_strategy={strategy!r}: only 'default' (drop [CLS], "
                               "LLaVA-1.5) is supported")
    adapter = CLIPVisionAdapter(tower)
    hidden = tower(pixel_values.to(next(tower.parameters()).dtype), output_hidden_states=True).hidden_states
    feature_index = layer % len(hidden)
    if feature_index == 0:
        raise alg.PruningError("vision_feature_layer selects the embeddings: there is no attention to score with")
    # hidden[i] is the input of layer i: the features come out of layer feature_index - 1, scored by its attention
    q, k, _ = adapter.qkv(feature_index - 1, hidden[feature_index - 1])
    scores = alg.attention_row_scores(q, k, 0)[:, 1:]
    return scores, hidden[feature_index][:, 1:]


@torch.no_grad()
def prune_image_tokens(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, keep: float,
                       attention_mask: torch.Tensor | None = None) -> PrunedPrompt:
    """FasterVLM pruning of a LLaVA prompt: keep ceil(keep * P) patches of every image (see module docstring)."""
    alg.check_keep_ratio(keep)
    inner, _ = _parts(model)
    scores, features = image_token_scores(model, pixel_values)
    images, patches = scores.shape
    kept = scores.topk(alg.keep_count(patches, keep), dim=1).indices.sort(dim=1).values
    image_embeds = inner.multi_modal_projector(alg.gather_tokens(features, kept))  # (images, K, D)

    spans = _image_spans(model, input_ids, images, patches)
    keep_mask, kept_pos = _keep_mask(input_ids, model.config.image_token_id, spans, kept)
    embed = inner.get_input_embeddings()
    embeds = embed(input_ids.masked_fill(input_ids == model.config.image_token_id, 0))
    embeds[kept_pos[:, 0], kept_pos[:, 1]] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
    batch, length = input_ids.shape
    new_len = int(keep_mask[0].sum())
    return PrunedPrompt(
        inputs_embeds=embeds[keep_mask].view(batch, new_len, -1),
        attention_mask=None if attention_mask is None else attention_mask[keep_mask].view(batch, new_len),
        kept=kept, image_tokens=patches, prompt_len=length)


@torch.no_grad()
def image_pruning_fidelity(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, keep: float,
                           attention_mask: torch.Tensor | None = None, new_tokens: int = 8) -> dict:
    """Pruned vs unpruned: next-token KL and top-1 agreement, and how many greedy tokens agree."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    pruned = prune_image_tokens(model, input_ids, pixel_values, keep, mask)
    ref_logits = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask).logits[:, -1]
    new_logits = model(inputs_embeds=pruned.inputs_embeds, attention_mask=pruned.attention_mask).logits[:, -1]
    out = {"keep": keep, "image_tokens": pruned.image_tokens, "kept_tokens": int(pruned.kept.shape[1]),
           "prompt_len": pruned.prompt_len, "pruned_prompt_len": int(pruned.inputs_embeds.shape[1]),
           "kl": float(alg.kl_divergence(ref_logits.float(), new_logits.float()).mean()),
           "top1_agreement": float((ref_logits.argmax(-1) == new_logits.argmax(-1)).float().mean())}
    if new_tokens:
        gen = dict(max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        ref = model.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask, **gen)
        ref = ref[:, input_ids.shape[1]:]
        new = model.generate(inputs_embeds=pruned.inputs_embeds, attention_mask=pruned.attention_mask, **gen)
        new = new[:, -new_tokens:]
        out["greedy_token_agreement"] = float((ref == new).float().mean())
    return out


__all__ = ["PrunedPrompt", "image_token_scores", "prune_image_tokens", "image_pruning_fidelity"]

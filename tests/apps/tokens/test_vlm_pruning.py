"""Token reduction on CLIP vision towers and FasterVLM-style image-token pruning for HF LLaVA (tiny configs,
random weights: these check structure and exactness, not fidelity numbers)."""
from __future__ import annotations

import pytest
import torch

from elision.kernels import token_reduction as alg
from elision.apps.tokens.executor import CLIPVisionAdapter, ReductionPlan, adapter_for, reference_output, run_encoder
from elision.apps.tokens.vlm import image_pruning_fidelity, image_token_scores, prune_image_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGE_TOKEN = 250


def _clip(layers: int = 3, image: int = 32, patch: int = 8):
    import transformers as T
    torch.manual_seed(0)
    cfg = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             image_size=image, patch_size=patch, attn_implementation="eager")
    return T.CLIPVisionModel(cfg).eval()


def _llava(images_per_row: int = 1, batch: int = 2, text: int = 6, lm_layers: int = 2, lm: str = "llama"):
    """Tiny LLaVA-1.5 layout: CLIP tower (4x4 = 16 patches), penultimate-layer features, Llama (or Qwen2) LM."""
    import transformers as T
    torch.manual_seed(0)
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8)
    text_config = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config}[lm]
    tc = text_config(hidden_size=64, intermediate_size=128, num_hidden_layers=lm_layers, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)
    cfg = T.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN, projector_hidden_act="gelu")
    model = T.LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(batch):
        parts = [torch.randint(0, 240, (text // 2,), generator=g)]
        for _ in range(images_per_row):
            parts += [torch.full((16,), IMAGE_TOKEN), torch.randint(0, 240, (text // 2,), generator=g)]
        rows.append(torch.cat(parts))
    ids = torch.stack(rows)
    px = torch.randn(batch * images_per_row, 3, 32, 32, generator=g)
    return model, ids, px


def test_clip_vision_adapter_reproduces_the_hf_tower_and_prunes():
    model = _clip()
    adapter = adapter_for(model)
    assert isinstance(adapter, CLIPVisionAdapter) and adapter.grid == (4, 4) and adapter.num_layers == 3
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = reference_output(model, adapter, (px,))
    torch.testing.assert_close(run_encoder(adapter, (px,)), ref, atol=1e-5, rtol=1e-5)
    pruned = run_encoder(adapter, (px,), ReductionPlan(prune_after=1, keep=0.5))
    merged = run_encoder(adapter, (px,), ReductionPlan(merge_r=3, merge_start=1))
    for out in (pruned, merged):
        assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)


def test_image_scores_are_the_cls_attention_of_the_feature_layer():
    """The tap equals the eager attention weights of the layer whose output LLaVA projects (layer -2)."""
    model, ids, px = _llava()
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    scores, feats = image_token_scores(model, px)
    out = tower(px, output_hidden_states=True, output_attentions=True)
    expected = out.attentions[-2][:, :, 0, 1:].mean(1)  # feature layer -2 = output of the second-to-last layer
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(feats, out.hidden_states[-2][:, 1:])


@pytest.mark.parametrize("images_per_row", [1, 2])
def test_keep_one_reproduces_the_unpruned_prompt_exactly(images_per_row):
    model, ids, px = _llava(images_per_row)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on one row
    pruned = prune_image_tokens(model, ids, px, 1.0, mask)
    assert pruned.inputs_embeds.shape[1] == ids.shape[1]
    ref = model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    new = model(inputs_embeds=pruned.inputs_embeds, attention_mask=pruned.attention_mask).logits
    assert torch.equal(new, ref)


@pytest.mark.parametrize("images_per_row", [1, 2])
def test_pruned_prompt_keeps_text_and_the_top_scored_patches(images_per_row):
    model, ids, px = _llava(images_per_row)
    pruned = prune_image_tokens(model, ids, px, 0.25)
    assert pruned.kept.shape == (ids.shape[0] * images_per_row, 4)
    assert torch.all(pruned.kept[:, 1:] > pruned.kept[:, :-1])  # raster order
    assert pruned.inputs_embeds.shape[1] == ids.shape[1] - images_per_row * 12
    scores, feats = image_token_scores(model, px)
    threshold = scores.topk(4, dim=1).values[:, -1:]
    assert torch.all(torch.gather(scores, 1, pruned.kept) >= threshold)
    # text embeddings are untouched and in order; the kept image slots hold the projected kept features
    emb = model.model.get_input_embeddings()
    is_image = ids[0] == IMAGE_TOKEN
    text = emb(ids[0][~is_image])
    slot_is_text = torch.ones(pruned.inputs_embeds.shape[1], dtype=torch.bool)
    starts = (~is_image).cumsum(0)[is_image.nonzero().flatten()]  # text tokens before each image token
    for j in range(images_per_row):
        first = int(starts[j * 16]) + j * 4
        slot_is_text[first:first + 4] = False
        expected = model.model.multi_modal_projector(alg.gather_tokens(feats[j:j + 1], pruned.kept[j:j + 1]))[0]
        torch.testing.assert_close(pruned.inputs_embeds[0, first:first + 4], expected)
    torch.testing.assert_close(pruned.inputs_embeds[0, slot_is_text], text)


def test_generation_from_the_pruned_prompt_and_fidelity_report():
    model, ids, px = _llava()
    full = image_pruning_fidelity(model, ids, px, 1.0, new_tokens=4)
    assert full["kl"] == 0.0 and full["top1_agreement"] == 1.0 and full["greedy_token_agreement"] == 1.0
    half = image_pruning_fidelity(model, ids, px, 0.5, new_tokens=4)
    assert half["kept_tokens"] == 8 and half["pruned_prompt_len"] == ids.shape[1] - 8
    assert half["kl"] >= 0.0 and 0.0 <= half["greedy_token_agreement"] <= 1.0


def test_bad_inputs_give_clear_errors():
    model, ids, px = _llava()
    with pytest.raises(alg.PruningError, match="keep"):
        prune_image_tokens(model, ids, px, 1.5)
    with pytest.raises(alg.PruningError, match="image tokens but 1 image"):
        prune_image_tokens(model, ids, px[:1], 0.5)
    with pytest.raises(alg.PruningError, match="not a LLaVA-style model"):
        prune_image_tokens(_clip(), ids, px, 0.5)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(alg.PruningError, match="only 'default'"):
        prune_image_tokens(model, ids, px, 0.5)

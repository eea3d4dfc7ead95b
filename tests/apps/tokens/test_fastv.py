"""FastV image-token pruning inside the LM of a tiny HF LLaVA (random weights: structure and exactness, not fidelity
numbers): keep=1 is HF greedy generation, the score is the eager attention row, the split KV cache is consistent."""
from __future__ import annotations

import pytest
import torch
from test_vlm_pruning import IMAGE_TOKEN, _clip, _llava

from elision.kernels import token_reduction as alg
from elision.apps.tokens.fastv import fastv_fidelity, fastv_forward, fastv_generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _padded(ids: torch.Tensor, side: str = "left", pad: int = 3) -> torch.Tensor:
    """Attention mask with `pad` padding slots on row 1 (the ids there are left as they are: masked out)."""
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1, :pad] = 0
    else:
        mask[1, -pad:] = 0
    return mask


def _hf_greedy(model, ids, px, mask, steps):
    out = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("images_per_row", [1, 2])
def test_keep_one_is_hf_greedy_generation(images_per_row):
    model, ids, px = _llava(images_per_row, lm_layers=4)
    mask = _padded(ids)
    res = fastv_generate(model, ids, px, after=2, keep=1.0, max_new_tokens=5, attention_mask=mask)
    tokens, logits = _hf_greedy(model, ids, px, mask, 5)
    assert torch.equal(res.tokens, tokens)
    torch.testing.assert_close(res.logits, logits, atol=1e-5, rtol=1e-5)
    assert res.tokens_per_group == (ids.shape[1], ids.shape[1]) and res.image_tokens == 16


@pytest.mark.parametrize("after", [1, 3])
def test_scores_are_the_eager_attention_row_of_the_last_prompt_token(after):
    """The recomputed row (model left on SDPA) equals eager weights of layer after-1, under left and right padding."""
    model, ids, px = _llava(2, lm_layers=4)
    assert model.config.text_config._attn_implementation == "sdpa"  # FastV never reads the kernel's weights
    mask = _padded(ids, "right")
    mask[0, :2] = 0  # and left padding on row 0
    res = fastv_generate(model, ids, px, after=after, keep=0.5, max_new_tokens=1, attention_mask=mask)
    model.set_attn_implementation("eager")
    attn = model(input_ids=ids, pixel_values=px, attention_mask=mask, output_attentions=True).attentions[after - 1]
    last = alg.last_valid_index(mask.bool())
    expected = attn[torch.arange(2), :, last].mean(1)  # (B, L): the last real token's row, heads averaged
    torch.testing.assert_close(res.scores, expected, atol=1e-6, rtol=1e-5)


def test_kept_set_is_text_plus_the_top_scored_image_tokens():
    model, ids, px = _llava(2, lm_layers=4)
    res = fastv_generate(model, ids, px, after=2, keep=0.3, max_new_tokens=1)
    is_image = ids == IMAGE_TOKEN
    spans = is_image.nonzero()[:, 1].view(4, 16)  # 2 rows x 2 images, positions of each span
    assert res.image_kept.shape == (4, alg.keep_count(16, 0.3)) == (4, 5)
    image_scores = torch.stack([res.scores[j // 2, spans[j]] for j in range(4)])
    threshold = image_scores.topk(5, dim=1).values[:, -1:]
    assert torch.all(torch.gather(image_scores, 1, res.image_kept) >= threshold)
    for row in range(2):
        expected = torch.cat([(~is_image[row]).nonzero().flatten(), spans[2 * row][res.image_kept[2 * row]],
                              spans[2 * row + 1][res.image_kept[2 * row + 1]]]).sort().values
        assert torch.equal(res.kept[row], expected)  # original order, every text token kept
    assert res.tokens_per_group == (ids.shape[1], ids.shape[1] - 2 * 11)


def _recompute(model, ids, px, mask, res, after):
    """Cache-free logits of the pruned sequence: prompt + the generated tokens fed back, the same kept set."""
    fed = res.tokens[:, :-1]
    full_ids = torch.cat([ids, fed], 1)
    full_mask = torch.cat([mask, torch.ones_like(fed)], 1)
    new_pos = ids.shape[1] + torch.arange(fed.shape[1]).expand(ids.shape[0], -1)
    logits = fastv_forward(model, full_ids, px, after=after, kept=torch.cat([res.kept, new_pos], 1),
                           attention_mask=full_mask)
    # the prompt's last real token and every fed-back token predict the next generated token
    last = alg.last_valid_index(torch.gather(mask.bool(), 1, res.kept))
    first = logits[torch.arange(ids.shape[0]), last].unsqueeze(1)
    return torch.cat([first, logits[:, res.kept.shape[1]:]], 1)


@pytest.mark.parametrize("lm,side", [("llama", "left"), ("llama", "right"), ("qwen2", "left")])
def test_cached_decoding_equals_cache_free_recomputation(lm, side):
    """keep=0.5: the cache holds L entries in layers < after and L' in layers >= after; every step's logits equal a
    from-scratch forward of the pruned sequence (original positions, same kept set)."""
    model, ids, px = _llava(2, lm_layers=4, lm=lm)
    mask = _padded(ids, side)
    res = fastv_generate(model, ids, px, after=2, keep=0.5, max_new_tokens=5, attention_mask=mask)
    assert res.tokens_per_group == (ids.shape[1], ids.shape[1] - 2 * 8)
    torch.testing.assert_close(res.logits, _recompute(model, ids, px, mask, res, 2), atol=1e-5, rtol=1e-5)
    # pruning really changed the computation (else the check above would prove nothing about the split cache)
    full = fastv_generate(model, ids, px, after=2, keep=1.0, max_new_tokens=5, attention_mask=mask)
    assert not torch.allclose(res.logits[:, 0], full.logits[:, 0])


def test_qwen2_language_model_keep_one_is_hf_greedy_generation():
    model, ids, px = _llava(1, lm_layers=3, lm="qwen2")
    assert type(model.model.language_model).__name__ == "Qwen2Model"
    mask = _padded(ids)
    res = fastv_generate(model, ids, px, after=1, keep=1.0, max_new_tokens=4, attention_mask=mask)
    tokens, logits = _hf_greedy(model, ids, px, mask, 4)
    assert torch.equal(res.tokens, tokens)
    torch.testing.assert_close(res.logits, logits, atol=1e-5, rtol=1e-5)


def test_fidelity_report():
    model, ids, px = _llava(1, lm_layers=4)
    mask = _padded(ids)
    full = fastv_fidelity(model, ids, px, after=2, keep=1.0, new_tokens=4, attention_mask=mask)
    assert full["kl"] < 1e-6 and full["top1_agreement"] == 1.0 and full["greedy_token_agreement"] == 1.0
    half = fastv_fidelity(model, ids, px, after=2, keep=0.5, new_tokens=4, attention_mask=mask)
    assert half["kept_tokens"] == 8 and half["image_tokens"] == 16 and half["after"] == 2
    assert half["pruned_prompt_len"] == ids.shape[1] - 8 and half["prompt_len"] == ids.shape[1]
    assert half["kl"] > 0.0 and 0.0 <= half["greedy_token_agreement"] <= 1.0


def test_bad_options_give_clear_errors():
    import transformers as T
    model, ids, px = _llava(1, lm_layers=4)
    run = dict(max_new_tokens=2)
    with pytest.raises(alg.PruningError, match="after=0.*prune_image_tokens"):
        fastv_generate(model, ids, px, after=0, keep=0.5, **run)
    with pytest.raises(alg.PruningError, match=r"after=4 is out of range.*1\.\.3"):
        fastv_generate(model, ids, px, after=4, keep=0.5, **run)
    for keep in (0.0, 1.5):
        with pytest.raises(alg.PruningError, match="keep"):
            fastv_generate(model, ids, px, after=2, keep=keep, **run)
    with pytest.raises(alg.PruningError, match="no image tokens"):
        fastv_generate(model, ids.masked_fill(ids == IMAGE_TOKEN, 7), px, after=2, keep=0.5, **run)
    image, text = torch.full((16,), IMAGE_TOKEN), torch.full((3,), 7)
    uneven = torch.stack([torch.cat([text, image, text, torch.full((16,), 7), text]),  # one image
                          torch.cat([text, image, text, image, text])])                # two images
    with pytest.raises(alg.PruningError, match="same number of images"):
        fastv_generate(model, uneven, torch.cat([px, px[:1]]), after=2, keep=0.5, **run)
    with pytest.raises(alg.PruningError, match="not a LLaVA-style model"):
        fastv_generate(_clip(), ids, px, after=1, keep=0.5, **run)
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256)
    vc = model.config.vision_config
    for text_config, message in ((T.Qwen3Config(**kw), "q/k norms"),
                                 (T.MistralConfig(sliding_window=8, **kw), "sliding-window")):
        other = T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vc, text_config=text_config,
                                                              image_token_id=IMAGE_TOKEN)).eval()
        with pytest.raises(alg.PruningError, match=message):
            fastv_generate(other, ids, px, after=1, keep=0.5, **run)

"""The compiled speculative-decoding backend: greedy generation is token-identical to HF generate()."""
from __future__ import annotations

import pytest
import torch

from elision.apps.specdec.cache import CacheOverflowError
from elision.apps.specdec.compiled_backend import (CompiledSpecDec, candidate_skip_sets, compile_specdec,
                                                      make_backend, make_generator, model_config, search_skip_layers)
from specdec_compiled_models import VOCAB, compiled

torch.set_num_threads(1)


def _spec(arch: str) -> CompiledSpecDec:
    model, ir = compiled(arch)
    return CompiledSpecDec(ir, model_config(model), "test")


def _hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # a repetitive prompt (lookup drafts hit) and a short random one: ragged batch of two
    rep = torch.randint(0, VOCAB, (5,), generator=g).tolist() * 3
    return [rep, torch.randint(0, VOCAB, (7,), generator=g).tolist()]


@pytest.mark.parametrize("drafter", ["recycling+lookup", "layer-skip", "lookup+layer-skip"])
def test_greedy_generation_is_token_identical_to_hf_generate(drafter):
    model, _ = compiled("llama")
    spec = _spec("llama")
    prompts = _prompts(11)
    res = spec.generator(drafter).generate(prompts, max_new_tokens=20)
    for p, toks in zip(prompts, res.tokens):
        assert toks == _hf_greedy(model, p, 20)
    assert res.stats["verify_steps"] <= 20
    if "layer-skip" in drafter:
        assert res.stats["draft_forward_passes"] > 0


def test_gpt2_compiled_backend_matches_hf_generate():
    model, _ = compiled("gpt2")
    prompts = _prompts(12)
    res = _spec("gpt2").generator("recycling+lookup").generate(prompts, max_new_tokens=16)
    assert res.tokens == [_hf_greedy(model, p, 16) for p in prompts]


def test_backend_cache_bookkeeping_and_errors():
    model, ir = compiled("qwen2")
    backend = make_backend(ir, "verify", model_config(model))
    with pytest.raises(RuntimeError, match="call reset"):
        backend.forward(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1))
    backend.reset(1, 6)
    # a tree: 5 is the root, 6 and 7 are both its children (positions 0, 1, 1; 7 does not see 6)
    tokens = torch.tensor([[5, 6, 7]])
    bias = torch.zeros(1, 1, 3, 3)
    bias[0, 0, 0, 1:] = float("-inf")
    bias[0, 0, 1, 2] = float("-inf")
    bias[0, 0, 2, 1] = float("-inf")
    tree = backend.forward(tokens, torch.tensor([[0, 1, 1]]), bias)
    assert backend.length == 3
    # accept the path 5 -> 7: slots [0, 2] move to [0, 1]; then 8 continues the sequence [5, 7]
    backend.select(torch.tensor([[0, 2]]), 0)
    assert backend.length == 2
    with torch.no_grad():
        ref = model(torch.tensor([[5, 7, 8]])).logits
    out = backend.forward(torch.tensor([[8]]), torch.tensor([[2]]), torch.zeros(1, 1, 1, 3))
    assert (out[0, 0] - ref[0, 2]).abs().max().item() <= 1e-5
    assert (tree[0, 2] - ref[0, 1]).abs().max().item() <= 1e-5
    assert backend.length == 3
    backend.truncate(2)
    with pytest.raises(ValueError, match="bias must cover 4"):
        backend.forward(torch.tensor([[1, 2]]), torch.tensor([[2, 3]]), torch.zeros(1, 1, 2, 3))
    with pytest.raises(CacheOverflowError, match="KV cache overflow: 7 slots needed but the cache holds 6"):
        backend.forward(torch.tensor([[1] * 5]), torch.arange(2, 7)[None], torch.zeros(1, 1, 5, 7))


def test_layer_skip_needs_a_compiled_draft():
    model, ir = compiled("qwen2")
    with pytest.raises(ValueError, match="needs a compiled @draft"):
        make_generator(make_backend(ir, "verify", model_config(model)), None, "layer-skip")


def test_auto_layer_skip_search_measures_tokens_per_second():
    model, ir = compiled("llama")
    m = ir.copy()
    m.attrs["specdec"] = dict(ir.attrs["specdec"])
    m.attrs["specdec_config"] = model_config(model)
    m.attrs["calibration_prompts"] = _prompts(13)[:1]
    skip, report = search_skip_layers(m, trials=2, new_tokens=6)
    assert report["baseline_tokens_per_s"] > 0
    assert [t["skip"] for t in report["trials"]] == candidate_skip_sets(4, 2, 0)
    assert skip in [t["skip"] for t in report["trials"]]
    best = max(report["trials"], key=lambda t: t["tokens_per_s"])
    assert skip == best["skip"] and report["chosen"] == skip
    # compiling with skip_layers="auto" searches first, then runs the pass with the concrete layers it chose
    spec = compile_specdec(model, skip_layers="auto", hidden=True, calibration_prompts=_prompts(13)[:1], trials=2,
                           search_new_tokens=6)
    search = spec.attrs["skip_search"]
    assert [t["skip"] for t in search["trials"]] == candidate_skip_sets(4, 2, 0)
    assert spec.skip_layers == search["chosen"] and "draft" in spec.ir.functions
    assert f"layer-skip-draft{{layers={','.join(map(str, search['chosen']))}}}" in spec.pipeline
    prompts = _prompts(14)
    res = spec.generator("layer-skip").generate(prompts, max_new_tokens=8)
    assert res.tokens == [_hf_greedy(model, p, 8) for p in prompts]

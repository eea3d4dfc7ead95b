"""Greedy speculative decoding is token-identical to Hugging Face `generate(do_sample=False)`.

Property-based: random prompts, random-weight HF models from tiny configs (Llama, Qwen2, GPT-2, Mistral),
every drafter and tree shape, batch sizes 1 and 3, EOS and max length. The models run in float64 so that
the oracle compares algorithms, not float32 rounding: a tree verification forward and HF's one-token
steps sum in different orders, and in float32 a near-tie between the top two logits (gap < 1e-6) could
flip an argmax in either implementation. A float32 check with fixed seeds is included as well.
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from elision.apps.specdec import SpeculativeGenerator, generate

VOCAB = 64
DRAFTERS = ["lookup", "recycling", "copy", "layer-skip", "draft-model", "recycling+lookup", "copy+recycling"]
TREES = ["dynamic", "static:chain-4", "static:3x2x1", "static:[(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.lru_cache(maxsize=None)
def make_model(arch: str, layers: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif arch == "mistral":  # a sliding window shorter than the sequences, so the window mask is exercised
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=12))
    elif arch == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=128,
                                    bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=VOCAB - 1)
    return out[0, len(prompt):].tolist()


# prompts with repeats so lookup/copy drafters actually fire
prompt_strategy = st.lists(st.integers(0, 15), min_size=1, max_size=10).flatmap(
    lambda motif: st.tuples(st.just(motif), st.integers(1, 3), st.lists(st.integers(0, VOCAB - 1), max_size=6))
).map(lambda t: (t[0] * t[1] + t[2])[:40])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mistral"])
# no shrink phase: a failing example is reported as drawn instead of spending minutes minimising it
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    data=st.data(),
    drafter=st.sampled_from(DRAFTERS),
    tree=st.sampled_from(TREES),
    batch=st.sampled_from([1, 3]),
    max_new=st.integers(1, 24),
    use_eos=st.booleans(),
)
def test_greedy_matches_hf(arch, data, drafter, tree, batch, max_new, use_eos):
    model = make_model(arch)
    draft_model = make_model("llama", layers=1, seed=1) if drafter == "draft-model" else None
    prompts = [data.draw(prompt_strategy, label=f"prompt{i}") for i in range(batch)]
    eos = None
    if use_eos:
        # an EOS the model actually emits: a token of the first prompt's greedy continuation
        cont = hf_greedy(model, prompts[0], max_new, None)
        eos = cont[data.draw(st.integers(0, len(cont) - 1), label="eos_index")]
    expected = [hf_greedy(model, p, max_new, eos) for p in prompts]
    result = generate(model, prompts, max_new_tokens=max_new, drafter=drafter, draft_model=draft_model,
                      tree=tree, eos_token_id=eos, max_tree_size=12)
    assert result.tokens == expected
    assert result.stats["forward_passes"] == result.stats["verify_steps"] + 1
    assert result.stats["new_tokens"] == sum(len(e) for e in expected)
    if result.stats["verify_steps"]:
        assert result.stats["mean_accepted_length"] >= 1.0


def test_float32_matches_hf_and_accepts_drafts():
    """float32 as deployed, fixed seeds; repetitive prompts must also make drafts pay off (fewer forwards)."""
    model = make_model("llama", layers=2, dtype=torch.float32)
    prompts = [[5, 6, 7, 8, 9] * 4, [1, 2, 3] * 5 + [4], [10, 11, 12, 13] * 3]
    expected = [hf_greedy(model, p, 32, None) for p in prompts]
    for drafter in ["recycling+lookup", "copy", "layer-skip"]:
        result = generate(model, prompts, max_new_tokens=32, drafter=drafter)
        assert result.tokens == expected, drafter
    result = generate(model, prompts[:1], max_new_tokens=32, drafter="recycling+lookup")
    assert result.stats["forward_passes"] < 32
    assert result.stats["mean_accepted_length"] > 1.0


def test_generator_object_reuse_and_max_length():
    """A SpeculativeGenerator keeps its recycling matrix across calls; max_length caps the total length."""
    model = make_model("llama")
    gen = SpeculativeGenerator(model, drafter="recycling", tree="static:4x2x1")
    prompt = [3, 4, 5, 6, 3, 4]
    expected = hf_greedy(model, prompt, 10, None)
    first = gen.generate([prompt], max_new_tokens=10)
    second = gen.generate([prompt], max_new_tokens=10)
    assert first.tokens[0] == second.tokens[0] == expected
    assert second.stats["forward_passes"] <= first.stats["forward_passes"]
    capped = gen.generate([prompt], max_new_tokens=50, max_length=len(prompt) + 7)
    assert capped.tokens[0] == expected[:7]
    assert capped.sequences[0] == prompt + expected[:7]


def test_tiny_code_lm_greedy_matches_hf():
    """The trained model on held-out code prompts, batch of 2, with EOS active: identical to HF greedy."""
    from elision.models import code_lm

    model = code_lm.load_model()
    tok = code_lm.load_tokenizer()
    texts = [p["text"] for p in code_lm.load_prompts()["code"][:2]]
    prompts = [tok(t).input_ids[-96:] for t in texts]
    eos = tok.eos_token_id
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
        expected.append(out[0, len(p):].tolist())
    drafters = ["recycling+lookup", "layer-skip"]
    draft = None
    try:
        draft = code_lm.load_model("tiny-code-lm-draft")
        drafters.append("draft-model")
    except FileNotFoundError:
        pass
    for drafter in drafters:
        result = generate(model, prompts, max_new_tokens=24, drafter=drafter, draft_model=draft, eos_token_id=eos)
        assert result.tokens == expected, drafter

"""The committed tiny code LMs (`builtin:tiny-code-lm`, `builtin:tiny-code-lm-draft`).

They must load offline as real HF classes, share a tokenizer that round-trips text, be stored as
float16 within the size budget, be trained (held-out per-token loss below the uniform log(vocab)),
and HF greedy generation must equal a plain argmax loop (the oracle the speculative-decoding
benchmark's "same output" check relies on).

Note: the committed checkpoints were trained on a heavily loaded machine (the target got 156 of
320 planned steps) and are weak: greedy continuations are not yet plausible Python, and the draft
has a lower loss than the target. The bounds below pin what was measured, not what is wanted;
retraining with tools/train_tiny_lm.py on a quiet machine should tighten them.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from elision.models import get_builtin
from elision.models.code_lm import (
    CODE_LM_NAMES,
    builtin_dir,
    heldout_files,
    load_model,
    load_prompts,
    load_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]

# Measured on the committed checkpoints over the code + prose prompts of prompts.json:
# target 6.40, draft 5.86 nats/token; uniform is log(4096) = 8.32 (an untrained model scores ~8.3).
HELDOUT_LOSS_BOUND = {"tiny-code-lm": 5.8, "tiny-code-lm-draft": 5.8}
MAX_SAFETENSORS_BYTES = {"tiny-code-lm": 16 * 2**20, "tiny-code-lm-draft": 4 * 2**20}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-code-lm")


@pytest.fixture(scope="module")
def target():
    return get_builtin("tiny-code-lm").build()


@pytest.fixture(scope="module")
def draft():
    return get_builtin("tiny-code-lm-draft").build()


@pytest.fixture(scope="module")
def prompts():
    return load_prompts()


def _train_script():
    spec = importlib.util.spec_from_file_location("train_tiny_lm", REPO / "tools" / "train_tiny_lm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", CODE_LM_NAMES)
def test_builtin_loads_offline_as_real_llama(name, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = get_builtin(name)
    assert entry.kind == "causal-lm"
    assert entry.dynamic_dims == {0: {0: "batch", 1: "seq"}}
    model = entry.build()
    assert type(model) is LlamaForCausalLM  # the real class, not a wrapper
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    (ids,) = entry.example_inputs(model)
    assert ids.shape == (2, 16) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 16, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", CODE_LM_NAMES)
def test_checkpoint_is_float16_and_within_size(name):
    from safetensors import safe_open

    path = builtin_dir(name) / "model.safetensors"
    assert path.stat().st_size <= MAX_SAFETENSORS_BYTES[name]
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        assert keys
        for key in keys:
            assert f.get_slice(key).get_dtype() == "F16", key
    config = json.loads((builtin_dir(name) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["max_position_embeddings"] == 512


def test_target_and_draft_share_tokenizer_and_vocab(target, draft):
    a = (builtin_dir("tiny-code-lm") / "tokenizer.json").read_bytes()
    b = (builtin_dir("tiny-code-lm-draft") / "tokenizer.json").read_bytes()
    assert a == b
    assert target.config.vocab_size == draft.config.vocab_size == 4096
    # The draft must really be smaller, otherwise it cannot speed anything up.
    n_target = sum(p.numel() for p in target.parameters())
    n_draft = sum(p.numel() for p in draft.parameters())
    assert n_draft * 3 < n_target


def test_tokenizer_round_trips_text(tokenizer, prompts):
    samples = [p["text"] for p in prompts["code"][:3]] + [p["text"] for p in prompts["prose"][:2]]
    samples.append("def f(x):\n\treturn {'é': x ** 2}  # ünïcode, tabs and emoji 🐍\n")
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < len(tokenizer) for i in ids)
        assert tokenizer.decode(ids) == text
    # BPE trained on code: far fewer tokens than bytes.
    code = samples[0]
    assert len(tokenizer(code, add_special_tokens=False)["input_ids"]) < len(code.encode()) / 2.5
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_heldout_split_is_the_scripts_fixed_list(prompts):
    script = _train_script()
    assert heldout_files() == script.HELDOUT_FILES
    assert heldout_files("tiny-code-lm-draft") == script.HELDOUT_FILES
    assert len(prompts["code"]) >= 3 and len(prompts["prose"]) >= 3
    for p in prompts["code"] + prompts["prose"]:
        assert p["file"] in script.HELDOUT_FILES


def _mean_loss(model, tokenizer, texts: list[str]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
            logits = model(input_ids=ids[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


@pytest.mark.parametrize("name", CODE_LM_NAMES)
def test_heldout_loss_is_that_of_a_trained_model(name, tokenizer, prompts, target, draft):
    model = {"tiny-code-lm": target, "tiny-code-lm-draft": draft}[name]
    texts = [p["text"] for p in prompts["code"] + prompts["prose"]]
    loss = _mean_loss(model, tokenizer, texts)
    assert loss < HELDOUT_LOSS_BOUND[name], f"held-out loss {loss:.3f}"
    assert loss < math.log(model.config.vocab_size) - 1.5


def test_greedy_generate_matches_argmax_loop(target, tokenizer, prompts):
    prompt = prompts["code"][0]["text"]
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    n_new = 40
    out = target.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:]
    assert new.shape[0] == n_new

    # Oracle: recompute the full sequence each step and take the argmax (no KV cache).
    seq = ids
    with torch.no_grad():
        for _ in range(n_new):
            logits = target(input_ids=seq).logits[0, -1]
            logits[tokenizer.eos_token_id] = -math.inf  # what min_new_tokens does
            seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    assert torch.equal(seq[0, ids.shape[1]:], new)



def test_builtin_dir_errors_say_what_to_do(tmp_path, monkeypatch):
    import elision.models.code_lm as code_lm

    with pytest.raises(ValueError, match="expected one of: tiny-code-lm, tiny-code-lm-draft"):
        builtin_dir("tiny-code-llm")
    assert builtin_dir("builtin:tiny-code-lm") == builtin_dir("tiny-code-lm")
    monkeypatch.setattr(code_lm, "BUILTIN_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="tools/train_tiny_lm.py"):
        load_model("tiny-code-lm-draft")

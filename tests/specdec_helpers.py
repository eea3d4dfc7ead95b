"""Helpers for the specdec tests: a tiny HF causal-LM directory with a real (locally trained) tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch
from scipy.stats import chisquare


def save_tiny_lm_dir(path: Path, arch: str = "llama", seed: int = 0, layers: int = 3, hidden_size: int = 32,
                     sharpen: float = 1.0) -> Path:
    """Train a byte-level BPE tokenizer on a stdlib source file and save it with a random-weight tiny model.

    4 query / 2 KV heads: `hidden_size=64` gives head size 16, the smallest ONNX Runtime's GroupQueryAttention runs
    (the in-place step form); 32 gives 8 (the concatenating verify form). `arch` "qwen2" adds q/k/v biases,
    "mistral" a sliding window of 12, "qwen3" per-head q/k norms, "phi" and "stablelm" rotary over half of each head.
    `sharpen` scales the LM head, spreading the logits so that greedy argmax ties are rare (float32 comparisons).
    """
    import inspect
    import json as json_module

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = inspect.getsource(json_module)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    vocab = fast.vocab_size
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=128,
                                      eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        common = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                      eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
        if arch == "qwen2":
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
        elif arch == "mistral":  # a window shorter than the sequences, so the window mask is exercised
            model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=12))
        elif arch == "phi":  # rotary over half of each head (16 of 32 dims with hidden_size=128), parallel MLP
            model = transformers.PhiForCausalLM(transformers.PhiConfig(**common, partial_rotary_factor=0.5))
        elif arch == "stablelm":  # partial rotary with grouped k/v heads
            model = transformers.StableLmForCausalLM(transformers.StableLmConfig(**common, partial_rotary_factor=0.5))
        elif arch == "qwen3":  # per-head q/k RMSNorm before the rotary, with weights that are not all ones
            model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=hidden_size // 4))
            with torch.no_grad():
                for layer in model.model.layers:
                    for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                        norm.weight.copy_(1.0 + 0.5 * torch.randn_like(norm.weight))
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if sharpen != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(sharpen)
    path.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(path)
    fast.save_pretrained(path)
    return path


def chi_square_ok(observed: torch.Tensor, probs: torch.Tensor, n: int) -> float:
    """p-value of observed counts vs probabilities; cells with expected < 5 are pooled; zero cells must stay empty."""
    expected = probs.double() * n
    assert observed[expected == 0].sum() == 0, "a token with zero target probability was generated"
    big = expected >= 5
    obs = observed[big].double().tolist()
    exp = expected[big].tolist()
    rest_obs, rest_exp = float(observed[~big].sum()), float(expected[~big].sum())
    if rest_exp > 0:
        obs.append(rest_obs)
        exp.append(rest_exp)
    scale = sum(obs) / sum(exp)  # remove float drift so the totals agree exactly
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)

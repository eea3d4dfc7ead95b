"""`elision.generate(model, input_ids, ...)`: Hugging Face `model.generate`'s habits over lossless speculative decoding.

    out = elision.generate(model, input_ids, attention_mask=mask, max_new_tokens=32)        # LongTensor, like HF
    res = elision.generate(model, input_ids, return_dict_in_generate=True, prompt_lookup_num_tokens=8)
    res.sequences, res.stats["mean_accepted_length"]

What it takes from Hugging Face:
  * defaults: `model.generation_config` (EOS, pad, max_new_tokens / max_length, do_sample, temperature, top_k,
    top_p), then HF's global defaults (20 new tokens, top_k 50 when sampling), then the call's keyword arguments,
    merged in that order with `GenerationConfig.update` exactly as `model.generate` merges them; a
    `generation_config=` replaces the model's, as in HF;
  * drafters spelled the HF way: `prompt_lookup_num_tokens=N` is the `lookup` drafter drafting up to N tokens deep,
    `assistant_model=M` the `draft-model` drafter with M (no assistant and no lookup: elision's `recycling+lookup`;
    `drafter=` names any elision drafter);
  * streamers with `put`/`end` (`transformers.TextStreamer`, `TextIteratorStreamer`): the prompt first, then the
    new tokens as they are accepted;
  * the result: a LongTensor of the full rows (each input row as given, left padding included, then its new
    tokens; rows that stopped early are filled with `pad_token_id`, as HF fills them). With
    `return_dict_in_generate=True` an object with `.sequences` and `.stats` (elision's statistics: tokens/s,
    forward passes, mean accepted length).

Greedy output is token-identical to `model.generate(do_sample=False)` (speculative decoding is lossless). Options
that change what HF would produce and that this loop does not implement (beam search, repetition penalties,
min lengths, scores) are refused with a ValueError naming them, never silently ignored.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from elision.apps.specdec.generate import SpeculativeGenerator

# generation options whose HF meaning this loop does not implement, with the value that means "off"
_UNSUPPORTED_UNLESS = {
    "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None, "bad_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "sequence_bias": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "min_p": None, "exponential_decay_length_penalty": None, "output_scores": False,
    "output_logits": False, "output_attentions": False, "output_hidden_states": False, "guidance_scale": None,
    "penalty_alpha": None, "low_memory": None, "watermarking_config": None,
}

# per model: generators keep the Token Recycling matrix and the measured cost curve between calls
_GENERATORS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


@dataclass
class SpeculativeGenerateOutput:
    """What `return_dict_in_generate=True` returns: HF's `.sequences` plus elision's `.stats`."""

    sequences: torch.LongTensor  # (batch, input width + new tokens): the rows `model.generate` would return
    stats: dict


def _merged_config(model, generation_config: GenerationConfig | None, kwargs: dict) -> tuple[GenerationConfig, dict]:
    """The call's GenerationConfig, merged as HF's `generate` merges it; returns it and the kwargs it did not know."""
    config = copy.deepcopy(generation_config if generation_config is not None else GenerationConfig())
    own = getattr(model, "generation_config", None)
    if own is not None:
        config.update(**own.to_dict(), defaults_only=True)
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    unused = config.update(**kwargs)
    return config, unused


def _default_length(model, generation_config: GenerationConfig | None, kwargs: dict) -> bool:
    """Whether nobody set max_length (HF then generates 20 new tokens, not up to 20 in total)."""
    own = getattr(model, "generation_config", None)
    return (kwargs.get("max_length") is None
            and (generation_config is None or generation_config.max_length is None)
            and (own is None or own.max_length is None))


def _eos_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(t) for t in eos.flatten().tolist()]
    return [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]


def _check_supported(config: GenerationConfig, unused: dict) -> None:
    if unused:
        raise ValueError(f"elision.generate does not take {', '.join(sorted(unused))} (model kwargs other than "
                         "attention_mask are not passed to the model)")
    refused = [name for name, off in _UNSUPPORTED_UNLESS.items()
               if getattr(config, name, off) is not None and getattr(config, name, off) != off]
    if refused:
        raise ValueError(f"elision.generate does not implement {', '.join(refused)} (speculative decoding keeps "
                         "the model's greedy or sampled output exactly; these options change it); use model.generate")


def _drafter_for(config: GenerationConfig, assistant_model, drafter: str | None) -> tuple[str, int | None]:
    """(elision drafter name, draft depth limit) from HF's assistant_model / prompt_lookup_num_tokens."""
    lookup = config.prompt_lookup_num_tokens
    if drafter is not None and (assistant_model is not None or lookup is not None):
        raise ValueError("pass either drafter= or HF's assistant_model= / prompt_lookup_num_tokens=, not both")
    if assistant_model is not None and lookup is not None:
        raise ValueError("pass either assistant_model= or prompt_lookup_num_tokens=, not both (as in HF)")
    if lookup is not None:
        if int(lookup) < 1:
            raise ValueError(f"prompt_lookup_num_tokens must be >= 1, got {lookup}")
        return "lookup", int(lookup)
    if assistant_model is not None:
        return "draft-model", None
    return drafter or "recycling+lookup", None


def _generator(model, drafter: str, assistant_model, max_depth: int | None, tokenizer) -> SpeculativeGenerator:
    per_model = _GENERATORS.setdefault(model, {})
    key = (drafter, id(assistant_model), max_depth)
    gen = per_model.get(key)
    if gen is None:
        extra = {"max_depth": max_depth} if max_depth is not None else {}
        gen = SpeculativeGenerator(model, tokenizer=tokenizer, drafter=drafter, draft_model=assistant_model, **extra)
        per_model[key] = gen
    return gen


def _full_rows(input_ids: torch.Tensor, new_tokens: list[list[int]], pad: int | None) -> torch.LongTensor:
    """Each input row as given followed by its new tokens, short rows filled with `pad` (HF's output layout)."""
    width = max(len(t) for t in new_tokens)
    if pad is None and any(len(t) < width for t in new_tokens):
        raise ValueError("rows stopped at different lengths and there is no pad_token_id (nor eos_token_id) to fill "
                         "them with; pass pad_token_id=")
    tail = torch.full((len(new_tokens), width), pad if pad is not None else 0, dtype=torch.long)
    for b, toks in enumerate(new_tokens):
        tail[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    return torch.cat([input_ids.to(torch.long).cpu(), tail], dim=1)


def generate(model, input_ids: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, *,
             attention_mask: torch.Tensor | None = None, streamer=None, assistant_model=None, tokenizer=None,
             drafter: str | None = None, seed: int | None = None, inputs: torch.Tensor | None = None, **kwargs):
    """`model.generate` with lossless speculative decoding (see the module docstring)."""
    if input_ids is None:
        input_ids = inputs
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError("input_ids must be a LongTensor of token ids (batch, length), as for model.generate")
    ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
    return_dict = bool(kwargs.pop("return_dict_in_generate", False))
    default_length = _default_length(model, generation_config, kwargs)
    config, unused = _merged_config(model, generation_config, kwargs)
    _check_supported(config, unused)
    name, max_depth = _drafter_for(config, assistant_model, drafter)
    width = ids.shape[1]
    if config.max_new_tokens is not None:
        max_new = int(config.max_new_tokens)
    elif default_length:  # HF: "by default let's always generate 20 new tokens", within the position limit
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_new = int(config.max_length) if limit is None else min(int(config.max_length), int(limit) - width)
    else:
        max_new = int(config.max_length) - width
    eos = _eos_list(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    mask = attention_mask
    if mask is None and pad is not None and pad not in eos and bool((ids == pad).any()):
        mask = (ids != pad).long()  # HF infers the mask from pad tokens when it can tell them from EOS
    sampling = {"do_sample": bool(config.do_sample)}
    if config.do_sample:
        sampling.update(temperature=float(config.temperature), top_k=int(config.top_k or 0),
                        top_p=float(config.top_p))
    gen = _generator(model, name, assistant_model, max_depth, tokenizer)
    result = gen.generate(ids, max_new, eos_token_id=eos or None, stop_strings=config.stop_strings,
                          tokenizer=tokenizer, seed=seed, streamer=streamer, attention_mask=mask, **sampling)
    sequences = _full_rows(ids, result.tokens, pad)
    if return_dict:
        return SpeculativeGenerateOutput(sequences, result.stats)
    return sequences

"""Lossless speculative generation: draft a token tree, verify it in one target forward, keep the accepted path.

`SpeculativeGenerator(model, ...)` holds what should persist between calls (the Token Recycling matrix,
the measured verification-cost curve, the backend); `generate(model, input_ids, ...)` is the one-call API
with Hugging Face-like arguments. Batches of prompts of different lengths are decoded together with
per-sequence acceptance (every sequence accepts its own path length each step).

Per step: drafter.prepare -> tree per sequence (static template or dynamic best-first, sized from the
measured cost curve) -> one target forward over all trees (float additive ancestor bias, depth-based
positions) -> greedy or rejection-sampling verification -> stop handling (EOS, max length, stop strings)
-> KV compaction of the accepted path -> drafter.observe (online learning).
"""
from __future__ import annotations

import hashlib
import json
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from elision.apps.specdec.backends import HFCausalLMBackend
from elision.apps.specdec.cache import CacheOverflowError
from elision.apps.specdec.drafters import Drafter, TokenRecyclingDrafter, make_drafter
from elision.apps.specdec.session import KVSession
from elision.apps.specdec.verify import SamplingConfig
from elision.runtime.generation.bookkeeping import check_lengths, normalize_eos
from elision.runtime.generation.calibration import machine_fingerprint
from elision.runtime.generation.loop import DecodeOptions, decode
from elision.runtime.generation.tree import TokenTree
from elision.runtime.generation.tree_builders import StaticTemplate, VerifyCostCurve, parse_tree_spec
from elision.runtime.user_cache import cache_root, read_json, write_json

# cost curves are per model object, batch size and tree-size limit, measured once per process (and kept per machine)
_COST_CURVES: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def measured_cost_curves(model) -> dict:
    """The verification-cost curves measured so far for `model` in this process: {(batch, max tree size): curve}."""
    return dict(_COST_CURVES.get(model, {}))


@dataclass
class StepRecord:
    """One verification step of one sequence, kept when `record_trees=True` (for visualize.py)."""

    sequence: int
    tree: TokenTree
    accepted: list[int]  # node indices, root first
    bonus: int


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # newly generated tokens per sequence (prompt excluded)
    text: list[str] | None
    stats: dict
    prompts: list[list[int]] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def sequences(self) -> list[list[int]]:
        """Prompt + generated tokens, like the rows of Hugging Face `generate`'s output."""
        return [p + t for p, t in zip(self.prompts, self.tokens)]


def _numpy(row: torch.Tensor):
    return row.detach().float().cpu().numpy()


def _torch_uniform(generator: torch.Generator | None):
    """Uniforms from the request's torch.Generator, so `seed=` keeps meaning what it did for the torch loop."""
    return lambda: float(torch.rand((), generator=generator))


def _normalize_prompts(input_ids, attention_mask=None) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be 1-D or 2-D, got shape {tuple(input_ids.shape)}")
        rows = ids.tolist()
        if attention_mask is not None:
            mask = attention_mask if attention_mask.dim() == 2 else attention_mask[None]
            rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, mask.tolist())]
    elif isinstance(input_ids, Sequence) and input_ids and all(isinstance(t, int) for t in input_ids):
        rows = [list(input_ids)]
    elif isinstance(input_ids, Sequence):
        rows = [list(r) for r in input_ids]
    else:
        raise ValueError("input_ids must be a tensor, a list of token ids, or a list of such lists")
    if not rows:
        raise ValueError("input_ids is empty: pass at least one prompt")
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError(f"prompt {i} is empty: speculative generation needs at least one prompt token")
    return [[int(t) for t in r] for r in rows]


class SpeculativeGenerator:
    """Speculative decoding for a Hugging Face causal LM (or any backend implementing backends.ModelBackend)."""

    def __init__(
        self,
        model,
        tokenizer=None,
        drafter: str = "recycling+lookup",
        draft_model=None,
        tree: str = "dynamic",
        max_tree_size: int = 32,
        max_depth: int = 16,
        skip_layers: Sequence[int] | None = None,
        max_cache_len: int | None = None,
        source_model: torch.nn.Module | None = None,
        route: str = "hf",
    ):
        """`source_model` and `route`: for a backend compiled from a Hugging Face model (`compiled_generator`), the
        model it came from and how it runs ("compiled-inductor", ...), which name its cost curve in the per-machine
        cache (without them a backend's curve is measured once per process)."""
        self.source_model = source_model
        self.route = route
        if isinstance(model, torch.nn.Module):
            self.model = model.eval()
            self.backend = HFCausalLMBackend(self.model)
        elif all(hasattr(model, a) for a in ("forward", "select", "truncate", "reset")):
            self.model = None
            self.backend = model
        else:
            raise TypeError("model must be a Hugging Face causal LM (nn.Module) or a ModelBackend")
        self.tokenizer = tokenizer
        self.draft_model = draft_model
        self.max_tree_size = int(max_tree_size)
        self.max_depth = int(max_depth)
        self.skip_layers = frozenset(skip_layers) if skip_layers is not None else None
        self.max_cache_len = max_cache_len
        self._recycling = TokenRecyclingDrafter(self.backend.vocab_size)
        self._drafters: dict[str, Drafter] = {}
        self.drafter_name = drafter
        self.tree_spec = tree
        self._parse_tree(tree)
        self.drafter(drafter)  # validate now: unknown names fail at construction

    # ------------------------------------------------------------------ configuration
    def drafter(self, name: str) -> Drafter:
        if name not in self._drafters:
            self._drafters[name] = make_drafter(
                name,
                vocab_size=self.backend.vocab_size,
                target_model=self.model,
                draft_model=self.draft_model,
                skip_layers=self.skip_layers,
                recycling=self._recycling,
                target_backend=self.backend,
            )
        return self._drafters[name]

    def _parse_tree(self, tree: str) -> StaticTemplate | None:
        return parse_tree_spec(tree)

    def cost_curve(self, session: KVSession) -> VerifyCostCurve:
        """The verification-cost curve for this model, batch size and tree limit: measured once per process, and
        for a Hugging Face model once per machine (the user cache remembers it across `elision generate` runs)."""
        owner = self.model if self.model is not None else self.backend
        per_model = _COST_CURVES.setdefault(owner, {})
        key = (session.batch_size, self.max_tree_size)
        if key not in per_model:
            machine_key = self._machine_curve_key(session.batch_size)
            path = cache_root() / "calibration" / "torch_curves.json"
            cached = (read_json(path) or {}) if machine_key else {}
            if machine_key in cached:
                per_model[key] = VerifyCostCurve(cached[machine_key]["sizes"], cached[machine_key]["seconds"])
            else:
                per_model[key] = VerifyCostCurve.measure(session, self.max_tree_size)
                if machine_key:
                    cached[machine_key] = {"sizes": per_model[key].sizes, "seconds": per_model[key].seconds}
                    write_json(path, cached)
        return per_model[key]

    def _machine_curve_key(self, batch_size: int) -> str | None:
        """What the timing of a verification forward depends on: the architecture and shapes (never the weight
        values), batch, tree limit, torch threads and build, and the machine. None for backends without a config."""
        model = self.model if self.model is not None else self.source_model
        config = getattr(model, "config", None)
        if config is None:
            return None
        params = next(model.parameters(), None)
        what = {"model": type(model).__name__, "config": config.to_json_string(use_diff=False), "route": self.route,
                "dtype": str(params.dtype if params is not None else None),
                "device": str(params.device if params is not None else None), "batch": batch_size,
                "max_tree_size": self.max_tree_size, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "machine": machine_fingerprint(with_onnxruntime=False)}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(
        self,
        input_ids,
        max_new_tokens: int = 64,
        *,
        drafter: str | None = None,
        tree: str | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer=None,
        seed: int | None = None,
        streamer=None,
        attention_mask: torch.Tensor | None = None,
        max_length: int | None = None,
        record_trees: bool = False,
    ) -> GenerationResult:
        t_start = time.perf_counter()
        prompts = _normalize_prompts(input_ids, attention_mask)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        sampling = SamplingConfig(bool(do_sample), float(temperature), int(top_k or 0), float(top_p))
        sampling.validate()
        drafter_name = drafter or self.drafter_name
        draft = self.drafter(drafter_name)
        template = self._parse_tree(tree or self.tree_spec)
        if max_length is not None:
            max_new_tokens = min(max_new_tokens, max_length - max(len(p) for p in prompts))
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = normalize_eos(eos_token_id)
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if stops and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass tokenizer=...")
        if streamer is not None and len(prompts) != 1:
            raise ValueError("streaming supports a single prompt (batch size 1)")
        vocab = self.backend.vocab_size
        for i, p in enumerate(prompts):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        longest = max(len(p) for p in prompts)
        check_lengths(longest, max_new_tokens, self.backend.max_positions, CacheOverflowError)
        tree_budget = len(template) if template is not None else self.max_tree_size
        capacity = longest + max_new_tokens + tree_budget + 1
        if self.max_cache_len is not None and capacity > self.max_cache_len:
            raise CacheOverflowError(
                f"cache overflow: this request needs {capacity} KV slots (prompt {longest} + {max_new_tokens} new + "
                f"a {tree_budget}-node tree) but max_cache_len is {self.max_cache_len}; "
                "lower max_new_tokens or raise max_cache_len"
            )
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if generator is None and sampling.do_sample:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))

        session = KVSession(self.backend, len(prompts), capacity)
        records: list[StepRecord] = []
        if streamer is not None:
            streamer.put(torch.tensor([prompts[0]]))
        opts = DecodeOptions(
            max_new_tokens=max_new_tokens, eos=eos, stops=stops, tokenizer=tokenizer, sampling=sampling,
            uniform=_torch_uniform(generator), template=template, tree_name=tree or self.tree_spec,
            max_tree_size=self.max_tree_size, max_depth=self.max_depth, cost_curve=self.cost_curve, to_numpy=_numpy,
            on_tokens=(lambda b, new: streamer.put(torch.tensor(new))) if streamer is not None else None,
            on_step=(lambda b, t, path, bonus: records.append(StepRecord(b, t, path, bonus))) if record_trees else None,
        )
        outcome = decode(session, prompts, draft, opts, started=t_start)
        if streamer is not None:
            streamer.end()
        outputs, stats = outcome.outputs, outcome.stats
        text = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs] if tokenizer is not None else None
        return GenerationResult(outputs, text, stats, prompts, records)


_GENERATORS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def generate(
    model,
    input_ids,
    max_new_tokens: int = 64,
    *,
    drafter: str = "recycling+lookup",
    draft_model=None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    tree: str = "dynamic",
    seed: int | None = None,
    streamer=None,
    attention_mask: torch.Tensor | None = None,
    max_length: int | None = None,
    skip_layers: Sequence[int] | None = None,
    max_tree_size: int = 32,
    record_trees: bool = False,
) -> GenerationResult:
    """One-call speculative generation; generators (recycling matrix, cost curve) are reused per model."""
    per_model = _GENERATORS.setdefault(model, {})
    key = (drafter, id(draft_model), tree, tuple(sorted(skip_layers)) if skip_layers is not None else None, max_tree_size)
    gen = per_model.get(key)
    if gen is None:
        gen = SpeculativeGenerator(
            model,
            tokenizer=tokenizer,
            drafter=drafter,
            draft_model=draft_model,
            tree=tree,
            skip_layers=skip_layers,
            max_tree_size=max_tree_size,
        )
        per_model[key] = gen
    return gen.generate(
        input_ids,
        max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        stop_strings=stop_strings,
        tokenizer=tokenizer,
        seed=seed,
        streamer=streamer,
        attention_mask=attention_mask,
        max_length=max_length,
        record_trees=record_trees,
    )

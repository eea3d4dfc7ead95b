"""Speculative text generation from an ONNX generation artifact with onnxruntime alone (no torch).

    gen = OrtGenerator.load("tiny-gen")           # written by `elision compile MODEL --emit onnx --for generate`
    result = gen.generate("def parse(", max_new_tokens=64, drafter="recycling+lookup")
    result.tokens, result.text, result.stats["tokens_per_s"]

The artifact holds one step function, `verify(input_ids [1,n], positions [1,n], attn_bias [1,1,n,past+n],
past_k_0, past_v_0, ...) -> (logits, k_0, v_0, ...)` returning the new K/V slices of the n fed tokens, plus
the tokenizer (tokenizer.json, hashed in the manifest like the graphs) and what this loop needs in
`runtime_settings["generation"]` (EOS ids, position limit, vocabulary, K/V layout).

Per step: model-free drafters propose a token tree (prompt lookup, token recycling, copy, '+' combinations;
static template or dynamic best-first tree sized from a measured verification-cost curve) -> one `verify`
call over the whole tree (additive ancestor bias, depth-based positions) -> greedy verification, or lossless
rejection sampling with `do_sample=True` (temperature, top-k, top-p, seed) -> the root and accepted nodes'
K/V are written into preallocated numpy buffers (compaction of the accepted path: rejected branches are never
stored) -> the bonus token becomes the next root. Greedy output is exactly the model's own greedy decoding;
sampled output follows exactly the model's own (processed) sampling distribution. Batch size 1.

The drafters, trees, verification (greedy and sampling) and stop handling are `elision.runtime.generation`,
shared with the torch loop. This module must never import torch (a test checks it in a fresh interpreter).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from elision.runtime.artifact import Artifact, ArtifactError, ArtifactMissingFileError, load_artifact
from elision.runtime.generation.bookkeeping import (
    IncrementalDecoder,
    append_tokens,
    check_lengths,
    generation_stats,
    normalize_eos,
)
from elision.runtime.generation.drafters import BASIC_DRAFTERS, CombinedDrafter, Drafter, TokenRecyclingDrafter, basic_drafter
from elision.runtime.generation.sampling import ProcessedRows, SamplingConfig, numpy_uniform, sample_token, target_probs, verify_sampling
from elision.runtime.generation.tree_builders import (
    StaticTemplate,
    VerifyCostCurve,
    build_dynamic,
    build_static,
    choose_tree_size,
    parse_tree_spec,
)
from elision.runtime.generation.verify import verify_greedy

GENERATION_KIND = "specdec-generate"
_GENERATE_HINT = "compile one with `elision compile MODEL --emit onnx --for generate -o DIR`"


class GenerationError(ArtifactError, ValueError):
    """A generation request that cannot be served (empty or too long prompt, bad drafter or tree name)."""


class KVCacheOverflowError(GenerationError):
    """Prompt plus new tokens would run past the model's position limit (the size of the KV cache)."""


@dataclass
class OrtGenerationResult:
    tokens: list[int]  # generated tokens (prompt excluded)
    text: str
    stats: dict
    prompt: list[int] = field(default_factory=list)


class NumpyKVCache:
    """Preallocated K/V buffers `[1, kv_heads, capacity, head_dim]`, one per verify K/V input, in input order.

    Slot i holds position i (batch 1, compacted after every step), so the cache needs no slot table.
    """

    def __init__(self, n_buffers: int, kv_heads: int, head_dim: int, capacity: int, dtype: np.dtype):
        self.capacity = int(capacity)
        self.length = 0
        self.buffers = [np.zeros((1, kv_heads, self.capacity, head_dim), dtype=dtype) for _ in range(n_buffers)]

    def past(self) -> list[np.ndarray]:
        # onnxruntime reads C-contiguous memory; a [:, :, :length] view of a multi-head buffer is not
        return [np.ascontiguousarray(b[:, :, : self.length]) for b in self.buffers]

    def commit(self, new: Sequence[np.ndarray], nodes: Sequence[int]) -> None:
        """Append the K/V of the fed tokens `nodes` (indices into the last forward's n tokens), in order."""
        m = len(nodes)
        end = self.length + m
        if end > self.capacity:
            raise KVCacheOverflowError(f"KV cache overflow: {end} slots needed but the cache holds {self.capacity}")
        index = np.asarray(nodes, dtype=np.int64)
        for buf, slice_ in zip(self.buffers, new):
            buf[:, :, self.length : end] = slice_[:, :, index]
        self.length = end


class _Probe:
    """The session interface `VerifyCostCurve.measure` times: forwards of dummy chains, never committed."""

    batch_size = 1

    def __init__(self, gen: "OrtGenerator", cache: NumpyKVCache):
        self.gen, self.cache = gen, cache

    def extend_chains(self, chains: list[list[int]]) -> None:
        n = len(chains[0])
        self.gen._forward(self.cache, chains[0], list(range(n)), np.tril(np.ones((n, n), dtype=bool)))

    def rollback(self) -> None:
        """Nothing to undo: K/V reach the cache only through `commit`."""


class OrtGenerator:
    """Speculative decoding (greedy or sampling) over a loaded generation artifact; keeps the recycling matrix and the
    measured cost curve across `generate` calls."""

    def __init__(self, artifact: Artifact, drafter: str = "recycling+lookup", tree: str = "dynamic",
                 max_tree_size: int = 32, max_depth: int = 16):
        settings = artifact.runtime_settings
        gen = settings.get("generation")
        if settings.get("kind") != GENERATION_KIND or not isinstance(gen, dict):
            raise GenerationError(f"artifact {artifact.path} has no generation function (runtime kind "
                                  f"{settings.get('kind', 'generic')!r}); {_GENERATE_HINT}")
        self.artifact = artifact
        self.settings = gen
        self.function = str(gen.get("function", "verify"))
        spec = artifact.spec(self.function)
        names = spec.input_names
        self.kv_inputs = names[3:]
        if names[:3] != ["input_ids", "positions", "attn_bias"] or len(spec.outputs) != 1 + len(self.kv_inputs):
            raise GenerationError(f"function {self.function!r} of {artifact.path} does not have the verify signature "
                                  f"(input_ids, positions, attn_bias, past K/V...) -> (logits, new K/V...); {_GENERATE_HINT}")
        self.output_names = spec.output_names
        self.session = artifact.session(self.function)
        missing = [k for k in ("dtype", "vocab_size", "kv_heads", "head_dim") if k not in gen]
        if missing:
            raise GenerationError(f"the generation settings in {artifact.path}/manifest.json lack {', '.join(missing)}; "
                                  f"{_GENERATE_HINT}")
        self.dtype = np.dtype(str(gen["dtype"]))
        self.vocab_size = int(gen["vocab_size"])
        self.kv_heads, self.head_dim = int(gen["kv_heads"]), int(gen["head_dim"])
        self.max_positions = int(gen["max_positions"]) if gen.get("max_positions") else None
        self.sliding_window = int(gen["sliding_window"]) if gen.get("sliding_window") else None
        self.eos_token_ids = [int(e) for e in gen.get("eos_token_ids", [])]
        self.tokenizer = _load_tokenizer(artifact.file(str(gen.get("tokenizer", "tokenizer.json"))))  # confined, hashed
        self.max_tree_size, self.max_depth = int(max_tree_size), int(max_depth)
        self.drafter_name, self.tree_spec = drafter, tree
        self._recycling = TokenRecyclingDrafter(self.vocab_size)
        self._drafters: dict[str, Drafter] = {}
        self._curve: VerifyCostCurve | None = None
        self.drafter(drafter)
        _parse_tree(tree)

    @property
    def cost_curve(self) -> VerifyCostCurve | None:
        """The verification-cost curve measured on the first dynamic-tree generation (None before it)."""
        return self._curve

    @classmethod
    def load(cls, path: str | Path, *, providers: Iterable[str] | None = None, threads: int | None = None,
             verify: bool = True, **kwargs) -> "OrtGenerator":
        """Load and check the artifact directory `path` (sha256 of every file, the tokenizer included)."""
        return cls(load_artifact(path, providers=providers, threads=threads, verify=verify), **kwargs)

    def drafter(self, name: str) -> Drafter:
        if name not in self._drafters:
            if not isinstance(name, str) or not name.strip():
                raise GenerationError(f"drafter must be a non-empty name; known: {', '.join(BASIC_DRAFTERS)}")
            parts = []
            for part in (s.strip() for s in name.split("+")):
                if part not in BASIC_DRAFTERS:
                    hint = " (model drafters need the torch runtime: `elision generate`)" if part in ("layer-skip", "draft-model") else ""
                    raise GenerationError(f"unknown drafter {part!r} for an ONNX artifact{hint}; use "
                                          f"{', '.join(BASIC_DRAFTERS)} or a '+' combination such as recycling+lookup")
                parts.append(basic_drafter(part, self.vocab_size, self._recycling))
            self._drafters[name] = parts[0] if len(parts) == 1 else CombinedDrafter(parts)
        return self._drafters[name]

    # ------------------------------------------------------------------ one verify call
    def _forward(self, cache: NumpyKVCache, tokens: Sequence[int], depths: Sequence[int], allowed: np.ndarray):
        """Run `tokens` (tree nodes with `depths`, ancestor mask `allowed` [n, n]) after the cached slots.

        Returns logits [n, V] and the new K/V slices (one [1, H, n, D] array per buffer); nothing is cached yet.
        """
        n, past = len(tokens), cache.length
        positions = past + np.asarray(depths, dtype=np.int64)
        bias = np.zeros((1, 1, n, past + n), dtype=self.dtype)
        tree_ok = allowed
        if self.sliding_window:
            window = self.sliding_window
            cache_ok = np.arange(past)[None, :] > positions[:, None] - window
            bias[0, 0, :, :past][~cache_ok] = -np.inf
            tree_ok = allowed & (positions[None, :] > positions[:, None] - window) | np.eye(n, dtype=bool)
        bias[0, 0, :, past:][~tree_ok] = -np.inf
        feeds = {"input_ids": np.asarray([tokens], dtype=np.int64), "positions": positions[None], "attn_bias": bias}
        feeds.update(zip(self.kv_inputs, cache.past()))
        out = self.session.run(self.output_names, feeds)
        return out[0][0], out[1:]

    # ------------------------------------------------------------------ generation
    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt).ids)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *, drafter: str | None = None,
                 tree: str | None = None, eos_token_id: int | Sequence[int] | None = None,
                 stop_strings: str | Sequence[str] | None = None,
                 stream: Callable[[str], None] | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> OrtGenerationResult:
        """Speculative generation, greedy or (`do_sample=True`) lossless sampling from the target's distribution
        after temperature, top-k (0: off) and top-p. A fixed `seed` reproduces a run from the same drafter state
        and tree sizes (a fresh generator with a static tree): the recycling drafter learns across calls and a
        dynamic tree is sized from a timing measurement, and both change which uniforms the rejection rule uses.
        `eos_token_id` defaults to the artifact's EOS ids (pass [] for none); `stream` receives text pieces as
        tokens are accepted."""
        t_start = time.perf_counter()
        sampling = _sampling_config(do_sample, temperature, top_k, top_p, seed)
        uniform = numpy_uniform(seed) if sampling.do_sample else None
        ids = self._check_prompt(prompt, max_new_tokens)
        draft = self.drafter(drafter or self.drafter_name)
        tree_spec = tree or self.tree_spec
        template = _parse_tree(tree_spec)
        eos = normalize_eos(self.eos_token_ids if eos_token_id is None else eos_token_id)
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        timing = dict(prefill_s=0.0, cost_curve_s=0.0, draft_s=0.0, verify_s=0.0, accept_s=0.0)
        cache = NumpyKVCache(len(self.kv_inputs), self.kv_heads, self.head_dim, len(ids) + max_new_tokens, self.dtype)
        decoder = IncrementalDecoder(self.tokenizer) if stream is not None else None

        t0 = time.perf_counter()
        n = len(ids)
        logits, new = self._forward(cache, ids, list(range(n)), np.tril(np.ones((n, n), dtype=bool)))
        cache.commit(new, range(n))
        outputs: list[list[int]] = [[]]
        contexts, active = [list(ids)], [True]
        first = sample_token(target_probs(logits[-1], sampling), uniform) if uniform is not None else int(logits[-1].argmax())
        append_tokens(0, [first], outputs, contexts, active, eos, stops, max_new_tokens, self.tokenizer)
        timing["prefill_s"] = time.perf_counter() - t0
        if decoder is not None:
            stream(decoder.push(outputs[0]))
        t0 = time.perf_counter()
        draft.reset(contexts, logits[None])
        timing["draft_s"] += time.perf_counter() - t0
        if template is None and active[0] and self._curve is None:
            t0 = time.perf_counter()
            self._curve = VerifyCostCurve.measure(_Probe(self, cache), self.max_tree_size)
            timing["cost_curve_s"] = time.perf_counter() - t0

        steps, accepted, tree_sizes = 0, [[]], []
        while active[0]:
            t0 = time.perf_counter()
            depth = min(self.max_depth, max_new_tokens - len(outputs[0]) - 1)
            draft.prepare(contexts, active, [depth])
            if template is not None:
                t = build_static(draft, 0, contexts[0], template, depth)
            else:
                t = build_dynamic(draft, 0, contexts[0], self.max_tree_size, depth)
                t = t.truncate(choose_tree_size([t], self._curve, self.max_tree_size))
            timing["draft_s"] += time.perf_counter() - t0

            t0 = time.perf_counter()
            logits, new = self._forward(cache, t.tokens, t.depths, t.ancestor_mask())
            timing["verify_s"] += time.perf_counter() - t0

            t0 = time.perf_counter()
            steps += 1
            tree_sizes.append(len(t))
            if uniform is not None:
                path, bonus = verify_sampling(t, ProcessedRows(logits.__getitem__, sampling), uniform)
            else:
                path, bonus = verify_greedy(t, logits.argmax(-1).tolist())
            before = len(outputs[0])
            append_tokens(0, [t.tokens[i] for i in path[1:]] + [bonus], outputs, contexts, active, eos, stops,
                          max_new_tokens, self.tokenizer)
            accepted[0].append(len(outputs[0]) - before)
            draft.observe(0, t, logits, path, contexts[0])
            cache.commit(new, path)  # the root and the accepted nodes; the bonus token is the next root
            timing["accept_s"] += time.perf_counter() - t0
            if decoder is not None:
                stream(decoder.push(outputs[0][before:]))
        if decoder is not None:
            stream(decoder.finish())

        stats = generation_stats(outputs=outputs, accepted_lengths=accepted, tree_sizes=tree_sizes, steps=steps,
                                 total_s=time.perf_counter() - t_start, timing=timing,
                                 draft_forward_passes=draft.draft_forward_passes, drafter=draft.name, tree=tree_spec)
        text = self.tokenizer.decode(outputs[0], skip_special_tokens=True)
        return OrtGenerationResult(outputs[0], text, stats, ids)

    def _check_prompt(self, prompt: str | Sequence[int], max_new_tokens: int) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise GenerationError("the prompt is empty: pass some text with --prompt")
            ids = self.encode(prompt)
            if not ids:
                raise GenerationError("the prompt encodes to zero tokens: pass some text with --prompt")
        else:
            ids = [int(t) for t in prompt]
            if not ids:
                raise GenerationError("the prompt is empty: speculative generation needs at least one prompt token")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise GenerationError(f"prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        try:
            check_lengths(len(ids), max_new_tokens, self.max_positions, KVCacheOverflowError)
        except KVCacheOverflowError:
            raise
        except ValueError as e:
            raise GenerationError(str(e)) from None
        return ids


def _sampling_config(do_sample, temperature, top_k, top_p, seed) -> SamplingConfig:
    """Checked sampling options; a bad value is a GenerationError naming it (the CLI prints it as one line)."""
    try:
        cfg = SamplingConfig(bool(do_sample), float(temperature), int(top_k or 0), float(top_p))
        if seed is not None and (isinstance(seed, bool) or int(seed) != seed or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise GenerationError(str(e)) from None
    return cfg


def _parse_tree(tree: str) -> StaticTemplate | None:
    try:
        return parse_tree_spec(tree)
    except ValueError as e:
        raise GenerationError(str(e)) from None


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ArtifactMissingFileError(f"the generation artifact's tokenizer {path} is missing; {_GENERATE_HINT}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for unparsable files
        raise GenerationError(f"cannot read the tokenizer {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                              f"{_GENERATE_HINT}") from None


def run_prompt(artifact: Artifact, prompt: str, options: dict) -> dict:
    """`elision run DIR --prompt TEXT` for generation artifacts: {tokens, text, stats} like `elision generate --json`."""
    gen = OrtGenerator(artifact, drafter=options.get("drafter") or "recycling+lookup",
                       tree=options.get("tree") or "dynamic")
    result = gen.generate(prompt, options.get("max_new_tokens") or 64, stop_strings=options.get("stop") or None,
                          stream=options.get("stream"), do_sample=bool(options.get("do_sample")),
                          temperature=_default(options.get("temperature"), 1.0), top_k=_default(options.get("top_k"), 0),
                          top_p=_default(options.get("top_p"), 1.0), seed=options.get("seed"))
    return {"tokens": result.tokens, "text": result.text, "stats": result.stats}


def _default(value, default):
    # `is None`, not `or`: an explicit 0 (a bad temperature) must reach the check rather than become the default
    return default if value is None else value


__all__ = ["GENERATION_KIND", "GenerationError", "KVCacheOverflowError", "NumpyKVCache", "OrtGenerationResult",
           "OrtGenerator", "run_prompt"]

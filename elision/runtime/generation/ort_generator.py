"""Speculative text generation from an ONNX generation artifact with onnxruntime alone (no torch).

    gen = OrtGenerator.load("tiny-gen")           # written by `elision compile MODEL --emit onnx --for generate`
    result = gen.generate("def parse(", max_new_tokens=64, drafter="recycling+lookup")
    result.tokens, result.text, result.stats["tokens_per_s"]
    results = gen.generate_batch(["def parse(", "import os\\n"], 64)   # one batched forward per step

The artifact holds one step function and the tokenizer (tokenizer.json, hashed in the manifest like the graphs),
plus what the loop needs in `runtime_settings["generation"]` (EOS ids, position limit, vocabulary, K/V layout,
and the per-machine calibration). Two step forms exist:

* `step` (form "gqa-shared-kv", `elision.runtime.generation.step_signature`): ONNX Runtime's fused operators,
  the KV cache in preallocated buffers written in place (`OrtStepSession`). What `elision compile` writes now.
* `verify` (form "concat-kv"): the graph returns the new K/V slices and the host copies them into its cache
  (`OrtVerifySession`). Older artifacts, and models whose attention does not fuse.

The draft -> verify -> accept -> commit loop is `elision.runtime.generation.loop.decode`, shared with the torch
loop; drafters, trees, verification (greedy and sampling) and stop handling are the rest of
`elision.runtime.generation`. Greedy output is exactly the model's own greedy decoding; sampled output follows
exactly the model's own (processed) sampling distribution. The intra-op thread count and the verification-cost
curve that sizes dynamic trees come from the calibration measured for this machine (`calibration.py`).

This module must never import torch (a test checks it in a fresh interpreter).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from elision.runtime.artifact import Artifact, ArtifactError, ArtifactMissingFileError, load_artifact, read_manifest
from elision.runtime.generation import step_signature as sig
from elision.runtime.generation.bookkeeping import IncrementalDecoder, check_lengths, normalize_eos
from elision.runtime.generation.calibration import MachineCalibration, available_cores, load_calibration, save_calibration
from elision.runtime.generation.drafters import BASIC_DRAFTERS, CombinedDrafter, Drafter, TokenRecyclingDrafter, basic_drafter
from elision.runtime.generation.loop import DecodeOptions, SequenceOptions, decode
from elision.runtime.generation.ort_session_base import KVCacheOverflow
from elision.runtime.generation.ort_step_session import OrtStepSession
from elision.runtime.generation.ort_verify_session import OrtVerifySession
from elision.runtime.generation.sampling import SamplingConfig, numpy_uniform
from elision.runtime.generation.tree_builders import StaticTemplate, VerifyCostCurve, parse_tree_spec

GENERATION_KIND = "specdec-generate"
_GENERATE_HINT = "compile one with `elision compile MODEL --emit onnx --for generate -o DIR`"
_FORMS = (sig.STEP_FORM, sig.VERIFY_FORM)


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


def default_threads(manifest: dict) -> int:
    """Intra-op threads for a generation artifact on this machine: the calibrated fastest count when one was
    measured here, else a size rule (a small model is fastest on one thread: more threads only add
    synchronisation per op; a large one wants every core)."""
    calibrated = load_calibration(manifest).threads
    if calibrated:
        return int(calibrated)
    weights = int(manifest.get("weights", {}).get("bytes", 0))
    return max(1, min(available_cores(), weights // (256 << 20)))


class OrtGenerator:
    """Speculative decoding (greedy or sampling) over a loaded generation artifact; keeps the recycling matrix and the
    cost curves across `generate` calls."""

    def __init__(self, artifact: Artifact, drafter: str = "recycling+lookup", tree: str = "dynamic",
                 max_tree_size: int = 32, max_depth: int = 16):
        settings = artifact.runtime_settings
        gen = settings.get("generation")
        if settings.get("kind") != GENERATION_KIND or not isinstance(gen, dict):
            raise GenerationError(f"artifact {artifact.path} has no generation function (runtime kind "
                                  f"{settings.get('kind', 'generic')!r}); {_GENERATE_HINT}")
        self.artifact = artifact
        self.settings = gen
        self.form = str(gen.get("form", sig.VERIFY_FORM))
        if self.form not in _FORMS:
            raise GenerationError(f"artifact {artifact.path} has generation form {self.form!r}, which this elision "
                                  f"cannot run (it knows {', '.join(_FORMS)}); recompile it: {_GENERATE_HINT}")
        missing = [k for k in ("dtype", "vocab_size", "kv_heads", "head_dim") if k not in gen]
        if missing:
            raise GenerationError(f"the generation settings in {artifact.path}/manifest.json lack {', '.join(missing)}; "
                                  f"{_GENERATE_HINT}")
        self.function = str(gen.get("function", sig.STEP_FUNCTION if self.form == sig.STEP_FORM else "verify"))
        self._check_signature(artifact.spec(self.function))
        self.session = artifact.session(self.function)
        self.dtype = np.dtype(str(gen["dtype"]))
        self.vocab_size = int(gen["vocab_size"])
        self.kv_heads, self.head_dim = int(gen["kv_heads"]), int(gen["head_dim"])
        self.layers = int(gen.get("kv_layers", len(self.kv_inputs) // 2))
        self.max_positions = int(gen["max_positions"]) if gen.get("max_positions") else None
        self.sliding_window = int(gen["sliding_window"]) if gen.get("sliding_window") else None
        self.eos_token_ids = [int(e) for e in gen.get("eos_token_ids", [])]
        self.tokenizer = _load_tokenizer(artifact.file(str(gen.get("tokenizer", "tokenizer.json"))))  # confined, hashed
        self.max_tree_size, self.max_depth = int(max_tree_size), int(max_depth)
        self.drafter_name, self.tree_spec = drafter, tree
        self.threads = artifact.threads
        self.calibration: MachineCalibration = load_calibration(artifact.manifest)
        self._recycling = TokenRecyclingDrafter(self.vocab_size)
        self._drafters: dict[str, Drafter] = {}
        self._curves: dict[int, VerifyCostCurve] = {}  # batch size -> curve (batch 1 from the calibration)
        self.drafter(drafter)
        _parse_tree(tree)

    def _check_signature(self, spec) -> None:
        names = spec.input_names
        if self.form == sig.STEP_FORM:
            self.kv_inputs = [n for n in names if n not in sig.SMALL_INPUTS]
            ok = set(sig.SMALL_INPUTS) <= set(names) and spec.output_names[0] == sig.LOGITS and \
                len(spec.outputs) == 1 + len(self.kv_inputs)
        else:
            self.kv_inputs = names[3:]
            self.output_names = spec.output_names
            ok = names[:3] == ["input_ids", "positions", "attn_bias"] and len(spec.outputs) == 1 + len(self.kv_inputs)
        if not ok:
            raise GenerationError(f"function {self.function!r} of {self.artifact.path} does not have the {self.form} "
                                  f"step signature; recompile it: {_GENERATE_HINT}")

    @property
    def tree_template(self) -> StaticTemplate | None:
        """The static tree template of this generator's tree spec (None: dynamic trees)."""
        return _parse_tree(self.tree_spec)

    @property
    def cost_curve(self) -> VerifyCostCurve | None:
        """The batch-1 verification-cost curve on this machine (None until calibrated or first measured)."""
        return self._curve_for_batch(1)

    @classmethod
    def load(cls, path: str | Path, *, providers: Iterable[str] | None = None, threads: int | None = None,
             verify: bool = True, session_config: dict[str, str] | None = None, **kwargs) -> "OrtGenerator":
        """Load and check the artifact directory `path` (sha256 of every file, the tokenizer included).

        `threads`: intra-op threads; default the count calibrated as fastest on this machine (`default_threads`).
        `session_config`: extra onnxruntime session config entries.
        """
        if threads is None:
            threads = default_threads(read_manifest(path))
        artifact = load_artifact(path, providers=providers, threads=threads, verify=verify, session_config=session_config)
        return cls(artifact, **kwargs)

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

    def new_session(self, batch_size: int, capacity: int):
        """A fresh `TreeSession` of this artifact's form, with a KV cache of `capacity` slots per sequence."""
        common = dict(kv_heads=self.kv_heads, head_dim=self.head_dim, batch_size=batch_size, capacity=capacity,
                      dtype=self.dtype, sliding_window=self.sliding_window)
        if self.form == sig.STEP_FORM:
            return OrtStepSession(self.session, layers=self.layers, vocab_size=self.vocab_size,
                                  max_positions=self.max_positions, **common)
        return OrtVerifySession(self.session, kv_inputs=self.kv_inputs, output_names=self.output_names, **common)

    # ------------------------------------------------------------------ calibration
    def _curve_for_batch(self, batch: int) -> VerifyCostCurve | None:
        if batch not in self._curves and batch == 1 and self.threads is not None:
            curve = self.calibration.curve(self.threads)
            if curve is not None:
                self._curves[1] = curve
        return self._curves.get(batch)

    def _measure_curve(self, session) -> VerifyCostCurve:
        """Measure on the live session (after prefill) and remember it; batch 1 is also saved for this machine."""
        curve = VerifyCostCurve.measure(session, self.max_tree_size)
        self._curves[session.batch_size] = curve
        if session.batch_size == 1 and self.threads is not None:
            self.calibration.set_curve(self.threads, curve)
            save_calibration(self.calibration, self.artifact.manifest)
        return curve

    def batch_cost_curve(self, batch: int, context: int = 32) -> VerifyCostCurve:
        """The verification-cost curve for `batch` sequences: one kept or calibrated, else measured now on a
        session of `context`-token dummy prompts (continuous batching measures its batch sizes up front)."""
        curve = self._curve_for_batch(batch)
        if curve is None:
            session = self.new_session(batch, context + self.max_tree_size + 2)
            session.prefill([[0] * context] * batch)
            curve = self._measure_curve(session)
        return curve

    def step_seconds(self, context: int = 32, repeats: int = 7) -> float:
        """Median seconds of one single-token step after a `context`-token prompt (the plain decoding step)."""
        session = self.new_session(1, context + 2)
        session.prefill([[0] * context])
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            session.extend_chains([[0]])
            times.append(time.perf_counter() - t0)
            session.rollback()
        return float(np.median(times[1:]))

    def calibrate(self, context: int = 32) -> VerifyCostCurve:
        """Measure the batch-1 cost curve for this machine and thread count now (compile time), and keep it."""
        session = self.new_session(1, context + self.max_tree_size + 2)
        session.prefill([[0] * context])
        return self._measure_curve(session)

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
        sampling = _sampling_config(do_sample, temperature, top_k, top_p, seed)  # bad options first, then the prompt
        ids = self._check_prompt(prompt, max_new_tokens)
        decoder = IncrementalDecoder(self.tokenizer) if stream is not None else None
        on_tokens = (lambda b, new: stream(decoder.push(new))) if decoder is not None else None
        outcome = self._decode([ids], max_new_tokens, drafter, tree, eos_token_id, stop_strings, sampling, seed,
                               on_tokens, t_start)
        if decoder is not None:
            stream(decoder.finish())
        tokens = outcome.outputs[0]
        return OrtGenerationResult(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True), outcome.stats, ids)

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64, *,
                       drafter: str | None = None, tree: str | None = None,
                       eos_token_id: int | Sequence[int] | None = None, stop_strings: str | Sequence[str] | None = None,
                       do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       seed: int | None = None) -> list[OrtGenerationResult]:
        """`generate` for several prompts decoded together (one forward per step over every sequence's tree, each
        sequence accepting its own path length). Greedy output per request equals running it alone.

        Each result's stats describe the batch (forward passes, time) except `new_tokens`, `tokens_per_s` and
        `mean_accepted_length`, which are that request's; `batch_tokens_per_s` is the batch's throughput."""
        t_start = time.perf_counter()
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise GenerationError("generate_batch needs a non-empty list of prompts (strings or token id lists)")
        sampling = _sampling_config(do_sample, temperature, top_k, top_p, seed)
        ids = [self._check_prompt(p, max_new_tokens) for p in prompts]
        outcome = self._decode(ids, max_new_tokens, drafter, tree, eos_token_id, stop_strings, sampling, seed, None,
                               t_start)
        stats, results = outcome.stats, []
        total = stats["time_s"]["total"]
        for b, tokens in enumerate(outcome.outputs):
            own = dict(stats, new_tokens=len(tokens), tokens_per_s=len(tokens) / total if total > 0 else float("inf"),
                       mean_accepted_length=stats["per_sequence_accepted_length"][b],
                       batch_tokens_per_s=stats["tokens_per_s"], sequence=b)
            results.append(OrtGenerationResult(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True), own, ids[b]))
        return results

    def check_request(self, prompt: str | Sequence[int], max_new_tokens: int, *,
                      eos_token_id: int | Sequence[int] | None = None, stop_strings: str | Sequence[str] | None = None,
                      do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      seed: int | None = None) -> tuple[list[int], SequenceOptions]:
        """`generate`'s checks of one request (GenerationError naming the first problem): its prompt ids and its
        options as one sequence of a batch (continuous batching), with its own random source when sampling."""
        sampling = _sampling_config(do_sample, temperature, top_k, top_p, seed)
        ids = self._check_prompt(prompt, max_new_tokens)
        eos = normalize_eos(self.eos_token_ids if eos_token_id is None else eos_token_id)
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        return ids, SequenceOptions(max_new_tokens, eos, stops, sampling,
                                    numpy_uniform(seed) if sampling.do_sample else None)

    def _decode(self, prompts, max_new_tokens, drafter, tree, eos_token_id, stop_strings, sampling, seed, on_tokens,
                t_start):
        draft = self.drafter(drafter or self.drafter_name)
        tree_spec = tree or self.tree_spec
        template = _parse_tree(tree_spec)
        eos = normalize_eos(self.eos_token_ids if eos_token_id is None else eos_token_id)
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        budget = len(template) if template is not None else self.max_tree_size
        longest = max(len(p) for p in prompts)
        session = self.new_session(len(prompts), longest + max_new_tokens + budget + 1)
        opts = DecodeOptions(
            max_new_tokens=max_new_tokens, eos=eos, stops=stops, tokenizer=self.tokenizer, sampling=sampling,
            uniform=numpy_uniform(seed) if sampling.do_sample else None, template=template, tree_name=tree_spec,
            max_tree_size=self.max_tree_size, max_depth=self.max_depth,
            cost_curve=self._curve_for_batch(len(prompts)) or self._measure_curve, on_tokens=on_tokens,
            speculation_gate=template is None)  # dynamic trees: sized by timing already, and now gated by it
        try:
            return decode(session, prompts, draft, opts, started=t_start)
        except KVCacheOverflow as e:
            raise KVCacheOverflowError(str(e)) from None

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


def thread_candidates() -> list[int]:
    """Intra-op thread counts worth timing on this machine: one, half the cores (onnxruntime-genai's choice) and all."""
    cores = available_cores()
    return sorted({1, max(1, cores // 2), cores})


def calibrate_artifact(path: str | Path, *, candidates: Sequence[int] | None = None,
                       progress: Callable[[str], None] | None = None) -> MachineCalibration:
    """Measure, on this machine, the fastest intra-op thread count for the plain decoding step and the batch-1
    verification-cost curve at that count; record both in the artifact's manifest and the user cache.

    Candidates are timed one after another (one session in memory at a time, so a large model is never loaded
    twice), each as the best of three rounds of single-token steps."""
    manifest_path = Path(path) / "manifest.json"
    record = load_calibration(read_manifest(path))
    for threads in candidates or thread_candidates():
        if progress:
            progress(f"timing the decoding step with {threads} thread(s)")
        gen = OrtGenerator.load(path, threads=threads, verify=False)
        record.step_s[int(threads)] = min(gen.step_seconds() for _ in range(3))
        del gen
    record.threads = min(record.step_s, key=record.step_s.get)
    if progress:
        progress(f"measuring the verification-cost curve with {record.threads} thread(s)")
    gen = OrtGenerator.load(path, threads=record.threads, verify=False)
    gen.calibration = record
    gen.calibrate()  # fills record.curves[threads]
    manifest = read_manifest(path)
    save_calibration(record, manifest, manifest_path)
    return record


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


__all__ = ["GENERATION_KIND", "GenerationError", "KVCacheOverflowError", "OrtGenerationResult", "OrtGenerator",
           "calibrate_artifact", "default_threads", "run_prompt", "thread_candidates"]

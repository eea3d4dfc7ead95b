"""A compiled target/draft backend for the speculative-decoding runtime (``backends.ModelBackend`` protocol).

    spec = compile_specdec(model, skip_layers=[2, 3])        # export -> passes -> torch.fx
    gen = spec.generator(drafter="recycling+lookup")          # or drafter="layer-skip" (uses @draft)
    gen.generate(prompt, max_new_tokens=64).tokens

Flow: ``export_to_ir`` -> pipeline ``canonicalize,cse,kv-cache,tree-verify,dce`` (+ ``layer-skip-draft``) ->
``elision.ir.to_fx`` of ``@verify`` (and ``@draft``) -> :class:`CompiledBackend`, which owns a preallocated
KV buffer per layer ``[batch, kv_heads, capacity, head_dim]``. Each ``forward`` passes views of the first
``length`` slots as ``past_k_i/past_v_i`` plus the runtime's positions and additive bias, writes the returned
new K/V slices into slots ``length .. length + n`` and returns the logits. Compaction of an accepted tree path
(``select``) is one ``gather`` per buffer; rollback (``truncate``) only moves the length.

There are no Hugging Face objects on the hot path: no cache classes, no mask construction, no module
hooks, which is where the speed-up over ``HFCausalLMBackend`` comes from on CPU.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from elision.apps.specdec.attention_window import attention_window
from elision.apps.specdec.cache import CacheOverflowError
from elision.apps.specdec.drafters import CombinedDrafter, ModelDrafter, default_skip_layers
from elision.apps.specdec.generate import SpeculativeGenerator
from elision.apps.specdec.session import KVSession
from elision.frontend.trace import export_to_ir
from elision.ir.execute import to_fx
from elision.lowering.onnx_export import export_onnx
from elision.passes.manager import run_pipeline
from elision.passes.specdec import build_draft

DEFAULT_PIPELINE = "canonicalize,cse,kv-cache,tree-verify,dce"
CAPACITY_STEP = 256  # KV buffers are allocated in multiples of this many slots


class CompiledBackend:
    """``ModelBackend`` over a compiled ``@verify``-shaped function (``@verify`` or ``@draft``).

    ``fn(input_ids, positions, attn_bias, past_k_0, past_v_0, ...) -> (logits, [hidden,] k_0, v_0, ...)``
    (``outputs="new"``) or ``-> (logits, [hidden,] k_all_0, v_all_0, ...)`` (``outputs="present"``: the
    concatenated cache is adopted instead of copied into a preallocated buffer; kept for the measurement
    in ``tools/bench_specdec_compiled.py``).

    ``codegen="inductor"`` runs ``fn`` through ``torch.compile`` (inductor) with dynamic shapes: torch keeps
    sizes 0 and 1 static, so the prefill (empty cache), single-token and multi-token (tree) steps compile one
    graph each and every later step reuses them; ``"eager"`` calls ``fn`` as given.
    """

    def __init__(self, fn: Callable, *, vocab_size: int, num_layers: int, kv_layers: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, max_positions: int | None = None,
                 sliding_window: int | None = None, hidden: bool = False, outputs: str = "new",
                 codegen: str = "eager"):
        if outputs not in ("new", "present"):
            raise ValueError(f"outputs must be 'new' or 'present', got {outputs!r}")
        if codegen not in ("eager", "inductor"):
            raise ValueError(f"codegen must be 'eager' or 'inductor', got {codegen!r}")
        self.codegen = codegen
        self.fn = torch.compile(fn, backend="inductor", dynamic=True) if codegen == "inductor" else fn
        self.vocab_size = int(vocab_size)
        self.num_layers = int(num_layers)
        self.kv_layers = int(kv_layers)
        self.kv_heads = int(kv_heads)
        self.head_dim = int(head_dim)
        self.dtype = dtype
        self.max_positions = max_positions
        self.sliding_window = sliding_window
        self.hidden = hidden
        self.outputs = outputs
        self.last_hidden: torch.Tensor | None = None
        self.forward_calls = 0
        self._bufs: list[torch.Tensor] = []
        self._len = 0
        self._capacity = 0
        self.batch_size = 0

    # ------------------------------------------------------------------ protocol
    def reset(self, batch_size: int, capacity: int) -> None:
        self.batch_size, self._capacity, self._len = int(batch_size), int(capacity), 0
        if self.outputs == "new":
            # The buffers outlive a request: a later one of the same batch that fits reuses them, so nothing is
            # allocated per request and the compiled step sees the same strides (no recompilation per length).
            # Slots past the length are never read (the past views stop at it), so old contents need no clearing.
            held = self._bufs[0].shape if self._bufs else None
            if held is None or held[0] != self.batch_size or held[2] < self._capacity:
                slots = -(-self._capacity // CAPACITY_STEP) * CAPACITY_STEP
                shape = (self.batch_size, self.kv_heads, slots, self.head_dim)
                self._bufs = [torch.zeros(shape, dtype=self.dtype) for _ in range(2 * self.kv_layers)]
        else:
            shape = (self.batch_size, self.kv_heads, 0, self.head_dim)
            self._bufs = [torch.zeros(shape, dtype=self.dtype) for _ in range(2 * self.kv_layers)]

    @property
    def length(self) -> int:
        return self._len

    def _past(self) -> list[torch.Tensor]:
        if self.outputs == "new":
            return [b[:, :, : self._len] for b in self._bufs]
        return self._bufs

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if not self._bufs:
            raise RuntimeError("call reset(batch_size, capacity) before forward")
        n = tokens.shape[1]
        start, end = self._len, self._len + n
        if end > self._capacity:
            raise CacheOverflowError(f"KV cache overflow: {end} slots needed but the cache holds {self._capacity}; "
                                     "lower max_new_tokens or pass a larger max_cache_len")
        if tokens.shape[0] != self.batch_size or bias.shape[-1] != end:
            raise ValueError(f"forward got tokens {tuple(tokens.shape)} and bias {tuple(bias.shape)} but the cache "
                             f"holds {self.batch_size} sequences of {start} slots (bias must cover {end})")
        self.forward_calls += 1
        outs = self.fn(tokens, positions, bias.to(self.dtype), *self._past())
        logits = outs[0]
        kv = outs[2:] if self.hidden else outs[1:]
        self.last_hidden = outs[1] if self.hidden else None
        if self.outputs == "new":
            for buf, new in zip(self._bufs, kv):
                buf[:, :, start:end] = new
        else:
            self._bufs = list(kv)
        self._len = end
        return logits.float()

    @torch.inference_mode()  # the buffers may have been made under inference mode by an earlier request
    def select(self, index: torch.Tensor, start: int) -> None:
        """Slots [start, start + m) := slots ``index[b]`` of each sequence; length becomes start + m."""
        m = index.shape[1]
        new_bufs = []
        for buf in self._bufs:
            if m:
                idx = index[:, None, :, None].expand(buf.shape[0], buf.shape[1], m, buf.shape[3])
                picked = torch.gather(buf, 2, idx)  # gather first: source and destination may overlap
                if self.outputs == "new":
                    buf[:, :, start:start + m] = picked
                else:
                    buf = torch.cat([buf[:, :, :start], picked], 2)
            elif self.outputs == "present":
                buf = buf[:, :, :start]
            new_bufs.append(buf)
        self._bufs = new_bufs
        self._len = start + m

    def truncate(self, length: int) -> None:
        self._len = int(length)
        if self.outputs == "present":
            self._bufs = [b[:, :, :length] for b in self._bufs]


# ====================================================================================== compile flow
@dataclass
class CompiledSpecDec:
    """The compiled functions of one model and backends over them."""

    ir: object  # elision.ir.Module
    config: dict
    pipeline: str
    functions: dict[str, Callable] = field(default_factory=dict)

    @property
    def attrs(self) -> dict:
        return self.ir.attrs["specdec"]

    @property
    def skip_layers(self) -> list[int]:
        return list(self.attrs.get("skip_layers", []))

    def backend(self, fn: str = "verify", outputs: str = "new") -> CompiledBackend:
        return make_backend(self.ir, fn, self.config, outputs=outputs, callable_=self.functions.get(fn))

    def generator(self, drafter: str = "recycling+lookup", **kwargs):
        """A runtime ``SpeculativeGenerator`` over the compiled ``@verify``; ``drafter`` may name "layer-skip"."""
        draft = self.backend("draft") if "draft" in self.ir.functions else None
        return make_generator(self.backend("verify"), draft, drafter, **kwargs)


def model_config(model: torch.nn.Module) -> dict:
    """What the backend needs from a Hugging Face config (vocab, positions limit, sliding window)."""
    cfg = model.config
    return {
        "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
        "max_positions": getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None),
        "sliding_window": attention_window(cfg),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def make_backend(ir, fn: str, config: dict, outputs: str = "new", callable_: Callable | None = None,
                 codegen: str = "eager") -> CompiledBackend:
    if fn not in ir.functions:
        raise ValueError(f"the compiled module has no @{fn}; functions: {', '.join(ir.functions)}")
    a = ir.attrs["specdec"]
    kv_layers = len(a.get("draft_layers", [])) if fn == "draft" else a["num_layers"]
    hidden = bool(a.get("verify_hidden")) and any(o.name == "hidden" for o in ir.functions[fn].outputs)
    return CompiledBackend(callable_ or to_fx(ir, fn), vocab_size=config["vocab_size"], num_layers=kv_layers,
                           kv_layers=kv_layers, kv_heads=a["kv_heads"], head_dim=a["head_dim"],
                           dtype=getattr(torch, config.get("dtype", "float32")),
                           max_positions=config.get("max_positions"), sliding_window=config.get("sliding_window"),
                           hidden=hidden, outputs=outputs, codegen=codegen)


def make_generator(target: CompiledBackend, draft: CompiledBackend | None = None, drafter: str = "recycling+lookup",
                   **kwargs):
    """``SpeculativeGenerator`` over a compiled target; "layer-skip" in ``drafter`` uses the compiled draft.

    The runtime builds its layer-skip drafter from a Hugging Face model; with a compiled target the drafter
    is a ``ModelDrafter`` over the compiled ``@draft`` backend instead, registered under the same name.
    """
    names = [s.strip() for s in drafter.split("+")]
    rest = "+".join(n for n in names if n != "layer-skip") or "none"
    gen = SpeculativeGenerator(target, drafter=rest, **kwargs)
    if "layer-skip" in names:
        if draft is None:
            raise ValueError("drafter 'layer-skip' needs a compiled @draft: compile with skip_layers=[...] or 'auto'")
        skip = ModelDrafter(draft, "layer-skip")
        parts = [skip] if rest == "none" else [gen.drafter(rest), skip]
        gen._drafters[drafter] = parts[0] if len(parts) == 1 else CombinedDrafter(parts)
        gen.drafter_name = drafter
    return gen


def compiled_generator(model: torch.nn.Module, *, drafter: str = "recycling+lookup", codegen: str = "inductor",
                       warm_up: bool = True, **kwargs):
    """The torch route of speculative decoding: ``model``'s ``@verify`` compiled (``compile_specdec``, then inductor
    for ``codegen="inductor"``) under a ``SpeculativeGenerator`` (``kwargs``: its options, e.g. ``tokenizer``, ``tree``).

    What the user pays before the first token is kept in ``generator.compile_s``: ``export_s`` (export, passes,
    torch.fx) and ``warm_up_s`` (inductor compiling the step's shapes, and the cost curve measured, or read from the
    per-machine cache). ``warm_up=False`` leaves both to the first request.
    """
    t0 = time.perf_counter()
    spec = compile_specdec(model)
    target = make_backend(spec.ir, "verify", spec.config, callable_=spec.functions["verify"], codegen=codegen)
    gen = make_generator(target, None, drafter, source_model=model, route=f"compiled-{codegen}", **kwargs)
    gen.compile_s = {"export_s": time.perf_counter() - t0, "warm_up_s": 0.0}
    if warm_up:
        t0 = time.perf_counter()
        warm_up_generator(gen)
        gen.compile_s["warm_up_s"] = time.perf_counter() - t0
    return gen


@torch.inference_mode()
def warm_up_generator(gen, prompt_len: int = 8) -> None:
    """Run every step shape a request meets once on a throwaway session, so code generation happens now: the
    prefill (empty cache), a one-token step and a multi-token step (sizes 0 and 1 are the shapes dynamic-shape
    compilation keeps static; every other tree size and cache length reuses these graphs), then the
    verification-cost curve of batch 1 (measured over the compiled step, or read from the per-machine cache)."""
    session = KVSession(gen.backend, 1, prompt_len + 2 * gen.max_tree_size + 2)
    session.prefill([[0] * prompt_len])
    for chain in ([0], [0, 0, 0]):
        session.extend_chains([chain])
        session.rollback()
    if gen.tree_spec == "dynamic":
        gen.cost_curve(session)


def compile_specdec(model: torch.nn.Module, *, skip_layers: Sequence[int] | str | None = None, hidden: bool = False,
                    pipeline: str | None = None, example_len: int = 8, calibration_prompts: list[list[int]] | None = None,
                    trials: int = 8, search_new_tokens: int = 24, attention: str = "sdpa") -> CompiledSpecDec:
    """Export ``model`` (a Hugging Face causal LM) and compile ``@verify`` (+ ``@draft``) for the runtime.

    ``skip_layers``: None (no draft), a list of decoder layers to bypass in ``@draft``, or "auto": after
    ``@verify`` is compiled, :func:`search_skip_layers` measures ``trials`` candidate sets by tokens/s of real
    speculative generation (``search_new_tokens`` per calibration prompt) and ``layer-skip-draft`` runs with the
    winner; ``.pipeline`` then spells the concrete layers and ``.attrs["skip_search"]`` holds the measurements.
    ``attention="elision"`` appends ``fuse-attention``: every attention of ``@verify``/``@draft`` becomes
    ``elision.attention`` (the Triton kernel on CUDA, its torch reference on CPU). An explicit ``pipeline`` runs
    as given.
    """
    if attention not in ("sdpa", "elision"):
        raise ValueError(f"attention must be 'sdpa' or 'elision', got {attention!r}")
    if isinstance(skip_layers, str) and skip_layers != "auto":
        raise ValueError(f"skip_layers must be a list of decoder layers or 'auto', got {skip_layers!r}")
    model.eval()
    config = model_config(model)
    stages = [pipeline]
    if pipeline is None:
        window = config["sliding_window"] or 0
        stages = [f"canonicalize,cse,kv-cache{{window={window}}},tree-verify{{hidden={str(hidden).lower()}}},dce"
                  if window else f"canonicalize,cse,kv-cache,tree-verify{{hidden={str(hidden).lower()}}},dce"]
        rest = []
        if skip_layers is not None:
            rest.append(None if skip_layers == "auto" else _draft_stage(skip_layers))  # None: searched below
        if attention == "elision":
            rest.append("fuse-attention,dce")
        stages += rest
    ids = torch.randint(0, config["vocab_size"], (2, max(2, example_len)), generator=torch.Generator().manual_seed(0))
    ir = export_to_ir(model, (ids,), {0: {0: "batch", 1: "seq"}})
    ir.attrs["specdec_config"] = config
    if calibration_prompts is not None:
        ir.attrs["calibration_prompts"] = [list(map(int, p)) for p in calibration_prompts]
    report = None
    for i, stage in enumerate(stages):
        if stage is None:  # the layer-skip search runs on the compiled @verify, then the pass gets its choice
            skip, report = search_skip_layers(ir, trials=trials, new_tokens=search_new_tokens)
            stage = stages[i] = _draft_stage(skip)
        run_pipeline(ir, stage)
    if report is not None:
        ir.attrs["specdec"]["skip_search"] = report
    fns = {name: to_fx(ir, name) for name in ("verify", "draft") if name in ir.functions}
    return CompiledSpecDec(ir, config, ",".join(stages), fns)


def _draft_stage(skip_layers: Sequence[int]) -> str:
    return f"layer-skip-draft{{layers={','.join(str(int(i)) for i in skip_layers)}}},dce"


# ====================================================================================== layer-skip search
def _calibration_prompts(ir, target: CompiledBackend, seed: int) -> list[list[int]]:
    prompts = ir.attrs.get("calibration_prompts")
    if prompts:
        return [list(map(int, p)) for p in prompts]
    rng = random.Random(seed)
    vocab = target.vocab_size
    return [[rng.randrange(vocab) for _ in range(12)] for _ in range(2)]


def _tokens_per_s(gen, prompts: list[list[int]], new_tokens: int, repeats: int = 2) -> tuple[float, float, list]:
    """Median tokens/s over ``repeats`` runs of greedy generation of every prompt; also mean accepted length."""
    rates, accepted, outputs = [], [], []
    for _ in range(repeats):
        n_tok, t_total, outs = 0, 0.0, []
        for p in prompts:
            res = gen.generate([p], max_new_tokens=new_tokens)
            t = res.stats["time_s"]["total"] - res.stats["time_s"]["cost_curve_s"]
            n_tok += res.stats["new_tokens"]
            t_total += t
            accepted.append(res.stats["mean_accepted_length"])
            outs.append(res.tokens[0])
        rates.append(n_tok / t_total)
        outputs = outs
    return statistics.median(rates), statistics.mean(accepted), outputs


def candidate_skip_sets(num_layers: int, trials: int, seed: int) -> list[list[int]]:
    """SWIFT-like candidates: evenly spread sets at several skip ratios, then random sets (first layer kept)."""
    middle = list(range(1, num_layers - 1)) or list(range(1, num_layers))
    out: list[list[int]] = []
    for ratio in (0.25, 0.4, 0.55):
        s = sorted(default_skip_layers(num_layers, ratio)) if num_layers > 2 else []
        if s and s not in out:
            out.append(s)
    rng = random.Random(seed)
    for i in middle:
        if len(out) >= trials:
            break
        if [i] not in out:
            out.append([i])
    attempts = 0
    while len(out) < trials and attempts < 100 and middle:
        attempts += 1
        k = rng.randint(1, max(1, len(middle) - 1))
        s = sorted(rng.sample(middle, k))
        if s not in out:
            out.append(s)
    return out[:trials]


def search_skip_layers(ir, *, trials: int = 8, new_tokens: int = 24, seed: int = 0) -> tuple[list[int], dict]:
    """Pick the layer-skip set whose self-speculative generation has the highest measured tokens/s.

    Runs real greedy generation with the compiled ``@verify`` as target and a compiled ``@draft`` per candidate
    (the layer-skip drafter only), on the calibration prompts; the baseline is target-only decoding. Returns the
    best set and a JSON report of every trial (tokens/s, mean accepted length).
    """
    a = ir.attrs["specdec"]
    config = ir.attrs.get("specdec_config") or {}
    if "vocab_size" not in config:
        vocab = ir.functions["verify"].outputs[0].type.shape[-1]
        config = {"vocab_size": int(vocab), "max_positions": None, "sliding_window": None, "dtype": "float32"}
    target = make_backend(ir, "verify", config)
    prompts = _calibration_prompts(ir, target, seed)
    base_gen = make_generator(target, None, "none", tree="static:chain-1")
    base_rate, _, base_out = _tokens_per_s(base_gen, prompts, new_tokens)
    report = {"baseline_tokens_per_s": base_rate, "prompts": len(prompts), "new_tokens": new_tokens, "trials": []}
    best, best_rate = None, -1.0
    num_layers = a["num_layers"]
    existing = ir.functions.get("draft")
    for skip in candidate_skip_sets(num_layers, trials, seed):
        fn = build_draft(ir, skip)
        ir.add_function(fn)
        saved = dict(a)
        try:
            a["draft_layers"] = [i for i in range(num_layers) if i not in skip]
            draft = make_backend(ir, "draft", config, callable_=to_fx(ir, "draft"))
        finally:  # leave the module as it was (a previous @draft included)
            if existing is not None:
                ir.functions["draft"] = existing
            else:
                del ir.functions["draft"]
            a.clear()
            a.update(saved)
        gen = make_generator(target, draft, "layer-skip")
        rate, acc, out = _tokens_per_s(gen, prompts, new_tokens)
        if out != base_out:  # lossless by construction; a mismatch would be a bug worth failing loudly on
            raise RuntimeError(f"layer-skip search: speculative output with skip set {skip} differs from greedy")
        report["trials"].append({"skip": skip, "tokens_per_s": rate, "mean_accepted_length": acc,
                                 "speedup": rate / base_rate})
        if rate > best_rate:
            best, best_rate = skip, rate
    if best is None:
        raise RuntimeError(f"layer-skip search found no candidate skip set for a {num_layers}-layer model")
    report["chosen"] = best
    return best, report


# ====================================================================================== ONNX
class SpecDecOnnxFunction(torch.nn.Module):
    """``fn`` with the step signature torch.export needs: named inputs, then the past K/V as ``*past`` (exported as
    inputs ``past_0``, ``past_1``, ...; ``to_dynamic_shapes`` gives the variadic inputs their dims by position).

    The bias is sliced to ``past + n`` columns so torch.export sees the bias length as ``past + n`` instead of
    a third free symbol (the ONNX exporter's dynamic dims cannot relate two symbols); the slice is a no-op.
    """

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, input_ids, positions, attn_bias, *past):
        total = past[0].shape[2] + input_ids.shape[1]
        return self.fn(input_ids, positions, attn_bias[..., :total], *past)


def specdec_onnx_entry(spec: CompiledSpecDec, name: str) -> tuple[torch.nn.Module, tuple, dict, list[str]]:
    """What `torch.onnx` exports for function `name` of `spec`: (module, example inputs, dynamic dims, output names).

    Inputs keep the IR's names; dims ``batch``, ``n``, ``past`` are dynamic.
    """
    a = spec.attrs
    fn = spec.ir.functions[name]
    n_past = len(fn.inputs) - 3
    b, n, past = 2, 3, 4
    ids = torch.zeros((b, n), dtype=torch.long)
    pos = (past + torch.arange(n))[None].expand(b, n).contiguous()
    bias = torch.zeros((b, 1, n, past + n), dtype=getattr(torch, spec.config.get("dtype", "float32")))
    kv = [torch.zeros((b, a["kv_heads"], past, a["head_dim"]), dtype=bias.dtype) for _ in range(n_past)]
    dyn = {0: {0: "batch", 1: "n"}, 1: {0: "batch", 1: "n"}, 2: {0: "batch", 2: "n", 3: "kv"}}
    dyn.update({3 + i: {0: "batch", 2: "past"} for i in range(n_past)})
    gm = spec.functions.get(name)
    if gm is None:
        gm = to_fx(spec.ir, name)
    return SpecDecOnnxFunction(gm), (ids, pos, bias, *kv), dyn, ["logits"] + [o.name for o in fn.outputs[1:]]


def export_specdec_onnx(spec: CompiledSpecDec, out_dir, functions: Sequence[str] = ("verify", "draft"),
                        progress: Callable[[str], None] | None = None, settings: dict | None = None,
                        extra_files: dict | None = None, device: str | None = None):
    """Write ``@verify`` (and ``@draft``) as an ONNX artifact (``elision.lowering.onnx_export``).

    Returns the artifact directory; load it with ``elision.runtime.artifact.load_artifact`` and run ``verify`` with
    positions/bias/past as numpy. ``settings`` are merged into the manifest's runtime_settings; ``extra_files``
    (name -> path) are copied in and hashed (see ``elision.apps.specdec.artifact`` for the generation artifact);
    ``device`` orders the manifest's execution providers (``elision.runtime.precision.target_providers``).
    """
    entries, out_names = {}, {}
    for name in functions:
        if name not in spec.ir.functions:
            continue
        module, inputs, dyn, names = specdec_onnx_entry(spec, name)
        entries[name] = (module, inputs, dyn)
        out_names[name] = names
    return export_onnx(entries, out_dir, pipeline=spec.pipeline, source_hash=str(spec.ir.attrs.get("source_model", "")),
                       runtime_settings={"specdec": spec.attrs, "config": spec.config, **(settings or {})},
                       output_names=out_names, progress=progress, extra_files=extra_files,
                       dtype=str(spec.config.get("dtype", "float32")), device=device)


__all__ = ["export_specdec_onnx", "specdec_onnx_entry", "CompiledBackend", "CompiledSpecDec", "compile_specdec",
           "compiled_generator", "make_backend", "make_generator", "model_config", "warm_up_generator", "search_skip_layers", "candidate_skip_sets", "DEFAULT_PIPELINE"]

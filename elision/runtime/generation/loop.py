"""The draft -> verify -> accept -> commit loop, written once for every backend (a `TreeSession`).

    outcome = decode(session, prompts, drafter, DecodeOptions(max_new_tokens=64, ...))
    outcome.outputs, outcome.stats

Per step: the drafter proposes a tree per active sequence (a static template, or a dynamic best-first tree sized
from the verification-cost curve) -> one `session.extend` over all trees -> greedy verification, or lossless
rejection sampling -> stop handling (EOS, length, stop strings) -> the drafter observes the verified logits ->
`session.commit` keeps the root and the accepted nodes. The torch loop (`elision.apps.specdec.generate`, over a
`KVSession`) and the onnxruntime loop (`elision.runtime.generation.ort_generator`, over an ONNX Runtime session)
both call `decode`; they differ only in the session and in how logits rows become numpy (`to_numpy`).

Time is split into phases in the stats (`time_s`): prefill, cost_curve (a curve measured during this call),
draft, verify (the model forward), accept (verification, bookkeeping, drafter feedback, cache commit) and loop
(everything else after the session was created: the loop's own overhead). tokens/s counts all of them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from elision.runtime.generation.bookkeeping import append_tokens, generation_stats
from elision.runtime.generation.drafters import Drafter
from elision.runtime.generation.sampling import ProcessedRows, SamplingConfig, Uniform, sample_token, target_probs, verify_sampling
from elision.runtime.generation.session import TreeSession
from elision.runtime.generation.tree import TokenTree
from elision.runtime.generation.tree_builders import StaticTemplate, VerifyCostCurve, build_dynamic, build_static, choose_tree_size
from elision.runtime.generation.verify import verify_greedy

__all__ = ["DecodeOptions", "DecodeOutcome", "decode"]


@dataclass
class DecodeOptions:
    max_new_tokens: int
    eos: set[int] = field(default_factory=set)
    stops: Sequence[str] = ()
    tokenizer: Any = None  # needs `decode(ids)` when there are stop strings
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    uniform: Uniform | None = None  # the random source when sampling
    template: StaticTemplate | None = None  # None: dynamic trees sized by the cost curve
    tree_name: str = "dynamic"
    max_tree_size: int = 32
    max_depth: int = 16
    # the cost curve for dynamic trees: given, or measured on the live session after prefill (timed as cost_curve)
    cost_curve: VerifyCostCurve | Callable[[TreeSession], VerifyCostCurve] | None = None
    to_numpy: Callable[[Any], np.ndarray] = np.asarray  # one logits row -> numpy (torch: off the device)
    on_tokens: Callable[[int, list[int]], None] | None = None  # sequence b accepted these tokens (streaming)
    on_step: Callable[[int, TokenTree, list[int], int], None] | None = None  # (b, tree, accepted path, bonus)


@dataclass
class DecodeOutcome:
    outputs: list[list[int]]
    stats: dict


def _first_tokens(logits, prompts, opts: DecodeOptions) -> list[int]:
    rows = [logits[b, len(p) - 1] for b, p in enumerate(prompts)]
    if not opts.sampling.do_sample:
        return [int(r.argmax()) for r in rows]
    return [sample_token(target_probs(opts.to_numpy(r), opts.sampling), opts.uniform) for r in rows]


def _trees(draft: Drafter, contexts, active, max_depth, opts: DecodeOptions, curve) -> list[TokenTree | None]:
    trees: list[TokenTree | None] = []
    # one live tree is sized while it is built (the nodes the size choice would cut are never drafted); a batch's
    # trees share one size, chosen once they are all built
    alone = curve if sum(active) == 1 else None
    for b, ctx in enumerate(contexts):
        if not active[b]:
            trees.append(None)
        elif opts.template is not None:
            trees.append(build_static(draft, b, ctx, opts.template, max_depth[b]))
        else:
            trees.append(build_dynamic(draft, b, ctx, opts.max_tree_size, max_depth[b], alone))
    if alone is None and curve is not None and any(t is not None and len(t) > 1 for t in trees):
        n = choose_tree_size(trees, curve, opts.max_tree_size)
        trees = [t.truncate(n) if t is not None else None for t in trees]
    return trees


def decode(session: TreeSession, prompts: list[list[int]], draft: Drafter, opts: DecodeOptions,
           started: float | None = None) -> DecodeOutcome:
    """Generate up to `opts.max_new_tokens` tokens for every prompt (a fresh `session` sized for them).

    `started` (a `time.perf_counter()` reading) is when the caller's work for this request began, so checking
    the request and creating the session count too; default: now.
    """
    t_start = time.perf_counter() if started is None else started
    timing = dict(prefill_s=0.0, cost_curve_s=0.0, draft_s=0.0, verify_s=0.0, accept_s=0.0)
    n_seq = len(prompts)
    clock = time.perf_counter

    t0 = clock()
    logits = session.prefill(prompts)
    first = _first_tokens(logits, prompts, opts)
    timing["prefill_s"] = clock() - t0
    outputs: list[list[int]] = [[] for _ in range(n_seq)]
    contexts = [list(p) for p in prompts]
    active = [True] * n_seq
    for b in range(n_seq):
        append_tokens(b, [first[b]], outputs, contexts, active, opts.eos, opts.stops, opts.max_new_tokens, opts.tokenizer)
        if opts.on_tokens is not None:
            opts.on_tokens(b, list(outputs[b]))

    t0 = clock()
    draft.reset(contexts, logits)
    timing["draft_s"] += clock() - t0
    del logits
    curve = opts.cost_curve
    if opts.template is not None or not any(active):
        curve = None
    elif callable(curve):
        t0 = clock()
        curve = curve(session)
        timing["cost_curve_s"] = clock() - t0

    steps = 0
    accepted: list[list[int]] = [[] for _ in range(n_seq)]
    tree_sizes: list[int] = []
    greedy = not opts.sampling.do_sample
    while any(active):
        t0 = clock()
        max_depth = [min(opts.max_depth, opts.max_new_tokens - len(o) - 1) if a else 0 for o, a in zip(outputs, active)]
        draft.prepare(contexts, active, max_depth)
        trees = _trees(draft, contexts, active, max_depth, opts, curve)
        t1 = clock()
        logits = session.extend(trees)
        t2 = clock()
        steps += 1
        keep: list[list[int]] = [[] for _ in range(n_seq)]
        argmax = logits.argmax(-1).tolist() if greedy else None
        for b, t in enumerate(trees):
            if t is None:
                continue
            n = len(t)
            tree_sizes.append(n)
            if greedy:
                path, bonus = verify_greedy(t, argmax[b])
            else:
                rows = ProcessedRows(lambda i, b=b: opts.to_numpy(logits[b, i]), opts.sampling)
                path, bonus = verify_sampling(t, rows, opts.uniform)
            keep[b] = path
            before = len(outputs[b])
            append_tokens(b, [t.tokens[i] for i in path[1:]] + [bonus], outputs, contexts, active, opts.eos,
                          opts.stops, opts.max_new_tokens, opts.tokenizer)
            accepted[b].append(len(outputs[b]) - before)
            draft.observe(b, t, logits[b, :n], path, contexts[b])
            if opts.on_step is not None:
                opts.on_step(b, t, path, bonus)
            if opts.on_tokens is not None:
                opts.on_tokens(b, outputs[b][before:])
        session.commit(keep)
        t3 = clock()
        timing["draft_s"] += t1 - t0
        timing["verify_s"] += t2 - t1
        timing["accept_s"] += t3 - t2

    stats = generation_stats(outputs=outputs, accepted_lengths=accepted, tree_sizes=tree_sizes, steps=steps,
                             total_s=clock() - t_start, timing=timing, draft_forward_passes=draft.draft_forward_passes,
                             drafter=draft.name, tree=opts.tree_name)
    return DecodeOutcome(outputs, stats)

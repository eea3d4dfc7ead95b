"""Fidelity-constrained search over token pruning, token merging and layer skipping.

Where to prune differs per model (on all-MiniLM-L6-v2 [CLS]-attention pruning right after layer 0 is worse
than random, after layer 2 it is best), so nothing is hard-coded: the tuner evaluates candidates with the
fidelity harness on calibration inputs, measures the latency of those that meet the floor, and returns the
fastest one plus every evaluated point (for the speed-fidelity Pareto plot).

Search space (each stage is cheap and the next one builds on the best of the previous):
  prune-tokens  layer x keep ratio x score method (cls-attn / key-norm; last-token-attn without [CLS])
  merge-tokens  r per layer x start layer (ToMe)
  skip-layers   attention and MLP branches of layers 1..L-2 ranked by block influence (1 - cos of the
                residual stream across the branch), then greedily added in that order while measured
                fidelity stays above the floor; combined with the best token reduction found.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from elision.apps.tokens.deployed import deployable
from elision.apps.tokens.executor import (IDENTITY, EncoderAdapter, ReductionPlan, _attention, reference_output,
                                          run_encoder)
from elision.apps.tokens.fidelity import FidelityReport, compare_outputs
from elision.kernels import token_reduction as alg

SEARCHABLE_PASSES = ("prune-tokens", "merge-tokens", "skip-layers", "compress-tokens")


@dataclass
class Candidate:
    plan: ReductionPlan
    method: str
    report: FidelityReport
    latency_s: float | None = None
    speedup: float | None = None
    est_speedup: float = 1.0  # 1 / estimated relative FLOPs


@dataclass
class TuneResult:
    reference_latency_s: float  # the bar candidates must beat: min(plain model, executor with nothing applied)
    candidates: list[Candidate] = field(default_factory=list)
    best: Candidate | None = None
    plain_latency_s: float | None = None     # the model's own forward
    executor_latency_s: float | None = None  # layer-by-layer executor, nothing applied
    measured_in: str = "executor"             # or "deployed": timings of lowered artifacts (`deployed` timer)

    def feasible(self, min_fidelity: float) -> list[Candidate]:
        return [c for c in self.candidates if c.report.fidelity >= min_fidelity]

    def pareto(self) -> list[Candidate]:
        timed = [c for c in self.candidates if c.speedup is not None]
        timed.sort(key=lambda c: (-c.report.fidelity, -c.speedup))
        front, best_speed = [], 0.0
        for c in timed:
            if c.speedup > best_speed:
                front.append(c)
                best_speed = c.speedup
        return front


def block_influence_ranking(adapter: EncoderAdapter, inputs: tuple, allow_edge_skips: bool = False
                            ) -> list[tuple[str, int, float]]:
    """Rank attention/MLP branches by block influence (low = cheap to remove). Returns (kind, layer, BI)."""
    out = []
    with torch.no_grad():
        st = adapter.embed(*inputs)
        valid = st.size > 0
        h = st.hidden
        for i in range(adapter.num_layers):
            q, k, v = adapter.qkv(i, h)
            h_attn = adapter.attn_residual(i, h, _attention(q, k, v, st.size))
            h_mlp = adapter.mlp_residual(i, h_attn, False)
            if allow_edge_skips or 0 < i < adapter.num_layers - 1:
                out.append(("attn", i, float(alg.block_influence(h, h_attn, valid))))
                out.append(("mlp", i, float(alg.block_influence(h_attn, h_mlp, valid))))
            h = h_mlp
    return sorted(out, key=lambda t: t[2])


def estimated_cost(adapter: EncoderAdapter, plan: ReductionPlan, seq_len: int, num_protected: int) -> float:
    """Relative FLOPs of `plan` (1.0 = unchanged) from static token counts per layer; used to rank
    candidates before timing the most promising ones (timing every candidate would dominate the search)."""

    c = 1.0
    attn_w, mlp_w = 4.0, 8.0  # per-token matmul cost of attention projections vs a 4x MLP (units of C^2)
    n, total, full = seq_len, 0.0, 0.0
    stages = plan.prune_stages()
    for i in range(adapter.num_layers):
        full += seq_len * (attn_w + mlp_w) + 2 * seq_len * seq_len / 64
        attn = 0.0 if i in plan.skip_attn else n * attn_w + 2 * n * n / 64
        if plan.merge_r and i >= plan.merge_start:
            n = max(n - plan.merge_r, 1)
        mlp = 0.0 if i in plan.skip_mlp else n * mlp_w
        total += attn + mlp
        if i in stages:
            n = alg.pruned_length(n, stages[i], num_protected)
        if plan.dct_after == i and plan.dct_keep < 1.0 and adapter.grid is not None:
            h, w = alg.dct_grid_size(*adapter.grid, plan.dct_keep)
            n = h * w + 1
    return total / full * c


def _skip_plan(base: ReductionPlan, branches: list[tuple[str, int]]) -> ReductionPlan:
    return base.with_(skip_attn=frozenset(i for kind, i in branches if kind == "attn"),
                      skip_mlp=frozenset(i for kind, i in branches if kind == "mlp"))


def plan_report(adapter: EncoderAdapter, calib: tuple, ref: torch.Tensor, kind: str, labels: torch.Tensor | None,
                plan: ReductionPlan) -> FidelityReport | None:
    """Fidelity of `plan` against the unchanged output `ref`, or None when the plan does not apply to this model."""
    try:
        out = run_encoder(adapter, calib, plan)
    except alg.PruningError:
        return None
    return compare_outputs(ref, out, kind, labels)


def plan_latencies(adapter: EncoderAdapter, calib: tuple, plans: list[ReductionPlan], repeats: int) -> list[float]:
    """Median latencies, measured together in interleaved rounds: [plain model, executor unchanged, *plans]."""
    fns = [lambda: reference_output(adapter.m, adapter, calib), lambda: run_encoder(adapter, calib, IDENTITY)]
    fns += [(lambda plan=plan: run_encoder(adapter, calib, plan)) for plan in plans]
    return interleaved_latencies(fns, repeats=repeats)


class Evaluator(Protocol):
    """Computes candidate fidelities and executor timings for `tune`."""

    def reports(self, plans: list[ReductionPlan], done: Callable[[int], None] | None = None
                ) -> list[FidelityReport | None]: ...

    def latencies(self, plans: list[ReductionPlan], repeats: int) -> list[float]: ...


class LocalEvaluator:
    """Evaluates candidates in this process, one after another (`elision tune --ray` passes
    `ray_search.RayEvaluator` instead: the same functions, run as Ray tasks)."""

    def __init__(self, adapter: EncoderAdapter, calib: tuple, kind: str, labels: torch.Tensor | None):
        self.adapter, self.calib, self.kind, self.labels = adapter, calib, kind, labels
        self.ref = run_encoder(adapter, calib, IDENTITY)

    def reports(self, plans: list[ReductionPlan], done: Callable[[int], None] | None = None
                ) -> list[FidelityReport | None]:
        """`plan_report` of each plan, in order; `done(i)` after plan i (progress)."""
        out = []
        for i, plan in enumerate(plans):
            out.append(plan_report(self.adapter, self.calib, self.ref, self.kind, self.labels, plan))
            if done:
                done(i)
        return out

    def latencies(self, plans: list[ReductionPlan], repeats: int) -> list[float]:
        return plan_latencies(self.adapter, self.calib, plans, repeats)


def tune(adapter: EncoderAdapter, calib: tuple, kind: str, passes: tuple[str, ...] = ("prune-tokens", "skip-layers"),
         min_fidelity: float = 0.98, labels: torch.Tensor | None = None, repeats: int = 5,
         keeps: tuple[float, ...] = (0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.15, 0.1),
         merge_rs: tuple[int, ...] = (1, 2, 4, 8, 16), score_methods: tuple[str, ...] | None = None,
         time_top: int = 6, progress: Callable[[str, int, int], None] | None = None,
         min_speedup: float = 1.0,
         deployed: Callable[[ReductionPlan], Callable[[], object]] | None = None,
         evaluator: Evaluator | None = None) -> TuneResult:
    """Search plans over `passes` on calibration inputs `calib`; fastest measured plan with fidelity >= floor.

    Every candidate's fidelity is measured on `calib`; candidates are ranked by their static FLOPs estimate
    and the `time_top` cheapest feasible ones (plus the unchanged model) are timed; the fastest wins if it beats
    the unchanged model by more than `min_speedup`, otherwise `best` is None (apply nothing).

    `evaluator` computes fidelities and executor timings (default: `LocalEvaluator`, in this process). Candidates
    of one stage go to it together, so an evaluator that runs them in parallel (`ray_search.RayEvaluator`) makes
    the same choice: the reports are the same numbers in the same order.
    """
    unknown = [p for p in passes if p not in SEARCHABLE_PASSES]
    if unknown:
        raise alg.PruningError(f"cannot tune {', '.join(unknown)}; searchable passes: {', '.join(SEARCHABLE_PASSES)}")
    if not 0.0 < min_fidelity <= 1.0:
        raise alg.PruningError(f"--min-fidelity {min_fidelity} must be in (0, 1]")
    n = adapter.num_layers
    seq_len = calib[0].shape[1] if calib[0].dim() == 2 else 1 + adapter.grid[0] * adapter.grid[1]
    num_protected = int(adapter.embed(*[t[:1] for t in calib]).protected.sum())
    evaluator = evaluator or LocalEvaluator(adapter, calib, kind, labels)
    result = TuneResult(0.0)
    if score_methods is None:
        score_methods = ("cls-attn", "key-norm")
    seen: set[ReductionPlan] = set()

    plans: list[tuple[str, ReductionPlan]] = []
    if "prune-tokens" in passes:
        for score in score_methods:
            for after in range(n - 1):
                for keep in keeps:
                    plans.append(("prune-tokens/" + score, ReductionPlan(prune_after=after, keep=keep, score=score)))
    if "merge-tokens" in passes:
        for start in range(0, max(1, n // 2)):
            for r in merge_rs:
                plans.append(("merge-tokens", ReductionPlan(merge_r=r, merge_start=start)))
    if "compress-tokens" in passes and adapter.grid is not None:
        for after in range(n - 1):
            for keep in keeps:
                plans.append(("compress-tokens", ReductionPlan(dct_after=after, dct_keep=keep)))
    skip_stage = "skip-layers" in passes
    total = len(plans) + (2 * (n - 2) + 2 * n * 2 if "prune-tokens" in passes else 0) + (4 * (n - 2) if skip_stage else 0)
    step = 0

    def evaluate_all(items: list[tuple[str, ReductionPlan]]) -> list[Candidate | None]:
        """Candidates of (method, plan) items that do not depend on each other, in order (None: seen before or
        not applicable)."""
        nonlocal step
        fresh = []  # indices into items
        for i, (_method, plan) in enumerate(items):
            if plan not in seen:
                seen.add(plan)
                fresh.append(i)
        step += len(items) - len(fresh)

        def done(j: int) -> None:
            nonlocal step
            step += 1
            if progress:
                progress(items[fresh[j]][1].describe(), step, max(total, step))

        reports = evaluator.reports([items[i][1] for i in fresh], done)
        out: list[Candidate | None] = [None] * len(items)
        for i, report in zip(fresh, reports):
            if report is not None:
                method, plan = items[i]
                cand = out[i] = Candidate(plan, method, report)
                cand.est_speedup = 1.0 / estimated_cost(adapter, plan, seq_len, num_protected)
                result.candidates.append(cand)
        return out

    def evaluate(method: str, plan: ReductionPlan) -> Candidate | None:
        return evaluate_all([(method, plan)])[0]

    def feasible() -> list[Candidate]:
        return [c for c in result.candidates if c.report.fidelity >= min_fidelity]

    def cheapest() -> Candidate | None:
        return max(feasible(), key=lambda c: c.est_speedup, default=None)

    evaluate_all(plans)
    # Progressive pruning: extend the cheapest feasible single-stage plan with a later stage, twice.
    if "prune-tokens" in passes:
        for _round in range(2):
            base = max((c for c in feasible() if c.plan.prune_stages()), key=lambda c: c.est_speedup, default=None)
            if base is None:
                break
            last = max(base.plan.prune_stages())
            extended = []
            for after in range(last + 1, n - 1):
                for keep in (0.75, 0.5):
                    extra = tuple(sorted({**dict(base.plan.extra_stages), after: keep}.items()))
                    extended.append(("prune-tokens/progressive", base.plan.with_(extra_stages=extra)))
            evaluate_all(extended)
    if skip_stage:
        ranking = block_influence_ranking(adapter, calib)
        token_base = cheapest()
        bases = [IDENTITY] + ([token_base.plan] if token_base is not None else [])
        for b in bases:
            chosen: list[tuple[str, int]] = []
            for kind_, layer, _bi in ranking:
                c = evaluate("skip-layers" if b is IDENTITY else "combined", _skip_plan(b, chosen + [(kind_, layer)]))
                if c is not None and c.report.fidelity >= min_fidelity:
                    chosen.append((kind_, layer))
    # Time the most promising feasible candidates against the unchanged model. The bar is the faster of the
    # plain model's own forward and the layer-by-layer executor with nothing applied: candidates run through
    # the executor, so comparing them only with the executor would hide any overhead the executor adds over
    # the model users actually have. Rounds are interleaved so that load from other processes on a shared
    # machine hits the baseline and every candidate alike (timing them one after the other let a quiet
    # moment for the baseline make every candidate look slower than it is).
    #
    # With `deployed` (e.g. `deployed.OnnxTimer.runner`) candidates are timed in the form users ship instead: the
    # IR rewrite lowered to an artifact, against the unmodified model lowered the same way; only plans every part
    # of which has an IR pass can be deployed, so only those are finalists.
    pool = [c for c in feasible() if deployed is None or deployable(c.plan, adapter)]
    finalists = sorted(pool, key=lambda c: -c.est_speedup)[:time_top]
    if progress:
        progress(f"timing {len(finalists)} finalists against the unchanged model", step, max(total, step))
    if deployed is None:
        lat = evaluator.latencies([c.plan for c in finalists], repeats)  # all in one process: comparable
        result.plain_latency_s, result.executor_latency_s = lat[0], lat[1]
        result.reference_latency_s, cand_lat = min(lat[0], lat[1]), lat[2:]
    else:
        lat = interleaved_latencies([deployed(IDENTITY)] + [deployed(c.plan) for c in finalists], repeats=repeats)
        result.measured_in = "deployed"
        result.reference_latency_s, cand_lat = lat[0], lat[1:]
    for c, t in zip(finalists, cand_lat):
        c.latency_s = t
        c.speedup = result.reference_latency_s / t
    result.best = choose_best(finalists, min_speedup)
    return result


def interleaved_latencies(fns: list[Callable[[], object]], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Median wall time of each fn, measured in rounds that run every fn once (rotating the start)."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns:
                fn()
        for r in range(max(1, repeats)):
            for j in range(len(fns)):
                i = (j + r) % len(fns)
                t0 = time.perf_counter()
                fns[i]()
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def choose_best(timed: list[Candidate], min_speedup: float = 1.0) -> Candidate | None:
    """The fastest timed candidate, or None when none is measurably faster than the unchanged model: a
    pipeline that costs fidelity and does not buy speed is worse than applying nothing."""
    faster = [c for c in timed if c.speedup is not None and c.speedup > min_speedup]
    return max(faster, key=lambda c: c.speedup, default=None)


def pareto_plot(result: TuneResult, path: str, title: str, min_fidelity: float | None = None,
                fidelity_label: str = "fidelity") -> None:
    """Speed-fidelity scatter of every timed candidate, the Pareto frontier and the chosen plan (PNG)."""
    import matplotlib  # only plots need it (pyplot costs a noticeable part of a second to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({c.method for c in result.candidates})
    for m in methods:
        pts = [c for c in result.candidates if c.method == m]
        ax.scatter([c.report.fidelity for c in pts], [c.est_speedup for c in pts], label=f"{m} (FLOPs est.)",
                   s=14, alpha=0.5)
    timed = [c for c in result.candidates if c.speedup is not None]
    ax.scatter([c.report.fidelity for c in timed], [c.speedup for c in timed], marker="x", c="k", s=30,
               label="measured")
    front = result.pareto()
    if front:
        ax.plot([c.report.fidelity for c in front], [c.speedup for c in front], "k--", lw=1, label="Pareto frontier")
    if result.best is not None:
        ax.scatter([result.best.report.fidelity], [result.best.speedup], marker="*", s=200, c="red",
                   label="chosen", zorder=5)
    if min_fidelity is not None:
        ax.axvline(min_fidelity, color="grey", lw=0.8, ls=":")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel(fidelity_label)
    ax.set_ylabel("speed-up vs unpruned (x = measured, dots = FLOPs estimate)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

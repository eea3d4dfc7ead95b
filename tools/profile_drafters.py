"""Profile of the model-free drafters and tree builders per decoding step, on real generation.

1. Record: `OrtGenerator` (the ONNX Runtime loop of `elision run`) generates from `builtin:tiny-code-lm` on held-out
   code prompts and English prose for every drafter and tree; what the loop hands the drafter is recorded (prompt and
   prefill logits, then per step the depth limit, the verified tree, its logits, the accepted path and the new
   context), with the loop's own per-step times (its verify step is the yardstick).
2. Replay: the recorded steps are driven again through each implementation, interleaved over repeats, timing every
   phase the loop pays per step: `draft` (prepare + tree building), `size` (choose_tree_size + truncate; dynamic
   trees), `mask` (TokenTree.ancestor_mask), `verify` (greedy walk of the tree; the argmax itself is the loop's),
   `observe` (online learning: acceptance stats, recycling matrix, lookup index). Implementations:
     * `reference`: the drafters as they were before issue 13 (tests/runtime/drafting_reference.py);
     * `live`: elision.runtime.generation, called exactly as the loop calls it today;
     * `live-sized`: the same, with `build_dynamic(..., curve=...)` building only the nodes the cost curve can pick
       (identical trees; dynamic trees only).
   Every replayed tree must equal the recorded one (token for token, parents, scores, keys), so the timings are
   of identical work. Phases are timed with the wall clock and scaled by the share of the replay's wall time the
   process was on a CPU (its process time / wall time), so waiting for a core on a shared machine does not count.

Writes bench_results/profile_drafters.md. The machine is shared: compare the ratios, not the absolute times.

    .venv/bin/python tools/profile_drafters.py [--prompts 3] [--new-tokens 128] [--repeats 5] [--threads 2]
        [--drafters lookup,copy,recycling,recycling+lookup] [--trees dynamic,static:4x2x1] [--artifact DIR]
        [--cprofile live]
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "runtime"))  # the frozen reference implementation lives beside its tests

PHASES = ("draft", "size", "mask", "verify", "observe")


@dataclass
class Step:
    depth: int
    tokens: list[int]
    parents: list[int]
    scores: list[float]
    keys: list
    logits: np.ndarray
    argmax: list[int]
    path: list[int]
    new: list[int]  # tokens appended to the context by this step


@dataclass
class PromptTrace:
    context: list[int]  # prompt + first generated token, as `reset` saw it
    prefill_logits: np.ndarray
    steps: list[Step] = field(default_factory=list)


@dataclass
class Recording:
    drafter: str
    tree: str
    traces: list[PromptTrace]
    curve: object
    loop_ms: dict[str, float]  # the loop's own per-step times (stats["time_s"] / verify steps)
    mean_tree: float


def record(artifact, drafter: str, tree: str, prompts: list[list[int]], new_tokens: int) -> Recording:
    """Generate every prompt with a fresh generator, recording what the loop hands the drafter."""
    from elision.runtime.generation.ort_generator import OrtGenerator

    gen = OrtGenerator(artifact, drafter=drafter, tree=tree)
    live = gen.drafter(drafter)
    traces: list[PromptTrace] = []
    pending: dict = {}
    reset, prepare, observe = live.reset, live.prepare, live.observe

    def on_reset(contexts, prefill_logits):
        traces.append(PromptTrace(list(contexts[0]), np.array(prefill_logits)))
        reset(contexts, prefill_logits)

    def on_prepare(contexts, active, max_depth):
        pending["depth"], pending["length"] = int(max_depth[0]), len(contexts[0])
        prepare(contexts, active, max_depth)

    def on_observe(b, t, logits, path, context):
        arr = np.array(logits[: len(t)])
        traces[-1].steps.append(Step(pending["depth"], list(t.tokens), list(t.parents), list(t.scores), list(t.keys), arr,
                                     arr.argmax(-1).tolist(), list(path), list(context[pending["length"]:])))
        observe(b, t, logits, path, context)

    live.reset, live.prepare, live.observe = on_reset, on_prepare, on_observe
    totals: dict[str, float] = {}
    steps = nodes = 0
    for ids in prompts:
        res = gen.generate(ids, new_tokens, eos_token_id=[])
        steps += res.stats["verify_steps"]
        nodes += res.stats["mean_tree_size"] * res.stats["verify_steps"]
        for k, v in res.stats["time_s"].items():
            totals[k] = totals.get(k, 0.0) + v
    loop_ms = {k.removesuffix("_s"): v / steps * 1e3 for k, v in totals.items() if k in ("draft_s", "verify_s", "accept_s")}
    return Recording(drafter, tree, traces, gen.cost_curve, loop_ms, nodes / steps)


def implementations() -> dict[str, SimpleNamespace]:
    import drafting_reference as ref

    from elision.runtime.generation import drafters, tree_builders, verify

    def make(module):
        def build(name: str, vocab: int):
            parts = [module.basic_drafter(p, vocab) for p in name.split("+")]
            return parts[0] if len(parts) == 1 else module.CombinedDrafter(parts)
        return build

    return {
        "reference": SimpleNamespace(make=make(ref), build_dynamic=ref.build_dynamic, build_static=ref.build_static,
                                     choose=ref.choose_tree_size, curve=ref.VerifyCostCurve, verify=verify.verify_greedy,
                                     sized=False),
        "live": SimpleNamespace(make=make(drafters), build_dynamic=tree_builders.build_dynamic,
                                build_static=tree_builders.build_static, choose=tree_builders.choose_tree_size,
                                curve=tree_builders.VerifyCostCurve, verify=verify.verify_greedy, sized=False),
        "live-sized": SimpleNamespace(make=make(drafters), build_dynamic=tree_builders.build_dynamic,
                                      build_static=tree_builders.build_static, choose=tree_builders.choose_tree_size,
                                      curve=tree_builders.VerifyCostCurve, verify=verify.verify_greedy, sized=True),
    }


def replay(impl: SimpleNamespace, rec: Recording, vocab: int, max_tree_size: int,
           untruncated: bool = False) -> dict[str, float]:
    """Drive the recorded steps through `impl`; total seconds per phase. Raises if a tree differs from the recording.

    `untruncated`: time only a best-first tree of the full `max_tree_size` per step (what the loop builds before the
    cost curve cuts it: the worst case of a dynamic tree), under "draft", with its node count under "nodes"; the
    recorded tree is then rebuilt untimed, so the drafter sees the same history.
    """
    from elision.runtime.generation.tree_builders import parse_tree_spec

    template = parse_tree_spec(rec.tree)
    curve = impl.curve(rec.curve.sizes, rec.curve.seconds) if rec.curve is not None else None
    drafter = impl.make(rec.drafter, vocab)
    spent = dict.fromkeys((*PHASES, "reset", "nodes"), 0.0)
    clock = time.perf_counter
    wall0, cpu0 = clock(), time.process_time()
    for trace in rec.traces:
        context = list(trace.context)
        t0 = clock()
        drafter.reset([context], trace.prefill_logits)
        spent["reset"] += clock() - t0
        for i, step in enumerate(trace.steps):
            if untruncated:
                t0 = clock()
                drafter.prepare([context], [True], [step.depth])
                spent["nodes"] += len(impl.build_dynamic(drafter, 0, context, max_tree_size, step.depth))
                spent["draft"] += clock() - t0
            t0 = clock()
            drafter.prepare([context], [True], [step.depth])
            if template is not None:
                tree = impl.build_static(drafter, 0, context, template, step.depth)
                t1 = t2 = clock()
            elif impl.sized:
                tree = impl.build_dynamic(drafter, 0, context, max_tree_size, step.depth, curve=curve)
                t1 = t2 = clock()
            else:
                tree = impl.build_dynamic(drafter, 0, context, max_tree_size, step.depth)
                t1 = clock()
                tree = tree.truncate(impl.choose([tree], curve, max_tree_size))
                t2 = clock()
            tree.ancestor_mask()
            t3 = clock()
            path, bonus = impl.verify(tree, step.argmax)
            t4 = clock()
            context.extend(step.new)
            drafter.observe(0, tree, step.logits, path, context)
            t5 = clock()
            if (tree.tokens, tree.parents, tree.scores, tree.keys, path) != (step.tokens, step.parents, step.scores,
                                                                            step.keys, step.path):
                raise AssertionError(f"{rec.drafter} / {rec.tree}: step {i} built a different tree than the recording")
            if not untruncated:
                for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                    spent[name] += dt
    # on a shared machine the wall clock counts time spent waiting for a core: every phase is scaled by the share
    # of the replay's wall time this process actually ran (one process-CPU clock read per replay, not per phase,
    # because reading that clock costs microseconds)
    share = (time.process_time() - cpu0) / (clock() - wall0)
    return {name: seconds * share if name != "nodes" else seconds for name, seconds in spent.items()}


@dataclass
class Row:
    drafter: str
    tree: str
    rec: Recording
    steps: int
    per_step: dict[str, dict[str, float]]  # implementation -> phase -> CPU ms per step
    per_call: dict[str, float]  # implementation -> reset, CPU ms per generate call
    untruncated: dict[str, tuple[float, float]] = field(default_factory=dict)  # implementation -> (ms, nodes) per step


def profile(impls: dict, rec: Recording, vocab: int, args) -> Row:
    names = [n for n in impls if not (impls[n].sized and rec.tree != "dynamic")]
    steps = sum(len(t.steps) for t in rec.traces)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    whole = [n for n in names if not impls[n].sized] if rec.tree == "dynamic" else []
    full: dict[str, list[dict[str, float]]] = {n: [] for n in whole}
    for _ in range(args.repeats):  # interleaved, so background load hits every implementation alike
        for n in names:
            gc.collect()  # each replay starts with no garbage left by the one before
            runs[n].append(replay(impls[n], rec, vocab, args.max_tree_size))
        for n in whole:
            gc.collect()
            full[n].append(replay(impls[n], rec, vocab, args.max_tree_size, untruncated=True))
    if args.cprofile in names:
        prof = cProfile.Profile()
        prof.runcall(replay, impls[args.cprofile], rec, vocab, args.max_tree_size)
        print(f"--- cProfile of {args.cprofile}, {rec.drafter} / {rec.tree}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return Row(rec.drafter, rec.tree, rec, steps,
               {n: {ph: statistics.median(r[ph] for r in runs[n]) / steps * 1e3 for ph in PHASES} for n in names},
               {n: statistics.median(r["reset"] for r in runs[n]) / len(rec.traces) * 1e3 for n in names},
               {n: (statistics.median(r["draft"] for r in full[n]) / steps * 1e3, full[n][0]["nodes"] / steps)
                for n in whole})


def drafting_ms(ms: dict[str, float]) -> float:
    """Drafting + tree building: what the loop pays before the verify forward."""
    return ms["draft"] + ms["size"] + ms["mask"]


def report(rows: list[Row], impls: dict, args) -> str:
    base = next(iter(impls))
    lines = ["# Drafting and tree building per decoding step (builtin:tiny-code-lm, onnxruntime loop)", "",
             f"Recorded from `elision run`'s loop (`OrtGenerator`, {args.threads} threads) on {args.prompts} held-out code "
             f"and {args.prompts} prose prompt(s), {args.new_tokens} new tokens each, max tree size {args.max_tree_size}; "
             f"then replayed through each implementation, interleaved, median of {args.repeats} repeats; every replayed "
             "tree equals the recorded one. `reference` = the drafters before issue 13, `live` = today's called as the loop "
             "calls them, `live-sized` = `build_dynamic(..., curve=)` (same trees, only the nodes the cost curve can pick). "
             "CPU milliseconds per step (wall time of each phase x the replay's process-time / wall-time share); "
             "`drafting` = draft + size + mask (before the verify forward), `per step` adds verify and observe (after it). "
             "`loop verify` is the wall time of the loop's own verify step (one onnxruntime forward, load included), "
             "for scale. Shared 2-core CPU: compare ratios.", "",
             f"| drafter | tree | steps | mean tree | loop verify ms | implementation | draft | size | mask | verify | "
             f"observe | drafting | per step | x {base} |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ref_total = sum(row.per_step[base].values())
        for n, ms in row.per_step.items():
            total = sum(ms.values())
            lines.append(f"| {row.drafter} | {row.tree} | {row.steps} | {row.rec.mean_tree:.1f} | "
                         f"{row.rec.loop_ms['verify']:.3f} | {n} | " + " | ".join(f"{ms[ph]:.4f}" for ph in PHASES)
                         + f" | {drafting_ms(ms):.4f} | {total:.4f} | {ref_total / total:.1f}x |")
    lines += ["", f"Untruncated dynamic trees (up to {args.max_tree_size} nodes, the depth limit of each step): the "
              "best-first build alone, CPU ms per step, and its mean node count:", "",
              "| drafter | " + " | ".join(f"{n} ms" for n in impls if not impls[n].sized) + " | nodes | "
              f"x {base} |", "|---|" + "---:|" * (sum(not i.sized for i in impls.values()) + 2)]
    for row in rows:
        if row.untruncated:
            ms = {n: v[0] for n, v in row.untruncated.items()}
            nodes = next(iter(row.untruncated.values()))[1]
            last = list(ms)[-1]
            lines.append(f"| {row.drafter} | " + " | ".join(f"{v:.4f}" for v in ms.values())
                         + f" | {nodes:.1f} | {ms[base] / ms[last]:.1f}x |")
    lines += ["", "Per generate call (not per step): `reset` (indexing the prompt, recycling the prefill logits), "
              "CPU ms:", "", "| drafter | tree | " + " | ".join(impls) + " |", "|---|---|" + "---:|" * len(impls)]
    for row in rows:
        lines.append(f"| {row.drafter} | {row.tree} | "
                     + " | ".join(f"{row.per_call[n]:.3f}" if n in row.per_call else "-" for n in impls) + " |")
    lines += ["", "Cost curves the loop measured (verify time relative to a 1-token step; they size the dynamic trees):", ""]
    for row in rows:
        if row.rec.curve is not None:
            c = row.rec.curve
            lines.append(f"- {row.drafter}: " + ", ".join(f"{n}: {t / c.seconds[0]:.2f}" for n, t in zip(c.sizes, c.seconds)))
    lines += ["", f"![drafting per step]({args.out.with_suffix('.png').name})"]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], impls: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, bars = [], {n: [] for n in impls}
    for row in rows:
        labels.append(f"{row.drafter}\n{row.tree}")
        for n in impls:
            bars[n].append(drafting_ms(row.per_step[n]) if n in row.per_step else 0.0)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    width = 0.8 / len(impls)
    for i, (n, values) in enumerate(bars.items()):
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=n)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("drafting + tree building, CPU ms per step")
    ax.set_title("Model-free drafters per decoding step (tiny-code-lm, onnxruntime loop)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="a generation artifact of builtin:tiny-code-lm (else compiled now)")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per kind (code, prose)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tree-size", type=int, default=32)
    parser.add_argument("--drafters", default="lookup,copy,recycling,recycling+lookup")
    parser.add_argument("--trees", default="dynamic,static:4x2x1")
    parser.add_argument("--impls", default="reference,live,live-sized")
    parser.add_argument("--cprofile", default="", help="print a cProfile of one replay of this implementation")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "profile_drafters.md")
    args = parser.parse_args()

    from elision.models import code_lm
    from elision.runtime.artifact import load_artifact

    art = args.artifact
    if art is None:
        from elision.apps.specdec.artifact import export_generation_artifact

        art = Path(tempfile.mkdtemp(prefix="elision-profile-drafters-")) / "artifact"
        export_generation_artifact("builtin:tiny-code-lm", art)
    artifact = load_artifact(art, threads=args.threads)
    vocab = int(artifact.runtime_settings["generation"]["vocab_size"])
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(art / "tokenizer.json"))
    texts = code_lm.load_prompts()
    prompts = [tokenizer.encode(p["text"]).ids for kind in ("code", "prose") for p in texts[kind][: args.prompts]]

    impls = {n: i for n, i in implementations().items() if n in args.impls.split(",")}
    rows = []
    for tree in args.trees.split(","):
        for drafter in args.drafters.split(","):
            row = profile(impls, record(artifact, drafter, tree, prompts, args.new_tokens), vocab, args)
            rows.append(row)
            print(f"{drafter:18s} {tree:14s} steps {row.steps:4d} tree {row.rec.mean_tree:4.1f} | drafting " + " | ".join(
                f"{n} {drafting_ms(ms):.4f} ms" for n, ms in row.per_step.items()), flush=True)
    text = report(rows, impls, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    plot(rows, impls, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

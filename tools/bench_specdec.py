"""Speculative-decoding benchmark: elision's generator vs Hugging Face, side by side in one run.

Same target model (`builtin:tiny-code-lm`), same prompts (held-out stdlib code and English
docstring prose from prompts.json), same number of new tokens, same threads. Methods:

    hf-plain         HF `generate` without speculation, greedy or sampling (the baseline of every ratio)
    hf-lookup        HF prompt lookup decoding (`prompt_lookup_num_tokens=10`)
    hf-assisted      HF assisted generation with `builtin:tiny-code-lm-draft`
    hf-early-exit    HF `assistant_early_exit=N` (self-speculation from the first N layers)
    elision-<drafter> `elision.apps.specdec.generate(..., drafter=<drafter>)` for every drafter
                     the runtime offers (columns are omitted, and the report says so, if it is absent)
    elision-ort-<d>  the same model compiled to an ONNX generation artifact (`elision compile --emit onnx
                     --for generate`) and decoded by `elision.runtime.generation.ort_generator.OrtGenerator` (numpy +
                     onnxruntime, no torch), greedy and sampled;
                     `elision-ort-none` is the ORT loop without speculation (the runtime gain alone)

Both greedy and sampled decoding are run. Reported per (prompt kind, mode): tokens/s (per prompt the
median over repeats, aggregated as total tokens / total median time), speedup vs hf-plain, tokens
per target forward pass (1.0 for plain decoding; the "mean accepted length" incl. the bonus token),
and for greedy whether every method's tokens equal hf-plain's. Methods run interleaved per repeat
so machine-load drift hits all of them alike. Every run generates exactly --max-new-tokens tokens:
EOS is an ordinary token here (HF: the models' generation_config.eos_token_id is cleared; elision:
eos_token_id=None), so greedy outputs are comparable token for token.

Writes bench_results/specdec.md, bench_results/specdec.png and bench_results/specdec.json.

    .venv/bin/python tools/bench_specdec.py --prompts 3 --max-new-tokens 128 --repeats 3
"""
from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

HF_METHODS = ["hf-plain", "hf-lookup", "hf-assisted", "hf-early-exit"]
KIND_TEXT = {"code": "held-out stdlib code: a function's opening lines, <= 128 tokens",
             "prose": "English prose: the opening of a held-out stdlib docstring"}


@dataclass
class RunResult:
    tokens: list[int]
    seconds: float
    target_forwards: int | None  # None where the method does not let us count them


@dataclass
class Cell:
    """All runs of one method on one prompt in one mode."""
    times: list[float] = field(default_factory=list)
    new_tokens: int = 0
    target_forwards: int | None = None
    tokens: list[int] | None = None
    error: str | None = None


class ForwardCounter:
    """Counts full-depth forward passes of the target (early-exit drafting runs the same module
    with `config.num_hidden_layers` lowered; those calls are drafts, not target passes)."""

    def __init__(self, model):
        self.model = model
        self.full_layers = model.config.num_hidden_layers
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if module.config.num_hidden_layers == self.full_layers:
            self.count += 1

    def close(self):
        self._handle.remove()


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
def hf_generate(method: str, target, draft, ids, n_new: int, sample: bool, seed: int, args) -> RunResult:
    kw = dict(max_new_tokens=n_new, do_sample=sample, pad_token_id=target.config.pad_token_id)
    if sample:
        kw.update(temperature=args.temperature, top_k=0, top_p=1.0)
    if method == "hf-lookup":
        kw.update(prompt_lookup_num_tokens=args.prompt_lookup_tokens)
    elif method == "hf-assisted":
        kw.update(assistant_model=draft)
    elif method == "hf-early-exit":
        kw.update(assistant_early_exit=args.early_exit_layer)
    counter = ForwardCounter(target)
    try:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = target.generate(ids, **kw)
        dt = time.perf_counter() - t0
    finally:
        counter.close()
    return RunResult(out[0, ids.shape[1]:].tolist(), dt, counter.count)


class ElisionAdapter:
    """Calls `elision.apps.specdec.generate` with whatever signature it actually has."""

    def __init__(self):
        self.available = False
        self.reason = ""
        self.drafters: list[str] = []
        try:
            from elision.apps import specdec
        except Exception as e:  # the runtime is being written concurrently
            self.reason = f"`import elision.apps.specdec` failed: {type(e).__name__}: {e}"
            return
        gen = getattr(specdec, "generate", None)
        if gen is None:
            self.reason = "`elision.apps.specdec` has no `generate` function yet"
            return
        self.generate = gen
        self.params = inspect.signature(gen).parameters
        known = getattr(specdec, "KNOWN_DRAFTERS", None)
        if known is None:
            from elision.apps.specdec import drafters as _d
            known = getattr(_d, "KNOWN_DRAFTERS", ("lookup", "recycling", "copy", "layer-skip", "draft-model"))
        self.drafters = [d for d in known if d != "none"]
        self.available = True

    def _accepts(self, name: str) -> bool:
        return name in self.params or any(p.kind is p.VAR_KEYWORD for p in self.params.values())

    def run(self, drafter: str, target, draft, ids, n_new: int, sample: bool, seed: int, args) -> RunResult:
        kw = dict(max_new_tokens=n_new, drafter=drafter, do_sample=sample)
        if sample and self._accepts("temperature"):
            kw["temperature"] = args.temperature
        if sample and self._accepts("seed"):
            kw["seed"] = seed
        if "draft-model" in drafter and self._accepts("draft_model"):
            kw["draft_model"] = draft
        if self._accepts("eos_token_id"):
            kw["eos_token_id"] = None
        counter = ForwardCounter(target)
        try:
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            with torch.no_grad():
                res = self.generate(target, ids, **kw)
            dt = time.perf_counter() - t0
        finally:
            counter.close()
        tokens = res.tokens
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.reshape(-1).tolist() if tokens.dim() == 1 or tokens.shape[0] == 1 else tokens[0].tolist()
        elif tokens and isinstance(tokens[0], (list, tuple)):
            tokens = list(tokens[0])
        tokens = [int(t) for t in tokens]
        if len(tokens) > n_new:  # a result holding prompt + continuation
            tokens = tokens[ids.shape[1]:] if tokens[: ids.shape[1]] == ids[0].tolist() else tokens[-n_new:]
        stats = getattr(res, "stats", None)
        forwards = getattr(stats, "forward_passes", None) if stats is not None else None
        if isinstance(stats, dict):
            forwards = stats.get("forward_passes")
        # Prefer the runtime's own count (it may not call the HF module's __call__ per step).
        return RunResult(tokens, dt, int(forwards) if forwards else (counter.count or None))


class OrtAdapter:
    """The ONNX Runtime target: one generation artifact of the target model, decoded by the torch-free loop."""

    def __init__(self, threads: int, drafters: list[str]):
        import tempfile

        from elision.runtime.generation.ort_generator import OrtGenerator
        from elision.apps.specdec.artifact import export_generation_artifact

        self.drafters = drafters
        path = Path(tempfile.mkdtemp(prefix="elision-bench-specdec-")) / "tiny-code-lm"
        export_generation_artifact("builtin:tiny-code-lm", path)
        self.generator = OrtGenerator.load(path, threads=threads)

    def run(self, drafter: str, ids, n_new: int, sample: bool, seed: int, args) -> RunResult:
        kw = dict(do_sample=True, temperature=args.temperature, seed=seed) if sample else {}
        t0 = time.perf_counter()
        res = self.generator.generate(ids[0].tolist(), max_new_tokens=n_new, drafter=drafter, eos_token_id=[], **kw)
        dt = time.perf_counter() - t0
        return RunResult([int(t) for t in res.tokens], dt, int(res.stats["forward_passes"]))


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def summarize(cells: dict, methods: list[str], settings: list[tuple[str, str]], n_prompts: int) -> dict:
    summary = {}
    for kind, mode in settings:
        base_tps = None
        for method in methods:
            runs = [cells.get((kind, mode, method, i)) for i in range(n_prompts)]
            errors = [c.error for c in runs if c is not None and c.error]
            ok = [c for c in runs if c is not None and not c.error and c.times]
            entry = {"error": errors[0] if errors else None}
            if ok and not errors:
                total_tokens = sum(c.new_tokens for c in ok)
                total_time = sum(statistics.median(c.times) for c in ok)
                entry["tokens_per_s"] = total_tokens / total_time
                fw = [c.target_forwards for c in ok]
                entry["tokens_per_forward"] = (total_tokens / sum(fw)) if all(fw) else None
                if mode == "greedy":
                    ref = [cells[(kind, mode, "hf-plain", i)].tokens for i in range(n_prompts)]
                    entry["identical_to_greedy"] = all(c.tokens == r for c, r in zip(ok, ref))
                if method == "hf-plain":
                    base_tps = entry["tokens_per_s"]
            summary[(kind, mode, method)] = entry
        for method in methods:
            e = summary[(kind, mode, method)]
            if "tokens_per_s" in e and base_tps:
                e["speedup"] = e["tokens_per_s"] / base_tps
    return summary


def write_markdown(path: Path, summary: dict, methods: list[str], settings, args, meta: dict,
                   curves: dict | None = None) -> None:
    kinds = list(dict.fromkeys(k for k, _ in settings))
    lines = [
        "## Speculative decoding (lossless draft-and-verify)",
        "",
        f"Target `builtin:tiny-code-lm` ({meta['target_params'] / 1e6:.2f}M params, float32), draft "
        f"`builtin:tiny-code-lm-draft` ({meta['draft_params'] / 1e6:.2f}M params). {meta['cpu']}, "
        f"torch {meta['torch']} with {args.threads} threads, transformers {meta['transformers']}, "
        f"batch size 1. Run {meta['date']}; other jobs shared the 2 cores, so absolute tokens/s are "
        "noisy while ratios (interleaved runs) and tokens/forward (counts) are stable.",
        "",
        f"Settings: {args.prompts} prompt(s) per kind ({', '.join(KIND_TEXT[k] for k in kinds)}); "
        f"{args.max_new_tokens} new tokens each "
        f"(EOS is an ordinary token, so every method makes the same number); {args.repeats} repeats, "
        "median per prompt, tokens/s = total tokens / total median time; greedy and sampled "
        f"(temperature {args.temperature}, no top-k/top-p). HF prompt lookup: "
        f"`prompt_lookup_num_tokens={args.prompt_lookup_tokens}`; HF early exit: "
        f"`assistant_early_exit={args.early_exit_layer}` (of {meta['target_layers']} layers).",
        "",
        "`tok/fwd` = generated tokens per full target forward pass (plain decoding = 1.00; for "
        "speculative methods this is the mean accepted length including the bonus token). "
        "`same` = greedy output token-for-token identical to hf-plain.",
        "",
    ]
    if meta.get("degeneracy_note"):
        lines += [f"**Caveat:** {meta['degeneracy_note']}", ""]
    if meta.get("elision_note"):
        lines += [f"**elision columns:** {meta['elision_note']}", ""]
    lines += ["| prompts | decoding | method | tokens/s | x hf-plain | tok/fwd | same as greedy |",
              "|---|---|---|---|---|---|---|"]
    for kind, mode in settings:
        for method in methods:
            e = summary[(kind, mode, method)]
            if e.get("error"):
                row = [kind, mode, f"`{method}`", "error", "-", "-", "-"]
            elif "tokens_per_s" not in e:
                row = [kind, mode, f"`{method}`", "not run", "-", "-", "-"]
            else:
                same = "-" if mode != "greedy" else ("yes" if e.get("identical_to_greedy") else "**NO**")
                tpf = f"{e['tokens_per_forward']:.2f}" if e.get("tokens_per_forward") else "n/a"
                row = [kind, mode, f"`{method}`", f"{e['tokens_per_s']:.1f}",
                       f"{e.get('speedup', float('nan')):.2f}x", tpf, same]
            lines.append("| " + " | ".join(row) + " |")
    errors = {m: summary[(k, mo, m)]["error"] for k, mo in settings for m in methods if summary[(k, mo, m)].get("error")}
    if errors:
        lines += ["", "Errors:"] + [f"- `{m}`: {err}" for m, err in errors.items()]
    if curves:
        sizes = sorted({n for c in curves.values() for n in c.sizes})
        lines += ["", "Verification-cost curve (one verify forward over the live cache, median ms, and its ratio to a "
                  "1-token step; the dynamic tree builder sizes trees from this curve):", "",
                  "| tree nodes | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
        for n in sizes:
            cells_ = []
            for c in curves.values():
                if n in c.sizes:
                    t = c.seconds[c.sizes.index(n)]
                    cells_.append(f"{t * 1e3:.2f} ({t / c.seconds[0]:.2f}x)")
                else:
                    cells_.append("-")
            lines.append(f"| {n} | " + " | ".join(cells_) + " |")
    lines += ["", "![specdec](specdec.png)", ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, summary: dict, methods: list[str], settings) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(methods)
    x = np.arange(len(settings))
    for j, method in enumerate(methods):
        tps = [summary[(k, m, method)].get("tokens_per_s", 0.0) or 0.0 for k, m in settings]
        tpf = [summary[(k, m, method)].get("tokens_per_forward", 0.0) or 0.0 for k, m in settings]
        axes[0].bar(x + j * width, tps, width, label=method)
        axes[1].bar(x + j * width, tpf, width, label=method)
    for ax, title in zip(axes, ["tokens/s (higher is better)", "tokens per target forward (accepted length)"]):
        ax.set_xticks(x + 0.4 - width / 2)
        ax.set_xticklabels([f"{k}\n{m}" for k, m in settings])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].axhline(1.0, color="black", lw=0.8)
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle("Speculative decoding on builtin:tiny-code-lm (CPU, batch 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=3, help="prompts per kind (code, prose)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: these models are too small to gain from more, and cores are shared)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--prompt-lookup-tokens", type=int, default=10)
    p.add_argument("--early-exit-layer", type=int, default=2)
    p.add_argument("--modes", default="greedy,sampled")
    p.add_argument("--kinds", default="code,prose")
    p.add_argument("--no-elision", action="store_true", help="run the HF peers only")
    p.add_argument("--ort-drafters", default="none,lookup,recycling+lookup",
                   help="drafters of the ONNX Runtime target (comma-separated; empty = skip the ORT target)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench_results")
    args = p.parse_args(argv)

    console = Console()
    torch.set_num_threads(args.threads)
    import transformers

    from elision.models.code_lm import load_model, load_prompts, load_tokenizer

    transformers.logging.set_verbosity_error()
    target, draft = load_model("tiny-code-lm"), load_model("tiny-code-lm-draft")
    for m in (target, draft):  # fixed-length runs: EOS must not stop HF generate (see docstring)
        m.generation_config.eos_token_id = None
    tokenizer = load_tokenizer()
    prompts = load_prompts()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [k for k in kinds if k not in ("code", "prose")] + [m for m in modes if m not in ("greedy", "sampled")]
    if bad or args.prompts < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        console.print(f"[red]error:[/] bad arguments {bad or ''}: kinds are code,prose; modes greedy,sampled; "
                      "counts must be >= 1")
        return 2
    if not 1 <= args.early_exit_layer < target.config.num_hidden_layers:
        console.print(f"[red]error:[/] --early-exit-layer must be in [1, {target.config.num_hidden_layers - 1}]")
        return 2
    n_prompts = min(args.prompts, *(len(prompts[k]) for k in kinds))
    args.prompts = n_prompts
    inputs = {k: [torch.tensor([tokenizer(pr["text"], add_special_tokens=False)["input_ids"]])
                  for pr in prompts[k][:n_prompts]] for k in kinds}

    methods = list(HF_METHODS)
    elision = None if args.no_elision else ElisionAdapter()
    elision_note = ""
    if args.no_elision:
        elision_note = "not run (--no-elision)."
    elif not elision.available:
        elision_note = f"unavailable in this run: {elision.reason}."
        console.print(f"[yellow]elision columns unavailable:[/] {elision.reason}")
    else:
        methods += [f"elision-{d}" for d in elision.drafters]
        console.print(f"elision drafters: {', '.join(elision.drafters)}")
    ort = None
    ort_drafters = [d.strip() for d in args.ort_drafters.split(",") if d.strip()]
    if ort_drafters and not args.no_elision:
        console.print("compiling the ONNX Runtime generation artifact ...")
        ort = OrtAdapter(args.threads, ort_drafters)
        methods += [f"elision-ort-{d}" for d in ort_drafters]

    settings = [(k, m) for k in kinds for m in modes]
    cells: dict[tuple, Cell] = {}

    def run_one(method, ids, sample, seed):
        if method.startswith("hf-"):
            return hf_generate(method, target, draft, ids, args.max_new_tokens, sample, seed, args)
        if method.startswith("elision-ort-"):
            return ort.run(method.removeprefix("elision-ort-"), ids, args.max_new_tokens, sample, seed, args)
        return elision.run(method.removeprefix("elision-"), target, draft, ids, args.max_new_tokens, sample, seed, args)

    # Warm-up (allocator, first-call overheads) so the first timed method is not penalised.
    for method in methods:
        try:
            run_one(method, inputs[kinds[0]][0], False, args.seed)
        except Exception:
            pass

    total = len(settings) * n_prompts * args.repeats * len(methods)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("benchmark", total=total)
        for kind, mode in settings:
            sample = mode == "sampled"
            for i, ids in enumerate(inputs[kind]):
                for r in range(args.repeats):
                    seed = args.seed + 1000 * i + r
                    for method in methods:  # interleaved: each repeat runs every method once
                        progress.update(task, description=f"{kind}/{mode} prompt {i} {method}")
                        cell = cells.setdefault((kind, mode, method, i), Cell())
                        if cell.error:
                            progress.advance(task)
                            continue
                        try:
                            res = run_one(method, ids, sample, seed)
                        except Exception as e:
                            cell.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                            console.print(f"[red]{method} failed:[/] {cell.error}")
                            if method.startswith("hf-"):
                                traceback.print_exc()
                            progress.advance(task)
                            continue
                        if len(res.tokens) != args.max_new_tokens:
                            cell.error = f"made {len(res.tokens)} tokens instead of {args.max_new_tokens}"
                        cell.times.append(res.seconds)
                        cell.new_tokens = len(res.tokens)
                        cell.target_forwards = res.target_forwards
                        if cell.tokens is None or mode == "greedy":
                            if cell.tokens is not None and cell.tokens != res.tokens:
                                cell.error = "greedy output changed between repeats"
                            cell.tokens = res.tokens
                        progress.advance(task)

    summary = summarize(cells, methods, settings, n_prompts)
    # The verification-cost curves the dynamic trees were sized with (measured by the runtimes at their first
    # dynamic-tree call in this process): seconds of one verify forward over the live cache by tree nodes.
    from elision.apps.specdec.generate import measured_cost_curves

    curves = {}
    torch_curves = measured_cost_curves(target)
    if torch_curves:
        curves["torch (HF model backend)"] = next(iter(torch_curves.values()))
    if ort is not None and ort.generator.cost_curve is not None:
        curves["onnxruntime"] = ort.generator.cost_curve
    meta = {
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "target_layers": target.config.num_hidden_layers,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "elision_note": elision_note,
    }
    try:
        meta["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # A weak target repeats itself under greedy decoding, which inflates every copy/lookup drafter's
    # acceptance; say so in the report, measured, instead of letting the ratios speak alone.
    greedy_outs = [c.tokens for (k, m, me, i), c in cells.items() if m == "greedy" and me == "hf-plain" and c.tokens]
    if greedy_outs:
        distinct = sum(len(set(t)) for t in greedy_outs) / len(greedy_outs)
        top = max(greedy_outs[0], key=greedy_outs[0].count)
        meta["greedy_distinct_tokens"] = distinct
        log_path = REPO_ROOT / "elision" / "models" / "builtin" / "tiny-code-lm" / "train_log.json"
        held = json.loads(log_path.read_text()).get("heldout_loss") if log_path.is_file() else None
        if distinct < 0.25 * args.max_new_tokens:
            meta["degeneracy_note"] = (
                f"hf-plain greedy continuations contain on average only {distinct:.1f} distinct tokens "
                f"in {args.max_new_tokens} (e.g. {tokenizer.decode([top])!r} repeated); the target "
                f"(held-out loss {held} nats/token vs uniform 8.32) is weakly trained, so greedy "
                "acceptance of lookup/copy/recycling drafters is inflated by repetition. The sampled "
                "rows reflect a less degenerate workload.")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out_dir / "specdec.md", summary, methods, settings, args, meta, curves)
    write_plot(args.out_dir / "specdec.png", summary, methods, settings)
    (args.out_dir / "specdec.json").write_text(json.dumps({
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "meta": meta,
        "summary": [{"kind": k, "mode": m, "method": me, **v} for (k, m, me), v in summary.items()],
        "runs": [{"kind": k, "mode": m, "method": me, "prompt": i, "seconds": c.times, "new_tokens": c.new_tokens,
                  "target_forwards": c.target_forwards, "error": c.error} for (k, m, me, i), c in cells.items()],
    }, indent=1))

    from rich.table import Table
    table = Table(title="speculative decoding (tokens/s, x hf-plain, tokens/forward)")
    table.add_column("method")
    for k, m in settings:
        table.add_column(f"{k} {m}")
    for method in methods:
        row = [method]
        for k, m in settings:
            e = summary[(k, m, method)]
            if e.get("error"):
                row.append("[red]error[/]")
            elif "tokens_per_s" not in e:
                row.append("n/a")
            else:
                same = "" if m != "greedy" else (" ok" if e.get("identical_to_greedy") else " [red]DIFF[/]")
                tpf = f"{e['tokens_per_forward']:.2f}" if e.get("tokens_per_forward") else "n/a"
                row.append(f"{e['tokens_per_s']:.1f} {e.get('speedup', 0):.2f}x {tpf}{same}")
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {args.out_dir / 'specdec.md'}, specdec.png, specdec.json")
    mismatches = [me for (k, m, me), e in summary.items() if m == "greedy" and e.get("identical_to_greedy") is False]
    if mismatches:
        console.print(f"[red]greedy outputs differ from hf-plain for: {', '.join(sorted(set(mismatches)))}[/]")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

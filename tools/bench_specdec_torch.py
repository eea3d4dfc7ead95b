"""Benchmark: the torch route of speculative decoding (`elision generate MODEL`, the verification step compiled by
elision and inductor) against Hugging Face greedy `generate` and HF prompt lookup, side by side in one run.

Rows, for held-out code prompts and English prose (`builtin:tiny-code-lm`'s prompts.json), greedy, EOS off, fp32 CPU:

    hf-greedy           transformers `generate(do_sample=False)` (the baseline of every ratio)
    hf-lookup           transformers prompt lookup decoding (`prompt_lookup_num_tokens=10`)
    elision-torch-<d>   `compiled_generator(model)` (export -> elision's speculative passes -> inductor step with
                        dynamic shapes, KV buffers preallocated and written in place) with drafter <d>
    elision-hf-<d>      `SpeculativeGenerator(model)`: the same loop over the Hugging Face model (`--no-compile`)

Every route must produce exactly hf-greedy's tokens (checked; a mismatch is reported, never averaged). tokens/s counts
everything after loading (prefill, drafting, verification, the loop); what the compiled route pays once before its
first request (export and passes, then inductor's code generation and the cost curve, measured or read from the
per-machine cache) is its own column, never folded into tokens/s or hidden. Routes run interleaved, prompt by prompt,
round by round; per (route, prompt) the median over rounds is kept.

    .venv/bin/python tools/bench_specdec_torch.py                        # writes bench_results/specdec_torch.{md,json}
    .venv/bin/python tools/bench_specdec_torch.py --prompts 2 --rounds 2 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_ort_generate import KINDS, elision_route, hf_route, interleaved, machine, summarize  # noqa: E402


def table(rows: list[dict], compile_s: dict[str, dict]) -> list[str]:
    lines = ["| prompts | route | tokens/s | x hf-greedy | tok/fwd | draft | verify | accept | loop | compile once, s "
             "(export + warm-up) | same tokens as hf-greedy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        ph = r.get("phase_ms_per_token")
        cols = [f"{ph[k]:.3f}" for k in ("draft", "verify", "accept", "loop")] if ph else ["", "", "", ""]
        c = compile_s.get(r["route"])
        once = f"{c['export_s'] + c['warm_up_s']:.1f} ({c['export_s']:.1f} + {c['warm_up_s']:.1f})" if c else ""
        tpf = f"{r['tokens_per_forward']:.2f}" if r.get("tokens_per_forward") else ""
        lines.append(f"| {r['kind']} | {r['route']} | {r['tokens_per_s']:.1f} | {r['vs_hf']:.2f}x | {tpf} | "
                     f"{' | '.join(cols)} | {once} | {'yes' if r['identical'] else '**NO**'} |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=3, help="prompts per kind (code, prose)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every route")
    p.add_argument("--drafters", default="recycling+lookup")
    p.add_argument("--hf-backend", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the same loop over the Hugging Face model (elision-hf-<d>)")
    p.add_argument("--work", type=Path, default=None,
                   help="user cache of this run (per-machine cost curves); default a fresh one, so the compile column "
                        "includes measuring the curve, as on a first run on a machine")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "specdec_torch.md")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="elision-bench-specdec-torch-"))
    os.environ["ELISION_CACHE_DIR"] = str(work / "user-cache")
    torch.set_num_threads(args.threads)

    from elision.apps.specdec.compiled_backend import compiled_generator
    from elision.apps.specdec.generate import SpeculativeGenerator
    from elision.models import code_lm

    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    tokenizer, model = code_lm.load_tokenizer(), code_lm.load_model()
    prompts = {k: [tokenizer(pr["text"]).input_ids for pr in code_lm.load_prompts()[k][: args.prompts]] for k in KINDS}
    drafters = [d for d in args.drafters.split(",") if d]
    routes = {"hf-greedy": hf_route(model, False), "hf-lookup": hf_route(model, True)}
    compile_s: dict[str, dict] = {}
    forwards: dict[str, int] = {}
    for d in drafters:
        log(f"compiling the torch route for drafter {d}")
        gen = compiled_generator(model, tokenizer=tokenizer, drafter=d)
        compile_s[f"elision-torch-{d}"] = gen.compile_s
        routes[f"elision-torch-{d}"] = elision_route(gen, d)
        if args.hf_backend:
            routes[f"elision-hf-{d}"] = elision_route(SpeculativeGenerator(model, tokenizer=tokenizer, drafter=d), d)
    for name, route in routes.items():  # first calls (allocator, HF's own set-up, the hf route's cost curve)
        route(prompts["code"][0], 16)
    log(f"timing {len(routes)} routes x {sum(map(len, prompts.values()))} prompts x {args.rounds} rounds, "
        f"{args.threads} thread(s)")
    cells = interleaved(routes, prompts, args.new_tokens, args.rounds, log)
    rows = summarize(cells, list(routes), prompts, args.new_tokens)
    for r in rows:
        base = next(x["tokens_per_s"] for x in rows if x["kind"] == r["kind"] and x["route"] == "hf-greedy")
        r["vs_hf"] = r["tokens_per_s"] / base
        runs = [cells[(r["kind"], r["route"], i)].runs[0] for i in range(len(prompts[r["kind"]]))]
        if all(run.forwards for run in runs):
            r["tokens_per_forward"] = r["tokens"] / sum(run.forwards for run in runs)
    load = os.getloadavg()
    lines = [f"# Speculative decoding, torch route: compiled step vs Hugging Face (builtin:tiny-code-lm, CPU)", "",
             f"Machine: {machine()}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) when the "
             f"run ended. {args.threads} intra-op thread(s) for every route, fp32, {args.new_tokens} new tokens, greedy, "
             f"EOS off, {args.prompts} prompt(s) per kind, median of {args.rounds} interleaved rounds per prompt; "
             "tokens/s = all tokens / all median times, everything after loading included (prefill, drafting). "
             "Loop phases are ms per generated token. `compile once` is what the compiled route pays before its first "
             "request (export and passes + inductor code generation and the cost curve), not part of tokens/s.", ""]
    lines += table(rows, compile_s)
    for kind in KINDS:
        best = max((r for r in rows if r["kind"] == kind and r["route"].startswith("elision-torch-")),
                   key=lambda r: r["tokens_per_s"], default=None)
        if best is not None:
            lines.append(f"Goal torch route >= 2x hf-greedy on {kind}: {best['route']} at **{best['vs_hf']:.2f}x** "
                         f"({'met' if best['vs_hf'] >= 2 else 'not met'}).")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "compile_s": compile_s, "threads": args.threads,
                                                         "load_average": load, "date": time.strftime("%F %T")}, indent=1))
    print(text)


if __name__ == "__main__":
    main()

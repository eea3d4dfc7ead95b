"""Benchmark: speculative generation with onnxruntime alone (`elision run DIR --prompt`) vs the torch loop.

Same model, prompt, drafter and tree; three loops, every one checked to produce exactly Hugging Face's greedy
tokens:
* torch / HF backend: `SpeculativeGenerator` over the Hugging Face model (`elision generate`);
* torch / compiled: `SpeculativeGenerator` over the compiled `@verify` (torch.fx);
* onnxruntime: `OrtGenerator` over the generation artifact (numpy KV buffers, no torch).
One intra-op thread everywhere. Median tokens/s over interleaved repeats (the one-off cost-curve measurement
is excluded by the loops' own stats). Writes bench_results/ort_generate.md.

    .venv/bin/python tools/bench_ort_generate.py [--model builtin:tiny-code-lm] [--new-tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-code-lm")
    parser.add_argument("--artifact", type=Path, help="an existing generation artifact of --model (else compiled now)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--drafters", default="none,recycling+lookup")
    parser.add_argument("--tree", default="dynamic")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "ort_generate.md")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from elision.models import code_lm
    from elision.runtime.generation.ort_generator import OrtGenerator
    from elision.apps.specdec import SpeculativeGenerator
    from elision.apps.specdec.artifact import export_generation_artifact
    from elision.apps.specdec.loading import load_causal_lm
    from elision.apps.specdec.compiled_backend import compile_specdec

    model, tokenizer = load_causal_lm(args.model)
    art = args.artifact
    if art is None:
        art = Path(tempfile.mkdtemp(prefix="elision-bench-ort-")) / "artifact"
        export_generation_artifact(args.model, art)
    prompt = code_lm.load_prompts()["code"][0]["text"]
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        x = torch.tensor([ids])
        want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()

    compiled = compile_specdec(model)
    ort_gen = OrtGenerator.load(art, threads=1)
    rows = []
    for drafter in args.drafters.split(","):
        loops = {
            "torch / HF backend": SpeculativeGenerator(model, tokenizer=tokenizer, drafter=drafter, tree=args.tree),
            "torch / compiled @verify": compiled.generator(drafter=drafter, tree=args.tree),
        }
        rates: dict[str, list[float]] = {name: [] for name in [*loops, "onnxruntime"]}
        accepted: dict[str, float] = {}
        for _ in range(args.repeats):  # interleaved, so background load hits every loop alike
            for name, gen in loops.items():
                res = gen.generate([ids], args.new_tokens, eos_token_id=[])
                assert res.tokens[0] == want, f"{name} ({drafter}) differs from HF greedy"
                rates[name].append(res.stats["tokens_per_s"])
                accepted[name] = res.stats["mean_accepted_length"]
            res = ort_gen.generate(ids, args.new_tokens, drafter=drafter, tree=args.tree, eos_token_id=[])
            assert res.tokens == want, f"onnxruntime ({drafter}) differs from HF greedy"
            rates["onnxruntime"].append(res.stats["tokens_per_s"])
            accepted["onnxruntime"] = res.stats["mean_accepted_length"]
        for name, r in rates.items():
            rows.append((drafter, name, statistics.median(r), accepted[name]))

    lines = [f"# Speculative generation: onnxruntime loop vs torch loop ({args.model}, CPU, 1 thread)", "",
             f"{args.new_tokens} new tokens, tree {args.tree}, median of {args.repeats} interleaved runs; all loops "
             "token-identical to HF greedy. Shared CPU: indicative only.", "",
             "| drafter | loop | tokens/s | mean accepted length |", "|---|---|---:|---:|"]
    lines += [f"| {d} | {n} | {r:.1f} | {a:.2f} |" for d, n, r, a in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()

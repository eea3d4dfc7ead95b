"""Assemble BENCHMARKS.md from the sections each tools/bench_*.py script writes into bench_results/.

Numbers are never edited by hand: rerun the bench script, then this one.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["lowering", "specdec", "specdec_compiled", "specdec_torch", "ort_generate", "pruning", "pruning_onnx", "pruning_fastv", "volume", "volume_local", "volume_cuda", "volume_local_cuda",
         "volume_cuda_chunk65536", "fusion", "kernels", "kernels_cuda"]


def main() -> None:
    results = ROOT / "bench_results"
    parts = ["# elision benchmarks\n",
             "Each section is written by the named `tools/bench_*.py` script (our code and the peers side by side in one "
             "run, medians over repeats, ratios). Machine and load are stated per section; many were measured on a "
             "2-core CPU shared with other jobs, so absolute times are noisy.\n"]
    names = ORDER + sorted(p.stem for p in results.glob("*.md") if p.stem not in ORDER)
    for name in names:
        f = results / f"{name}.md"
        if f.exists():
            parts.append(f"\n---\n\n<!-- from bench_results/{name}.md -->\n")
            parts.append(f.read_text().replace("](", "](bench_results/").replace("](bench_results/http", "](http")
                         .replace("](bench_results/bench_results/", "](bench_results/"))
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()

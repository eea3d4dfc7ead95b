"""Benchmark volume decoding: dense chunked (published method) vs hierarchical vs hierarchical + adaptive KV,
on PyTorch and onnxruntime, same latents, same resolution, one process.

For each resolution and backend it reports field queries evaluated, median wall time over repeats (decode
only: latent side + all field queries; marching cubes timed separately), speedup vs dense on the same
backend, occupancy IoU / Chamfer / F-score of the mesh vs the dense result, and peak RSS growth.
Writes bench_results/volume.md and bench_results/volume.png.

Usage: .venv/bin/python tools/bench_volume.py [--model builtin:vecset-tiny] [--shape elephant]
       [--resolutions 128 256 384] [--repeats 3] [--dense-repeats 1] [--backends torch ort]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elision.models.vecset import fixture_latents  # noqa: E402
from elision.runtime.volume import decode_volume, parse_volume_pipeline  # noqa: E402
from elision.runtime.volume.cli import load_vecset  # noqa: E402
from elision.runtime.volume.mesh import (chamfer_fscore, extract_mesh, lost_components, occupancy_iou,  # noqa: E402
                                        render_preview)

METHODS = {
    "dense (published, chunked)": "",
    "hierarchical": "hoist-invariants,sparse-volume",
    "hierarchical + adaptive KV": "hoist-invariants,sparse-volume,adaptive-kv{topk=%d}",
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Samples RSS every 20 ms while a block runs; reports the growth over the starting RSS."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.02)

    def __exit__(self, *a):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:vecset-tiny")
    ap.add_argument("--shape", default="elephant")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-repeats", type=int, default=1)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8000, help="queries per call (Hunyuan default num_chunks=8000)")
    ap.add_argument("--backends", nargs="+", default=["torch", "ort"])
    ap.add_argument("--ort-resolutions", type=int, nargs="*", default=None,
                    help="resolutions to run on ORT (default: all); dense ORT at 384 takes long on 2 cores")
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ORT alike")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_vecset(args.model)
    lat = fixture_latents(args.shape)
    decoders: dict[str, object] = {"torch": model}
    if "ort" in args.backends:
        from elision.runtime.volume.onnx_field import OrtFieldDecoder, export_field_onnx
        tmp = Path(tempfile.mkdtemp(prefix="bench-volume-"))
        export_field_onnx(model, tmp)
        decoders["ort"] = OrtFieldDecoder(tmp, threads=args.threads)

    rows = []
    for res in args.resolutions:
        for backend in args.backends:
            if backend == "ort" and args.ort_resolutions is not None and res not in args.ort_resolutions:
                continue
            dec = decoders[backend]
            dense_result = dense_mesh = None
            dense_time = None
            for label, passes in METHODS.items():
                if "%d" in passes:
                    passes = passes % args.topk
                plan = parse_volume_pipeline(passes)
                if backend == "ort" and not plan.hoist:
                    # the ORT artifact always has the latent side split off; "published" on ORT = dense chunked
                    plan = type(plan)(hoist=True)
                reps = args.dense_repeats if plan.sparse is None else args.repeats
                times, result, peak = [], None, 0.0
                for _ in range(reps):
                    with PeakRSS() as mem:
                        t0 = time.perf_counter()
                        result = decode_volume(dec, lat, res, plan, chunk=args.chunk)
                        times.append(time.perf_counter() - t0)
                    peak = max(peak, mem.growth_mib)
                    print(f"r={res} {backend:5s} {label:28s} {times[-1]:8.2f}s queries={result.queries:,}",
                          flush=True)
                t_mc = time.perf_counter()
                mesh = extract_mesh(result)
                t_mc = time.perf_counter() - t_mc
                if backend == "torch" and res == max(args.resolutions):
                    tag = "dense" if plan.sparse is None else ("sparse_kv" if plan.kv else "sparse")
                    render_preview(mesh, args.out / f"volume_{args.shape}_{res}_{tag}.png",
                                   title=f"{args.shape} r={res} {label}")
                wall = statistics.median(times)
                row = {"resolution": res, "backend": backend, "method": label, "passes": passes or "(dense)",
                       "queries": result.queries, "dense_queries": result.dense_queries,
                       "wall_s": wall, "repeats": reps, "marching_cubes_s": t_mc, "peak_rss_mib": peak,
                       "faces": len(mesh.faces), "kv": result.kv_stats}
                if plan.sparse is None and plan.kv is None:
                    dense_result, dense_mesh, dense_time = result, mesh, wall
                    row |= {"speedup": 1.0, "iou": 1.0, "chamfer": 0.0, "fscore": 1.0, "lost_parts": 0}
                else:
                    cf = chamfer_fscore(mesh, dense_mesh, n=100_000, threshold=2.02 / res)
                    row |= {"speedup": dense_time / wall, "iou": occupancy_iou(result, dense_result),
                            "chamfer": cf["chamfer"], "fscore": cf["fscore"],
                            "lost_parts": lost_components(dense_result, result)}
                rows.append(row)
    write_report(rows, args)


def write_report(rows: list[dict], args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "volume.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "## Sparse volume decoding (VecSet shape decoder)",
        "",
        f"Model `{args.model}`, latents of fixture shape `{args.shape}`, chunk {args.chunk} queries, "
        f"2-core CPU shared with other jobs (read times as relative). Wall = decode (latent side + all field "
        f"queries), median of {args.repeats} runs for sparse methods and {args.dense_repeats} for dense. "
        "IoU/Chamfer/F-score compare with the dense grid/mesh at the same resolution and backend "
        "(F-score threshold = one fine cell). Peak RSS = growth over the process RSS at start.",
        "",
        "| res | backend | method | queries | % of dense | wall s | speedup | IoU | Chamfer | F-score | lost parts | KV read | MC s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kv = f"{r['kv']['kv_fraction']:.2f}" if r.get("kv") else "-"
        lines.append(f"| {r['resolution']} | {r['backend']} | {r['method']} | {r['queries']:,} | "
                     f"{100 * r['queries'] / r['dense_queries']:.2f} | {r['wall_s']:.2f} | {r['speedup']:.1f}x | "
                     f"{r['iou']:.4f} | {r['chamfer']:.2e} | {r['fscore']:.4f} | {r['lost_parts']} | {kv} | "
                     f"{r['marching_cubes_s']:.2f} | {r['peak_rss_mib']:.0f} |")
    (args.out / "volume.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for backend, marker in (("torch", "o"), ("ort", "s")):
        for method in METHODS:
            sel = [r for r in rows if r["backend"] == backend and r["method"] == method]
            if not sel:
                continue
            x = [r["resolution"] for r in sel]
            axes[0].plot(x, [r["wall_s"] for r in sel], marker=marker, label=f"{backend}: {method}")
            axes[1].plot(x, [r["queries"] for r in sel], marker=marker, label=f"{backend}: {method}")
    axes[0].set(xlabel="resolution", ylabel="decode wall time (s)", yscale="log", title="wall time (median)")
    axes[1].set(xlabel="resolution", ylabel="field queries", yscale="log", title="queries evaluated")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "volume.png", dpi=110)
    print((args.out / "volume.md").read_text())


if __name__ == "__main__":
    main()

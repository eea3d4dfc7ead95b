"""Benchmark volume decoding: dense chunked vs hierarchical vs hierarchical + adaptive KV,
on PyTorch and onnxruntime, same latents, same resolution, one process.

Each method is a pass pipeline: the decoder is traced to elision's IR, the volume passes run, and the result is
lowered to torch FX or ONNX Runtime (`elision.apps.volume.compile_field`), once per method and backend; that compile
time (trace + passes + lowering, ONNX export included) has its own column and is not part of the wall time. For each
resolution and backend it reports field queries evaluated, median wall time over repeats (decode only: latent side +
all field queries; marching cubes timed separately), speedup vs dense on the same backend, occupancy IoU / Chamfer /
F-score of the mesh vs the dense result, and peak RSS growth. Dense is the chunked loop over every grid point with
the latent side hoisted out of it (`hoist-invariants`): the fastest dense decoding, so the speedups are not flattered
by recomputing latent-side work per chunk.
Writes bench_results/volume.md, volume.json and volume.png (--quick: under bench_results/quick/).

Extra sections:
  fixtures   the default pipeline on EVERY fixture shape at the largest resolution: queries (deterministic)
             and sign-field fidelity vs dense (IoU, flipped signs, lost parts). Dense is computed once per
             shape for the comparison (not timed).
  kv-speed   SPEED ONLY: per-query time of the field decoder with plain vs adaptive-KV attention (fixed
             top-k, guard off) on full-size Hunyuan3D-2 and FlashVDM-turbo decoder configs with RANDOM
             weights on a shell of grid points. Timing per query is a property of the architecture; random
             weights say nothing about fidelity, so no accuracy is reported for these rows.

Dense at 384^3 is 57M queries (about 10 min on one shared core for the tiny model). `--dense-fraction F`
times dense on every (1/F)-th chunk only and EXTRAPOLATES the wall time (labelled "extrapolated" in the
table); fidelity is then computed on the sampled points only (no Chamfer). The default is a full
measurement.

Usage (the full run, on a quiet machine; about 30-40 min on 2 cores):
  .venv/bin/python tools/bench_volume.py --resolutions 128 256 384 --threads 2
Quick check (128^3 only, torch only, one repeat, plus the kv-speed rows on 2k queries; about 1-2 min):
  .venv/bin/python tools/bench_volume.py --quick
On a CUDA GPU (torch backend only; adaptive KV then runs elision's Triton sparse cross-attention):
  python tools/bench_volume.py --device cuda --dtype float16 --resolutions 128 256 384 512 --kv-queries 262144
  (writes bench_results/volume_cuda.md / .json / .png instead of volume.*)
Adaptive KV with fidelity, on the decoder whose attention is local (1024 latents):
  .venv/bin/python tools/bench_volume.py --model builtin:vecset-local --resolutions 128 256 --repeats 5 --threads 2 \
      --no-fixtures --no-kv-speed --stem volume_local
Options: [--model builtin:vecset-tiny] [--shape elephant] [--repeats 3] [--dense-repeats 1] [--topk 32] [--kv-block 16]
         [--backends torch onnxruntime] [--ort-resolutions 128 256] [--dense-fraction 1.0] [--no-fixtures]
         [--fixtures-resolution 256] [--no-kv-speed] [--kv-queries 4096] [--kv-topk 128 256 1024]
         [--device cpu|cuda] [--dtype float32|float16|bfloat16]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elision.models.vecset import FIXTURE_DIR, LOCAL_FIXTURE_DIR, fixture_latents  # noqa: E402
from elision.apps.volume import compile_field, decode_volume  # noqa: E402
from elision.cli.shape import load_vecset  # noqa: E402
from elision.apps.volume.mesh import (chamfer_fscore, extract_mesh, lost_components, occupancy_iou,  # noqa: E402
                                        render_preview)

METHODS = {
    "dense (chunked)": "hoist-invariants",
    "hierarchical": "hoist-invariants,sparse-volume",
    "hierarchical + adaptive KV": "hoist-invariants,sparse-volume,adaptive-kv{topk=%d,block=%d}",
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


def dense_sampled(field, lat, res: int, chunk: int, fraction: float) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Dense decoding timed on every (1/fraction)-th chunk only: (extrapolated wall s, flat indices of the
    sampled points, their values). The dense loop's cost is the same per chunk, so the time scales."""
    from elision.apps.volume.decode import evaluate_grid_points
    n = (res + 1) ** 3
    stride = max(1, round(1 / fraction))
    starts = list(range(0, n, chunk))[::stride]
    t0 = time.perf_counter()
    state = field.prepare(lat)
    flat, vals = [], []
    for st in starts:
        f = torch.arange(st, min(st + chunk, n))
        idx = torch.stack([f // (res + 1) ** 2, (f // (res + 1)) % (res + 1), f % (res + 1)], 1)
        vals.append(evaluate_grid_points(field, state, idx, res, chunk=chunk)[0])
        flat.append(f)
    elapsed = time.perf_counter() - t0
    n_chunks = -(-n // chunk)
    return elapsed * n_chunks / len(starts), torch.cat(flat), torch.cat(vals)


def _timed_decode(field, lat, res: int, chunk: int) -> tuple[float, object, float]:
    """(wall seconds, VolumeResult, peak RSS growth MiB) of one decode with a compiled field."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        result = decode_volume(field, lat, res, chunk=chunk)
        seconds = time.perf_counter() - t0
    return seconds, result, mem.growth_mib


def run_methods(args, model, lat) -> list[dict]:
    rows = []
    fields: dict[tuple[str, str], tuple] = {}  # (backend, method) -> (passes, compiled field, compile seconds)
    for backend in args.backends:
        for label, passes in METHODS.items():
            passes = passes % (args.topk, args.kv_block) if "%d" in passes else passes
            t0 = time.perf_counter()
            field = compile_field(model, passes, backend=backend, threads=args.threads)
            fields[backend, label] = (passes, field, time.perf_counter() - t0)
            print(f"compiled {backend:5s} {label:28s} {fields[backend, label][2]:6.1f}s {field.seconds}", flush=True)
    for res in args.resolutions:
        for backend in args.backends:
            if backend == "onnxruntime" and args.ort_resolutions is not None and res not in args.ort_resolutions:
                continue
            dense_result = dense_mesh = dense_time = sampled = None
            plans = {label: fields[backend, label] for label in METHODS}
            # the sparse methods take about a second each: time them interleaved, round by round, so a slow
            # stretch of a shared machine hits every method alike (dense runs once, on its own)
            sparse_runs: dict[str, list] = {label: [] for label, (_, field, _) in plans.items()
                                            if field.sparse_options is not None or field.kv_options is not None}
            for _ in range(args.repeats):
                for label in sparse_runs:
                    sparse_runs[label].append(_timed_decode(plans[label][1], lat, res, args.chunk))
                    print(f"r={res} {backend:5s} {label:28s} {sparse_runs[label][-1][0]:8.2f}s "
                          f"queries={sparse_runs[label][-1][1].queries:,}", flush=True)
            for label, (passes, field, compile_s) in plans.items():
                is_dense = field.sparse_options is None and field.kv_options is None
                if is_dense and args.dense_fraction < 1.0:
                    with PeakRSS() as mem:
                        dense_time, sflat, svals = dense_sampled(field, lat, res, args.chunk, args.dense_fraction)
                    sampled = (sflat, svals)
                    print(f"r={res} {backend:5s} {label:28s} {dense_time:8.2f}s EXTRAPOLATED from "
                          f"{100 * sflat.numel() / (res + 1) ** 3:.1f}% of the chunks", flush=True)
                    rows.append({"resolution": res, "backend": backend, "method": label + " [extrapolated]",
                                 "passes": passes, "queries": (res + 1) ** 3, "dense_queries": (res + 1) ** 3,
                                 "compile_s": compile_s,
                                 "wall_s": dense_time, "repeats": 1, "marching_cubes_s": float("nan"),
                                 "peak_rss_mib": mem.growth_mib, "faces": 0, "kv": None, "speedup": 1.0,
                                 "iou": 1.0, "chamfer": float("nan"), "fscore": float("nan"), "lost_parts": 0,
                                 "extrapolated_from": sflat.numel()})
                    continue
                reps = args.dense_repeats if is_dense else args.repeats
                if is_dense:
                    runs = [_timed_decode(field, lat, res, args.chunk) for _ in range(reps)]
                    print(f"r={res} {backend:5s} {label:28s} {runs[-1][0]:8.2f}s queries={runs[-1][1].queries:,}",
                          flush=True)
                else:
                    runs = sparse_runs[label]
                times, result, peak = [r[0] for r in runs], runs[-1][1], max(r[2] for r in runs)
                t_mc = time.perf_counter()
                mesh = extract_mesh(result)
                t_mc = time.perf_counter() - t_mc
                if backend == "torch" and res == max(args.resolutions):
                    tag = "dense" if is_dense else ("sparse_kv" if field.kv_options else "sparse")
                    render_preview(mesh, args.out / f"{args.stem}_{args.shape}_{res}_{tag}.png",
                                   title=f"{args.shape} r={res} {label}")
                wall = statistics.median(times)
                row = {"resolution": res, "backend": backend, "method": label, "passes": passes,
                       "queries": result.queries, "dense_queries": result.dense_queries,
                       "wall_s": wall, "field_s": statistics.median(r[1].seconds["field"] for r in runs),
                       "compile_s": compile_s, "repeats": reps, "marching_cubes_s": t_mc, "peak_rss_mib": peak,
                       "faces": len(mesh.faces), "kv": result.kv_stats}
                if is_dense:
                    dense_result, dense_mesh, dense_time = result, mesh, wall
                    # the metric's noise floor: the dense mesh against itself (two independent surface samples)
                    floor = chamfer_fscore(mesh, mesh, n=100_000, threshold=2.02 / res)
                    row |= {"speedup": 1.0, "iou": 1.0, "chamfer": floor["chamfer"], "fscore": floor["fscore"],
                            "lost_parts": 0, "metric_floor": True}
                elif sampled is not None:
                    # fidelity on the sampled dense points only
                    sflat, svals = sampled
                    a, b = result.grid.flatten()[sflat] > 0, svals > 0
                    row |= {"speedup": dense_time / wall, "iou": float((a & b).sum()) / max(int((a | b).sum()), 1),
                            "chamfer": float("nan"), "fscore": float("nan"), "lost_parts": -1,
                            "fidelity_on_sampled_points": True}
                else:
                    cf = chamfer_fscore(mesh, dense_mesh, n=100_000, threshold=2.02 / res)
                    row |= {"speedup": dense_time / wall, "iou": occupancy_iou(result, dense_result),
                            "chamfer": cf["chamfer"], "fscore": cf["fscore"],
                            "lost_parts": lost_components(dense_result, result)}
                rows.append(row)
    return rows


def run_fixtures(model, res: int, chunk: int, directory) -> list[dict]:
    """Default pipeline on every fixture: queries per level and sign fidelity vs dense (not timed)."""
    from elision.models.vecset import fixture_names
    from elision.apps.volume import DEFAULT_PIPELINE
    out = []
    for name in fixture_names(directory):
        lat = fixture_latents(name, directory)
        sparse = decode_volume(model, lat, res, DEFAULT_PIPELINE, chunk=chunk)
        dense = decode_volume(model, lat, res, "hoist-invariants", chunk=chunk)
        flips = int(((sparse.grid > 0) != (dense.grid > 0)).sum())
        row = {"shape": name, "resolution": res, "levels": sparse.levels, "queries": sparse.queries,
               "queries_per_level": sparse.queries_per_level, "dense_queries": dense.queries,
               "reduction": dense.queries / sparse.queries, "iou": occupancy_iou(sparse, dense),
               "flipped_signs": flips, "lost_parts": lost_components(dense, sparse)}
        print(f"fixture {name:10s} r={res} queries={sparse.queries:,} ({row['reduction']:.1f}x fewer) "
              f"IoU={row['iou']:.5f} flips={flips} lost={row['lost_parts']}", flush=True)
        out.append(row)
    return out


def shell_indices(res: int, n: int, block: int = 8) -> torch.Tensor:
    """n grid indices of a res^3 grid within 3 cells of a sphere (radius 0.5), taken whole block by block
    (block^3 blocks): the spatial layout of the queries hierarchical decoding leaves at its finest level."""
    from elision.apps.volume.adaptive_kv import block_ids_from_grid
    ax = torch.arange(res + 1)
    idx = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    p = idx.float() * (2.02 / res) - 1.01
    idx = idx[(p.norm(dim=1) - 0.5).abs() < 3 * 2.02 / res]
    order = torch.argsort(block_ids_from_grid(idx, block, res), stable=True)
    return idx[order[:n]]


def run_kv_speed(n_queries: int, topks: list[int], chunk: int, repeats: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> list[dict]:
    """SPEED ONLY, random weights: per-query time, plain vs adaptive KV (fixed top-k, guard off)."""
    from elision.models.vecset import HUNYUAN3D_2_TURBO_VAE, HUNYUAN3D_2_VAE, build_field
    from elision.apps.volume.adaptive_kv import AdaptiveKVOptions
    from elision.apps.volume.decode import evaluate_grid_points
    from dataclasses import replace
    idx = shell_indices(256, n_queries)
    rows = []
    for label, cfg in (("Hunyuan3D-2 VAE", HUNYUAN3D_2_VAE), ("FlashVDM turbo VAE", HUNYUAN3D_2_TURBO_VAE)):
        # the latent self-attention stack runs once per shape and does not change per-query cost
        model = build_field(replace(cfg, num_decoder_layers=0), seed=0).to(device, dtype)
        dec = compile_field(model, "hoist-invariants,adaptive-kv")
        state = dec.prepare(torch.randn(1, cfg.num_latents, cfg.embed_dim))
        settings = [("plain (full KV)", None)] + [
            (f"adaptive KV top-{k}", AdaptiveKVOptions(topk=k, block=8, samples=8, min_mass=0.0)) for k in topks]
        base = None
        evaluate_grid_points(dec, state, idx[:256], 256, chunk=chunk)  # warm-up (allocator, kernels)
        for name, kv in settings:
            times, stats = [], None
            for _ in range(repeats):
                t0 = time.perf_counter()
                _, stats = evaluate_grid_points(dec, state, idx, 256, chunk=chunk, kv=kv)
                times.append(time.perf_counter() - t0)
            us = statistics.median(times) / idx.shape[0] * 1e6
            base = us if kv is None else base
            row = {"config": label, "latents": cfg.num_latents, "width": cfg.width // cfg.geo_decoder_downsample_ratio,
                   "chunk": chunk,
                   "setting": name, "queries": int(idx.shape[0]), "us_per_query": us, "speedup": base / us,
                   "kv_fraction": stats["kv_fraction"] if stats else 1.0}
            print(f"kv-speed {label:20s} {name:22s} {us:9.4g} us/query  {base / us:4.2f}x", flush=True)
            rows.append(row)
        del model, dec, state
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:vecset-tiny")
    ap.add_argument("--shape", default="elephant")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-repeats", type=int, default=1)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--kv-block", type=int, default=16, help="adaptive-KV block edge in grid points")
    ap.add_argument("--chunk", type=int, default=8000, help="queries per call (Hunyuan default num_chunks=8000)")
    ap.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    ap.add_argument("--ort-resolutions", type=int, nargs="*", default=None,
                    help="resolutions to run on ORT (default: all); dense ORT at 384 takes long on 2 cores")
    ap.add_argument("--dense-fraction", type=float, default=1.0,
                    help="time dense on this fraction of its chunks and extrapolate (labelled); default: full")
    ap.add_argument("--no-fixtures", action="store_true", help="skip the all-fixtures fidelity section")
    ap.add_argument("--fixtures-resolution", type=int, default=256)
    ap.add_argument("--no-kv-speed", action="store_true", help="skip the full-size adaptive-KV speed section")
    ap.add_argument("--kv-queries", type=int, default=4096)
    ap.add_argument("--kv-topk", type=int, nargs="+", default=[128, 256, 1024])
    ap.add_argument("--kv-chunk", type=int, default=None, help="queries per call in the kv-speed section "
                    "(default: --chunk; a GPU wants larger chunks than the published 8000)")
    ap.add_argument("--stem", default=None, help="report file name stem (default volume, volume_cuda on a GPU)")
    ap.add_argument("--quick", action="store_true",
                    help="128^3 only, torch only, 1 repeat, fixtures at 64^3, kv-speed on 2048 queries")
    ap.add_argument("--out", type=Path, default=Path("bench_results"))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ORT alike")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the torch backend runs (cuda: torch backend only, results in volume_cuda.*)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="parameter dtype of the torch decoder (field values are compared in fp32)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not 0.0 < args.dense_fraction <= 1.0:
        ap.error(f"--dense-fraction must be in (0, 1], got {args.dense_fraction}")
    # a quick check must neither overwrite the last full results nor land in BENCHMARKS.md
    # (tools/assemble_benchmarks.py collects bench_results/*.md), hence its own subfolder
    args.stem = args.stem or ("volume" if args.device == "cpu" else f"volume_{args.device}")
    args.torch_dtype = getattr(torch, args.dtype)
    if args.device != "cpu":
        args.backends = ["torch"]  # the ONNX field artifact runs on onnxruntime's CPU provider here
    if args.quick:
        args.out = args.out / "quick"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.resolutions, args.backends, args.repeats, args.kv_queries = [128], ["torch"], 1, 2048
    torch.set_num_threads(args.threads)
    model = load_vecset(args.model)
    if args.device != "cpu" or args.torch_dtype != torch.float32:
        model = model.to(args.device, args.torch_dtype)
    # each builtin decoder has its own fitted latents
    args.fixture_dir = LOCAL_FIXTURE_DIR if args.model.endswith("vecset-local") else FIXTURE_DIR
    lat = fixture_latents(args.shape, args.fixture_dir)
    rows = run_methods(args, model, lat)
    fixtures = [] if args.no_fixtures else run_fixtures(model, 64 if args.quick else args.fixtures_resolution,
                                                        args.chunk, args.fixture_dir)
    kv_rows = [] if args.no_kv_speed else run_kv_speed(args.kv_queries, args.kv_topk, args.kv_chunk or args.chunk,
                                                       1 if args.quick else 3, args.device, args.torch_dtype)
    write_report(rows, fixtures, kv_rows, args)


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    import platform
    return f"cpu ({platform.machine()})"


def goal_check(rows: list[dict], res: int = 256) -> list[str]:
    """The issue's goals at 256^3, computed from the rows (no hand-written verdicts)."""
    out = []
    for backend in ("torch", "onnxruntime"):
        by = {r["method"].split(" [")[0]: r for r in rows if r["resolution"] == res and r["backend"] == backend}
        dense, hier, kv = (by.get(m) for m in METHODS)
        if not (dense and hier):
            continue
        fewer = hier["dense_queries"] / hier["queries"]
        line = (f"- Goal check {res}^3 {backend}: {fewer:.1f}x fewer queries (goal >= 20x: "
                f"{'met' if fewer >= 20 else 'NOT met'}), {hier['speedup']:.1f}x lower wall time (goal >= 10x: "
                f"{'met' if hier['speedup'] >= 10 else 'NOT met'}), IoU {hier['iou']:.4f} (goal >= 0.995: "
                f"{'met' if hier['iou'] >= 0.995 else 'NOT met'})")
        if kv:
            # "on the remaining queries": the time spent evaluating them; the grid bookkeeping between levels
            # is the same with and without adaptive KV, so the wall-time gain is given too
            gain = hier["field_s"] / kv["field_s"]
            chamfer_up = kv["chamfer"] / hier["chamfer"] - 1 if hier["chamfer"] else float("nan")
            line += (f"; adaptive KV {gain:.2f}x on the remaining queries (field evaluation {hier['field_s']:.2f} s "
                     f"-> {kv['field_s']:.2f} s; wall {hier['wall_s'] / kv['wall_s']:.2f}x) with KV read "
                     f"{kv['kv']['kv_fraction']:.2f} (goal >= 2x: {'met' if gain >= 2 else 'NOT met'}), Chamfer "
                     f"{kv['chamfer']:.2e} vs {hier['chamfer']:.2e} without it ({100 * chamfer_up:+.1f}%, goal <= "
                     f"+1%: {'met' if chamfer_up <= 0.01 else 'NOT met'}; the metric's noise floor is "
                     f"{dense['chamfer']:.2e})")
        out.append(line)
    return ["", *out] if out else []


def write_report(rows: list[dict], fixtures: list[dict], kv_rows: list[dict], args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps({"methods": rows, "fixtures": fixtures, "kv_speed": kv_rows},
                                                     indent=1))
    lines = [
        "## Sparse volume decoding (VecSet shape decoder)"
        + ("" if args.device == "cpu" else f" on {args.device}, chunk {args.chunk}")
        + ("" if args.model == "builtin:vecset-tiny" else f" — {args.model}"),
        "",
        f"Model `{args.model}`, latents of fixture shape `{args.shape}`, chunk {args.chunk} queries, "
        f"device {_device_name(args.device)}, {args.dtype}, torch {torch.__version__}, "
        f"{args.threads} CPU thread(s); read times as relative on a shared machine. Wall = decode (latent side + "
        f"all field queries), median of {args.repeats} runs for sparse methods and {args.dense_repeats} for dense; "
        "field s = the part of it spent evaluating field queries (the rest is grid bookkeeping between levels). "
        "Sparse methods are timed interleaved, round by round. "
        "IoU/Chamfer/F-score compare with the dense grid/mesh at the same resolution and backend "
        "(F-score threshold = one fine cell). Chamfer and F-score compare two independent 100,000-point samples "
        "of the surfaces, so they have a noise floor: the dense rows show it (the dense mesh against itself). At "
        "these resolutions the floor dominates both; an F-score below 1 at 384^3 is the sample spacing reaching "
        "one fine cell, not a difference of the meshes (IoU and lost parts are exact). "
        "Peak RSS = growth over the process RSS at start. Compile s = tracing, the passes and lowering (the ONNX "
        "export on ORT), paid once per model and pipeline, not per shape; it is not part of wall s. Dense = every "
        "grid point, chunked, with the latent side hoisted (`hoist-invariants`).",
        "",
        "| res | backend | method | queries | % of dense | wall s | field s | speedup | IoU | Chamfer | F-score | lost parts | KV read | MC s | peak RSS MiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kv = f"{r['kv']['kv_fraction']:.2f}" if r.get("kv") else "-"
        lost = "-" if r["lost_parts"] < 0 else str(r["lost_parts"])
        floor = " (floor)" if r.get("metric_floor") else ""
        lines.append(f"| {r['resolution']} | {r['backend']} | {r['method']} | {r['queries']:,} | "
                     f"{100 * r['queries'] / r['dense_queries']:.2f} | {r['wall_s']:.2f} | {r.get('field_s', float('nan')):.2f} | "
                     f"{r['speedup']:.1f}x | "
                     f"{r['iou']:.4f} | {r['chamfer']:.2e}{floor} | {r['fscore']:.4f}{floor} | {lost} | {kv} | "
                     f"{r['marching_cubes_s']:.2f} | {r['peak_rss_mib']:.0f} | {r.get('compile_s', float('nan')):.1f} |")
    lines += goal_check(rows)
    if any("extrapolated_from" in r for r in rows):
        lines += ["", f"Rows marked [extrapolated]: dense wall time measured on {args.dense_fraction:.0%} of the "
                  "chunks and scaled to all chunks; the IoU of the other rows at that resolution is computed on "
                  "the sampled points only (Chamfer/F-score/lost parts not available)."]
    if fixtures:
        lines += ["", f"### Default pipeline on every fixture shape ({fixtures[0]['resolution']}^3, sign field vs dense)",
                  "", "| shape | levels | queries per level | queries | fewer than dense | IoU | flipped signs | lost parts |",
                  "|---|---|---|---|---|---|---|---|"]
        for f in fixtures:
            lines.append(f"| {f['shape']} | {f['levels']} | {', '.join(f'{q:,}' for q in f['queries_per_level'])} | "
                         f"{f['queries']:,} | {f['reduction']:.1f}x | {f['iou']:.5f} | {f['flipped_signs']} | "
                         f"{f['lost_parts']} |")
    if kv_rows:
        lines += ["", "### Adaptive KV, SPEED ONLY (full-size configs, random weights)", "",
                  f"Per-query field-decoder time on {kv_rows[0]['queries']:,} grid points of a sphere shell at 256^3 "
                  f"in chunks of {kv_rows[0]['chunk']:,} queries "
                  "(block 8, 8 probe queries per block, retained-mass guard OFF). Random weights make attention "
                  "non-local, so these rows say nothing about fidelity; they measure what a fixed top-k saves per "
                  "query in this architecture.", "",
                  "| config | latents | decoder width | setting | us/query | speedup vs plain | KV read |",
                  "|---|---|---|---|---|---|---|"]
        for r in kv_rows:
            lines.append(f"| {r['config']} | {r['latents']} | {r['width']} | {r['setting']} | {r['us_per_query']:.4g} | "
                         f"{r['speedup']:.2f}x | {r['kv_fraction']:.2f} |")
    (args.out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for backend, marker in (("torch", "o"), ("onnxruntime", "s")):
        for method in METHODS:
            sel = [r for r in rows if r["backend"] == backend and r["method"].split(" [")[0] == method]
            if not sel:
                continue
            x = [r["resolution"] for r in sel]
            axes[0].plot(x, [r["wall_s"] for r in sel], marker=marker, label=f"{backend}: {method}")
            axes[1].plot(x, [r["queries"] for r in sel], marker=marker, label=f"{backend}: {method}")
    axes[0].set(xlabel="resolution", ylabel="decode wall time (s)", yscale="log", title="wall time (median)")
    axes[1].set(xlabel="resolution", ylabel="field queries", yscale="log", title="queries evaluated")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / f"{args.stem}.png", dpi=110)
    print((args.out / f"{args.stem}.md").read_text())


if __name__ == "__main__":
    main()

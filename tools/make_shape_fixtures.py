"""Make the VecSet test fixtures: a tiny decoder auto-decoded on real and thin shapes.

Shapes: watertight meshes from Debian's libcgal-demo (data.tar.gz, read in place) and analytic thin
parts (plate, rods, shell) thinner than a coarse cell. One shared tiny decoder (Hunyuan3D-2 layout,
`TINY_VAE`) is trained jointly with one latent set per shape; the result is written to
elision/models/builtin/vecset-fixtures/:
  vecset-tiny.safetensors        fp16 weights + config + band calibration (metadata)
  <shape>.latents.safetensors    [1, 128, 16] latents per shape
  fixtures.json                  per-shape volume IoU vs the ground truth, training log

With --local it makes `builtin:vecset-local` instead: `LOCAL_VAE` (1024 latents, width 32, no q/k norm) fitted to
the elephant with the locality term of `encode.fit` (cross-attention of small query neighbourhoods concentrated
on a few latents, as in trained VecSet decoders), written to elision/models/builtin/vecset-local/ - the model on
which adaptive KV is measured with fidelity.

Usage: .venv/bin/python tools/make_shape_fixtures.py [--steps 1200] [--minutes 10]
       .venv/bin/python tools/make_shape_fixtures.py --local [--steps 3000] [--locality 0.05]
Requires: apt-get install -y libcgal-demo
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elision.models.vecset import (FIXTURE_DIR, LOCAL_FIXTURE_DIR, LOCAL_VAE, TINY_VAE, build_field,  # noqa: E402
                                   save_checkpoint, save_latents)
from elision.apps.volume.encode import fit, lipschitz_estimate  # noqa: E402
from elision.apps.volume.shapes import PROCEDURAL, cgal_mesh, mesh_source  # noqa: E402

CGAL_SHAPES = ["elephant", "knot1"]
THIN_SHAPES = ["thin_plate", "thin_rods"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local", action="store_true", help="make builtin:vecset-local (see above)")
    ap.add_argument("--steps", type=int, default=None, help="default 1200 (3000 with --local)")
    ap.add_argument("--minutes", type=float, default=10.0, help="stop training after this long")
    ap.add_argument("--points", type=int, default=1024, help="query points per shape and step")
    ap.add_argument("--locality", type=float, default=0.05, help="weight of the locality term (--local only)")
    ap.add_argument("--out", type=Path, default=None, help="default: the builtin's fixture folder")
    args = ap.parse_args()
    config, name = (LOCAL_VAE, "vecset-local") if args.local else (TINY_VAE, "vecset-tiny")
    args.steps = args.steps or (3000 if args.local else 1200)
    args.out = args.out or (LOCAL_FIXTURE_DIR if args.local else FIXTURE_DIR)
    shapes, thin = (CGAL_SHAPES[:1], []) if args.local else (CGAL_SHAPES, THIN_SHAPES)
    # one thread: on a shared 2-core box, two spinning OpenMP threads were 10x slower per step
    torch.set_num_threads(1)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.time()
    sources = [mesh_source(cgal_mesh(n), n) for n in shapes] + [PROCEDURAL[n]() for n in thin]
    print(f"loaded {len(sources)} shapes in {time.time() - t0:.1f}s")
    model = build_field(config, seed=0).train()
    with Progress(TextColumn("fit"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                  TimeElapsedColumn()) as prog:
        task = prog.add_task("fit", total=args.steps, loss="-")
        res = fit(model, sources, steps=args.steps, points_per_shape=args.points, train_weights=True,
                  time_limit_s=args.minutes * 60, locality=args.locality if args.local else 0.0,
                  progress=lambda s, l: prog.update(task, completed=s, loss=f"{l:.4f}"))
    # Round-trip through fp16 storage before calibrating, so metadata matches what loads.
    model = model.half().float()
    lip = lipschitz_estimate(model, res.latents, sources)
    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args.out / f"{name}.safetensors", half=True)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    ckpt = args.out / f"{name}.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        meta = dict(f.metadata())
    meta["elision.vecset.lipschitz"] = f"{lip:.6f}"
    meta["elision.vecset.trunc"] = "0.05"
    save_file(load_file(str(ckpt)), str(ckpt), metadata=meta)
    for src, z in zip(sources, res.latents):
        save_latents(z, args.out / f"{src.name}.latents.safetensors", shape=src.name)
    report = {"config": json.loads(config.to_json()), "shapes": [s.name for s in sources],
              "locality": args.locality if args.local else 0.0,
              "iou_vs_ground_truth": res.iou, "steps": res.steps, "seconds": round(res.seconds, 1),
              "final_l1": res.loss, "lipschitz_q999": lip, "loss_history": res.history[::10]}
    (args.out / "fixtures.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("iou_vs_ground_truth", "steps", "seconds", "final_l1",
                                             "lipschitz_q999")}, indent=1))


if __name__ == "__main__":
    main()

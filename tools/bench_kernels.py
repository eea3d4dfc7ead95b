"""Micro-benchmark of elision's ops against the stock PyTorch ops they replace.

Runs both sides in one process on the same inputs and reports medians over repeats and ratios.

* On CPU (this project's CI machine) it times the ops' CPU implementations (the torch reference
  code behind ``torch.ops.elision.*``) against the PyTorch peer: SDPA with the same float mask,
  ``F.rms_norm`` / ``F.layer_norm`` after an eager residual add, and full cross-attention for sparse
  cross-attention.  Triton kernels are *not* timed on
  CPU: ``TRITON_INTERPRET=1`` simulates them in numpy and says nothing about their speed.
* On CUDA it times the Triton kernels (through the same ops) against the same peers.

Writes ``bench_results/kernels.md`` and ``bench_results/kernels.png`` (``kernels_cuda.*`` on a GPU).

    .venv/bin/python tools/bench_kernels.py [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from elision.kernels import ops

ROOT = Path(__file__).resolve().parents[1]


def _median_ms(fn: Callable[[], object], repeats: int, device: str) -> float:
    for _ in range(3):  # warm-up (allocator, lazy init, Triton compile on GPU)
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _tree_bias(tree_len: int, kv_len: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Prefix fully visible; tree node i sees its ancestors in a binary tree (parent (i-1)//2)."""
    prefix = kv_len - tree_len
    bias = torch.full((tree_len, kv_len), float("-inf"))
    bias[:, :prefix] = 0
    for node in range(tree_len):
        cur = node
        while cur >= 0:
            bias[node, prefix + cur] = 0
            cur = (cur - 1) // 2 if cur > 0 else -1
    return bias[None, None].to(device=device, dtype=dtype)


def _cases(device: str, dtype: torch.dtype) -> list[tuple[str, str, Callable[[], object], Callable[[], object]]]:
    """(name, shape description, elision callable, peer callable)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    cases = []
    # Tree verification step: 16 draft-tree tokens over a 512-token KV cache, GQA 8/2 heads.
    q, k, v = randn(1, 8, 16, 64), randn(1, 2, 512, 64), randn(1, 2, 512, 64)
    bias = _tree_bias(16, 512, device, dtype)
    cases.append((
        "attention (tree mask, GQA)", "B1 Hq8 Hkv2 Lq16 Lk512 D64",
        lambda: ops.attention(q, k, v, bias),
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True),
    ))
    # Prefill: causal self-attention.
    q2, k2, v2 = randn(2, 8, 256, 64), randn(2, 2, 256, 64), randn(2, 2, 256, 64)
    cases.append((
        "attention (causal prefill, GQA)", "B2 Hq8 Hkv2 L256 D64",
        lambda: ops.attention(q2, k2, v2, None, None, True),
        lambda: F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, enable_gqa=True),
    ))
    x, r, w, b = randn(8, 128, 384), randn(8, 128, 384), randn(384), randn(384)
    cases.append((
        "add + rms_norm", "8x128x384",
        lambda: ops.rms_norm(x, w, 1e-6, residual=r),
        lambda: (lambda h: (F.rms_norm(h, (384,), w, 1e-6), h))(x + r),
    ))
    cases.append((
        "add + layer_norm", "8x128x384",
        lambda: ops.layer_norm(x, w, b, 1e-5, residual=r),
        lambda: (lambda h: (F.layer_norm(h, (384,), w, b, 1e-5), h))(x + r),
    ))
    # Adaptive KV in a VecSet geometry decoder (FlashVDM): blocks of spatially coherent queries attend to their
    # own top-k latents. The peer is what it replaces: full cross-attention over every latent (SDPA).
    heads, n_q, m, top, blk = (16, 32768, 3072, 256, 512) if device == "cuda" else (8, 4096, 512, 64, 512)
    qv, kv_, vv = randn(1, heads, n_q, 64), randn(1, heads, m, 64), randn(1, heads, m, 64)
    block_index = torch.stack([torch.randperm(m, generator=gen)[:top] for _ in range(heads * (n_q // blk))])
    block_index = block_index.reshape(1, heads, n_q // blk, top).to(device)
    cases.append((
        "sparse_cross_attention vs full KV", f"H{heads} Nq{n_q} M{m} D64 block {blk} top-{top}",
        lambda: ops.sparse_cross_attention(qv, kv_, vv, block_index, blk),
        lambda: F.scaled_dot_product_attention(qv, kv_, vv),
    ))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    console = Console()
    rows = []
    cases = _cases(device, dtype)
    with torch.no_grad(), Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(cases))
        for name, shape, ours, peer in cases:
            ours_ms = _median_ms(ours, args.repeats, device)
            peer_ms = _median_ms(peer, args.repeats, device)
            rows.append((name, shape, ours_ms, peer_ms))
            progress.advance(task)

    impl = "Triton kernels" if device == "cuda" else "CPU implementations (elision.kernels.cpu / reference)"
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads"
    load = os.getloadavg()[0]  # other processes on a shared box distort CPU timings; say so
    table = Table(title=f"elision ops ({impl}) vs PyTorch — {where}, {dtype}")
    for col in ("op", "shape", "elision ms", "peer ms", "peer/elision"):
        table.add_column(col)
    lines = [
        "## Kernels: elision ops vs PyTorch" + ("" if device == "cpu" else f" on {device}"),
        "",
        f"Device: {where}; dtype {str(dtype).replace('torch.', '')}; medians of {args.repeats} runs after 3 warm-ups; "
        f"elision side = {impl}. 1-minute load average when the run ended: {load:.1f} "
        f"on {os.cpu_count()} cores.",
        "",
        "| op | shape | elision (ms) | PyTorch peer (ms) | peer / elision |",
        "|---|---|---|---|---|",
    ]
    for name, shape, ours_ms, peer_ms in rows:
        ratio = peer_ms / ours_ms
        table.add_row(name, shape, f"{ours_ms:.3f}", f"{peer_ms:.3f}", f"{ratio:.2f}x")
        lines.append(f"| {name} | {shape} | {ours_ms:.3f} | {peer_ms:.3f} | {ratio:.2f}x |")
    if device == "cpu":
        lines += [
            "",
            "Peers: SDPA with the same float mask (`enable_gqa=True`), `F.rms_norm`/`F.layer_norm` after an "
            "eager residual add, and full cross-attention (SDPA) for sparse cross-attention.",
            "On CPU the ops run their CPU implementations (SDPA / F.rms_norm / F.layer_norm based, torch "
            "reference code for sparse cross-attention), so this measures op overhead and the CPU path; the "
            "Triton kernels only run under "
            "`TRITON_INTERPRET=1` here, which simulates them in numpy, so their CPU timings would be "
            "meaningless and are not reported. On a CUDA machine this script times the Triton kernels.",
        ]
    if load > (os.cpu_count() or 1):
        lines += [
            "",
            f"**Caveat:** the machine was oversubscribed (load {load:.1f} on {os.cpu_count()} cores) during this run; "
            "CPU timings then vary several-fold from run to run, so treat the ratios as indicative only.",
        ]
    console.print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kernels" if device == "cpu" else f"kernels_{device}"
    lines += ["", "The sparse_cross_attention row's peer is full cross-attention over every latent (SDPA): the "
              "work adaptive KV removes, not the same computation (each block reads only its top-k latents)."]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r[2] for r in rows], height=0.4, label="elision")
    ax.barh([y - 0.2 for y in ys], [r[3] for r in rows], height=0.4, label="PyTorch peer")
    ax.set_yticks(list(ys), [r[0] for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("median time (ms, log scale)")
    ax.set_title(f"elision ops vs PyTorch ({where})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)
    console.print(f"wrote {args.out / f'{stem}.md'} and {args.out / f'{stem}.png'}")


if __name__ == "__main__":
    main()

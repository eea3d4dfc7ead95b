"""Benchmark: `elision serve` under concurrent HTTP load, next to one process serving the same prompts one by one.

Rows, all greedy over the same held-out code prompts (round-robin) and max_tokens, each for a bounded time:
* OrtGenerator loop: one process, one generator loaded once, one onnxruntime thread, the prompts one after another
  (the loop `elision run DIR --prompt` runs, without its per-invocation start-up);
* onnxruntime-genai loop (if `onnxruntime_genai` is installed): the same model built by genai's model builder,
  plain (non-speculative) greedy decoding, one thread, prompts one after another; checked token-identical first;
* `elision serve`, 1 and 2 replicas (1 CPU = 1 onnxruntime thread each) x batching off (`--max-batch-size 1`: a
  replica decodes one request at a time) and on (`--max-batch-size 8`: continuous batching, requests join the
  running batch between steps) x 1, 8, 32 concurrent clients, each a thread sending requests back to back over
  HTTP (loopback).
Every answer is checked against the OrtGenerator's greedy tokens and text: responses that are lost (no answer),
duplicated (a completion id seen twice) or garbled (other tokens or text) are counted, as are 503s and errors.
A last phase kills one of two replicas a third of the way into an 8-client run and reports the throughput
before the kill, until the replacement replica runs, and after.

Latency is per request (send to full response); requests/s and tokens/s are answers over the wall time of the
run. Each single-process loop runs half its time before the service starts and half after it stops. The
clients run on the same 2-core machine as the replicas, so they take CPU from them: indicative only.
Writes bench_results/serve.md and serve.png.

    .venv/bin/python tools/bench_serve.py [--artifact DIR] [--seconds 20] [--clients 1,8,32] [--replicas 1,2]
                                          [--batch-sizes 1,8] [--no-fault]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUILTIN = "builtin:tiny-code-lm"


@dataclass
class Run:
    name: str
    replicas: str
    clients: int
    batch: str = "-"  # the replicas' --max-batch-size
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # of the correct answers
    tokens: int = 0
    ok: int = 0
    garbled: int = 0
    duplicated: int = 0
    lost: int = 0
    errored: int = 0
    rejected: int = 0  # 503 + Retry-After
    done_at: list[float] = field(default_factory=list)  # completion times (s from start) of the correct answers

    def merge(self, other: "Run") -> None:
        for f in ("seconds", "tokens", "ok", "garbled", "duplicated", "lost", "errored", "rejected"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.latencies += other.latencies

    @property
    def sent(self) -> int:
        return self.ok + self.garbled + self.lost + self.errored + self.rejected

    def percentile_ms(self, q: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] * 1e3 if lat else float("nan")

    def row(self) -> str:
        return (f"| {self.name} | {self.replicas} | {self.batch} | {self.clients} | {self.sent} | "
                f"{self.ok / self.seconds:.2f} | {self.tokens / self.seconds:.0f} | {self.percentile_ms(0.5):.0f} | "
                f"{self.percentile_ms(0.95):.0f} | {self.percentile_ms(0.99):.0f} | {self.lost} | {self.duplicated} | "
                f"{self.garbled} | {self.errored} | {self.rejected} |")


def loop_run(name: str, generate, prompts: list[str], refs: dict, seconds: float) -> Run:
    """Prompts one after another in this process for `seconds`; `generate(prompt) -> tokens`."""
    run = Run(name, "-", 1)
    start = time.perf_counter()
    k = 0
    while time.perf_counter() - start < seconds:
        prompt = prompts[k % len(prompts)]
        t0 = time.perf_counter()
        tokens = generate(prompt)
        t1 = time.perf_counter()
        if tokens == refs[prompt]["tokens"]:
            run.ok += 1
            run.tokens += len(tokens)
            run.latencies.append(t1 - t0)
        else:
            run.garbled += 1
        k += 1
    run.seconds = time.perf_counter() - start
    return run


def http_run(name: str, url: str, replicas: int, clients: int, prompts: list[str], refs: dict, max_tokens: int,
             seconds: float, during=None, batch: int = 1) -> Run:
    """`clients` threads sending requests back to back for `seconds` (requests in flight at the end finish)."""
    import requests

    run = Run(name, str(replicas), clients, str(batch))
    ids: list[str] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def client(i: int) -> None:
        session = requests.Session()
        k = i
        while time.perf_counter() - start < seconds:
            prompt = prompts[k % len(prompts)]
            k += clients
            t0 = time.perf_counter()
            try:
                r = session.post(f"{url}/v1/completions", timeout=300,
                                 json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
                # a 503 + Retry-After is an answer (backpressure) whatever its body: Ray Serve's own front
                # queue answers in plain text
                body = None if r.status_code == 503 and "Retry-After" in r.headers else r.json()
            except (requests.RequestException, ValueError):
                with lock:
                    run.lost += 1
                continue
            t1 = time.perf_counter()
            with lock:
                if body is None:
                    run.rejected += 1
                elif r.status_code != 200:
                    run.errored += 1
                elif (body.get("elision", {}).get("tokens") == refs[prompt]["tokens"]
                      and body["choices"][0]["text"] == refs[prompt]["text"]):
                    run.ok += 1
                    run.tokens += len(refs[prompt]["tokens"])
                    run.latencies.append(t1 - t0)
                    run.done_at.append(t1 - start)
                    ids.append(body["id"])
                else:
                    run.garbled += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    if during is not None:
        during(start)
    for t in threads:
        t.join(timeout=seconds + 600)
    run.lost += sum(t.is_alive() for t in threads)  # a client still waiting after 10 minutes: its request is lost
    run.seconds = time.perf_counter() - start
    run.duplicated = len(ids) - len(set(ids))
    return run


def genai_model():
    """Build the built-in model with onnxruntime-genai's model builder (fp32, CPU, one thread); None if absent."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    out = Path(tempfile.mkdtemp(prefix="elision-bench-genai-"))
    src = ROOT / "elision" / "models" / "builtin" / "tiny-code-lm"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out / "m"),
                    "-p", "fp32", "-e", "cpu", "-c", str(out / "cache")], check=True, capture_output=True)
    cfg_path = out / "m" / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=1))
    return og, og.Model(str(out / "m"))


def genai_generate(og, model, ids: list[int], max_tokens: int) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_tokens, min_length=0)
    gen = og.Generator(model, params)
    gen.append_tokens([ids])
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def fault_phase(service, url: str, prompts, refs, max_tokens: int, seconds: float, batch: int) -> tuple[Run, dict]:
    """8 clients on 2 replicas for 3 x `seconds`; one replica is killed at `seconds`."""
    import ray

    from elision.apps.serve.service import generator_replica_names, wait_replicas_running

    marks: dict = {}

    def kill(start: float) -> None:
        time.sleep(max(0.0, seconds - (time.perf_counter() - start)))
        before = generator_replica_names()
        marks["kill"] = time.perf_counter() - start
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        recovered = wait_replicas_running(2, 300, replacing=before)
        marks["recovered"] = time.perf_counter() - start if recovered else float("nan")

    run = http_run("elision serve, replica killed", url, 2, 8, prompts, refs, max_tokens, 3 * seconds, during=kill,
                   batch=batch)
    windows = {"before the kill": (0.0, marks["kill"]), "until replaced": (marks["kill"], marks["recovered"]),
               "after": (marks["recovered"], run.seconds)}
    rates = {k: (sum(a <= t < b for t in run.done_at) / (b - a) if b > a else float("nan"), b - a)
             for k, (a, b) in windows.items()}
    return run, rates


def batching_ratios(runs: list[Run]) -> list[str]:
    """Batching on / off, same replicas and clients: throughput ratio and the latencies side by side."""
    off = {(r.replicas, r.clients): r for r in runs if r.batch == "1"}
    pairs = [(off[(r.replicas, r.clients)], r) for r in runs if r.batch != "1" and (r.replicas, r.clients) in off]
    if not pairs:
        return []
    out = ["", "Batching on vs off (same replicas and clients):", "",
           "| replicas | batch | clients | tokens/s off | tokens/s on | on / off | p50 ms off | p50 ms on | p95 ms off | "
           "p95 ms on |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in pairs:
        ta, tb = a.tokens / a.seconds, b.tokens / b.seconds
        out.append(f"| {b.replicas} | {b.batch} | {b.clients} | {ta:.0f} | {tb:.0f} | {tb / ta if ta else float('nan'):.2f} | "
                   f"{a.percentile_ms(0.5):.0f} | {b.percentile_ms(0.5):.0f} | {a.percentile_ms(0.95):.0f} | "
                   f"{b.percentile_ms(0.95):.0f} |")
    return out


def plot(runs: list[Run], baselines: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for replicas, batch in sorted({(r.replicas, r.batch) for r in runs}):
        pts = [r for r in runs if (r.replicas, r.batch) == (replicas, batch)]
        how = "batching off" if batch == "1" else f"continuous batches of {batch}"
        ax.plot([r.clients for r in pts], [r.tokens / r.seconds for r in pts], "o-" if batch != "1" else "s--",
                label=f"elision serve, {replicas} replica{'s' if replicas != '1' else ''}, {how}")
    for b, style in zip(baselines, ("--", ":")):
        ax.axhline(b.tokens / b.seconds, ls=style, c="grey", label=b.name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("tokens/s (correct answers)")
    ax.set_title("builtin:tiny-code-lm over HTTP (greedy, CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help=f"a generation artifact of {BUILTIN} (else compiled now)")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each run")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--batch-sizes", default="1,8", help="replica --max-batch-size values (1: batching off)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--port", type=int, default=8437)
    parser.add_argument("--no-fault", action="store_true", help="skip the replica-kill phase")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "serve.md")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    load_at_start = os.getloadavg()[0]  # printed with the results: on a busy machine they are noise-heavy

    from elision.apps.serve.service import ServeOptions, Service
    from elision.models import code_lm
    from elision.runtime.generation.ort_generator import OrtGenerator

    art = args.artifact
    if art is None:
        from elision.apps.specdec.artifact import export_generation_artifact

        art = Path(tempfile.mkdtemp(prefix="elision-bench-serve-")) / "artifact"
        export_generation_artifact(BUILTIN, art)
    prompts = [p["text"] for p in code_lm.load_prompts()["code"][: args.prompts]]
    gen = OrtGenerator.load(art, threads=1)
    refs = {}
    for p in prompts:
        r = gen.generate(p, args.max_tokens)
        refs[p] = {"tokens": r.tokens, "text": r.text}

    loops = {"OrtGenerator loop, 1 process": lambda p: gen.generate(p, args.max_tokens).tokens}
    genai_note = ""
    built = genai_model()
    if built is None:
        genai_note = "onnxruntime-genai is not installed in this environment: its row is left out."
    else:
        og, model = built
        for p in prompts:  # the peer must produce the reference tokens before its speed counts
            got = genai_generate(og, model, gen.encode(p), args.max_tokens)
            if got != refs[p]["tokens"]:
                raise SystemExit(f"onnxruntime-genai's greedy tokens differ from elision's for prompt {p[:30]!r}")
        loops["onnxruntime-genai loop (plain greedy), 1 process"] = \
            lambda p: genai_generate(og, model, gen.encode(p), args.max_tokens)
    # half of each loop's time before the service runs and half after it stopped: load from other processes on a
    # shared machine then hits the loops and the service alike
    baselines = [loop_run(name, fn, prompts, refs, args.seconds / 2) for name, fn in loops.items()]

    clients = [int(c) for c in args.clients.split(",")]
    replica_counts = [int(r) for r in args.replicas.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    max_queued = max(clients) + 8  # no 503 by design: the queue holds every client's request
    service = Service(art, ServeOptions(replicas=replica_counts[0], port=args.port, ray_cpus=os.cpu_count(),
                                        replica_cpus=1.0, max_queued=max_queued, max_batch_size=batch_sizes[0]))
    service.start()
    url = service.url
    runs: list[Run] = []
    fault = None
    try:
        for replicas in replica_counts:
            for batch in batch_sizes:
                service.set_replicas(replicas, max_batch_size=batch)
                http_run("warm-up", url, replicas, replicas * batch, prompts, refs, args.max_tokens, 2.0, batch=batch)
                for c in clients:
                    runs.append(http_run("elision serve", url, replicas, c, prompts, refs, args.max_tokens,
                                         args.seconds, batch=batch))
                    print(runs[-1].row(), flush=True)
        if not args.no_fault:
            service.set_replicas(2, max_batch_size=batch_sizes[-1])
            fault = fault_phase(service, url, prompts, refs, args.max_tokens, args.seconds, batch_sizes[-1])
    finally:
        service.shutdown()
    for b, (name, fn) in zip(baselines, loops.items()):
        b.merge(loop_run(name, fn, prompts, refs, args.seconds / 2))

    head = ("| server | replicas | batch | clients | requests | requests/s | tokens/s | p50 ms | p95 ms | p99 ms | lost | "
            "duplicated | garbled | errors | 503 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"# `elision serve`: HTTP throughput and latency ({BUILTIN}, CPU, {os.cpu_count()} cores)", "",
             f"Greedy, max_tokens={args.max_tokens}, {len(prompts)} held-out code prompts round-robin, "
             f"{args.seconds:g} s per run; replicas of 1 CPU (1 onnxruntime thread each), drafter recycling+lookup, "
             "dynamic tree; batch: the replicas' `--max-batch-size` (1: batching off; more: continuous batching, "
             "requests join the running batch between decoding steps). Every answer checked against the "
             "single-process greedy tokens and text. Clients share the machine with the replicas (1-minute load "
             f"average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end). Command: "
             f"`python tools/bench_serve.py {' '.join(sys.argv[1:])}`.", "", head]
    lines += [b.row() for b in baselines] + [r.row() for r in runs]
    lines += batching_ratios(runs)
    if genai_note:
        lines += ["", genai_note]
    if fault is not None:
        run, rates = fault
        lines += ["", f"## One of two replicas killed ({run.clients} clients, {run.seconds:.0f} s)", "", head, run.row(),
                  "", "| window | seconds | answers/s |", "|---|---:|---:|"]
        lines += [f"| {k} | {d:.1f} | {r:.2f} |" for k, (r, d) in rates.items()]
        lines += ["", f"Sent {run.sent}: answered {run.ok} + errors {run.errored} + 503 {run.rejected} + garbled "
                      f"{run.garbled} + lost {run.lost}."]
    lines += ["", "![serve](serve.png)", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    plot(runs, baselines, args.out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

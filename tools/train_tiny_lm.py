"""Train the tiny code language models that elision ships (`builtin:tiny-code-lm` and its draft).

Both are real Hugging Face `LlamaForCausalLM` models trained from scratch on the Python standard
library source that ships with the interpreter, with a byte-level BPE tokenizer trained here with
the `tokenizers` library. A FIXED list of stdlib files (HELDOUT_FILES) never enters training; it
provides held-out loss and the benchmark/demo prompts (prompts.json).

Outputs (HF-style directories that load offline with AutoTokenizer / AutoModelForCausalLM):

    elision/models/builtin/tiny-code-lm/        target model (float16 safetensors)
    elision/models/builtin/tiny-code-lm-draft/  draft model, same tokenizer

each with config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, heldout_files.json, prompts.json and train_log.json.

Usage:
    .venv/bin/python tools/train_tiny_lm.py                       # both models, default sizes
    .venv/bin/python tools/train_tiny_lm.py --which draft --draft-steps 300
    .venv/bin/python tools/train_tiny_lm.py --out-root /tmp/lm --steps 20 --draft-steps 20  # smoke run

Determinism: seeds fix tokenizer training order, batch sampling and init; CPU float32 training
is reproducible for a fixed thread count.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_ROOT = REPO_ROOT / "elision" / "models" / "builtin"
TARGET_NAME = "tiny-code-lm"
DRAFT_NAME = "tiny-code-lm-draft"

# Held-out stdlib files (paths relative to the stdlib directory). Fixed and present in every
# CPython 3.10-3.13, so the split is the same on any machine that reruns this script.
HELDOUT_FILES = [
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "difflib.py",
    "fractions.py",
    "gettext.py",
    "heapq.py",
    "json/encoder.py",
    "sched.py",
    "shlex.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
]

# Directories that are test suites, generated tables or GUI demos rather than ordinary library code.
_EXCLUDED_DIRS = {
    "site-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload", "__phello__",
    "encodings", "turtledemo", "ensurepip",
}

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(root: Path) -> list[str]:
    """All library .py files under `root` (relative, sorted), minus test suites and tables."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        out.append(rel.as_posix())
    return out


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def split_files(root: Path) -> tuple[list[str], list[str]]:
    files = list_stdlib_files(root)
    missing = [f for f in HELDOUT_FILES if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"error: held-out files missing from {root}: {missing}; "
                         "run with a CPython 3.10-3.13 interpreter")
    held = set(HELDOUT_FILES)
    return [f for f in files if f not in held], list(HELDOUT_FILES)


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation) wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def encode_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Concatenate documents into one id stream, each followed by EOS."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    # The raw `tokenizers` backend: no max-length warning, batch-parallel encoding.
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------
def _first_sentences(doc: str, max_chars: int) -> str:
    text = " ".join(doc.split())
    if len(text) <= max_chars:
        return text
    cut = text.rfind(". ", 0, max_chars)
    return text[: cut + 1] if cut > 40 else text[:max_chars]


def build_prompts(root: Path, heldout: list[str], tokenizer, n_code: int = 8, n_prose: int = 8,
                  code_prompt_tokens: int = 128) -> dict:
    """Held-out code prompts (a function's opening lines) and English prose prompts (docstrings).

    Code prompts end at a line boundary after a function's signature + docstring region so the
    natural continuation is the body; prose prompts open a docstring with real stdlib prose.
    """
    code, prose = [], []
    for rel in heldout:
        src = read_text(root / rel)
        tree = ast.parse(src)
        lines = src.splitlines(keepends=True)
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.end_lineno - n.lineno >= 12]
        funcs.sort(key=lambda n: n.lineno)
        if funcs and len(code) < n_code:
            fn = funcs[len(funcs) // 2]
            # Grow the prompt line by line from the def until it reaches ~code_prompt_tokens.
            text = ""
            for ln in range(fn.lineno - 1, fn.end_lineno):
                cand = text + lines[ln]
                if len(tokenizer(cand, add_special_tokens=False)["input_ids"]) > code_prompt_tokens:
                    break
                text = cand
            if text.strip():
                code.append({"file": rel, "function": fn.name, "line": fn.lineno, "text": text})
        docs = [ast.get_docstring(tree)] + [ast.get_docstring(n) for n in ast.walk(tree)
                                             if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        docs = [d for d in docs if d and len(d.split()) >= 25 and "\n>>>" not in d]
        if docs and len(prose) < n_prose:
            doc = max(docs, key=len)
            prose.append({"file": rel, "text": '"""' + _first_sentences(doc, 400) + "\n\n"})
    return {
        "description": "Prompts from held-out stdlib files (never trained on). 'code': a function's "
                       "opening lines; 'prose': the opening of an English docstring.",
        "code": code,
        "prose": prose,
    }


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def make_model(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
               intermediate: int, context: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        rope_theta=10000.0,
        tie_word_embeddings=True,  # halves the embedding bytes; standard for small LMs
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(cfg)


def sample_batch(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
    return torch.stack([stream[s: s + seq + 1] for s in starts.tolist()])


@torch.no_grad()
def mean_loss(model, stream: torch.Tensor, seq: int, n_windows: int, batch: int = 8) -> float:
    """Mean per-token cross-entropy (nats) over n_windows evenly spaced windows of `stream`."""
    model.eval()
    span = len(stream) - seq - 1
    starts = [int(i * span / max(n_windows - 1, 1)) for i in range(n_windows)]
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        x = torch.stack([stream[s: s + seq + 1] for s in starts[i: i + batch]])
        logits = model(input_ids=x[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def train_model(model, train_stream, held_stream, *, steps: int, batch: int, seq: int, lr: float,
                seed: int, eval_windows: int, label: str, console, max_minutes: float | None = None) -> dict:
    """AdamW with warmup + cosine decay. With `max_minutes`, training also stops at that wall-clock
    budget and the schedule follows whichever of steps/time runs out first (so the LR still decays
    on a loaded machine; such runs are not bit-reproducible, step-bound runs are)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    warmup = max(1, min(50, steps // 10))

    budget_s = max_minutes * 60 if max_minutes else None

    def lr_at(step: int, elapsed: float) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        if budget_s:
            frac = max(frac, elapsed / budget_s)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    model.train()
    t0 = time.time()
    ema = None
    history = []
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console) as progress:
        task = progress.add_task(label, total=steps, loss="-")
        done = 0
        for step in range(steps):
            elapsed = time.time() - t0
            if budget_s and elapsed > budget_s:
                console.print(f"{label}: wall-clock budget of {max_minutes} min reached after {step} steps")
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, elapsed)
            x = sample_batch(train_stream, batch, seq, gen)
            logits = model(input_ids=x[:, :-1], use_cache=False).logits  # no KV cache when training
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if step % 25 == 0 or step == steps - 1:
                history.append({"step": step, "train_loss_ema": round(ema, 4)})
                if not console.is_terminal:  # the live bar does not render into log files
                    console.print(f"{label} step {step + 1}/{steps} loss {ema:.3f} ({time.time() - t0:.0f}s)")
            progress.update(task, advance=1, loss=f"{ema:.3f}")
            done = step + 1
    train_s = time.time() - t0
    model.eval()
    train_loss = mean_loss(model, train_stream, seq, eval_windows)
    held_loss = mean_loss(model, held_stream, seq, eval_windows)
    console.print(f"[bold]{label}[/]: {done} steps in {train_s:.0f}s "
                  f"({done * batch * seq / max(train_s, 1e-9):.0f} tok/s); "
                  f"train loss {train_loss:.3f}, held-out loss {held_loss:.3f} nats/token "
                  f"(uniform = {math.log(model.config.vocab_size):.3f})")
    return {"steps": done, "steps_planned": steps, "max_minutes": max_minutes, "batch": batch, "seq_len": seq, "lr": lr, "seed": seed,
            "train_seconds": round(train_s, 1), "train_loss": round(train_loss, 4),
            "heldout_loss": round(held_loss, 4), "eval_windows": eval_windows, "history": history}


def save_model_dir(out: Path, model, tokenizer, heldout: list[str], prompts: dict, log: dict) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float16)
    model.config.dtype = "float16"
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=False,
                     max_new_tokens=128).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "heldout_files.json").write_text(json.dumps(
        {"stdlib_relative_paths": heldout,
         "note": "never used for training; held-out loss and prompts come from these files"},
        indent=2) + "\n")
    (out / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-root", type=Path, default=DEFAULT_OUT_ROOT)
    p.add_argument("--which", choices=["both", "target", "draft"], default="both")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512, help="training window (the full context, so generation never leaves trained positions)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock cap per model (for loaded machines; makes the run time-dependent)")
    # target
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    # draft
    p.add_argument("--draft-steps", type=int, default=900)
    p.add_argument("--draft-lr", type=float, default=4e-3)
    p.add_argument("--draft-hidden", type=int, default=128)
    p.add_argument("--draft-layers", type=int, default=2)
    p.add_argument("--draft-heads", type=int, default=4)
    p.add_argument("--draft-kv-heads", type=int, default=2)
    p.add_argument("--draft-intermediate", type=int, default=344)
    args = p.parse_args(argv)

    console = Console()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    root = stdlib_dir()
    train_files, heldout = split_files(root)
    console.print(f"stdlib {root}: {len(train_files)} training files, {len(heldout)} held-out files")
    train_texts = [read_text(root / f) for f in train_files]
    held_texts = [read_text(root / f) for f in heldout]

    target_dir = args.out_root / TARGET_NAME
    draft_dir = args.out_root / DRAFT_NAME
    t0 = time.time()
    if args.which == "draft" and (target_dir / "tokenizer.json").is_file():
        # The draft must share the target's tokenizer: reuse it instead of retraining.
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(target_dir)
        console.print(f"reusing tokenizer from {target_dir}")
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab_size)
        console.print(f"trained byte-level BPE tokenizer (vocab {len(tokenizer)}) in {time.time() - t0:.0f}s")
        if args.which == "target":  # lets a concurrent `--which draft` run reuse it right away
            target_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save_pretrained(target_dir)
    train_stream = encode_stream(tokenizer, train_texts)
    held_stream = encode_stream(tokenizer, held_texts)
    console.print(f"tokens: train {len(train_stream):,}, held-out {len(held_stream):,} "
                  f"({sum(map(len, train_texts)) / len(train_stream):.2f} chars/token)")
    prompts = build_prompts(root, heldout, tokenizer)

    common = {"python": sys.version.split()[0], "torch": torch.__version__, "threads": args.threads,
              "train_files": len(train_files), "train_tokens": len(train_stream),
              "heldout_tokens": len(held_stream), "vocab_size": len(tokenizer)}
    specs = []
    if args.which in ("both", "target"):
        specs.append((target_dir, TARGET_NAME, args.hidden, args.layers, args.heads, args.kv_heads,
                      args.intermediate, args.steps, args.lr))
    if args.which in ("both", "draft"):
        specs.append((draft_dir, DRAFT_NAME, args.draft_hidden, args.draft_layers, args.draft_heads,
                      args.draft_kv_heads, args.draft_intermediate, args.draft_steps, args.draft_lr))
    for out, name, hidden, layers, heads, kv_heads, inter, steps, lr in specs:
        torch.manual_seed(args.seed)
        model = make_model(len(tokenizer), hidden, layers, heads, kv_heads, inter, args.context, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        console.print(f"{name}: LlamaForCausalLM hidden={hidden} layers={layers} heads={heads}/{kv_heads} "
                      f"params={n_params / 1e6:.2f}M")
        log = train_model(model, train_stream, held_stream, steps=steps, batch=args.batch_size,
                          seq=args.seq_len, lr=lr, seed=args.seed, eval_windows=args.eval_windows,
                          label=name, console=console, max_minutes=args.max_minutes)
        log.update(common, params=n_params, hidden=hidden, layers=layers)
        save_model_dir(out, model, tokenizer, heldout, prompts, log)
        size = (out / "model.safetensors").stat().st_size
        console.print(f"saved {out} (model.safetensors {size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Calibration data that ships with the environment (no downloads).

* English text: docstrings of Python standard-library modules (all-MiniLM-L6-v2 calibration/eval).
* Fashion-MNIST: the 500-image test sample committed with `builtin:fashion-vit`.
"""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import torch

FASHION_DIR = Path(__file__).resolve().parents[2] / "models" / "builtin" / "fashion-vit"
_STDLIB_MODULES = ["json", "os", "re", "inspect", "collections", "functools", "itertools", "pathlib", "argparse",
                   "logging", "subprocess", "threading", "asyncio", "typing", "dataclasses", "string", "textwrap",
                   "shutil", "tempfile", "socket", "email", "http.client", "urllib.parse", "xml.dom.minidom",
                   "csv", "sqlite3", "zipfile", "tarfile", "gzip", "pickle", "copy", "heapq", "bisect", "random",
                   "statistics", "decimal", "fractions", "datetime", "calendar", "unittest", "doctest", "pdb",
                   "ast", "dis", "tokenize", "codecs", "locale", "gettext", "hashlib", "hmac", "secrets", "uuid"]


def stdlib_paragraphs(n: int, min_words: int = 20, max_words: int = 400, offset: int = 0) -> list[str]:
    """`n` English paragraphs (docstrings of stdlib modules, classes and functions), deterministic order."""
    out: list[str] = []
    seen: set[str] = set()
    for mod_name in _STDLIB_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # a module missing on this Python build is skipped
            continue
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) else None
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                words = text.split()
                if min_words <= len(words) <= max_words and text not in seen and not text.startswith(">>>"):
                    seen.add(text)
                    out.append(text)
    if len(out) < n + offset:
        raise ValueError(f"only {len(out)} stdlib paragraphs available, asked for {n + offset}")
    return out[offset : offset + n]


def long_texts(n: int, words: int, offset: int = 0) -> list[str]:
    """`n` texts of about `words` words made by joining consecutive stdlib paragraphs (for seq 512)."""
    paras = stdlib_paragraphs(n * 12 + 40, offset=offset)
    out, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(len(c.split()) for c in cur) >= words:
            out.append(" ".join(cur))
            cur = []
            if len(out) == n:
                break
    return out


def tokenize(tokenizer, texts: list[str], seq_len: int, pad_to_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length" if pad_to_max else True, truncation=True, max_length=seq_len,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def fashion_sample(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values (n,1,28,28) normalised, labels (n,)) from the committed Fashion-MNIST test sample."""
    from safetensors.torch import load_file

    path = FASHION_DIR / "test_sample.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run tools/train_fashion_vit.py to create it")
    data = load_file(str(path))
    x, y = data["pixel_values"], data["labels"]
    return (x, y) if n is None else (x[:n], y[:n])

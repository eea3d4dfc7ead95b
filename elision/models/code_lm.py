"""The tiny trained code LMs: `builtin:tiny-code-lm` and its draft `builtin:tiny-code-lm-draft`.

Both are real Hugging Face `LlamaForCausalLM` checkpoints trained on the Python standard library by
`tools/train_tiny_lm.py` and committed as HF-style directories (float16 safetensors + tokenizer)
under `elision/models/builtin/`. They share one byte-level BPE tokenizer, so the draft can assist
the target in speculative decoding. `build` returns the unwrapped HF model in float32 eval mode;
front ends that need a logits-only module wrap it themselves.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from elision.models.builtin_model import BuiltinModel

BUILTIN_DIR = Path(__file__).parent / "builtin"
CODE_LM_NAMES = ("tiny-code-lm", "tiny-code-lm-draft")
_RETRAIN_HINT = "regenerate it with `.venv/bin/python tools/train_tiny_lm.py`"


def builtin_dir(name: str) -> Path:
    """Directory of a committed code LM checkpoint (`tiny-code-lm` or `tiny-code-lm-draft`).

    Accepts the bare name or the `builtin:` spec. Raises a ValueError for unknown names and a
    FileNotFoundError (with the command that recreates it) when the checkpoint is missing.
    """
    bare = name.removeprefix("builtin:")
    if bare not in CODE_LM_NAMES:
        raise ValueError(f"unknown code LM {name!r}; expected one of: {', '.join(CODE_LM_NAMES)}")
    path = BUILTIN_DIR / bare
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"checkpoint for {bare!r} not found at {path}; {_RETRAIN_HINT}")
    return path


def load_tokenizer(name: str = "tiny-code-lm"):
    """The shared byte-level BPE tokenizer (a HF fast tokenizer), loaded offline."""
    return AutoTokenizer.from_pretrained(builtin_dir(name), local_files_only=True)


def load_model(name: str = "tiny-code-lm", dtype: torch.dtype = torch.float32):
    """The real `LlamaForCausalLM`, in eval mode, cast from the stored float16 to `dtype`."""
    model = AutoModelForCausalLM.from_pretrained(builtin_dir(name), dtype=dtype, local_files_only=True)
    return model.eval()


def load_prompts(name: str = "tiny-code-lm") -> dict[str, list[dict[str, Any]]]:
    """Held-out prompts: {"code": [{"file", "function", "line", "text"}], "prose": [{"file", "text"}]}."""
    return json.loads((builtin_dir(name) / "prompts.json").read_text())


def heldout_files(name: str = "tiny-code-lm") -> list[str]:
    """Stdlib-relative paths of the files excluded from training."""
    return json.loads((builtin_dir(name) / "heldout_files.json").read_text())["stdlib_relative_paths"]


def _example_inputs(model) -> tuple[torch.Tensor]:
    # Deterministic ids from the real vocabulary; (2, 16) so batch and seq are both dynamic (>= 2).
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(2, model.config.vocab_size, (2, 16), generator=gen, dtype=torch.int64),)


def _builtin(name: str, description: str) -> BuiltinModel:
    return BuiltinModel(name=name, description=description, build=lambda: load_model(name),
                        example_inputs=_example_inputs, dynamic_dims={0: {0: "batch", 1: "seq"}}, kind="causal-lm")


BUILTINS = [
    _builtin("tiny-code-lm", "LlamaForCausalLM (hidden 256, 4 layers, 4/2 heads, vocab 4096, context 512) trained on "
                             "Python stdlib source; target model for speculative decoding"),
    _builtin("tiny-code-lm-draft", "LlamaForCausalLM (hidden 128, 2 layers) trained on Python stdlib source with the "
                                   "tiny-code-lm tokenizer; draft model for speculative decoding"),
]

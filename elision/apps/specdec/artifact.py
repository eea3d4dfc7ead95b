"""The generation artifact: what `elision compile MODEL --emit onnx --for generate -o DIR` writes.

    DIR/manifest.json     runtime_settings: kind "specdec-generate", the specdec attributes, and "generation":
                          EOS ids, position limit, vocabulary, K/V layout (heads, head dim, buffer order), dtype
    DIR/verify.onnx       the compiled step function (canonicalize,cse,kv-cache,tree-verify,dce)
    DIR/weights.bin
    DIR/tokenizer.json    the model's fast tokenizer (+ tokenizer_config.json ...), sha256-checked like the graphs

`elision run DIR --prompt TEXT` (`elision.runtime.generation.ort_generator`) generates from it with onnxruntime,
numpy and tokenizers only.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from elision.runtime.generation.ort_generator import GENERATION_KIND

# a string with code, prose, spaces and non-ASCII text: the exported tokenizer must split it like the HF one
_TOKENIZER_PROBE = "def f(x):\n    return x  # ok\nThe café costs 3 €."


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS ids the way Hugging Face `generate` reads them (generation config first), else the tokenizer's."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = getattr(model.config, "eos_token_id", None)
    if value is None:
        value = tokenizer.eos_token_id
    if value is None:
        return []
    return sorted({int(value)} if isinstance(value, int) else {int(v) for v in value})


def _save_tokenizer(tokenizer, directory: Path) -> dict[str, Path]:
    """Write the tokenizer as Hugging Face saves it; {file name: path}. Needs a fast (tokenizer.json) tokenizer."""
    from tokenizers import Tokenizer

    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError("the generation artifact needs a fast tokenizer (tokenizer.json); this model only has a "
                         f"slow {type(tokenizer).__name__}")
    tokenizer.save_pretrained(directory)
    tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
    exported = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(_TOKENIZER_PROBE).ids
    if list(exported) != list(tokenizer(_TOKENIZER_PROBE).input_ids):
        raise ValueError("the model's tokenizer adds tokens in Python that tokenizer.json does not describe, so a "
                         "torch-free loop would encode prompts differently; use `elision generate` for this model")
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file() and p.suffix in (".json", ".jinja", ".txt")}


def export_generation_artifact(model_spec: str, out_dir: Path,
                               progress: Callable[[str], None] | None = None) -> dict:
    """Compile MODEL (HF causal-LM directory or builtin:NAME) for speculative decoding and write the artifact.

    Returns a report: the pipeline, the written files and the generation settings.
    """
    from elision.apps.specdec.loading import load_causal_lm
    from elision.apps.specdec.compiled_backend import compile_specdec, export_specdec_onnx

    if progress:
        progress(f"loading {model_spec}")
    model, tokenizer = load_causal_lm(model_spec)
    if progress:
        progress("compiling @verify (export, kv-cache, tree-verify)")
    spec = compile_specdec(model)
    a, config = spec.attrs, spec.config
    fn = spec.ir.functions["verify"]
    generation = {
        "function": "verify",
        "tokenizer": "tokenizer.json",
        "eos_token_ids": _eos_ids(model, tokenizer),
        "max_positions": config["max_positions"],
        "vocab_size": config["vocab_size"],
        "sliding_window": config["sliding_window"],
        "dtype": config["dtype"],
        # K/V: one [batch, kv_heads, past, head_dim] input per layer and kind, in this order; `verify` returns
        # the new [batch, kv_heads, n, head_dim] slices in the same order after the logits
        "kv_layers": int(a["num_layers"]),
        "kv_heads": int(a["kv_heads"]),
        "head_dim": int(a["head_dim"]),
        "kv_inputs": [v.name for v in fn.inputs[3:]],
    }
    with tempfile.TemporaryDirectory(prefix="elision-tokenizer-") as tmp:
        files = _save_tokenizer(tokenizer, Path(tmp))
        out = export_specdec_onnx(spec, out_dir, functions=("verify",), progress=progress,
                                  settings={"kind": GENERATION_KIND, "generation": generation}, extra_files=files)
    return {"pipeline": spec.pipeline, "generation": generation,
            "written": [str(p) for p in sorted(Path(out).iterdir()) if p.is_file()]}

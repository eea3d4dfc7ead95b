"""Load a Hugging Face causal LM and its tokenizer for speculative decoding (offline unless a Hub id must be
downloaded), in the dtype and on the device of a Placement (default float32 on the CPU)."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from elision.errors import ModelSpecError
from elision.frontend.hub import looks_like_hub_id, resolve_hub_id
from elision.frontend.placement import DEFAULT, Placement
from elision.models import code_lm


def load_causal_lm(spec: str, placement: Placement = DEFAULT):
    """(model, tokenizer) from a HF directory, a Hub id (org/name) or a `builtin:` name; raises ValueError with
    what to do (PlacementError when the device is absent)."""
    placement.check_available()
    hf_logging.disable_progress_bar()  # quiet by default: no "Loading weights" bar in CLI output

    if spec.startswith("builtin:"):
        try:
            path = code_lm.builtin_dir(spec)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(str(e)) from None
    elif looks_like_hub_id(spec):
        try:
            path = resolve_hub_id(spec)
        except ModelSpecError as e:
            raise ValueError(str(e)) from None
    else:
        path = Path(spec)
        if not path.is_dir():
            raise ValueError(f"model directory {spec!r} does not exist; pass a Hugging Face causal LM directory, a Hub "
                             f"id (org/name) or builtin:tiny-code-lm")
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{spec!r} has no config.json: it is not a Hugging Face model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any tokenizer loading failure becomes one clear line
        raise ValueError(f"could not load a tokenizer from {spec!r} ({type(e).__name__}); the directory needs tokenizer files") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=placement.torch_dtype).eval()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"could not load a causal LM from {spec!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return placement.place_model(model), tokenizer

"""Save and load IR modules: textual IR plus a safetensors file of parameters (never pickle)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from elision.ir.core import IRError, Module
from elision.ir.parser import parse

IR_FILE = "module.ir"
PARAMS_FILE = "params.safetensors"


def save_module(module: Module, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / IR_FILE).write_text(module.print())
    tensors = {k: v.detach().contiguous().clone() for k, v in module.params.items() if v.device.type != "meta"}
    save_file(tensors, str(out / PARAMS_FILE))
    return out


def load_module(path: str | Path) -> Module:
    p = Path(path)
    if not (p / IR_FILE).is_file():
        raise IRError(f"{p} holds no {IR_FILE}: not an IR directory written by `elision compile --emit ir`")
    params: dict[str, torch.Tensor] = {}
    if (p / PARAMS_FILE).is_file():
        try:
            params = load_file(str(p / PARAMS_FILE))
        except (SafetensorError, OSError) as e:
            raise IRError(f"{p / PARAMS_FILE} is corrupt: {e}") from None
    return parse((p / IR_FILE).read_text(), params=params)

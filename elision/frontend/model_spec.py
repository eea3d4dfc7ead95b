"""Model specs, accepted everywhere (CLI, Python API, tests), resolved to a model and example inputs:

  * a Hugging Face model directory (``config.json`` + ``*.safetensors``),
  * ``builtin:NAME`` (see :mod:`elision.models.registry`),
  * ``package.module:factory`` — a callable returning a module, or ``(module, example_inputs)``,
  * a Hugging Face Hub id ``org/name`` (resolved through the local Hugging Face cache, see :mod:`.hub`).

Every spec loads in the dtype, on the device and with the threads of a :class:`~.placement.Placement`.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from elision.errors import ModelSpecError, UntrustedCodeError
from elision.frontend.hub import looks_like_hub_id, resolve_hub_id
from elision.frontend.placement import DEFAULT, Placement
from elision.models.registry import get_builtin


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    example_inputs: tuple
    dynamic_dims: dict = field(default_factory=dict)
    kind: str = "generic"
    input_names: list[str] | None = None
    source: str = ""  # the spec it came from
    tokenizer: Any = None


# --------------------------------------------------------------------------------------------- specs
_FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
TRUST_HINT = "pass --trust-code (trust_code=True in Python) if you trust that code"


def load_model(spec: str, *, trust_code: bool = False, placement: Placement = DEFAULT) -> LoadedModel:
    """Resolve `spec` to a model and example inputs, both in `placement`'s dtype and on its device.

    trust_code: allow `package.module:factory` specs, which import a module and call a function in it (any Python
    code can run, as with Hugging Face's trust_remote_code). Without it such a spec raises UntrustedCodeError.
    """
    placement.check_available()  # before a possibly long load
    lm = _load_unplaced(spec, trust_code, placement)
    lm.model = placement.place_model(lm.model)
    lm.example_inputs = placement.place_inputs(lm.example_inputs)
    return lm


def _load_unplaced(spec: str, trust_code: bool, placement: Placement) -> LoadedModel:
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("empty model spec: give a Hugging Face model directory or Hub id, builtin:NAME, or "
                             "package.module:factory")
    if spec.startswith("builtin:"):
        return _load_builtin(spec[len("builtin:"):], spec)
    if os.path.isdir(spec):
        return _load_hf_dir(Path(spec), placement)
    if looks_like_hub_id(spec):
        lm = _load_hf_dir(resolve_hub_id(spec), placement)
        lm.name, lm.source = spec, spec
        return lm
    if ":" in spec and not os.path.exists(spec):
        if not _FACTORY_SPEC.match(spec):
            raise ModelSpecError(f"cannot resolve model spec {spec!r}: it is neither a directory, builtin:NAME, nor "
                                 f"package.module:factory (dotted module name, a colon, a function name)")
        if not trust_code:
            module, _, factory = spec.partition(":")
            raise UntrustedCodeError(f"model spec {spec!r} would import {module} and call {factory}(), running "
                                     f"arbitrary Python code; {TRUST_HINT}")
        return _load_factory(spec)
    if os.path.exists(spec):
        raise ModelSpecError(f"{spec} is a file, not a model directory: pass the directory that holds config.json and the safetensors weights")
    raise ModelSpecError(f"cannot resolve model spec {spec!r}: no such directory; use a Hugging Face model directory "
                         f"or Hub id (org/name), builtin:NAME (see `elision inspect --list-builtins`), or package.module:factory")


def _load_builtin(name: str, spec: str) -> LoadedModel:
    try:
        entry = get_builtin(name)
    except KeyError as e:
        raise ModelSpecError(e.args[0]) from None
    model = entry.build()
    model.eval()
    return LoadedModel(entry.name, model, tuple(entry.example_inputs(model)), dict(entry.dynamic_dims), entry.kind,
                       _input_names(model, len(entry.example_inputs(model))), spec)


def _load_factory(spec: str) -> LoadedModel:
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelSpecError(f"cannot import module {mod_name!r} from spec {spec!r}: {e}") from None
    except Exception as e:  # the module's own code failed while importing: the user's bug, reported in one line
        raise ModelSpecError(f"importing {mod_name!r} (spec {spec!r}) raised {_one_line(e)}") from None
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        raise ModelSpecError(f"module {mod_name!r} has no callable {attr!r} (spec {spec!r})")
    try:
        out = factory()
    except Exception as e:
        raise ModelSpecError(f"factory {spec!r} raised {_one_line(e)}") from None
    dynamic_dims: dict = {}
    if isinstance(out, tuple) and len(out) in (2, 3) and isinstance(out[0], torch.nn.Module):
        model, example = out[0], tuple(out[1])
        if len(out) == 3:
            dynamic_dims = dict(out[2])
    elif isinstance(out, torch.nn.Module):
        model, example = out, None
    else:
        raise ModelSpecError(f"factory {spec!r} must return an nn.Module or (module, example_inputs[, dynamic_dims]); "
                             f"got {type(out).__name__}")
    model.eval()
    kind = _hf_kind(model)
    if example is None:
        example, dynamic_dims = default_example_inputs(model)
    return LoadedModel(spec, model, example, dynamic_dims, kind, _input_names(model, len(example)), spec)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _load_hf_dir(path: Path, placement: Placement = DEFAULT) -> LoadedModel:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelSpecError(f"{path} is not a Hugging Face model directory: config.json is missing")
    try:
        cfg_json = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"{cfg_path} is not valid JSON ({e}); re-save the model with save_pretrained()") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        hint = " (pytorch_model.bin files are not loaded: elision never unpickles)" if list(path.glob("*.bin")) else ""
        raise ModelSpecError(f"{path} has no *.safetensors weights{hint}; save the model with save_pretrained(safe_serialization=True)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ModelSpecError(f"{cfg_path}: cannot build a config ({e})") from None
    archs = cfg_json.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                    dtype=placement.torch_dtype)  # loaded straight in the dtype: no fp32 copy
    except Exception as e:
        raise ModelSpecError(f"cannot load weights from {path}: {e}") from None
    model.eval()
    example, dynamic_dims = default_example_inputs(model)
    tok = None
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception:
            tok = None
    return LoadedModel(path.name, model, example, dynamic_dims, _hf_kind(model),
                       _input_names(model, len(example)), str(path), tok)


def _hf_kind(model: torch.nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal-lm"
    if "Vision" in name or name.startswith(("ViT", "CLIPVision", "Dinov2", "DeiT")):
        return "vision"
    if name.endswith(("Model", "ForMaskedLM", "ForSequenceClassification")) and hasattr(model, "config"):
        return "encoder"
    return "generic"


def default_example_inputs(model: torch.nn.Module) -> tuple[tuple, dict]:
    """Example inputs for a Hugging Face model: token ids or pixels, dynamic dims sized >= 2 (no 0/1 specialization)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ModelSpecError(f"cannot guess example inputs for {type(model).__name__}: pass example_inputs explicitly "
                             f"(a factory may return (module, example_inputs))")
    vision_cfg = getattr(cfg, "vision_config", None)
    if hasattr(cfg, "image_size") and hasattr(cfg, "num_channels") and not hasattr(cfg, "vocab_size"):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        g = torch.Generator().manual_seed(0)
        return (torch.randn(2, cfg.num_channels, size, size, generator=g),), {0: {0: "batch"}}
    if vision_cfg is not None and getattr(cfg, "text_config", None) is not None:
        raise ModelSpecError(f"{type(model).__name__} is a vision-language model: pass example inputs (input_ids with "
                             f"image tokens and pixel_values) through a factory spec")
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None:
        raise ModelSpecError(f"cannot guess example inputs for {type(model).__name__}: its config has no vocab_size or image_size")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    return (ids,), {0: {0: "batch", 1: "seq"}}


def _input_names(model: torch.nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params[:n]]
        if len(names) == n:
            return names
    except (TypeError, ValueError):
        pass
    return [f"input_{i}" for i in range(n)]


# --------------------------------------------------------------------------------------------- export

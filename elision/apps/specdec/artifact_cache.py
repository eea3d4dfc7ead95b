"""Generation artifacts compiled once per model and elision version, kept in the user cache.

`elision generate MODEL --target onnxruntime [--dtype D]` calls `cached_generation_artifact(MODEL, dtype=D)`: the key
is the sha256 of the model directory's files (weights, config, tokenizer) plus elision's version, and the dtype, so
editing the checkpoint, upgrading elision or asking for another dtype compiles anew, and anything else reuses
`<cache>/generate/<key>-<dtype>/` (see `elision.runtime.user_cache`). File hashes are remembered by (path, size,
mtime), so a multi-gigabyte checkpoint is read once, not on every command.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from elision.apps.specdec.artifact import check_dtype_runs_here, export_generation_artifact
from elision.frontend.placement import Placement
from elision.runtime.artifact import ArtifactError, elision_version, read_manifest
from elision.runtime.user_cache import cache_root, read_json, write_json

__all__ = ["cache_directory", "cached_generation_artifact", "model_directory", "model_fingerprint"]


def model_directory(model_spec: str) -> Path:
    """The Hugging Face directory behind MODEL (`builtin:NAME` or a path); ValueError when there is none."""
    if model_spec.startswith("builtin:"):
        from elision.models import code_lm  # the built-in checkpoints' registry, needed only for builtin: specs

        try:
            return code_lm.builtin_dir(model_spec)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(str(e)) from None
    path = Path(model_spec)
    if not path.is_dir():
        raise ValueError(f"model directory {model_spec!r} does not exist; pass a Hugging Face causal LM directory "
                         "or builtin:tiny-code-lm")
    return path


def _file_sha256(path: Path, memo: dict) -> str:
    stat = path.stat()
    key = str(path.resolve())
    known = memo.get(key)
    if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
        return known[2]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    memo[key] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return memo[key][2]


def model_fingerprint(model_spec: str) -> str:
    """sha256 over the names and contents of the model directory's files (its top level) and elision's version."""
    directory = model_directory(model_spec)
    memo_path = cache_root() / "file_hashes.json"
    memo = read_json(memo_path) or {}
    digest = hashlib.sha256(elision_version().encode())
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        digest.update(f"{path.name}:{_file_sha256(path, memo)}\n".encode())
    write_json(memo_path, memo)
    return digest.hexdigest()[:24]


def cache_directory(model_spec: str, dtype: str = "float32") -> Path:
    """Where the generation artifact of MODEL in `dtype` lives in the user cache (whether or not it exists yet)."""
    return cache_root() / "generate" / f"{model_fingerprint(model_spec)}-{dtype}"


def cached_generation_artifact(model_spec: str, progress: Callable[[str], None] | None = None, *,
                               dtype: str = "float32") -> tuple[Path, bool]:
    """(artifact directory, whether it was compiled now) for MODEL in `dtype` (float32 or float16; bfloat16 where
    onnxruntime has CUDA), compiling it into the cache when missing. ValueError for a dtype this machine cannot
    check and calibrate (bfloat16 without CUDA), before the model is hashed or loaded."""
    placement = Placement(dtype)  # the name checked (PlacementError) before anything is read
    check_dtype_runs_here(dtype)
    target = cache_directory(model_spec, dtype)
    if (target / "manifest.json").is_file():
        try:
            read_manifest(target)
            return target, False
        except ArtifactError:
            shutil.rmtree(target, ignore_errors=True)  # unreadable (an older format): compile anew
    target.parent.mkdir(parents=True, exist_ok=True)
    # compile beside the final place and rename, so a concurrent or interrupted run never leaves half an artifact
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        export_generation_artifact(model_spec, staging, progress=progress, placement=placement)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: use its artifact
            if not (target / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, True

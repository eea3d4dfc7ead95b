"""Hugging Face Hub ids (`Qwen/Qwen2.5-0.5B`) as model specs: resolved to a snapshot directory of the local
Hugging Face cache, downloaded first when the id is not cached and the Hub may be reached.

Only what elision loads is fetched (config, safetensors weights, tokenizer files): never pickled weights.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from elision.errors import ModelSpecError

# org/name as the Hub spells repository ids (letters, digits, '-', '_', '.'; no '..', no leading '.')
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
WANTED_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]


def looks_like_hub_id(spec: str) -> bool:
    """`org/name` that is not an existing path (a directory of that name always wins)."""
    return bool(_HUB_ID.match(spec)) and ".." not in spec and not os.path.exists(spec)


def hub_cache_dir() -> Path:
    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot directory of `repo_id`: from the cache, else downloaded (unless HF_HUB_OFFLINE is set).
    Raises ModelSpecError naming the cache it looked in and how to fill it."""
    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=WANTED_FILES))
    except LocalEntryNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 - a damaged cache entry (bad refs file, ...) becomes one line
        raise ModelSpecError(f"cannot read {repo_id!r} from the Hugging Face cache {cache}: {_first_line(e)}") from None
    how = (f"download it first with `hf download {repo_id}` (or set HF_HOME / HF_HUB_CACHE to a cache that holds "
           f"it), or pass a local model directory")
    if offline():
        raise ModelSpecError(f"model {repo_id!r} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set; {how}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=WANTED_FILES))
    except Exception as e:  # noqa: BLE001 - no network, unknown repo, gated repo: one line with what to do
        raise ModelSpecError(f"model {repo_id!r} is not in the Hugging Face cache {cache} and downloading it failed "
                             f"({_first_line(e)}); {how}") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__

"""Where elision keeps per-user, per-machine files: `$ELISION_CACHE_DIR`, else `$XDG_CACHE_HOME/elision`, else
`~/.cache/elision`. Generation artifacts compiled by `elision generate --target onnxruntime` and the calibrations
(thread count, verification-cost curve) measured on this machine live under it."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["cache_root", "read_json", "write_json"]


def cache_root() -> Path:
    explicit = os.environ.get("ELISION_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "elision"


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None when it is missing or unreadable (a cache miss, never an error)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: Any) -> None:
    """Write atomically (a temporary file renamed into place), so concurrent readers never see half a file.
    A read-only cache directory is not an error: the value is simply not cached."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(value, handle, indent=1)
        os.replace(handle.name, path)
    except OSError:
        pass

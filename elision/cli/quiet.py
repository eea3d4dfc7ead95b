"""Quiet by default: the CLI prints elision's own output, not third-party warnings, log lines and progress bars.

`elision --verbose COMMAND` shows them. The settings are environment variables that transformers, huggingface_hub
and torch read when they are first imported, which the commands do after this runs, plus Python's warning filters
and the root logger.
"""
from __future__ import annotations

import logging
import os
import warnings

_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # "[transformers] Model config: ..." advice
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar follows huggingface_hub's switch
    "TORCH_LOGS": "-all",  # torch's own log lines ("torchvision is not installed", ...) only at ERROR
}


def hide_third_party_noise() -> None:
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)  # a user's explicit setting wins
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"elision(\.|$)")  # our own warnings still show
    root = logging.getLogger()
    if not root.handlers:  # libraries' warnings would reach stderr through logging's last-resort handler
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler.setLevel(logging.ERROR)
        root.addHandler(handler)

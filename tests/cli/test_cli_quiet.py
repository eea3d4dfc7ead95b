"""The CLI is quiet by default: no third-party warnings, log lines or progress bars on stderr (transformers'
"Loading weights" bar, torch FutureWarnings); `--verbose` shows them. Fresh interpreters, because transformers and
torch read their switches when first imported."""
from __future__ import annotations

import os
import subprocess
import sys

# switches a developer's shell may set; the test decides them itself
_SWITCHES = ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS", "TORCH_LOGS",
             "PYTHONWARNINGS")


def _elision(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _SWITCHES}
    return subprocess.run([sys.executable, "-m", "elision.cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_inspect_prints_no_third_party_noise_unless_verbose():
    quiet = _elision("inspect", "builtin:tiny-code-lm", "--json")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.strip() == "", quiet.stderr
    loud = _elision("--verbose", "inspect", "builtin:tiny-code-lm", "--json")
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr  # the noise the default hides is real
    assert loud.stdout == quiet.stdout

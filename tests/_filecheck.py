"""FileCheck for golden IR tests: runs the PyPI `filecheck` tool (a Python clone of LLVM FileCheck)."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap


def filecheck(text: str, checks: str) -> None:
    """Assert ``text`` satisfies the CHECK lines in ``checks`` (dedented); the failure shows filecheck's report."""
    with tempfile.NamedTemporaryFile("w", suffix=".checks", delete=False) as f:
        f.write(textwrap.dedent(checks))
        path = f.name
    proc = subprocess.run([sys.executable, "-m", "filecheck", path], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, f"FileCheck failed:\n{proc.stdout}\n{proc.stderr}\n--- input ---\n{text}"

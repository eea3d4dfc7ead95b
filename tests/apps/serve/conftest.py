"""The generation artifact every serve test module serves (compiled once per test process: the export is slow)."""
from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

# the test clusters start in this process (and `elision serve` subprocesses inherit it): Ray Serve's 3 x 5 s for its
# HTTP proxy to start is too short while the other test worker loads the 2 cores (the service sets the same default)
for _name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
    os.environ.setdefault(_name, "60")


@pytest.fixture(scope="session")
def served_artifact(tmp_path_factory):
    from elision.cli.main import app

    out = tmp_path_factory.mktemp("serve") / "tiny-code-lm"
    result = CliRunner().invoke(app, ["compile", "builtin:tiny-code-lm", "--emit", "onnx", "--for", "generate",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out

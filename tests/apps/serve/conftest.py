"""The generation artifact every serve test module serves (compiled once per test process: the export is slow)."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="session")
def served_artifact(tmp_path_factory):
    from elision.cli.main import app

    out = tmp_path_factory.mktemp("serve") / "tiny-code-lm"
    result = CliRunner().invoke(app, ["compile", "builtin:tiny-code-lm", "--emit", "onnx", "--for", "generate",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out

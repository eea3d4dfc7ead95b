"""``elision inspect``: tables, --json, --list-builtins, and one-line errors (through typer's CliRunner)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from elision.cli.main import app

runner = CliRunner()


def test_inspect_tables_for_a_builtin_decoder():
    res = runner.invoke(app, ["inspect", "builtin:tiny-llama"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "decoder" in out and "2 layers" in out and "model.layers" in out
    assert "4/2 x 16" in out  # heads q/kv x head dim
    assert "op histogram" in out and "aten.linear.default" in out
    assert "speculative-decoding" in out and "parameters:" in out
    assert "input_ids : i64[batch, seq]" in out  # brackets printed, not eaten as markup


def test_inspect_json_reports_unrecognized_parts_of_a_factory_model():
    res = runner.invoke(app, ["inspect", "tests.model_map_models:mixer", "--json", "--trust-code"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["kind"] == "unknown" and data["num_layers"] == 0
    assert any("not part of a recognized softmax(QK^T)V attention" in u for u in data["unrecognized"])
    assert data["parameters"]["count"] == 50 * 32 + 7 * 7 + 2 * (32 * 32 + 32)
    assert data["op_histogram"]["aten.linear.default"] == 2
    assert {r["rewrite"] for r in data["applicable_rewrites"]} == {
        "speculative-decoding", "token-pruning", "layer-skipping", "sparse-volume"}


def test_list_builtins():
    res = runner.invoke(app, ["inspect", "--list-builtins", "--json"])
    assert res.exit_code == 0, res.output
    names = {e["name"] for e in json.loads(res.stdout)}
    assert {"tiny-llama", "tiny-bert", "tiny-vit"} <= names


def test_bad_input_is_one_line_error():
    res = runner.invoke(app, ["inspect", "builtin:no-such-model"])
    assert res.exit_code == 2
    assert "error:" in res.output and "no-such-model" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["inspect"])
    assert res.exit_code == 2 and "give a MODEL" in res.output and "--list-builtins" in res.output
    res = runner.invoke(app, ["inspect", "/nonexistent/dir"])
    assert res.exit_code == 2 and "cannot resolve model spec" in res.output

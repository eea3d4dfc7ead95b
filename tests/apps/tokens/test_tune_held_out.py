"""`elision tune` reports fidelity on held-out rows beside the calibration fidelity, never on rows it tuned on; it
prints the `elision compile` command of its choice, and `--json` is one JSON object on stdout."""
from __future__ import annotations

import json
import shlex

import pytest
import torch
from typer.testing import CliRunner

from elision.apps.tokens.calibration_split import split_rows
from elision.apps.tokens.executor import IDENTITY, ReductionPlan, adapter_for, run_encoder
from elision.apps.tokens.fidelity import compare_outputs
from elision.cli.main import app
from elision.cli.tune import load_calibration
from elision.frontend.model_spec import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_split_rows_keeps_no_tune_row_in_the_held_out_part():
    ids = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [5, 6], [7, 8]])
    mask = torch.ones_like(ids)
    labels = torch.arange(6)
    tune, tune_labels, held, held_labels = split_rows((ids, mask), labels, 2)
    assert tune[0].tolist() == [[1, 2], [3, 4]] and tune_labels.tolist() == [0, 1]
    assert held[0].tolist() == [[5, 6], [7, 8]] and held_labels.tolist() == [3, 5]  # repeats of kept rows dropped
    assert split_rows((ids[:2], mask[:2]), None, 2)[2:] == (None, None)


@pytest.fixture(scope="module")
def minilm():
    loaded = load_model("builtin:minilm")
    if getattr(loaded.model, "tokenizer", None) is None:
        loaded.model.tokenizer = loaded.tokenizer
    return loaded.model, adapter_for(loaded.model)


def test_stdlib_text_splits_into_disjoint_parts_and_tune_rows_stay_the_same(minilm):
    model, adapter = minilm
    ids, mask = load_calibration("stdlib", model, adapter, 16, 64)[0]
    tune, _, held, _ = load_calibration("stdlib", model, adapter, 16, 64, held_out=16)
    assert torch.equal(tune[0], ids) and torch.equal(tune[1], mask)  # holding rows out leaves the tuning data as it was
    assert held[0].shape == (16, 64)
    tuned_rows = {tuple(r) for r in tune[0].tolist()}
    assert not [r for r in held[0].tolist() if tuple(r) in tuned_rows]


def test_tune_json_reports_held_out_fidelity_and_the_compile_command(minilm, tmp_path):
    model, adapter = minilm
    argv = ["tune", "builtin:minilm", "--passes", "skip-layers", "--threads", "1", "--samples", "8", "--held-out", "8",
            "--seq-len", "32", "--repeats", "1", "--min-fidelity", "0.9", "--plot", str(tmp_path / "p.png")]
    res = CliRunner().invoke(app, [*argv, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["calibration"] == {"source": "auto", "tune_rows": 8, "held_out_rows": 8}
    timed = [c for c in data["candidates"] if c["speedup"] is not None]
    assert timed and all(c["held_out_fidelity"] is not None for c in timed)
    # the held-out number is the plan's fidelity on the held-out rows, computed here independently
    _, _, held, _ = load_calibration("stdlib", model, adapter, 8, 32, held_out=8)
    ref = run_encoder(adapter, held, IDENTITY)
    for c in timed:
        skips = {kind: frozenset(int(x[len(kind):]) for x in c["pipeline"].split("layers=")[1].rstrip("}").split("+")
                                 if x.startswith(kind)) for kind in ("attn", "mlp")}
        plan = ReductionPlan(skip_attn=skips["attn"], skip_mlp=skips["mlp"])
        want = compare_outputs(ref, run_encoder(adapter, held, plan), adapter.output_kind).fidelity
        assert c["held_out_fidelity"] == pytest.approx(want, abs=1e-6)
    if data["chosen"]:
        assert shlex.split(data["compile_command"]) == ["elision", "compile", "builtin:minilm", "--passes",
                                                         data["chosen"], "--approximate", "--emit", "onnx", "-o",
                                                         "minilm-tuned"]
        assert data["chosen_held_out_fidelity"] == next(c["held_out_fidelity"] for c in timed
                                                        if c["pipeline"] == data["chosen"])
    # The text run times the candidates again, so its choice may differ from the JSON run's on a busy machine:
    # check that whatever it chose, it prints that pipeline's compile command (or why it keeps the model as is).
    text = CliRunner().invoke(app, argv)
    assert text.exit_code == 0 and "held-out" in text.stdout
    chosen = next(line for line in text.stdout.splitlines() if line.startswith("chosen pipeline:"))
    chosen = chosen.removeprefix("chosen pipeline:").strip()
    if chosen:
        want = shlex.join(["elision", "compile", "builtin:minilm", "--passes", chosen, "--approximate", "--emit",
                           "onnx", "-o", "minilm-tuned"])
        assert f"compile it with: {want}" in text.stdout
    else:
        assert "keeping the model unchanged" in text.output


def test_the_printed_compile_command_compiles_the_plan(tmp_path, monkeypatch, capsys):
    from elision.cli.main import main
    from elision.cli.tune import compile_command

    plan = ReductionPlan(prune_after=2, keep=0.75, skip_mlp=frozenset({3}))
    command = compile_command("builtin:minilm", plan.describe(), trust_code=False)
    argv = shlex.split(command)
    assert argv[:2] == ["elision", "compile"]
    monkeypatch.chdir(tmp_path)
    assert main([*argv[1:], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"prune-tokens", "skip-layers"} <= {p["name"].split("{")[0] for p in report["passes"]}
    assert "keep=0.75" in report["pipeline"] and "mlp3" in report["pipeline"]
    assert (tmp_path / "minilm-tuned" / "manifest.json").is_file()

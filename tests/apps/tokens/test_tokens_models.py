"""Real weights: the committed Fashion-MNIST ViT and all-MiniLM-L6-v2; the `elision tune` command."""
from __future__ import annotations

import pytest
import torch

from elision.apps.tokens.executor import IDENTITY, ReductionPlan, adapter_for, reference_output, run_encoder
from elision.apps.tokens.fidelity import compare_outputs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fashion():
    from elision.models.registry import get_builtin
    from elision.models.datasets import fashion_sample

    model = get_builtin("fashion-vit").build()
    x, y = fashion_sample(200)
    return model, x, y


def test_fashion_vit_builtin_is_trained_and_executor_exact(fashion):
    model, x, y = fashion
    ad = adapter_for(model)
    ref = reference_output(model, ad, (x,))
    torch.testing.assert_close(run_encoder(ad, (x,)), ref, atol=1e-5, rtol=1e-5)
    acc = (ref.argmax(-1) == y).float().mean().item()
    assert acc > 0.7, f"committed checkpoint should be trained (accuracy {acc:.3f})"


def test_fashion_vit_token_reduction_fidelity(fashion):
    """ToMe merging stays faithful; at 25% of the tokens, the best measured pruning point keeps accuracy within
    2 points. (On this checkpoint [CLS] attention is a poor score early on - it favours the uniform background
    patches - which the fidelity search discovers instead of assuming.)"""
    model, x, y = fashion
    ad = adapter_for(model)
    ref = run_encoder(ad, (x,), IDENTITY)
    tome = compare_outputs(ref, run_encoder(ad, (x,), ReductionPlan(merge_r=4)), "logits", y)
    assert tome.kl < 0.01 and tome.top1 > 0.95
    reports = {score: compare_outputs(ref, run_encoder(ad, (x,), ReductionPlan(prune_after=4, keep=0.25, score=score)),
                                      "logits", y) for score in ("cls-attn", "key-norm", "random")}
    best = min(reports.values(), key=lambda r: r.kl)
    assert best.accuracy >= best.ref_accuracy - 0.02
    early = compare_outputs(ref, run_encoder(ad, (x,), ReductionPlan(prune_after=0, keep=0.25)), "logits", y)
    assert early.kl > reports["cls-attn"].kl, "pruning after layer 0 must cost more than after layer 4"


@pytest.fixture(scope="module")
def minilm():
    from elision.models.registry import get_builtin
    from elision.models.datasets import stdlib_paragraphs, tokenize

    model = get_builtin("minilm").build()
    ids, mask = tokenize(model.tokenizer, stdlib_paragraphs(12, min_words=30), 80)
    return model, ids, mask


def test_minilm_where_to_prune_matters(minilm):
    """all-MiniLM-L6-v2: [CLS]-attention pruning right after layer 0 loses to random, after layer 2 it wins,
    which is why the layer is searched and never hard-coded."""
    model, ids, mask = minilm
    ad = adapter_for(model)
    ref = reference_output(model, ad, (ids, mask))
    torch.testing.assert_close(run_encoder(ad, (ids, mask)), ref, atol=1e-5, rtol=1e-5)

    def cos(plan):
        return compare_outputs(ref, run_encoder(ad, (ids, mask), plan), "embedding").cosine

    def rnd(after):
        return sum(cos(ReductionPlan(prune_after=after, keep=0.5, score="random", seed=s)) for s in range(2)) / 2

    assert cos(ReductionPlan(prune_after=0, keep=0.5)) < rnd(0)
    assert cos(ReductionPlan(prune_after=2, keep=0.5)) > rnd(2)
    assert cos(ReductionPlan(prune_after=2, keep=0.75)) > 0.97


def test_tune_cli_end_to_end_and_bad_input(tmp_path):
    from typer.testing import CliRunner

    from elision.cli.main import app

    runner = CliRunner()
    plot = tmp_path / "pareto.png"
    res = runner.invoke(app, ["tune", "builtin:fashion-vit", "--passes", "skip-layers", "--threads", "1",
                              "--samples", "8", "--repeats", "1", "--min-fidelity", "0.9", "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    assert plot.exists() and plot.stat().st_size > 1000
    assert "chosen pipeline:" in res.output and "unchanged model:" in res.output
    bad = runner.invoke(app, ["tune", "builtin:fashion-vit", "--passes", "prune-everything"])
    assert bad.exit_code == 2 and "unknown pass prune-everything" in bad.output
    bad = runner.invoke(app, ["tune", "builtin:fashion-vit", "--min-fidelity", "1.5"])
    assert bad.exit_code == 2 and "must be in (0, 1]" in bad.output
    bad = runner.invoke(app, ["tune", "builtin:fashion-vit", "--measure", "tensorrt"])
    assert bad.exit_code == 2 and "--measure must be executor or onnxruntime" in bad.output
    bad = runner.invoke(app, ["tune", "builtin:fashion-vit", "--calib", "stdlib"])
    assert bad.exit_code == 2 and "takes images" in bad.output


def test_tune_keeps_model_unchanged_when_nothing_qualifies(tmp_path):
    """A floor no rewrite can meet: the tuner says so, prints the empty pipeline and exits 0 (doing nothing is a
    valid result, never a recommendation to apply a pipeline that costs fidelity or speed)."""
    import json

    from typer.testing import CliRunner

    from elision.cli.main import app

    argv = ["tune", "builtin:fashion-vit", "--passes", "skip-layers", "--threads", "1", "--samples", "8",
            "--repeats", "1", "--min-fidelity", "0.99999", "--plot", str(tmp_path / "p.png")]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    assert "keeping the model unchanged (empty pipeline)" in res.output
    assert res.stdout.rstrip().splitlines()[-1].strip() == "chosen pipeline:"
    res = CliRunner().invoke(app, [*argv, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # one JSON object on stdout, like every command's --json
    assert data["chosen"] == "" and data["compile_command"] is None
    assert all(c["fidelity"] < 0.99999 for c in data["candidates"])


def test_choose_best_never_picks_a_slowdown():
    """The situation `make demo` hit on the Fashion ViT: every timed candidate slower than the unchanged model."""
    from elision.apps.tokens.search import Candidate, choose_best

    rep = compare_outputs(torch.ones(2, 3), torch.ones(2, 3), "logits")

    def cand(speedup):
        return Candidate(ReductionPlan(merge_r=16, merge_start=1), "merge-tokens", rep, latency_s=1.0, speedup=speedup)

    assert choose_best([cand(0.78), cand(0.95), cand(1.0)]) is None
    fast = cand(1.4)
    assert choose_best([cand(0.78), fast, cand(1.1)]) is fast
    assert choose_best([cand(1.04)], min_speedup=1.05) is None


def test_interleaved_latencies_measure_each_function():
    import time

    from elision.apps.tokens.search import interleaved_latencies

    calls = []
    lat = interleaved_latencies([lambda: (calls.append("a"), time.sleep(0.002)),
                                 lambda: (calls.append("b"), time.sleep(0.02))], repeats=3, warmup=1)
    assert calls.count("a") == calls.count("b") == 4
    assert calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"]  # rounds rotate the starting function
    assert lat[1] > lat[0] > 0

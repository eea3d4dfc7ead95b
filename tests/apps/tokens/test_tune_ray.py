"""`elision tune --ray`: candidate evaluations as Ray tasks on a small local Ray give the local run's choice.

Fidelity is deterministic, so every candidate's report is compared exactly (same plans, same order, same numbers),
and so are the finalists that get timed. The pick among finalists is a timing comparison (made by one worker, in
interleaved rounds, with the local run's rule); tests never assert timings, so that last step is checked for its
rule, not its outcome. One Ray start (2 CPUs) for the module.
"""
from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'elision[serve]'")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=128 << 20)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def vit():
    from elision.apps.tokens.executor import adapter_for
    from elision.frontend.model_spec import load_model
    from elision.models.datasets import fashion_sample

    x, y = fashion_sample(8)
    return adapter_for(load_model("builtin:fashion-vit").model), (x,), y


def _table(result):
    return [(c.plan, c.method, c.report.as_dict(), c.est_speedup) for c in result.candidates]


def test_ray_evaluations_equal_the_local_ones(local_ray, vit):
    from elision.apps.tokens.ray_search import RayEvaluator
    from elision.apps.tokens.search import choose_best, tune

    adapter, calib, labels = vit
    options = {"passes": ("prune-tokens", "merge-tokens", "skip-layers"), "min_fidelity": 0.9, "labels": labels,
               "repeats": 1, "keeps": (0.75, 0.5, 0.25), "merge_rs": (4, 16), "time_top": 3}
    local = tune(adapter, calib, "logits", **options)
    evaluator = RayEvaluator(adapter, calib, "logits", labels, threads=1)
    try:
        assert len(evaluator.workers) == 2  # two 1-thread workers on the 2-CPU Ray: evaluations run in parallel
        steps = []
        distributed = tune(adapter, calib, "logits", evaluator=evaluator, progress=lambda d, s, t: steps.append(s),
                           **options)
    finally:
        evaluator.close()
    assert len(local.candidates) > 20
    assert _table(distributed) == _table(local)  # bit-identical fidelity of every candidate, in the same order
    assert steps == sorted(steps) and steps[-1] >= len(local.candidates)
    timed = [c for c in distributed.candidates if c.speedup is not None]
    assert [c.plan for c in timed] == [c.plan for c in local.candidates if c.speedup is not None] and len(timed) == 3
    assert distributed.reference_latency_s > 0 and distributed.plain_latency_s > 0 and distributed.executor_latency_s > 0
    assert distributed.best is choose_best(timed)  # the local run's rule, on the worker's measurements


def test_tune_cli_with_ray_lists_the_local_candidates(local_ray, tmp_path):
    from typer.testing import CliRunner

    from elision.cli.main import app

    args = ["tune", "builtin:fashion-vit", "--passes", "skip-layers", "--threads", "1", "--samples", "8",
            "--repeats", "1", "--min-fidelity", "0.9"]
    runs = {}
    for name, extra in (("local", []), ("ray", ["--ray", "local"])):
        res = CliRunner().invoke(app, args + ["--plot", str(tmp_path / f"{name}.png"), "--json", *extra])
        assert res.exit_code == 0, res.output
        runs[name] = json.loads(res.stdout)
        assert "chosen" in runs[name]
    strip = ("latency_s", "speedup", "held_out_fidelity")  # held-out fidelity is computed for the timed ones
    cands = {k: [{f: v for f, v in c.items() if f not in strip} for c in r["candidates"]] for k, r in runs.items()}
    assert cands["ray"] == cands["local"] and len(cands["local"]) > 3
    assert ray.is_initialized()  # --ray local inside a connected process uses that Ray and leaves it running


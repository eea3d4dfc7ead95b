"""The torch route of speculative decoding (`compiled_generator`: the verification step compiled by elision's passes
and inductor, KV buffers kept across requests) is token-identical to Hugging Face greedy `generate`, compiles each
step shape once (no recompilation per tree size or request), and reads its cost curve from the per-machine cache.

The model runs in float64 so the oracle compares algorithms, not float32 summation order (see test_specdec_greedy).
"""
from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
import torch._dynamo.utils
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from elision.apps.specdec.compiled_backend import CAPACITY_STEP, compiled_generator, make_generator
from elision.apps.specdec.generate import measured_cost_curves
from elision.apps.specdec.session import KVSession
from specdec_compiled_models import VOCAB, make_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
generate_module = importlib.import_module("elision.apps.specdec.generate")  # the package's `generate` is the function


@pytest.fixture(scope="module")
def route(tmp_path_factory):
    """(HF model, compiled generator, the user cache it wrote its cost curve to)."""
    cache = tmp_path_factory.mktemp("user-cache")
    before = os.environ.get("ELISION_CACHE_DIR")
    os.environ["ELISION_CACHE_DIR"] = str(cache)
    try:
        model = make_model("llama").double()
        yield model, compiled_generator(model), cache
    finally:
        if before is None:
            del os.environ["ELISION_CACHE_DIR"]
        else:
            os.environ["ELISION_CACHE_DIR"] = before


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# prompts with repeats so the lookup and recycling drafters propose deep trees; at least 2 tokens, because the
# prefill and the first step then meet the shapes the warm-up compiled (a 1-token prompt compiles two more)
prompt_strategy = st.lists(st.integers(0, 15), min_size=1, max_size=8).flatmap(
    lambda motif: st.tuples(st.just(motif), st.integers(1, 4), st.lists(st.integers(0, VOCAB - 1), max_size=6))
).map(lambda t: (t[0] * t[1] + t[2])[:48]).filter(lambda p: len(p) >= 2)


def test_compile_costs_are_reported(route):
    _, gen, _ = route
    assert set(gen.compile_s) == {"export_s", "warm_up_s"} and all(v > 0 for v in gen.compile_s.values())
    assert gen.backend.codegen == "inductor"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(prompt=prompt_strategy, max_new=st.integers(1, 40),
       drafter=st.sampled_from(["recycling+lookup", "lookup", "none"]),
       tree=st.sampled_from(["dynamic", "static:chain-4", "static:3x2x1"]))
def test_compiled_route_matches_hf_greedy_without_recompiling(route, prompt, max_new, drafter, tree):
    model, gen, _ = route
    graphs = compiled_graphs()
    res = gen.generate([prompt], max_new_tokens=max_new, drafter=drafter, tree=tree)
    assert res.tokens == [hf_greedy(model, prompt, max_new)]
    assert compiled_graphs() == graphs  # every tree size and cache length ran on the warm-up's graphs


def test_kv_buffers_are_kept_across_requests_and_grown_when_a_request_needs_more(route):
    model, gen, _ = route
    short = list(range(2, 12)) * 3
    gen.generate([short], max_new_tokens=8)
    kept = gen.backend._bufs[0]
    assert kept.shape[2] == CAPACITY_STEP
    res = gen.generate([short[:5]], max_new_tokens=20)
    assert gen.backend._bufs[0] is kept  # same storage: nothing allocated, the compiled step sees the same strides
    assert res.tokens == [hf_greedy(model, short[:5], 20)]
    long = (list(range(3, 40)) * 6)[:200]  # 200 + 40 + a 33-node tree > one CAPACITY_STEP
    res = gen.generate([long], max_new_tokens=40)
    assert gen.backend._bufs[0].shape[2] == 2 * CAPACITY_STEP
    assert res.tokens == [hf_greedy(model, long, 40)]


def test_cost_curve_is_measured_once_per_machine(route):
    """The warm-up measured the curve over the compiled step and stored it under the compiled route's key; a new
    generator over the same model and route reads it instead of measuring again (a new measurement would time
    differently)."""
    model, gen, cache = route
    stored = json.loads((cache / "calibration" / "torch_curves.json").read_text())
    assert len(stored) == 1
    (entry,) = stored.values()
    measured_in_this_process = generate_module._COST_CURVES.pop(gen.backend)  # as if in a new process
    again = make_generator(gen.backend, None, "recycling+lookup", source_model=model, route="compiled-inductor")
    with torch.inference_mode():
        session = KVSession(again.backend, 1, 64)
        session.prefill([[1, 2, 3]])
        curve = again.cost_curve(session)
    assert (curve.sizes, curve.seconds) == (entry["sizes"], entry["seconds"])
    assert next(iter(measured_cost_curves(again.backend).values())) is curve
    assert curve is not next(iter(measured_in_this_process.values()))
    other_route = make_generator(gen.backend, None, "recycling+lookup", source_model=model, route="compiled-eager")
    assert other_route._machine_curve_key(1) != again._machine_curve_key(1)

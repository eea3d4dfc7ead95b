"""torch.compile(model, backend="elision"): targets match eager, dynamic shapes, graph breaks, inductor code
generation and the choice of the fastest route, loud fallbacks."""
from __future__ import annotations

import warnings

import pytest
import torch

from _lowering_models import PrimaryOutput, pixels, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit, token_ids
from elision.apps.compile import records
from elision.apps.compile.backend import BackendOptions, ElisionFallbackWarning, elision_backend, graph_records, register
from elision.apps.compile.select import MARGIN

ATOL = 1e-4  # float32; ORT reorders reductions, torch target is exact up to fused-op rounding


class Counting:
    """A backend that counts how many graphs Dynamo hands to elision."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs, **kwargs):
        self.graphs += 1
        return elision_backend(gm, example_inputs, **kwargs)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)).eval()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_entry_point_lookup_and_idempotent_registration():
    register()
    register()  # second call is a no-op, not a "duplicate name" assertion
    assert torch._dynamo.lookup_backend("elision") is elision_backend


@pytest.mark.parametrize("target", ["torch", "onnxruntime", "triton"])
def test_plain_module_matches_eager_with_few_recompiles(target):
    model = _mlp()
    backend = Counting()
    compiled = torch.compile(model, backend=backend, options={"target": target})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ElisionFallbackWarning)  # the triton-on-CPU note
        for batch in (3, 5, 9, 12):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    assert backend.graphs <= 2  # one static graph, then one dynamic graph for every later batch size


def test_string_backend_name_runs_elision():
    model = _mlp()
    compiled = torch.compile(model, backend="elision", options={"target": "torch"})
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("target", ["torch", "onnxruntime"])
def test_tiny_llama_varying_sequence_lengths(target):
    lm = tiny_llama(layers=1)
    model = PrimaryOutput(lm, use_cache=False).eval()
    backend = Counting()
    compiled = torch.compile(model, backend=backend, options={"target": target, "strict": True})
    with torch.no_grad():
        for i, seq in enumerate((5, 8, 11)):
            ids = token_ids(2, seq, seed=seq)
            if i == 0:
                torch._dynamo.mark_dynamic(ids, 1)  # compile the dynamic graph (SymInt inputs) right away
            torch.testing.assert_close(compiled(ids), model(ids), atol=ATOL, rtol=0)
    assert backend.graphs == 1  # one graph serves every sequence length


@pytest.mark.parametrize("builder, make_input, target", [
    (tiny_gpt2, lambda: token_ids(2, 6), "onnxruntime"),
    (tiny_bert, lambda: token_ids(2, 6), "torch"),
    (tiny_vit, lambda: pixels(2), "onnxruntime"),
], ids=["gpt2-ort", "bert-torch", "vit-ort"])
def test_tiny_hf_models_match_eager(builder, make_input, target):
    model = PrimaryOutput(builder()).eval()
    compiled = torch.compile(model, backend="elision", options={"target": target, "strict": True})
    with torch.no_grad():
        x = make_input()
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)


def test_graph_breaks_compile_each_piece():
    model = _mlp()

    def fn(x):
        y = model[0](x).relu()
        torch._dynamo.graph_break()
        return model[3](model[2](y)) * 2

    backend = Counting()
    compiled = torch.compile(fn, backend=backend, options={"target": "onnxruntime"})
    with torch.no_grad():
        x = torch.randn(3, 8)
        torch.testing.assert_close(compiled(x), fn(x), atol=ATOL, rtol=0)
    assert backend.graphs == 2


@torch.library.custom_op("elision_test::shifted_tanh", mutates_args=())
def shifted_tanh(x: torch.Tensor) -> torch.Tensor:
    """An op with no ONNX translation: the onnxruntime target cannot lower a graph that calls it."""
    return torch.tanh(x) + 1


@shifted_tanh.register_fake
def _(x):
    return torch.empty_like(x)


class _WithCustomOp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = _mlp()

    def forward(self, x):
        return torch.ops.elision_test.shifted_tanh(self.mlp(x))


def test_fallback_to_eager_is_loud_recorded_and_strict_raises():
    model = _WithCustomOp().eval()
    compiled = torch.compile(model, backend="elision", options={"target": "onnxruntime"})
    x = torch.randn(3, 8)
    with pytest.warns(ElisionFallbackWarning, match=r"runs eager: onnxruntime lowering failed") as record:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ElisionFallbackWarning)  # a second call must not warn again
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
    assert len([w for w in record if issubclass(w.category, ElisionFallbackWarning)]) == 1
    (graph,) = [r for r in graph_records() if r.target == "onnxruntime"][-1:]
    assert graph.runs == "eager" and graph.eager and "onnxruntime lowering failed" in graph.fallback
    assert set(graph.dropped) == {"onnxruntime", "onnxruntime (graph without elision's rewrites)"}
    torch._dynamo.reset()
    strict = torch.compile(model, backend="elision", options={"target": "onnxruntime", "strict": True})
    with pytest.raises(Exception, match="shifted_tanh"), torch.no_grad():
        strict(x)


def test_torch_target_without_rewrites_still_compiles_and_says_why():
    """A graph elision's IR cannot hold (a higher-order op) runs on inductor or eager, with a warning."""
    def fn(x):
        return torch.cond(x.sum() > 0, lambda y: y.sin(), lambda y: y.cos(), (x,)) * 2

    compiled = torch.compile(fn, backend="elision")
    x = torch.randn(5)
    with pytest.warns(ElisionFallbackWarning, match=r"runs without elision's rewrites"):
        torch.testing.assert_close(compiled(x), fn(x))
    graph = graph_records()[-1]
    assert graph.runs in ("inductor", "eager") and graph.fallback is None
    assert "elision's rewrites failed" in graph.dropped["elision+inductor"]


def test_strict_and_bad_options_raise():
    model = _mlp()
    x = torch.randn(3, 8)
    with pytest.raises(Exception, match=r"unknown target 'tpu'; choose one of torch, onnxruntime, triton"):
        torch.compile(model, backend="elision", options={"target": "tpu"})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"unknown option\(s\) pases"):
        torch.compile(model, backend="elision", options={"pases": "cse"})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"no-such-pass"):
        torch.compile(model, backend="elision", options={"passes": "no-such-pass"})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"unknown select 'fast'"):
        torch.compile(model, backend="elision", options={"select": "fast"})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"skip-layers change the model's output"):
        torch.compile(model, backend="elision", options={"passes": "skip-layers{layers=1}"})(x)


@pytest.mark.parametrize("passes,message", [
    ("cse,no-such-pass", r"unknown pass 'no-such-pass'"),
    ("cse{bogus=1}", r"pass 'cse' has no option 'bogus'"),
    ("skip-layers{layers=1}", r"skip-layers change the model's output"),
])
def test_bad_pipeline_is_refused_before_tracing_even_without_strict(passes, message):
    # checked when the options are read: a typo is never silently turned into an eager fallback
    with pytest.raises(ValueError, match=message):
        BackendOptions.parse({"passes": passes})
    torch._dynamo.reset()
    with pytest.raises(Exception, match=message):
        torch.compile(_mlp(), backend="elision", options={"passes": passes})(torch.randn(3, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message of the triton target")
def test_triton_target_on_cpu_says_it_uses_the_torch_reference():
    records._warned.discard("triton:no-cuda")
    model = _mlp()
    with pytest.warns(ElisionFallbackWarning, match=r"target 'triton' has no CUDA device here; .*torch reference"):
        with torch.no_grad():
            torch.compile(model, backend="elision", options={"target": "triton"})(torch.randn(3, 8))


def test_onnxruntime_target_runs_eager_when_autograd_needs_it():
    model = _mlp().train(False)
    compiled = torch.compile(model, backend="elision", options={"target": "onnxruntime"})
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.warns(ElisionFallbackWarning, match=r"runs eager: autograd is enabled"):
        y = compiled(x)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_torch_target_hands_the_rewritten_graph_to_inductor():
    """elision's fused ops reach inductor as ops it traces into: no extern call of an elision op remains."""
    from torch._inductor.utils import run_and_get_code

    seen = {}

    def spy(gm, example_inputs, **kwargs):
        from elision.apps.compile.optimize import optimize_graph

        seen["ops"] = {str(n.target) for n in optimize_graph(gm, example_inputs, None).fx.graph.nodes}
        return elision_backend(gm, example_inputs, **kwargs)

    model = PrimaryOutput(tiny_llama(layers=1), use_cache=False).eval()
    compiled = torch.compile(model, backend=spy, options={"select": "elision+inductor", "strict": True})
    ids = token_ids(2, 7)
    with torch.no_grad():
        out, code = run_and_get_code(compiled, ids)
        torch.testing.assert_close(out, model(ids), atol=ATOL, rtol=0)
    assert {"elision.attention.default", "elision.add_rms_norm.default"} <= seen["ops"]  # the rewrites fired
    assert code and "def call(" in code[0]  # inductor's generated module ran
    assert "torch.ops.elision" not in "".join(code)
    graph = graph_records()[-1]
    assert graph.runs == "elision+inductor" and graph.fallback is None and "elision+inductor" in graph.compile_seconds


def test_default_torch_target_keeps_the_fastest_candidate_and_records_it():
    model = _mlp()
    compiled = torch.compile(model, backend="elision")
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(compiled(x + 1), model(x + 1), atol=ATOL, rtol=0)
    graph = graph_records()[-1]
    assert set(graph.timings_ms) == {"elision+inductor", "inductor", "elision", "eager"}
    assert_choice_follows_the_rule(graph)
    assert not graph.dropped and graph.fallback is None
    assert graph.as_dict()["runs"] == graph.runs and graph.runs in graph.summary()


def assert_choice_follows_the_rule(graph) -> None:
    """The route kept is plain inductor unless another was faster by more than the margin (the best of those)."""
    assert graph.ratios["inductor"] == 1.0 and graph.selection_seconds > 0
    base = graph.timings_ms["inductor"]
    faster = {n: r for n, r in graph.ratios.items() if r < 1 - MARGIN and graph.timings_ms[n] < (1 - MARGIN) * base}
    if faster:
        assert graph.runs == min(faster, key=faster.get) and graph.reason.startswith(f"{graph.runs}: ")
    else:
        assert graph.runs == "inductor" and graph.reason.startswith("inductor (default route)")


@pytest.mark.parametrize("build", [lambda: PrimaryOutput(tiny_bert()),
                                   lambda: PrimaryOutput(tiny_llama(layers=2), use_cache=False)], ids=["bert", "llama"])
def test_default_torch_target_route_matches_eager_and_is_reported(build):
    """Whatever route the first call keeps, its output equals eager within float32 bounds, and it says which."""
    model = build().eval()
    before = len(graph_records())
    compiled = torch.compile(model, backend="elision", dynamic=False)
    with torch.no_grad():
        for seed in (1, 2):  # the first call (timed, decided) and a later one (the winner only)
            ids = token_ids(2, 16, seed=seed)
            torch.testing.assert_close(compiled(ids), model(ids), atol=ATOL, rtol=0)
    (graph,) = graph_records()[before:]
    assert graph.runs in ("elision+inductor", "inductor", "elision", "eager") and graph.fallback is None
    assert set(graph.first_call_seconds) == {"elision+inductor", "inductor", "elision", "eager"}
    assert_choice_follows_the_rule(graph)
    assert f"runs {graph.runs}" in graph.summary()


@pytest.mark.parametrize("select", ["elision+inductor", "elision"])
def test_weights_changed_after_compilation_run_the_graph_as_given_loudly(select):
    model = _mlp()
    compiled = torch.compile(model, backend="elision", options={"select": select})
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
        model[0].weight.mul_(2)  # elision's graph holds the old weights: the call must not use it
        with pytest.warns(ElisionFallbackWarning, match="modified in place after compilation"):
            got = compiled(x)
        torch.testing.assert_close(got, model(x), atol=ATOL, rtol=0)
    assert graph_records()[-1].runs == "eager"


def test_onnxruntime_lowers_llama_called_with_its_kv_cache_outputs():
    """The graph of issue 13: a GQA Llama called as users call it (use_cache on, outputs include the cache)."""
    lm = tiny_llama(layers=2)
    compiled = torch.compile(lm, backend="elision", options={"target": "onnxruntime", "strict": True})
    with torch.no_grad():
        for seq in (6, 1):
            ids = token_ids(1, seq, seed=seq)
            got, want = compiled(ids), lm(ids)
            torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
            for layer_got, layer_want in zip(got.past_key_values.layers, want.past_key_values.layers):
                torch.testing.assert_close(layer_got.keys, layer_want.keys, atol=ATOL, rtol=0)
    graphs = [r for r in graph_records() if r.target == "onnxruntime"][-2:]
    assert [g.runs for g in graphs] == ["onnxruntime", "onnxruntime"] and not any(g.fallback for g in graphs)

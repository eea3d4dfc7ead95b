"""torch.compile(model, backend="elision"): targets match eager, dynamic shapes, graph breaks, fallback."""
from __future__ import annotations

import warnings

import pytest
import torch

from _lowering_models import PrimaryOutput, pixels, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit, token_ids
from elision.apps.compile.backend import BackendOptions, ElisionFallbackWarning, elision_backend, register

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


def test_fallback_warns_once_per_graph_with_the_reason():
    model = _mlp()
    # kv-cache parses but cannot apply to an MLP (no attention): a graph-level failure, not a bad option
    compiled = torch.compile(model, backend="elision", options={"passes": "kv-cache"})
    x = torch.randn(3, 8)
    with pytest.warns(ElisionFallbackWarning, match=r"falls back to eager .*kv-cache needs a decoder LM") as record:
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ElisionFallbackWarning)  # a second call must not warn again
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
    assert len([w for w in record if issubclass(w.category, ElisionFallbackWarning)]) == 1


def test_strict_and_bad_options_raise():
    model = _mlp()
    x = torch.randn(3, 8)
    with pytest.raises(Exception, match=r"unknown target 'tpu'; choose one of torch, onnxruntime, triton"):
        torch.compile(model, backend="elision", options={"target": "tpu"})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"unknown option\(s\) pases"):
        torch.compile(model, backend="elision", options={"pases": "cse"})(x)
    torch._dynamo.reset()
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"kv-cache needs a decoder LM"):
        torch.compile(model, backend="elision", options={"passes": "kv-cache", "strict": True})(x)


@pytest.mark.parametrize("passes,message", [
    ("cse,no-such-pass", r"elision backend: unknown pass 'no-such-pass'"),
    ("cse{bogus=1}", r"elision backend: pass 'cse' has no option 'bogus'"),
    ("skip-layers{layers=1}", r"elision backend: pass 'skip-layers' changes the model's output \(approximate\)"),
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
    import elision.apps.compile.backend as backend_module

    backend_module._warned.discard("triton:no-cuda")
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

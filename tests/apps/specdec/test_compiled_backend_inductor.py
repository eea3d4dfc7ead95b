"""CompiledBackend(codegen="inductor"): the verify step compiled by inductor gives the eager step's logits (float32,
1e-5) through prefill, tree steps, compaction and single-token steps, and greedy generation stays token-identical
to Hugging Face generate()."""
from __future__ import annotations

import pytest
import torch

from elision.apps.specdec.compiled_backend import make_backend, make_generator, model_config
from specdec_compiled_models import VOCAB, compiled

torch.set_num_threads(1)


def _tree_bias(n: int, past: int, parents: list[int]) -> torch.Tensor:
    """[1, 1, n, past + n]: every node sees the cache, itself and its ancestors."""
    bias = torch.full((1, 1, n, past + n), float("-inf"))
    bias[..., :past] = 0
    for i in range(n):
        j = i
        while j >= 0:
            bias[0, 0, i, past + j] = 0
            j = parents[j]
    return bias


def test_inductor_step_matches_the_eager_step_through_a_decode_sequence():
    model, ir = compiled("llama")
    config = model_config(model)
    eager, fast = make_backend(ir, "verify", config), make_backend(ir, "verify", config, codegen="inductor")
    g = torch.Generator().manual_seed(3)
    for backend in (eager, fast):
        backend.reset(1, 32)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=g)
    steps = [
        (prompt, torch.arange(6)[None], _tree_bias(6, 0, [-1, 0, 1, 2, 3, 4])),  # prefill: a chain
        (torch.randint(0, VOCAB, (1, 3), generator=g), torch.tensor([[6, 7, 7]]), _tree_bias(3, 6, [-1, 0, 0])),
        (torch.randint(0, VOCAB, (1, 1), generator=g), torch.tensor([[8]]), torch.zeros(1, 1, 1, 9)),
        (torch.randint(0, VOCAB, (1, 4), generator=g), torch.tensor([[9, 10, 10, 11]]), _tree_bias(4, 9, [-1, 0, 0, 1])),
    ]
    for i, (tokens, positions, bias) in enumerate(steps):
        want = eager.forward(tokens, positions, bias)
        got = fast.forward(tokens, positions, bias)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if i == 1:  # accept root and its second child: compaction in the preallocated cache
            for backend in (eager, fast):
                backend.select(torch.tensor([[6, 8]]), 6)
    assert fast.length == eager.length


def test_inductor_backend_generation_is_token_identical_to_hf_generate():
    model, ir = compiled("llama")
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, VOCAB, (5,), generator=g).tolist() * 3
    res = make_generator(make_backend(ir, "verify", model_config(model), codegen="inductor")).generate(
        [prompt], max_new_tokens=16)
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert res.tokens == [want[0, len(prompt):].tolist()]


def test_unknown_codegen_is_refused():
    model, ir = compiled("llama")
    with pytest.raises(ValueError, match="codegen must be 'eager' or 'inductor'"):
        make_backend(ir, "verify", model_config(model), codegen="tvm")

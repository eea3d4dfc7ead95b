"""Importing Dynamo graphs (what a torch.compile backend receives): parameters by name, symbolic dims kept."""
import torch
import transformers

from elision.frontend.trace import import_graph_module
from elision.ir import to_fx


def test_dynamo_graphs_import_and_match_eager():
    seen = []

    def backend(gm, example_inputs):
        mod = import_graph_module(gm, example_inputs)
        seen.append(mod)
        fx = to_fx(mod, "forward")
        drop = set(mod.attrs["param_positions"])
        return lambda *args: fx(*[a for i, a in enumerate(args) if i not in drop])

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    model = transformers.LlamaForCausalLM(cfg).eval()

    def logits(ids):
        return model(input_ids=ids, use_cache=False).logits

    compiled = torch.compile(logits, backend=backend)
    for length in (5, 9, 14):
        ids = torch.randint(0, 64, (2, length))
        with torch.no_grad():
            out = compiled(ids)
            assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, logits(ids))
    assert len(seen) == 2  # one static graph, then one with a symbolic sequence length
    dyn = seen[-1].functions["forward"]
    assert any(isinstance(d, str) for v in dyn.inputs if hasattr(v.type, "shape") for d in v.type.shape)
    assert any(name.endswith("model.layers.0.self_attn.q_proj.weight") for name in seen[-1].params)

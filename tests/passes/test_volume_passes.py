"""IR passes: query-independence (refuses mixing decoders) and hoist-invariants (latents_side/field_chunk)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from elision.models.vecset import VecSetConfig, build_field

SMALL = VecSetConfig(num_latents=16, embed_dim=8, width=32, heads=4, num_decoder_layers=1)


@pytest.fixture(scope="module")
def ir_module():
    from elision.frontend.trace import export_to_ir
    torch.manual_seed(0)
    model = build_field(SMALL)
    example = (torch.rand(1, 8, 3) * 2 - 1, torch.randn(1, 16, 8))
    return model, export_to_ir(model, example, dynamic_dims={0: {1: "queries"}})


def test_query_independence_pass_accepts_vecset(ir_module):
    from elision.passes import PassManager, parse_pipeline
    _, module = ir_module
    PassManager(parse_pipeline("query-independence"), verify_each=True).run(module)
    assert module.attrs["volume"]["query_independent"]["invariant_nodes"] > 20


def test_hoist_invariants_splits_latent_side_from_field_chunk(ir_module):
    from elision.ir import interpret, verify
    from elision.passes import PassManager, parse_pipeline
    model, module = ir_module
    PassManager(parse_pipeline("hoist-invariants"), verify_each=True).run(module)
    verify(module)
    text = str(module)
    lat_text = text[text.index("latents_side"):]
    chunk = module.functions["field_chunk"]
    chunk_locs = {n.loc for n in chunk.nodes}
    # golden facts of the split: the latent transformer and c_kv live only in latents_side
    assert not any("transformer" in loc or "c_kv" in loc or "post_kl" in loc for loc in chunk_locs)
    assert "transformer.resblocks.0" in lat_text
    assert any("query_proj" in loc for loc in chunk_locs) and any("output_proj" in loc for loc in chunk_locs)
    lat = torch.randn(1, 16, 8)
    pts = torch.rand(1, 40, 3) * 2 - 1
    hoisted = interpret(module, "latents_side", lat)
    got = interpret(module, "field_chunk", pts, *hoisted)[0]
    with torch.no_grad():
        ref = model(pts, lat)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


class QueryMeanDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, points, latents):
        h = self.lin(points)[..., 0] + latents.mean()
        return h - h.mean(dim=1, keepdim=True)


def test_query_independence_pass_refuses_and_names_the_op():
    from elision.frontend.trace import export_to_ir
    from elision.passes import PassError, PassManager, parse_pipeline
    module = export_to_ir(QueryMeanDecoder(), (torch.rand(1, 8, 3), torch.randn(1, 4, 2)),
                          dynamic_dims={0: {1: "queries"}})
    with pytest.raises(PassError, match=r"not query-independent:\s+mean .*reduces over the query axis"):
        PassManager(parse_pipeline("query-independence"), verify_each=True).run(module)

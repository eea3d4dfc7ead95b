"""query-independence proof and hoist-invariants split on torch.export graphs of field decoders."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from elision.models.vecset import VecSetConfig, build_field
from elision.apps.volume import VolumeError, decode_volume
from elision.analysis.query_independence import export_field, query_independence, split_invariants

SMALL = VecSetConfig(num_latents=16, embed_dim=8, width=32, heads=4, num_decoder_layers=1)


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    model = build_field(SMALL)
    example = (torch.rand(1, 8, 3) * 2 - 1, torch.randn(1, 16, 8))
    return model, example, export_field(model, example)


def test_vecset_decoder_is_query_independent(exported):
    _, _, ep = exported
    rep = query_independence(ep.graph_module, query_input=0, query_dim=1)
    assert rep.ok, rep.explain()
    # latent-side work (post_kl, transformer, ln_2, c_kv) is query-invariant and hoistable
    assert len(rep.invariant_nodes) > 20


def test_hoist_invariants_split_matches_model(exported):
    model, example, ep = exported
    split = split_invariants(ep)
    lat = torch.randn(1, 16, 8)
    pts = torch.rand(1, 50, 3) * 2 - 1  # a different query count than traced (dynamic)
    hoisted = split.latents_side(lat)
    with torch.no_grad():
        got = split.field_chunk(pts, *hoisted)[0]
        ref = model(pts, lat)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the chunk graph contains no self-attention of the latent stack and no c_kv projection
    chunk_targets = " ".join(str(n.target) for n in split.field_chunk.graph.nodes)
    assert chunk_targets.count("linear") == 6  # query_proj, c_q, c_proj, mlp.c_fc, mlp.c_proj, output_proj


class QueryMeanDecoder(nn.Module):
    """Subtracts the mean over all queries: evaluating a subset changes every value."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, points, latents):
        h = self.lin(points)[..., 0] + latents.mean()
        return h - h.mean(dim=1, keepdim=True)


class QuerySelfAttentionDecoder(nn.Module):
    """Queries attend to each other (a point-transformer head): not per-query independent."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, points, latents):
        x = self.lin(points)
        x = F.scaled_dot_product_attention(x, x, x) + latents.mean()
        return self.out(x)[..., 0]


@pytest.mark.parametrize("cls,needle", [(QueryMeanDecoder, "reduces over the query axis"),
                                        (QuerySelfAttentionDecoder, "keys/values depend on the queries")])
def test_non_independent_decoders_are_refused_with_location(cls, needle):
    model = cls()
    example = (torch.rand(1, 8, 3), torch.randn(1, 4, 2))
    rep = query_independence(export_field(model, example).graph_module)
    assert not rep.ok
    assert needle in rep.explain()
    with pytest.raises(VolumeError, match="refusing sparse decoding: not query-independent"):
        decode_volume(model, torch.randn(1, 4, 2), 16, "query-independence,sparse-volume{min_res=8}")

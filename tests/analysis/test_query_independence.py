"""The query-independence proof on IR functions of field decoders (torch.export -> elision IR)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from elision.analysis.query_independence import query_independence
from elision.frontend.trace import export_to_ir
from elision.models.vecset import VecSetConfig, build_field
from elision.passes import PassError

SMALL = VecSetConfig(num_latents=16, embed_dim=8, width=32, heads=4, num_decoder_layers=1)


def _forward(model, example):
    return export_to_ir(model, example, dynamic_dims={0: {1: "queries"}}).functions["forward"]


def test_vecset_decoder_is_query_independent():
    torch.manual_seed(0)
    fn = _forward(build_field(SMALL), (torch.rand(1, 8, 3) * 2 - 1, torch.randn(1, 16, 8)))
    rep = query_independence(fn, query_input=0, query_dim=1)
    assert rep.ok, rep.explain()
    # latent-side work (post_kl, transformer, ln_2, c_kv) is query-invariant and hoistable
    assert len(rep.invariant_nodes) > 20
    assert rep.query_dims[fn.outputs[0].name] == 1


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


class QuerySortDecoder(nn.Module):
    """Sorts the queries' values: each output depends on the ranks of all of them."""

    def forward(self, points, latents):
        return points.sum(-1).sort(dim=1).values + latents.mean()


class LatentInvariantDecoder(nn.Module):
    """Ignores the query points."""

    def forward(self, points, latents):
        return latents.mean(-1)


@pytest.mark.parametrize("cls,needle", [(QueryMeanDecoder, "reduces over the query axis"),
                                        (QuerySelfAttentionDecoder, "keys/values depend on the queries"),
                                        (QuerySortDecoder, "sort mixes values along the query axis"),
                                        (LatentInvariantDecoder, "the output does not depend on the query points")])
def test_non_independent_decoders_are_refused_with_location(cls, needle):
    rep = query_independence(_forward(cls(), (torch.rand(1, 8, 3), torch.randn(1, 4, 2))))
    assert not rep.ok
    assert needle in rep.explain()


def test_decode_volume_refuses_sparse_decoding_of_a_mixing_decoder():
    from elision.apps.volume import decode_volume
    with pytest.raises(PassError, match="@forward is not query-independent"):
        decode_volume(QueryMeanDecoder(), torch.randn(1, 4, 2), 16, "query-independence,sparse-volume{min_res=8}")

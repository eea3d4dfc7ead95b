"""The volume passes on elision IR: query-independence (refuses mixing decoders), hoist-invariants (@prepare /
@evaluate), sparse-volume (checks and records the plan), adaptive-kv (@query_heads / @evaluate_gathered); FileCheck
goldens of what they produce and differential tests of the lowered functions against eager PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from elision.ir import interpret, to_fx, verify
from elision.models.vecset import VecSetConfig, build_field
from elision.passes import PassError, PassManager, parse_pipeline
from elision.passes.volume import VOLUME_ATTR
from tests._filecheck import filecheck

SMALL = VecSetConfig(num_latents=16, embed_dim=8, width=32, heads=4, num_decoder_layers=1)


@pytest.fixture(scope="module")
def traced():
    from elision.frontend.trace import export_to_ir
    torch.manual_seed(0)
    model = build_field(SMALL)
    example = (torch.rand(1, 8, 3) * 2 - 1, torch.randn(1, 16, 8))
    return model, export_to_ir(model, example, dynamic_dims={0: {1: "queries"}})


def _run(module, pipeline: str):
    module = module.copy()
    PassManager(parse_pipeline(pipeline), verify_each=True, check_types=True).run(module)
    return module


def _fresh(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, n, 3, generator=g) * 2 - 1, torch.randn(1, 16, 8, generator=g)


def test_query_independence_pass_accepts_vecset(traced):
    _, module = traced
    module = _run(module, "query-independence")
    assert module.attrs[VOLUME_ATTR]["query_independent"]["invariant_nodes"] > 20
    assert set(module.functions) == {"forward"}  # an analysis: the IR is unchanged


def test_hoist_invariants_splits_prepare_from_evaluate(traced):
    model, module = traced
    module = _run(module, "hoist-invariants")
    verify(module, check_types=True)
    assert set(module.functions) == {"prepare", "evaluate"}
    filecheck(module.print(), """
        CHECK: func @prepare(%latents : f32[1, 16, 8]) {
        CHECK: aten.linear.default(%latents, {{.*}}) loc("post_kl")
        CHECK: loc("transformer.resblocks.0.attn.attention")
        CHECK: %[[K:.*]] : f32[1, 4, 16, 8] = aten.transpose.int({{.*}}) loc("geo_decoder.cross_attn_decoder.attn.attention")
        CHECK: %[[V:.*]] : f32[1, 4, 16, 8] = aten.transpose.int({{.*}}) loc("geo_decoder.cross_attn_decoder.attn.attention")
        CHECK: return (%[[K]], %[[V]])
        CHECK: func @evaluate(%points : f32[1, queries, 3], %[[K]] : f32[1, 4, 16, 8], %[[V]] : f32[1, 4, 16, 8]) {
        CHECK-NOT: c_kv
        CHECK-NOT: transformer
        CHECK: loc("geo_decoder.query_proj")
        CHECK: aten.scaled_dot_product_attention.default(%{{.*}}, %[[K]], %[[V]])
        CHECK: loc("geo_decoder.output_proj")
        CHECK: return
    """)
    # the query side: query_proj, c_q, c_proj, mlp.c_fc, mlp.c_proj, output_proj -- no latent-side projection
    assert [n.loc.rsplit(".", 1)[-1] for n in module.functions["evaluate"].nodes if n.op == "aten.linear.default"] \
        == ["query_proj", "c_q", "c_proj", "c_fc", "c_proj", "output_proj"]
    split = module.attrs[VOLUME_ATTR]["split"]
    assert split["state"] == [v.name for v in module.functions["prepare"].outputs]
    pts, lat = _fresh(40, 1)  # another query count than traced
    state = interpret(module, "prepare", lat)
    with torch.no_grad():
        ref = model(pts, lat)
        torch.testing.assert_close(interpret(module, "evaluate", pts, *state)[0], ref, atol=0, rtol=0)
        torch.testing.assert_close(to_fx(module, "evaluate")(pts, *to_fx(module, "prepare")(lat))[0], ref,
                                   atol=0, rtol=0)


def test_hoist_invariants_of_a_downsampled_decoder_hoists_latents_proj():
    """The FlashVDM turbo layout (latents_proj, no ln_post, no q/k norm): latents_proj runs once per shape."""
    from elision.apps.volume import trace_field
    cfg = VecSetConfig(num_latents=32, embed_dim=8, width=32, heads=4, num_decoder_layers=1,
                       geo_decoder_downsample_ratio=2, geo_decoder_mlp_expand_ratio=1, geo_decoder_ln_post=False)
    model = build_field(cfg)
    module = _run(trace_field(model), "hoist-invariants")
    prepare_locs = {n.loc for n in module.functions["prepare"].nodes}
    evaluate_locs = {n.loc for n in module.functions["evaluate"].nodes}
    assert "geo_decoder.latents_proj" in prepare_locs and "geo_decoder.latents_proj" not in evaluate_locs


class QueryMeanDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, points, latents):
        h = self.lin(points)[..., 0] + latents.mean()
        return h - h.mean(dim=1, keepdim=True)


def _query_mean_ir():
    from elision.frontend.trace import export_to_ir
    return export_to_ir(QueryMeanDecoder(), (torch.rand(1, 8, 3), torch.randn(1, 4, 2)),
                        dynamic_dims={0: {1: "queries"}})


@pytest.mark.parametrize("pipeline", ["query-independence", "sparse-volume", "hoist-invariants,sparse-volume",
                                      "adaptive-kv"])
def test_passes_that_evaluate_query_subsets_refuse_a_mixing_decoder_and_name_the_op(pipeline):
    with pytest.raises(PassError, match=r"not query-independent:\s+mean .*reduces over the query axis"):
        _run(_query_mean_ir(), pipeline)


def test_sparse_volume_records_the_plan_and_is_a_known_pass(traced):
    _, module = traced
    assert [p.spec() for p in parse_pipeline("sparse-volume")] == ["sparse-volume"]
    module = _run(module, "sparse-volume{min_res=32;band=0.5;dilation=1}")
    assert module.attrs[VOLUME_ATTR]["sparse"] == {"min_res": 32, "levels": None, "band": 0.5, "dilation": 1,
                                                   "iso": 0.0}
    assert set(module.functions) == {"forward"}  # a plan for the driver, not a graph change
    filecheck(module.print(), """
        CHECK: module attributes {{.*}}"sparse": {"band": 0.5, "dilation": 1, "iso": 0.0, "levels": null, "min_res": 32}
    """)


def test_sparse_volume_refuses_a_field_that_does_not_return_one_value_per_point():
    from elision.frontend.trace import export_to_ir

    class TwoChannels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, points, latents):
            return self.lin(points) + latents.mean()

    module = export_to_ir(TwoChannels(), (torch.rand(1, 8, 3), torch.randn(1, 4, 2)), dynamic_dims={0: {1: "queries"}})
    with pytest.raises(PassError, match=r"one value per query point \(\[1, N\]\), but returns .* f32\[1, queries, 2\]"):
        _run(module, "sparse-volume")


@pytest.mark.parametrize("text,needle", [
    ("sparse-volume{band=-1}", "band must be a finite number >= 0"),
    ("sparse-volume{band=wide}", "band must be a number >= 0 or 'auto'"),
    ("sparse-volume{dilation=9}", "dilation must be in 0..8"),
    ("sparse-volume{radius=2}", "has no option 'radius'; options: min_res, levels, band"),
    ("octree", "unknown pass 'octree'"),
    ("sparse-volume,adaptive-kv{topk=0}", "topk must be >= 1"),
    ("adaptive-kv{min_mass=1.5}", "min_mass must be in"),
    ("adaptive-kv{topk=abc}", "'abc' is not an integer"),
])
def test_volume_knob_errors_name_the_knob(text, needle):
    with pytest.raises(PassError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_pipeline(text)


def test_the_pipeline_spellings_users_know_still_parse():
    for text in ("query-independence,hoist-invariants,sparse-volume",
                 "hoist-invariants,sparse-volume,adaptive-kv{topk=32;block=16}",
                 "sparse-volume{min_res=16,band=auto,dilation=0},adaptive-kv{topk=64,block=16}", ""):
        parse_pipeline(text)
    # ';' separates knobs as in every pipeline; ',' works too
    assert parse_pipeline("adaptive-kv{topk=64;block=16}")[0] == parse_pipeline("adaptive-kv{topk=64,block=16}")[0]


def test_adaptive_kv_adds_query_heads_and_gathered_evaluate(traced):
    _, module = traced
    module = _run(module, "sparse-volume,adaptive-kv{topk=4}")  # adaptive-kv hoists first
    assert set(module.functions) == {"prepare", "evaluate", "query_heads", "evaluate_gathered"}
    rec = module.attrs[VOLUME_ATTR]["adaptive_kv"]
    assert rec["topk"] == 4 and [rec["keys"], rec["values"]] == module.attrs[VOLUME_ATTR]["split"]["state"]
    filecheck(module.print(), """
        CHECK: param "adaptive_kv.head_offset" : i64[4, 1, 1]
        CHECK: func @evaluate(
        CHECK: %{{.*}} : f32[1, 4, queries, 8] = aten.scaled_dot_product_attention.default(
        CHECK: func @query_heads(%points : f32[1, queries, 3]) {
        CHECK-NOT: c_proj
        CHECK: %[[Q:.*]] : f32[1, 4, queries, 8] = aten.transpose.int
        CHECK-NEXT: return (%[[Q]])
        CHECK: func @evaluate_gathered(%tile_points : f32[tiles, tile, 3], %[[K:[a-z_0-9]+]] : f32[1, 4, 16, 8], %[[V:[a-z_0-9]+]] : f32[1, 4, 16, 8], %tokens : i64[4, tiles, topk]) {
        CHECK: %points : f32[1, tile*tiles, 3] = aten.view.default(%tile_points, [1, -1, 3])
        CHECK: %tiles : int<tiles> = aten.sym_size.int(%tile_points, 0)
        CHECK: %tile : int<tile> = aten.sym_size.int(%tile_points, 1)
        CHECK: %q_tiles : f32[4, tiles, tile, 8] = aten.reshape.default(%{{.*}}, [4, %tiles, %tile, 8])
        CHECK: %kv_rows : i64[4, tiles, topk] = aten.add.Tensor(%tokens, %p_head_offset)
        CHECK: %k_rows : f32[64, 8] = aten.reshape.default(%[[K]], [64, 8])
        CHECK: %k_gathered : f32[4, tiles, topk, 8] = aten.index.Tensor(%k_rows, [%kv_rows])
        CHECK: %v_gathered : f32[4, tiles, topk, 8] = aten.index.Tensor(%v_rows, [%kv_rows])
        CHECK: %attention_tiles : f32[4, tiles, tile, 8] = aten.scaled_dot_product_attention.default(%q_tiles, %k_gathered, %v_gathered)
        CHECK: %attention : f32[1, 4, tile*tiles, 8] = aten.reshape.default(%attention_tiles, [1, 4, -1, 8])
        CHECK: loc("geo_decoder.output_proj")
        CHECK: %tile_values : f32[tiles, tile] = aten.reshape.default(%{{.*}}, [%tiles, %tile])
        CHECK-NEXT: return (%tile_values)
    """)


def _gathered_reference(model, pts, lat, tokens):
    """Eager, from the definition: tile t of queries attends, per head, to the keys/values tokens[h, t] only."""
    geo, block = model.geo_decoder, model.geo_decoder.cross_attn_decoder
    tiles, c = pts.shape[:2]
    with torch.no_grad():
        k, v = geo.latent_kv(model.transformer(model.post_kl(lat)))  # [1, h, M, d]
        x, q = geo.query_heads(pts.reshape(1, -1, 3))                 # [1, h, T*C, d]
        out = torch.empty_like(q)
        for h in range(q.shape[1]):
            for t in range(tiles):
                rows = slice(t * c, (t + 1) * c)
                out[0, h, rows] = F.scaled_dot_product_attention(q[0, h, rows], k[0, h, tokens[h, t]],
                                                                 v[0, h, tokens[h, t]])
        x = x + block.attn.c_proj(out.transpose(1, 2).reshape(1, tiles * c, -1))
        x = geo.ln_post(x + block.mlp(block.ln_3(x)))
        return geo.output_proj(x)[0, :, 0].view(tiles, c)


@pytest.mark.parametrize("tiles,tile,k,seed", [(1, 1, 1, 0), (3, 5, 7, 1), (7, 33, 16, 2)])
def test_lowered_gathered_evaluate_matches_the_eager_definition(traced, tiles, tile, k, seed):
    model, module = traced
    module = _run(module, "hoist-invariants,adaptive-kv")
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(tiles, tile, 3, generator=g) * 2 - 1
    lat = torch.randn(1, 16, 8, generator=g)
    tokens = torch.stack([torch.randperm(16, generator=g)[:k] for _ in range(4 * tiles)]).view(4, tiles, k)
    ref = _gathered_reference(model, pts, lat, tokens)
    state = interpret(module, "prepare", lat)
    torch.testing.assert_close(interpret(module, "evaluate_gathered", pts, *state, tokens)[0], ref,
                               atol=2e-6, rtol=1e-5)
    fx = to_fx(module, "evaluate_gathered")(pts, *to_fx(module, "prepare")(lat), tokens)[0]
    torch.testing.assert_close(fx, ref, atol=2e-6, rtol=1e-5)
    # query_heads is the attention's queries
    with torch.no_grad():
        q = model.geo_decoder.query_heads(pts.reshape(1, -1, 3))[1]
    torch.testing.assert_close(to_fx(module, "query_heads")(pts.reshape(1, -1, 3))[0], q, atol=0, rtol=0)


def test_gathered_evaluate_with_every_token_is_evaluate(traced):
    """The rewrite is exact: tiles that list every token (in any order) give the plain field values."""
    model, module = traced
    module = _run(module, "adaptive-kv")
    pts, lat = _fresh(6 * 11, 5)
    tokens = torch.stack([torch.randperm(16) for _ in range(4 * 6)]).view(4, 6, 16)
    state = interpret(module, "prepare", lat)
    got = interpret(module, "evaluate_gathered", pts.view(6, 11, 3), *state, tokens)[0]
    with torch.no_grad():
        torch.testing.assert_close(got.reshape(1, -1), model(pts, lat), atol=2e-6, rtol=1e-5)

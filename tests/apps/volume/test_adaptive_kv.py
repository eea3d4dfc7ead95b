"""Adaptive KV selection: exact with topk = all tokens, guarded by retained attention mass."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from _gpu import needs_compiled_cuda
from elision.apps.volume.adaptive_kv import AdaptiveKVOptions, adaptive_attention, gathered_attention


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 300), m=st.integers(2, 64), heads=st.integers(1, 4), blocks=st.integers(1, 20),
       seed=st.integers(0, 1000))
def test_topk_all_latents_reproduces_exact_attention(n, m, heads, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(heads, x, 8, generator=g) for x in (n, m, m))
    bid = torch.randint(0, blocks, (n,), generator=g)
    out, stats = adaptive_attention(q, k, v, bid, AdaptiveKVOptions(topk=m, samples=3), max_batch_queries=64)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-5)
    assert stats.fallback_blocks == 0 and stats.queries == n


def test_low_retained_mass_falls_back_to_full_kv():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, x, 16, generator=g) * 0.1 for x in (500, 256, 256))  # near-uniform attention
    bid = torch.arange(500) // 50
    for tiers, worst in ((0, 0.2), (3, 0.6)):  # the mass recorded is the top rung's: 16 resp. 128 of 256 tokens
        out, stats = adaptive_attention(q, k, v, bid, AdaptiveKVOptions(topk=16, min_mass=0.9, tiers=tiers))
        assert stats.fallback_blocks == stats.blocks == 10 and not stats.blocks_per_k
        assert stats.min_retained_mass < worst
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-5)


def _reference_adaptive(q, k, v, bid, opts):
    """Block by block, straight from the definition: rank tokens by the mean softmax of `samples` evenly spaced
    members, take the smallest rung whose worst retained mass (over heads and samples) reaches min_mass, attend
    over those tokens; no passing rung (or a block too small to probe) -> full KV. Returns (out, {k: blocks})."""
    heads, m = q.shape[0], k.shape[1]
    out, per_k = torch.empty_like(q), {}
    for b in bid.unique():
        members = (bid == b).nonzero().flatten()  # ascending = the stable order adaptive_attention sorts into
        c, s = members.numel(), opts.samples
        chosen = None
        if c >= 4 * s:
            samp = members[(torch.arange(s) * (c - 1)) // max(s - 1, 1)]
            probs = torch.softmax(q[:, samp] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)  # [h, s, M]
            for kk in opts.ladder(m):
                sel = probs.mean(1).topk(kk, -1).indices                                         # [h, kk]
                if torch.gather(probs, -1, sel[:, None].expand(-1, s, -1)).sum(-1).min() >= opts.min_mass:
                    chosen = sel
                    per_k[kk] = per_k.get(kk, 0) + 1
                    break
        for h in range(heads):
            idx = slice(None) if chosen is None else chosen[h]
            out[h, members] = F.scaled_dot_product_attention(q[h, members], k[h, idx], v[h, idx])
    return out, per_k


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), topk=st.integers(1, 12), tiers=st.integers(0, 3), tile=st.integers(1, 40),
       min_mass=st.floats(0.3, 0.99), blocks=st.integers(1, 12))
@example(seed=10_000, topk=1, tiers=1, tile=1, min_mass=0.5, blocks=1)  # one-query tiles vs a 400-query SDPA call
def test_ladder_and_tiles_match_the_per_block_definition(seed, topk, tiers, tile, min_mass, blocks):
    """Each block gets the smallest rung of topk * 2^j that keeps min_mass (else full KV), and cutting blocks
    into tiles of `tile` queries does not change any query's result."""
    g = torch.Generator().manual_seed(seed)
    m, heads = 48, 2
    # peaked, block-dependent attention: each block's queries point at its own few keys, so rungs differ
    centers = torch.randn(blocks, heads, 1, 8, generator=g) * 3
    bid = torch.randint(0, blocks, (400,), generator=g)
    q = (centers[bid].squeeze(2).transpose(0, 1) + torch.randn(heads, 400, 8, generator=g) * 0.5)
    k, v = torch.randn(heads, m, 8, generator=g), torch.randn(heads, m, 8, generator=g)
    opts = AdaptiveKVOptions(topk=topk, tiers=tiers, tile=tile, min_mass=min_mass, samples=4)
    out, stats = adaptive_attention(q, k, v, bid, opts, max_batch_queries=97)
    ref, per_k = _reference_adaptive(q, k, v, bid, opts)
    # float32: SDPA over a one-query tile and over a whole block sum in different orders (peaked softmax, |out| ~ 3),
    # which moves single elements by a few 1e-6; the selection itself is compared exactly below
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert stats.blocks_per_k == per_k
    assert stats.fallback_blocks == stats.blocks - sum(per_k.values())


def test_local_attention_topk_is_accurate_and_reads_less():
    """RBF-like keys (3DShape2VecSet's view of the decoder): attention is local, top-k keeps the mass."""
    torch.manual_seed(0)
    anchors = torch.rand(512, 3) * 2 - 1
    pts = torch.rand(2000, 3) * 0.25  # a spatially coherent cluster, split into blocks of 100
    sigma2 = 0.01
    # logits = (x.a - |a|^2/2)/sigma2 * scale^-1 realised with q=[x,1], k=[a,-|a|^2/2]/sigma2*sqrt(d)
    d = 4
    q = torch.cat([pts, torch.ones(2000, 1)], 1)[None]
    k = (torch.cat([anchors, -(anchors ** 2).sum(1, keepdim=True) / 2], 1) / sigma2 * d ** 0.5)[None]
    v = torch.randn(1, 512, 4)
    order = torch.argsort(pts[:, 0] * 4 + pts[:, 1] * 16 // 1)
    bid = torch.empty(2000, dtype=torch.long)
    bid[order] = torch.arange(2000) // 100
    out, stats = adaptive_attention(q, k, v, bid, AdaptiveKVOptions(topk=96, samples=8, min_mass=0.0))
    ref = F.scaled_dot_product_attention(q, k, v)
    assert stats.as_dict()["kv_fraction"] < 0.2
    assert (out - ref).abs().max() < 0.2
    assert stats.as_dict()["median_retained_mass"] > 0.9


def test_gathered_attention_torch_path_matches_reference_kernel_semantics():
    g = torch.Generator().manual_seed(3)
    qb = torch.randn(2, 3, 5, 8, generator=g)
    k, v = torch.randn(2, 20, 8, generator=g), torch.randn(2, 20, 8, generator=g)
    idx = torch.stack([torch.randperm(20, generator=g)[:6] for _ in range(6)]).reshape(2, 3, 6)
    got = gathered_attention(qb, k, v, idx, use_kernel=False)
    for h in range(2):
        for b in range(3):
            ref = F.scaled_dot_product_attention(qb[h, b], k[h, idx[h, b]], v[h, idx[h, b]])
            torch.testing.assert_close(got[h, b], ref, atol=2e-6, rtol=1e-5)


def test_decode_with_adaptive_kv_topk_all_equals_plain_sparse():
    from elision.models.registry import get_builtin
    from elision.models.vecset import fixture_latents
    from elision.apps.volume import decode_volume
    model = get_builtin("vecset-tiny").build()
    lat = fixture_latents("thin_rods")
    plain = decode_volume(model, lat, 48, "hoist-invariants,sparse-volume{min_res=24}")
    kv = decode_volume(model, lat, 48, "hoist-invariants,sparse-volume{min_res=24},adaptive-kv{topk=128}")
    assert kv.queries == plain.queries
    torch.testing.assert_close(kv.grid, plain.grid, atol=2e-5, rtol=1e-5)
    assert kv.kv_stats["kv_fraction"] == pytest.approx(1.0)


def test_guard_sends_unprobed_and_rejected_blocks_through_one_exact_plain_call():
    """Blocks too small to probe (< 4 x samples queries) and blocks below min_mass both get exact full-KV
    attention; only probed blocks carry a retained-mass record; accepted blocks read top-k tokens."""
    torch.manual_seed(1)
    anchors = torch.rand(256, 3) * 2 - 1
    d, sigma2 = 4, 0.01
    k = (torch.cat([anchors, -(anchors ** 2).sum(1, keepdim=True) / 2], 1) / sigma2 * d ** 0.5)[None]
    v = torch.randn(1, 256, 4)
    local = torch.rand(400, 3) * 0.2                  # 4 blocks of 100: local attention, accepted
    diffuse = torch.randn(1, 300, 4) * 1e-3           # 3 blocks of 100: near-uniform attention, rejected
    tiny = torch.rand(20, 3) * 0.2                    # 2 blocks of 10: too small to probe
    q = torch.cat([torch.cat([local, torch.ones(400, 1)], 1)[None], diffuse,
                   torch.cat([tiny, torch.ones(20, 1)], 1)[None]], 1)
    bid = torch.cat([torch.arange(400) // 100, 4 + torch.arange(300) // 100, 7 + torch.arange(20) // 10])
    out, stats = adaptive_attention(q, k, v, bid, AdaptiveKVOptions(topk=64, samples=8, min_mass=0.9))
    ref = F.scaled_dot_product_attention(q, k, v)
    assert stats.blocks == 9 and len(stats.retained_mass) == 7   # the 2 tiny blocks were not probed
    assert stats.fallback_blocks == 5                            # 3 rejected + 2 unprobed
    torch.testing.assert_close(out[:, 400:], ref[:, 400:], atol=2e-6, rtol=1e-5)
    assert stats.kv_reads == 400 * 64 + 320 * 256


def test_decode_stops_probing_a_non_local_decoder_and_matches_plain_sparse():
    """The tiny fitted decoder is not local: once the guard has rejected (almost) every probed block of a level,
    the level's remaining queries skip the probe and run the plain path, with the plain result."""
    from elision.models.registry import get_builtin
    from elision.models.vecset import fixture_latents
    from elision.apps.volume import decode_volume
    model = get_builtin("vecset-tiny").build()
    lat = fixture_latents("elephant")
    plain = decode_volume(model, lat, 128, "hoist-invariants,sparse-volume")
    kv = decode_volume(model, lat, 128, "hoist-invariants,sparse-volume,adaptive-kv{topk=8,min_mass=0.99}")
    st = kv.kv_stats
    assert st["plain_queries"] > 0 and st["fallback_blocks"] == st["blocks"]
    assert st["queries"] == kv.queries == plain.queries
    assert st["kv_fraction"] == pytest.approx(1.0)
    torch.testing.assert_close(kv.grid, plain.grid, atol=2e-5, rtol=1e-5)


@needs_compiled_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adaptive_attention_on_cuda_uses_the_triton_kernel_and_matches_cpu(dtype):
    """On CUDA the accepted blocks run elision::sparse_cross_attention (Triton); same result as the CPU
    SDPA-over-gathered-KV path, with the block bookkeeping on the CPU."""
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(4, 3000, 64, generator=g), torch.randn(4, 256, 64, generator=g), torch.randn(4, 256, 64, generator=g)
    bid = torch.arange(3000) // 64
    opts = AdaptiveKVOptions(topk=48, samples=8, min_mass=0.0)
    cpu_out, cpu_stats = adaptive_attention(q, k, v, bid, opts)
    gq, gk, gv = (t.to("cuda", dtype) for t in (q, k, v))
    gathered = torch.randint(0, 256, (4, 3, 48), generator=g)
    qb = gq[:, :3 * 64].reshape(4, 3, 64, 64)
    torch.testing.assert_close(gathered_attention(qb, gk, gv, gathered.cuda()).float().cpu(),
                               gathered_attention(qb.float().cpu(), k, v, gathered, use_kernel=False),
                               atol=2e-4 if dtype == torch.float32 else 5e-3, rtol=1e-3)
    out, stats = adaptive_attention(gq, gk, gv, bid, opts)
    assert out.device.type == "cuda"
    assert stats.as_dict()["kv_fraction"] == pytest.approx(cpu_stats.as_dict()["kv_fraction"])
    if dtype == torch.float32:  # same selections; fp16 may reorder near-tied tokens
        torch.testing.assert_close(out.cpu(), cpu_out, atol=2e-4, rtol=1e-3)


def test_adaptive_kv_on_the_local_decoder_reads_little_and_keeps_the_sign_field():
    """builtin:vecset-local (1024 latents, attention made local by its fit): at the fine levels most blocks pass
    the retained-mass guard at top-64, so far fewer K/V are read, and the sign field stays the plain one (the
    coarse levels, whose blocks span much of the shape, fall back per level without stopping the fine ones)."""
    from elision.models.registry import get_builtin
    from elision.models.vecset import LOCAL_FIXTURE_DIR, fixture_latents
    from elision.apps.volume import decode_volume
    from elision.apps.volume.mesh import occupancy_iou
    model = get_builtin("vecset-local").build()
    lat = fixture_latents("elephant", LOCAL_FIXTURE_DIR)
    plain = decode_volume(model, lat, 128, "hoist-invariants,sparse-volume")
    kv = decode_volume(model, lat, 128, "hoist-invariants,sparse-volume,adaptive-kv{topk=64}")
    stats = kv.kv_stats
    assert stats["plain_queries"] == 0 and stats["median_retained_mass"] > 0.99, stats
    assert stats["kv_fraction"] < 0.6, stats
    flips = int(((kv.grid > 0) != (plain.grid > 0)).sum())
    assert flips <= 1e-4 * plain.grid.numel(), flips
    assert occupancy_iou(kv, plain) >= 0.995


def test_planning_spans_do_not_change_the_decisions_or_values(monkeypatch):
    """Once a level has shown enough probed blocks, the evaluator plans 65536 queries at a time (cheaper) while
    still calling the decoder with at most `chunk` queries: every block's decision is its own, so the values and
    the statistics equal planning one chunk at a time."""
    from elision.models.registry import get_builtin
    from elision.models.vecset import LOCAL_FIXTURE_DIR, fixture_latents
    from elision.apps.volume import decode_volume
    from elision.apps.volume.decode import _Evaluator
    model = get_builtin("vecset-local").build()
    lat = fixture_latents("elephant", LOCAL_FIXTURE_DIR)
    passes = "hoist-invariants,sparse-volume,adaptive-kv{topk=32}"
    calls = []
    real_evaluate = _Evaluator._evaluate_adaptive

    def counting(self, points, block_ids, k):
        calls.append(points.shape[0])
        return real_evaluate(self, points, block_ids, k)

    monkeypatch.setattr(_Evaluator, "_evaluate_adaptive", counting)
    wide = decode_volume(model, lat, 128, passes, chunk=2048)
    wide_calls, calls[:] = list(calls), []
    monkeypatch.setattr(_Evaluator, "PLAN_SPAN", 0)  # every span = one chunk, as before
    narrow = decode_volume(model, lat, 128, passes, chunk=2048)
    assert max(wide_calls) > 4 * 2048 and len(wide_calls) < len(calls)  # the wide spans were used
    assert max(calls) <= 2048 + 16 ** 3  # a span ends at a block boundary: one block (16^3 points) beyond
    torch.testing.assert_close(wide.grid, narrow.grid, atol=1e-6, rtol=1e-6)
    assert wide.kv_stats == narrow.kv_stats

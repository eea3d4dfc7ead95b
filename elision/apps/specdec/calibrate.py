"""Layer-skip calibration: pick the set of bypassed decoder layers by measured tokens/s.

Candidates follow SWIFT / Draft & Verify: the first and last layers are always kept, and a fraction of
the middle layers is skipped either spread out evenly or as one contiguous block. Each candidate runs
real greedy self-speculative generation on the calibration prompts (the output is lossless whatever the
skip set, only the speed differs) and the fastest set wins; plain decoding through the same engine is
measured too, so a model whose layers are not redundant reports that layer skipping does not pay.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from elision.apps.specdec.drafters import default_skip_layers
from elision.apps.specdec.generate import SpeculativeGenerator


@dataclass
class LayerSkipCalibration:
    best: frozenset[int]
    best_tokens_per_s: float
    baseline_tokens_per_s: float  # drafter "none" through the same engine
    table: list[dict] = field(default_factory=list)  # one row per candidate: skip, tokens_per_s, mean_accepted_length


def candidate_skip_sets(num_layers: int) -> list[frozenset[int]]:
    middle = list(range(1, num_layers - 1))
    out: list[frozenset[int]] = []
    for ratio in (0.25, 0.4, 0.55):
        k = max(1, round(num_layers * ratio))
        if k > len(middle):
            continue
        spread = default_skip_layers(num_layers, ratio)
        block = frozenset(middle[len(middle) - k :])
        for cand in (spread, block):
            if cand and cand not in out:
                out.append(cand)
    return out


def calibrate_layer_skip(model, prompts: list[list[int]], max_new_tokens: int = 32,
                         candidates: list[frozenset[int]] | None = None, repeats: int = 1) -> LayerSkipCalibration:
    """Time self-speculative generation for each candidate skip set; return the fastest."""
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    n_layers = int(model.config.num_hidden_layers)
    if n_layers < 3:
        raise ValueError(f"layer skipping needs at least 3 decoder layers (the first and last are kept); this model has {n_layers}")
    candidates = candidates or candidate_skip_sets(n_layers)

    def measure(gen) -> tuple[float, float]:
        gen.generate(prompts[:1], max_new_tokens=4)  # warm-up (cost curve, allocator)
        tokens, seconds, mal = 0, 0.0, []
        for _ in range(repeats):
            for p in prompts:
                t0 = time.perf_counter()
                res = gen.generate([p], max_new_tokens=max_new_tokens)
                seconds += time.perf_counter() - t0
                tokens += res.stats["new_tokens"]
                mal.append(res.stats["mean_accepted_length"])
        return tokens / seconds, sum(mal) / len(mal)

    baseline, _ = measure(SpeculativeGenerator(model, drafter="none", tree="static:chain-1"))
    table = []
    for skip in candidates:
        tps, mal = measure(SpeculativeGenerator(model, drafter="layer-skip", skip_layers=sorted(skip), tree="dynamic"))
        table.append(dict(skip=sorted(skip), tokens_per_s=tps, mean_accepted_length=mal))
    best = max(table, key=lambda r: r["tokens_per_s"])
    return LayerSkipCalibration(frozenset(best["skip"]), best["tokens_per_s"], baseline, table)

"""Lossless speculative decoding runtime: drafters, token trees, verification, KV compaction.

    from elision.apps.specdec import generate
    result = generate(model, input_ids, max_new_tokens=64, drafter="recycling+lookup")
    result.tokens, result.stats["tokens_per_s"], result.stats["mean_accepted_length"]
"""
from elision.apps.specdec.cache import CacheOverflowError
from elision.apps.specdec.drafters import KNOWN_DRAFTERS as _BASE_DRAFTERS
from elision.apps.specdec.generate import GenerationResult, SpeculativeGenerator, generate
from elision.runtime.generation.tree import TokenTree

# every drafter name generate() accepts, plus the recommended combination
KNOWN_DRAFTERS = _BASE_DRAFTERS + ("recycling+lookup",)

__all__ = ["KNOWN_DRAFTERS", "CacheOverflowError", "GenerationResult", "SpeculativeGenerator", "TokenTree", "generate"]

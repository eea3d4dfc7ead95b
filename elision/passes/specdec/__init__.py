"""Speculative-decoding passes: ``kv-cache``, ``tree-verify`` and ``layer-skip-draft``.

They turn the traced full-sequence ``@forward`` of a decoder-only LM into the functions a draft-and-verify
runtime drives, all over *explicit* per-layer KV tensors (no Hugging Face cache objects in the graph):

``kv-cache`` adds two functions next to ``@forward``::

    @prefill(input_ids[batch, n]) -> (logits, k_0, v_0, k_1, v_1, ...)
    @decode(input_ids[batch, n], past_k_0[batch, kv_heads, past, head_dim], past_v_0, ...)
        -> (logits[batch, n, vocab], k_0[batch, kv_heads, n, head_dim], v_0, ...)

  ``@prefill`` is the traced forward that also returns every layer's new keys/values (after rotary).
  ``@decode`` concatenates the past with the new keys/values in front of every attention, attends with a
  causal (bottom-right aligned) mask over ``past + n`` slots and runs rotary / position embeddings at
  positions ``past .. past + n - 1``. Both return only the *new* K/V slices: the runtime writes them into
  its preallocated cache (see ``bench_results/specdec_compiled.md`` for why not the whole present cache).

``tree-verify`` derives ``@verify`` from ``@decode``, replacing the causal mask and the positions with inputs::

    @verify(input_ids[batch, n], positions[batch, n] i64, attn_bias[batch, 1, n, past + n] float,
            past_k_0, past_v_0, ...) -> (logits, [hidden,] k_0, v_0, ...)

  so one graph scores a whole token tree (ancestor mask in ``attn_bias``, depth-based ``positions``), a
  chain, a batch of ragged sequences, or a prompt. ``hidden=true`` also returns the final hidden state
  (the LM head's input) for drafters that want it.

``layer-skip-draft{layers=2,3}`` derives ``@draft`` from ``@verify`` with the residual branches of those
decoder layers removed (their output is their input: SWIFT / Draft&Verify self-speculation from the same
weights). Skipped layers neither read nor write KV, so ``@draft`` takes ``past_k_i/past_v_i`` of the kept
layers only. The layers are concrete; the search that picks them by measured tokens/s lives in the application
(``elision.apps.specdec.compiled_backend.compile_specdec(model, skip_layers="auto")``).

What a decoder is made of comes from the model map's decoder view (``elision.analysis.model_map.decoder``), found
without model-specific code: every ``scaled_dot_product_attention`` and its K/V before GQA repetition, the
attention masks, the position-id values feeding rotary embeddings (Llama, Qwen2, Mistral) or a learned position
embedding (GPT-2), each layer's residual stream, and the LM head.

One pass a file: `kv_cache`, `tree_verify`, `layer_skip_draft`; they share `emit` (the typed-node emitter and
the tags it leaves), `rename` and `retype`.
"""
from elision.passes.specdec.emit import META_KEY
from elision.passes.specdec.kv_cache import KVCache, build_decode, build_prefill
from elision.passes.specdec.layer_skip_draft import LayerSkipDraft, build_draft, parse_layers
from elision.passes.specdec.rename import remap, rename_dims
from elision.passes.specdec.retype import retype
from elision.passes.specdec.tree_verify import TreeVerify, build_verify

__all__ = ["META_KEY", "KVCache", "TreeVerify", "LayerSkipDraft", "build_prefill", "build_decode", "build_verify",
           "build_draft", "parse_layers", "retype", "rename_dims", "remap"]

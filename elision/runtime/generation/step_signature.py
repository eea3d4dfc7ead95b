"""The signature of the generation *step* graph: the names the ONNX lowering writes and the ONNX Runtime session binds.

One graph scores a batch of token trees with the KV cache kept in preallocated buffers that ONNX Runtime
reads and writes in place (`com.microsoft.GroupQueryAttention`'s shared past/present mode):

    step(input_ids      [batch, n] i64        tokens of every sequence's tree, right-padded to n
         position_ids   [batch, n] i64        absolute position of each node (cache length + depth)
         attention_bias [batch, 1, n, total] f32  additive mask over the `total` cache rows the step reads
         seqlens_k      [batch] i32           cache length + valid nodes - 1, per sequence
         total_sequence_length [] i32         `total` above (max cache length + n)
         query_seqlens  [batch] i32           valid nodes per sequence (padding rows are never written)
         past_key_0, past_value_0, ...  [batch, kv_heads, max_length, head_dim] f32)
      -> (logits [batch, n, vocab], present_key_0, present_value_0, ...)

`present_*` are the same buffers as `past_*` (bind one OrtValue to both): the step writes the new keys and values
of sequence b at rows `seqlens_k[b] + 1 - query_seqlens[b] ..` and reads rows `< seqlens_k[b] + 1`.

The lowering (`elision.lowering.ort_rules`) imports these names; the runtime never imports the lowering.
"""
from __future__ import annotations

STEP_FUNCTION = "step"
STEP_FORM = "gqa-shared-kv"  # runtime_settings["generation"]["form"] of artifacts whose function is `step`
VERIFY_FORM = "concat-kv"  # the older form: `verify` returns new K/V slices that the host copies into its cache

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
ATTENTION_BIAS = "attention_bias"
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
QUERY_SEQLENS = "query_seqlens"
LOGITS = "logits"
SMALL_INPUTS = (INPUT_IDS, POSITION_IDS, ATTENTION_BIAS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, QUERY_SEQLENS)


def past_name(layer: int, kind: str) -> str:
    """`past_key_3` / `past_value_3`: the cache buffer input of one layer."""
    return f"past_{_kind(kind)}_{layer}"


def present_name(layer: int, kind: str) -> str:
    return f"present_{_kind(kind)}_{layer}"


def _kind(kind: str) -> str:
    if kind not in ("key", "value"):
        raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
    return kind


__all__ = ["ATTENTION_BIAS", "INPUT_IDS", "LOGITS", "POSITION_IDS", "QUERY_SEQLENS", "SEQLENS_K", "SMALL_INPUTS",
           "STEP_FORM", "STEP_FUNCTION", "TOTAL_SEQUENCE_LENGTH", "VERIFY_FORM", "past_name", "present_name"]

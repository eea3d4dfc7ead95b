"""Token pruning, token merging, DCT token compression and approximate layer skipping.

`algorithms` holds the plain torch functions, `ops` registers them as `elision::*` custom ops,
`executor` runs HF encoders with a `ReductionPlan`, `search` tunes plans against a fidelity floor, `deployed`
times plans as ONNX artifacts. IR passes: `ir_passes` (skip-layers), `prune_ir` (prune-tokens), `compress_ir`
(compress-tokens) and `merge_ir` (merge-tokens), sharing the token-axis analysis and rewrite of `token_axes`.
"""

from elision.passes.tokens import skip_layers as ir_passes  # noqa: E402,F401  (registers skip-layers with the pass registry)
from elision.passes.tokens import prune_tokens as prune_ir  # noqa: E402,F401  (registers prune-tokens)
from elision.passes.tokens import compress_tokens as compress_ir  # noqa: E402,F401  (registers compress-tokens)
from elision.passes.tokens import merge_tokens as merge_ir  # noqa: E402,F401  (registers merge-tokens)

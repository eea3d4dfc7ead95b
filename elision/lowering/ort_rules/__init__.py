"""onnxscript rewrite rules that lower elision's generation graphs to ONNX Runtime's fused contrib operators.

`lower_generation_step` (step_graph.py) turns the exported `@verify` into the in-place KV *step* graph
(`elision.runtime.generation.step_signature`); the rules it applies live one per file: `tree_gqa` (attention ->
GroupQueryAttention with a tree bias and a shared KV buffer), `pack_qkv` (three projections -> one GEMM), and
`rope_cache` (the rotary tables GroupQueryAttention reads, computed by the graph's own cos/sin subgraph).
"""
from elision.lowering.ort_rules.step_graph import StepLoweringError, lower_generation_step

__all__ = ["StepLoweringError", "lower_generation_step"]

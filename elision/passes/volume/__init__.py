"""Volume-decoding passes on elision IR: `query-independence` (analysis) and `hoist-invariants` (split).

Both reuse `elision.analysis.query_independence` through a read-only FX-like view of an IR function, so the
torch.export path (runtime) and the IR path (compiler) share one proof.
"""
from elision.passes.volume.passes import HoistInvariants, QueryIndependence, ir_query_independence

__all__ = ["QueryIndependence", "HoistInvariants", "ir_query_independence"]

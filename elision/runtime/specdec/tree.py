"""`TokenTree` lives in `elision.runtime.specdec_core.tree` (torch-free, shared with the onnxruntime loop)."""
from elision.runtime.specdec_core.tree import TokenTree

__all__ = ["TokenTree"]

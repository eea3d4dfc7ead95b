"""Tree builders live in `elision.runtime.specdec_core.tree_builders` (torch-free, shared with the onnxruntime loop)."""
from elision.runtime.specdec_core.tree_builders import (
    DEFAULT_SIZES,
    StaticTemplate,
    VerifyCostCurve,
    build_dynamic,
    build_static,
    choose_tree_size,
    parse_tree_spec,
)

__all__ = ["DEFAULT_SIZES", "StaticTemplate", "VerifyCostCurve", "build_dynamic", "build_static", "choose_tree_size",
           "parse_tree_spec"]

"""Classic semantics-preserving passes, one a file: ``dce``, ``cse``, ``constant-fold``, ``canonicalize``."""
from elision.passes.classic.canonicalize import CANONICALIZE_RULES, Canonicalize
from elision.passes.classic.constant_fold import ConstantFolding
from elision.passes.classic.cse import CommonSubexpressionElimination
from elision.passes.classic.dce import DeadCodeElimination, eliminate_dead_code, remove_unused_params

__all__ = ["CANONICALIZE_RULES", "Canonicalize", "CommonSubexpressionElimination", "ConstantFolding",
           "DeadCodeElimination", "eliminate_dead_code", "remove_unused_params"]

"""Rewrite passes and the pass manager."""
from elision.passes.base import (PASS_REGISTRY, AnalysisManager, Pass, PassError, PassManager, analyses, load_passes,
                                 make_pass, parse_pipeline, register_pass, run_pipeline)

__all__ = ["PASS_REGISTRY", "AnalysisManager", "Pass", "PassError", "PassManager", "analyses", "load_passes",
           "make_pass", "parse_pipeline", "register_pass", "run_pipeline"]

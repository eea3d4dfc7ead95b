"""Rewrite passes: the base class and registry, pipeline strings, the pass manager, and every pass (`catalog`)."""
from elision.analysis.cache import AnalysisManager, analyses
from elision.passes.base import PASS_REGISTRY, Pass, PassError, register_pass
from elision.passes.catalog import all_passes
from elision.passes.manager import PassManager, PassRecord, run_pipeline
from elision.passes.pipeline import make_pass, parse_pipeline

__all__ = ["PASS_REGISTRY", "AnalysisManager", "Pass", "PassError", "PassManager", "PassRecord", "all_passes",
           "analyses", "make_pass", "parse_pipeline", "register_pass", "run_pipeline"]

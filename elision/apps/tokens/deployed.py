"""Time tuning candidates in their deployed form: the IR rewrite lowered to an ONNX artifact run by onnxruntime.

The executor (`executor.run_encoder`) is exact but eager; what users ship is `elision compile --passes PLAN
--emit onnx`. `OnnxTimer` traces the model once at the calibration shape (pruned graphs need a static sequence
length), applies a plan's pipeline string with the IR passes, emits the artifact and returns a callable that
runs it on the calibration inputs. The unpruned artifact built the same way is the baseline. Plans with no
IR pass for the model (see `deployable`) cannot be deployed and so cannot be timed this way.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch

from elision.apps.tokens.executor import EncoderAdapter, ReductionPlan
from elision.frontend.trace import export_to_ir
from elision.lowering.emit import emit_onnx
from elision.passes.manager import PassManager
from elision.passes.pipeline import parse_pipeline
from elision.runtime.artifact import load_artifact


def deployable(plan: ReductionPlan, adapter: EncoderAdapter) -> bool:
    """Whether every part of `plan` has an IR pass for this model (so `elision compile` can apply it). Vision
    encoders take any plan; on a text encoder the merge-tokens pass does not follow an earlier prune-tokens
    stage."""
    return plan.merge_r == 0 or adapter.grid is not None or not plan.prune_stages()


class OnnxTimer:
    def __init__(self, model: torch.nn.Module, calib: tuple, input_names: list[str], threads: int | None = None):
        self.base = export_to_ir(model, calib, {}, input_names=input_names)
        self.feeds = {name: t.numpy() for name, t in zip(input_names, calib)}
        self.threads = threads
        self._tmp = tempfile.TemporaryDirectory(prefix="elision-tune-")
        self._count = 0

    def runner(self, plan: ReductionPlan) -> Callable[[], object]:
        ir = self.base.copy()
        pipeline = plan.describe() if plan != ReductionPlan() else ""
        PassManager(parse_pipeline(pipeline), allow_approximate=True).run(ir)
        out = Path(self._tmp.name) / str(self._count)
        self._count += 1
        emit_onnx(ir, None, out)
        art = load_artifact(out, threads=self.threads)
        return lambda: art.run("forward", **self.feeds)

    def close(self) -> None:
        self._tmp.cleanup()

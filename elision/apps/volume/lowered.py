"""A compiled field decoder: the functions of a volume-compiled module, lowered to torch (FX) or ONNX Runtime, behind
the protocol the coarse-to-fine driver calls (`FieldDecoder`, and `GatheredFieldDecoder` for adaptive KV).

What it runs is read off the module's volume record (`elision.passes.volume.record`), which an ONNX artifact carries
in its runtime settings, so a torch module and an artifact directory are driven alike:
  prepare(latents) -> state           @prepare once per shape (hoist-invariants), else the latents themselves
  evaluate(state, points [N,3])       @evaluate (or the unsplit @forward) on one chunk of points -> [N]
  kv / query_heads / evaluate_gathered   the state's keys and values, @query_heads and @evaluate_gathered
                                      (adaptive-kv) for the planner in `elision.apps.volume.adaptive_kv`
Inputs are bound by the value names the record lists, so the order of a function's inputs is the IR's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from elision.passes.volume import AdaptiveKVOptions, SparseVolumeOptions

Runner = Callable[..., tuple]  # (*tensors) -> tuple of tensors


def torch_runner(gm: torch.nn.Module) -> Runner:
    def run(*args):
        with torch.inference_mode():
            return gm(*args)
    return run


def ort_runner(session, input_names: list[str], output_names: list[str]) -> Runner:
    def run(*args):
        feeds = {n: np.ascontiguousarray(a.numpy()) for n, a in zip(input_names, args)}
        return tuple(torch.from_numpy(o) for o in session.run(output_names, feeds))
    return run


@dataclass
class LoweredField:
    """Runs the lowered functions of a field decoder; `sparse_options`/`kv_options` are the plans the passes
    recorded (None: dense decoding, plain attention)."""

    record: dict                       # the module's volume record ("functions" complete)
    runners: dict[str, Runner]         # function name -> runner
    latents_shape: tuple               # what @prepare (or @forward) takes as latents
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    backend: str = "torch"
    pipeline: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # trace / passes / lowering
    ir: object = None                  # the compiled module (torch backend and in-process ORT), for inspection
    artifact_dir: object = None        # the temporary ONNX artifact of an in-process ORT field (kept alive with it)

    @property
    def sparse_options(self) -> SparseVolumeOptions | None:
        plan = self.record.get("sparse")
        return SparseVolumeOptions(**plan) if plan is not None else None

    @property
    def kv_options(self) -> AdaptiveKVOptions | None:
        plan = self.record.get("adaptive_kv")
        if plan is None:
            return None
        return AdaptiveKVOptions(**{k: plan[k] for k in AdaptiveKVOptions().options()})

    @property
    def kv_scale(self) -> float | None:
        return (self.record.get("adaptive_kv") or {}).get("scale")

    def describe(self) -> str:
        return self.pipeline or "dense"

    # ------------------------------------------------------------------------------- the driver's protocol
    def _call(self, fn: str, env: dict) -> tuple:
        sig = self.record["functions"][fn]
        return self.runners[fn](*(env[name] for name in sig["inputs"]))

    def _points(self, points: torch.Tensor) -> torch.Tensor:
        return points.to(self.device, self.dtype)

    @property
    def _evaluate_fn(self) -> str:
        split = self.record.get("split")
        return split["evaluate"] if split else self.record["field"]["function"]

    def prepare(self, latents: torch.Tensor) -> dict:
        if latents.dim() == 2:
            latents = latents.unsqueeze(0)
        if tuple(latents.shape) != tuple(self.latents_shape):
            raise ValueError(f"latents must have shape {list(self.latents_shape)} for this model, "
                             f"got {list(latents.shape)}")
        latents = latents.to(self.device, self.dtype)
        split = self.record.get("split")
        if split is None:  # not hoisted: the field function reads the latents on every chunk
            fn = self.record["functions"][self.record["field"]["function"]]
            return {name: latents for name in fn["inputs"] if name != fn["query"]}
        prepare = self.record["functions"][split["prepare"]]
        (name,) = [n for n in prepare["inputs"]]
        out = self._call(split["prepare"], {name: latents})
        # one contiguous copy per shape of what every chunk reads (the hoisted K/V come as transposed views; SDPA's
        # fused CPU kernel reads contiguous ones faster)
        return {n: t.contiguous() for n, t in zip(prepare["outputs"], out)}

    def evaluate(self, state: dict, points: torch.Tensor) -> torch.Tensor:
        fn = self._evaluate_fn
        query = self.record["functions"][fn]["query"]
        return self._call(fn, {**state, query: self._points(points).reshape(1, -1, 3)})[0].reshape(-1)

    def _adaptive(self) -> dict:
        plan = self.record.get("adaptive_kv")
        if plan is None:
            raise ValueError("this field decoder was compiled without adaptive-kv; add it to the pipeline")
        return plan

    def kv(self, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._adaptive()
        return state[plan["keys"]][0], state[plan["values"]][0]

    def query_heads(self, state: dict, points: torch.Tensor) -> torch.Tensor:
        fn = self._adaptive()["query_heads"]
        query = self.record["functions"][fn]["query"]
        return self._call(fn, {**state, query: self._points(points).reshape(1, -1, 3)})[0][0]

    def evaluate_gathered(self, state: dict, points: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        plan = self._adaptive()
        fn = plan["evaluate_gathered"]
        query = self.record["functions"][fn]["query"]
        env = {**state, query: self._points(points), plan["tokens"]: tokens.to(self.device)}
        return self._call(fn, env)[0]

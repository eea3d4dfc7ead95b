"""``layer-skip-draft{layers=2,3}``: add ``@draft``, which is ``@verify`` with those decoder layers bypassed (their
output is their input: SWIFT / Draft&Verify self-speculation from the same weights).

Skipped layers neither read nor write KV, so ``@draft`` takes ``past_k_i/past_v_i`` of the kept layers only. The
layers are concrete: choosing them by measured speed is a search that runs speculative generation, which the
speculative-decoding application does (``compile_specdec(model, skip_layers="auto")``) before it runs this pass.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from elision.analysis.model_map import NotADecoder, build_model_map, lm_head_input, residual_streams
from elision.ir.core import Function, IRError, Module, Value
from elision.passes.base import Pass, PassError, register_pass
from elision.passes.classic.dce import eliminate_dead_code, remove_unused_params
from elision.passes.specdec.emit import specdec_attrs


def parse_layers(text: str, num_layers: int) -> list[int]:
    """``"2,3"`` / ``"2;3"`` -> [2, 3], validated against the model's ``num_layers``."""
    text = (text or "").strip()
    if text == "auto":
        raise PassError("layer-skip-draft{layers=auto} needs a calibration search that runs speculative generation; "
                        "passes take concrete layers. Compile with elision.apps.specdec.compiled_backend."
                        "compile_specdec(model, skip_layers='auto') (it searches, then runs this pass with the layers "
                        "it chose), or give the layers, e.g. layers=2,3")
    if not text:
        raise PassError("layer-skip-draft needs layers=I,J,...: the decoder layers @draft bypasses (e.g. layers=2,3)")
    try:
        layers = sorted({int(x) for x in re.split(r"[,; ]+", text) if x})
    except ValueError:
        raise PassError(f"layer-skip-draft: layers={text!r} is not a list of layer indices like 2,3") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise PassError(f"layer-skip-draft: layers {bad} out of range for a {num_layers}-layer model (0..{num_layers - 1})")
    if len(layers) >= num_layers:
        raise PassError(f"layer-skip-draft: skipping all {num_layers} layers leaves no draft model; keep at least one")
    return layers


def build_draft(module: Module, skip: list[int], source: str = "verify") -> Function:
    """``@source`` with the residual stream of every layer in ``skip`` bypassed (the module is not changed)."""
    if source not in module.functions:
        raise PassError(f"layer-skip-draft needs @{source}: run kv-cache and tree-verify first")
    attrs = specdec_attrs(module)
    num_layers = attrs["num_layers"]
    src = module.functions[source]
    try:
        streams = residual_streams(src, build_model_map(module, source).layers, attrs["layer_prefix"], num_layers,
                                   lm_head_input(src).type)
    except NotADecoder as e:
        raise PassError(f"layer-skip-draft: {e}") from None
    fn = src.copy()  # values are shared with the source, so the streams name the copy's values too
    fn.name = "draft"
    bypass: dict[Value, Value] = {}
    for i in sorted(skip):
        hidden_in, hidden_out = streams[i]
        # the residual stream bypasses the whole layer; its attention and MLP branches become dead code.
        # Consecutive skipped layers chain: layer i+1's input is layer i's (already bypassed) output.
        src_value = bypass.get(hidden_in, hidden_in)
        fn.replace_all_uses(hidden_out, src_value)
        bypass[hidden_out] = src_value
    drop_out = {f"k_{i}" for i in skip} | {f"v_{i}" for i in skip}
    fn.outputs = [o for o in fn.outputs if o.name not in drop_out]
    eliminate_dead_code(fn)
    drop_in = {f"past_k_{i}" for i in skip} | {f"past_v_{i}" for i in skip}
    still_used = {v for n in fn.nodes for v in n.inputs}
    for v in fn.inputs:
        if v.name in drop_in and v in still_used:
            raise IRError(f"@draft: skipped layer input %{v.name} is still used")
    fn.inputs = [v for v in fn.inputs if v.name not in drop_in]
    # `past` must stay bound by some input: it is, as long as one layer is kept
    return fn


@register_pass
@dataclass(frozen=True)
class LayerSkipDraft(Pass):
    """Add ``@draft``: ``@verify`` with the decoder layers ``layers`` bypassed (self-speculation)."""

    name: ClassVar[str] = "layer-skip-draft"
    layers: str = ""

    def run(self, module: Module) -> bool:
        attrs = specdec_attrs(module)
        if "verify" not in module.functions or "num_layers" not in attrs:
            raise PassError("layer-skip-draft needs @verify: run kv-cache and tree-verify first "
                            "(pipeline 'kv-cache,tree-verify,layer-skip-draft{layers=...}')")
        num_layers = attrs["num_layers"]
        skip = parse_layers(self.layers, num_layers)
        module.add_function(build_draft(module, skip))
        attrs["skip_layers"] = list(skip)
        attrs["draft_layers"] = [i for i in range(num_layers) if i not in skip]
        remove_unused_params(module)
        return True

"""IR rewrites of the pruning family.

skip-layers{layers=attn2,mlp3,4; allow_edge=false}   (or layers=attn2+mlp3+4)
    Removes residual branches: the residual add `h + branch(h)` of each named branch is replaced by `h`
    (for post-LN layers, BERT, the norm after the add stays: `LN(h + branch)` becomes `LN(h)`), and `dce`
    deletes the dead branch. `attnI` / `mlpI` name one branch, a bare `I` both branches of layer I. The
    first and last layer are refused unless allow_edge=true. `layers=auto` needs calibration data and is
    done by `elision tune` (it ranks branches by block influence and checks fidelity), so the pass refuses
    it with a message saying so. Approximate: runs only when approximate passes are allowed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from elision.analysis.model_map import build_model_map
from elision.passes.base import Pass, PassError, register_pass
from elision.passes.classic import eliminate_dead_code, remove_unused_params


def parse_branches(items: tuple[str, ...], num_layers: int) -> list[tuple[str, int]]:
    """`("attn2", "mlp3", "4")` -> [("attn", 2), ("mlp", 3), ("attn", 4), ("mlp", 4)], validated."""
    out: list[tuple[str, int]] = []
    # `elision tune` prints layer lists joined with "+" (attn1+mlp2); "," works too
    for item in (part.strip() for raw in items for part in raw.split("+")):
        if item == "auto":
            raise PassError("skip-layers{layers=auto} needs calibration data: run `elision tune MODEL --passes "
                            "skip-layers --min-fidelity 0.98` and use the pipeline it prints")
        m = re.fullmatch(r"(attn|mlp)?(\d+)", item)
        if not m:
            raise PassError(f"skip-layers: cannot read layer {item!r}; write I (both branches), attnI or mlpI")
        idx = int(m.group(2))
        if not 0 <= idx < num_layers:
            raise PassError(f"skip-layers: layer {idx} is out of range: the model has {num_layers} layers, "
                            f"use 0..{num_layers - 1}")
        kinds = [m.group(1)] if m.group(1) else ["attn", "mlp"]
        out += [(k, idx) for k in kinds if (k, idx) not in out]
    return out


@register_pass
@dataclass(frozen=True)
class SkipLayers(Pass):
    """Remove attention and/or MLP residual branches of chosen layers (see module docstring)."""

    name: ClassVar[str] = "skip-layers"
    approximate: ClassVar[bool] = True
    layers: tuple[str, ...] = ()
    allow_edge: bool = False
    fn_name: str = "forward"

    def run(self, module) -> bool:
        if not self.layers:
            return False
        if self.fn_name not in module.functions:
            raise PassError(f"skip-layers: the module has no function {self.fn_name!r}")
        mm = build_model_map(module, self.fn_name)
        layers = mm.layers
        if len(layers) < 2:
            raise PassError("skip-layers: no stack of residual layers was recognised in this model "
                            f"({'; '.join(mm.unrecognized[:3]) or 'no layers'})")
        branches = parse_branches(self.layers, len(layers))
        fn = module.functions[self.fn_name]
        replaced: dict = {}  # value -> what now stands for it (a layer's input may be an earlier layer's output)

        def replace(old, new):
            while new in replaced:
                new = replaced[new]
            fn.replace_all_uses(old, new)
            replaced[old] = new

        for kind, idx in branches:
            if not self.allow_edge and idx in (0, len(layers) - 1):
                raise PassError(f"skip-layers: layer {idx} is the first or last layer; skipping it is usually "
                                "catastrophic (pass allow_edge=true to force it)")
            layer = layers[idx]
            if layer.parallel and {("attn", idx), ("mlp", idx)} <= set(branches):
                # x + attn + mlp: the two branches may be summed by one add, so dropping them one after the other
                # would keep the second; the whole layer goes at once (the other kind of this layer then finds
                # nothing left to do: its add no longer feeds anything)
                replace(layer.output, layer.input)
                continue
            branch = layer.attn_branch if kind == "attn" else layer.mlp_branch
            add = layer.residual_adds[0 if kind == "attn" else 1] if len(layer.residual_adds) > (kind != "attn") \
                else None
            if branch is None or add is None:
                raise PassError(f"skip-layers: layer {idx} has no recognised {kind} residual branch")
            branch_end = branch[1]
            operands = [a for a in add.args[:2]]
            residual = [a for a in operands if a != branch_end]
            if len(residual) != 1 or branch_end not in operands:
                raise PassError(f"skip-layers: the residual add of layer {idx} ({kind}) has an unexpected form")
            replace(add.result, residual[0])
        eliminate_dead_code(fn)
        remove_unused_params(module)
        return True

"""IR rewrite `compress-tokens`: Fourier low-pass of a vision encoder's patch grid after a layer (Fourier-VLM).

compress-tokens{method=dct; after=L; keep=R}

At the output of layer `after` the pass splices in `algorithms.dct_low_pass` (the executor's own code, traced to
plain aten ops): the H x W patch grid behind [CLS] is 2-D DCT-transformed, its h x w lowest frequencies kept
(h*w ~= keep*H*W, `algorithms.dct_grid_size`) and transformed back at the smaller size; [CLS] passes through.
The four DCT matrices depend only on the shapes, so they are computed once here (`dct_low_pass_matrices`) and
stored as module parameters. Everything downstream is rewritten to 1 + h*w tokens by the rewriter prune-tokens
uses (`token_axes.shorten_tokens`). The result equals the layer-by-layer executor with
`ReductionPlan(dct_after=L, dct_keep=R)`; keep=1 (or a keep that rounds to the whole grid) leaves the module
untouched.

A compressed token mixes every patch, so it has no source token: a full-length value built before the
compression point (the attention mask) is read at [CLS] and at the first patch for all compressed tokens. That
is exact only when the value is the same for every patch (the all-true mask of an image batch); the pass
evaluates such values at compile time and refuses any it cannot prove uniform. The grid comes from the patch
embedding convolution, [CLS] must be prepended before it. The batch may stay dynamic (a mask that depends on
it only through its size is checked at several batch sizes), the grid must be static. Approximate: runs only
when approximate passes are allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from elision.analysis.token_axes import (TokenRewriter, check_layer_option, check_symbolic_batch, model_map_for,
                                         shape_of, shorten_tokens, splice, trace_tap)
from elision.ir.core import Function, Module, Node, Value, map_values
from elision.ir.ops import resolve_op
from elision.ir.symbolic import evaluate, free_symbols
from elision.ir.types import ScalarType
from elision.kernels import token_reduction as alg
from elision.passes.base import PassError, register_pass
from elision.passes.classic import eliminate_dead_code
from elision.passes.tokens.base import TokenReductionPass


def _compress_tap(hidden, dh, dw, ih, iw):
    """[CLS] kept, the patches low-passed (as `executor.run_encoder` does); plus where each slot reads
    full-length values: [CLS] at token 0, every compressed token at the first patch."""
    small = alg.dct_low_pass(hidden[:, 1:], dh, dw, ih, iw)
    b, k = hidden.shape[0], small.shape[1]
    src = torch.cat([torch.zeros(b, 1, dtype=torch.long), torch.ones(b, k, dtype=torch.long)], 1)
    return torch.cat([hidden[:, :1], small], 1), src


def _bound_size(node: Node, sizes: dict[str, int] | None) -> bool:
    """A `sym_size` whose symbolic size is bound in `sizes`."""
    ty = node.result.type
    return bool(sizes) and node.op == "aten.sym_size.int" and isinstance(ty, ScalarType) and ty.expr is not None \
        and free_symbols(ty.expr) <= set(sizes)


def _compile_time_value(fn: Function, v: Value, sizes: dict[str, int] | None = None) -> torch.Tensor | None:
    """`v` evaluated now if it depends only on parameters and constants (a mask built from `arange`), else None.
    `sizes` binds symbolic dims (a dynamic batch): a `sym_size` of an input then reads as that size."""
    producers, needed, stack = fn.producers(), set(), [v]
    while stack:
        cur = stack.pop()
        if cur in needed:
            continue
        if cur not in producers:
            return None  # a function input
        needed.add(cur)
        node = producers[cur]
        if not _bound_size(node, sizes):
            stack.extend(node.inputs)
    env: dict[Value, object] = {}
    for node in fn.nodes:
        if node.result not in needed:
            continue
        if node.op == "param":
            env[node.result] = fn.module.params[node.args[0]]
            continue
        if _bound_size(node, sizes):
            env[node.result] = evaluate(node.result.type.expr, sizes)
            continue
        try:
            env[node.result] = resolve_op(node.op)(*map_values(node.args, env.__getitem__),
                                                   **map_values(dict(node.kwargs), env.__getitem__))
        except Exception:  # an op that does not run eagerly here: treat the value as unknown
            return None
    out = env.get(v)
    return out if isinstance(out, torch.Tensor) else None


# batch sizes a value that depends on a dynamic batch only through its size is checked at
_CHECK_BATCHES = (1, 2, 5)


class _UniformOverPatches(TokenRewriter):
    """Reads full-length values at the first patch for every compressed token (see the module docstring), after
    checking that this is exact: the value must be known at compile time and constant over the patches. A value
    that depends on a dynamic batch only through its size (a mask expanded to the batch) is checked at several
    batch sizes."""

    def _uniform(self, e: Value, sizes: dict[str, int] | None) -> bool:
        val = _compile_time_value(self.fn, e, sizes)
        if val is None:
            return False
        for a in self.axes[e.name]:
            patches = val.narrow(a, 1, self.n - 1)
            if not torch.equal(patches, val.narrow(a, 1, 1).expand_as(patches)):
                return False
        return True

    def external(self, e: Value, user: Node, as_sdpa_mask: bool) -> Value:
        syms = sorted({s for d in (shape_of(e) or ()) if isinstance(d, str) for s in free_symbols(d)} |
                      {s for n in self.fn.nodes if n.op == "aten.sym_size.int" and isinstance(n.result.type, ScalarType)
                       and n.result.type.expr for s in free_symbols(n.result.type.expr)})
        bindings = [{s: b for s in syms} for b in _CHECK_BATCHES] if syms else [None]
        if not all(self._uniform(e, sizes) for sizes in bindings):
            raise self._err(f"%{e.name} (built before the compression point, used at '{user.loc}') is a per-token "
                            "value that differs between patches or depends on the inputs; a compressed token mixes "
                            "all patches, so it cannot be carried over")
        return super().external(e, user, as_sdpa_mask)


@register_pass
@dataclass(frozen=True)
class CompressTokens(TokenReductionPass):
    """Low-pass the patch grid of a ViT-style encoder after a layer (see module docstring)."""

    name: ClassVar[str] = "compress-tokens"
    method: Literal["dct"] = "dct"
    after: int = 0
    keep: float = 1.0
    fn_name: str = "forward"

    def run(self, module: Module) -> bool:
        try:
            alg.check_keep_ratio(self.keep)
        except alg.PruningError as e:
            raise PassError(f"compress-tokens: {e}") from None
        mm = model_map_for("compress-tokens", module, self.fn_name)
        layers, pe, cls = mm.layers, mm.patch_embed, mm.cls_token
        grid = shape_of(pe.node.result)[2:] if pe is not None else None
        if not layers or grid is None or len(grid) != 2 or cls is None or cls.index != 0:
            raise PassError("compress-tokens: no patch grid was recognised in this model; it needs a ViT-style "
                            "encoder (a patch-embedding convolution with a [CLS] token prepended to its patches)")
        if not all(isinstance(d, int) for d in grid):
            raise PassError(f"compress-tokens: the patch grid {grid[0]}x{grid[1]} is symbolic; export the model at a "
                            "fixed image size (only the batch may stay dynamic)")
        check_layer_option("compress-tokens", "after", self.after, len(layers), last_allowed=False)
        mats = alg.dct_low_pass_matrices(tuple(grid), self.keep)
        if mats is None:
            return False
        fn = module.functions[self.fn_name]
        layer = layers[self.after]
        hidden = layer.output
        hs = shape_of(hidden)
        if hs is not None and len(hs) == 3:
            check_symbolic_batch("compress-tokens", hs)
        if hs is None or len(hs) != 3 or hs[1] != 1 + grid[0] * grid[1]:
            raise PassError(f"compress-tokens: layer {self.after} does not output [CLS] + the {grid[0]}x{grid[1]} "
                            "patch grid; compress-tokens must come before any token pruning/merging")
        inputs = [hidden]
        for what, m in zip(("rows", "cols", "inv_rows", "inv_cols"), mats):
            pname = f"{layer.loc}.compress_tokens.dct_{what}"
            module.params[pname] = m
            inputs.append(fn.param(pname))
        shapes = {"hidden": (hs, hidden.type.torch_dtype),
                  **{f"m{i}": (tuple(m.shape), m.dtype) for i, m in enumerate(mats)}}
        tap = trace_tap(_compress_tap, shapes, "compress-tokens")
        k = 1 + mats[2].shape[0] * mats[3].shape[0]

        def splice_at(anchor):
            compressed, src = splice(fn, tap, inputs, anchor, f"{layer.loc}.compress_tokens", "compress_")
            return compressed, src, None

        shorten_tokens(fn, hidden, k, splice_at, f"compress-tokens{{after={self.after}}}", rewriter=_UniformOverPatches)
        eliminate_dead_code(fn)
        return True

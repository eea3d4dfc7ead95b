"""adaptive-kv{topk=32;block=16;samples=8;min_mass=0.99;tiers=3;tile=128}: let tiles of queries attend to their
own few latent tokens (FlashVDM's adaptive KV selection, with a retained-mass guard).

The rewrite: the one cross-attention of @evaluate (queries from the points, keys and values hoisted into the state)
gets two companions, lowered with the rest of the module:

  @query_heads(points)                        -> q [1, heads, N, d]   the attention's queries, for the planner's probes
  @evaluate_gathered(tile_points [T, C, 3], *state, tokens [heads, T, k]) -> values [T, C]
        @evaluate on T tiles of C queries, where tile t attends, per head, only to keys and values tokens[h, t, :]:
        the cross-attention becomes one gather of the listed K/V rows (a flat index over (head, token) rows, so no
        per-tile copy of K/V is materialized) and attention over them.

@evaluate itself is kept unchanged: queries whose block fails the guard (or is too small to probe) attend to every
token through it. The options are the run-time plan of the planner in `elision.apps.volume.adaptive_kv`: per spatial
block of `block`^3 grid points it probes `samples` queries and gives the block the smallest of topk, 2 topk, ...
(`tiers` doublings) tokens that keeps `min_mass` of their attention, or all tokens; blocks are cut into tiles of
`tile` queries. The graph rewrite is exact (with every token listed, @evaluate_gathered is @evaluate); the planner's
guard bounds what the selection changes. adaptive-kv attends to the hoisted K/V: it runs hoist-invariants first
when the module is not split yet, and needs the query-independence proof (tiles are subsets of the queries).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from elision.frontend.fx_import import _rename
from elision.ir.core import Function, Module, Node, Value, map_values
from elision.ir.symbolic import to_sympy
from elision.ir.types import TensorType
from elision.passes.base import Pass, PassError, register_pass
from elision.passes.volume.hoist_invariants import HoistInvariants, _backward_slice
from elision.passes.volume.query_independence import require_query_independence
from elision.passes.volume.record import record_function, volume_record

QUERY_HEADS, EVALUATE_GATHERED = "query_heads", "evaluate_gathered"
TILE_POINTS, TOKENS = "tile_points", "tokens"
HEAD_OFFSET = "adaptive_kv.head_offset"  # a parameter: token id -> row of the (head, token)-flattened K/V
SDPA = "aten.scaled_dot_product_attention.default"


@dataclass(frozen=True)
class AdaptiveKVOptions:
    topk: int = 32          # tokens kept per head and block (the first rung of the ladder)
    block: int = 16         # block edge in grid points of the current level
    samples: int = 8        # representative queries per block
    min_mass: float = 0.99  # retained softmax mass below which a block moves up the ladder (then: all tokens)
    tiers: int = 3          # doublings of topk tried before full KV (0: one fixed k, as FlashVDM)
    tile: int = 128         # queries per attention tile (a block's tiles share its tokens)

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise PassError(f"adaptive-kv topk must be >= 1, got {self.topk}")
        if self.block < 1:
            raise PassError(f"adaptive-kv block must be >= 1 grid point, got {self.block}")
        if self.samples < 1:
            raise PassError(f"adaptive-kv samples must be >= 1, got {self.samples}")
        if not 0.0 <= self.min_mass <= 1.0:
            raise PassError(f"adaptive-kv min_mass must be in [0, 1], got {self.min_mass}")
        if self.tile < 1:
            raise PassError(f"adaptive-kv tile must be >= 1 query, got {self.tile}")
        if self.tiers < 0:
            raise PassError(f"adaptive-kv tiers must be >= 0, got {self.tiers}")

    def ladder(self, tokens: int) -> list[int]:
        """The k values tried per block, smallest first, all below `tokens` (full KV is the last resort)."""
        return [self.topk << j for j in range(self.tiers + 1) if self.topk << j < tokens]

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(AdaptiveKVOptions)}


def _cross_attention(fn: Function, state: list[Value], where: str) -> Node:
    """The one attention of `fn` whose keys and values are hoisted state (and whose queries are not)."""
    found = [n for n in fn.nodes if n.op == SDPA and n.args[1] in state and n.args[2] in state
             and n.args[0] not in state]
    if len(found) != 1:
        raise PassError(f"{where}: @{fn.name} has {len(found)} cross-attentions over hoisted keys and values "
                        "(scaled_dot_product_attention with K and V computed once per shape); adaptive KV needs "
                        "exactly one")
    node = found[0]
    kwargs = dict(node.kwargs)
    extra = node.args[3:] + tuple(v for k, v in kwargs.items() if k in ("attn_mask", "dropout_p", "is_causal",
                                                                         "enable_gqa"))
    if any(a not in (None, 0.0, False) for a in extra):
        raise PassError(f"{where}: the cross-attention at {node.loc or node.result.name} has a mask, dropout, "
                        "causality or grouped heads; adaptive KV handles plain attention only")
    q, k, v = (a.type for a in node.args[:3])
    if not (q.rank == k.rank == v.rank == 4 and q.shape[0] == k.shape[0] == 1 and q.shape[1] == k.shape[1]
            and isinstance(k.shape[1], int) and isinstance(k.shape[2], int) and isinstance(k.shape[3], int)):
        raise PassError(f"{where}: the cross-attention must be [1, heads, N, d] x [1, heads, M, d] with static "
                        f"heads, M and d, got q {q}, k {k}, v {v}")
    return node


def _query_heads(evaluate: Function, q: Value) -> Function:
    nodes = _backward_slice(evaluate.nodes, [q])
    needed = {i for n in nodes for i in n.inputs} | {q}
    return Function(QUERY_HEADS, [v for v in evaluate.inputs if v in needed], [Node(n.op, n.args, dict(n.kwargs),
                    n.result, n.loc) for n in nodes], [q])


def _gathered(evaluate: Function, attention: Node, module: Module) -> Function:
    """@evaluate on tiles of queries, each attending to its own tokens."""
    points = evaluate.inputs[0]
    n = points.type.shape[1]
    q_type, k_type = attention.args[0].type, attention.args[1].type
    if q_type.shape[2] != n:
        raise PassError(f"adaptive-kv: the cross-attention's queries {q_type} do not run along the points' axis {n}")
    taken = {v.name for v in evaluate.values()}
    if TILE_POINTS in taken or TOKENS in taken:
        raise PassError(f"adaptive-kv: @{evaluate.name} already has a value named %{TILE_POINTS} or %{TOKENS}")
    # the query count becomes tiles x tile everywhere it appears
    subs = {to_sympy(n): to_sympy("tiles*tile")}
    values: dict[Value, Value] = {}

    def retyped(v: Value) -> Value:
        if v not in values:
            values[v] = Value(v.name, _rename(v.type, subs))
        return values[v]

    heads, m, d = k_type.shape[1], k_type.shape[2], k_type.shape[3]
    tile_points = Value(TILE_POINTS, TensorType(points.type.dtype, ("tiles", "tile", 3)))
    tokens = Value(TOKENS, TensorType("i64", (heads, "tiles", "topk")))
    loc = attention.loc
    flat = Node("aten.view.default", (tile_points, [1, -1, 3]), {}, retyped(points), loc)
    copies = {node: Node(node.op, map_values(node.args, retyped), map_values(dict(node.kwargs), retyped),
                         retyped(node.result), node.loc) for node in evaluate.nodes}
    fn = Function(EVALUATE_GATHERED, [tile_points] + [retyped(v) for v in evaluate.inputs[1:]] + [tokens],
                  [flat, *copies.values()], [], module)
    tiles = fn.add_node("aten.sym_size.int", (tile_points, 0), hint="tiles", after=flat, loc=loc).result
    tile = fn.add_node("aten.sym_size.int", (tile_points, 1), hint="tile", after=fn.producer(tiles), loc=loc).result
    if HEAD_OFFSET not in module.params:
        device = next((t.device for t in module.params.values() if isinstance(t, torch.Tensor)), "cpu")
        module.params[HEAD_OFFSET] = (torch.arange(heads, device=device) * m).view(heads, 1, 1)
    at = copies[attention]
    q, k, v = at.args[:3]

    def add(op: str, args: tuple, hint: str, kwargs: dict | None = None) -> Value:
        return fn.add_node(op, args, kwargs, hint=hint, before=at, loc=loc).result

    q_tiles = add("aten.reshape.default", (q, [heads, tiles, tile, d]), "q_tiles")
    rows = add("aten.add.Tensor", (tokens, fn.param(HEAD_OFFSET)), "kv_rows")
    k_sel = add("aten.index.Tensor", (add("aten.reshape.default", (k, [heads * m, d]), "k_rows"), [rows]), "k_gathered")
    v_sel = add("aten.index.Tensor", (add("aten.reshape.default", (v, [heads * m, d]), "v_rows"), [rows]), "v_gathered")
    out = add(SDPA, (q_tiles, k_sel, v_sel), "attention_tiles", dict(at.kwargs))
    whole = add("aten.reshape.default", (out, [1, heads, -1, d]), "attention")
    fn.replace_all_uses(at.result, whole)
    fn.remove(at)
    result = retyped(evaluate.outputs[0])
    fn.outputs = [fn.add_node("aten.reshape.default", (result, [tiles, tile]), hint="tile_values").result]
    return fn


@register_pass
@dataclass(frozen=True)
class AdaptiveKV(AdaptiveKVOptions, Pass):
    """Let each tile of queries attend to its own top-k latent tokens (FlashVDM adaptive KV, retained-mass guard)."""

    name: ClassVar[str] = "adaptive-kv"

    def run(self, module: Module) -> bool:
        rec = volume_record(module)
        if "split" not in rec:
            HoistInvariants().run(module)
            if "split" not in rec:
                raise PassError(f"{self.name}: the field function computes nothing once per shape (no keys and "
                                "values to select from)")
        require_query_independence(module, self.name)
        split = rec["split"]
        evaluate = module.functions[split["evaluate"]]
        state = evaluate.inputs[1:]
        attention = _cross_attention(evaluate, state, self.name)
        q, k, v = attention.args[:3]
        if not isinstance(evaluate.inputs[0].type.shape[1], str):
            raise PassError(f"{self.name}: the query count of @{evaluate.name} is static; trace it dynamic")
        changed = QUERY_HEADS not in module.functions
        if changed:
            heads_fn = module.add_function(_query_heads(evaluate, q))
            gathered = module.add_function(_gathered(evaluate, attention, module))
            record_function(module, heads_fn, evaluate.inputs[0].name)
            record_function(module, gathered, TILE_POINTS)
        rec["adaptive_kv"] = {**self.options(), "query_heads": QUERY_HEADS, "evaluate_gathered": EVALUATE_GATHERED,
                              "keys": k.name, "values": v.name, "tokens": TOKENS,
                              "scale": attention.kwargs.get("scale")}
        return changed

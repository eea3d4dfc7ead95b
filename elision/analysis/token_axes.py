"""Which tensor axes of an IR function index tokens, and rewriting a graph region to a shorter token axis.

Shared by the token-reduction rewrites (prune-tokens, compress-tokens, merge-tokens): each traces its tap from
`algorithms` (`trace_tap`), splices it into the residual stream (`splice`) and lets `shorten_tokens` rewrite what
follows.

Token pruning changes the sequence length in the middle of a graph; every downstream value whose axis is
"the token axis" shrinks from N to K: views/reshapes/expands that spell N, the attention mask (which was
built once, before the pruning point, at length N), the pooling weights of a sentence encoder. Shapes are
static, so N cannot be found by value (a head dim or a batch may also equal N). Instead axes are unified
along the data flow: an (value, axis) pair is linked to the pairs it corresponds to through each op (the
per-op rules of `elision.analysis.axes`: elementwise broadcasting, linear, transpose, view by prefix product,
SDPA query/key/mask axes, ...), and
the class of (hidden state after the pruning layer, axis 1) is the token axis everywhere it reaches.

The sequence length must be static (K is a static top-k), the batch need not be: a symbolic batch dim (a
name such as ``batch`` in the IR types, a ``sym_size`` value in shape arguments) flows through the analysis
(reshape prefixes are compared as sympy products), the taps are traced with that dim symbolic
(`trace_tap`) and the rewrite spells it with a ``sym_size`` of a value that has it, so a pruned graph keeps
serving every batch size. Any other symbolic dim that the rewrite would have to spell is refused.
"""
from __future__ import annotations

from typing import Callable

import sympy
import torch
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from elision.analysis.axes import RESHAPES, axis_rule, base_op, shape_of
from elision.analysis.model_map import build_model_map
from elision.errors import PassError
from elision.frontend.fx_import import import_graph
from elision.ir.core import Function, Node, Value, map_values
from elision.ir.types import ScalarType, TensorType


class AxisClasses:
    """Union-find over (value name, axis)."""

    def __init__(self) -> None:
        self.parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(self, key):
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a: Value, ia: int, b: Value, ib: int) -> None:
        sa, sb = shape_of(a), shape_of(b)
        if sa is None or sb is None:
            return
        ia, ib = ia % len(sa) if sa else 0, ib % len(sb) if sb else 0
        if not sa or not sb or sa[ia] != sb[ib] or sa[ia] == 1:
            return
        ra, rb = self.find((a.name, ia)), self.find((b.name, ib))
        if ra != rb:
            self.parent[ra] = rb


def link_node(node: Node, uf: AxisClasses) -> None:
    """Link the axes of `node`'s tensor inputs to the axes of its result they correspond to (the rules of
    `elision.analysis.axes`; whether the op mixes values along an axis does not matter for its identity)."""
    if shape_of(node.result) is None:
        return
    rule = axis_rule(node)
    if rule is None:
        return
    for link in rule.links:
        if link.part is None and link.result_part is None:
            uf.union(link.source, link.axis, node.result, link.result_axis)
    for a, ia, b, ib in rule.ties:
        uf.union(a, ia, b, ib)


def token_axes(fn: Function, seed: Value, axis: int) -> dict[str, list[int]]:
    """value name -> its axes in the token class of (seed, axis), for every value of `fn`."""
    uf = AxisClasses()
    for node in fn.nodes:
        link_node(node, uf)
    root = uf.find((seed.name, axis))
    out: dict[str, list[int]] = {}
    for key in list(uf.parent):
        if uf.find(key) == root:
            out.setdefault(key[0], []).append(key[1])
    return {k: sorted(v) for k, v in out.items()}


# ------------------------------------------------------------------------------ rewriting to length K

_SHAPE_ARG_OPS = {"view", "reshape", "_unsafe_view", "expand"}
# ops the rewrite knows how to re-emit at the shorter length (their shape arguments are handled or absent)
_REWRITABLE = _SHAPE_ARG_OPS | {
    "add", "sub", "mul", "div", "where", "masked_fill", "__and__", "__or__", "bitwise_and", "logical_and",
    "logical_not", "eq", "ne", "ge", "gt", "le", "lt", "clone", "_to_copy", "to", "gelu", "relu", "silu", "tanh",
    "sigmoid", "neg", "exp", "log", "sqrt", "rsqrt", "pow", "clamp", "clamp_min", "layer_norm", "softmax",
    "_softmax", "dropout", "alias", "detach", "contiguous", "erf", "linear", "transpose", "t", "permute",
    "unsqueeze", "squeeze", "matmul", "bmm", "scaled_dot_product_attention", "sum", "mean", "amax", "select",
    "slice", "_assert_tensor_metadata", "rms_norm", "flatten",
}


def model_map_for(pass_name: str, module, fn_name: str):
    """The model map of `module.functions[fn_name]`, or a PassError naming the pass."""
    if fn_name not in module.functions:
        raise PassError(f"{pass_name}: the module has no function {fn_name!r}")
    return build_model_map(module, fn_name)


def check_layer_option(pass_name: str, option: str, value: int, num_layers: int, last_allowed: bool) -> None:
    """`after`/`start` must name a layer; reducing tokens after the last layer saves nothing."""
    top = num_layers - (1 if last_allowed else 2)
    if not 0 <= value <= top:
        why = "" if last_allowed else " (reducing tokens after the last layer saves nothing)"
        raise PassError(f"{pass_name}: {option}={value} is out of range: the model has {num_layers} layers, "
                        f"use 0..{top}{why}")


def check_symbolic_batch(what: str, shape: tuple, token_axis: int = 1) -> None:
    """Token reduction needs a static sequence (a static top-k); only a named batch dim may stay symbolic."""
    for a, d in enumerate(shape):
        if isinstance(d, int):
            continue
        if a == token_axis % len(shape):
            raise PassError(f"{what}: the sequence length is symbolic ({d!r}); token reduction needs a static "
                            "sequence length: export the model at a fixed length (only the batch may stay dynamic)")
        if a != 0 or not d.isidentifier():
            raise PassError(f"{what}: dimension {d!r} (axis {a} of a {len(shape)}-d value) is symbolic; only a "
                            "dynamic batch (a plain named dim on axis 0) is supported, export the rest at fixed sizes")


def trace_tap(tap, shapes: dict[str, tuple], what: str) -> Function:
    """`tap` (plain torch code from `algorithms`, the executor's own) traced with make_fx for inputs of `shapes`
    (name -> (shape, dtype)) and imported as an IR function, ready to `splice`.

    Symbolic dims (a dynamic batch, spelled as in the IR) stay symbolic: the tap is traced on fake tensors whose
    sizes are those symbols, so its shape arguments become `sym_size` values instead of the example's size. A tap
    whose code had to specialize on such a dim (a guard on its value) is refused rather than baked in."""

    symbolic = sorted({d for s, _ in shapes.values() for d in s if isinstance(d, str)})
    symbol_names: dict[str, str] = {}
    if not symbolic:
        examples = [torch.zeros(s, dtype=d) for s, d in shapes.values()]
        gm = make_fx(tap, tracing_mode="fake")(*examples)
    else:
        bad = [d for d in symbolic if not d.isidentifier()]
        if bad:
            raise PassError(f"{what}: symbolic dimension {bad[0]!r} is an expression; only a plain named dim (a "
                            "dynamic batch) can stay symbolic")
        env = ShapeEnv()
        static = {d for s, _ in shapes.values() for d in s if isinstance(d, int)}
        hints = (h for h in range(17, 10_000) if h not in static)  # sizes no static dim has: no accidental ties
        sizes, named = {}, {}
        for name in symbolic:
            hint = next(hints)
            sym = env.create_symbol(hint, ConstantSource(f"elision_dim_{name}"), dynamic_dim=DimDynamic.DYNAMIC)
            sizes[name] = env.create_symintnode(sym, hint=hint)
            symbol_names[str(sym)] = name
            named[sym] = sympy.Symbol(name)
        with FakeTensorMode(shape_env=env) as mode:
            examples = [torch.empty(tuple(sizes.get(d, d) for d in s), dtype=d_) for s, d_ in shapes.values()]
        with mode:
            gm = make_fx(tap, tracing_mode="real")(*examples)
        guards = [str(g.expr.xreplace(named)) for g in env.guards if g.expr.free_symbols]
        if guards:
            raise PassError(f"{what}: the tap's code depends on the value of the symbolic dims {symbolic} "
                            f"({'; '.join(guards[:3])}); export the model at a fixed batch size for this pass")
    if any(n.op == "get_attr" for n in gm.graph.nodes):
        raise PassError(f"{what}: the tap traced to graph constants; cannot splice it")
    return import_graph(gm.graph, fn_name=what.replace("-", "_") + "_tap", param_placeholders={},
                        input_names=list(shapes), symbol_names=symbol_names)


def splice(fn: Function, tap: Function, inputs: list[Value], after: Node, loc: str, prefix: str) -> list[Value]:
    """Copy `tap`'s nodes into `fn` after `after`, its inputs bound to `inputs`; returns its outputs."""
    env = dict(zip(tap.inputs, inputs))
    anchor = after
    for n in tap.nodes:
        v = fn.new_value(n.result.type, prefix + n.result.name)
        node = Node(n.op, map_values(n.args, env.__getitem__), map_values(dict(n.kwargs), env.__getitem__), v, loc)
        fn.insert_after(anchor, [node])
        env[n.result] = v
        anchor = node
    return [env[o] for o in tap.outputs]


class TokenRewriter:
    """Re-emits the nodes after the shortening point at token length K (in place, in program order)."""

    def __init__(self, fn: Function, axes: dict[str, list[int]], n: int, k: int, idx: Value | None, kept: Value | None,
                 mask_inputs: set[str], where: str):
        self.fn, self.axes, self.n, self.k, self.idx, self.kept = fn, axes, n, k, idx, kept
        self.mask_inputs, self.where = mask_inputs, where
        self.loc = where.split("{")[0]  # the pass name, as the loc of the nodes it adds
        self.remap: dict[Value, Value] = {}
        self.gathered: dict[tuple[str, str], Value] = {}
        self.producers = fn.producers()
        self.sizes: dict[str, Value] = {}  # symbolic dim -> an int value holding it (a dynamic batch)

    def _err(self, what: str) -> PassError:
        return PassError(f"{self.where}: {what}")

    def _shrunk(self, ty: TensorType, axes: list[int]) -> TensorType:
        shape = list(ty.shape)
        for a in axes:
            if shape[a] != self.n:
                raise self._err(f"token axis {a} of a {ty} value is not the sequence length {self.n}")
            shape[a] = self.k
        return TensorType(ty.dtype, tuple(shape))

    def _add(self, op: str, args: tuple, ty: TensorType, before: Node, kwargs: dict | None = None) -> Value:
        v = self.fn.new_value(ty, "shortened")
        self.fn.insert_before(before, [Node(op, args, kwargs or {}, v, self.loc)])
        return v

    def _size(self, d, have: list[Value], before: Node):
        """`d` as a shape argument: an int, or for a symbolic dim (a dynamic batch) an int value read off a tensor
        in `have` that has that dim (`aten.sym_size.int`, made once and reused)."""
        if isinstance(d, int):
            return d
        if d in self.sizes:
            return self.sizes[d]
        for t in have:
            shape = shape_of(t)
            if t is None or shape is None or d not in shape:
                continue
            v = self.fn.new_value(ScalarType("int", d), "sym_size")
            node = Node("aten.sym_size.int", (t, shape.index(d)), {}, v, self.loc)
            # right after the tensor it reads (the idx of the tap: before every rewritten node), else before the user
            anchor = self.fn.producer(t) if t is self.idx else None
            if anchor is not None:
                self.fn.insert_after(anchor, [node])
                self.sizes[d] = v
            else:
                self.fn.insert_before(before, [node])
            return v
        raise self._err(f"cannot spell the symbolic dimension {d!r} in a shape argument: no value at hand has it")

    def _shape_arg(self, shape, have: list[Value], before: Node) -> list:
        return [self._size(d, have, before) for d in shape]

    def _is_mask(self, v: Value) -> bool:
        """Derived from a non-float model input (the attention mask), i.e. a keep/drop weight, not a feature."""
        seen, stack = set(), [v]
        while stack:
            cur = stack.pop()
            if cur.name in self.mask_inputs:
                return True
            if cur.name in seen:
                continue
            seen.add(cur.name)
            p = self.producers.get(cur)
            if p is not None:
                stack.extend(p.inputs)
        return False

    def _kept_as(self, shape: tuple, axis: int, dtype: str, before: Node) -> Value:
        view = [shape[0]] + [1] * (len(shape) - 1)
        view[axis] = self.k
        kv = self._add("aten.view.default", (self.kept, self._shape_arg(view, [self.idx, self.kept], before)),
                       TensorType("bool", tuple(view)), before)
        if dtype == "bool":
            return kv
        return self._add("aten._to_copy.default", (kv,), TensorType(dtype, tuple(view)), before,
                         {"dtype": TensorType(dtype, ()).torch_dtype})

    def external(self, e: Value, user: Node, as_sdpa_mask: bool) -> Value:
        """A full-length value used after the shortening point, gathered along its token axes (cached)."""
        mode = "sdpa" if as_sdpa_mask else "plain"
        key = (e.name, mode)
        if key in self.gathered:
            return self.gathered[key]
        axes, ty = self.axes[e.name], e.type
        if 0 in axes:
            raise self._err(f"%{e.name} has the token axis first (no batch axis); cannot gather it")
        b = shape_of(self.idx)[0]
        before = user
        cur, shape = e, list(ty.shape)
        if shape[0] != b:  # broadcast over the batch (a shared mask or position table): materialize rows
            shape[0] = b
            cur = self._add("aten.expand.default", (cur, self._shape_arg(shape, [self.idx, e], before)),
                            TensorType(ty.dtype, tuple(shape)), before)
        for a in axes:
            view = [b] + [1] * (len(shape) - 1)
            view[a] = self.k
            iv = self._add("aten.view.default", (self.idx, self._shape_arg(view, [self.idx, e], before)),
                           TensorType("i64", tuple(view)), before)
            shape[a] = self.k
            ie = self._add("aten.expand.default", (iv, self._shape_arg(shape, [self.idx, e], before)),
                           TensorType("i64", tuple(shape)), before)
            cur = self._add("aten.gather.default", (cur, a, ie), TensorType(ty.dtype, tuple(shape)), before)
        if self.kept is not None and self._is_mask(e):
            # surplus slots of shorter rows (and padding) must stay hidden downstream: keys for attention,
            # pooling weights for a sentence embedding
            last = axes[-1]
            out_ty = TensorType(ty.dtype, tuple(shape))
            if ty.dtype == "bool":
                kv = self._kept_as(shape, last, "bool", before)
                cur = self._add("aten.__and__.Tensor", (cur, kv), out_ty, before)
            elif as_sdpa_mask and ty.torch_dtype.is_floating_point:
                kv = self._kept_as(shape, last, "bool", before)
                notk = self._add("aten.logical_not.default", (kv,), kv.type, before)
                cur = self._add("aten.masked_fill.Scalar", (cur, notk, float("-inf")), out_ty, before)
            else:
                cur = self._add("aten.mul.Tensor", (cur, self._kept_as(shape, last, ty.dtype, before)), out_ty, before)
        self.gathered[key] = cur
        return cur

    def rewrite(self, node: Node) -> None:
        op = base_op(node.op)
        out_axes = self.axes.get(node.result.name, [])
        sdpa_mask = node.args[3] if op == "scaled_dot_product_attention" and len(node.args) > 3 else \
            node.kwargs.get("attn_mask") if op == "scaled_dot_product_attention" else None
        changed = False

        def swap(v: Value) -> Value:
            nonlocal changed
            if v in self.remap:
                changed = True
                return self.remap[v]
            if self.axes.get(v.name):
                changed = True
                return self.external(v, node, as_sdpa_mask=v is sdpa_mask)
            return v

        if op == "param":
            return
        args, kwargs = map_values(node.args, swap), map_values(dict(node.kwargs), swap)
        if not changed:
            # nothing it reads changed: a full-length value made here from constants or full-length inputs (an
            # earlier stage's gathered mask) is an external like one made before the shortening point; its users
            # gather it
            return
        if op not in _REWRITABLE:
            raise self._err(f"cannot rewrite {node.op} (%{node.result.name}, at '{node.loc}') to the shorter "
                            "sequence length; this op is not supported after the shortening point")
        x_axes = self.axes.get(node.args[0].name, []) if node.args and isinstance(node.args[0], Value) else []
        if op in RESHAPES and x_axes and not out_axes:
            raise self._err(f"%{node.result.name} = {node.op} (at '{node.loc}') merges or splits the token axis; "
                            "cannot rewrite it to the shorter sequence length")
        if op in _SHAPE_ARG_OPS:
            shape = list(args[1])
            for a in out_axes:
                if shape[a] != -1:
                    shape[a] = self.k
            args = (args[0], shape, *args[2:])
        elif op == "select" and args[1] % len(shape_of(node.args[0])) in x_axes and args[2] != 0:
            raise self._err(f"%{node.result.name} selects token {args[2]}; only token 0 ([CLS], always kept) "
                            "keeps its position")
        elif op == "slice" and args[1] % len(shape_of(node.args[0])) in x_axes:
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            end = args[3] if len(args) > 3 and args[3] is not None else self.n
            if start != 0 or end < self.n:
                raise self._err(f"%{node.result.name} slices tokens {start}:{end}; only whole-sequence slices "
                                "survive a change of length")
            args = (args[0], args[1], 0, self.k, *args[4:])
        new = Value(node.result.name, self._shrunk(node.result.type, out_axes)) if isinstance(
            node.result.type, TensorType) else node.result
        node.args, node.kwargs = args, kwargs
        if new != node.result:
            self.remap[node.result] = new
            node.result = new


def shorten_tokens(fn: Function, hidden: Value, k: int,
                   splice_at: Callable[[Node], tuple[Value, Value, Value | None]], where: str,
                   mask_inputs: set[str] = frozenset(), rewriter: type[TokenRewriter] = TokenRewriter) -> None:
    """Replace the (B, N, C) layer output `hidden` by a (B, K, C) value and rewrite everything after it to length K.

    `splice_at(anchor)` inserts the nodes computing the shorter value right after `anchor` (the producer of
    `hidden`) and returns (shorter, idx, kept): idx (B, K) is the token each slot stands for, used to gather the
    full-length values built before the point (masks; None when no slot has one source token, and then `rewriter`
    must override `external`); kept (B, K) bool marks the real slots (None: all are) and hides the others in
    gathered masks derived from the `mask_inputs`. `where` names the pass in errors. The
    full-length nodes left dead are not removed here (a pass may still need values that have no user yet).
    """
    anchor = fn.producer(hidden)
    if anchor is None:
        raise PassError(f"{where}: the layer output is a function input; nothing to rewrite")
    # the analysis and the nodes to rewrite are taken before the splice: its own nodes stay as traced
    axes = token_axes(fn, hidden, 1)
    downstream = fn.nodes[fn.index(anchor) + 1:]
    shorter, idx, kept = splice_at(anchor)
    rw = rewriter(fn, axes, shape_of(hidden)[1], k, idx, kept, set(mask_inputs), where)
    rw.remap[hidden] = shorter
    for node in downstream:
        rw.rewrite(node)
    fn.outputs = [rw.remap.get(o, o) for o in fn.outputs]

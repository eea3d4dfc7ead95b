"""Rewrite rules: one attention of the exported `@verify` graph -> `com.microsoft.GroupQueryAttention` over a shared
KV buffer, with explicit position ids and the tree's additive bias.

They run after onnxscript's own fusions have reduced the attention to (per layer)

    q, k, v   = Transpose(Reshape(proj_q|k|v))                           [batch, n, ...] -> BHSd
                (q and k optionally RMS-normalized per head between Reshape and Transpose: Qwen3's q_norm/k_norm)
    q_r, k_r  = RotaryEmbedding(q | k, cos, sin)                        (ai.onnxruntime._fusion; absent: GPT-2)
    K, V      = repeat_kv(Concat(past_k, k_r)), repeat_kv(Concat(past_v, v))   (GQA head repetition, if any)
    out       = Reshape(Transpose(SDPA(q_r, K, V, bias)))                (ai.onnxruntime._fusion)

and replace it with `GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total_sequence_length, cos_table,
sin_table, position_ids, attention_bias, query_seqlens)`: do_rotary=1 (`TreeGroupQueryAttention`), or do_rotary=0
without tables and positions (`TreeGroupQueryAttentionNoRotary`, for learned absolute positions). GQA appends the
new K/V to the past buffer in place and attends causally (bottom-right aligned) plus the bias, so tree nodes in
parents-first order see exactly their ancestors. onnxscript's own `fuse_gqa` does not fit: it expects a causal mask
built from a 2-D `attention_mask` input and derives `seqlens_k` from the largest position id, which is wrong for a
tree.

Shapes GQA needs that the model does not give are made around it: a projection split further than [batch, n,
hidden] (Falcon's [batch, n, groups, heads per group, head_dim]) is flattened to [batch, n, -1]; an output the model
flattens to [batch * n, hidden] (GPT-2's Conv1D as a 2-D Gemm) is reshaped the model's way. Per-head q/k norms stay
in the graph: GQA reads the normalized heads, flattened, and rotates them itself, which is Qwen3's order (norm, then
rotary), whether both have one or only q or k; GQA's own `q_norm_weight`/`k_norm_weight` inputs would do it in the
kernel, but onnxruntime's CPU kernel refuses them (CUDA only), and they come only as a pair.

The present K/V outputs of every fused node are collected in `GQAInputs.presents` (by past input name) so the
caller can make them graph outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from elision.lowering.ort_rules.rope_cache import RopeTableError, RopeTables, rope_tables

FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's internal domain for RotaryEmbedding / SDPA placeholders
MS_DOMAIN = "com.microsoft"

__all__ = ["GQAInputs", "TreeGroupQueryAttention", "TreeGroupQueryAttentionNoRotary",
           "TreeGroupQueryAttentionPartialRotary", "MS_DOMAIN"]


@dataclass
class GQAInputs:
    """The step graph's new inputs the fused nodes read, and what the fusions produce."""

    model: ir.Model
    seqlens_k: ir.Value
    total_sequence_length: ir.Value
    query_seqlens: ir.Value
    max_positions: int
    presents: dict[str, ir.Value] = field(default_factory=dict)  # past input name -> the fused node's present output
    tables: dict[tuple[ir.Value, ir.Value], tuple[ir.Value, ir.Value, ir.Value]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _bias_input(mask: ir.Value) -> ir.Value | None:
    """The graph input the attention mask is read from: the input itself, or a leading slice of its last axis
    (the export slices `attn_bias[..., :past + n]`, a no-op, to tie the bias length to the KV length)."""
    if mask.is_graph_input():
        return mask
    node = mask.producer()
    if node is None or node.op_type != "Slice" or node.domain not in ("", "ai.onnx"):
        return None
    data, starts, _ends, axes = (list(node.inputs) + [None] * 4)[:4]
    steps = node.inputs[4] if len(node.inputs) > 4 else None
    if data is None or not data.is_graph_input() or data.shape is None or data.shape.rank() != 4:
        return None
    if not _ir_utils.is_singleton_value(starts, 0) or not _ir_utils.is_singleton_value(axes, lambda a: a in (3, -1)):
        return None
    if steps is not None and not _ir_utils.is_singleton_value(steps, 1):
        return None
    return data


def _heads(op, x, name: str, normed: bool = False):
    """[batch, n, heads * head_dim] -> [batch, heads, n, head_dim], bound as `name` after the Reshape; `normed`: an
    RMSNorm over each head's vector may sit between Reshape and Transpose (Qwen3's q_norm / k_norm, which onnxscript
    has fused to SimplifiedLayerNormalization), bound as `name`_norm with its weight `name`_norm_weight."""
    shaped = op.Reshape(x, pattern.ANY_VALUE, _outputs=[name])
    if normed:
        norm = op.SimplifiedLayerNormalization(shaped, pattern.Var(f"{name}_norm_weight"), _allow_other_attributes=True,
                                               _outputs=[f"{name}_norm"])
        shaped = pattern.OrValue([norm, shaped])
    return op.Transpose(shaped, perm=[0, 2, 1, 3])


def _attention(op, q, k, v, past_k, past_v, mask):
    def cached(past, new):
        full = op.Concat(past, new, axis=2)
        repeated = op.Reshape(op.Expand(op.Unsqueeze(full, [2]), pattern.ANY_VALUE), pattern.ANY_VALUE)
        return pattern.OrValue([repeated, full])

    att = op.SDPA(q, cached(past_k, k), cached(past_v, v), mask, key_format="BHSd", _domain=FUSION_DOMAIN,
                  _allow_other_attributes=True, _outputs=["att"])
    return op.Reshape(op.Transpose(att, perm=[0, 2, 1, 3]), pattern.Var("out_shape"), _outputs=["out"])


class TreeGroupQueryAttention(pattern.RewriteRuleClassBase):
    def __init__(self, inputs: GQAInputs):
        super().__init__("TreeGroupQueryAttention")
        self.inputs = inputs

    def pattern(self, op, q_lin, k_lin, v_lin, cos, sin, past_k, past_v, mask):
        q, k = _heads(op, q_lin, "q_bshd", normed=True), _heads(op, k_lin, "k_bshd", normed=True)
        q = op.RotaryEmbedding(q, cos, sin, _domain=FUSION_DOMAIN, _outputs=["q_rot"])
        k = op.RotaryEmbedding(k, cos, sin, _domain=FUSION_DOMAIN, _outputs=["k_rot"])
        return _attention(op, q, k, _heads(op, v_lin, "v_bshd"), past_k, past_v, mask)

    def check(self, context, q_lin, k_lin, v_lin, q_bshd, k_bshd, v_bshd, att, out, past_k, past_v, mask, q_rot=None,
              k_rot=None, cos=None, sin=None, q_bshd_norm=None, k_bshd_norm=None, **_):
        result = pattern.MatchResult()
        for rot in (q_rot, k_rot):
            if rot is not None and rot.producer().attributes.get_int("interleaved", 0):
                return self._fail(result, "interleaved rotary is not what GroupQueryAttention's rotary computes", rot)
        heads, kv_heads = _ir_utils.get_dim(q_bshd, 2), _ir_utils.get_dim(k_bshd, 2)
        head_dim, v_heads = _ir_utils.get_dim(q_bshd, 3), _ir_utils.get_dim(v_bshd, 2)
        if not all(isinstance(d, int) for d in (heads, kv_heads, head_dim, v_heads)):
            return self._fail(result, "head counts and head size must be static", [q_bshd, k_bshd])
        if head_dim % 16:
            # ONNX Runtime's CPU kernel refuses other head sizes at run time ("head_size shall be a multiple of 16")
            return self._fail(result, f"head size {head_dim} is not a multiple of 16, which GroupQueryAttention needs",
                              q_bshd)
        if heads % kv_heads or v_heads != kv_heads:
            return self._fail(result, f"{heads} query heads over {kv_heads} key / {v_heads} value heads is not GQA",
                              k_bshd)
        # per projection: True when it comes split further than [batch, n, hidden] (Falcon's [batch, n, groups,
        # heads per group, head_dim]); its row-major reshape to heads then equals flattening it to [batch, n, -1]
        self._split = []
        for x, shaped in ((q_lin, q_bshd), (k_lin, k_bshd), (v_lin, v_bshd)):
            dims = [str(d) for d in x.shape] if x.shape is not None else []
            if len(dims) < 3 or dims[:2] != [str(d) for d in list(shaped.shape)[:2]]:
                return self._fail(result, "a q/k/v projection whose leading dims are not [batch, n]", x)
            self._split.append(len(dims) > 3)
        norms = self._head_norms(result, head_dim, q_bshd_norm, k_bshd_norm)
        if norms is None:
            return result
        if not (past_k.is_graph_input() and past_v.is_graph_input()):
            return self._fail(result, "the past keys/values must be graph inputs", [past_k, past_v])
        bias = _bias_input(mask)
        if bias is None:
            return self._fail(result, "the attention mask is not the graph's additive bias input", mask)
        if q_rot is not None and (cos, sin) not in self.inputs.tables:
            try:
                tables = rope_tables(self.inputs.model, cos, sin, self.inputs.max_positions)
            except RopeTableError as e:
                return self._fail(result, str(e), [cos, sin])
            self.inputs.tables[(cos, sin)] = self._table_values(tables)
        scale = att.producer().attributes.get("scale")
        self._attrs = dict(num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(q_rot is not None),
                           rotary_interleaved=0)
        if scale is not None and scale.value is not None:
            self._attrs["scale"] = float(scale.value)
        self._norms = list(zip(norms, (heads, kv_heads)))
        self._bias = bias
        # GQA returns [batch, n, heads * head_dim]; a model that flattens to [batch * n, hidden] here for its output
        # projection (GPT-2's Conv1D as a 2-D Gemm) gets its own reshape back
        self._flatten = out.shape is None or out.shape.rank() != 3
        return result

    def _head_norms(self, result: pattern.MatchResult, head_dim: int, *norms: ir.Value | None) -> list | None:
        """The per-head norm node of q and of k (None where that projection has none); None (a failed check) when a
        norm is not over each head's vector with a [head_dim] weight."""
        found = []
        for norm in norms:
            node = norm.producer() if norm is not None else None
            if node is not None and (node.attributes.get_int("axis", -1) not in (-1, 3) or node.inputs[1] is None
                                     or node.inputs[1].shape is None or list(node.inputs[1].shape) != [head_dim]):
                self._fail(result, f"a per-head q/k norm that is not over each head's vector with a [{head_dim}] "
                                   "weight", norm)
                return None
            found.append(node)
        return found

    @staticmethod
    def _normalized(op, x: ir.Value, norm: ir.Node, n_heads: int) -> ir.Value:
        heads = op.Reshape(x, op.Constant(value_ints=[0, 0, n_heads, -1]))
        attrs = {name: attr.value for name, attr in norm.attributes.items()}
        normed = op.SimplifiedLayerNormalization(heads, norm.inputs[1], _domain=norm.domain, **attrs)
        return op.Reshape(normed, op.Constant(value_ints=[0, 0, -1]))

    def _fail(self, result: pattern.MatchResult, reason: str, values) -> pattern.MatchResult:
        """A failed check, remembered so the caller can say why an attention did not fuse."""
        if reason not in self.inputs.failures:
            self.inputs.failures.append(reason)
        return result.fail(reason, values)

    def _table_values(self, tables: RopeTables) -> tuple[ir.Value, ir.Value, ir.Value]:
        graph = self.inputs.model.graph
        values = []
        for name, array in (("rope_cos_table", tables.cos), ("rope_sin_table", tables.sin)):
            name = f"{name}_{len(self.inputs.tables)}" if self.inputs.tables else name
            value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                             const_value=ir.tensor(array, name=name))
            graph.register_initializer(value)
            values.append(value)
        return values[0], values[1], tables.positions

    def rewrite(self, op, q_lin, k_lin, v_lin, past_k, past_v, out_shape, cos=None, sin=None, **_):
        # without rotary GQA reads no tables and no positions (the model adds its position embedding itself)
        cos_table, sin_table, positions = self.inputs.tables[(cos, sin)] if self._attrs["do_rotary"] else (None,) * 3
        i = self.inputs
        q_lin, k_lin, v_lin = (op.Reshape(x, op.Constant(value_ints=[0, 0, -1])) if split else x
                               for x, split in zip((q_lin, k_lin, v_lin), self._split))
        # q and k with a per-head norm: split into heads, normalized (the model's own norm node), flattened for GQA
        q_lin, k_lin = (self._normalized(op, x, norm, n_heads) if norm is not None else x
                        for x, (norm, n_heads) in zip((q_lin, k_lin), self._norms))
        out, present_k, present_v = op.GroupQueryAttention(
            q_lin, k_lin, v_lin, past_k, past_v, i.seqlens_k, i.total_sequence_length, cos_table, sin_table,
            positions, self._bias, None, None, None, None, None, i.query_seqlens,
            _domain=MS_DOMAIN, _outputs=3, **self._attrs)
        i.presents[past_k.name] = present_k
        i.presents[past_v.name] = present_v
        return op.Reshape(out, out_shape) if self._flatten else out


class TreeGroupQueryAttentionNoRotary(TreeGroupQueryAttention):
    """The same attention without rotary (positions enter as a learned embedding, GPT-2): GQA with do_rotary=0."""

    def pattern(self, op, q_lin, k_lin, v_lin, past_k, past_v, mask):
        q, k = _heads(op, q_lin, "q_bshd", normed=True), _heads(op, k_lin, "k_bshd", normed=True)
        return _attention(op, q, k, _heads(op, v_lin, "v_bshd"), past_k, past_v, mask)


class TreeGroupQueryAttentionPartialRotary(TreeGroupQueryAttention):
    """Rotary over the first r dims of each head only (Phi's and StableLM's `partial_rotary_factor`):
    `Concat(RotaryEmbedding(x[..., :r]), x[..., r:])`. GQA rotates the first r dims when its cos/sin tables are
    [max_positions, r / 2], which its CPU kernel accepts for r / 2 a multiple of 8."""

    def pattern(self, op, q_lin, k_lin, v_lin, cos, sin, past_k, past_v, mask):
        def partly_rotated(x, name):
            heads = _heads(op, x, f"{name}_bshd", normed=True)
            rotated = op.RotaryEmbedding(op.Slice(heads, _allow_other_inputs=True, _outputs=[f"{name}_head"]), cos, sin,
                                         _domain=FUSION_DOMAIN, _outputs=[f"{name}_rot"])
            kept = op.Slice(heads, _allow_other_inputs=True, _outputs=[f"{name}_tail"])
            return op.Concat(rotated, kept, axis=-1)

        q, k = partly_rotated(q_lin, "q"), partly_rotated(k_lin, "k")
        return _attention(op, q, k, _heads(op, v_lin, "v_bshd"), past_k, past_v, mask)

    def check(self, context, q_head, q_tail, k_head, k_tail, q_rot, **kwargs):
        result = pattern.MatchResult()
        rotary_dim = _ir_utils.get_dim(q_rot, 3)
        if not isinstance(rotary_dim, int) or rotary_dim % 16:
            return self._fail(result, f"partial rotary over {rotary_dim} dims per head; GroupQueryAttention's CPU "
                                      "kernel needs a multiple of 16", q_rot)
        for head, tail in ((q_head, q_tail), (k_head, k_tail)):
            if not (_last_axis_slice(head.producer(), 0, rotary_dim) and
                    _last_axis_slice(tail.producer(), rotary_dim, None)):
                return self._fail(result, "the rotary part and the rest are not the first and last dims of each head",
                                  [head, tail])
        return super().check(context, q_rot=q_rot, **kwargs)


def _last_axis_slice(node: ir.Node, start: int, end: int | None) -> bool:
    """`node` is Slice(x, [start], [end], [last axis](, [1])), with `end` None meaning "to the end"."""
    data, starts, ends, axes = (list(node.inputs) + [None] * 4)[:4]
    steps = node.inputs[4] if len(node.inputs) > 4 else None
    last = data.shape.rank() - 1 if data.shape is not None else -1
    if axes is None or not _ir_utils.is_singleton_value(axes, lambda a: a in (-1, last)):
        return False
    if steps is not None and not _ir_utils.is_singleton_value(steps, 1):
        return False
    if not _ir_utils.is_singleton_value(starts, start):
        return False
    return _ir_utils.is_singleton_value(ends, lambda e: e >= 2**31 - 1 or e == _ir_utils.get_dim(data, -1)
                                        if end is None else e == end)

"""What the recognizers share while one model map is built: the function and its graph view, the linears and norms
found first, notes on what was not recognized, and the nodes some recognized structure explains."""
from __future__ import annotations

from typing import Iterable

from elision.analysis.model_map.graph_view import GraphView
from elision.analysis.model_map.records import Embedding, Layer, Linear, Norm
from elision.ir.core import Function, Module, Node, Value
from elision.ir.types import TensorType


class MapState:
    def __init__(self, module: Module, fn: Function):
        self.module, self.fn = module, fn
        self.g = GraphView(module, fn)
        self.notes: list[str] = []
        self.claimed: set[int] = set()  # ids of nodes explained by a recognized structure
        self.linears: dict[Value, Linear] = {}     # by output
        self.lin_by_node: dict[int, Linear] = {}   # by id of the matmul node
        self.norms: list[Norm] = []
        self.norm_by_out: dict[Value, Norm] = {}
        self.extra_embeddings: list[Embedding] = []
        self.stacks_found: list[list[Layer]] = []
        # passes that splice a token-reducing op into the residual stream inside a layer (merge-tokens, between
        # attention and MLP) record where the stream continues: attention residual add (pre-norm) or attention
        # LayerNorm output (post-norm) -> value the MLP reads
        values = {v.name: v for v in fn.values()}
        self.stream_continues = {a: values[b] for a, b in module.attrs.get(f"residual_stream.{fn.name}", {}).items()
                                 if b in values}

    def claim(self, nodes: Iterable[Node]) -> None:
        self.claimed.update(id(n) for n in nodes)

    def input_symbols(self) -> set[str]:
        """The symbolic dims of the function's tensor inputs."""
        syms: set[str] = set()
        for v in self.fn.inputs:
            if isinstance(v.type, TensorType):
                syms |= v.type.symbols()
        return syms

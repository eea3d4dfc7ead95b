"""elision's IR: SSA values with symbolic shapes, one node type, functions sharing named parameters."""
from elision.ir.core import Function, IRError, Module, Node, Value, iter_values, map_values
from elision.ir.execute import interpret, to_fx
from elision.ir.graph import to_networkx
from elision.ir.parser import parse, parse_type
from elision.ir.printer import format_function, format_module, format_node
from elision.ir.types import NONE, ScalarType, TensorType, TupleType, Type
from elision.ir.verify import verify

__all__ = [
    "Function", "IRError", "Module", "Node", "Value", "iter_values", "map_values", "interpret", "to_fx",
    "to_networkx", "parse", "parse_type", "format_function", "format_module", "format_node", "NONE",
    "ScalarType", "TensorType", "TupleType", "Type", "verify",
]

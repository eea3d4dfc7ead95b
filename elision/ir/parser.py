"""Parser for the textual IR written by :mod:`elision.ir.printer`."""
from __future__ import annotations

import json
import math
import re

import torch

from elision.ir.core import Function, IRError, Module, Node, Value
from elision.ir.ops import UnknownOpError, check_op
from elision.ir.symbolic import check_dim_expr
from elision.ir.types import NONE, ScalarType, TensorType, TupleType, Type, is_dtype_name, torch_dtype

# the torch constants IR text may name (looked up in this table, never with getattr on the torch module)
_TORCH_CONSTANTS = {f"torch.{name}": obj for name, obj in vars(torch).items()
                    if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))}

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<val>%[A-Za-z0-9_.]+)
      | (?P<num>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+|inf\b|nan\b))
      | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
      | (?P<punct>[()\[\],=<>{}:@+*/-])
    )""",
    re.VERBOSE,
)


class _Cursor:
    def __init__(self, text: str, where: str):
        self.text, self.pos, self.where = text, 0, where

    def error(self, msg: str) -> IRError:
        return IRError(f"{self.where}: {msg} at column {self.pos + 1}: {self.text!r}")

    def peek(self) -> tuple[str, str] | None:
        m = _TOKEN.match(self.text, self.pos)
        if not m or m.end() == m.start():
            return None
        kind = m.lastgroup
        return kind, m.group(kind)

    def next(self) -> tuple[str, str]:
        m = _TOKEN.match(self.text, self.pos)
        if not m or not m.lastgroup:
            raise self.error("unexpected text")
        self.pos = m.end()
        return m.lastgroup, m.group(m.lastgroup)

    def expect(self, s: str) -> None:
        kind, tok = self.next()
        if tok != s:
            raise self.error(f"expected {s!r}, found {tok!r}")

    def at(self, s: str) -> bool:
        p = self.peek()
        return p is not None and p[1] == s

    def done(self) -> bool:
        return self.text[self.pos:].strip() == ""


def _parse_dim(text: str) -> int | str:
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    _check_expr(text)
    return text


def _check_expr(text: str) -> None:
    try:
        check_dim_expr(text)
    except ValueError as e:
        raise IRError(f"bad type: {e}") from None


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def parse_type(text: str) -> Type:
    text = text.strip()
    if text == "none":
        return NONE
    if text.startswith("("):
        inner = text[1:-1].strip()
        return TupleType(tuple(parse_type(p) for p in _split_top(inner) if p.strip()))
    m = re.fullmatch(r"([a-z0-9]+)\[(.*)\]", text, re.S)
    if m and is_dtype_name(m.group(1)):
        return TensorType(m.group(1), tuple(_parse_dim(d) for d in _split_top(m.group(2))))
    m = re.fullmatch(r"(int|float|bool)(?:<(.*)>)?", text)
    if m:
        if m.group(2) is not None:
            _check_expr(m.group(2))
        return ScalarType(m.group(1), m.group(2))
    raise IRError(f"cannot parse type {text!r}")


def _parse_literal(cur: _Cursor, values: dict[str, Value]):
    kind, tok = cur.next()
    if kind == "val":
        name = tok[1:]
        if name not in values:
            raise cur.error(f"use of undefined value %{name}")
        return values[name]
    if kind == "str":
        return json.loads(tok)
    if kind == "num":
        if tok in ("inf", "-inf"):
            return math.inf if tok == "inf" else -math.inf
        if tok == "nan":
            return math.nan
        return float(tok) if any(c in tok for c in ".eE") else int(tok)
    if kind == "punct" and tok == "-":  # -inf
        k2, t2 = cur.next()
        if t2 == "inf":
            return -math.inf
        raise cur.error(f"unexpected '-' before {t2!r}")
    if kind == "punct" and tok in "[(":
        close = "]" if tok == "[" else ")"
        items, trailing_comma = [], False
        while not cur.at(close):
            items.append(_parse_literal(cur, values))
            trailing_comma = False
            if cur.at(","):
                cur.next()
                trailing_comma = True
        cur.next()
        if tok == "[":
            return items
        return tuple(items)
    if kind == "name":
        if tok in ("None", "True", "False"):
            return {"None": None, "True": True, "False": False}[tok]
        if tok in ("inf", "nan"):
            return math.inf if tok == "inf" else math.nan
        if tok == "device":
            cur.expect("(")
            _, s = cur.next()
            cur.expect(")")
            return torch.device(json.loads(s))
        if tok in _TORCH_CONSTANTS:
            return _TORCH_CONSTANTS[tok]
        raise cur.error(f"unknown constant {tok!r}")
    raise cur.error(f"unexpected token {tok!r}")


_NODE = re.compile(r"%(?P<name>[A-Za-z0-9_.]+) : (?P<type>.+?) = (?P<op>[A-Za-z_][A-Za-z0-9_.]*)\((?P<rest>.*)$")
_FUNC = re.compile(r"func @(?P<name>[A-Za-z0-9_.-]+)\((?P<ins>.*)\) \{$")


def _parse_call(rest: str, values: dict[str, Value], where: str) -> tuple[tuple, dict, str]:
    cur = _Cursor(rest, where)
    args, kwargs = [], {}
    while not cur.at(")"):
        p = cur.peek()
        # keyword argument?  name '=' ...
        if p and p[0] == "name":
            save = cur.pos
            cur.next()
            if cur.at("="):
                cur.next()
                kwargs[p[1]] = _parse_literal(cur, values)
            else:
                cur.pos = save
                args.append(_parse_literal(cur, values))
        else:
            args.append(_parse_literal(cur, values))
        if cur.at(","):
            cur.next()
    cur.next()  # ')'
    loc = ""
    tail = rest[cur.pos:].strip()
    if tail:
        m = re.fullmatch(r'loc\((".*")\)', tail)
        if not m:
            raise IRError(f"{where}: unexpected trailing text {tail!r}")
        loc = json.loads(m.group(1))
    return tuple(args), kwargs, loc


def parse(text: str, params: dict[str, torch.Tensor] | None = None) -> Module:
    """Parse textual IR. Parameters without tensors become meta-device placeholders of the declared type.
    Malformed text raises IRError, never another exception type."""
    try:
        return _parse(text, params)
    except (ValueError, RuntimeError) as e:  # json.loads of the attributes, int() of a dim, a negative dim in torch
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise IRError(f"malformed IR text: {type(e).__name__}: {detail}") from None


def _parse(text: str, params: dict[str, torch.Tensor] | None) -> Module:
    module = Module()
    lines = text.splitlines()
    i = 0
    declared: dict[str, TensorType] = {}
    while i < len(lines):
        line = lines[i].strip()
        where = f"line {i + 1}"
        i += 1
        if not line or line.startswith("//"):
            continue
        if line.startswith("module attributes "):
            module.attrs = json.loads(line[len("module attributes "):])
            continue
        if line.startswith("param "):
            m = re.fullmatch(r'param (".*?") : (.+)', line)
            if not m:
                raise IRError(f"{where}: malformed param declaration {line!r}")
            name, ty = json.loads(m.group(1)), parse_type(m.group(2))
            if not isinstance(ty, TensorType):
                raise IRError(f"{where}: parameter {name!r} must have a tensor type")
            declared[name] = ty
            continue
        m = _FUNC.match(line)
        if not m:
            raise IRError(f"{where}: expected 'func @name(...) {{', 'param ...' or 'module attributes ...', found {line!r}")
        values: dict[str, Value] = {}
        inputs = []
        for part in _split_top(m.group("ins")):
            pm = re.fullmatch(r"\s*%([A-Za-z0-9_.]+) : (.+)", part)
            if not pm:
                raise IRError(f"{where}: malformed function input {part!r}")
            v = Value(pm.group(1), parse_type(pm.group(2)))
            values[v.name] = v
            inputs.append(v)
        nodes: list[Node] = []
        outputs: list[Value] = []
        while True:
            if i >= len(lines):
                raise IRError(f"function @{m.group('name')}: missing closing '}}'")
            body = lines[i].strip()
            where = f"line {i + 1}"
            i += 1
            if not body:
                continue
            if body == "}":
                break
            if body.startswith("return"):
                cur = _Cursor(body[len("return"):], where)
                ret = _parse_literal(cur, values)
                outputs = list(ret) if isinstance(ret, tuple) else [ret]
                continue
            nm = _NODE.match(body)
            if not nm:
                raise IRError(f"{where}: cannot parse node {body!r}")
            name = nm.group("name")
            if name in values:
                raise IRError(f"{where}: value %{name} is defined twice")
            try:
                check_op(nm.group("op"))
            except UnknownOpError as e:
                raise IRError(f"{where}: {e}") from None
            args, kwargs, loc = _parse_call(nm.group("rest"), values, where)
            v = Value(name, parse_type(nm.group("type")))
            values[name] = v
            nodes.append(Node(nm.group("op"), args, kwargs, v, loc))
        module.add_function(Function(m.group("name"), inputs, nodes, outputs))
    for name, ty in declared.items():
        if params is not None and name in params:
            module.params[name] = params[name]
        else:
            module.params[name] = torch.empty(tuple(int(d) for d in ty.shape), dtype=torch_dtype(ty.dtype), device="meta")
    return module

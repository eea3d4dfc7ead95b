"""The def-use index of a function, kept up to date on every edit, so that lookups never scan the function.

Passes edit the IR in plain Python: they assign ``node.args`` / ``node.kwargs`` / ``node.result`` / ``node.op``,
edit ``node.kwargs`` like a dict, splice ``fn.nodes`` like a list, or assign a new list to ``fn.nodes``. Each of
those paths reports here (the node attributes are properties, ``fn.nodes`` is a :class:`NodeList`), so that
``producer``, ``users``, ``replace_all_uses`` and ``param`` cost O(uses), and ``index`` O(log n).

Program order is kept as integer keys with wide gaps: a node inserted between two others takes a key between
theirs, so ordering the users of a value or finding a node's position needs no scan. When a gap runs out, when
the list is reordered wholesale (``sort``, ``reverse``, a new list), or while a node is listed twice (which some
edits do for a moment), the keys are renumbered from the list the next time they are needed.

Nodes are duck-typed here (``_inputs``, ``_result``, ``_op``, ``_args``, ``_owners``) so this module does not
import the node classes that build on it.
"""
from __future__ import annotations

import bisect
import operator
from typing import Any, Iterable

from elision.ir.values import Value

_GAP = 1 << 48  # room for ~48 halvings of a gap before a renumbering


def collect_inputs(args: Any, kwargs: Any) -> tuple[Value, ...]:
    """The Values a node reads, in order: positional arguments first, then keyword arguments.

    The same walk as ``iter_values``, without generators: it runs on every assignment of ``args``/``kwargs``.
    """
    found: list[Value] = []
    _collect(args, found)
    _collect(kwargs, found)
    return tuple(found)


def _collect(obj: Any, found: list[Value]) -> None:
    if isinstance(obj, Value):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, Value):
                found.append(item)
            elif isinstance(item, (list, tuple, dict)):
                _collect(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            if isinstance(item, Value):
                found.append(item)
            elif isinstance(item, (list, tuple, dict)):
                _collect(item, found)


def param_name(op: str, args: Any) -> str | None:
    """The parameter a ``param`` node reads (None for every other node)."""
    if op == "param" and isinstance(args, (tuple, list)) and args and isinstance(args[0], str):
        return args[0]
    return None


class UseIndex:
    """Definitions, uses, parameter reads, value names and program order of one function's nodes."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner  # the Function, recorded in each indexed node's ``_owners``
        self.nodes: list = []
        self.count: dict = {}  # node -> times it is listed (1, or 2+ in the middle of some edits)
        self.key: dict = {}  # node -> order key of its first listing
        self.defs: dict[Value, dict] = {}  # value -> {node defining it: None}
        self.uses: dict[Value, dict] = {}  # value -> {node reading it: number of references}
        self.params: dict[str, dict] = {}  # parameter name -> {param node: None}
        self.names: dict[str, int] = {}  # result name -> nodes defining a value of that name
        self.suffix_floor: dict[str, int] = {}  # fresh-name hint -> no free `hint_i` below this i
        self.duplicates = 0  # nodes listed more than once
        self.order_stale = True

    # --- queries ---------------------------------------------------------------------------------
    def producer(self, v: Value):
        found = self.defs.get(v)
        if not found:
            return None
        return next(iter(found)) if len(found) == 1 else self.first(found)

    def users(self, v: Value) -> list:
        found = self.uses.get(v)
        if not found:
            return []
        return list(found) if len(found) == 1 else self.in_order(found)

    def param_node(self, name: str):
        found = self.params.get(name)
        if not found:
            return None
        return next(iter(found)) if len(found) == 1 else self.first(found)

    def position(self, node) -> int:
        """Where ``node`` is listed (its first listing); KeyError when it is not in the function."""
        if node not in self.count:
            raise KeyError(node)
        self.ensure_order()
        if self.duplicates:
            return list.index(self.nodes, node)
        key = self.key
        return bisect.bisect_left(self.nodes, key[node], key=key.__getitem__)

    def in_order(self, nodes: Iterable) -> list:
        self.ensure_order()
        return sorted(nodes, key=self.key.__getitem__)

    def first(self, nodes: Iterable):
        self.ensure_order()
        return min(nodes, key=self.key.__getitem__)

    def fresh_name(self, hint: str, taken_by_inputs: set[str]) -> str:
        """``hint``, or ``hint_i`` with the smallest free i (names of nodes and of function inputs are taken)."""
        if hint not in self.names and hint not in taken_by_inputs:
            return hint
        i = self.suffix_floor.get(hint, 1)
        while f"{hint}_{i}" in self.names or f"{hint}_{i}" in taken_by_inputs:
            i += 1
        self.suffix_floor[hint] = i
        return f"{hint}_{i}"

    # --- the node list changed -------------------------------------------------------------------
    def attach(self, nodes: list) -> None:
        """``nodes`` replaces the whole list: index what is new, forget what is gone."""
        new_count: dict = {}
        for n in nodes:
            new_count[n] = new_count.get(n, 0) + 1
        for n in self.count:
            if n not in new_count:
                self._unregister(n)
        for n in new_count:
            if n not in self.count:
                self._register(n)
        self.nodes = nodes
        self.count = new_count
        self.duplicates = sum(1 for c in new_count.values() if c > 1)
        self.key = {}
        self.order_stale = True

    def added(self, start: int | None, nodes: list) -> None:
        """``nodes`` were listed, now at ``self.nodes[start:start + len(nodes)]`` (None: not contiguous)."""
        first_listing = True
        for n in nodes:
            c = self.count.get(n, 0)
            self.count[n] = c + 1
            if c == 0:
                self._register(n)
            else:
                first_listing = False
                if c == 1:
                    self.duplicates += 1
        if start is None or not first_listing or self.duplicates or self.order_stale:
            self.order_stale = True
        else:
            self._key_range(start, nodes)

    def removed(self, nodes: list) -> None:
        for n in nodes:
            c = self.count[n] - 1
            if c == 0:
                del self.count[n]
                self.key.pop(n, None)
                self._unregister(n)
            else:  # one of several listings went: which one decides the node's order key
                self.count[n] = c
                self.order_stale = True
                if c == 1:
                    self.duplicates -= 1

    def reordered(self) -> None:
        self.order_stale = True

    def ensure_order(self) -> None:
        if self.order_stale:
            # reversed, so that a node listed twice keeps the key of its first listing
            self.key = dict(zip(reversed(self.nodes), range((len(self.nodes) - 1) * _GAP, -1, -_GAP)))
            self.order_stale = False

    def _key_range(self, start: int, nodes: list) -> None:
        listed = self.nodes
        end = start + len(nodes)
        lo = self.key[listed[start - 1]] if start > 0 else None
        hi = self.key[listed[end]] if end < len(listed) else None
        if hi is None:
            first, step = (0 if lo is None else lo) + _GAP, _GAP
        elif lo is None:
            first, step = hi - len(nodes) * _GAP, _GAP
        else:
            step = (hi - lo) // (len(nodes) + 1)
            if step == 0:  # the gap is used up: renumber the whole list when next needed
                self.order_stale = True
                return
            first = lo + step
        for i, n in enumerate(nodes):
            self.key[n] = first + i * step

    # --- a listed node changed -------------------------------------------------------------------
    def inputs_changed(self, node, old: tuple, new: tuple) -> None:
        self._drop_uses(node, old)
        self._add_uses(node, new)

    def result_changed(self, node, old: Value, new: Value) -> None:
        self._drop_def(node, old)
        self._add_def(node, new)

    def param_changed(self, node, old: str | None, new: str | None) -> None:
        if old is not None:
            self._drop_param(node, old)
        if new is not None:
            self.params.setdefault(new, {})[node] = None

    # --- bookkeeping -----------------------------------------------------------------------------
    def _register(self, node) -> None:
        node._owners.append(self.owner)
        self._add_uses(node, node._inputs)
        self._add_def(node, node._result)
        self.param_changed(node, None, param_name(node._op, node._args))

    def _unregister(self, node) -> None:
        node._owners.remove(self.owner)
        self._drop_uses(node, node._inputs)
        self._drop_def(node, node._result)
        self.param_changed(node, param_name(node._op, node._args), None)

    def _add_uses(self, node, values: tuple) -> None:
        for v in values:
            readers = self.uses.get(v)
            if readers is None:
                self.uses[v] = {node: 1}
            else:
                readers[node] = readers.get(node, 0) + 1

    def _drop_uses(self, node, values: tuple) -> None:
        for v in values:
            readers = self.uses[v]
            c = readers[node] - 1
            if c:
                readers[node] = c
            else:
                del readers[node]
                if not readers:
                    del self.uses[v]

    def _add_def(self, node, v: Value) -> None:
        self.defs.setdefault(v, {})[node] = None
        self.names[v.name] = self.names.get(v.name, 0) + 1

    def _drop_def(self, node, v: Value) -> None:
        defs = self.defs[v]
        del defs[node]
        if not defs:
            del self.defs[v]
        left = self.names[v.name] - 1
        if left:
            self.names[v.name] = left
            return
        del self.names[v.name]
        # the name is free again: fresh_name may hand it out
        base, sep, suffix = v.name.rpartition("_")
        if sep and suffix.isdigit() and str(int(suffix)) == suffix and base in self.suffix_floor:
            self.suffix_floor[base] = min(self.suffix_floor[base], int(suffix))

    def _drop_param(self, node, name: str) -> None:
        readers = self.params[name]
        del readers[node]
        if not readers:
            del self.params[name]

    # --- checking --------------------------------------------------------------------------------
    def mismatch(self) -> str | None:
        """How the index differs from a rescan of the node list, or None when it agrees."""
        count: dict = {}
        for n in self.nodes:
            count[n] = count.get(n, 0) + 1
        if count != self.count:
            return "the set of listed nodes"
        defs: dict = {}
        uses: dict = {}
        params: dict = {}
        names: dict = {}
        for n in count:
            inputs = collect_inputs(n._args, n._kwargs)
            if inputs != n._inputs:
                return (f"the inputs of %{n._result.name} = {n._op} (its arguments were edited in place: assign "
                        f"node.args / node.kwargs instead)")
            for v in inputs:
                uses.setdefault(v, {})
                uses[v][n] = uses[v].get(n, 0) + 1
            defs.setdefault(n._result, {})[n] = None
            names[n._result.name] = names.get(n._result.name, 0) + 1
            name = param_name(n._op, n._args)
            if name is not None:
                params.setdefault(name, {})[n] = None
        for what, want, got in (("uses", uses, self.uses), ("definitions", defs, self.defs),
                                ("parameter reads", params, self.params), ("value names", names, self.names)):
            if want != got:
                return f"the {what}"
        self.ensure_order()
        keys = [self.key[n] for n in self.nodes]
        if not self.duplicates and any(a >= b for a, b in zip(keys, keys[1:])):
            return "the program order"
        return None


class NodeList(list):
    """``fn.nodes``: a list that reports every node it gains or loses to its function's :class:`UseIndex`.

    A list replaced by ``fn.nodes = [...]`` is detached: editing it afterwards no longer touches the function.
    """

    __slots__ = ("_index",)

    def __init__(self, nodes: Iterable = (), index: UseIndex | None = None) -> None:
        super().__init__(nodes)
        self._index = index

    def __reduce_ex__(self, protocol):  # copies and pickles are plain lists, attached to nothing
        return (list, (list(self),))

    def append(self, node) -> None:
        super().append(node)
        if self._index is not None:
            self._index.added(len(self) - 1, [node])

    def extend(self, nodes: Iterable) -> None:
        items = list(nodes)
        start = len(self)
        super().extend(items)
        if self._index is not None:
            self._index.added(start, items)

    def __iadd__(self, nodes: Iterable) -> "NodeList":
        self.extend(nodes)
        return self

    def __imul__(self, times: int) -> "NodeList":
        if times <= 0:
            self.clear()
        else:
            self.extend(list(self) * (times - 1))
        return self

    def insert(self, i: int, node) -> None:
        n = len(self)
        at = operator.index(i)
        at = min(max(at + n if at < 0 else at, 0), n)  # list.insert's clamping
        super().insert(at, node)
        if self._index is not None:
            self._index.added(at, [node])

    def __setitem__(self, i, value) -> None:
        if isinstance(i, slice):
            start, _, step = i.indices(len(self))
            old = list.__getitem__(self, i)
            items = list(value)
            super().__setitem__(i, items)
            if self._index is not None:
                self._index.removed(old)
                self._index.added(start if step == 1 else None, items)
            return
        old = list.__getitem__(self, i)
        at = operator.index(i)
        at = at + len(self) if at < 0 else at
        super().__setitem__(i, value)
        if self._index is not None:
            self._index.removed([old])
            self._index.added(at, [value])

    def __delitem__(self, i) -> None:
        old = list.__getitem__(self, i)
        super().__delitem__(i)
        if self._index is not None:
            self._index.removed(old if isinstance(i, slice) else [old])

    def pop(self, i: int = -1):
        node = super().pop(i)
        if self._index is not None:
            self._index.removed([node])
        return node

    def remove(self, node) -> None:
        super().remove(node)
        if self._index is not None:
            self._index.removed([node])

    def clear(self) -> None:
        old = list(self)
        super().clear()
        if self._index is not None:
            self._index.removed(old)

    def sort(self, *args, **kwargs) -> None:
        super().sort(*args, **kwargs)
        if self._index is not None:
            self._index.reordered()

    def reverse(self) -> None:
        super().reverse()
        if self._index is not None:
            self._index.reordered()

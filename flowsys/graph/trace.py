"""Tracing ``Graph.build()`` into the IR.

While a :class:`Tracer` is active, tensors may hold a :class:`Symbol` (a graph value) instead
of an array. Its value kind, :class:`SymbolKind`, registers with ``flowsys.value`` when this
module is imported (no Symbol exists before), so ``flowsys.tensor`` needs no import of the
tracer; it outranks the other kinds, so :func:`flowsys.tensor.apply` sends any op with a symbolic
input to :meth:`Tracer.record`, which appends a node after the op's inference has run (so shape
errors surface at compile time, naming the op). Arrays met along the way (a ``fs.arange`` inside
``build``, Python scalars) become constants. Reading a value inside ``build`` — ``.numpy()``,
``.item()``, ``if tensor:`` — is a :class:`GraphError`: the graph must not depend on data.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from flowsys import device as _device
from flowsys.global_tensor import GlobalValue, make_global, single_placement
from flowsys.graph.ir import Graph, GraphError, Node, Value
from flowsys.layout import normalize_sbp
from flowsys.ops import OpDef
from flowsys.ops.registry import is_floating
from flowsys.planformat import SeedRef
from flowsys.precision import autocast, low_dtype
from flowsys.sbp import broadcast
from flowsys.tensor import Tensor, store, stored
from flowsys.value import ValueKind, register


class Symbol:
    """What a tensor holds while ``build()`` is traced: a graph value."""

    __slots__ = ("value",)

    def __init__(self, value: Value):
        self.value = value

    shape = property(lambda self: self.value.shape)
    dtype = property(lambda self: self.value.dtype)
    ndim = property(lambda self: len(self.value.shape))
    size = property(lambda self: int(np.prod(self.value.shape, dtype=np.int64)))
    placement = property(lambda self: self.value.placement)


_active: list[Tracer] = []


def active() -> Tracer | None:
    return _active[-1] if _active else None


class Tracer:
    def __init__(self, start_id: int = 0, phase: str = "forward"):
        self.values: dict[int, Value] = {}
        self.nodes: list[Node] = []
        self.constants: dict[int, Any] = {}
        self._ids = itertools.count(start_id)
        self.phase = phase
        self.loss: int | None = None
        self.seeds = 0
        self.scope: int | None = None  # the activation-checkpointed module call being traced
        self._scopes = itertools.count()

    def checkpointed(self):
        """Nodes traced inside are recomputed in the backward pass (the outermost module wins)."""
        return _Scope(self)

    def __enter__(self) -> Tracer:
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)

    def new_value(self, shape, dtype, placement=None, sbp=None) -> Value:
        v = Value(next(self._ids), tuple(shape), np.dtype(dtype), placement, tuple(sbp) if sbp is not None else None)
        self.values[v.id] = v
        return v

    def constant(self, data) -> Symbol:
        if type(data) is GlobalValue:
            v = self.new_value(data.shape, data.dtype, data.placement, data.sbp)
        else:
            data = np.asarray(data)
            v = self.new_value(data.shape, data.dtype)
        self.constants[v.id] = data
        return Symbol(v)

    def symbol_of(self, data) -> Symbol:
        """A tensor value as a graph value: itself if traced, else a constant."""
        return data if type(data) is Symbol else self.constant(data)

    def add_node(self, kind: str, op: str, inputs: Sequence[int], outputs: Sequence[int], attrs: dict, sig=None) -> Node:
        node = Node(next(self._ids), kind, op, tuple(inputs), tuple(outputs), tuple(sorted(attrs.items())), self.phase, sig,
                    self.scope)
        self.nodes.append(node)
        return node

    def record(self, op: OpDef, datas, attrs: dict, out_spec) -> tuple[Symbol, ...]:
        """Op ``op`` on values ``datas`` as a node; its output symbols."""
        syms = [self.symbol_of(d) for d in datas]
        placements = [s.value.placement for s in syms if s.value.placement is not None]
        placement = None
        if placements:
            placement = single_placement(op.name, placements)
            if any(s.value.placement is None for s in syms):  # a local constant beside global values
                syms = [s if s.value.placement is not None else self._broadcast_constant(s, placement) for s in syms]
        if op.name == "dropout" and not isinstance(attrs.get("seed"), SeedRef):
            attrs = {**attrs, "seed": SeedRef(self.seeds)}
            self.seeds += 1
        specs = tuple(out_spec) if op.multi_output else (out_spec,)
        outs = [self.new_value(s.shape, s.dtype, placement) for s in specs]
        self.add_node("op", op.name, [s.value.id for s in syms], [v.id for v in outs], attrs)
        return tuple(Symbol(v) for v in outs)

    def _broadcast_constant(self, sym: Symbol, placement) -> Symbol:
        data = self.constants.pop(sym.value.id)
        del self.values[sym.value.id]
        return self.constant(make_global(np.asarray(data), placement, broadcast))

    def layout_change(self, data, placement, sbp) -> Symbol:
        """``x.to_global(...)`` inside build(): a boxing node whose output layout is pinned."""
        sym = self.symbol_of(data)
        placement = placement if placement is not None else sym.value.placement
        if placement is None:
            raise GraphError("to_global inside build(): a local tensor needs a placement")
        nd = normalize_sbp(sbp, placement, sym.value.shape) if sbp is not None else None
        out = self.new_value(sym.value.shape, sym.value.dtype, placement, nd)
        self.add_node("boxing", "to_global", [sym.value.id], [out.id], {"placement": placement, "sbp": nd})
        return Symbol(out)

    def layout_change_back(self, g, like: int):
        """The gradient of a layout change: ``g`` converted to the layout of value ``like`` (a
        partial sum's gradient replicated), resolved by SBP inference."""
        src = self.values[like]
        if src.placement is None:
            raise GraphError("to_global inside build() on a local tensor that needs a gradient: make it global "
                             "before calling the graph (x.to_global(...)) instead")
        sym = self.symbol_of(g._data)
        out = self.new_value(src.shape, src.dtype, src.placement)
        self.add_node("boxing", "to_global", [sym.value.id], [out.id], {"like": like})
        return Tensor(Symbol(out))

    def mark_loss(self, t) -> None:
        if self.loss is not None:
            raise GraphError("build() called backward() twice; a graph trains one loss (sum them first)")
        if t.size != 1:
            raise GraphError(f"backward() inside build() needs a one-element loss, got shape {t.shape}")
        self.loss = t._data.value.id


class _Scope:
    def __init__(self, tracer: Tracer):
        self.tracer, self.outer = tracer, None

    def __enter__(self):
        self.outer = self.tracer.scope
        if self.outer is None:
            self.tracer.scope = next(self.tracer._scopes)

    def __exit__(self, *exc) -> None:
        self.tracer.scope = self.outer


def untraceable(what: str) -> GraphError:
    return GraphError(
        f"{what} inside Graph.build(): a graph is traced once and must not depend on tensor values "
        f"(no .numpy()/.item(), no Python `if`/`while` on a tensor); compute it outside build() or with ops "
        f"such as fs.where")


class SymbolKind(ValueKind):
    """A traced value. Ops on it become nodes of the traced graph, which is also its autograd
    record: the autodiff pass differentiates it from the loss ``backward()`` marks. It has no
    value to read: that is an :func:`untraceable` build."""

    priority = 2

    def device(self, v: Symbol) -> str:
        return v.placement.type if v.placement is not None else "cpu"

    def xp(self, v: Symbol):
        return _device.array_module(self.device(v))

    def placement(self, v: Symbol):
        return v.placement

    def logical(self, v: Symbol):
        raise untraceable("reading a tensor's value (.numpy(), .item(), bool(), a Python `if` on it)")

    def run(self, op: OpDef, datas, attrs: dict, out_spec) -> tuple[Symbol, ...]:
        return active().record(op, datas, attrs, out_spec)

    def record(self, op: OpDef, inputs, attrs: dict, outs) -> None:
        """No tape: an output needs a gradient where an input does (grad mode aside; the
        autodiff pass decides from the graph)."""
        needs_grad = any(t.requires_grad for t in inputs)
        for o in outs:
            o.requires_grad = needs_grad and is_floating(o.dtype)

    def to_global(self, v: Symbol, placement, sbp) -> Symbol:
        return active().layout_change(v, placement, sbp)

    def mark_loss(self, t) -> bool:
        active().mark_loss(t)
        return True

    def describe(self, v: Symbol, requires_grad: bool) -> str:
        return f"<traced value {v.value.id}: {v.value.dtype.name}{list(v.value.shape)}>"


register(Symbol, SymbolKind())


def trace(fn, args, variables: dict[str, Any], start_id: int = 0, precision: str = "fp32",
          loss_scaling: bool = False) -> Graph:
    """Trace ``fn(*args)`` with ``variables`` (name -> Parameter) made symbolic, under the
    ``precision`` policy (``flowsys.precision``); ``loss_scaling`` adds a last input, the scalar
    loss scale the backward pass starts from (fp16)."""
    tracer = Tracer(start_id)
    inputs, saved, var_ids = [], {}, {}
    sym_args = []
    for a in args:
        if isinstance(a, Tensor):
            d = a._data
            pl, sbp = (d.placement, d.sbp) if type(d) is GlobalValue else (None, None)
            v = tracer.new_value(d.shape, d.dtype, pl, sbp)
            inputs.append(v.id)
            sym_args.append(Tensor(Symbol(v)))
        else:
            sym_args.append(a)
    try:
        for name, p in variables.items():
            d = stored(p)  # the layout is enough: values the workers hold stay there
            pl, sbp = (d.placement, d.sbp) if type(d) is GlobalValue else (None, None)
            v = tracer.new_value(d.shape, d.dtype, pl, sbp)
            saved[name], var_ids[name] = d, v.id
            store(p, Symbol(v))
        with tracer, autocast(low_dtype(precision), enabled=low_dtype(precision) is not None):
            out = fn(*sym_args)
    finally:
        for name, d in saved.items():
            store(variables[name], d)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not outs or not all(isinstance(o, Tensor) and type(o._data) is Symbol for o in outs):
        got = type(out).__name__ if not isinstance(out, (tuple, list)) else f"({', '.join(type(o).__name__ for o in outs)})"
        raise GraphError(f"Graph.build() must return a tensor computed inside it (or a tuple of them), got {got}")
    scale = None
    if loss_scaling and tracer.loss is not None:  # laid out as the loss is: where backward starts
        loss = tracer.values[tracer.loss]
        scale = tracer.new_value((), np.float32, loss.placement,
                                 (broadcast,) * loss.placement.ndim if loss.placement is not None else None).id
        inputs.append(scale)
    g = Graph(dict(tracer.values), tuple(tracer.nodes), tuple(inputs), var_ids, dict(tracer.constants),
              tuple(o._data.value.id for o in outs), tracer.loss, precision=precision, loss_scale=scale)
    return g, tracer.seeds

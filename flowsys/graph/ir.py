"""The graph IR: small immutable SSA records and ``verify``.

A :class:`Value` is defined once (by a node, or as a graph input, variable or constant) and
carries its logical shape, dtype and, once SBP inference has run, its placement and SBP. A
:class:`Node` applies a registered op (``kind="op"``), converts a layout (``kind="boxing"``,
with its plan), updates a variable (``kind="update"``, in place on its first input; its output
is that input afterwards) or writes a value into a variable (``kind="assign"``, ZeRO's gathered
update). Passes build new graphs; nothing
is mutated in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from flowsys.errors import GraphError  # noqa: F401  (re-exported: graph code raises it from here)
from flowsys.ops import OPS, Spec


@dataclass(frozen=True, slots=True)
class Value:
    id: int
    shape: tuple[int, ...]
    dtype: np.dtype
    placement: Any = None  # a Placement for global values
    sbp: tuple | None = None  # one SBP per mesh axis, once inferred

    @property
    def spec(self) -> Spec:
        return Spec(self.shape, self.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class Node:
    id: int
    kind: str  # "op", "boxing", "update", "assign"
    op: str  # the registered op (an update node's: the optimizer's update op), or the boxing step kinds
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    phase: str = "forward"  # "forward", "backward", "optimizer"
    sig: Any = None  # the Signature an op node runs under (after SBP inference)
    scope: int | None = None  # the activation-checkpointed module call it was traced in

    @property
    def attr(self) -> dict[str, Any]:
        return dict(self.attrs)


@dataclass(frozen=True)
class Graph:
    values: dict[int, Value]
    nodes: tuple[Node, ...]
    inputs: tuple[int, ...]  # data inputs, in build() argument order
    variables: dict[str, int]  # parameter name -> value
    constants: dict[int, Any] = field(default_factory=dict)  # value -> array captured at trace time
    outputs: tuple[int, ...] = ()
    loss: int | None = None  # the value build() called backward() on
    grads: dict[int, int] = field(default_factory=dict)  # variable value -> its gradient value
    micro_batches: int = 1
    zero_axis: int | None = None  # ZeRO stage 3: the data-parallel mesh axis the variables are split along
    stages: tuple = ()  # pipeline stages: (stage, ranks) pairs, in stage order
    boxed: bool = False  # set by insert_boxing: from then on every layout must match its consumer
    precision: str = "fp32"  # the compute policy build() was traced under (flowsys.precision)
    loss_scale: int | None = None  # fp16: the input holding the loss scale backward starts from
    norm_output: bool = False  # the last output is the squared global gradient norm (clip_grad pass)

    def producer(self) -> dict[int, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def with_(self, **changes) -> Graph:
        return replace(self, **changes)


def next_id(g: Graph) -> int:
    """An id no value or node of ``g`` has (the passes number what they add from it)."""
    return max(list(g.values) + [n.id for n in g.nodes] + [-1]) + 1


def verify(g: Graph, *, after: str = "") -> None:
    """SSA (every value defined once, before use), shapes and dtypes agree with the ops'
    inference, and once boxing is inserted, every op node's layouts are its signature's and
    every update gets its gradient in its variable's layout."""
    where = f" after {after}" if after else ""
    defined = set(g.inputs) | set(g.variables.values()) | set(g.constants)
    if len(defined) != len(g.inputs) + len(g.variables) + len(g.constants):
        raise GraphError(f"verify{where}: an input, variable or constant is defined twice")
    for n in g.nodes:
        missing = [v for v in n.inputs if v not in defined]
        if missing:
            raise GraphError(f"verify{where}: node {n.id} ({n.op}) uses value(s) {missing} before their definition")
        for o in n.outputs:
            if o in defined:
                raise GraphError(f"verify{where}: value {o} is defined twice (node {n.id}, {n.op})")
            defined.add(o)
        ins = [g.values[v] for v in n.inputs]
        outs = [g.values[v] for v in n.outputs]
        if n.kind == "op":
            op = OPS[n.op]
            want = op.infer(*(v.spec for v in ins), **n.attr)
            want = tuple(want) if op.multi_output else (want,)
            got = tuple(v.spec for v in outs)
            if tuple((w.shape, w.dtype) for w in want) != tuple((o.shape, o.dtype) for o in got):
                raise GraphError(f"verify{where}: node {n.id} ({n.op}) outputs {got} but its op infers {want}")
            if n.sig is not None and g.boxed:
                if tuple(tuple(v.sbp) for v in ins) != n.sig.ins or tuple(tuple(v.sbp) for v in outs) != n.sig.outs:
                    raise GraphError(f"verify{where}: node {n.id} ({n.op}) layouts differ from its signature {n.sig!r}")
        elif n.kind == "boxing":
            (a,), (b,) = ins, outs
            if (a.shape, a.dtype) != (b.shape, b.dtype):
                raise GraphError(f"verify{where}: boxing node {n.id} changes the value's shape or dtype")
        elif n.kind == "update":
            var, grad = ins[:2]
            if (var.shape, var.dtype) != (grad.shape, grad.dtype):
                raise GraphError(f"verify{where}: update node {n.id} gets a gradient {grad.spec} for a variable {var.spec}")
            if g.boxed and var.sbp is not None and (grad.sbp != var.sbp or grad.placement != var.placement):
                raise GraphError(f"verify{where}: update node {n.id} gets its gradient in another layout than the variable")
        elif n.kind == "assign":
            var, new = ins
            if var.id not in g.variables.values() or (var.shape, var.dtype) != (new.shape, new.dtype):
                raise GraphError(f"verify{where}: assign node {n.id} writes a {new.spec} into value {var.id}, "
                                 f"which is not a variable of that shape")
            if g.boxed and (new.sbp != var.sbp or new.placement != var.placement):
                raise GraphError(f"verify{where}: assign node {n.id} gets its value in another layout than the variable")
    for v in g.outputs + ((g.loss,) if g.loss is not None else ()):
        if v not in defined:
            raise GraphError(f"verify{where}: output value {v} is never defined")

"""The compiler passes, one explicit ordered list (:data:`PASSES`); each takes and returns an
IR graph, and ``verify`` runs after every one.

1. ``autodiff``: the backward pass on the IR, from the op registry's gradient rules (the same
   rules eager autograd calls), for the loss ``build()`` called ``backward()`` on.
2. ``optimizer``: one update node per trained variable (``Graph.add_optimizer``).
3. ``gradient_accumulation``: marks how many micro-batches the forward and backward nodes run
   over before the updates (``config.gradient_accumulation_steps``).
4. ``infer_sbp``: every op node's signature, chosen as eager mode does (least boxing given its
   inputs' layouts), which fixes every value's SBP.
5. ``insert_boxing``: a boxing node, planned by the same planner as eager mode, wherever a
   value's layout differs from what its consumer's signature needs (a gradient and its
   variable included: data parallelism's all-reduce is such a node).
"""

from __future__ import annotations

import itertools
from dataclasses import replace as _replace
from typing import Callable

from flowsys import boxing
from flowsys.global_tensor import choose_signature
from flowsys.graph.ir import Graph, GraphError, Node, Value, verify
from flowsys.graph.trace import Symbol, Tracer
from flowsys.ops import OPS
from flowsys.sbp import Broadcast, PartialSum


def _next_id(g: Graph) -> int:
    return max(list(g.values) + [n.id for n in g.nodes] + [-1]) + 1


# ----------------------------------------------------------------------------------- autodiff


def autodiff(g: Graph, **_) -> Graph:
    if g.loss is None:
        return g
    from flowsys.autograd import no_grad  # noqa: PLC0415
    from flowsys.tensor import Tensor, _Builder  # noqa: PLC0415

    needs = set(g.variables.values())  # values that depend on a trained variable
    for n in g.nodes:
        if any(i in needs for i in n.inputs):
            needs.update(o for o in n.outputs if g.values[o].dtype.kind == "f")
    if g.loss not in needs:
        raise GraphError("backward() inside build(): the loss does not depend on any parameter")
    tracer = Tracer(_next_id(g), phase="backward")
    tracer.values.update(g.values)

    def sym(vid):
        return Tensor(Symbol(tracer.values[vid]))

    loss = g.values[g.loss]
    seed = _ones_like(loss)
    grads: dict[int, Tensor] = {g.loss: Tensor(tracer.constant(seed))}
    with tracer, no_grad():
        for n in reversed(g.nodes):
            gouts = [grads.pop(o, None) for o in n.outputs]
            if all(x is None for x in gouts) or not any(i in needs for i in n.inputs):
                continue
            ins = [sym(i) for i in n.inputs]
            for t, i in zip(ins, n.inputs):
                t.requires_grad = i in needs
            if n.kind == "boxing":  # a layout change: its gradient goes back to the input's layout
                in_grads = [tracer.layout_change_back(gouts[0], n.inputs[0])]
            else:
                op = OPS[n.op]
                outs = [sym(o) for o in n.outputs]
                b = _Builder(tuple(i in needs for i in n.inputs))
                if op.multi_output:
                    in_grads = op.grad(b, tuple(gouts), tuple(outs), *ins, **n.attr)
                else:
                    in_grads = op.grad(b, gouts[0], outs[0], *ins, **n.attr)
            for i, gi in zip(n.inputs, in_grads):
                if gi is None or i not in needs:
                    continue
                if type(gi._data) is not Symbol:
                    gi = Tensor(tracer.symbol_of(gi))
                grads[i] = gi if i not in grads else grads[i] + gi
    var_grads = {vid: grads[vid]._data.value.id for vid in g.variables.values() if vid in grads}
    return g.with_(values=dict(tracer.values), nodes=g.nodes + tuple(tracer.nodes),
                   constants={**g.constants, **tracer.constants}, grads=var_grads)


def _ones_like(v: Value):
    import numpy as np  # noqa: PLC0415

    from flowsys.global_tensor import make_global  # noqa: PLC0415
    from flowsys.sbp import broadcast  # noqa: PLC0415

    ones = np.ones(v.shape, dtype=v.dtype)
    return make_global(ones, v.placement, broadcast) if v.placement is not None else ones


# ---------------------------------------------------------------------------------- optimizer


def make_optimizer_pass(params_by_name: dict) -> Callable[..., Graph]:
    """The optimizer pass for these parameters (name -> Parameter)."""

    def optimizer_pass(g: Graph, *, optimizers=(), **_) -> Graph:
        if not optimizers:
            return g
        owner = {}
        for oi, opt in enumerate(optimizers):
            for gi, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    owner[id(p)] = (oi, gi, type(opt).__name__)
        ids = itertools.count(_next_id(g))
        values, nodes = dict(g.values), list(g.nodes)
        for name, vid in g.variables.items():
            if id(params_by_name[name]) not in owner or vid not in g.grads:
                continue
            oi, gi, kind = owner[id(params_by_name[name])]
            var = values[vid]
            new = Value(next(ids), var.shape, var.dtype, var.placement, var.sbp)
            values[new.id] = new
            nodes.append(Node(next(ids), "update", kind, (vid, g.grads[vid]), (new.id,),
                              (("group", gi), ("optimizer", oi), ("variable", name)), "optimizer"))
        # a parameter the loss does not reach gets no update node and keeps its value, as in eager mode
        return g.with_(values=values, nodes=tuple(nodes))

    return optimizer_pass


def gradient_accumulation(g: Graph, *, micro_batches: int = 1, **_) -> Graph:
    """The graph was traced for one micro-batch (axis 0 of every input divided by
    ``micro_batches``); the forward and backward nodes run once per micro-batch, the
    gradients are averaged, and the optimizer phase runs once per step."""
    if micro_batches < 1:
        raise GraphError(f"gradient_accumulation_steps must be >= 1, got {micro_batches}")
    return g.with_(micro_batches=micro_batches)


def infer_sbp(g: Graph, **_) -> Graph:
    """Fix every value's SBP: op nodes take the signature eager mode would choose from their
    inputs' layouts; layout changes pin theirs; updates keep their variable's."""
    values = dict(g.values)
    nodes = []
    for n in g.nodes:
        ins = [values[i] for i in n.inputs]
        if n.kind == "op":
            placement = next((v.placement for v in ins if v.placement is not None), None)
            if placement is None:
                nodes.append(n)
                continue
            sig = choose_signature(OPS[n.op], tuple(v.spec for v in ins), n.attr, [v.sbp for v in ins], placement)
            for o, nd in zip(n.outputs, sig.outs):
                values[o] = _with_sbp(values[o], placement, nd)
            nodes.append(_replace(n, sig=sig))
        elif n.kind == "boxing":
            a = n.attr
            src = ins[0]
            if a.get("like") is not None:  # a gradient going back to its input's layout (P -> B)
                like = values[a["like"]]
                placement, nd = like.placement, tuple(Broadcast() if isinstance(s, PartialSum) else s for s in like.sbp)
            else:
                placement = a["placement"]
                nd = a["sbp"] if a["sbp"] is not None else src.sbp
            values[n.outputs[0]] = _with_sbp(values[n.outputs[0]], placement, nd)
            nodes.append(n)
        else:
            values[n.outputs[0]] = _with_sbp(values[n.outputs[0]], ins[0].placement, ins[0].sbp)
            nodes.append(n)
    return g.with_(values=values, nodes=tuple(nodes))


def _with_sbp(v: Value, placement, nd) -> Value:
    return Value(v.id, v.shape, v.dtype, placement, tuple(nd) if nd is not None else None)


def insert_boxing(g: Graph, **_) -> Graph:
    """Every layout conversion becomes a boxing node holding its plan (steps and bytes)."""
    ids = itertools.count(_next_id(g))
    values = dict(g.values)
    nodes: list[Node] = []
    converted: dict[tuple, int] = {}  # (value, placement, sbp) -> converted value, reused

    def convert(vid: int, placement, nd, phase: str) -> int:
        v = values[vid]
        if v.placement == placement and v.sbp == tuple(nd):
            return vid
        key = (vid, placement, tuple(nd))
        if key not in converted:
            out = Value(next(ids), v.shape, v.dtype, placement, tuple(nd))
            values[out.id] = out
            if v.placement is None:  # a local value laid out by the driver (a constant, a batch)
                nodes.append(Node(next(ids), "boxing", "distribute", (vid,), (out.id,), (("plan", None),), phase))
            else:
                plan = boxing.plan(v.shape, v.dtype, v.placement, v.sbp, placement, tuple(nd))
                kinds = "+".join(s.kind for s in plan.steps) or "none"
                nodes.append(Node(next(ids), "boxing", kinds, (vid,), (out.id,), (("plan", plan),), phase))
            converted[key] = out.id
        return converted[key]

    alias: dict[int, int] = {}
    for n in g.nodes:
        ins = tuple(alias.get(i, i) for i in n.inputs)
        if n.kind == "op" and n.sig is not None:
            placement = values[n.outputs[0]].placement
            ins = tuple(convert(i, placement, nd, n.phase) for i, nd in zip(ins, n.sig.ins))
            nodes.append(_replace(n, inputs=ins))
        elif n.kind == "boxing":  # a pinned layout change: planned here, or dropped when it is the identity
            out = values[n.outputs[0]]
            new = convert(ins[0], out.placement, out.sbp, n.phase)
            alias[n.outputs[0]] = new
        elif n.kind == "update":
            var = values[ins[0]]
            grad = convert(ins[1], var.placement, var.sbp, n.phase) if var.placement is not None else ins[1]
            nodes.append(_replace(n, inputs=(ins[0], grad) + ins[2:]))
        else:
            nodes.append(_replace(n, inputs=ins))
    outputs = tuple(alias.get(o, o) for o in g.outputs)
    loss = alias.get(g.loss, g.loss) if g.loss is not None else None
    grads = {k: alias.get(v, v) for k, v in g.grads.items()}
    return g.with_(values=values, nodes=tuple(nodes), outputs=outputs, loss=loss, grads=grads, boxed=True)


PASS_ORDER = ("autodiff", "optimizer", "gradient_accumulation", "infer_sbp", "insert_boxing")


def compile_graph(g: Graph, *, params_by_name: dict, optimizers=(), micro_batches: int = 1,
                  on_pass: Callable[[str, Graph], None] | None = None) -> Graph:
    """Run the passes in order, verifying after each."""
    passes = {"autodiff": autodiff, "optimizer": make_optimizer_pass(params_by_name),
              "gradient_accumulation": gradient_accumulation, "infer_sbp": infer_sbp, "insert_boxing": insert_boxing}
    verify(g, after="tracing")
    for name in PASS_ORDER:
        g = passes[name](g, optimizers=optimizers, micro_batches=micro_batches)
        verify(g, after=name)
        if on_pass is not None:
            on_pass(name, g)
    return g

"""The compiler passes, one explicit ordered list (:data:`PASS_ORDER`); each takes and returns an
IR graph, and ``verify`` runs after every one.

1. ``autodiff``: the backward pass on the IR, from the op registry's gradient rules (the same
   rules and walk as eager autograd, ``flowsys.autodiff``), for the loss ``build()`` called
   ``backward()`` on.
2. ``checkpointing``: activation checkpointing (``module.activation_checkpointing = True``):
   what a checkpointed module call computed and backward reads is recomputed in backward.
3. ``optimizer``: one update node per trained variable (``Graph.add_optimizer``), applying the
   optimizer's registered update op (``sgd_update``, ``adamw_update``).
4. ``zero``: ZeRO stage 1–3 (``config.zero_stage``) from SBPs alone. The data-parallel mesh
   axis is the one the inputs are split ``S(0)`` along. Stage 1 updates every variable as its
   shard along that axis (optimizer state shard-sized: the gradient is reduce-scattered into the
   shard, the updated shard all-gathered back and assigned to the variable); stage 2 also
   reduce-scatters each micro-batch's gradient as it is produced, so only the shard is
   accumulated; stage 3 keeps the variables themselves sharded (the parameters were laid out so
   before tracing) and gathers each one where forward and backward use it, freed after use.
5. ``gradient_accumulation``: marks how many micro-batches the forward and backward nodes run
   over before the updates (``config.gradient_accumulation_steps``).
6. ``infer_sbp``: every op node's signature, chosen as eager mode does (least boxing given its
   inputs' layouts), which fixes every value's SBP.
7. ``insert_boxing``: a boxing node, planned by the same planner as eager mode, wherever a
   value's layout differs from what its consumer's signature needs (a gradient and its
   variable included: data parallelism's all-reduce is such a node).
8. ``fuse``: chains of elementwise ops become one ``fused_elementwise`` node, and elementwise
   ops around a row reduction (a residual add before its layer norm) one ``fused_rows`` node,
   whose kernels are generated from the ops' scalar and row rules (``flowsys.graph.fuse``;
   ``config.fuse``).
"""

from __future__ import annotations

import itertools
from dataclasses import replace as _replace
from typing import Callable

import numpy as np

from flowsys import boxing
from flowsys.autodiff import Engine, walk
from flowsys.autograd import no_grad
from flowsys.global_tensor import choose_signature, make_global
from flowsys.graph.fuse import fuse as fuse_ops
from flowsys.graph.ir import Graph, GraphError, Node, Value, verify
from flowsys.graph.ir import next_id as _next_id
from flowsys.graph.trace import Symbol, Tracer
from flowsys.ops import OPS, OpDef
from flowsys.ops.optim import state_fields
from flowsys.ops.registry import is_floating
from flowsys.sbp import Broadcast, PartialSum
from flowsys.tensor import Tensor, _Builder


# ----------------------------------------------------------------------------------- autodiff


def autodiff(g: Graph, **_) -> Graph:
    """The backward pass: :func:`flowsys.autodiff.walk`, the eager tape's walk, over the IR's
    nodes with gradients as traced symbols, so that the gradient rules' ops trace the backward
    nodes (:class:`_GraphTape`)."""
    if g.loss is None:
        return g
    needs = set(g.variables.values())  # values that depend on a trained variable
    for n in g.nodes:
        if any(i in needs for i in n.inputs):
            needs.update(o for o in n.outputs if is_floating(g.values[o].dtype))
    if g.loss not in needs:
        raise GraphError("backward() inside build(): the loss does not depend on any parameter")
    tracer = Tracer(_next_id(g), phase="backward")
    tracer.values.update(g.values)
    tape = _GraphTape(tracer, needs)
    loss = g.values[g.loss]
    with tracer, no_grad():
        if g.loss_scale is None:
            seed = Tensor(tracer.constant(_ones_like(loss)))
        else:  # fp16: backward starts from the loss scale (the gradients come out scaled by it)
            seed = tape.sym(g.loss_scale)
            seed = seed if seed.dtype == loss.dtype else seed.astype(loss.dtype)
            seed = seed if loss.shape == () else seed.reshape(loss.shape)
        grads = {g.loss: (seed, False)}
        walk(g.nodes, grads, tape, _Builder)
    var_grads = {vid: grads[vid][0]._data.value.id for vid in g.variables.values() if vid in grads}
    new_nodes = list(tracer.nodes)
    # A variable used on another placement (a pipeline stage borrowing it): its gradient's move
    # back is linear, so the gradient is accumulated where it is made and moved once per step,
    # by the update's own conversion (optimizer phase), not once per micro-batch.
    made_by = {o: n for n in new_nodes for o in n.outputs}
    used = {i for n in g.nodes + tuple(new_nodes) for i in n.inputs}
    for vid, gid in var_grads.items():
        n = made_by.get(gid)
        if n is None or n.kind != "boxing" or n.attr.get("like") != vid or gid in used:
            continue
        src = tracer.values[n.inputs[0]]
        if src.placement is not None and src.placement != tracer.values[vid].placement:
            var_grads[vid] = src.id
            new_nodes.remove(n)
    if len(g.stages) > 1:
        start = max(list(tracer.values) + [n.id for n in g.nodes + tuple(new_nodes)]) + 1
        new_nodes = _unpaired(new_nodes, itertools.count(start))
    return g.with_(values=dict(tracer.values), nodes=g.nodes + tuple(new_nodes),
                   constants={**g.constants, **tracer.constants}, grads=var_grads)


def _unpaired(nodes: list[Node], ids) -> list[Node]:
    """``linear_grads`` nodes as their two ops, the input gradient first: in a pipeline the input
    gradient goes to the previous stage, which should not wait for the weight gradient as well
    (the weight gradient fills the bubble instead, as in Megatron-LM's schedules)."""
    out = []
    for n in nodes:
        if n.kind == "op" and n.op == "linear_grads":
            g_, w, x = n.inputs
            out.append(_replace(n, id=next(ids), op="linear_grad_input", inputs=(g_, w), outputs=n.outputs[:1]))
            out.append(_replace(n, id=next(ids), op="linear_grad_weight", inputs=(g_, x), outputs=n.outputs[1:]))
        else:
            out.append(n)
    return out


def _ones_like(v: Value):
    ones = np.ones(v.shape, dtype=v.dtype)
    return make_global(ones, v.placement, Broadcast()) if v.placement is not None else ones


class _GraphTape(Engine):
    """The autodiff pass's side of the walk: IR nodes, read as tensors holding symbols; a
    boxing node's gradient is its output's gradient moved back to the input's layout."""

    def __init__(self, tracer: Tracer, needs: set[int]):
        self.tracer, self.needs = tracer, needs
        self.boxing = OpDef("to_global", kernel=None, infer=None, sbp=None,
                            grad=lambda b, g, out, x, **_: [tracer.layout_change_back(g, x._data.value.id)])

    def sym(self, vid: int) -> Tensor:
        return Tensor(Symbol(self.tracer.values[vid]))

    def outputs(self, n: Node):
        return n.outputs

    def applied(self, n: Node):
        ins = [self.sym(i) for i in n.inputs]
        for t, i in zip(ins, n.inputs):
            t.requires_grad = i in self.needs
        op = self.boxing if n.kind == "boxing" else OPS[n.op]
        return op, ins, [self.sym(o) for o in n.outputs], n.attr

    def gradient(self, g: Tensor) -> Tensor:
        """Symbols only: a gradient a rule made from constants becomes a constant of the graph."""
        return g if type(g._data) is Symbol else Tensor(self.tracer.symbol_of(g._data))

    def accumulate(self, pending: dict, t: Tensor, g: Tensor, owned: bool) -> None:
        i = t._data.value.id
        prev = pending.get(i)
        pending[i] = (g, False) if prev is None else (prev[0] + g, False)


def _recompute(chain: list[Node], users: list[Node], start: dict[int, int], values: dict, ids) -> tuple[list, dict]:
    """Clones, for the backward pass, of the part of ``chain`` (forward nodes, in order) that the
    ``users`` need; ``start`` maps values to what the clones read instead. Returns the clones and
    the map from each forward value to its recomputed copy."""
    made = {o for m in chain for o in m.outputs}
    needed = {i for m in users for i in m.inputs if i in made}
    for m in reversed(chain):
        if any(o in needed for o in m.outputs):
            needed.update(i for i in m.inputs if i in made)
    again = dict(start)
    clones = []
    for m in chain:
        if not any(o in needed for o in m.outputs):
            continue
        outs = []
        for o in m.outputs:
            v = values[o]
            copy = Value(next(ids), v.shape, v.dtype, v.placement, v.sbp)
            values[copy.id] = copy
            again[o] = copy.id
            outs.append(copy.id)
        clones.append(_replace(m, id=next(ids), inputs=tuple(again.get(i, i) for i in m.inputs), outputs=tuple(outs),
                               phase="backward"))
    return clones, again


def checkpointing(g: Graph, **_) -> Graph:
    """Activation checkpointing: what a checkpointed module call computed in forward and the
    backward pass reads is recomputed in backward, just before its first use there, from the
    call's inputs; forward keeps only what crosses the call's boundary."""
    scopes = sorted({n.scope for n in g.nodes if n.scope is not None and n.phase == "forward"})
    if not scopes:
        return g
    ids = itertools.count(_next_id(g))
    values = dict(g.values)
    before: dict[int, list[Node]] = {}
    replace_in: dict[int, dict[int, int]] = {}
    # what forward computes from parameters and constants alone (a weight's cast or transpose) is
    # made once per step and kept for it: not recomputed
    per_step = set(g.variables.values()) | set(g.constants)
    for n in g.nodes:
        if n.kind == "op" and n.phase == "forward" and all(i in per_step for i in n.inputs):
            per_step.update(n.outputs)
    for scope in scopes:
        chain = [n for n in g.nodes if n.scope == scope and n.phase == "forward" and n.kind == "op"
                 and not all(o in per_step for o in n.outputs)]
        made = {o for n in chain for o in n.outputs}
        users = [n for n in g.nodes if n.phase == "backward" and any(i in made for i in n.inputs)]
        if not users:
            continue
        clones, again = _recompute(chain, users, {}, values, ids)
        before.setdefault(users[0].id, []).extend(clones)
        for n in users:
            replace_in.setdefault(n.id, {}).update({i: again[i] for i in n.inputs if i in again})
    nodes = []
    for n in g.nodes:
        nodes.extend(before.get(n.id, ()))
        if n.id in replace_in:
            n = _replace(n, inputs=tuple(replace_in[n.id].get(i, i) for i in n.inputs))
        nodes.append(n)
    return g.with_(values=values, nodes=tuple(nodes))


# ---------------------------------------------------------------------------------- optimizer


def make_optimizer_pass(params_by_name: dict) -> Callable[..., Graph]:
    """The optimizer pass for these parameters (name -> Parameter)."""

    def optimizer_pass(g: Graph, *, optimizers=(), **_) -> Graph:
        if not optimizers:
            return g
        owner = {}
        for oi, opt in enumerate(optimizers):
            op = getattr(opt, "update_op", None)
            if op not in OPS:
                raise GraphError(f"{type(opt).__name__}: names no registered update op ({op!r}); an optimizer "
                                 f"steps its parameters by one, e.g. 'adamw_update'")
            for gi, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    owner[id(p)] = (oi, gi, op, state_fields(op, group))
        ids = itertools.count(_next_id(g))
        values, nodes = dict(g.values), list(g.nodes)
        grad_of = dict(g.grads)
        for a, b in _tied_pairs(g, params_by_name):
            _sum_tied(a, b, g, params_by_name, owner, values, nodes, grad_of, ids)
        for name, vid in g.variables.items():
            if id(params_by_name[name]) not in owner or vid not in grad_of:
                continue
            oi, gi, op, state = owner[id(params_by_name[name])]
            var = values[vid]
            new = Value(next(ids), var.shape, var.dtype, var.placement, var.sbp)
            values[new.id] = new
            # "state": the arrays the op keeps per parameter (plans budget memory for them)
            nodes.append(Node(next(ids), "update", op, (vid, grad_of[vid]), (new.id,),
                              (("group", gi), ("optimizer", oi), ("state", state), ("variable", name)), "optimizer"))
        # a parameter the loss does not reach gets no update node and keeps its value, as in eager mode
        return g.with_(values=values, nodes=tuple(nodes))

    return optimizer_pass


def _tied_pairs(g: Graph, params_by_name: dict) -> list[tuple[str, str]]:
    """(primary, copy) variable names of the parameters tied by value (``Parameter.tied_to``)."""
    name_of = {id(p): name for name, p in params_by_name.items()}
    pairs = []
    for name, p in params_by_name.items():
        src = getattr(p, "tied_to", None)
        if src is not None and id(src) in name_of and name in g.variables and name_of[id(src)] in g.variables:
            pairs.append((name_of[id(src)], name))
    return pairs


def _sum_tied(a: str, b: str, g: Graph, params_by_name: dict, owner: dict, values: dict, nodes: list,
              grad_of: dict, ids) -> None:
    """Megatron's tied-embedding all-reduce, once per step in the optimizer phase: each copy's
    accumulated gradient is laid out as its variable is, the two are exchanged between their
    placements, and each side adds them (the same operands: the copies stay bitwise equal)."""
    va, vb = g.variables[a], g.variables[b]
    trained = (id(params_by_name[a]) in owner, id(params_by_name[b]) in owner)
    if trained[0] != trained[1]:
        raise GraphError(f"{b} is a copy of {a} tied by value, but the optimizer trains only "
                         f"{a if trained[0] else b}; give the optimizer both (create it after model.pipeline(...), "
                         f"from model.parameters())")
    ga, gb = grad_of.get(va), grad_of.get(vb)
    if not trained[0] or (ga is None and gb is None):
        return

    def pinned(src: int, like: int) -> int:
        v, to = values[src], values[like]
        if to.placement is None:
            return src
        out = Value(next(ids), v.shape, v.dtype, to.placement, to.sbp)
        values[out.id] = out
        nodes.append(Node(next(ids), "boxing", "to_global", (src,), (out.id,),
                          (("placement", to.placement), ("sbp", to.sbp), ("tied", True)), "optimizer"))
        return out.id

    def add(x: int, y: int) -> int:
        v = values[x]
        out = Value(next(ids), v.shape, v.dtype, v.placement, None)
        values[out.id] = out
        nodes.append(Node(next(ids), "op", "add", (x, y), (out.id,), (), "optimizer"))
        return out.id

    la = pinned(ga, va) if ga is not None else None
    lb = pinned(gb, vb) if gb is not None else None
    b_at_a = pinned(lb, va) if lb is not None else None
    a_at_b = pinned(la, vb) if la is not None else None
    grad_of[va] = add(la, b_at_a) if la is not None and b_at_a is not None else (la if la is not None else b_at_a)
    grad_of[vb] = add(a_at_b, lb) if a_at_b is not None and lb is not None else (lb if lb is not None else a_at_b)


def zero_axis(inputs, variables) -> int | None:
    """The data-parallel mesh axis: one the inputs are split ``S(0)`` along while the variables
    are broadcast along it (None when there is none)."""
    from flowsys.sbp import Split  # noqa: PLC0415

    candidates = None
    for v in inputs:
        if v.placement is None or v.sbp is None:
            continue
        axes = {k for k, s in enumerate(v.sbp) if isinstance(s, Split) and s.axis == 0}
        candidates = axes if candidates is None else candidates | axes
    for k in sorted(candidates or ()):
        if all(v.placement is not None and v.sbp is not None and k < len(v.sbp) and isinstance(v.sbp[k], Broadcast)
               for v in variables):
            return k
    return None


def nothing_to_shard(inputs, variables) -> bool:
    """Whether ZeRO has no data-parallel group to shard along: every mesh axis splits some input
    or trained variable (tensor parallelism only), so a ZeRO stage is a group of one there, as
    DeepSpeed's ZeRO over a data-parallel world of one. A mesh axis along which everything is
    broadcast is not that: it is a data-parallel axis whose batch was not split."""
    laid = [v for v in list(inputs) + list(variables) if v.placement is not None and v.sbp is not None]
    if not laid:
        return False
    ndim = max(len(v.sbp) for v in laid)
    return not any(all(k < len(v.sbp) and isinstance(v.sbp[k], Broadcast) for v in laid) for k in range(ndim))


def zero_shard(v: Value, axis: int) -> tuple:
    """``v``'s layout with mesh axis ``axis`` splitting it: the largest tensor axis no other mesh
    axis splits (axis 0 when every axis is split already)."""
    from flowsys.sbp import Split  # noqa: PLC0415

    taken = {s.axis for s in v.sbp if isinstance(s, Split)}
    free = [a for a in range(len(v.shape)) if a not in taken]
    tensor_axis = max(free, key=lambda a: (v.shape[a], -a)) if free else 0
    return tuple(Split(tensor_axis) if k == axis else s for k, s in enumerate(v.sbp))


def main_grad_casts(g: Graph) -> dict[int, Node]:
    """Per updated variable: the backward cast that makes its float32 gradient from the low-dtype
    one (the gradient of the precision policy's cast of the parameter), where there is one."""
    producer = g.producer()
    out = {}
    for n in g.nodes:
        if n.kind != "update":
            continue
        cast = producer.get(n.inputs[1])
        if cast is not None and cast.kind == "op" and cast.op == "astype" and cast.phase == "backward" \
                and g.values[cast.inputs[0]].dtype.itemsize < g.values[cast.outputs[0]].dtype.itemsize:
            out[n.inputs[0]] = cast
    return out


def precision(g: Graph, *, grad_reduce_low: bool = False, zero_stage: int = 0, **_) -> Graph:
    """The precision policy's gradients (``config.precision``; the casts were traced): by default
    each parameter's gradient is cast to float32 where backward makes it, so it is accumulated and
    reduced across ranks in float32 (Megatron's main grads). ``grad_reduce_low`` moves the
    reduction before that cast: each micro-batch's low-dtype gradient is reduced (all-reduced, or
    under ZeRO 2/3 reduce-scattered) into its variable's layout, at half the bytes, then cast."""
    if g.precision == "fp32" or not grad_reduce_low:
        return g
    casts = main_grad_casts(g)
    if not casts:
        return g
    ids = itertools.count(_next_id(g))
    values = dict(g.values)
    trained = [g.values[v] for v in casts]
    axis = g.zero_axis if zero_stage == 3 else zero_axis([g.values[i] for i in g.inputs], trained)
    before: dict[int, Node] = {}
    for vid, cast in casts.items():
        var, low = values[vid], values[cast.inputs[0]]
        if var.placement is None or low.placement not in (None, var.placement):
            continue  # a local graph, or a gradient made on another pipeline stage: reduced once per step
        sbp = zero_shard(var, axis) if zero_stage == 2 and axis is not None else var.sbp
        out = Value(next(ids), low.shape, low.dtype, var.placement, tuple(sbp))
        values[out.id] = out
        before[cast.id] = Node(next(ids), "boxing", "to_global", (low.id,), (out.id,),
                               (("placement", var.placement), ("sbp", tuple(sbp))), "backward")
    nodes = []
    for m in g.nodes:
        if m.id in before:
            nodes.append(before[m.id])
            m = _replace(m, inputs=before[m.id].outputs)
        nodes.append(m)
    return g.with_(values=values, nodes=tuple(nodes))


def zero(g: Graph, *, zero_stage: int = 0, **_) -> Graph:
    if not zero_stage:
        return g
    if zero_stage not in (1, 2, 3):
        raise GraphError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    updates = [n for n in g.nodes if n.kind == "update"]
    if not updates:
        return g
    trained = [g.values[n.inputs[0]] for n in updates]
    # ZeRO 1/2 under a low precision: the variables are sharded float32 masters (laid out before
    # tracing, as stage 3's); the low-precision copy is gathered once per step and kept for it
    masters = zero_stage in (1, 2) and g.zero_axis is not None
    if zero_stage == 3 or masters:
        axis = g.zero_axis
    else:
        axis = zero_axis([g.values[i] for i in g.inputs], trained)
    if axis is None and nothing_to_shard([g.values[i] for i in g.inputs], trained):
        return g  # tensor parallelism alone: a data-parallel group of one holds all of it
    if axis is None:
        raise GraphError(f"zero_stage={zero_stage} needs a data-parallel mesh axis: the inputs must be split S(0) "
                         f"along a mesh axis the parameters are broadcast along (e.g. batch sbp (S(0), B) with "
                         f"parameters (B, ...)); this graph's inputs are laid out "
                         f"{[g.values[i].sbp for i in g.inputs]}")
    ids = itertools.count(_next_id(g))
    values = dict(g.values)

    def pinned(src: int, sbp: tuple, phase: str, fresh: bool = False, per_step: bool = False) -> tuple[Node, int]:
        v = values[src]
        out = Value(next(ids), v.shape, v.dtype, v.placement, tuple(sbp))
        values[out.id] = out
        attrs = (("placement", v.placement), ("sbp", tuple(sbp))) + ((("fresh", True),) if fresh else ()) \
            + ((("per_step", True),) if per_step else ())
        return Node(next(ids), "boxing", "to_global", (src,), (out.id,), attrs, phase), out.id

    forward = [m for m in g.nodes if m.kind == "op" and m.phase == "forward"]
    readers: dict[int, list[Node]] = {}  # value -> the op nodes reading it, in graph order
    for m in g.nodes:
        if m.kind == "op":
            for i in dict.fromkeys(m.inputs):
                readers.setdefault(i, []).append(m)

    def gathered(var: Value) -> int:
        """What a sharded variable's gathers move: its precision cast when that is its only
        forward use (cast once per step, so the gathers move the low dtype), else itself."""
        users = [m for m in readers.get(var.id, ()) if m.phase == "forward"]
        if len(users) == 1 and users[0].op == "astype" and values[users[0].outputs[0]].dtype.itemsize < var.dtype.itemsize:
            return users[0].outputs[0]
        return var.id

    before: dict[int, list[Node]] = {}  # node id -> nodes to insert just before it
    after: dict[int, list[Node]] = {}
    replace_in: dict[int, dict[int, int]] = {}  # node id -> {old input: new input}
    grads = dict(g.grads)
    producer = g.producer()
    for n in updates:
        var = values[n.inputs[0]]
        full = tuple(Broadcast() if k == axis else s for k, s in enumerate(var.sbp))
        shard = var.sbp if zero_stage == 3 or masters else zero_shard(var, axis)
        if masters:
            # the cast of the master shard gathered once per step, read by forward and backward
            src = gathered(var)
            used = [m for m in readers.get(src, ()) if m.phase != "optimizer"]
            if used:
                node, whole = pinned(src, full, "forward", per_step=True)
                before.setdefault(used[0].id, []).append(node)
                for m in used:
                    replace_in.setdefault(m.id, {})[src] = whole
        if zero_stage == 3:
            # gather where forward uses it; backward gathers again and recomputes what forward
            # derived from the parameter alone (a transpose, a reshape), so no gathered copy
            # lives from forward to backward
            src = gathered(var)
            users = [m for m in readers.get(src, ()) if m.phase == "forward"]
            if users:
                node, fwd = pinned(src, full, "forward")
                before.setdefault(users[0].id, []).append(node)
                for m in users:
                    replace_in.setdefault(m.id, {})[src] = fwd
            derived, chain = {src}, []
            for m in forward:
                if any(i in derived for i in m.inputs) and all(i in derived or i in g.constants for i in m.inputs):
                    chain.append(m)
                    derived.update(m.outputs)
            late = [m for m in g.nodes if m.phase == "backward" and any(i in derived for i in m.inputs)]
            if late:
                node, bwd = pinned(src, full, "backward", fresh=True)  # not the forward's gathered copy
                clones, again = _recompute(chain, late, {src: bwd}, values, ids)
                before.setdefault(late[0].id, []).extend([node] + clones)
                for m in late:
                    replace_in.setdefault(m.id, {}).update({i: again[i] for i in m.inputs if i in again})
        grad = n.inputs[1]
        if zero_stage >= 2 and grad == g.grads.get(var.id) and values[grad].placement == var.placement:
            # reduce-scatter each micro-batch's gradient where it is produced (a gradient made on
            # another stage, or a tied copy's sum, goes to the shard once per step instead)
            node, grad_s = pinned(grad, shard, "backward")
            after.setdefault(producer[grad].id, []).append(node)
            grads[var.id] = grad_s
            replace_in.setdefault(n.id, {})[grad] = grad_s
        if zero_stage in (1, 2) and not masters:  # update the shard, gather it back, assign it to the variable
            node, var_s = pinned(var.id, shard, "optimizer")
            before.setdefault(n.id, []).append(node)
            replace_in.setdefault(n.id, {})[var.id] = var_s
            new = n.outputs[0]
            values[new] = Value(new, var.shape, var.dtype, var.placement, shard)
            back, new_b = pinned(new, var.sbp, "optimizer")
            done = Value(next(ids), var.shape, var.dtype, var.placement, var.sbp)
            values[done.id] = done
            assign = Node(next(ids), "assign", "assign", (var.id, new_b), (done.id,), (), "optimizer")
            after.setdefault(n.id, []).extend([back, assign])
    nodes: list[Node] = []
    for m in g.nodes:
        nodes.extend(before.get(m.id, ()))
        if m.id in replace_in:
            sub = replace_in[m.id]
            m = _replace(m, inputs=tuple(sub.get(i, i) for i in m.inputs))
        nodes.append(m)
        nodes.extend(after.get(m.id, ()))
    return g.with_(values=values, nodes=tuple(nodes), grads=grads)


def make_clip_pass(params_by_name: dict) -> Callable[..., Graph]:
    """The gradient clipping pass for these parameters (name -> Parameter)."""

    def clip_grad(g: Graph, *, grad_clip: float = 0.0, skip_nonfinite: bool = False, **_) -> Graph:
        """Clipping by the global norm (``config.grad_clip``, torch's ``clip_grad_norm_``): each
        update's gradient in the layout the update reads it (its variable's, under ZeRO the
        shard's), its squared sum (``sum_squares``: split -> partial sums), one float64 total per
        placement, the stages' totals summed on the first one's, made B there (the all-reduce runs
        over exactly the mesh axes the gradients were split along: a replicated shard counts once),
        moved back to every placement, ``clip_scale`` and a ``mul`` of each gradient before its
        update. A tied copy (``Parameter.tied_to``) is scaled but counted once."""
        skipping = g.loss_scale is not None or skip_nonfinite  # updates skipped when the norm is not finite
        if not grad_clip and not skipping:
            return g
        if grad_clip and not float(grad_clip) > 0:
            raise GraphError(f"config.grad_clip is the largest global gradient norm, > 0 (0 turns clipping off); "
                             f"got {grad_clip!r}")
        updates = [n for n in g.nodes if n.kind == "update"]
        if not updates:
            return g
        copies = {b for _, b in _tied_pairs(g, params_by_name)}
        ids = itertools.count(_next_id(g))
        values = dict(g.values)
        new_nodes: list[Node] = []

        def value(shape, dtype, placement, sbp=None) -> int:
            v = Value(next(ids), tuple(shape), np.dtype(dtype), placement, tuple(sbp) if sbp is not None else None)
            values[v.id] = v
            return v.id

        def op(name: str, ins: tuple, shape, dtype, placement, attrs=()) -> int:
            out = value(shape, dtype, placement)
            new_nodes.append(Node(next(ids), "op", name, ins, (out,), tuple(attrs), "optimizer"))
            return out

        def moved(src: int, placement, sbp) -> int:
            v = values[src]
            out = value(v.shape, v.dtype, placement, sbp)
            new_nodes.append(Node(next(ids), "boxing", "to_global", (src,), (out,),
                                  (("placement", placement), ("sbp", tuple(sbp))), "optimizer"))
            return out

        def broadcast(placement) -> tuple:
            return (Broadcast(),) * placement.ndim

        pinned_grad: dict[int, int] = {}
        totals: dict = {}  # placement -> running float64 total of the squared sums there
        for n in updates:
            laid, grad = values[n.inputs[0]], n.inputs[1]
            if laid.placement is not None:  # the layout the update reads it in (a no-op when it has it)
                grad = moved(grad, laid.placement, laid.sbp)
            pinned_grad[n.id] = grad
            if n.attr.get("variable") in copies:
                continue
            sq = op("sum_squares", (grad,), (), np.float64, laid.placement)
            have = totals.get(laid.placement)
            totals[laid.placement] = sq if have is None else op("add", (have, sq), (), np.float64, laid.placement)
        places = list(totals)
        root = places[0]
        total = totals[root]
        for pl in places[1:]:  # pipeline stages: each stage's total summed on the first stage's placement
            total = op("add", (total, moved(totals[pl], root, broadcast(root)) if root is not None else totals[pl]),
                       (), np.float64, root)
        if root is not None:
            total = moved(total, root, broadcast(root))
        scales: dict = {}
        at: dict = {}  # placement -> the total there
        for n in updates:
            laid, grad = values[n.inputs[0]], pinned_grad[n.id]
            key = (laid.placement, np.dtype(values[grad].dtype).name)
            if laid.placement not in at:
                at[laid.placement] = total if laid.placement == root or laid.placement is None else \
                    moved(total, laid.placement, broadcast(laid.placement))
            if key not in scales and not grad_clip and g.loss_scale is None:
                continue  # only the non-finite test: the gradients stay as they are
            if key not in scales:
                unscale = ()
                if g.loss_scale is not None:  # fp16: the gradients are scaled by the loss scale
                    s = values[g.loss_scale]
                    unscale = (g.loss_scale if s.placement == laid.placement or laid.placement is None
                               else moved(g.loss_scale, laid.placement, broadcast(laid.placement)),)
                scales[key] = op("clip_scale", (at[laid.placement],) + unscale, (), key[1], laid.placement,
                                 (("dtype", key[1]), ("eps", 1e-6), ("max_norm", float(grad_clip))))
            pinned_grad[n.id] = op("mul", (grad, scales[key]), values[grad].shape, values[grad].dtype, laid.placement)
        first = g.nodes.index(updates[0])
        nodes = []
        for m in g.nodes[:first] + tuple(new_nodes) + g.nodes[first:]:
            if m.kind == "update":
                # with loss scaling the update also reads the total: not finite, the step is skipped
                finite = (at[values[m.inputs[0]].placement],) if skipping else ()
                m = _replace(m, inputs=(m.inputs[0], pinned_grad[m.id]) + m.inputs[2:] + finite)
            nodes.append(m)
        # the squared norm, B: the step's last output (Graph.last_grad_norm)
        return g.with_(values=values, nodes=tuple(nodes), outputs=g.outputs + (total,), norm_output=True)

    return clip_grad


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

    def convert(vid: int, placement, nd, phase: str, fresh: bool = False, per_step: bool = False) -> int:
        v = values[vid]
        if v.placement == placement and v.sbp == tuple(nd):
            return vid
        key = (vid, placement, tuple(nd)) + ((next(ids),) if fresh else ())
        if key not in converted:
            out = Value(next(ids), v.shape, v.dtype, placement, tuple(nd))
            values[out.id] = out
            if v.placement is None:  # a local value laid out by the driver (a constant, a batch)
                nodes.append(Node(next(ids), "boxing", "distribute", (vid,), (out.id,), (("plan", None),), phase))
            else:
                plan = boxing.plan(v.shape, v.dtype, v.placement, v.sbp, placement, tuple(nd))
                kinds = "+".join(s.kind for s in plan.steps) or "none"
                # per_step: run once per step and kept for it (ZeRO 1/2's gathered low-precision weights)
                nodes.append(Node(next(ids), "boxing", kinds, (vid,), (out.id,),
                                  (("plan", plan),) + ((("per_step", True),) if per_step else ()), phase))
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
            new = convert(ins[0], out.placement, out.sbp, n.phase, fresh=bool(n.attr.get("fresh")),
                          per_step=bool(n.attr.get("per_step")))
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


PASS_ORDER = ("autodiff", "checkpointing", "optimizer", "precision", "zero", "clip_grad", "gradient_accumulation",
              "infer_sbp", "insert_boxing", "fuse")


def compile_graph(g: Graph, *, params_by_name: dict, optimizers=(), micro_batches: int = 1, zero_stage: int = 0,
                  grad_clip: float = 0.0, grad_reduce_low: bool = False, skip_nonfinite: bool = False,
                  fuse: bool = True, on_pass: Callable[[str, Graph], None] | None = None) -> Graph:
    """Run the passes in order, verifying after each."""
    passes = {"autodiff": autodiff, "checkpointing": checkpointing, "optimizer": make_optimizer_pass(params_by_name),
              "precision": precision, "zero": zero, "clip_grad": make_clip_pass(params_by_name),
              "gradient_accumulation": gradient_accumulation, "infer_sbp": infer_sbp, "insert_boxing": insert_boxing,
              "fuse": fuse_ops}
    verify(g, after="tracing")
    for name in PASS_ORDER:
        g = passes[name](g, optimizers=optimizers, micro_batches=micro_batches, zero_stage=zero_stage,
                         grad_clip=grad_clip, grad_reduce_low=grad_reduce_low, skip_nonfinite=skip_nonfinite,
                         fuse=fuse)
        verify(g, after=name)
        if on_pass is not None:
            on_pass(name, g)
    return g

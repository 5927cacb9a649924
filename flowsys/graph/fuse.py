"""The fusion pass: chains of elementwise ops, and elementwise ops around one row reduction,
become one node whose kernel is generated from the ops' rules (``flowsys.ops.fusion``).

It runs last, on the boxed graph, so every layout is already decided: a group is a connected set
of op nodes that

- all have a scalar rule (``OpDef.scalar``) or, at most one per group, a row rule (``OpDef.row``:
  layer norm, softmax), and one output, of one dtype and shape, whose inputs have that shape or
  are 0-d (a row op's other inputs may have one row's shape: layer norm's weight and bias);
- all run in the same phase and checkpoint scope, on the same placement, under the same SBP (so
  the fused node's signature is its parts', and a group never spans a boxing node);
- pass every intermediate to exactly one consumer, inside the group, and keep none of them as a
  graph output, loss or gradient (what the group computes inside never exists in memory), with
  one exception: the value a row op reduces may be read outside too (the residual sum that a
  layer norm reads and the next residual add reads again); it is then one more output of the
  fused node, computed in the same kernel, provided everything reading it comes later.

A group without a row op becomes a ``fused_elementwise`` node, one with a row op a ``fused_rows``
node. The fused node takes the group's place at its last member, with the group's outside inputs
in order of first use; eager mode is untouched (it runs op by op).
"""

from __future__ import annotations

import itertools

from flowsys.global_tensor import Signature
from flowsys.graph.ir import Graph, Node, next_id
from flowsys.ops import OPS
from flowsys.ops.fusion import describe
from flowsys.ops.registry import SbpRow


def _is_row(n: Node) -> bool:
    return OPS[n.op].row is not None


def _candidate(n: Node, g: Graph) -> bool:
    if n.kind != "op" or len(n.outputs) != 1 or n.op in ("fused_elementwise", "fused_rows"):
        return False
    spec = OPS[n.op]
    out = g.values[n.outputs[0]]
    if out.dtype.kind != "f" or any(g.values[i].dtype != out.dtype for i in n.inputs):
        return False
    if spec.row is not None:  # a row reduction: its first input has its shape, the others one row's (or 0-d)
        axes = spec.row.axes(dict(n.attr))
        if axes is None or not n.inputs or g.values[n.inputs[0]].shape != out.shape or len(out.shape) < axes:
            return False
        row = out.shape[len(out.shape) - axes:]
        return all(g.values[i].shape in (row, ()) for i in n.inputs[1:])
    if spec.scalar is None:
        return False
    return all(g.values[i].shape == out.shape or not g.values[i].shape for i in n.inputs)


def fuse(g: Graph, *, fuse: bool = True, **_) -> Graph:
    """Replace every group of two or more fusable nodes by one fused node (see the module doc);
    ``fuse=False`` (``Graph.config.fuse``) leaves the graph as it is."""
    if not fuse:
        return g
    readers: dict[int, list[Node]] = {}  # value -> the nodes reading it
    for n in g.nodes:
        for i in dict.fromkeys(n.inputs):
            readers.setdefault(i, []).append(n)
    kept = set(g.outputs) | set(g.grads.values()) | ({g.loss} if g.loss is not None else set())
    producer = {o: n for n in g.nodes for o in n.outputs}
    order = {n.id: k for k, n in enumerate(g.nodes)}
    group_of: dict[int, int] = {}  # node id -> group id (a union of the nodes merged so far)
    members: dict[int, list[Node]] = {}

    def same_layout(a: Node, b: Node) -> bool:
        va, vb = g.values[a.outputs[0]], g.values[b.outputs[0]]
        return (a.phase, a.scope, va.placement, va.sbp, va.shape) == (b.phase, b.scope, vb.placement, vb.sbp, vb.shape)

    def rows_in(group: int) -> int:
        return sum(_is_row(m) for m in members[group])

    for n in g.nodes:
        if not _candidate(n, g):
            continue
        group_of[n.id] = n.id
        members[n.id] = [n]
        for i in dict.fromkeys(n.inputs):
            p = producer.get(i)
            if p is None or p.id not in group_of or not same_layout(p, n):
                continue
            a, b = group_of[p.id], group_of[n.id]
            if a == b or rows_in(a) + rows_in(b) > 1:  # one row reduction per kernel
                continue
            shared = i in kept or len(readers[i]) != 1
            # a value read outside too stays an output of the fused node: only before a row
            # reduction (the residual sum a layer norm reads, which the next residual add reads too)
            if shared and not (_is_row(n) and i == n.inputs[0] and not _is_row(p)):
                continue
            for m in members[a]:  # merge p's group into n's
                group_of[m.id] = b
            members[b] = sorted(members.pop(a) + members[b], key=lambda m: order[m.id])
    ids = itertools.count(next_id(g))
    replaced: dict[int, Node] = {}  # last member's id -> the fused node
    dropped: set[int] = set()
    inside: set[int] = set()
    for ms in members.values():
        if len(ms) < 2:
            continue
        ids_in = {m.id for m in ms}
        extras = [m.outputs[0] for m in ms[:-1]
                  if m.outputs[0] in kept or any(c.id not in ids_in for c in readers.get(m.outputs[0], ()))]
        # the fused node sits at the last member: whatever reads an extra output must come later
        if any(order[c.id] < order[ms[-1].id] for v in extras for c in readers.get(v, ()) if c.id not in ids_in):
            continue
        replaced[ms[-1].id] = _fused_node(ms, extras, g, next(ids))
        dropped.update(m.id for m in ms[:-1])
        inside.update(m.outputs[0] for m in ms[:-1] if m.outputs[0] not in extras)
    if not replaced:
        return g
    nodes = tuple(replaced.get(n.id, n) for n in g.nodes if n.id not in dropped)
    values = {k: v for k, v in g.values.items() if k not in inside}
    return g.with_(nodes=nodes, values=values)


def _fused_node(ms: list[Node], extras: list[int], g: Graph, nid: int) -> Node:
    """One node computing the members (in graph order) as a program over their outside inputs;
    its outputs are ``extras`` (intermediates read outside too) and the last member's."""
    produced = {m.outputs[0]: j for j, m in enumerate(ms)}  # (SSA: a part reads only earlier parts')
    inputs: list[int] = []
    program = []
    for m in ms:
        args = []
        for i in m.inputs:
            if i in produced:
                args.append(("t", produced[i]))
            else:
                if i not in inputs:
                    inputs.append(i)
                args.append(("in", inputs.index(i)))
        program.append((m.op, tuple(args), tuple(sorted(m.attr.items()))))
    program = tuple(program)
    last = ms[-1]
    outs = tuple(extras) + last.outputs
    rows = any(_is_row(m) for m in ms)
    sig = None
    if last.sig is not None:
        ins = tuple(tuple(g.values[i].sbp) for i in inputs)
        out_sbps = tuple(tuple(g.values[o].sbp) for o in outs)
        why = f"follows from its parts ({describe(program)})"
        sig_rows = tuple(SbpRow(tuple(nd[k] for nd in ins), tuple(o[k] for o in out_sbps), why)
                         for k in range(len(out_sbps[0])))
        sig = Signature(sig_rows, ins, out_sbps, 0)
    if rows:
        attrs = (("outputs", tuple(produced[o] for o in outs)), ("program", program))
        return Node(nid, "op", "fused_rows", tuple(inputs), outs, attrs, last.phase, sig, last.scope)
    return Node(nid, "op", "fused_elementwise", tuple(inputs), last.outputs, (("program", program),), last.phase,
                sig, last.scope)

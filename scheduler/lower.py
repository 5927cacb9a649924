"""Lowering the compiled global IR to one physical plan per rank (see the package docstring)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flowsys.graph.ir import Graph, Node, Value
from flowsys.layout import fmt, holds_value, local_shape, shard_box, shard_of
from flowsys.ops import OPS
from flowsys.placement import Placement
from flowsys.sbp import Split
from flowsys.sbp import broadcast as B
from flowsys.planformat import decode_attrs, encode_attrs, plan_pb2
from scheduler.nccl_order import attach as attach_order

# Gradient all-reduces are fused into buckets of up to this many bytes (DDP's bucket_cap_mb=25).
BUCKET_BYTES = 25 * 2**20


class _Lowering:
    def __init__(self, g: Graph, registers: int = 1, bucket_bytes: int = BUCKET_BYTES, devices_per_node: int = 1):
        if int(registers) < 1:
            raise ValueError(f"lower: registers must be at least 1, got {registers}")
        if int(bucket_bytes) < 0:
            raise ValueError(f"lower: bucket_bytes must be 0 (no buckets) or more, got {bucket_bytes}")
        self.g = g
        self.registers = int(registers)
        self.bucket_bytes = int(bucket_bytes)
        self.devices_per_node = max(1, int(devices_per_node))
        self.node_sizes: dict[tuple, int] = {}
        self.op_ids = itertools.count()
        self.first_value = max(g.values, default=0) + 1  # ids of the values boxing makes up start here
        self.value_ids = itertools.count(self.first_value)
        self.channels: dict[Any, int] = {}
        placements = {v.placement for v in g.values.values() if v.placement is not None}
        self.placements = sorted(placements, key=lambda p: (p.ranks, p.mesh))
        self.ranks = sorted({r for p in placements for r in p.ranks}) or [0]
        self.step_nodes = self.per_step_nodes()
        self.holes: list | None = None  # while a template is lowered: its rank-dependent fields
        self.moves: dict[int, dict[int, list]] = {}  # move node -> rank -> its (index, transfer)s
        self.memo: dict[Any, str] = {}  # encoded attributes of template holes
        self.coords_in = {p: dict(zip(p.ranks, zip(*(c.tolist() for c in np.unravel_index(np.arange(p.size), p.mesh)))))
                          for p in self.placements}
        self.group_in: dict[tuple, dict[int, tuple[int, ...]]] = {}

    def per_step_nodes(self) -> set[int]:
        """Nodes of the compute phase that read only per-step values (parameters, constants, and
        what ops and moves between placements compute from them alone: a weight's transpose, a
        tied embedding sent to the last pipeline stage): once per step, not per micro-batch.
        Collectives stay per micro-batch (ZeRO 3 gathers parameters where they are used)."""
        g = self.g
        known = set(g.variables.values()) | set(g.constants) | ({g.loss_scale} if g.loss_scale is not None else set())
        out = set()
        for n in g.nodes:
            if n.phase == "optimizer" or not all(i in known for i in n.inputs):
                continue
            if n.kind == "op":
                pure = not any(type(v).__name__ == "SeedRef" for v in n.attr.values())
            else:
                plan = n.attr.get("plan")
                src, dst = g.values[n.inputs[0]], g.values[n.outputs[0]]
                pure = n.kind == "boxing" and plan is not None and (src.placement != dst.placement
                                                                    or bool(n.attr.get("per_step")))
            if pure:
                out.add(n.id)
                known.update(n.outputs)
        return out

    def channel(self, key) -> int:
        return self.channels.setdefault(key, len(self.channels))

    def lower(self) -> plan_pb2.Plan:
        """Every rank's plan, each instantiated from its template (see ``templates``): the same
        plan, byte for byte, as ``lower_rank_by_rank``."""
        plan = plan_pb2.Plan(micro_batches=self.g.micro_batches)
        of = {r: t for t in self.templates() for r in t.ranks}
        op_base, value_base = next(self.op_ids), next(self.value_ids)
        for r in self.ranks:
            t = of[r]
            rp = plan.ranks.add()
            rp.CopyFrom(t.plan)
            self.instantiate(t, r, rp, op_base, value_base - self.first_value)
            op_base += len(rp.ops)
            value_base += len(t.new_values)
        self.op_ids, self.value_ids = itertools.count(op_base), itertools.count(value_base)
        return plan

    def lower_rank_by_rank(self) -> plan_pb2.Plan:
        """Every rank's plan, each lowered on its own (the reference ``lower`` is checked against)."""
        plan = plan_pb2.Plan(micro_batches=self.g.micro_batches)
        for r in self.ranks:
            plan.ranks.append(self.rank_plan(r))
        return plan

    # ------------------------------------------------------------------------------ templates
    # A rank's plan depends on the rank only through: its registers (its pipeline stage), the
    # placements it belongs to, the local shapes of the values (and boxing steps' states) split
    # unevenly, on it and on its groups along each mesh axis (buckets' shards), which of its
    # mesh-axis groups coincide (buckets are per group), and its part in each move between
    # placements (which transfers it sends, receives or copies). Ranks alike
    # in all of these have plans equal up to "holes": op and made-up value ids (consecutive per
    # rank), collective groups and channels, shard indices and offsets in attributes, transfers'
    # peers, boxes and origins. One representative per class is lowered (the template); the
    # others are copies with the holes filled.

    def signature(self, r: int) -> tuple:
        """What ``r``'s plan depends on besides its holes (ranks with equal signatures share a template)."""
        sig: list = [self.registers_on(r)]
        groups: dict[tuple, int] = {}
        for p in self.placements:
            c = self.coords_in[p].get(r)
            if c is None:
                sig.append(None)
                continue
            states = self.uneven[p]
            if states:
                sig.append(tuple(self.remember(("shapes", p, k, c[:k] + c[k + 1:]), lambda k=k, c=c: tuple(
                    tuple(local_shape(shape, nd, p.mesh, c[:k] + (i,) + c[k + 1:]) for shape, nd in states)
                    for i in range(p.mesh[k]))) for k in range(p.ndim)))
            sig.append(tuple(groups.setdefault(self.group_of(p, k, r), len(groups)) for k in range(p.ndim)))
        sig.append(tuple(roles.get(r) for roles in self.move_roles))
        return tuple(sig)

    def templates(self) -> list[Template]:
        """One lowered template per class of alike ranks (see ``signature``), in rank order."""
        if not hasattr(self, "uneven"):
            self.uneven = self.uneven_axes()
            self.move_roles = [self.roles(n) for n in self.g.nodes if n.kind == "boxing" and self.is_move(n)]
        classes: dict[tuple, list[int]] = {}
        for r in self.ranks:
            classes.setdefault(self.signature(r), []).append(r)
        return [self.template(ranks) for ranks in classes.values()]

    def template(self, ranks: list[int]) -> Template:
        saved = self.op_ids, self.value_ids, self.channels
        self.op_ids, self.value_ids, self.channels, self.holes = itertools.count(), itertools.count(self.first_value), {}, []
        try:
            rp = self.rank_plan(ranks[0])
            holes = self.holes
        finally:
            (self.op_ids, self.value_ids, self.channels), self.holes = saved, None
        made = [j for j, v in enumerate(rp.values) if v.id >= self.first_value]
        made_ids = [(i, out, pos) for i, op in enumerate(rp.ops) for out, ids in ((False, op.inputs), (True, op.outputs))
                    for pos, v in enumerate(ids) if v >= self.first_value]
        by_channel = {rp.ops[i].channel: i for i, kind, _ in holes if kind in ("group", "move")}
        buckets = [(i, by_channel[op.bucket - 1]) for i, op in enumerate(rp.ops) if op.bucket]
        return Template(rp, ranks, holes, made, made_ids, buckets)

    def instantiate(self, t: Template, r: int, rp, op_base: int, shift: int) -> None:
        """Fill ``rp`` (a copy of ``t.plan``) in for rank ``r``: ids from ``op_base`` and made-up
        values ``shift`` above the template's, channels numbered as rank-by-rank lowering does."""
        rp.rank = r
        ops = rp.ops
        for i, op in enumerate(ops):
            op.id = op_base + i
        if shift:
            for i, out, pos in t.made_ids:
                (ops[i].outputs if out else ops[i].inputs)[pos] += shift
            for j in t.new_values:
                rp.values[j].id += shift
        for i, kind, data in t.holes:
            op = ops[i]
            if kind == "group":
                p, k, key = data
                group = self.group_of(p, k, r)
                op.group[:] = group
                op.channel = self.channel((*key, group))
            elif kind == "index":  # a shard's slice or zeros: its index along the mesh axis
                p, k = data
                index = self.coords_in[p][r][k]
                op.attrs = self.remember(("index", op.attrs, index), lambda a=op.attrs, x=index: _with(a, index=x))
            elif kind == "move":
                n, j = data
                i_t, tr = self.transfers_of(n, r)[j]
                op.attrs = self.move_attrs(n, tr, r)
                op.channel = self.channel((n.id, i_t))
                if op.kind != "local":
                    op.peer = tr.dst if op.kind == "send" else tr.src
            else:  # "attrs": attributes computed from the rank's coordinates (op lower rules, take_shard)
                n, p, axes, fn = data
                c = self.coords_in[p][r]
                op.attrs = self.remember((n.id, tuple(c[k] for k in axes)), lambda f=fn: f(r))
        for i, j in t.buckets:
            ops[i].bucket = ops[j].channel + 1

    def remember(self, key, make) -> str:
        out = self.memo.get(key)
        if out is None:
            out = self.memo[key] = make()
        return out

    def vary(self, rp, kind: str, *data) -> None:
        """While a template is lowered: the op just appended has a rank-dependent ``kind`` of field."""
        if self.holes is not None:
            self.holes.append((len(rp.ops) - 1, kind, data))

    def group_of(self, p: Placement, k: int, r: int) -> tuple[int, ...]:
        table = self.group_in.get((p, k))
        if table is None:
            table = self.group_in[(p, k)] = {q: grp for grp in p.groups(k) for q in grp}
        return table[r]

    def uneven_axes(self) -> dict[Placement, list[tuple]]:
        """Per placement, the (shape, N-D SBP) of values and boxing steps' states whose local
        shape depends on the coordinates: a tensor axis split by mesh axes whose sizes do not divide it."""
        out: dict[Placement, dict[tuple, None]] = {p: {} for p in self.placements}

        def check(shape, nd_sbp, p: Placement) -> None:
            along: dict[int, list[int]] = {}
            for k, v in enumerate(nd_sbp):
                if isinstance(v, Split):
                    along.setdefault(v.axis, []).append(k)
            if any(shape[a] % math.prod(p.mesh[k] for k in ks) for a, ks in along.items()):
                out[p][(tuple(shape), tuple(nd_sbp))] = None

        for v in self.g.values.values():
            if v.placement is not None and v.sbp is not None:
                check(v.shape, v.sbp, v.placement)
        for n in self.g.nodes:
            plan = n.attr.get("plan") if n.kind == "boxing" else None
            if plan is not None and not self.is_move(n):
                src = self.g.values[n.inputs[0]]
                state = list(src.sbp)
                for step in plan.steps:
                    check(src.shape, tuple(B if j == step.mesh_axis else v for j, v in enumerate(state)), src.placement)
                    state[step.mesh_axis] = step.dst
                    check(src.shape, tuple(state), src.placement)
        return {p: list(states) for p, states in out.items()}

    def is_move(self, n: Node) -> bool:
        return n.attr.get("plan") is not None and \
            self.g.values[n.inputs[0]].placement != self.g.values[n.outputs[0]].placement

    def transfers_of(self, n: Node, r: int) -> list:
        """``r``'s part in move node ``n``: (index, transfer) of those it sends, receives or copies, in plan order."""
        table = self.moves.get(n.id)
        if table is None:
            table = self.moves[n.id] = {}
            for i, t in enumerate(n.attr["plan"].transfers):
                table.setdefault(t.src, []).append((i, t))
                if t.dst != t.src:
                    table.setdefault(t.dst, []).append((i, t))
        return table.get(r, [])

    def roles(self, n: Node) -> dict[int, tuple]:
        """Per rank, what its ops of move node ``n`` are, holes aside."""
        itemsize = self.g.values[n.inputs[0]].dtype.itemsize
        self.transfers_of(n, -1)
        return {r: tuple(("copy" if t.src == t.dst else "send" if t.src == r else "recv", t.relay,
                          math.prod(b - a for a, b in t.box) * itemsize) for _, t in mine)
                for r, mine in self.moves[n.id].items()}

    def move_attrs(self, n: Node, t, r: int) -> str:
        g = self.g
        src, dst = g.values[n.inputs[0]], g.values[n.outputs[0]]
        src_origin = (tuple(a for a, _ in shard_box(src.shape, src.sbp, src.placement.mesh, src.placement.coords(r)))
                      if self.lives_on(src, r) else None)
        dst_origin = (tuple(a for a, _ in shard_box(dst.shape, dst.sbp, dst.placement.mesh, dst.placement.coords(r)))
                      if self.lives_on(dst, r) else None)
        return encode_attrs({"box": tuple(tuple(x) for x in t.box), "relay": t.relay,
                             "src_origin": src_origin, "dst_origin": dst_origin})

    def registers_on(self, r: int) -> int:
        """Registers per value on rank ``r``: on pipeline stage ``s`` of ``p``, ``p - s``, so that a
        stage holds at most as many micro-batches as are still ahead of it (1F1B's bound)."""
        for s, ranks in self.g.stages:
            if r in ranks:
                return max(self.registers, len(self.g.stages) - s)
        return self.registers

    # ------------------------------------------------------------------------------ one rank
    def lives_on(self, v: Value, r: int) -> bool:
        return v.placement is None or r in v.placement.ranks

    def local(self, v: Value, r: int) -> tuple[int, ...]:
        if v.placement is None or v.sbp is None:
            return v.shape
        return local_shape(v.shape, v.sbp, v.placement.mesh, v.placement.coords(r))

    def rank_plan(self, r: int) -> plan_pb2.RankPlan:
        g = self.g
        rp = plan_pb2.RankPlan(rank=r)
        declared: set[int] = set()

        registers = self.registers_on(r)

        def declare(vid: int, shape=None, dtype=None, sbp="", device="") -> None:
            if vid in declared:
                return
            declared.add(vid)
            if shape is None:
                v = g.values[vid]
                shape, dtype, sbp = self.local(v, r), v.dtype, fmt(v.sbp) if v.sbp is not None else ""
                device = v.placement.type if v.placement is not None else ""
            rp.values.append(plan_pb2.Value(id=vid, shape=list(shape), dtype=np.dtype(dtype).name, sbp=sbp,
                                            registers=registers, device="" if device == "cpu" else device))

        for vid in g.inputs:
            if self.lives_on(g.values[vid], r):
                declare(vid)
                if vid != g.loss_scale:  # the loss scale is per step (held like a parameter), not per micro-batch
                    rp.inputs.append(vid)
        for name, vid in g.variables.items():
            if self.lives_on(g.values[vid], r):
                declare(vid)
                rp.variables[name] = vid
        for vid in g.constants:
            if self.lives_on(g.values[vid], r):
                declare(vid)
        for n in g.nodes:
            if n.kind == "op":
                self.lower_op(n, r, rp, declare)
            elif n.kind == "boxing":
                self.lower_boxing(n, r, rp, declare)
            elif n.kind == "assign":
                if self.lives_on(g.values[n.inputs[0]], r):
                    for vid in n.inputs + n.outputs:
                        declare(vid)
                    rp.ops.append(plan_pb2.Op(id=next(self.op_ids), node=n.id, kind="local", op="assign",
                                              inputs=n.inputs, outputs=n.outputs, phase=n.phase))
            elif self.lives_on(g.values[n.inputs[0]], r):
                for vid in n.inputs + n.outputs:
                    declare(vid)
                attrs = {k: n.attr[k] for k in ("optimizer", "group", "state", "variable")}
                rp.ops.append(plan_pb2.Op(id=next(self.op_ids), node=n.id, kind="update", op=n.op, inputs=n.inputs,
                                          outputs=n.outputs, attrs=encode_attrs(attrs), phase=n.phase))
        for op in rp.ops:
            op.per_step = op.node in self.step_nodes
        self.bucket_gradients(rp)
        self.bucket_piece_collectives(rp)
        rp.bytes_sent = sum(op.nbytes for op in rp.ops)
        self.estimate_memory(rp)
        return rp

    def bucket_gradients(self, rp) -> None:
        """Fuse the optimizer phase's gradient all-reduces into buckets, as DDP does: per group of
        ranks and dtype, in the order the compute phase makes the gradients final (the plan order
        of their producers, the same on every rank of the group), consecutive ones up to
        ``bucket_bytes`` (one larger than that is a bucket of its own). A bucket's members carry
        its id (its first member's channel + 1); the runtime runs them as one all-reduce over
        their concatenation once every member's gradient is final."""
        if not self.bucket_bytes:
            return
        grads = set(self.g.grads.values())
        final_at: dict[int, int] = {}  # a per-micro-batch value -> its last producer's place in the plan
        for i, op in enumerate(rp.ops):
            if op.phase != "optimizer" and not op.per_step:
                for v in op.outputs:
                    final_at[v] = i
        sizes = {v.id: (math.prod(v.shape) * np.dtype(v.dtype).itemsize, v.dtype) for v in rp.values}
        streams: dict[tuple, list] = {}
        for i, op in enumerate(rp.ops):
            g = op.inputs[0] if op.inputs else None
            if op.phase == "optimizer" and op.kind == "collective" and op.op == "all_reduce" and g in grads \
                    and g in final_at:
                nbytes, dtype = sizes[g]
                streams.setdefault((tuple(op.group), dtype), []).append((final_at[g], i, nbytes, op))
        for stream in streams.values():
            for members in _fill([(nbytes, op) for _, _, nbytes, op in sorted(stream, key=lambda s: s[:2])],
                                 self.bucket_bytes):
                if len(members) > 1:
                    for op in members:
                        op.bucket = members[0].channel + 1

    def bucket_piece_collectives(self, rp) -> None:
        """Fuse the pieces' collectives into buckets, as FSDP groups parameters into units: per
        phase, group of ranks and dtype, consecutive (in plan order) up to ``bucket_bytes``

        - ``all_gather``s of values held before the piece starts (ZeRO 3's gathers of parameter
          shards, in forward and again in backward): the runtime fires the bucket once per piece,
          one ring all-gather of the concatenation of this rank's flattened shards, and splits the
          result back into each member's output along its own gather axis. A member's ``shards``
          attribute names every group rank's shard shape, so that uneven splits split back.
        - backward ``reduce_scatter``s whose output is a gradient (ZeRO 2 and 3): the bucket fires
          once its last member's input is written, one ring reduce-scatter whose chunk for rank
          ``i`` is the concatenation of every member's chunk ``i``.

        A bucket is sized by the bytes of its members' group-wide values (the gathered outputs,
        the partial sums), the same on every rank of the group, so every rank forms the same
        buckets; its members carry its id (the first member's channel + 1)."""
        if not self.bucket_bytes:
            return
        g = self.g
        nodes = {n.id: n for n in g.nodes}
        held = set(rp.variables.values()) | set(g.constants) | {v for op in rp.ops if op.per_step for v in op.outputs}
        grads = set(g.grads.values())
        sizes = {v.id: (math.prod(v.shape) * np.dtype(v.dtype).itemsize, v.dtype) for v in rp.values}
        streams: dict[tuple, list] = {}
        for op in rp.ops:
            if op.kind != "collective" or op.per_step or op.bucket or op.phase not in ("forward", "backward"):
                continue
            if op.op == "all_gather" and op.inputs[0] in held and op.inputs[0] == nodes[op.node].inputs[0]:
                nbytes, dtype = sizes[op.outputs[0]]
            elif op.op == "reduce_scatter" and op.phase == "backward" and op.outputs[0] in grads:
                nbytes, dtype = sizes[op.inputs[0]]
            else:
                continue
            streams.setdefault((op.phase, op.op, tuple(op.group), dtype), []).append((nbytes, op))
        for stream in streams.values():
            for members in _fill(stream, self.bucket_bytes):
                if len(members) < 2:
                    continue
                for op in members:
                    op.bucket = members[0].channel + 1
                    if op.op == "all_gather":
                        src = g.values[op.inputs[0]]
                        attrs = decode_attrs(op.attrs)
                        attrs["shards"] = tuple(self.local(src, q) for q in op.group)
                        op.attrs = encode_attrs(attrs)

    def lower_op(self, n: Node, r: int, rp, declare) -> None:
        g = self.g
        outs = [g.values[o] for o in n.outputs]
        if not self.lives_on(outs[0], r):
            return
        ins = [g.values[i] for i in n.inputs]
        lowered = OPS[n.op].lower is not None and outs[0].placement is not None
        attrs = self.op_attrs(n, r) if lowered else self.remember(n.id, lambda: encode_attrs(n.attr))
        for vid in n.inputs + n.outputs:
            declare(vid)
        rp.ops.append(plan_pb2.Op(id=next(self.op_ids), node=n.id, kind="compute", op=n.op, inputs=n.inputs,
                                  outputs=n.outputs, attrs=attrs, phase=n.phase))
        if lowered:
            p = outs[0].placement
            self.vary(rp, "attrs", n, p, tuple(k for k in range(p.ndim) if any(
                v.sbp is not None and isinstance(v.sbp[k], Split) for v in ins + outs)), lambda q: self.op_attrs(n, q))

    def op_attrs(self, n: Node, r: int) -> str:
        """The encoded attributes of op node ``n`` as its lower rule sets them for rank ``r``'s shard."""
        ins, outs = [self.g.values[i] for i in n.inputs], [self.g.values[o] for o in n.outputs]
        p = outs[0].placement
        shard = shard_of([v.spec for v in ins], [v.sbp for v in ins], [v.spec for v in outs], [v.sbp for v in outs],
                         p.mesh, p.coords(r))
        return encode_attrs(OPS[n.op].lower(n.attr, shard))

    def lower_boxing(self, n: Node, r: int, rp, declare) -> None:
        g = self.g
        src, dst = g.values[n.inputs[0]], g.values[n.outputs[0]]
        plan = n.attr.get("plan")
        if plan is None:  # the driver lays a local value out: each rank takes its shard
            if self.lives_on(dst, r):
                declare(n.inputs[0], src.shape, src.dtype)
                declare(n.outputs[0])
                rp.ops.append(plan_pb2.Op(id=next(self.op_ids), node=n.id, kind="local", op="take_shard",
                                          inputs=n.inputs, outputs=n.outputs, phase=n.phase,
                                          attrs=self.take_shard_attrs(dst, r)))
                self.vary(rp, "attrs", n, dst.placement, tuple(range(dst.placement.ndim)),
                          lambda q: self.take_shard_attrs(dst, q))
            return
        if src.placement != dst.placement:
            self.lower_move(n, plan, r, rp, declare)
            return
        if not self.lives_on(src, r):
            return
        p: Placement = src.placement
        current = n.inputs[0]
        declare(current)
        state = list(src.sbp)
        for i, step in enumerate(plan.steps):
            last = i == len(plan.steps) - 1
            k = step.mesh_axis
            whole = tuple(B if j == k else v for j, v in enumerate(state))  # what the mesh axis's group shares
            group_shape = local_shape(src.shape, whole, p.mesh, p.coords(r))
            state[k] = step.dst
            out = n.outputs[0] if last else next(self.value_ids)
            if not last:
                declare(out, local_shape(src.shape, tuple(state), p.mesh, p.coords(r)), src.dtype, fmt(tuple(state)),
                        p.type)
            else:
                declare(out)
            attrs = {"src": repr(step.src), "dst": repr(step.dst), "mesh_axis": k}
            if step.kind in ("slice", "zeros"):
                attrs.update(parts=p.mesh[k], index=p.coords(r)[k], group_shape=group_shape)
                rp.ops.append(plan_pb2.Op(id=next(self.op_ids), node=n.id, kind="local", op=step.kind, inputs=[current],
                                          outputs=[out], attrs=encode_attrs(attrs), phase=n.phase))
                self.vary(rp, "index", p, k)
            else:
                group = p.group(r, along=step.mesh_axis)
                n_groups = p.size // len(group)
                node_size = self.node_size(p, k)
                if node_size > 1:  # the hierarchical schedules: within each node, then along the rails
                    attrs["node_size"] = node_size
                rp.ops.append(plan_pb2.Op(
                    id=next(self.op_ids), node=n.id, kind="collective", op=step.kind, inputs=[current], outputs=[out],
                    attrs=encode_attrs(attrs), phase=n.phase, group=list(group),
                    channel=self.channel((n.id, i, group)), nbytes=step.nbytes // (n_groups * len(group))))
                self.vary(rp, "group", p, step.mesh_axis, (n.id, i))
            current = out
        if not plan.steps:  # nothing to do: the output is the input
            rp.ops.append(plan_pb2.Op(id=next(self.op_ids), node=n.id, kind="local", op="identity", inputs=[current],
                                      outputs=n.outputs, phase=n.phase))
            declare(n.outputs[0])

    def node_size(self, p: Placement, k: int) -> int:
        """How many consecutive members of every group along mesh axis ``k`` of ``p`` share a
        node (ranks ``devices_per_node`` at a time): the collectives' ``node_size``, when every
        group has the same two-level shape (whole runs of that many per node, each node once);
        else 1, the flat rings."""
        key = (p, k)
        if key not in self.node_sizes:
            sizes = set()
            for group in p.groups(k):
                nodes = [m // self.devices_per_node for m in group]
                runs = [len(list(run)) for _, run in itertools.groupby(nodes)]
                sizes.add(runs[0] if len(set(runs)) == 1 and len(runs) == len(set(nodes)) else 1)
            size = sizes.pop() if len(sizes) == 1 else 1
            self.node_sizes[key] = size if 1 < size < p.mesh[k] else 1
        return self.node_sizes[key]

    def take_shard_attrs(self, dst: Value, r: int) -> str:
        box = shard_box(dst.shape, dst.sbp, dst.placement.mesh, dst.placement.coords(r))
        holds = holds_value(dst.sbp, dst.placement.coords(r))
        return encode_attrs({"box": tuple(tuple(x) for x in box), "holds": holds})

    def lower_move(self, n: Node, plan, r: int, rp, declare) -> None:
        g = self.g
        src, dst = g.values[n.inputs[0]], g.values[n.outputs[0]]
        if self.lives_on(src, r):
            declare(n.inputs[0])
        if self.lives_on(dst, r):
            declare(n.outputs[0])
        itemsize = src.dtype.itemsize
        writes = 0
        for j, (i, t) in enumerate(self.transfers_of(n, r)):  # in plan order
            nbytes = math.prod(b - a for a, b in t.box) * itemsize
            common = dict(node=n.id, attrs=self.move_attrs(n, t, r), phase=n.phase, channel=self.channel((n.id, i)))
            if t.src == r and t.dst == r:
                writes += 1
                rp.ops.append(plan_pb2.Op(id=next(self.op_ids), kind="local", op="copy_region", inputs=n.inputs,
                                          outputs=n.outputs, **common))
            elif t.src == r:
                rp.ops.append(plan_pb2.Op(id=next(self.op_ids), kind="send", op="send", peer=t.dst, nbytes=nbytes,
                                          inputs=n.outputs if t.relay else n.inputs, **common))
            else:
                writes += 1
                rp.ops.append(plan_pb2.Op(id=next(self.op_ids), kind="recv", op="recv", peer=t.src, outputs=n.outputs,
                                          **common))
            self.vary(rp, "move", n, j)
        if self.lives_on(dst, r) and not writes:  # a partial sum this rank holds none of: zeros
            rp.ops.append(plan_pb2.Op(id=next(self.op_ids), node=n.id, kind="local", op="fill_zeros",
                                      outputs=n.outputs, phase=n.phase))

    # -------------------------------------------------------------------------------- memory
    def low_copies(self, rp) -> dict[int, int]:
        """Under a precision policy, per variable of this rank: the low-precision copy a step
        computes with (its per-step cast, or the per-step gather of that cast under ZeRO 1/2)."""
        if self.g.precision == "fp32":
            return {}
        variables = set(rp.variables.values())
        copy: dict[int, int] = {}  # value -> the variable it is a per-step low-precision copy of
        out: dict[int, int] = {}
        for op in rp.ops:
            if not op.per_step or len(op.inputs) != 1:
                continue
            src = op.inputs[0]
            if op.op == "astype" and src in variables:
                copy[op.outputs[0]] = src
            elif op.kind in ("collective", "local") and src in copy:  # its gather (and the slices of one)
                copy[op.outputs[0]] = copy[src]
            else:
                continue
            out[copy[op.outputs[0]]] = op.outputs[0]
        return out

    def estimate_memory(self, rp) -> None:
        sizes = {v.id: math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in rp.values}
        params = sum(sizes[v] for v in rp.variables.values())
        # the gradient buffers: what is accumulated over micro-batches (the shard under ZeRO 2 and 3)
        updated = [op for op in rp.ops if op.kind == "update"]
        variables = dict(rp.variables)
        grads = sum(sizes.get(self.g.grads.get(variables[decode_attrs(op.attrs)["variable"]], -1), 0) for op in updated)
        # optimizer state: each array the update op keeps (the node's "state") is the size of what it updates
        state = sum(len(decode_attrs(op.attrs)["state"]) * sizes[op.inputs[0]] for op in updated)
        # the gradient buffers are counted above, not again among the activations
        persistent = set(rp.variables.values()) | set(self.g.constants) | set(self.g.grads.values())
        copies = self.low_copies(rp)
        if copies:  # a low precision: the weights are the per-step copies, the variables the float32 masters
            masters = sum(sizes[v] for v in copies)
            params, state = params - masters + sum(sizes[c] for c in copies.values()), state + masters
            persistent |= set(copies.values())
        last_use: dict[int, int] = {}
        for i, op in enumerate(rp.ops):
            for v in op.inputs:
                last_use[v] = i
        alive: set[int] = set(rp.inputs)
        live, peak = sum(sizes[v] for v in alive), 0
        for i, op in enumerate(rp.ops):
            if op.kind == "update" or op.op == "assign":
                continue
            for v in op.outputs:
                if v not in persistent and v not in alive:
                    alive.add(v)
                    live += sizes[v]
            peak = max(peak, live)
            for v in list(alive):
                if last_use.get(v, -1) <= i:
                    alive.discard(v)
                    live -= sizes[v]
        # A pipeline stage holds the forward values its backward pass reads for every micro-batch
        # in flight (up to its registers): the walk above saw one.
        in_flight = min(self.registers_on(rp.rank), max(1, self.g.micro_batches))
        if in_flight > 1:
            made_in = {v: op.phase for op in rp.ops for v in op.outputs}
            kept = {v for op in rp.ops if op.phase == "backward" for v in op.inputs
                    if made_in.get(v) == "forward" and v not in persistent}
            peak += (in_flight - 1) * sum(sizes[v] for v in kept)
        rp.memory.CopyFrom(plan_pb2.Memory(parameters=params, gradients=grads, optimizer_state=state, peak_activations=peak))


@dataclass
class Template:
    """A rank's lowered plan standing for ``ranks`` (its first is the one lowered), with what
    differs between them: ``holes`` ((op index, kind, data) of rank-dependent fields),
    ``new_values`` (indices in ``plan.values`` of values boxing made up) and ``made_ids`` ((op
    index, output?, position) of their uses), ``buckets`` ((op, first member op) indices)."""

    plan: Any
    ranks: list[int]
    holes: list = field(repr=False)
    new_values: list[int] = field(repr=False)
    made_ids: list[tuple] = field(repr=False)
    buckets: list[tuple[int, int]] = field(repr=False)

    @property
    def rank(self) -> int:
        return self.ranks[0]


def _with(attrs: str, **changes) -> str:
    return encode_attrs({**decode_attrs(attrs), **changes})


def _fill(stream: list[tuple[int, Any]], cap: int) -> list[list]:
    """``stream``'s ops ((bytes, op) in order) cut into consecutive buckets of at most ``cap``
    bytes (an op larger than the cap alone)."""
    buckets: list[list] = [[]]
    filled = 0
    for nbytes, op in stream:
        if buckets[-1] and filled + nbytes > cap:
            buckets.append([])
            filled = 0
        buckets[-1].append(op)
        filled += nbytes
    return buckets


def lower(g: Graph, registers: int = 1, bucket_bytes: int = BUCKET_BYTES, devices_per_node: int = 1) -> plan_pb2.Plan:
    """One physical plan per rank of a compiled (SBP-inferred, boxed) graph. ``registers`` is
    the register count of every per-micro-batch value: more than one lets the next micro-batch
    enter an op while the last is still downstream. ``bucket_bytes`` caps the gradient
    all-reduces fused into one, and the pieces' parameter all-gathers and gradient
    reduce-scatters fused into one (0: each alone). With ``devices_per_node`` > 1 (ranks
    numbered node by node), a collective whose group spans nodes in equal runs carries
    ``node_size``: it runs the hierarchical schedules of ``comm.algorithms`` (within each node,
    then along each rank's rail between nodes; the pieces' fused buckets stay flat rings). A
    graph with ``cuda`` placements gets every rank's NCCL order (``RankPlan.comm_order``, from
    :func:`scheduler.nccl_order.attach`)."""
    if not g.boxed:
        raise ValueError("lower: the graph has not been through the passes (insert_boxing) yet")
    plan = _Lowering(g, registers, bucket_bytes, devices_per_node).lower()
    if any(v.placement is not None and v.placement.type == "cuda" for v in g.values.values()):
        attach_order(plan)  # NCCL matches calls by order: fix one for every device
    return plan


def lower_templates(g: Graph, registers: int = 1, bucket_bytes: int = BUCKET_BYTES,
                    devices_per_node: int = 1) -> list[Template]:
    """Every distinct rank's plan once: one :class:`Template` per class of ranks whose plans
    differ only by their coordinates (rank numbers in groups and peers, shard indices and
    offsets, ids), with the ranks it stands for. ``lower`` instantiates every rank from them."""
    if not g.boxed:
        raise ValueError("lower_templates: the graph has not been through the passes (insert_boxing) yet")
    return _Lowering(g, registers, bucket_bytes, devices_per_node).templates()

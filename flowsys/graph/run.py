"""Running a compiled graph on the local backend: the single controller executes every node
over the shards it holds (op nodes under their signature, boxing nodes through the planner
and ``comm``, update nodes through the optimizer's update op), micro-batch by micro-batch."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from flowsys import functions as _functions
from flowsys.global_tensor import GlobalValue, make_global, run_signature
from flowsys.graph.ir import Graph, GraphError, Node
from flowsys.ops import OPS
from flowsys.planformat import SeedRef
from flowsys.sbp import broadcast


class Executor:
    def __init__(self, g: Graph, params_by_name: dict, optimizers: Sequence, n_seeds: int):
        self.g, self.params, self.optimizers, self.n_seeds = g, params_by_name, list(optimizers), n_seeds
        self.plan = None  # the per-rank plans, lowered on first use by the "plans" executor
        self.registers, self.key = None, None
        self.compute = [n for n in g.nodes if n.phase != "optimizer"]
        self.updates = [n for n in g.nodes if n.phase == "optimizer"]  # boxing, update and assign nodes

    def run(self, inputs: Sequence[Any]) -> list:
        g, k = self.g, self.g.micro_batches
        base: dict[int, Any] = dict(g.constants)
        for name, vid in g.variables.items():
            base[vid] = self.params[name]._data
        if g.loss_scale is not None:  # per step, not per micro-batch (the last input)
            base[g.loss_scale] = inputs[-1]
            inputs = inputs[:-1]
        micro = [_slices(x, k) for x in inputs]
        grads: dict[int, Any] = {}
        outputs: list[list] = [[] for _ in g.outputs]
        for i in range(k):
            env = dict(base)
            for vid, pieces in zip(g.inputs, micro):
                env[vid] = pieces[i]
            seeds = {SeedRef(j): _functions.next_seed() for j in range(self.n_seeds)}
            for n in self.compute:
                self._run_node(n, env, seeds)
            for var, gv in g.grads.items():
                grads[var] = env[gv] if var not in grads else _add(grads[var], env[gv])
            for out, vid in zip(outputs, g.outputs):
                if vid in env:  # (one the optimizer phase makes is taken after it)
                    out.append(env[vid])
        # The optimizer phase runs once per step on the accumulated gradients: the boxing of each
        # gradient into its variable's layout (data parallelism's all-reduce), then the update.
        env = dict(base)
        for var, gv in g.grads.items():
            env[gv] = grads[var] if k == 1 else _scale(grads[var], 1.0 / k)
        for n in self.updates:
            if n.kind == "update":
                self._update(n, env)
            elif n.kind == "assign":  # ZeRO: the gathered updated shards written into the variable
                var, new = env[n.inputs[0]], env[n.inputs[1]]
                if type(var) is GlobalValue:
                    for dst, src in zip(var.shards, new.shards):
                        dst[...] = src
                else:
                    var[...] = new
                env[n.outputs[0]] = var
            else:
                self._run_node(n, env, {})
        for out, vid in zip(outputs, g.outputs):
            if not out:
                out.append(env[vid])
        return [_mean(vals) for vals in outputs]

    def _update(self, n: Node, env: dict) -> None:
        """Update the value in ``n``'s first input in place, shard by shard (the variable itself,
        or under ZeRO 1/2 its shard along the data-parallel axis), with the optimizer state of
        that shard; the gradient arrives in the same layout."""
        a = n.attr
        opt = self.optimizers[a["optimizer"]]
        target = env[n.inputs[0]]
        env[n.outputs[0]] = target
        if len(n.inputs) > 2 and not _finite(env[n.inputs[2]]):  # fp16: a gradient overflowed; skip the step
            return
        opt.update_value(id(self.params[a["variable"]]), target, env[n.inputs[1]], opt.param_groups[a["group"]])
        env[n.outputs[0]] = target

    def _run_node(self, n: Node, env: dict, seeds: dict) -> None:
        ins = [env[i] for i in n.inputs]
        if n.kind == "op":
            op = OPS[n.op]
            attrs = {key: seeds[v] if isinstance(v, SeedRef) else v for key, v in n.attrs}
            values = [self.g.values[o] for o in n.outputs]
            if n.sig is not None:
                specs = tuple(v.spec for v in values)
                outs = run_signature(op, ins, attrs, n.sig, specs)
            else:
                out = op.kernel(np, *ins, **attrs)
                outs = [np.asarray(o) for o in (out if op.multi_output else (out,))]
                outs = [o if o.dtype == v.dtype else o.astype(v.dtype) for o, v in zip(outs, values)]
        elif n.kind == "boxing":
            out = self.g.values[n.outputs[0]]
            if n.op == "distribute":
                outs = [make_global(np.asarray(ins[0]), out.placement, out.sbp)]
            else:
                outs = [ins[0].with_layout(out.placement, out.sbp)]
        else:
            raise GraphError(f"node {n.id}: a {n.kind} node among the compute nodes")
        for o, v in zip(n.outputs, outs):
            env[o] = v


def _slices(x, k: int) -> list:
    if k == 1:
        return [x]
    if type(x) is GlobalValue:
        logical = x.logical()
        m = logical.shape[0] // k
        return [make_global(logical[i * m:(i + 1) * m], x.placement, x.sbp) for i in range(k)]
    m = x.shape[0] // k
    return [x[i * m:(i + 1) * m] for i in range(k)]


def _add(a, b):
    if type(a) is GlobalValue:
        b = b.with_layout(a.placement, a.sbp)
        return GlobalValue(a.placement, a.sbp, a.shape, a.dtype, [x + y for x, y in zip(a.shards, b.shards)])
    return a + b


def _scale(a, c: float):
    if type(a) is GlobalValue:
        return GlobalValue(a.placement, a.sbp, a.shape, a.dtype, [(x * c).astype(a.dtype) for x in a.shards])
    return (a * c).astype(a.dtype)


def _mean(vals: list):
    if len(vals) == 1:
        return vals[0]
    if type(vals[0]) is GlobalValue:
        v = vals[0]
        logical = sum(x.logical() for x in vals) / len(vals)
        return make_global(logical.astype(v.dtype), v.placement, broadcast)
    return np.asarray(sum(vals) / len(vals)).astype(vals[0].dtype)


def _finite(value) -> bool:
    shards = value.shards if type(value) is GlobalValue else (value,)
    return all(bool(np.isfinite(np.asarray(s)).all()) for s in shards)

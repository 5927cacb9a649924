"""The local backend: one thread per rank, each interpreting its ``RankPlan`` op by op and
talking to the others only through ``comm``'s in-process communicators, exactly as workers on
separate machines would over gRPC. A rank that fails is reported by rank; a rank waiting on a
dead peer times out naming it instead of hanging."""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np

from comm import CommError, InProcessHub
from flowsys.layout import bounds
from flowsys.ops import OPS
from flowsys.sbp import Broadcast, parse
from scheduler.lower import SeedMarker, decode_attrs


class RankFailed(RuntimeError):
    def __init__(self, rank: int, error: BaseException):
        super().__init__(f"rank {rank} failed: {type(error).__name__}: {error}")
        self.rank, self.error = rank, error


def run_plans(plan, feed: Callable[[int], dict[int, Any]], grads: dict[int, int], updates: Callable,
              seeds: Sequence[int], outputs: Sequence[int] = (), timeout: float = 60.0) -> dict[int, list]:
    """Run every rank's plan; return each rank's local ``outputs`` (averaged over micro-batches).

    ``feed(rank)`` gives the rank's local inputs, variables and constants; ``grads`` maps each
    trained variable to its gradient value (accumulated over micro-batches); ``updates(rank,
    op, variable_array, grad_array)`` applies an update op.
    """
    ranks = [rp.rank for rp in plan.ranks]
    index = {r: i for i, r in enumerate(ranks)}
    hub = InProcessHub(len(ranks), timeout=timeout)
    results: dict[int, dict[int, Any]] = {}
    errors: dict[int, BaseException] = {}

    def main(rp) -> None:
        try:
            worker = _Worker(rp, hub.communicator(index[rp.rank]), index, seeds)
            results[rp.rank] = worker.run(feed(rp.rank), plan.micro_batches, grads, updates, outputs)
        except BaseException as err:  # reported by rank below
            errors[rp.rank] = err

    threads = [threading.Thread(target=main, args=(rp,), name=f"flowsys-rank-{rp.rank}") for rp in plan.ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5.0)
    stuck = [r for r, t in zip(ranks, threads) if t.is_alive()]
    if stuck:
        raise RankFailed(stuck[0], TimeoutError(f"ranks {stuck} did not finish"))
    if errors:  # the root cause: a rank that failed by itself, not one that timed out waiting for it
        causes = [r for r, e in errors.items() if not isinstance(e, CommError)] or list(errors)
        rank = min(causes)
        raise RankFailed(rank, errors[rank]) from errors[rank]
    return results


class _Worker:
    def __init__(self, rp, comm, index: dict[int, int], seeds):
        self.rp, self.comm, self.index, self.seeds = rp, comm, index, seeds
        self.decls = {v.id: (tuple(v.shape), np.dtype(v.dtype)) for v in rp.values}
        self.attrs = {op.id: decode_attrs(op.attrs) for op in rp.ops}

    def run(self, fed: dict[int, Any], micro_batches: int, grads: dict[int, int], updates: Callable,
            outputs: Sequence[int]) -> list:
        compute = [op for op in self.rp.ops if op.phase != "optimizer"]
        optimizer = [op for op in self.rp.ops if op.phase == "optimizer"]
        inputs = set(self.rp.inputs)
        acc: dict[int, Any] = {}
        env: dict[int, Any] = {}
        outs: list = [None] * len(outputs)
        for i in range(micro_batches):
            env = {vid: (_micro(a, i, micro_batches) if vid in inputs else a) for vid, a in fed.items()}
            for op in compute:
                self.step(op, env)
            for j, vid in enumerate(outputs):
                if vid in env:
                    outs[j] = env[vid] / micro_batches if outs[j] is None else outs[j] + env[vid] / micro_batches
            for var, g in grads.items():
                if g in env:
                    acc[var] = env[g] if var not in acc else acc[var] + env[g]
        for var, g in grads.items():
            if var in acc:
                env[g] = acc[var] if micro_batches == 1 else (acc[var] / micro_batches).astype(acc[var].dtype)
        for op in optimizer:
            if op.kind == "update":
                updates(self.rp.rank, op, env[op.inputs[0]], env[op.inputs[1]])
            else:
                self.step(op, env)
        return [o if o is None else np.asarray(o).astype(self.decls[vid][1]) for o, vid in zip(outs, outputs)]

    def step(self, op, env: dict) -> None:
        a = self.attrs[op.id]
        if op.kind == "compute":
            kernel_attrs = {k: self.seeds[v] if isinstance(v, SeedMarker) else v for k, v in a.items()}
            spec = OPS[op.op]
            out = spec.kernel(np, *(env[i] for i in op.inputs), **kernel_attrs)
            for vid, o in zip(op.outputs, out if spec.multi_output else (out,)):
                dtype = self.decls[vid][1]
                o = np.asarray(o)
                env[vid] = o if o.dtype == dtype else o.astype(dtype)
        elif op.kind == "collective":
            self.collective(op, a, env)
        elif op.kind in ("send", "recv") or op.op == "copy_region":
            self.transfer(op, a, env)
        elif op.op == "slice":
            x, dst = env[op.inputs[0]], parse(a["dst"])
            lo, hi = bounds(x.shape[dst.axis], a["parts"], a["index"])
            env[op.outputs[0]] = np.array(x[(slice(None),) * dst.axis + (slice(lo, hi),)])
        elif op.op == "zeros":
            x, src = env[op.inputs[0]], parse(a["src"])
            if isinstance(src, Broadcast):
                env[op.outputs[0]] = x if a["index"] == 0 else np.zeros_like(x)
            else:
                z = np.zeros(a["group_shape"], dtype=x.dtype)
                lo, hi = bounds(a["group_shape"][src.axis], a["parts"], a["index"])
                z[(slice(None),) * src.axis + (slice(lo, hi),)] = x
                env[op.outputs[0]] = z
        elif op.op == "take_shard":
            full = np.asarray(env[op.inputs[0]])
            piece = full[tuple(slice(lo, hi) for lo, hi in a["box"])]
            env[op.outputs[0]] = np.array(piece) if a["holds"] else np.zeros_like(piece)
        elif op.op == "identity":
            env[op.outputs[0]] = env[op.inputs[0]]
        else:
            raise RuntimeError(f"rank {self.rp.rank}: unknown op {op.kind}/{op.op}")

    def collective(self, op, a: dict, env: dict) -> None:
        x = env[op.inputs[0]]
        group = [self.index[r] for r in op.group]
        src, dst = parse(a["src"]), parse(a["dst"])
        if op.op == "all_reduce":
            out = self.comm.all_reduce(x, group=group)
        elif op.op == "all_gather":
            out = self.comm.all_gather(x, axis=src.axis, group=group)
        elif op.op == "reduce_scatter":
            out = self.comm.reduce_scatter(x, axis=dst.axis, group=group)
        elif op.op == "all_to_all":
            out = self.comm.all_to_all(x, split_axis=dst.axis, concat_axis=src.axis, group=group)
        else:
            raise RuntimeError(f"rank {self.rp.rank}: unknown collective {op.op}")
        env[op.outputs[0]] = out

    def transfer(self, op, a: dict, env: dict) -> None:
        box = a["box"]

        def region(origin):
            return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, origin))

        if op.kind == "send":
            x = env[op.inputs[0]]
            self.comm.send(x if a["relay"] else x[region(a["src_origin"])], self.index[op.peer])
            return
        out = op.outputs[0]
        if out not in env:
            shape, dtype = self.decls[out]
            env[out] = np.zeros(shape, dtype=dtype)
        if op.kind == "recv":
            data = self.comm.recv(self.index[op.peer])
            if a["relay"]:
                env[out][...] = data
            else:
                env[out][region(a["dst_origin"])] += data
        else:  # copy_region: a piece that stays on this rank
            env[out][region(a["dst_origin"])] += env[op.inputs[0]][region(a["src_origin"])]


def _micro(a: np.ndarray, i: int, k: int) -> np.ndarray:
    if k == 1:
        return a
    m = a.shape[0] // k
    return a[i * m:(i + 1) * m]

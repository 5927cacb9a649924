"""``fs.Graph``: OneFlow's ``nn.Graph`` style. Subclass it, assign modules, ``add_optimizer``,
write ``build()``; the first call traces and compiles, later calls with the same input
shapes, dtypes and layouts reuse the compiled graph.

>>> import flowsys as fs
>>> from flowsys import nn, optim
>>> class Step(fs.Graph):
...     def __init__(self, model, opt):
...         super().__init__()
...         self.model = model
...         self.add_optimizer(opt)
...     def build(self, x, y):
...         loss = ((self.model(x) - y) ** 2).mean()
...         loss.backward()
...         return loss
>>> model = nn.Linear(3, 1)
>>> step = Step(model, optim.SGD(model.parameters(), lr=0.1))
>>> float(step(fs.ones(4, 3), fs.zeros(4, 1))) >= 0.0
True
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any

from flowsys.global_tensor import GlobalValue
from flowsys.graph import passes as _passes
from flowsys.graph.ir import GraphError
from flowsys.graph.run import Executor
from flowsys.graph.trace import trace
from flowsys.nn.module import Module
from flowsys.tensor import Tensor


@dataclass
class GraphConfig:
    gradient_accumulation_steps: int = 1
    # "auto": the backend fs.init chose, else "global"; "global": the driver runs the global IR
    # over the shards it holds; "plans": every rank runs its lowered plan as actors on the
    # backend fs.init chose (the local backend when none was)
    executor: str = "auto"
    # registers per edge of the per-rank plans: more than one lets the next micro-batch enter an
    # op while the last is still downstream (pipelining, with back-pressure)
    registers: int = 1
    # keep the actor timeline of the last step (Graph.timeline)
    record_timeline: bool = False
    # ZeRO: 1 shards optimizer state, 2 also gradients, 3 also parameters, along the mesh axis
    # the inputs are split S(0) along (the data-parallel axis)
    zero_stage: int = 0


class Graph:
    """A training (or inference) step compiled from ``build()``."""

    def __init__(self) -> None:
        self.config = GraphConfig()
        self._optimizers: list = []
        self._compiled: dict[Any, tuple] = {}
        self._last = None
        self._key_last = None
        self.timeline: list = []  # actor firings of the last step run as per-rank plans (config.record_timeline)

    def add_optimizer(self, optimizer) -> None:
        self._optimizers.append(optimizer)

    def build(self, *args):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must define build()")

    # --------------------------------------------------------------------------------- calls
    def _parameters(self) -> dict[str, Any]:
        out, seen = {}, set()
        for attr, value in vars(self).items():
            if isinstance(value, Module):
                for name, p in value.named_parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        out[f"{attr}.{name}"] = p
        return out

    @staticmethod
    def _key(args) -> tuple:
        key = []
        for a in args:
            if isinstance(a, Tensor):
                d = a._data
                layout = (d.placement, d.sbp) if type(d) is GlobalValue else None
                key.append((tuple(a.shape), a.dtype, layout))
            else:
                key.append(("python", repr(a)))
        return tuple(key)

    def compile(self, *args):
        """Trace ``build`` for inputs like ``args`` and run the passes (what the first call does)."""
        k = int(self.config.gradient_accumulation_steps)
        stage = int(self.config.zero_stage)
        if stage not in (0, 1, 2, 3):
            raise GraphError(f"config.zero_stage must be 0, 1, 2 or 3, got {self.config.zero_stage!r}")
        key = self._key(args) + (k, stage)
        if key not in self._compiled:
            params = self._parameters()
            owned = {id(p) for p in params.values()}
            for opt in self._optimizers:
                for group in opt.param_groups:
                    for p in group["params"]:
                        if id(p) not in owned:
                            raise GraphError(f"{type(self).__name__}: an optimizer trains a parameter of shape {p.shape} "
                                             f"that no module of this graph holds; assign the model to the graph "
                                             f"(self.model = model)")
            axis = self._shard_parameters(args) if stage == 3 else None
            stages = self._stages()
            micro = [_micro_input(a, k) for a in args]
            ir, n_seeds = trace(self.build, micro, params)
            ir = _passes.compile_graph(ir.with_(zero_axis=axis, stages=stages), params_by_name=params, optimizers=self._optimizers,
                                       micro_batches=k, zero_stage=stage)
            self._compiled[key] = (ir, Executor(ir, params, self._optimizers, n_seeds))
        self._last = self._compiled[key][0]
        return self._last

    def _stages(self) -> tuple:
        """The pipeline stages of the graph's modules, checked: (stage, ranks) in stage order."""
        found: dict[int, Any] = {}
        for value in vars(self).values():
            if isinstance(value, Module):
                for stage, placement in value.stages().items():
                    if found.setdefault(stage, placement) != placement:
                        raise GraphError(f"pipeline stage {stage} is set on two placements, {found[stage]!r} and "
                                         f"{placement!r}; give each stage one placement")
        stages = sorted(found.items())
        for i, (s1, p1) in enumerate(stages):
            for s2, p2 in stages[i + 1:]:
                shared = sorted(set(p1.ranks) & set(p2.ranks))
                if shared:
                    raise GraphError(f"pipeline stages {s1} (ranks {list(p1.ranks)}) and {s2} (ranks {list(p2.ranks)}) "
                                     f"overlap on ranks {shared}; give every stage its own devices")
        if stages and [s for s, _ in stages] != list(range(len(stages))):
            raise GraphError(f"pipeline stages must be numbered 0..{len(stages) - 1}, got {[s for s, _ in stages]}")
        return tuple((s, tuple(p.ranks)) for s, p in stages)

    def _shard_parameters(self, args) -> int:
        """ZeRO stage 3: lay every trained parameter out split along the data-parallel axis, in
        place (once; later compiles find them split)."""
        trained = {id(p): p for opt in self._optimizers for group in opt.param_groups for p in group["params"]}
        if getattr(self, "_zero_axis", None) is None:
            inputs = [a._data for a in args if isinstance(a, Tensor) and type(a._data) is GlobalValue]
            self._zero_axis = _passes.zero_axis(inputs, [p._data for p in trained.values()])
            if self._zero_axis is None or any(type(p._data) is not GlobalValue for p in trained.values()):
                raise GraphError(
                    f"{type(self).__name__}: zero_stage=3 needs a data-parallel mesh axis: inputs split S(0) along a "
                    f"mesh axis every trained parameter is broadcast along (e.g. batch sbp (S(0), B) with parameters "
                    f"(B, ...)); got inputs laid out {[getattr(a._data, 'sbp', None) for a in args if isinstance(a, Tensor)]}")
            for p in trained.values():
                d = p._data
                p._data = d.with_layout(d.placement, _passes.zero_shard(d, self._zero_axis))
        return self._zero_axis

    def __call__(self, *args):
        ir = self.compile(*args)
        k = int(self.config.gradient_accumulation_steps)
        self._key_last = self._key(args) + (k, int(self.config.zero_stage))
        _, executor = self._compiled[self._key_last]
        tensors = [a._data for a in args if isinstance(a, Tensor)]
        from flowsys import runtime  # noqa: PLC0415
        from flowsys.profiler import active  # noqa: PLC0415

        mode = self.config.executor
        if mode not in ("auto", "global", "plans"):
            raise GraphError(f"config.executor must be 'auto', 'global' or 'plans', got {mode!r}")
        backend = runtime.current()
        prof = active()
        if mode == "plans" or (mode == "auto" and (backend is not None or prof is not None)):
            record = bool(self.config.record_timeline) or prof is not None
            values, self.timeline = _run_plans(ir, executor, tensors, backend or runtime.local_backend(),
                                               int(self.config.registers), record)
            if prof is not None:
                prof.add(type(self).__name__, self.timeline, {n.id: n.op for n in ir.nodes if n.kind == "boxing"})
            outs = [Tensor(v) for v in values]
        else:
            outs = [Tensor(v) for v in executor.run(tensors)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    @property
    def in_flight(self) -> dict[int, int]:
        """Per rank, the most micro-batches that held activations at once in the last step run
        as per-rank plans (a pipeline stage's in-flight micro-batches)."""
        k = self._key_last
        return dict(getattr(self._compiled[k][1], "in_flight", {})) if k in self._compiled else {}

    def plan(self):
        """The per-rank physical plans (a protobuf ``scheduler.Plan``) of the last call."""
        import scheduler  # noqa: PLC0415

        return scheduler.lower(self.ir, registers=int(self.config.registers))

    # ------------------------------------------------------------------------------- reports
    @property
    def ir(self):
        """The compiled IR of the last call."""
        if self._last is None:
            raise GraphError(f"{type(self).__name__}: call the graph (or .compile(...)) before inspecting it")
        return self._last

    def explain(self) -> str:
        """Every op with its SBPs, every inserted boxing op with the bytes it moves, and the
        plan's memory per rank (parameters, gradients, optimizer state, peak activations)."""
        from flowsys.graph.explain import explain, memory_table  # noqa: PLC0415

        return explain(self.ir) + "\n" + memory_table(self.plan())

    def to_dot(self) -> str:
        from flowsys.graph.explain import to_dot  # noqa: PLC0415

        return to_dot(self.ir)


def _run_plans(ir, executor: Executor, tensors, backend, registers: int, record: bool) -> tuple[list, list]:
    """Lower to per-rank plans and run one step on ``backend``; the outputs and, when
    ``record``, the actor timeline."""
    import json  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    import scheduler  # noqa: PLC0415
    from actors.runtime import Timeline  # noqa: PLC0415
    from actors.worker import decode, encode  # noqa: PLC0415
    from flowsys.functions import next_seed  # noqa: PLC0415
    from scheduler import plan_pb2  # noqa: PLC0415

    if executor.plan is None or executor.registers != registers:
        executor.plan = scheduler.lower(ir, registers=registers)
        executor.registers = registers
        executor.key = f"plan-{next(_PLAN_KEYS)}"
    params, optimizers = executor.params, executor.optimizers
    sources = {**dict(zip(ir.inputs, tensors)), **ir.constants}
    variables = {vid: params[name]._data for name, vid in ir.variables.items()}
    var_keys = {name: str(_uid(params[name])) for name in ir.variables}
    trainer = {id(p): oi for oi, opt in enumerate(optimizers) for group in opt.param_groups for p in group["params"]}
    hyper = json.dumps({
        "groups": [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
                   for opt in optimizers],
        "state_keys": {name: f"{_uid(optimizers[trainer[id(p)]])}/{_uid(p)}"
                       for name, p in params.items() if id(p) in trainer},
        "variable_keys": var_keys,
    })
    k = ir.micro_batches
    seeds = [next_seed() for _ in range(executor.n_seeds * k)]  # piece by piece, as the global executor draws them

    def local(value, rank):
        return value.local(rank) if type(value) is GlobalValue else value

    requests = {}
    for rp in executor.plan.ranks:
        declared = {v.id for v in rp.values}
        req = plan_pb2.StepRequest(plan=executor.key, hyper=hyper, seeds=seeds, seeds_per_piece=executor.n_seeds,
                                   grads=dict(ir.grads), outputs=list(ir.outputs), record=record, micro_batches=k)
        req.feed.extend(encode(vid, np.asarray(local(v, rp.rank))) for vid, v in sources.items() if vid in declared)
        # parameters stay in the workers between steps: sent only when the driver's copy differs
        # from what the worker holds (the first step, a new layout, a user's change)
        for name, vid in rp.variables.items():
            held = backend.synced.get((rp.rank, var_keys[name]))
            mine = np.asarray(local(variables[vid], rp.rank))
            if held is None or held.shape != mine.shape or held.dtype != mine.dtype or not np.array_equal(held, mine):
                req.feed.append(encode(vid, mine))
                backend.synced[(rp.rank, var_keys[name])] = mine.copy()
        requests[rp.rank] = req.SerializeToString()
    backend.ensure(max(rp.rank for rp in executor.plan.ranks) + 1)
    for opt in optimizers:
        if getattr(opt, "_state_in_workers", None) is backend and opt._state_generation != backend.generation \
                and _stateful(opt):
            raise GraphError(f"{type(opt).__name__}: the optimizer state the workers kept was lost when they were "
                             f"restarted after a failure; load a checkpoint (fs.checkpoint.load) to go on")
        if getattr(opt, "_state_in_workers", None) is not backend and opt.state:
            layouts = {id(params[n.attr["variable"]]): (ir.values[n.inputs[0]].placement, ir.values[n.inputs[0]].sbp)
                       for n in ir.nodes if n.kind == "update"}
            push_state(opt, backend, params, layouts)  # state the driver holds (eager steps, a loaded checkpoint)
    responses = backend.run(executor.key, executor.plan, requests)
    for opt in optimizers:  # their state now lives in the workers: checkpoint.save pulls it from there
        opt._state_in_workers = backend
        opt._state_params = params
        opt._state_generation = backend.generation

    # the updated parameters come back into the driver's tensors, shard by shard
    by_vid = {vid: name for name, vid in ir.variables.items()}
    for rank, resp in responses.items():
        for t in resp.variables:
            name = by_vid[t.id]
            data = params[name]._data
            target = data.shards[data.placement.index(rank)] if type(data) is GlobalValue else data
            new = decode(t)
            target[...] = new
            backend.synced[(rank, var_keys[name])] = new
    outs = []
    for j, vid in enumerate(ir.outputs):
        v = ir.values[vid]
        got = {rank: decode(t) for rank, resp in responses.items() for t in resp.outputs if t.id == j}
        if v.placement is None:
            outs.append(got[min(got)])
        else:
            outs.append(GlobalValue(v.placement, v.sbp, v.shape, v.dtype, [got[r] for r in v.placement.ranks]))
    timeline = Timeline(executor.plan, {rank: resp.timeline for rank, resp in responses.items()}) if record else []
    executor.in_flight = {rank: resp.peak_in_flight for rank, resp in responses.items()}
    return outs, timeline


def _stateful(opt) -> bool:
    """Whether ``opt`` keeps state between steps (AdamW's moments, SGD's momentum)."""
    return type(opt).__name__ != "SGD" or any(g.get("momentum", 0) for g in opt.param_groups)


def _state_keys(opt, params: dict) -> dict[str, Any]:
    """The workers' key of each parameter ``opt`` trains -> the parameter."""
    trained = {id(p) for group in opt.param_groups for p in group["params"]}
    return {f"{_uid(opt)}/{_uid(p)}": p for p in params.values() if id(p) in trained}


def pull_state(opt) -> None:
    """Copy the optimizer state the workers keep into ``opt.state`` (laid out as the driver's
    executor keeps it: per parameter, per shard index), e.g. for a checkpoint."""
    import numpy as np  # noqa: PLC0415

    from actors.worker import decode  # noqa: PLC0415

    backend = getattr(opt, "_state_in_workers", None)
    if backend is None:
        return
    keys = _state_keys(opt, opt._state_params)
    dumps = backend.get_state(sorted(keys))
    opt.state.clear()
    for rank, dump in sorted(dumps.items()):
        for e in dump.entries:
            p = keys[e.key]
            value = decode(e.value)
            value = value.item() if value.ndim == 0 else value
            if type(p._data) is GlobalValue:
                if rank not in p._data.placement.ranks:
                    continue
                shard = opt.state.setdefault(id(p), {}).setdefault(p._data.placement.index(rank), {})
            else:
                shard = opt.state.setdefault(id(p), {})
            shard[e.field] = value if np.ndim(value) == 0 else np.array(value)


def push_state(opt, backend, params: dict, layouts: dict | None = None) -> None:
    """Give the workers ``opt.state`` (the driver's copy) for the parameters it trains; state
    still logical (loaded from a checkpoint) is laid out as ``layouts[id(param)]`` (the layout
    its update runs in: the parameter's, or a ZeRO shard)."""
    from flowsys.checkpoint import LOGICAL, lay_out_state  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from actors.worker import encode  # noqa: PLC0415
    from scheduler import plan_pb2  # noqa: PLC0415

    keys = _state_keys(opt, params)
    placed = [r for p in keys.values() if type(p._data) is GlobalValue for r in p._data.placement.ranks]
    backend.ensure(max(placed, default=0) + 1)  # (fresh workers after a restart hold nothing yet)
    dumps: dict[int, Any] = {}
    ranks = range(backend.world)
    for key, p in keys.items():
        state = opt.state.get(id(p))
        if not state:
            continue
        if LOGICAL in state and type(p._data) is GlobalValue:
            placement, sbp = (layouts or {}).get(id(p), (p._data.placement, p._data.sbp))
            state = opt.state[id(p)] = lay_out_state(state, placement, sbp)
        if type(p._data) is GlobalValue:
            per_rank = {r: state.get(p._data.placement.index(r), {}) for r in p._data.placement.ranks}
        else:
            per_rank = {r: state for r in ranks}
        for r, fields in per_rank.items():
            dump = dumps.setdefault(r, plan_pb2.StateDump())
            for field, value in sorted(fields.items()):
                dump.entries.append(plan_pb2.StateEntry(key=key, field=field, value=encode(0, np.asarray(value))))
    backend.set_state({r: d.SerializeToString() for r, d in dumps.items()}, sorted(keys))
    opt._state_in_workers = backend
    opt._state_params = params
    opt._state_generation = backend.generation


_PLAN_KEYS = itertools.count()
_UIDS: dict[int, int] = {}
_NEXT_UID = itertools.count()


def _uid(obj) -> int:
    """A number for ``obj`` that is never reused (ids are), forgotten when ``obj`` dies."""
    key = id(obj)
    if key not in _UIDS:
        _UIDS[key] = next(_NEXT_UID)
        weakref.finalize(obj, _UIDS.pop, key, None)
    return _UIDS[key]


def _micro_input(a, k: int):
    """A stand-in for tracing: ``a`` with axis 0 divided by the number of micro-batches."""
    if k == 1 or not isinstance(a, Tensor):
        return a
    if not a.shape or a.shape[0] % k:
        raise GraphError(f"gradient_accumulation_steps={k}: an input of shape {a.shape} does not split into "
                         f"{k} equal micro-batches along axis 0")
    return a[: a.shape[0] // k].detach() if not a.is_global else Tensor(_head(a._data, a.shape[0] // k))


def _head(v: GlobalValue, m: int) -> GlobalValue:
    from flowsys.global_tensor import make_global  # noqa: PLC0415

    if v.shards is None:  # a meta value: the layout of the first m rows, no values
        return GlobalValue(v.placement, v.sbp, (m,) + tuple(v.shape[1:]), v.dtype, None)
    return make_global(v.logical()[:m], v.placement, v.sbp)

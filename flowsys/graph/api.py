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
    # "global": the single controller runs the global IR; "plans": every rank runs its own
    # lowered plan in a thread over the in-process transport (the local backend)
    executor: str = "global"


class Graph:
    """A training (or inference) step compiled from ``build()``."""

    def __init__(self) -> None:
        self.config = GraphConfig()
        self._optimizers: list = []
        self._compiled: dict[Any, tuple] = {}
        self._last = None

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
        key = self._key(args) + (k,)
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
            micro = [_micro_input(a, k) for a in args]
            ir, n_seeds = trace(self.build, micro, params)
            ir = _passes.compile_graph(ir, params_by_name=params, optimizers=self._optimizers, micro_batches=k)
            self._compiled[key] = (ir, Executor(ir, params, self._optimizers, n_seeds))
        self._last = self._compiled[key][0]
        return self._last

    def __call__(self, *args):
        ir = self.compile(*args)
        k = int(self.config.gradient_accumulation_steps)
        _, executor = self._compiled[self._key(args) + (k,)]
        tensors = [a._data for a in args if isinstance(a, Tensor)]
        if self.config.executor == "plans":
            outs = [Tensor(v) for v in _run_plans(ir, executor, tensors)]
        elif self.config.executor == "global":
            outs = [Tensor(v) for v in executor.run(tensors)]
        else:
            raise GraphError(f"config.executor must be 'global' or 'plans', got {self.config.executor!r}")
        return outs[0] if len(outs) == 1 else tuple(outs)

    def plan(self):
        """The per-rank physical plans (a protobuf ``scheduler.Plan``) of the last call."""
        import scheduler  # noqa: PLC0415

        return scheduler.lower(self.ir)

    # ------------------------------------------------------------------------------- reports
    @property
    def ir(self):
        """The compiled IR of the last call."""
        if self._last is None:
            raise GraphError(f"{type(self).__name__}: call the graph (or .compile(...)) before inspecting it")
        return self._last

    def explain(self) -> str:
        from flowsys.graph.explain import explain  # noqa: PLC0415

        return explain(self.ir)

    def to_dot(self) -> str:
        from flowsys.graph.explain import to_dot  # noqa: PLC0415

        return to_dot(self.ir)


def _run_plans(ir, executor: Executor, tensors) -> list:
    """Lower to per-rank plans and run them on the local backend (one thread per rank)."""
    import numpy as np  # noqa: PLC0415

    import scheduler  # noqa: PLC0415
    from actors.local import run_plans  # noqa: PLC0415
    from flowsys.functions import next_seed  # noqa: PLC0415

    if executor.plan is None:
        executor.plan = scheduler.lower(ir)
    params, optimizers = executor.params, executor.optimizers
    fed_global = dict(zip(ir.inputs, tensors))
    sources = {**fed_global, **ir.constants, **{vid: params[name]._data for name, vid in ir.variables.items()}}

    def local(value, rank):
        return value.local(rank) if type(value) is GlobalValue else value

    def feed(rank):
        rp = next(p for p in executor.plan.ranks if p.rank == rank)
        declared = {v.id for v in rp.values}
        return {vid: local(v, rank) for vid, v in sources.items() if vid in declared}

    def update(rank, op, var, grad):
        a = scheduler.decode_attrs(op.attrs)
        opt = optimizers[a["optimizer"]]
        param = params[a["variable"]]
        state = opt.state.setdefault(id(param), {})
        if type(param._data) is GlobalValue:
            state = state.setdefault(param._data.placement.index(rank), {})
        opt._update(var, grad, state, opt.param_groups[a["group"]])

    # drawn piece by piece, as the global executor draws them
    seeds = [[next_seed() for _ in range(executor.n_seeds)] for _ in range(ir.micro_batches)]
    results = run_plans(executor.plan, feed, ir.grads, update, seeds, outputs=ir.outputs)
    outs = []
    for j, vid in enumerate(ir.outputs):
        v = ir.values[vid]
        if v.placement is None:
            outs.append(np.asarray(results[min(results)][j]))
        else:
            shards = [results[r][j] for r in v.placement.ranks]
            outs.append(GlobalValue(v.placement, v.sbp, v.shape, v.dtype, shards))
    return outs


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

    return make_global(v.logical()[:m], v.placement, v.sbp)

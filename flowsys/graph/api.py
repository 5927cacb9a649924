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

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowsys.global_tensor import GlobalValue, make_global
from flowsys.graph import passes as _passes
from flowsys.graph.ir import GraphError
from flowsys.graph.run import Executor
from flowsys.graph.trace import trace
from flowsys.nn.module import Module
from flowsys.precision import LossScaler, low_dtype, precision_name, suspended
from flowsys.runtime import Session
from flowsys.tensor import Tensor, stored


@dataclass
class GraphConfig:
    gradient_accumulation_steps: int = 1
    # "auto" (= "plans"): every rank runs its lowered plan as actors on the backend fs.init
    # chose, or on worker threads of this process when none was: the one way a graph runs;
    # "global": the driver interprets the global IR over the shards it holds (graph/run.py, the
    # single-controller simulation), kept as a reference the tests check the runtime against
    executor: str = "auto"
    # registers per edge of the per-rank plans: more than one lets the next micro-batch enter an
    # op while the last is still downstream (pipelining, with back-pressure)
    registers: int = 1
    # keep the actor timeline of the last step (Graph.timeline)
    record_timeline: bool = False
    # ZeRO: 1 shards optimizer state, 2 also gradients, 3 also parameters, along the mesh axis
    # the inputs are split S(0) along (the data-parallel axis)
    zero_stage: int = 0
    # gradient all-reduces fused into one collective up to this many bytes, started while
    # backward runs (DDP's bucket_cap_mb; scheduler.lower's bucket_bytes; 0: one per gradient)
    bucket_bytes: int = 25 * 2**20
    # ranks per node (numbered node by node): a collective whose group spans nodes runs the
    # hierarchical schedules, within each node and then along each rank's rail (1: flat rings)
    devices_per_node: int = 1
    # clip the gradients to this global L2 norm before the updates (torch's clip_grad_norm_ with
    # max_norm; 0: off): the norm over every gradient shard, replicated ones counted once
    grad_clip: float = 0.0
    # the compute dtype (flowsys.precision): "fp32", "bf16" or "fp16". Matmuls and the activations
    # they save in the low dtype, losses and softmax/layer norm reductions in float32, fp32 master
    # weights and optimizer state; fp16 also scales the loss (Graph.loss_scaler)
    precision: str = "fp32"
    # the dtype gradients are reduced across ranks in: None (float32, Megatron's main grads) or
    # the low dtype ("bf16" / "fp16", half the bytes, per micro-batch)
    grad_reduce_dtype: str | None = None
    # skip the update of a step whose gradients hold an inf or NaN (the in-plan "all finite"
    # test fp16 uses, for any precision): parameters and optimizer state stay as they were
    # (Graph.last_step_skipped); off, such a step updates as asked
    skip_nonfinite: bool = False
    # chains of elementwise ops run as one generated kernel (the fusion pass, flowsys.graph.fuse)
    fuse: bool = True


class Graph:
    """A training (or inference) step compiled from ``build()``."""

    def __init__(self) -> None:
        self.config = GraphConfig()
        self._optimizers: list = []
        self._compiled: dict[Any, tuple] = {}
        self._last = None
        self._key_last = None
        self.last_grad_norm: float | None = None  # the global gradient norm before clipping (config.grad_clip)
        # fp16: the dynamic loss scale (made on the first fp16 compile; set one to change its rules)
        self.loss_scaler = None
        self.last_step_skipped = False  # the last step's update was skipped for a non-finite gradient
        self.skipped_steps = 0  # such steps, in all (fp16's overflows and config.skip_nonfinite's)
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
        clip = float(self.config.grad_clip)
        if not clip >= 0:
            raise GraphError(f"config.grad_clip must be >= 0 (0: no clipping), got {self.config.grad_clip!r}")
        precision = precision_name(self.config.precision)
        reduce_in = self.config.grad_reduce_dtype
        if reduce_in is not None and reduce_in not in ("fp32", precision) and low_dtype(reduce_in) != low_dtype(precision):
            raise GraphError(f"config.grad_reduce_dtype is None or 'fp32' (float32 gradients) or the compute dtype "
                             f"{precision!r}; got {reduce_in!r}")
        reduce_low = reduce_in is not None and low_dtype(reduce_in) is not None
        skip = bool(self.config.skip_nonfinite)
        fuse = bool(self.config.fuse)
        key = self._compiled_key = self._key(args) + (k, stage, clip, precision, reduce_low, skip, fuse)
        if precision == "fp16" and self.loss_scaler is None:
            self.loss_scaler = LossScaler()
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
            # ZeRO 3 keeps the parameters sharded; so do ZeRO 1 and 2 under a low precision, whose
            # variables are the float32 masters (sharded like the optimizer state, as in the ZeRO
            # paper) while the low-precision copy is gathered once per step
            sharded = stage == 3 or (stage in (1, 2) and precision != "fp32")
            axis = self._shard_parameters(args) if sharded else None
            stages = self._stages()
            micro = [_micro_input(a, k) for a in args]
            ir, n_seeds = trace(self.build, micro, params, precision=precision, loss_scaling=precision == "fp16")
            with suspended():  # the compiler's own ops follow the traced dtypes, whatever autocast is around
                ir = _passes.compile_graph(ir.with_(zero_axis=axis, stages=stages), params_by_name=params,
                                           optimizers=self._optimizers, micro_batches=k, zero_stage=stage,
                                           grad_clip=clip, grad_reduce_low=reduce_low, skip_nonfinite=skip,
                                           fuse=fuse)
            self._compiled[key] = (ir, Executor(ir, params, self._optimizers, n_seeds),
                                   Session(ir, params, self._optimizers, n_seeds))
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
            variables = [stored(p) for p in trained.values()]
            self._zero_axis = _passes.zero_axis(inputs, variables)
            if self._zero_axis is None and all(type(v) is GlobalValue for v in variables) \
                    and _passes.nothing_to_shard(inputs, variables):
                return None  # tensor parallelism alone: a data-parallel group of one holds all of it
            if self._zero_axis is None or any(type(v) is not GlobalValue for v in variables):
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
        self._key_last = self._compiled_key  # (the step the reports below describe)
        _, executor, session = self._compiled[self._key_last]
        tensors = [a._data for a in args if isinstance(a, Tensor)]
        scale = None
        if ir.loss_scale is not None:  # fp16: this step's loss scale, laid out as the loss
            scale = self.loss_scaler.scale
            v = ir.values[ir.loss_scale]
            tensors.append(make_global(np.array(scale, np.float32), v.placement, v.sbp) if v.placement is not None
                           else np.array(scale, np.float32))
        from flowsys import runtime  # noqa: PLC0415
        from flowsys.profiler import active  # noqa: PLC0415

        mode = self.config.executor
        if mode not in ("auto", "global", "plans"):
            raise GraphError(f"config.executor must be 'auto', 'global' or 'plans', got {mode!r}")
        backend = runtime.current()
        prof = active()
        if mode != "global":  # one runtime: per-rank plans on the backend (worker threads here by default)
            record = bool(self.config.record_timeline) or prof is not None
            values, self.timeline = session.run(tensors, backend or runtime.local_backend(),
                                                int(self.config.registers), record, int(self.config.bucket_bytes),
                                                int(self.config.devices_per_node))
            if prof is not None:
                prof.add(type(self).__name__, self.timeline, {n.id: n.op for n in ir.nodes if n.kind == "boxing"})
            outs = [Tensor(v) for v in values]
        else:
            outs = [Tensor(v) for v in executor.run(tensors)]
        if ir.norm_output:  # clipping, loss scaling or skipping: the squared norm came last
            total = float(outs.pop().numpy())
            finite = math.isfinite(total)
            self.last_grad_norm = math.sqrt(total) / (scale or 1.0) if finite else math.inf
            skipping = scale is not None or bool(self.config.skip_nonfinite)
            self.last_step_skipped = skipping and not finite  # the workers left every update out
            self.skipped_steps += self.last_step_skipped
            if scale is not None:
                self.loss_scaler.update(finite)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @property
    def in_flight(self) -> dict[int, int]:
        """Per rank, the most micro-batches that held activations at once in the last step run
        as per-rank plans (a pipeline stage's in-flight micro-batches)."""
        k = self._key_last
        return dict(self._compiled[k][2].in_flight) if k in self._compiled else {}

    @property
    def samples_digest(self) -> dict[int, int]:
        """Per input of the last step that the workers read themselves (``Batches.at`` with a
        placement), by position: the sum of its samples' first tokens, computed where the samples
        are (a fingerprint of what the step saw; the driver never holds the batch)."""
        k = self._key_last
        if k not in self._compiled:
            return {}
        ir, _, session = self._compiled[k]
        return {ir.inputs.index(vid): d for vid, d in session.digests.items()}

    @property
    def traffic(self) -> dict[int, tuple[int, int]]:
        """Per rank: the bytes of the last step's request to its worker and of its response
        (the actor timeline aside), as they crossed the backend's boundary."""
        k = self._key_last
        return dict(self._compiled[k][2].traffic) if k in self._compiled else {}

    def plan(self):
        """The per-rank physical plans (a protobuf ``flowsys.planformat.Plan``) of the last call."""
        import scheduler  # noqa: PLC0415

        return scheduler.lower(self.ir, registers=int(self.config.registers), bucket_bytes=int(self.config.bucket_bytes),
                               devices_per_node=int(self.config.devices_per_node))

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

    if v._shards is None:  # a meta value, or one the workers read: the layout of the first m rows
        return GlobalValue(v.placement, v.sbp, (m,) + tuple(v.shape[1:]), v.dtype, None)
    return make_global(v.logical()[:m], v.placement, v.sbp)

"""``fs.init(backend=...)``: where compiled graphs run.

- ``fs.init(backend="local")``, or no ``fs.init`` at all: every rank's plan runs as
  register-based actors in a worker thread of this process, over the in-process transport;
- ``fs.init(backend="ray", address=None)``: every rank's plan runs in a Ray actor of its own
  (one per device, spread over the nodes), over gRPC.

``flowsys launch`` calls ``fs.init(backend="ray", address=...)`` for the script it runs.

>>> import flowsys as fs
>>> fs.init(backend="local").name
'local'
>>> fs.shutdown()
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import threading
import weakref
from typing import Any

import numpy as np

import scheduler
from scheduler.nccl_order import attach, check_plan
from actors.runtime import Timeline
from actors.worker import decode, encode
from flowsys.errors import ConfigError
from flowsys.functions import next_seed
from flowsys.global_tensor import GlobalValue
from flowsys.graph.ir import GraphError
from flowsys.keys import uid
from flowsys.layout import shard_box
from flowsys.ops.registry import dtype_text
from flowsys.optim.state import push_state, stateful
from flowsys.planformat import plan_pb2
from flowsys.tensor import store, stored

_backend = None


def init(backend: str | None = None, *, address: str | None = None, timeout: float = 30.0, **ray_kwargs: Any):
    """Choose the backend compiled graphs run on; returns it. ``timeout`` (seconds) bounds how
    long a rank waits for a peer before the step fails naming it. ``backend`` defaults to the
    ``FLOWSYS_BACKEND`` environment variable (set by ``flowsys launch``), else ``"local"``."""
    global _backend
    backend = backend or os.environ.get("FLOWSYS_BACKEND", "local")
    address = address or os.environ.get("FLOWSYS_ADDRESS") or None
    if timeout <= 0:
        raise ConfigError(f"fs.init: timeout must be positive seconds, got {timeout}")
    shutdown()
    if backend == "local":
        if ray_kwargs or address:
            raise ConfigError("fs.init(backend='local') takes no address or Ray options")
        from actors.backends import LocalBackend  # noqa: PLC0415

        _backend = LocalBackend(timeout=timeout)
    elif backend == "ray":
        from actors.backends import RayBackend  # noqa: PLC0415

        _backend = RayBackend(address=address, timeout=timeout, **ray_kwargs)
    else:
        raise ConfigError(f"fs.init: backend must be 'local' or 'ray', got {backend!r}")
    global _exit_hook
    if not _exit_hook:  # a script that never calls fs.shutdown() still exits cleanly
        try:  # before the interpreter joins thread pools (the transport's servers), unlike atexit
            threading._register_atexit(shutdown)
        except (AttributeError, RuntimeError):
            atexit.register(shutdown)
        _exit_hook = True
    return _backend


def shutdown() -> None:
    """Stop the backend's workers (a Ray cluster this process joined stays up)."""
    global _backend
    if _backend is not None:
        _backend.shutdown()
    _backend = None


def current():
    """The backend ``fs.init`` chose, or None (graphs run on :func:`local_backend`). Under
    ``flowsys launch`` (``FLOWSYS_BACKEND=ray``) the first call joins the launched cluster."""
    if _backend is None and os.environ.get("FLOWSYS_BACKEND") == "ray":
        return init()
    return _backend


def local_backend():
    """The backend graphs run on when ``fs.init`` chose none: worker threads of this process."""
    global _default_local
    if _default_local is None:
        from actors.backends import LocalBackend  # noqa: PLC0415

        _default_local = LocalBackend()
    return _default_local


_default_local = None
_exit_hook = False


def fix_nccl_order(plan) -> None:
    """Fix every rank's NCCL order in ``plan`` where it has none (lowering fixes it for ``cuda``
    placements; a backend may run any plan on an ordered transport) and check it: an order NCCL
    would hang on fails here, naming the ranks and events."""
    if not any(rp.comm_order for rp in plan.ranks):
        attach(plan)
    check_plan(plan)


# ------------------------------------------------------------------------ the controller
class Home:
    """The workers of one backend as the home of parameter values: after a step, every
    parameter the step's plans hold lives here, and the driver's copy is stale. Reading any of
    them pulls them all at once (one call per rank); setting one forgets it here."""

    def __init__(self, backend):
        self.backend, self.generation = backend, backend.generation
        self.params: dict[str, weakref.ref] = {}  # the driver's key -> parameter

    def adopt(self, p, key: str) -> None:
        if p._home is not None and p._home is not self:
            p._home.params.pop(_key_of(p), None)
        self.params[key] = weakref.ref(p)
        p._home = self

    def forget(self, p) -> None:
        self.params.pop(_key_of(p), None)
        p._home = None

    def pull(self, p=None) -> None:
        """Bring every parameter homed here back into the driver's tensors (``p`` among them)."""
        live = {key: q for key, ref in self.params.items() if (q := ref()) is not None}
        if self.generation != self.backend.generation:  # they stay lost until new values are set
            what = f"a parameter of shape {p.shape}" if p is not None else f"{len(live)} parameters"
            raise GraphError(f"the values of {what} lived in the workers of the "
                             f"{self.backend.name} backend, which were restarted after a failure; load a checkpoint "
                             f"(fs.checkpoint.load) or a state dict to go on")
        self.params.clear()
        for q in live.values():
            q._home = None
        got: dict[str, dict[int, Any]] = {}
        for rank, dump in self.backend.get_params(sorted(live)).items():
            for e in dump.entries:
                got.setdefault(e.key, {})[rank] = decode(e.value)
        for key, q in live.items():
            d, values = stored(q), got.get(key, {})
            if type(d) is GlobalValue:
                missing = [r for r in d.placement.ranks if r not in values]
                if missing:
                    raise GraphError(f"ranks {missing} hold no values of a parameter of shape {q.shape}")
                d.shards = [values[r] for r in d.placement.ranks]
            elif values:
                if type(d) is np.ndarray and d.shape == values[min(values)].shape:
                    d[...] = values[min(values)]
                else:
                    store(q, values[min(values)])
            for rank, v in values.items():  # what the workers hold, to see later whether the driver changed it
                self.backend.synced[(rank, key)] = v.copy()


def _key_of(p) -> str:
    return str(uid(p))


def home(backend) -> Home:
    """The backend's home of parameter values (a fresh one after its workers restarted)."""
    h = getattr(backend, "home", None)
    if h is None or h.generation != backend.generation:
        h = backend.home = Home(backend)
    return h


class Session:
    """A compiled graph as the controller runs it: lowered to per-rank plans once, then each
    step a small request per rank (step number, seeds, hyper-parameters, where to read the
    batch), and back the step's outputs. Parameters, gradients and optimizer state stay in the
    workers; the driver sends a parameter only when the workers lack it or the user changed it
    (created by the worker itself from its initialiser when the driver holds no values)."""

    def __init__(self, ir, params: dict, optimizers: list, n_seeds: int):
        self.ir, self.params, self.optimizers, self.n_seeds = ir, params, optimizers, n_seeds
        self.plan = None
        self.declared: dict[int, dict[int, tuple]] = {}
        self.registers = None
        self.key = None
        self.order_checked = None  # (plan key, backend, its workers' generation) whose NCCL need was settled
        self.in_flight: dict[int, int] = {}
        self.digests: dict[int, int] = {}  # per input read by the workers: the sum of its samples' first tokens
        self.traffic: dict[int, tuple[int, int]] = {}  # per rank: bytes sent to it and back, last step

    def lower(self, registers: int, bucket_bytes: int, devices_per_node: int = 1):
        if self.plan is None or self.registers != (registers, bucket_bytes, devices_per_node):
            self.plan = scheduler.lower(self.ir, registers=registers, bucket_bytes=bucket_bytes,
                                        devices_per_node=devices_per_node)
            self.registers = (registers, bucket_bytes, devices_per_node)
            # per rank, the local shape of every value its plan declares (read by every request)
            self.declared = {rp.rank: {v.id: tuple(v.shape) for v in rp.values} for rp in self.plan.ranks}
            self.key = f"plan-{next(_PLAN_KEYS)}"
        return self.plan

    def run(self, tensors: list, backend, registers: int, record: bool, bucket_bytes: int,
            devices_per_node: int = 1) -> tuple[list, list]:
        """One step on ``backend``: the outputs and, when ``record``, the actor timeline."""
        ir, params, optimizers = self.ir, self.params, self.optimizers
        plan = self.lower(registers, bucket_bytes, devices_per_node)
        backend.ensure(max(rp.rank for rp in plan.ranks) + 1)
        k = ir.micro_batches
        seeds = [next_seed() for _ in range(self.n_seeds * k)]  # piece by piece, as the global executor draws them
        hyper = json.dumps({"groups": [[{key: v for key, v in group.items() if key != "params"}
                                         for group in opt.param_groups] for opt in optimizers]})
        requests = {rp.rank: self._request(rp, tensors, backend, hyper, seeds, record) for rp in plan.ranks}
        self._check_state(backend)
        stamp = (self.key, id(backend), backend.generation)  # once per plan and set of workers
        if self.order_checked != stamp:
            if backend.wants_order(plan):
                fix_nccl_order(plan)
            self.order_checked = stamp
        responses = backend.run(self.key, plan, requests)
        for opt in optimizers:  # their state now lives in the workers: checkpoint.save pulls it from there
            opt._state_in_workers = backend
            opt._state_params = params
            opt._state_generation = backend.generation
        h = home(backend)
        for name in ir.variables:  # the workers now hold the newest values
            p = params[name]
            for rp in plan.ranks:
                backend.synced.pop((rp.rank, _key_of(p)), None)
            h.adopt(p, _key_of(p))
        self.traffic = {r: (len(requests[r]), resp.ByteSize() - len(resp.timeline)) for r, resp in responses.items()}
        self.digests = {}
        seen: set = set()
        for resp in responses.values():
            for d in resp.digests:
                if (d.id, d.row_start, d.row_stop) not in seen:
                    seen.add((d.id, d.row_start, d.row_stop))
                    self.digests[d.id] = self.digests.get(d.id, 0) + d.first_sum
        outs = []
        for j, vid in enumerate(ir.outputs):
            v = ir.values[vid]
            got = {rank: decode(t) for rank, resp in responses.items() for t in resp.outputs if t.id == j}
            if v.placement is None:
                outs.append(got[min(got)])
            else:
                outs.append(GlobalValue(v.placement, v.sbp, v.shape, v.dtype, [got[r] for r in v.placement.ranks]))
        timeline = Timeline(plan, {rank: resp.timeline for rank, resp in responses.items()}) if record else []
        self.in_flight = {rank: resp.peak_in_flight for rank, resp in responses.items()}
        return outs, timeline

    def _request(self, rp, tensors: list, backend, hyper: str, seeds: list, record: bool) -> bytes:
        """Rank ``rp.rank``'s request: what it cannot make or read itself."""
        ir, r = self.ir, rp.rank
        req = plan_pb2.StepRequest(plan=self.key, hyper=hyper, seeds=seeds, seeds_per_piece=self.n_seeds,
                                   grads=dict(ir.grads), outputs=list(ir.outputs), record=record,
                                   micro_batches=ir.micro_batches)
        declared = self.declared[r]
        if not backend.loaded(r, self.key):  # the plan's first step on this worker
            trainer = {id(p): oi for oi, opt in enumerate(self.optimizers) for g in opt.param_groups for p in g["params"]}
            req.static = json.dumps({
                "state_keys": {name: f"{uid(self.optimizers[trainer[id(p)]])}/{uid(p)}"
                               for name, p in self.params.items() if id(p) in trainer},
                "variable_keys": {name: _key_of(self.params[name]) for name in ir.variables}})
            req.constants.extend(encode(vid, np.asarray(_local(c, r))) for vid, c in ir.constants.items()
                                 if vid in declared)
        for vid, t in zip(ir.inputs, tensors):
            if vid not in declared:
                continue
            if type(t) is GlobalValue and t._shards is None and t.source is not None:  # read by the worker
                box = shard_box(t.shape, t.sbp, t.placement.mesh, t.placement.coords(r))
                req.reads.append(plan_pb2.Read(id=vid, spec=t.source.spec.as_json(), field=t.source.field,
                                               step=t.source.step, start=[a for a, _ in box], stop=[b for _, b in box]))
            else:
                req.feed.append(encode(vid, np.asarray(_local(t, r))))
        for name, vid in rp.variables.items():
            p = self.params[name]
            key = _key_of(p)
            held = backend.synced.get((r, key))
            if p._home is home(backend) and backend.holds.get((r, key)) == declared[vid]:
                continue  # the worker holds the newest values
            d = stored(p)
            if type(d) is GlobalValue and d._shards is None:  # no values here: the worker makes them
                if p.init is None:
                    raise _no_values(name, p)
                box = shard_box(d.shape, d.sbp, d.placement.mesh, d.placement.coords(r))
                req.inits.append(plan_pb2.Init(id=vid, spec=json.dumps(p.init.as_dict()), shape=list(d.shape),
                                               dtype=dtype_text(d.dtype), start=[a for a, _ in box], stop=[b for _, b in box]))
            else:
                mine = np.asarray(_local(p._data, r))  # (pulls first if the workers hold newer values)
                if held is not None and held.shape == mine.shape and held.dtype == mine.dtype \
                        and backend.holds.get((r, key)) == declared[vid] and np.array_equal(held, mine):
                    continue  # unchanged since the driver pulled it
                req.feed.append(encode(vid, mine))
            backend.holds[(r, key)] = declared[vid]
        return req.SerializeToString()

    def _check_state(self, backend) -> None:
        """Optimizer state: lost with restarted workers is an error; the driver's (eager steps, a
        loaded checkpoint) goes to the workers before their first update."""
        for opt in self.optimizers:
            if getattr(opt, "_state_in_workers", None) is backend and opt._state_generation != backend.generation \
                    and stateful(opt):
                raise GraphError(f"{type(opt).__name__}: the optimizer state the workers kept was lost when they were "
                                 f"restarted after a failure; load a checkpoint (fs.checkpoint.load) to go on")
            if getattr(opt, "_state_in_workers", None) is not backend and opt.state:
                layouts = {id(self.params[n.attr["variable"]]): (self.ir.values[n.inputs[0]].placement,
                                                                 self.ir.values[n.inputs[0]].sbp)
                           for n in self.ir.nodes if n.kind == "update"}
                push_state(opt, backend, self.params, layouts)


def _local(value, rank: int):

    return value.local(rank) if type(value) is GlobalValue else value


def _no_values(name: str, p):

    return GraphError(f"parameter {name!r} of shape {p.shape} has no values and no initialiser to create them "
                      f"from (built under nn.meta_init() and then replaced?); load a checkpoint or a state dict")


_PLAN_KEYS = itertools.count()

"""The cost model: FLOPs of every op, and a per-rank step time predicted from the plan.

``predict(plan, hardware)`` simulates one training step of a lowered :class:`Plan` the way the
actor runtime runs it, with every firing's duration taken from the hardware spec instead of
measured:

- a compute op takes ``overhead + max(FLOPs / peak, bytes touched / memory bandwidth)`` (a
  roofline per op, plus the runtime's cost per actor firing);
- a send is the sender's copy, and arrives ``latency + bytes / bandwidth`` later on the link
  between the two ranks (intra-node or inter-node); a collective completes when its last member
  has joined plus one ``latency + bytes / bandwidth`` per message of its algorithm, with the
  bytes each rank sends under that algorithm (the plan's ``Op.nbytes``);
- each rank runs one actor at a time, forward work first then the oldest micro-batch, and
  holds at most as many micro-batches as it has registers; per-step ops come before the
  micro-batches, one at a time; the optimizer phase runs in dataflow order with its collectives
  in flight together, each as soon as its gradients are final (a bucket's all-reduces as one),
  while later micro-batches' backward goes on, and the updates writing parameters after the last
  micro-batch, as in ``actors.runtime``. Pipeline bubbles and
  the overlap of communication with compute fall out of the simulation, not a formula;
- where devices share a host's cores (a simulated cluster on one machine), kernels slow down by
  ranks per core, and, for ranks that are threads of one process, the runtime's Python work is
  serialised by the interpreter lock.

The step ends with the driver's fixed cost per step and the bytes it feeds and collects. The
answer also says which resource bounds the step: compute, memory bandwidth, communication,
pipeline idle time, or the runtime's own overhead.

Hardware specs are YAML files (``scheduler/hardware/*.yaml``, or any path): the device's peak
FLOP/s per dtype, memory bandwidth and memory, devices per node, cores per node when devices
are simulated on shared cores, and the intra- and inter-node links. ``probe`` in a spec stands
for a value measured on this machine when the spec is loaded (a GEMM for peak FLOP/s, a copy for
memory bandwidth).
"""

from __future__ import annotations

import heapq
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowsys.errors import ConfigError
from flowsys.planformat import decode_attrs

HARDWARE_DIR = Path(__file__).resolve().parent / "hardware"

# ----------------------------------------------------------------------------------------- FLOPs


def _numel(shape) -> int:
    return int(math.prod(shape))


def op_flops(name: str, ins: list[tuple[int, ...]], outs: list[tuple[int, ...]], attrs: dict | None = None) -> int:
    """Floating-point operations of one op on these shapes (multiply and add count as two).
    Matrix products and attention count exactly; other ops count a few per element."""
    out = _numel(outs[0]) if outs else 0
    if name == "matmul":
        a, b = ins
        k = a[-1] if len(a) >= 1 else 1
        return 2 * out * k if len(a) > 1 or len(b) > 1 else 2 * k
    if name == "linear":  # x @ w.T + b
        return 2 * out * ins[0][-1] + out
    if name in ("linear_grad_input", "linear_grad_weight"):  # every element of g meets in_features
        return 2 * _numel(ins[0]) * outs[0][-1]
    if name in ("scaled_dot_product_attention", "sdpa_probs"):
        q, key = ins[0], ins[1]
        scores = _numel(np.broadcast_shapes(q[:-2], key[:-2])) * q[-2] * key[-2]
        products = 2 if name == "scaled_dot_product_attention" else 1  # q k^T, then (p v)
        return 2 * scores * q[-1] * products + 5 * scores  # + scale, mask, max, exp, normalise
    per_element = {"layer_norm": 8, "layer_norm_grad": 12, "layer_norm_affine": 10, "layer_norm_affine_grad": 16,
                   "gelu": 10, "gelu_grad": 14, "softmax": 5, "softmax_grad": 4, "log_softmax": 5,
                   "log_softmax_grad": 4, "cross_entropy": 6, "cross_entropy_grad": 6,
                   # cross entropy over a split vocabulary: the same work in two ops (max; exp, sum, pick)
                   "vocab_max": 1, "vocab_ce_parts": 5, "vocab_ce_parts_grad": 6, "exp": 1, "log": 1, "tanh": 4, "sqrt": 1, "pow": 2, "dropout": 3}
    if name in per_element:
        return per_element[name] * _numel(ins[0])
    if name in ("sgd_update", "adamw_update"):  # per element: decay, momentum, descent; Adam's moments and sqrt
        return (4 if name == "sgd_update" else 12) * _numel(ins[0])
    if name in ("sum", "max", "min", "argmax"):
        return _numel(ins[0])
    if name == "sum_squares":  # gradient clipping: a multiply and an add per element
        return 2 * _numel(ins[0])
    if name == "clip_scale":  # sqrt, add, divide, min of one scalar
        return 4
    if name in ("add", "sub", "mul", "div", "maximum", "where", "neg", "relu", "eq", "ne", "lt", "le", "gt", "ge"):
        return out
    return 0  # data movement only: reshape, transpose, take, getitem, concatenate, casts, ...


def graph_flops(ir) -> int:
    """Model FLOPs of one step of a compiled graph: every op node on logical shapes, once per
    micro-batch (the optimizer's once). Independent of the layout: the work the model asks for,
    not the work a layout repeats."""
    total = 0
    for n in ir.nodes:
        if n.kind != "op":
            continue
        f = op_flops(n.op, [ir.values[i].shape for i in n.inputs], [ir.values[o].shape for o in n.outputs], n.attr)
        total += f * (1 if n.phase == "optimizer" else ir.micro_batches)
    return total


# -------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Link:
    bandwidth: float       # bytes/s, one direction, per rank
    latency: float         # seconds a message is in flight
    overhead: float = 0.0  # CPU seconds each end spends per message (a transport's own work)


@dataclass(frozen=True)
class Hardware:
    """A hardware spec (see the module docstring and ``scheduler/hardware/``)."""

    name: str
    device: str                      # "cpu" or "cuda"
    peak_flops: dict[str, float]     # per dtype name, FLOP/s
    memory_bandwidth: float          # bytes/s
    memory: float                    # bytes per device
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    op_overhead: float = 2e-5        # seconds of runtime work per actor firing, beyond its kernel
    step_overhead: float = 1e-3      # the driver's fixed cost per step
    rank_overhead: float = 0.0       # ... and its cost per rank it drives
    wire_bandwidth: float = 1e9      # bytes/s at which the driver feeds and collects a step's tensors
    cores_per_node: int | None = None  # set when devices share a node's cores (simulated devices)
    shared_interpreter: bool = False   # devices are threads of one Python process (the local backend)
    kernels: str = "roofline"          # or "measure": time each distinct kernel once on this machine
    kernel_scale: float = 1.0          # measured kernels run this much slower inside a step's firings
    # what n ranks running at once on a node achieve together, in ranks at full speed: a number
    # (the same for every n) or {n: throughput} measured (default: the cores, or 1 under one interpreter)
    parallel_ranks: float | dict[int, float] | None = None
    source: str = ""

    def peak(self, dtype: str = "float32") -> float:
        return self.peak_flops.get(dtype) or self.peak_flops["float32"]

    def link(self, a: int, b: int) -> Link:
        return self.intra_node if a // self.devices_per_node == b // self.devices_per_node else self.inter_node

    def replace(self, **changes: Any) -> Hardware:
        from dataclasses import replace  # noqa: PLC0415

        return replace(self, **changes)


def available() -> list[str]:
    """The hardware specs that ship with flowsys, by name."""
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))


def load_hardware(spec: str | os.PathLike, backend: str | None = None) -> Hardware:
    """A hardware spec by name (``cpu``, ``a100-80g``, ``h100-80g``: see :func:`available`) or
    by path to a YAML file. A spec's ``runtime`` section may give the runtime's costs per
    backend (``local``, ``ray``); ``backend`` picks one (default: ``ray``, else the first)."""
    import yaml  # noqa: PLC0415

    path = Path(spec)
    if not path.suffix and not path.exists():
        path = HARDWARE_DIR / f"{spec}.yaml"
    if not path.exists():
        raise ConfigError(f"hardware spec {os.fspath(spec)!r} not found: give a YAML file or one of {available()}")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        dev, node, links = raw["device"], raw["node"], raw["links"]
        peak = dev["peak_flops"]
        if peak == "probe":
            peak = {"float32": probe_gemm(np.float32), "float64": probe_gemm(np.float64)}
        bandwidth = probe_memory_bandwidth() if dev["memory_bandwidth"] == "probe" else float(dev["memory_bandwidth"])
        memory = _physical_memory() if dev.get("memory") == "probe" else float(dev["memory"])
        cores = node.get("cores")
        cores = os.cpu_count() or 1 if cores == "probe" else cores
        runtime = raw.get("runtime", {}) or {}
        if runtime and all(isinstance(v, dict) for v in runtime.values()):  # per backend
            if backend is not None and backend not in runtime:
                raise ConfigError(f"hardware spec {os.fspath(path)} has runtime costs for {sorted(runtime)}, "
                                  f"not for backend {backend!r}")
            runtime = runtime[backend or ("ray" if "ray" in runtime else next(iter(runtime)))]
        hw = Hardware(
            name=str(raw.get("name", path.stem)), device=str(dev.get("kind", "cpu")),
            peak_flops={k: float(v) for k, v in peak.items()}, memory_bandwidth=bandwidth, memory=memory,
            devices_per_node=int(node["devices"]), cores_per_node=int(cores) if cores else None,
            intra_node=_link(runtime.get("intra_node") or links["intra_node"]),
            inter_node=_link(runtime.get("inter_node") or links["inter_node"]),
            kernel_scale=float(runtime.get("kernel_scale", 1.0)),
            op_overhead=float(runtime.get("op_overhead", 2e-5)), step_overhead=float(runtime.get("step_overhead", 1e-3)),
            rank_overhead=float(runtime.get("rank_overhead", 0.0)),
            wire_bandwidth=float(runtime.get("wire_bandwidth", 1e9)),
            shared_interpreter=bool(runtime.get("shared_interpreter", False)),
            parallel_ranks=_parallel(runtime.get("parallel_ranks")),
            kernels=str(dev.get("kernels", "roofline")), source=os.fspath(path))
        if hw.kernels not in ("roofline", "measure"):
            raise ValueError(f"device.kernels must be roofline or measure, not {hw.kernels!r}")
        return hw
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"hardware spec {os.fspath(path)}: missing or malformed entry ({type(e).__name__}: {e}); "
                          f"see {HARDWARE_DIR / 'a100-80g.yaml'} for the fields") from None


def _link(raw: dict) -> Link:
    return Link(float(raw["bandwidth"]), float(raw["latency"]), float(raw.get("overhead", 0.0)))


def _parallel(value) -> float | dict[int, float] | None:
    if not value:
        return None
    if isinstance(value, dict):
        return {int(k): float(v) for k, v in value.items()}
    return float(value)


_probes: dict[str, float] = {}


def probe_gemm(dtype=np.float32, n: int = 1024, repeats: int = 5) -> float:
    """Peak FLOP/s of a square GEMM on this machine (best of ``repeats``), measured once per process."""
    key = f"gemm-{np.dtype(dtype).name}-{n}"
    if key not in _probes:
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
        a @ b  # warm up the BLAS threads
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        _probes[key] = 2 * n**3 / best
    return _probes[key]


def probe_memory_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Bytes/s read plus written by a large copy (best of ``repeats``), measured once per process."""
    if "memory" not in _probes:
        src = np.ones(nbytes // 8)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
        _probes["memory"] = 2 * nbytes / best
    return _probes["memory"]


_kernel_times: dict[tuple, float] = {}
_MEASURE_LIMIT = 256 << 20  # kernels touching more bytes than this are not timed: the roofline answers


def measure_kernel(name: str, inputs: list[tuple[tuple[int, ...], np.dtype]], attrs: dict) -> float:
    """Seconds one registered op's kernel takes on inputs of these shapes and dtypes on this
    machine (best of five, warm, after a warm-up), measured once per process per distinct call.
    Integer inputs are zeros (valid indices for every gather), floats are normal samples. Inside
    a step kernels run slower (cold caches, fresh outputs): ``Hardware.kernel_scale`` says how
    much, as fitted by ``flowsys.calibrate``."""
    from flowsys.ops import OPS  # noqa: PLC0415
    from flowsys.ops.registry import is_floating  # noqa: PLC0415

    key = (name, tuple((s, d.name) for s, d in inputs), repr(sorted(attrs.items())))
    if key not in _kernel_times:
        rng = np.random.default_rng(0)
        arrays = []
        for shape, dtype in inputs:
            if is_floating(dtype):  # bfloat16 (ml_dtypes, kind "V") included
                arrays.append(rng.standard_normal(shape).astype(dtype))
            elif dtype.kind == "b":
                arrays.append(rng.random(shape) < 0.5)
            else:
                arrays.append(np.zeros(shape, dtype=dtype))
        kernel = OPS[name].kernel
        try:
            kernel(np, *arrays, **attrs)
            _kernel_times[key] = min(_timed(lambda: kernel(np, *arrays, **attrs)) for _ in range(5))
        except Exception:  # noqa: BLE001 - inputs the kernel rejects (data-dependent ops): no time known
            _kernel_times[key] = 0.0
    return _kernel_times[key]


def clear_kernel_times() -> None:
    """Forget every kernel time measured so far (they are measured again when next needed)."""
    _kernel_times.clear()


def measure_collective(name: str, attrs: dict, x: tuple[tuple[int, ...], np.dtype], n: int) -> float:
    """Seconds of one rank's local work in a collective of ``n`` ranks on its input ``x`` (the
    algorithm's copies and reductions), from running every rank's schedule in this thread."""
    from comm.inprocess import drive  # noqa: PLC0415
    from flowsys.boxing import plan_collective  # noqa: PLC0415

    key = ("collective", name, x[0], x[1].str, n, repr(sorted(attrs.items())))
    if key not in _kernel_times:
        arrays = [np.random.default_rng(i).standard_normal(x[0]).astype(x[1]) for i in range(n)]
        try:
            drive([plan_collective(name, attrs, i, n, arrays[i]) for i in range(n)])
            _kernel_times[key] = min(_timed(lambda: drive([plan_collective(name, attrs, i, n, arrays[i])
                                                           for i in range(n)])) for _ in range(3)) / n
        except Exception:  # noqa: BLE001 - an algorithm this probe cannot drive: copies only
            _kernel_times[key] = 2 * _numel(x[0]) * x[1].itemsize / probe_memory_bandwidth()
    return _kernel_times[key]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16.0 * 2**30


# ------------------------------------------------------------------------------------ prediction


@dataclass
class RankCost:
    rank: int
    compute_s: float = 0.0       # time spent in compute and update firings
    memory_bound_s: float = 0.0  # the part of it set by memory bandwidth rather than FLOP/s
    shared_s: float = 0.0        # time its firings were slowed by other ranks on the same cores
    overhead_s: float = 0.0      # runtime work per firing
    comm_s: float = 0.0          # time a rank waited on communication with nothing else to do
    idle_s: float = 0.0          # time with nothing ready (pipeline bubbles, waiting for peers)
    finish_s: float = 0.0        # when its last firing ends (from the step's start)
    flops: int = 0
    bytes_sent: int = 0
    memory: dict[str, int] = field(default_factory=dict)


@dataclass
class Prediction:
    step_s: float
    ranks: list[RankCost]
    bound: str                   # what limits the step
    overhead_s: float            # the driver's share of the step
    hardware: str = ""



_PRE, _OPT = -1, 1 << 30  # the pieces of per-step ops and of the optimizer phase


def predict(plan, hw: Hardware, *, world: int | None = None, feed_bytes: int | None = None) -> Prediction:
    """Predict one step of ``plan`` on ``hw``. ``plan`` may hold every rank or one representative
    per pipeline stage (as ``flowsys plan`` lowers it): members of a collective or peers that are
    not in the plan are taken to behave like the ranks that are. ``world`` is the number of
    devices (default: the ranks in the plan); ``feed_bytes`` what the driver sends and collects
    per step (default: each rank's inputs and trained parameters)."""
    k = max(1, plan.micro_batches)
    window = max((max([v.registers for v in rp.values] or [1]) for rp in plan.ranks), default=1)
    k1 = 2 * window + 2
    if k <= k1 + window:
        sim = _Simulation(plan, hw, world or len(plan.ranks))
        sim.run()
        costs = sim.costs()
    else:  # many micro-batches: the schedule is periodic once the pipeline is full, so simulate
        # two short runs and extend their difference linearly to k
        first, second = (_Simulation(plan, hw, world or len(plan.ranks), micro_batches=m) for m in (k1, k1 + window))
        first.run()
        second.run()
        sim = second
        costs = [_extend(a, b, (k - k1) / window) for a, b in zip(first.costs(), second.costs())]
    if feed_bytes is None:
        feed_bytes = sim.feed_bytes
    driver = hw.step_overhead + hw.rank_overhead * max(0, (world or len(plan.ranks)) - 1) + feed_bytes / hw.wire_bandwidth
    span = max((c.finish_s for c in costs), default=0.0)
    return Prediction(step_s=span + driver, ranks=costs, bound=_bound(costs, span, driver), overhead_s=driver,
                      hardware=hw.name)


REQUEST_BYTES = 1024  # a step's request to one rank and its response: step number, seeds, hyper-parameters, losses


def feed_bytes(rank_plan, fed_inputs: bool = False) -> int:
    """Bytes the driver moves for one rank per step. Parameters, gradients and optimizer state
    stay in the workers and a worker reads its own batch, so that is the request and the
    response; with ``fed_inputs``, also the inputs the driver sends itself (a user's own
    tensors passed to the step)."""
    if not fed_inputs:
        return REQUEST_BYTES
    decl = {v.id: (tuple(v.shape), np.dtype(v.dtype)) for v in rank_plan.values}
    return REQUEST_BYTES + sum(_nbytes(decl[v]) for v in rank_plan.inputs if v in decl)


def _extend(a: RankCost, b: RankCost, steps: float) -> RankCost:
    """``a`` plus ``steps`` times the difference ``b - a``, field by field."""
    out = RankCost(rank=a.rank, bytes_sent=b.bytes_sent, memory=b.memory)
    for name in ("compute_s", "memory_bound_s", "shared_s", "overhead_s", "comm_s", "idle_s", "finish_s"):
        setattr(out, name, getattr(a, name) + steps * (getattr(b, name) - getattr(a, name)))
    out.flops = int(a.flops + steps * (b.flops - a.flops))
    return out


def _bound(costs: list[RankCost], span: float, driver: float) -> str:
    if not costs:
        return "driver overhead"
    slowest = max(costs, key=lambda c: c.finish_s)
    shares = {"compute": slowest.compute_s - slowest.memory_bound_s, "memory bandwidth": slowest.memory_bound_s,
              "runtime overhead per firing": slowest.overhead_s, "communication": slowest.comm_s,
              "pipeline idle": slowest.idle_s, "cores shared between ranks": slowest.shared_s,
              "driver overhead per step": driver}
    return max(shares, key=shares.get)


def _fuse_buckets(ops) -> list:
    """The plan's ops with each bucket's collectives as one collective (as the runtime runs
    them: a gradient bucket's all-reduces, the pieces' parameter all-gathers and gradient
    reduce-scatters): at its first member's place, over every member's input and output, with
    their bytes summed, on the bucket's channel."""
    members: dict[int, list] = defaultdict(list)
    for op in ops:
        if op.bucket:
            members[op.bucket].append(op)
    out = []
    for op in ops:
        if not op.bucket:
            out.append(op)
        elif op.id == members[op.bucket][0].id:
            fused = type(op)()
            fused.CopyFrom(op)
            fused.channel, fused.nbytes = op.bucket - 1, sum(m.nbytes for m in members[op.bucket])
            del fused.inputs[:], fused.outputs[:]
            fused.inputs.extend(m.inputs[0] for m in members[op.bucket])
            fused.outputs.extend(m.outputs[0] for m in members[op.bucket])
            out.append(fused)
    return out


def _writes_parameter(rp, ops) -> set[int]:
    """The optimizer-phase ops writing a parameter (or a view of one) in place: updates and
    assigns, which wait until every micro-batch is done."""
    params = set(rp.variables.values()) | {v for op in ops if op.per_step for v in op.outputs}
    out = set()
    for op in ops:
        if op.phase != "optimizer":
            continue
        if op.op == "identity" and op.inputs[0] in params:
            params.update(op.outputs)
        elif (op.kind == "update" or op.op == "assign") and op.inputs[0] in params:
            out.add(op.id)
    return out


@dataclass
class _Task:
    rank: int
    op: Any
    piece: int
    order: int
    deps: int = 0
    dependents: list = field(default_factory=list)
    done: float | None = None
    awaits_message: bool = False  # a receive whose sender is simulated: ready once it has arrived


@dataclass
class _Node:
    running: dict = field(default_factory=dict)  # id(task) -> [work left, task, then, start, work at full speed]
    rate: float = 1.0
    last: float = 0.0
    version: int = 0


class _Simulation:
    def __init__(self, plan, hw: Hardware, world: int, micro_batches: int | None = None) -> None:
        self.hw, self.k = hw, max(1, micro_batches or plan.micro_batches)
        self.present = {rp.rank for rp in plan.ranks}
        # devices simulated on one machine's cores share them: at most `parallel` ranks of a node
        # run at full speed at once (processor sharing); real devices run on their own
        parallel = hw.parallel_ranks or (1.0 if hw.shared_interpreter else float(hw.cores_per_node or 1))
        self.parallel = (parallel if isinstance(parallel, dict) else {1: 1.0, 2: parallel}) if hw.cores_per_node else None
        self.nodes: dict[int, _Node] = {}
        self.tasks: dict[int, list[_Task]] = {}
        self.ready: dict[int, list] = {}
        self.blocked: dict[int, list] = {}
        self.busy: dict[int, bool] = {}
        self.open: dict[int, dict[int, int]] = {}
        self.window: dict[int, int] = {}
        self.costs_by_rank: dict[int, RankCost] = {}
        self.busy_time: dict[int, float] = defaultdict(float)
        self.events: list = []
        self.seq = 0
        self.joins: dict[tuple, list] = defaultdict(list)    # (channel, piece) -> [(time, task)]
        self.receivers: dict[tuple, _Task] = {}               # (channel, piece) -> its receive
        self.piece_size: dict[int, int] = {}
        self.feed_bytes = 0
        self.decl: dict[int, dict] = {}
        self.work: dict[tuple[int, int], tuple[float, float, int]] = {}
        for rp in plan.ranks:
            self._build(rp)

    # ---------------------------------------------------------------------------------- setup
    def _build(self, rp) -> None:
        r, k = rp.rank, self.k
        decl = {v.id: (tuple(v.shape), np.dtype(v.dtype)) for v in rp.values}
        self.window[r] = max([max(1, v.registers or 1) for v in rp.values] or [1])
        self.costs_by_rank[r] = RankCost(rank=r, bytes_sent=int(rp.bytes_sent), memory={
            "parameters": rp.memory.parameters, "gradients": rp.memory.gradients,
            "optimizer_state": rp.memory.optimizer_state, "peak_activations": rp.memory.peak_activations})
        self.feed_bytes += feed_bytes(rp)
        ops = _fuse_buckets(rp.ops)
        producers: dict[int, list] = defaultdict(list)
        for op in ops:
            for v in op.outputs:
                producers[v].append(op)
        tasks: dict[tuple[int, int], _Task] = {}
        pieces_of = {}
        order = 0
        for op in ops:
            pieces = [_OPT] if op.phase == "optimizer" else [_PRE] if op.per_step else list(range(k))
            pieces_of[op.id] = pieces
            for p in pieces:
                tasks[(op.id, p)] = _Task(r, op, p, order)
                order += 1
        pre = [t for t in tasks.values() if t.piece == _PRE]
        body = [t for t in tasks.values() if 0 <= t.piece < k]
        for t in tasks.values():
            deps: set[tuple[int, int]] = set()
            for v in t.op.inputs:
                for prod in producers.get(v, ()):
                    if prod.id == t.op.id:
                        continue
                    have = pieces_of[prod.id]
                    if t.piece in have:
                        deps.add((prod.id, t.piece))
                    elif have == [_PRE]:
                        deps.add((prod.id, _PRE))
                    elif t.piece == _OPT:
                        deps.update((prod.id, p) for p in have)
            for d in deps:
                self._edge(tasks[d], t)
        for t in body:  # per-step ops run before the micro-batches, the optimizer after them
            for p in pre:
                self._edge(p, t)
        # per-step ops run one at a time, in plan order, a collective blocking its rank until it
        # completes (actors.runtime._run_blocking); the optimizer phase runs in dataflow order
        # with its collectives in flight together, each op as soon as its inputs are final (a
        # gradient's after its last piece), except the ones writing a parameter, which the
        # pieces read in place: those wait for every piece (actors.runtime._build_optimizer)
        for a, b in zip(pre, pre[1:]):
            self._edge(a, b)
        writes = _writes_parameter(rp, ops)
        opt = [t for t in tasks.values() if t.piece == _OPT and t.op.id in writes]
        last = [t for t in body if not t.dependents or all(d.piece == _OPT for d in t.dependents)]
        for t in opt:
            for b in last:
                self._edge(b, t)
        for t in tasks.values():  # a receive also waits for its message (if the sender is simulated)
            if t.op.kind == "recv" and t.op.peer in self.present:
                t.awaits_message = True
                self.receivers[(t.op.channel, t.piece)] = t
        self.tasks[r] = list(tasks.values())
        self.piece_size[r] = len(rp.ops) - sum(1 for op in rp.ops if op.phase == "optimizer" or op.per_step)
        self.ready[r] = []
        self.blocked[r] = []
        self.busy[r] = False
        self.open[r] = {}
        self.decl[r] = decl

    @staticmethod
    def _edge(a: _Task, b: _Task) -> None:
        a.dependents.append(b)
        b.deps += 1

    # ------------------------------------------------------------------------------- the run
    def run(self) -> None:
        for r, tasks in self.tasks.items():
            for t in tasks:
                if t.deps == 0 and not t.awaits_message:
                    self._ready(t, 0.0)
        for r in self.tasks:
            self._dispatch(r, 0.0)
        while self.events:
            now, _, fn, args = heapq.heappop(self.events)
            fn(now, *args)
        stuck = [t for ts in self.tasks.values() for t in ts if t.done is None]
        for t in stuck:  # an unmatched message or collective (peers not simulated): treat as done
            t.done = self.costs_by_rank[t.rank].finish_s

    def _at(self, when: float, fn, *args) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, fn, args))

    def _ready(self, t: _Task, now: float) -> None:
        # the runtime starts an optimizer op as soon as its inputs are final, between two firings
        phase = -1 if t.piece == _OPT else 0 if t.op.phase == "forward" or t.piece == _PRE else 1
        heapq.heappush(self.ready[t.rank], (phase, t.piece, t.order, t))

    def _blocked_by_window(self, t: _Task) -> bool:
        r = t.rank
        return 0 <= t.piece < self.k and t.piece not in self.open[r] and len(self.open[r]) >= self.window[r]

    def _dispatch(self, r: int, now: float) -> None:
        """Start the rank's next actor if it is free: forward work first, then the oldest piece;
        a piece not yet open only while the rank holds fewer pieces than its register window
        (the others wait aside until a piece closes)."""
        if self.busy[r]:
            return
        ready = self.ready[r]
        while ready:
            entry = heapq.heappop(ready)
            if self._blocked_by_window(entry[3]):
                self.blocked[r].append(entry)
                continue
            self._start(entry[3], now)
            return

    def _start(self, t: _Task, now: float) -> None:
        r, hw, op = t.rank, self.hw, t.op
        if 0 <= t.piece < self.k and t.piece not in self.open[r]:
            self.open[r][t.piece] = self.piece_size[r]
        cost = self.costs_by_rank[r]
        cost.overhead_s += hw.op_overhead
        self.busy[r] = True
        work, memory_part = self._work(t)
        if op.kind in ("compute", "update"):
            cost.compute_s += work
            cost.memory_bound_s += memory_part
        if op.kind == "recv" and op.peer not in self.present:  # an unsimulated sender: pay the wire here
            work += self._wire(r, op.peer, self._bytes_out(t))
        self._run(t, max(0.0, hw.op_overhead + work), self._joined if op.kind == "collective" else self._finished, now)

    # a node's shared cores: processor sharing among the firings running on it
    def _run(self, t: _Task, work: float, then, now: float) -> None:
        key = t.rank // self.hw.devices_per_node if self.parallel else t.rank
        node = self.nodes.setdefault(key, _Node())
        self._progress(node, now)
        node.running[id(t)] = [work, t, then, now, work]
        self._reschedule(node, now)

    def _progress(self, node: _Node, now: float) -> None:
        for entry in node.running.values():
            entry[0] -= (now - node.last) * node.rate
        node.last = now

    def _reschedule(self, node: _Node, now: float) -> None:
        n = len(node.running)
        node.rate = min(1.0, self._throughput(n) / n) if self.parallel and n else 1.0
        node.version += 1
        for work, t, *_ in node.running.values():
            self._at(now + max(work, 0.0) / node.rate, self._ran, node, node.version, t)

    def _throughput(self, n: int) -> float:
        """Ranks at full speed that ``n`` running ranks of a node add up to (interpolated
        between the measured counts, the last one held beyond them)."""
        known = sorted(self.parallel.items())
        if n <= known[0][0]:
            return min(float(n), known[0][1])
        for (n0, p0), (n1, p1) in zip(known, known[1:]):
            if n <= n1:
                return p0 + (p1 - p0) * (n - n0) / (n1 - n0)
        return known[-1][1]

    def _ran(self, now: float, node: _Node, version: int, t: _Task) -> None:
        if version != node.version:
            return  # superseded: the node's sharing changed since this was scheduled
        self._progress(node, now)
        _, _, then, started, full_speed = node.running.pop(id(t))
        self.costs_by_rank[t.rank].shared_s += max(0.0, (now - started) - full_speed)
        self._reschedule(node, now)
        then(now, t)

    def _work(self, t: _Task) -> tuple[float, float]:
        """Kernel seconds of one firing and the part of it bound by memory bandwidth (the same
        for every piece of an op); the FLOPs are counted per firing."""
        key = (t.rank, t.op.id)
        if key not in self.work:
            self.work[key] = self._op_work(t)
        work, memory_part, flops = self.work[key]
        self.costs_by_rank[t.rank].flops += flops
        return work, memory_part

    def _op_work(self, t: _Task) -> tuple[float, float, int]:
        op, decl, hw = t.op, self.decl[t.rank], self.hw
        flops = 0
        ins = [decl[v] for v in op.inputs if v in decl]
        outs = [decl[v] for v in op.outputs if v in decl]
        touched = sum(_nbytes(x) for x in ins) + sum(_nbytes(x) for x in outs)
        if op.kind == "compute":
            dtype = outs[0][1].name if outs else "float32"
            attrs = decode_attrs(op.attrs) if op.attrs else {}
            flops = op_flops(op.op, [s for s, _ in ins], [s for s, _ in outs], attrs)
            f_time, m_time = flops / hw.peak(dtype), touched / hw.memory_bandwidth
            if hw.kernels == "measure" and touched < _MEASURE_LIMIT:  # this machine: the kernel's own time
                measured = measure_kernel(op.op, [decl[v] for v in op.inputs], attrs)
                f_time, m_time = (measured, 0.0) if f_time >= m_time else (0.0, measured)
        elif op.kind == "update":  # the op's own count; it reads and writes the parameter and each state array
            attrs = decode_attrs(op.attrs) if op.attrs else {}
            flops = op_flops(op.op, [s for s, _ in ins], [s for s, _ in outs], attrs)
            touched = (3 + 2 * len(attrs.get("state", ()))) * _nbytes(ins[0]) if ins else 0
            f_time, m_time = flops / hw.peak(ins[0][1].name if ins else "float32"), touched / hw.memory_bandwidth
        elif op.kind == "send":
            f_time, m_time = 0.0, self._bytes_out(t) / hw.memory_bandwidth
        elif op.kind == "collective":  # the algorithm's copies and reductions on this rank
            n = len(op.group)
            f_time, m_time = 0.0, 2 * int(op.nbytes) / hw.memory_bandwidth
            x = ins[0] if len(ins) == 1 else ((sum(_numel(s) for s, _ in ins),), ins[0][1])  # a bucket: flat
            attrs = decode_attrs(op.attrs)
            if len(ins) > 1:  # a bucket's gather or reduce-scatter cuts its flat concatenation
                attrs = {k: ("S(0)" if k in ("src", "dst") and v.startswith("S(") else v)
                         for k, v in attrs.items() if k != "shards"}
            if hw.kernels == "measure" and ins and n * _nbytes(x) < _MEASURE_LIMIT:
                f_time, m_time = 0.0, measure_collective(op.op, attrs, x, n)
        else:  # recv, local steps: a copy
            f_time, m_time = 0.0, touched / hw.memory_bandwidth
        scale = hw.kernel_scale if hw.kernels == "measure" else 1.0
        work, memory_part = max(f_time, m_time) * scale, (m_time * scale if m_time > f_time else 0.0)
        # the transport's own work per message, on both ends
        if op.kind == "collective" and len(op.group) > 1:
            work += 2 * _messages(op.op, len(op.group)) * self._worst_link(op.group).overhead
        elif op.kind in ("send", "recv"):
            work += self.hw.link(t.rank, op.peer).overhead
        return work, memory_part, flops

    def _bytes_out(self, t: _Task) -> int:
        if t.op.nbytes:
            return int(t.op.nbytes)
        decl = self.decl[t.rank]
        return sum(_nbytes(decl[v]) for v in t.op.outputs if v in decl)

    def _wire(self, a: int, b: int, nbytes: int, messages: int = 1) -> float:
        link = self.hw.link(a, b)
        return messages * link.latency + nbytes / link.bandwidth

    def _finished(self, now: float, t: _Task) -> None:
        r, op = t.rank, t.op
        self.busy[r] = False
        if op.kind == "send":
            receiver = self.receivers.get((op.channel, t.piece))
            if receiver is not None:
                self._at(now + self._wire(r, op.peer, int(op.nbytes)), self._arrived, receiver)
        self._done(t, now)
        self._dispatch(r, now)

    def _joined(self, now: float, t: _Task) -> None:
        """A collective's member has done its share of the algorithm's local work: the rank is
        free (unless the collective blocks it: per-step ops); the op ends one
        message schedule after the last member has joined."""
        r, op = t.rank, t.op
        self.busy[r] = t.piece == _PRE
        key = (op.channel, t.piece)
        members = [m for m in op.group if m in self.present]
        self.joins[key].append((now, t))
        if len(self.joins[key]) == len(members):
            start = max(when for when, _ in self.joins[key])
            n = len(op.group)
            messages = _messages(op.op, n)
            worst = self._worst_link(op.group)
            nbytes = max(int(x.op.nbytes) for _, x in self.joins[key])
            end = start + (messages * worst.latency + nbytes / worst.bandwidth if n > 1 else 0.0)
            for joined, x in self.joins.pop(key):
                self.costs_by_rank[x.rank].comm_s += end - joined
                self._at(end, self._collective_done, x)
        self._dispatch(r, now)

    def _worst_link(self, group) -> Link:
        return max((self.hw.link(a, b) for a in group for b in group if a != b),
                   key=lambda lk: lk.latency + 1.0 / lk.bandwidth + lk.overhead, default=self.hw.intra_node)

    def _collective_done(self, now: float, t: _Task) -> None:
        if t.piece == _PRE:
            self.busy[t.rank] = False
        self._done(t, now)
        self._dispatch(t.rank, now)

    def _arrived(self, now: float, t: _Task) -> None:
        t.awaits_message = False
        if t.deps == 0:
            self._ready(t, now)
            self._dispatch(t.rank, now)

    def _done(self, t: _Task, now: float) -> None:
        t.done = now
        r = t.rank
        cost = self.costs_by_rank[r]
        cost.finish_s = max(cost.finish_s, now)
        if t.piece in self.open[r]:
            self.open[r][t.piece] -= 1
            if not self.open[r][t.piece]:
                del self.open[r][t.piece]
                for entry in self.blocked[r]:  # a piece closed: the window has room again
                    heapq.heappush(self.ready[r], entry)
                self.blocked[r] = []
        for d in t.dependents:
            d.deps -= 1
            if d.deps == 0 and not d.awaits_message:
                self._ready(d, now)
                self._dispatch(d.rank, now)

    def costs(self) -> list[RankCost]:
        out = []
        for r in sorted(self.costs_by_rank):
            c = self.costs_by_rank[r]
            busy = c.compute_s + c.overhead_s
            c.idle_s = max(0.0, c.finish_s - busy - c.comm_s - c.shared_s)
            out.append(c)
        return out


def _messages(name: str, n: int) -> int:
    """Messages one rank sends, one after another, in the collective's algorithm (comm.algorithms)."""
    return {"all_reduce": 2 * (n - 1), "all_reduce_max": 2 * (n - 1), "broadcast": max(1, math.ceil(math.log2(max(n, 2))))}.get(name, n - 1)


def _nbytes(decl: tuple[tuple[int, ...], np.dtype]) -> int:
    shape, dtype = decl
    return _numel(shape) * dtype.itemsize

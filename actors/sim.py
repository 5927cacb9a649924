"""The actor runtime on a simulated clock: the cost model.

``predict(plan, hardware)`` runs one training step of a lowered plan through the runtime's own
scheduling code (:class:`actors.runtime.RankRuntime`: its ready queue, registers, windows, the
optimizer phase's units and the collectives in flight) with *null kernels*: every value is a
:class:`NullArray` (a shape and a dtype, no data) and every firing advances a simulated clock by
the time the hardware spec gives it instead of computing. Collectives and transfers are the
schedules ``comm.algorithms`` runs, message by message, so their cost is what those schedules
send over the spec's links. Like tinygrad's null backend, nothing here restates a policy of the
runtime: a change to the runtime's scheduling changes the prediction.

Each simulated rank runs its ``RankRuntime.run`` in a greenlet. The simulator is a discrete-event
loop over one clock: a rank runs until it spends simulated time (a firing's duration, after which
it is resumed in time order) or waits for a message (it is resumed when one arrives), so only one
rank runs at a time and a step's simulation is deterministic.

Durations, from the spec (``scheduler.hardware``, passed in; this module does not import it):

- a compute or update firing: ``op_overhead + max(FLOPs / peak, bytes / bandwidth)``, the FLOPs
  and bytes from the op's own cost rule in the op registry (``flowsys.ops.cost``), the peak the
  dtype's GEMM peak for matrix products; on a spec whose kernels are ``measure``d, the kernel's
  own time on this machine (``kernel_time``);
- a message: it leaves when the sender's link is free (a rank's messages share its link),
  takes ``bytes / bandwidth`` on it and arrives ``latency`` later; each end's transport spends
  the link's ``overhead`` per message;
- ranks simulated on one machine's cores share them (``cores_per_node``): a firing runs at the
  speed the spec's ``parallel_ranks`` gives the ranks busy on its node when it starts.

Only distinct ranks need simulating: a plan may hold one rank per pipeline stage (as ``flowsys
plan`` lowers it). A message from a rank that is not simulated is the one its representative
(``stands_for``, or by default the receiving rank itself: a member of its own collective group)
posted under the same tag, by symmetry at the same time; long pipelines are simulated over a few
micro-batches and extended periodically (the schedule repeats once the pipeline is full).
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from actors.runtime import RankRuntime, Stalled, Timeline, _Comm, _one_send
from flowsys.errors import ConfigError
from flowsys.ops.cost import op_cost
from flowsys.ops.registry import is_floating
from flowsys.planformat import REQUEST_BYTES, decode_attrs

try:  # the simulation's coroutines
    import greenlet
except ImportError:  # pragma: no cover - a dependency of flowsys
    greenlet = None


# ------------------------------------------------------------------------------- null arrays
_ZERO = np.zeros((), dtype=np.bool_)


class NullArray:
    """A value of the simulated runtime: a shape and a dtype, no data. It supports what the
    runtime, the boxing steps and the collective schedules do to values (slicing, reshaping,
    concatenation, in-place sums), so they run unchanged on it at no cost in memory."""

    __slots__ = ("shape", "dtype")
    __array_priority__ = 100

    def __init__(self, shape, dtype) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: math.prod(self.shape))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)
    itemsize = property(lambda self: self.dtype.itemsize)
    T = property(lambda self: NullArray(self.shape[::-1], self.dtype))

    def __repr__(self) -> str:
        return f"NullArray({self.shape}, {self.dtype})"

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, *args, **kwargs):
        raise TypeError("a NullArray has no data: the simulated runtime met a NumPy call that would read it "
                        "(give actors.sim.NullArray a rule for it)")

    def reshape(self, *shape) -> NullArray:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
            shape = tuple(self.size // max(known, 1) if s == -1 else s for s in shape)
        return NullArray(shape, self.dtype)

    def __getitem__(self, index) -> NullArray:
        if type(index) is slice and self.shape:  # the common case (a micro-batch, a ring chunk)
            return NullArray((len(range(*index.indices(self.shape[0]))),) + self.shape[1:], self.dtype)
        return NullArray(np.broadcast_to(_ZERO, self.shape)[index].shape, self.dtype)

    def __setitem__(self, index, value) -> None:
        pass

    def copy(self, order: str = "C") -> NullArray:
        return NullArray(self.shape, self.dtype)

    def astype(self, dtype, copy: bool = True) -> NullArray:
        return NullArray(self.shape, dtype)

    def transpose(self, *axes) -> NullArray:
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return NullArray(tuple(self.shape[a] for a in axes) if axes else self.shape[::-1], self.dtype)

    def _binary(self, other) -> NullArray:
        shape = np.broadcast_shapes(self.shape, np.shape(other) if not isinstance(other, NullArray) else other.shape)
        return NullArray(shape, self.dtype)

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _binary

    def __iadd__(self, other) -> NullArray:
        return self

    __isub__ = __imul__ = __itruediv__ = __iadd__

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if out is not None:
            return out[0] if isinstance(out, tuple) else out
        shapes = [x.shape if isinstance(x, NullArray) else np.shape(x) for x in inputs]
        dtypes = [x.dtype for x in inputs if isinstance(x, NullArray)]
        dtype = np.bool_ if ufunc.__name__ in ("isfinite", "equal", "less", "greater") else dtypes[0]
        return NullArray(np.broadcast_shapes(*shapes), dtype)

    def __array_function__(self, func, types, args, kwargs):
        name = func.__name__
        if name == "concatenate":
            arrays, axis = args[0], kwargs.get("axis", args[1] if len(args) > 1 else 0)
            first = arrays[0]
            if axis is None:
                return NullArray((sum(a.size for a in arrays),), first.dtype)
            axis %= first.ndim
            shape = list(first.shape)
            shape[axis] = sum(a.shape[axis] for a in arrays)
            return NullArray(shape, first.dtype)
        if name in ("ascontiguousarray", "asarray", "copy", "array"):
            return args[0] if name != "copy" else args[0].copy()
        if name == "array_split":
            x, parts = args[0], args[1]
            axis = kwargs.get("axis", args[2] if len(args) > 2 else 0)
            n = x.shape[axis]
            q, r = divmod(n, parts)
            out = []
            for i in range(parts):
                shape = list(x.shape)
                shape[axis] = q + (1 if i < r else 0)
                out.append(NullArray(shape, x.dtype))
            return out
        if name in ("zeros_like", "empty_like", "ones_like"):
            return args[0].copy()
        raise TypeError(f"the simulated runtime has no rule for numpy.{name} on a NullArray; add one to "
                        f"actors.sim.NullArray.__array_function__")


# -------------------------------------------------------------------------------- the clock
class _Mailbox:
    """A simulated rank's mailbox, with the interface the runtime reads (``arrivals``, ``ready``,
    ``try_take``, ``take``, ``wait``): a message is there once the clock has reached its arrival."""

    def __init__(self, sim: Simulator, rank: int) -> None:
        self.sim, self.rank = sim, rank
        self.boxes: dict[tuple[int, int], deque] = {}
        self.cursor: dict[tuple[int, int], int] = defaultdict(int)  # messages taken from a representative's posts
        self.arrivals = 0
        self.new: list[tuple[int, int]] = []  # (source, tag) arrived since the runtime's last drain

    def _arrived(self, src: int, tag: int):
        """(array, its board key or None for a message in a box) of the next message from
        ``src`` under ``tag`` if the clock has reached its arrival; else None, and the rank is
        woken when it arrives (or, not posted yet, when it is)."""
        sim = self.sim
        if src in sim.present:
            box = self.boxes.get((src, tag))
            if not box:
                return None
            arrival, array = box[0]
            key = None
        else:
            key = sim.board_key(self.rank, sim.rep.get(src, self.rank), tag, sim.recv_node)
            posts = sim.board.get(key)
            n = self.cursor[key]
            if posts and key[0] == "p2p":  # a transfer of one boxing node: its sends go out together
                n = min(n, len(posts) - 1)
            if posts is None or len(posts) <= n:
                sim.watchers[key].add((self.rank, src, tag))
                return None
            sent, array, latency = posts[n]
            arrival = sent + latency  # by symmetry ``src`` sent it as the representative sent its own
        if arrival > sim.now:
            sim.wake(self.rank, arrival, (src, tag))
            return None
        return array, key

    def ready(self, src: int, tag: int) -> bool:
        return self._arrived(src, tag) is not None

    def try_take(self, src: int, tag: int):
        got = self._arrived(src, tag)
        if got is None:
            return None
        array, key = got
        if key is None:
            box = self.boxes[(src, tag)]
            box.popleft()
            if not box:
                del self.boxes[(src, tag)]
        else:
            self.cursor[key] += 1
        self.sim.receive_overhead(self.rank, src)
        return array

    def take(self, src: int, tag: int, timeout: float):
        while not self.ready(src, tag):
            self.wait(self.arrivals, timeout)
        return self.try_take(src, tag)

    def arrived(self, key: tuple[int, int]) -> None:
        self.arrivals += 1
        self.new.append(key)

    def drain(self) -> list[tuple[int, int]]:
        new, self.new = self.new, []
        return new

    def wait(self, seen: int, timeout: float) -> int:
        if self.arrivals == seen:
            self.sim.block(self.rank)
        return self.arrivals

    def check(self) -> None:
        pass


class _Endpoint:
    """A simulated rank's transport endpoint (``world_size``, ``mailbox``, ``post``)."""

    def __init__(self, sim: Simulator, rank: int) -> None:
        self.sim, self.rank = sim, rank
        self.world_size = sim.world
        self.mailbox = _Mailbox(sim, rank)

    def post(self, array, dst: int, tag: int) -> None:
        self.sim.post(self.rank, dst, tag, array)


@dataclass
class RankCost:
    rank: int
    compute_s: float = 0.0       # time spent in compute and update firings
    memory_bound_s: float = 0.0  # the part of it set by memory bandwidth rather than FLOP/s
    shared_s: float = 0.0        # time its firings were slowed by other ranks on the same cores
    overhead_s: float = 0.0      # runtime work per firing and per message
    comm_s: float = 0.0          # time it waited with communication in flight and nothing else to do
    idle_s: float = 0.0          # time with nothing ready (pipeline bubbles, waiting for peers)
    finish_s: float = 0.0        # when its last firing ends (from the step's start)
    flops: int = 0
    bytes_sent: int = 0
    firings: int = 0
    memory: dict[str, int] = field(default_factory=dict)


@dataclass
class Prediction:
    step_s: float
    ranks: list[RankCost]
    bound: str                   # what limits the step
    overhead_s: float            # the driver's share of the step
    hardware: str = ""
    timeline: Any = None         # the simulated firings (an actors.runtime.Timeline), when recorded
    micro_batches: int = 0       # the micro-batches simulated (fewer than the plan's when extended)


class SimRankRuntime(RankRuntime):
    """``RankRuntime`` with null kernels: every handler of the dispatch table returns null arrays
    of the plan's shapes and spends the firing's simulated time; communication handlers are the
    runtime's own (the schedules of ``comm.algorithms`` on null arrays)."""

    def __init__(self, rank_plan, sim: Simulator, record: bool) -> None:
        super().__init__(rank_plan, _Endpoint(sim, rank_plan.rank), timeout=float("inf"), record=record,
                         clock=lambda: sim.now)
        self.sim = sim
        self.seconds: dict[int, tuple[float, float, int]] = {}  # op id -> (seconds, memory-bound part, flops)
        self.nulls: dict[int, list] = {}

    def _charge(self, op) -> None:
        if op.id not in self.seconds:
            self.seconds[op.id] = self.sim.op_seconds(self, op)
        seconds, memory_part, flops = self.seconds[op.id]
        cost = self.sim.cost[self.rp.rank]
        cost.flops += flops
        cost.memory_bound_s += memory_part
        cost.firings += 1
        self.sim.spend(self.rp.rank, seconds, overhead=self.sim.hw.op_overhead)

    def _communicate(self, work: float = 0.0) -> None:
        """A communication firing: the runtime's work per firing, plus ``work`` of its own."""
        overhead = self.sim.hw.op_overhead
        self.sim.spend(self.rp.rank, overhead + work, overhead=overhead)

    def _collective(self, op, attrs, ins, held, piece):
        sim = self.sim
        work = 0.0
        if sim.collective_time is not None and len(op.group) > 1:  # the algorithm's copies and sums here
            x = ins[0]
            work = sim.hw.kernel_scale * sim.collective_time(op.op, attrs, (x.shape, x.dtype), len(op.group))
        self._communicate(work)
        return super()._collective(op, attrs, ins, held, piece)

    def _gather_bucket(self, members, ins, piece):
        self._communicate()
        return super()._gather_bucket(members, ins, piece)

    def _reduce_scatter_bucket(self, members, ins, piece):
        self._communicate()
        return super()._reduce_scatter_bucket(members, ins, piece)

    def _recv(self, op, attrs, ins, held, piece):
        self._communicate()
        return super()._recv(op, attrs, ins, held, piece)

    def _null(self, op) -> list:
        out = self.nulls.get(op.id)  # null values hold no data: one set per op serves every piece
        if out is None:
            out = self.nulls[op.id] = [NullArray(*self.decls[v]) for v in op.outputs]
        return out

    def _compute(self, op, attrs, ins, held, piece):
        self._charge(op)
        return self._null(op)

    def _update(self, op, attrs, ins, held, piece):
        self._charge(op)
        return [ins[0]]

    def _assign(self, op, attrs, ins, held, piece):
        self._charge(op)
        return [ins[0]]

    def _fill_zeros(self, op, attrs, ins, held, piece):
        self._charge(op)
        return self._null(op)

    def _copy_region(self, op, attrs, ins, held, piece):
        self._charge(op)
        return self._null(op)

    def _boxing_step(self, op, attrs, ins, held, piece):
        self._charge(op)
        return self._null(op)

    def _add_region(self, op, attrs, held, data):
        return held if held is not None else NullArray(*self.decls[op.outputs[0]])

    def _send(self, op, attrs, ins, held, piece):
        self._communicate()
        x = ins[0]
        if not attrs["relay"]:
            x = NullArray(tuple(hi - lo for lo, hi in attrs["box"]), x.dtype)
        return _Comm(_one_send(0, x), [op.peer])


class Simulator:
    """One step of a plan's simulated ranks on one clock (see the module docstring)."""

    def __init__(self, plan, hw, world: int | None = None, micro_batches: int | None = None, *,
                 stands_for: dict[int, list[int]] | None = None, record: bool = False,
                 kernel_time: Callable | None = None, collective_time: Callable | None = None) -> None:
        if greenlet is None:  # pragma: no cover
            raise ConfigError("the cost model needs the greenlet package: pip install greenlet")
        self.plan, self.hw = plan, hw
        self.k = max(1, micro_batches or plan.micro_batches)
        self.present = {rp.rank for rp in plan.ranks}
        self.world = max(world or 0, max(self.present) + 1, *(max(list(op.group) + [op.peer], default=0) + 1
                                                              for rp in plan.ranks for op in rp.ops))
        self.rep = {q: r for r, qs in (stands_for or {}).items() for q in qs}
        self.kernel_time, self.collective_time = kernel_time, collective_time
        self.now = 0.0
        self.events: list = []
        self.seq = 0
        self.board: dict[tuple[int, int], list] = defaultdict(list)  # (sender, tag) -> its posts to ranks not simulated
        self.watchers: dict[tuple, set[tuple[int, int, int]]] = defaultdict(set)  # board key -> (rank, src, tag) asking
        self.link_free: dict[tuple[int, bool], float] = defaultdict(float)  # (rank, inter-node) -> when its link is free
        self.cost = {rp.rank: RankCost(rank=rp.rank, memory={
            "parameters": rp.memory.parameters, "gradients": rp.memory.gradients,
            "optimizer_state": rp.memory.optimizer_state, "peak_activations": rp.memory.peak_activations})
            for rp in plan.ranks}
        self.runtimes = {rp.rank: SimRankRuntime(rp, self, record) for rp in plan.ranks}
        # (rank, channel) -> the slowest link of the collective group talking on that channel
        self.slowest: dict[tuple[int, int], Any] = {}
        # (rank, channel) -> the boxing node of a send / a receive on that channel
        self.send_node: dict[tuple[int, int], int] = {}
        self.recv_node: dict[tuple[int, int], int] = {}
        for rp in plan.ranks:
            for op in rp.ops:
                if op.kind in ("send", "recv"):
                    (self.send_node if op.kind == "send" else self.recv_node)[(rp.rank, op.channel)] = op.node
                if len(op.group) > 1:
                    spans = len({q // hw.devices_per_node for q in op.group}) > 1
                    link = min((hw.intra_node, hw.inter_node) if spans else (hw.intra_node,),
                               key=lambda lk: (lk.bandwidth, -lk.latency))
                    for channel in {op.channel, op.bucket - 1} - {-1}:
                        self.slowest[(rp.rank, channel)] = link
        self.state: dict[int, str] = {}
        self.waiting_since: dict[int, float] = {}
        self.wakes: set[tuple[int, float]] = set()  # (rank, time) of the arrivals scheduled
        parallel = hw.parallel_ranks or (1.0 if hw.shared_interpreter else float(hw.cores_per_node or 1))
        self.parallel = ((parallel if isinstance(parallel, dict) else {1: 1.0, 2: parallel})
                         if hw.cores_per_node else None)
        self.busy_on_node: dict[int, int] = defaultdict(int)

    # -------------------------------------------------------------------------- the event loop
    def run(self) -> None:
        main = greenlet.getcurrent()
        self.main = main
        self.greenlets = {}
        for r, rt in self.runtimes.items():
            self.greenlets[r] = greenlet.greenlet(self._body(r, rt), parent=main)
            self._at(0.0, r, "resume")
        self.errors: list[BaseException] = []
        while self.events:
            when, _, r, kind, key = heapq.heappop(self.events)
            self.now = max(self.now, when)
            state = self.state.get(r)
            if kind == "arrive":  # a message is in: the rank sees it when it next polls
                self.runtimes[r].comm.mailbox.arrived(key)
                if state != "waiting":
                    continue
            elif state in ("done", "failed"):
                continue
            self._resume(r)
            if self.errors:
                raise self.errors[0]
        stuck = [r for r in self.runtimes if self.state.get(r) != "done"]
        if stuck:
            waits = "; ".join(_stuck(self.runtimes[r]) for r in stuck)
            raise Stalled(stuck[0], [], 0.0, f"the simulated step deadlocked ({len(stuck)} rank(s) wait "
                                             f"forever): {waits}")

    def _body(self, r: int, rt: SimRankRuntime):
        def body():
            try:
                self.state[r] = "running"
                rt.run(self._fed(rt), self.k, self._grads(rt), lambda *a: None, self._seeds(rt), ())
                self.state[r] = "done"
                self.cost[r].finish_s = self.now
            except BaseException as err:  # noqa: BLE001 - reported by the event loop
                self.state[r] = "failed"
                self.errors.append(err)
        return body

    def _resume(self, r: int) -> None:
        if r in self.waiting_since:
            waited = self.now - self.waiting_since.pop(r)
            rt = self.runtimes[r]
            if getattr(rt, "inflight", None) or getattr(rt, "opt_inflight", None) or rt.in_per_step:
                self.cost[r].comm_s += waited
            else:
                self.cost[r].idle_s += waited
        self.state[r] = "running"
        self.greenlets[r].switch()

    def _at(self, when: float, r: int, kind: str, key: tuple[int, int] | None = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, r, kind, key))

    def wake(self, r: int, when: float, key: tuple[int, int]) -> None:
        """The message (source, tag) ``key`` for rank ``r`` arrives at ``when``: its mailbox
        counts it then, and the rank is resumed if it waits."""
        once = (r, when, key)
        if once not in self.wakes:
            self.wakes.add(once)
            self._at(when, r, "arrive", key)

    def block(self, r: int) -> None:
        """Rank ``r`` has nothing to do until a message arrives: switch to the event loop."""
        self.state[r] = "waiting"
        self.waiting_since[r] = self.now
        self.main.switch()

    def spend(self, r: int, seconds: float, overhead: float | None = None) -> None:
        """Rank ``r`` is busy for ``seconds`` at full speed (of which ``overhead`` is the
        runtime's own work; None: all of it): switch to the event loop, which resumes it when
        the clock has moved on by that much (longer on shared cores)."""
        if seconds <= 0:
            return
        cost = self.cost[r]
        overhead = seconds if overhead is None else min(overhead, seconds)
        cost.overhead_s += overhead
        cost.compute_s += seconds - overhead
        node = r // self.hw.devices_per_node
        if self.parallel:
            self.busy_on_node[node] += 1
            n = self.busy_on_node[node]
            rate = min(1.0, self._throughput(n) / n)
            cost.shared_s += seconds / rate - seconds
            seconds /= rate
        until = self.now + seconds
        if self.events and self.events[0][0] <= until:  # something happens meanwhile: run it first
            self.state[r] = "busy"
            self._at(until, r, "resume")
            self.main.switch()
        else:  # nothing else happens before this firing ends: the clock just moves on
            self.now = until
        if self.parallel:
            self.busy_on_node[node] -= 1

    def _throughput(self, n: int) -> float:
        known = sorted(self.parallel.items())
        if n <= known[0][0]:
            return min(float(n), known[0][1])
        for (n0, p0), (n1, p1) in zip(known, known[1:]):
            if n <= n1:
                return p0 + (p1 - p0) * (n - n0) / (n1 - n0)
        return known[-1][1]

    # --------------------------------------------------------------------------------- messages
    def post(self, src: int, dst: int, tag: int, array) -> None:
        hw = self.hw
        link = hw.link(src, dst)
        inter = (src // hw.devices_per_node) != (dst // hw.devices_per_node)
        if dst not in self.present:
            # a collective's message standing for its peers' by symmetry: it moves at the pace
            # of the group's slowest link (a ring waits for its slowest hop at every step), and
            # the collectives in flight share that link
            slowest = self.slowest.get((src, (tag >> 20) - 1))
            if slowest is not None:
                link, inter = slowest, slowest is hw.inter_node
        nbytes = int(array.nbytes)
        start = max(self.now, self.link_free[(src, inter)])
        sent = start + nbytes / link.bandwidth
        self.link_free[(src, inter)] = sent
        self.cost[src].bytes_sent += nbytes
        if dst in self.present:
            box = self.runtimes[dst].comm.mailbox.boxes.setdefault((src, tag), deque())
            arrival = sent + link.latency
            box.append((arrival, array))
            self.wake(dst, arrival, (src, tag))
        key = self.board_key(src, src, tag, self.send_node)
        if dst not in self.present or key[0] == "p2p":  # what the ranks it stands for receive
            self.board[key].append((sent, array, link.latency))
            for b, asked, asked_tag in self.watchers.pop(key, ()):  # the earliest it may be there
                self.wake(b, sent + link.latency, (asked, asked_tag))
        if link.overhead:
            self.spend(src, link.overhead)

    @staticmethod
    def board_key(rank: int, sender: int, tag: int, p2p: dict) -> tuple:
        """Where a message posted by a simulated ``sender`` is found by the ranks it stands for:
        a collective's by its tag (the group shares its channel); a transfer's by its boxing
        node and piece (each pair of ranks has its own channel, so the peers' channels differ)."""
        node = p2p.get((rank, (tag >> 20) - 1))
        return ("p2p", sender, node, tag & 0xFFFFF) if node is not None else (sender, tag)

    def receive_overhead(self, r: int, src: int) -> None:
        overhead = self.hw.link(src, r).overhead
        if overhead:
            self.spend(r, overhead)

    # ---------------------------------------------------------------------------------- costs
    def op_seconds(self, rt: SimRankRuntime, op) -> tuple[float, float, int]:
        """(seconds, the part bound by memory bandwidth, FLOPs) of one firing of ``op``."""
        hw, decls = self.hw, rt.decls
        ins = [decls[v] for v in op.inputs if v in decls]
        outs = [decls[v] for v in op.outputs if v in decls]
        attrs = decode_attrs(op.attrs) if op.attrs else {}
        dtype = _float_dtype(ins + outs)
        if op.kind in ("compute", "update"):  # the op's own cost rule (an update's counts its state)
            c = op_cost(op.op, ins, outs, attrs)
            flops, nbytes, gemm = c.flops, c.bytes, c.gemm
        else:  # assign, zeros, a region copied, a local boxing step: a copy
            flops, gemm = 0, False
            nbytes = sum(_nbytes(x) for x in outs) + (sum(_nbytes(x) for x in ins) if op.kind != "fill_zeros" else 0)
        peak = hw.gemm_peak(dtype) if gemm else hw.peak(dtype)
        f_time, m_time = flops / peak, nbytes / hw.achieved_bandwidth()
        if self.kernel_time is not None and op.kind == "compute":
            measured = self.kernel_time(op.op, [decls[v] for v in op.inputs], attrs)
            if measured:
                f_time, m_time = (measured, 0.0) if f_time >= m_time else (0.0, measured)
        scale = hw.kernel_scale if self.kernel_time is not None else 1.0
        work = max(f_time, m_time) * scale
        return hw.op_overhead + work, (m_time * scale if m_time > f_time else 0.0), flops

    # ------------------------------------------------------------------------------- feeding
    def _fed(self, rt: SimRankRuntime) -> dict[int, NullArray]:
        rp = rt.rp
        produced = {v for op in rp.ops for v in op.outputs}
        inputs = set(rp.inputs)
        fed = {}
        for v in rp.values:
            if v.id in produced:
                continue
            shape = tuple(v.shape)
            if v.id in inputs and shape and self.k != max(1, self.plan.micro_batches):
                shape = (shape[0] // max(1, self.plan.micro_batches) * self.k,) + shape[1:]
            fed[v.id] = NullArray(shape, v.dtype)
        return fed

    @staticmethod
    def _grads(rt: SimRankRuntime) -> dict[str, int]:
        produced = {v for op in rt.compute_ops for v in op.outputs}
        return {str(v): v for op in rt.optimizer_ops for v in op.inputs if v in produced}

    def _seeds(self, rt: SimRankRuntime) -> list:
        return [_NoSeeds()] * self.k

    def costs(self) -> list[RankCost]:
        return [self.cost[r] for r in sorted(self.cost)]

    def timeline(self) -> Timeline:
        from actors.runtime import pack_timeline  # noqa: PLC0415

        return Timeline(self.plan, {r: pack_timeline(rt.timeline) for r, rt in self.runtimes.items()})


def _stuck(rt: SimRankRuntime) -> str:
    """What a rank the simulation could not wake waits for (its phase when it is not yet in the
    pieces, whose waits the runtime lists)."""
    if rt.in_per_step or not hasattr(rt, "inflight"):  # still in the per-step ops
        return f"rank {rt.rp.rank}: never woken on the simulated clock in {rt.current}"
    return str(rt._stalled("never woken on the simulated clock"))


def _nbytes(decl) -> int:
    shape, dtype = decl
    return math.prod(shape) * dtype.itemsize


def _float_dtype(decls) -> str:
    return next((dtype.name for _, dtype in decls if is_floating(dtype)), "float32")


class _NoSeeds:
    """A piece's dropout seeds in the simulation: any seed is 0 (the kernels do not run)."""

    def __getitem__(self, j) -> int:
        return 0


# ------------------------------------------------------------------------------- prediction
def predict(plan, hw, *, world: int | None = None, feed_bytes: int | None = None,
            stands_for: dict[int, list[int]] | None = None, record: bool = False,
            kernel_time: Callable | None = None, collective_time: Callable | None = None) -> Prediction:
    """Predict one step of ``plan`` on ``hw`` by running it on the simulated clock. ``plan`` may
    hold every rank or one representative per pipeline stage (``stands_for`` maps each simulated
    rank to the ranks it stands for); ``world`` is the number of devices (default: the ranks in
    the plan); ``feed_bytes`` what the driver sends and collects per step (default: a request and
    a response per rank). With ``record``, the prediction carries the simulated timeline."""
    k = max(1, plan.micro_batches)
    window = max((max([max(1, v.registers or 1) for v in rp.values] or [1]) for rp in plan.ranks), default=1)
    # 1F1B's steady state: from about half a window of pieces on, each further piece adds the
    # same time (checked exact against the full simulation, tests/test_cost.py, and on the
    # published 145.6B and 1T rows against a start at W + 2)
    k1 = window // 2 + 2
    opts = dict(stands_for=stands_for, kernel_time=kernel_time, collective_time=collective_time)
    if k <= k1 + 1:
        sim = Simulator(plan, hw, world, record=record, **opts)
        sim.run()
        costs = sim.costs()
    else:  # many micro-batches: the schedule is periodic once the pipeline is full, so simulate
        # two short runs, a piece apart, and extend their difference linearly to k
        first = Simulator(plan, hw, world, micro_batches=k1, **opts)
        first.run()
        sim = Simulator(plan, hw, world, micro_batches=k1 + 1, record=record, **opts)
        sim.run()
        costs = [_extend(a, b, k - k1) for a, b in zip(first.costs(), sim.costs())]
    n = world or len(plan.ranks)
    if feed_bytes is None:
        feed_bytes = REQUEST_BYTES * n
    driver = hw.step_overhead + hw.rank_overhead * max(0, n - 1) + feed_bytes / hw.wire_bandwidth
    span = max((c.finish_s for c in costs), default=0.0)
    return Prediction(step_s=span + driver, ranks=costs, bound=_bound(costs, span, driver), overhead_s=driver,
                      hardware=hw.name, timeline=sim.timeline() if record else None, micro_batches=sim.k)


def _extend(a: RankCost, b: RankCost, steps: float) -> RankCost:
    """``a`` plus ``steps`` times the difference ``b - a``, field by field."""
    out = RankCost(rank=a.rank, bytes_sent=b.bytes_sent, memory=b.memory)
    for name in ("compute_s", "memory_bound_s", "shared_s", "overhead_s", "comm_s", "idle_s", "finish_s"):
        setattr(out, name, getattr(a, name) + steps * (getattr(b, name) - getattr(a, name)))
    out.flops = int(a.flops + steps * (b.flops - a.flops))
    out.bytes_sent = int(a.bytes_sent + steps * (b.bytes_sent - a.bytes_sent))
    out.firings = int(a.firings + steps * (b.firings - a.firings))
    return out


def _bound(costs: list[RankCost], span: float, driver: float) -> str:
    if not costs:
        return "driver overhead"
    slowest = max(costs, key=lambda c: c.finish_s)
    shares = {"compute": slowest.compute_s - slowest.memory_bound_s - slowest.shared_s,
              "memory bandwidth": slowest.memory_bound_s,
              "runtime overhead per firing": slowest.overhead_s, "communication": slowest.comm_s,
              "pipeline idle": slowest.idle_s, "cores shared between ranks": slowest.shared_s,
              "driver overhead per step": driver}
    return max(shares, key=shares.get)

"""Register-based op actors: how one rank runs its ``RankPlan`` (OneFlow's actor protocol).

Every op of the compute phase is an actor. Each value an actor produces lives in *registers*:
as many as the plan gives the value (``Value.registers``, at least one). An actor fires for
micro-batch ("piece") ``p`` when

- every input register of piece ``p`` is readable (all its writers have fired for ``p``), and
- every output register is free (fewer than ``registers`` pieces of the value are held), and
- for a receive, the message of piece ``p`` has arrived (so firing never blocks).

When every consumer of a register has fired for its piece, the register returns to its
producer, which may then fire for a later piece. One register per edge runs a rank's pieces
one after another; more let piece ``p + 1`` enter while piece ``p`` is still downstream —
pipelining with back-pressure, from the register counts alone. A rank also takes no more
pieces at once than its register count: a piece enters when one of its actors first fires and
leaves when all have, which bounds a pipeline stage's in-flight micro-batches as 1F1B does.

Compute and communication actors share the contract. A collective or transfer is a per-rank
schedule from :mod:`comm.algorithms`; firing starts it, its sends are posted at once, and it
parks on each receive until the message is in the mailbox, so any number of collectives are in
flight together and no rank blocks another by the order it happens to pick. Messages carry a tag
made of the op's channel and the piece, so the conversations never mix. A bucket the plan names
of the pieces' collectives (ZeRO's parameter all-gathers, its gradient reduce-scatters) is one
actor: one collective per piece over its members' flattened concatenation, split back.

The optimizer phase runs once per step on the gradients summed over the pieces, in dataflow
order inside the same loop: a gradient is final when its producers have fired for the last
piece, and then its reduction starts at once (all-reduces fused into the buckets the plan names,
one collective over their concatenation) while backward goes on, as DDP overlaps its buckets.
Updates of parameters (and ZeRO's assigns into them) wait until every piece is done, since the
pieces' backward ops read the parameters in place; what is left runs after the loop.

Every firing is recorded (rank, op, piece, start, end, bytes): the actor timeline.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from actors.ordered import Issue, Issuer, Job, OrderStuck
from comm import CommError, Communicator
from comm import algorithms as alg
from flowsys.boxing import STEPS, plan_collective, run_step
from flowsys.device import array_module, contiguous, module_of, to_device, to_numpy
from flowsys.errors import ArgumentError
from flowsys.layout import bounds
from flowsys.ops import OPS
from flowsys.planformat import SeedMarker, decode_attrs
from flowsys.planformat.order import COMMUNICATION, event_key, order_of
from flowsys.sbp import parse

OPTIMIZER_PIECE = (1 << 20) - 1  # the piece number optimizer-phase messages are tagged with
PER_STEP_PIECE = (1 << 20) - 2   # ... and the messages of ops run once per step before the pieces


def tag(channel: int, piece: int) -> int:
    """The message tag of one op's conversation for one piece (tag 0 is plain send/recv's)."""
    return ((channel + 1) << 20) | piece


@dataclass(slots=True)
class Firing:
    """One actor firing on the timeline."""

    rank: int
    op: int       # the plan op's id
    name: str     # e.g. "matmul", "all_reduce", "recv"
    kind: str     # "compute", "collective", "send", "recv", "local", "update"
    phase: str
    piece: int
    start: float  # seconds since the epoch (comparable across processes and synced nodes)
    end: float
    nbytes: int
    node: int     # the graph node the op comes from (a boxing node for inserted communication)


class Timeline(Sequence):
    """The firings of one step on every rank, as the ranks sent them (packed rows of op, piece,
    start, end) and read as :class:`Firing` records only when looked at, so that recording
    costs a step little more than the clock reads."""

    def __init__(self, plan, packed: dict[int, bytes]):
        self._plan, self._packed = plan, packed
        self._firings: list[Firing] | None = None

    def _all(self) -> list[Firing]:
        if self._firings is None:
            ops = {(rp.rank, op.id): op for rp in self._plan.ranks for op in rp.ops}
            firings = []
            for rank in sorted(self._packed):
                for op_id, piece, start, end in np.frombuffer(self._packed[rank], dtype=np.float64).reshape(-1, 4).tolist():
                    op = ops[(rank, int(op_id))]
                    firings.append(Firing(rank, op.id, op.op, op.kind, op.phase, int(piece), start, end, op.nbytes,
                                          op.node))
            self._firings = firings
        return self._firings

    def __len__(self) -> int:
        return len(self._all())

    def __getitem__(self, i):
        return self._all()[i]

    def __iter__(self):
        return iter(self._all())


def pack_timeline(rows: list[tuple[int, int, float, float]]) -> bytes:
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4).tobytes()


class Stalled(CommError):
    """A rank waited past its timeout: what it was waiting for, for the driver's report."""

    def __init__(self, rank: int, waits: list[dict], timeout: float, reason: str = ""):
        self.rank, self.waits, self.timeout = rank, waits, timeout
        what = "; ".join(f"{w['name']} (op {w['op']}, piece {w['piece']}) waits for rank {w['peer']}"
                         + (f" in a {w['name']} over ranks {w['group']}" if w.get("group") else "")
                         for w in waits) or "nothing in flight"
        super().__init__(f"rank {rank}: {reason or f'no progress for {timeout:g} s'}: {what}")


class _Actor:
    __slots__ = ("op", "index", "attrs", "seeded", "run", "piece", "inputs", "outputs", "busy", "name", "late",
                 "members")

    def __init__(self, op, index: int, run: Callable, members: list | None = None):
        self.op, self.index, self.run = op, index, run  # run: the op's handler in the dispatch table
        self.members = members  # a bucket's collectives (op is the first), run as one; None: op alone
        self.attrs = decode_attrs(op.attrs)
        self.seeded = any(isinstance(v, SeedMarker) for v in self.attrs.values())  # dropout: per-piece seeds
        self.piece = 0                 # the next piece to fire for
        self.inputs: list[int] = []    # per-piece input values (persistent ones need no register)
        self.outputs = [v for m in members for v in m.outputs] if members else list(op.outputs)
        self.busy = False              # a communication schedule in flight
        self.name = op.op
        self.late = int(op.phase != "forward")  # scheduling priority: forward work first


class RankRuntime:
    """Runs one rank's plan: its actors for every piece, then its optimizer phase.

    ``comm`` is this rank's transport endpoint; ``index`` maps global ranks to communicator
    ranks; ``seeds[p][j]`` is dropout seed ``j`` of piece ``p``.
    """

    def __init__(self, rank_plan, comm: Communicator, index: dict[int, int] | None = None,
                 timeout: float = 60.0, record: bool = True, clock: Callable[[], float] = time.time):
        self.rp, self.comm, self.timeout, self.record = rank_plan, comm, timeout, record
        self.clock = clock  # the firings' timestamps: wall time, or the cost model's simulated clock
        self.index = index if index is not None else {r: r for r in range(comm.world_size)}
        self.decls = {v.id: (tuple(v.shape), np.dtype(v.dtype)) for v in rank_plan.values}
        # where each value lives, and the array module its kernels run on (NumPy; CuPy on cuda)
        self.devices = {v.id: v.device for v in rank_plan.values if v.device and v.device != "cpu"}
        self.xps = {vid: array_module(d) for vid, d in self.devices.items()}
        self.registers = {v.id: max(1, getattr(v, "registers", 1) or 1) for v in rank_plan.values}
        # at most this many micro-batches in flight on the rank (the plan's register count)
        self.window = max(self.registers.values(), default=1)
        self.timeline: list[tuple[int, int, float, float]] = []  # (op, piece, start, end) when recording
        self.on_phase: Callable[[str], None] | None = None  # called as each phase starts (fault injection)
        self.phases_entered: set[str] = set()
        self.current: str = "idle"      # what this rank is doing, for failure reports
        self.in_per_step = False        # running the per-step ops (the cost model's waits are communication)
        ops = list(rank_plan.ops)
        self.compute_ops = [op for op in ops if op.phase != "optimizer"]
        self.optimizer_ops = [op for op in ops if op.phase == "optimizer"]
        self.hoisted: list | None = None  # ops computed once per step (built on the first run)
        # The dispatch table: how every op runs, by kind (local ops by name), alike for the per-step
        # ops, the pieces' actors and the optimizer units. handler(op, attrs, ins, held, piece)
        # returns the op's outputs, or a _Comm (a schedule and its group) that the caller drives:
        # blocking for per-step ops, in flight for actors and optimizer units. ``held`` is the
        # first output's array so far (None before its first writer): receives and copies add
        # their region to it.
        self.dispatch: dict[str, Callable] = {
            "compute": self._compute, "collective": self._collective, "send": self._send, "recv": self._recv,
            "update": self._update, "assign": self._assign, "fill_zeros": self._fill_zeros,
            "copy_region": self._copy_region,
            **{name: self._boxing_step for name, (kind, _) in STEPS.items() if kind == "local"},
        }
        # A transport that matches calls by order (NCCL): the communication ops are handed to an
        # Issuer, which runs them in the order the plan fixes, on a thread of its own.
        self.ordered = bool(getattr(comm, "ordered", False))
        self.order = order_of(rank_plan)
        self.issuer: Issuer | None = None
        if self.ordered:
            if not self.order and any(op.kind in COMMUNICATION for op in ops):
                raise ArgumentError(f"rank {rank_plan.rank}: the {type(comm).__name__} transport matches calls by "
                                    f"order, and this plan fixes none (RankPlan.comm_order is empty); lower it for "
                                    f"cuda placements, or run scheduler.nccl_order.attach(plan)")
            self.issuer = Issuer(comm, self.index[rank_plan.rank], name=f"flowsys-comm-{rank_plan.rank}")
            self.dispatch.update(collective=self._collective_ordered, send=self._send_ordered,
                                 recv=self._recv_ordered)

    # ------------------------------------------------------------------------------ wiring
    def _build(self) -> None:
        """Ops the plan marks ``per_step`` (they read only parameters, constants and what is
        computed from them alone, such as a weight's transpose) run once per step before the
        pieces; every other op of the compute phase is an actor."""
        self.hoisted = [op for op in self.compute_ops if op.per_step]
        self.hoisted_attrs = {op.id: decode_attrs(op.attrs) for op in self.hoisted}
        self.hoisted_writers = Counter(v for op in self.hoisted for v in op.outputs)
        # a bucket of the pieces' collectives is one actor, at its first member's place
        buckets: dict[int, list] = {}
        for op in self.compute_ops:
            if op.bucket and not op.per_step:
                buckets.setdefault(op.bucket, []).append(op)
        self.actors = []
        for op in self.compute_ops:
            if op.per_step or (op.bucket and op is not buckets[op.bucket][0]):
                continue
            members = buckets[op.bucket] if op.bucket else None
            run = self._bucket_handler(op) if members else self._handler(op)
            self.actors.append(_Actor(op, len(self.actors), run, members))
        produced: dict[int, list[_Actor]] = {}
        for a in self.actors:
            for v in a.outputs:
                produced.setdefault(v, []).append(a)
        self.writers = {v: len(ws) for v, ws in produced.items()}
        self.consumers: dict[int, list[_Actor]] = {v: [] for v in produced}
        for a in self.actors:
            a.inputs = [v for v in dict.fromkeys(v for m in a.members or [a.op] for v in m.inputs) if v in produced]
            for v in a.inputs:
                self.consumers[v].append(a)
        self.producers = produced
        self.receivers = [a for a in self.actors if a.op.kind == "recv"]
        # activations: forward values a backward op reads; the pieces holding one are in flight
        self.saved = {v for v, ws in produced.items() if any(w.op.phase == "forward" for w in ws)
                      and any(c.op.phase == "backward" for c in self.consumers[v])}
        self._build_optimizer()

    def _build_optimizer(self) -> None:
        """The optimizer phase as units: one op, or the all-reduces of one gradient bucket (run as
        one collective over their concatenation); each waits for its inputs."""
        units: list[list] = []
        buckets: dict[int, list] = {}
        for op in self.optimizer_ops:
            if not op.bucket:
                units.append([op])
                continue
            if op.bucket not in buckets:
                units.append(buckets.setdefault(op.bucket, []))
            buckets[op.bucket].append(op)
        self.units = units
        self.unit_inputs = [list(dict.fromkeys(v for op in u for v in op.inputs)) for u in units]
        self.awaiting: dict[int, list[int]] = {}  # value -> the units reading it
        for j, ins in enumerate(self.unit_inputs):
            for v in ins:
                self.awaiting.setdefault(v, []).append(j)
        self.opt_writers = Counter(v for op in self.optimizer_ops for v in op.outputs)
        self.opt_attrs = {op.id: decode_attrs(op.attrs) for op in self.optimizer_ops}
        self.unit_run = [self._handler(u[0]) for u in units]
        # The pieces' ops read parameters in place (and per-step ops' views of them): a unit that
        # writes one (an update, ZeRO's assign) waits until every piece is done.
        params = set(self.rp.variables.values()) | {v for op in self.hoisted for v in op.outputs}
        for op in self.optimizer_ops:
            if op.op == "identity" and op.inputs[0] in params:
                params.update(op.outputs)
        self.writes_parameter = [any((op.kind == "update" or op.op == "assign") and op.inputs[0] in params
                                     for op in u) for u in units]

    # ---------------------------------------------------------------------------------- run
    def run(self, fed: dict[int, Any], micro_batches: int, grads: dict[int, int], update: Callable,
            seeds: Sequence[Sequence[int]], outputs: Sequence[int] = ()) -> list:
        """Run one step; return this rank's ``outputs`` averaged over the pieces (None where a
        value does not live here). ``update(op, variable_array, grad_array)`` applies an update."""
        k = micro_batches
        inputs = set(self.rp.inputs)
        self.phases_entered: set[str] = set()
        fed = self.place(fed)
        self.persistent = {vid: a for vid, a in fed.items() if vid not in inputs}
        if self.hoisted is None:
            self._build()
        if self.issuer is not None:
            self.issuer.begin(self.order)
        self.in_per_step = True
        self._run_per_step()  # once per step, before the pieces
        self.in_per_step = False
        self.piece_inputs = {vid: [_micro(a, i, k) for i in range(k)] for vid, a in fed.items() if vid in inputs}
        self.seeds = seeds
        self.k = k
        # registers: (value, piece) -> array, with the writers and consumers still to come
        self.regs: dict[tuple[int, int], np.ndarray] = {}
        self.written: dict[tuple[int, int], int] = {}
        self.pending_reads: dict[tuple[int, int], int] = {}
        self.held: dict[int, int] = {v: 0 for v in self.producers}
        # sinks: step outputs and gradients, summed over pieces as they complete
        self.sinks = {vid for vid in list(outputs) + list(grads.values()) if vid in self.producers}
        self.grad_values = {g for g in grads.values() if g in self.producers}
        self.sums: dict[int, Any] = {}
        self.inflight: list[_Inflight] = []  # communication schedules waiting for a message
        self._seen = -1  # the mailbox's arrivals when the schedules in flight were last looked at
        # schedules in flight by the (source, tag) of the message each waits for, and those a
        # message came for (actors.runtime's _collect fills them from the mailbox's drain)
        self._waiting: dict[tuple[int, int], Any] = {}
        self._due_pieces: list[_Inflight] = []
        self._due_units: list[_Phased] = []
        self.comm.mailbox.drain()  # what came before this step belongs to no schedule of it yet
        for a in self.actors:
            a.piece, a.busy = 0, False
        self._holding: dict[int, int] = {}  # piece -> activations of it held
        self._open: dict[int, int] = {}  # pieces entered and not done on this rank -> firings left
        self._window_blocked: dict[int, _Actor] = {}  # actors whose piece could not enter the full window
        self.peak_in_flight = 0  # most micro-batches holding activations at once, this step
        self._begin_optimizer(update)
        self._loop()
        self._finish_optimizer()
        if self.issuer is not None:
            self.issuer.finish()
        self.current = "idle"
        outs = []
        for vid in outputs:
            if vid in self.sums:
                outs.append((self.sums[vid] / k).astype(self.decls[vid][1]) if k > 1 else self.sums[vid])
            elif vid in self.persistent:
                outs.append(self.persistent[vid])
            elif vid in self.env:  # made in the optimizer phase (the clipped gradients' global norm)
                outs.append(self.env[vid])
            else:
                outs.append(None)
        return outs

    def place(self, fed: dict[int, Any]) -> dict[int, Any]:
        """``fed`` with every array on its value's device (a copy to the GPU for a ``cuda`` value;
        what is there already stays): the worker keeps the placed parameters between steps."""
        if not self.devices:
            return fed
        return {vid: to_device(a, self.devices[vid]) if vid in self.devices else a for vid, a in fed.items()}

    def close(self) -> None:
        """Stop the communication thread (ordered transports)."""
        if self.issuer is not None:
            self.issuer.close()

    def _enter(self, phase: str) -> None:
        """The step's first op of ``phase`` starts (``on_phase``: the fault-injection hook)."""
        self.phases_entered.add(phase)
        if self.on_phase is not None:
            self.on_phase(phase)

    # ------------------------------------------------------------------- the optimizer phase
    def _begin_optimizer(self, update: Callable) -> None:
        """Ready the optimizer phase for a step: its values are the persistent ones, then each
        gradient (averaged over the pieces) as it becomes final, then what its units produce."""
        self.env = dict(self.persistent)
        self.update = update
        self.missing = [sum(v not in self.env for v in ins) for ins in self.unit_inputs]
        self.opt_ready = deque(j for j, m in enumerate(self.missing) if not m)
        self.opt_deferred: list[int] = []    # units writing a parameter while pieces still run
        self.opt_recvs: list[int] = []       # receives whose message has not arrived
        self.opt_inflight: list[_Phased] = []
        self.opt_written: Counter = Counter()
        self.opt_left = len(self.units)
        self.computing = True

    def _final(self, v: int, x: np.ndarray) -> None:
        """Gradient ``v`` is summed over every piece: the optimizer phase may use it."""
        self.env[v] = x if self.k == 1 else (x / self.k).astype(x.dtype)
        self._landed(v)

    def _landed(self, v: int) -> None:
        for j in self.awaiting.get(v, ()):
            self.missing[j] -= 1
            if not self.missing[j]:
                self.opt_ready.append(j)

    def _drive_optimizer(self) -> bool:
        """Start the optimizer units whose inputs are here and advance its collectives whose
        awaited message arrived; whether anything happened. Collectives stay in flight together
        (tagged with their channel and ``OPTIMIZER_PIECE``, apart from the pieces' messages)."""
        mailbox = self.comm.mailbox
        progressed = False
        # what is waiting for a message can move only if one came since the last look (a
        # schedule that moves takes every message already here before it waits again)
        self._collect()  # receives whose message came are ready; collectives it moved are due
        while self.opt_ready:
            j = self.opt_ready.popleft()
            op = self.units[j][0]
            if self.computing and self.writes_parameter[j]:
                self.opt_deferred.append(j)
            elif op.kind == "recv" and not self.ordered and not mailbox.ready(*(key := (self.index[op.peer], tag(op.channel, OPTIMIZER_PIECE)))):
                self.opt_recvs.append(j)
                self._waiting[key] = _Receiving(j)
            else:
                self._run_unit(j)
                progressed = True
        due, self._due_units = self._due_units, []
        for e in due:
            if e.peer is not None and self._pump_unit(e):
                progressed = True
                if e.peer is None:
                    self.opt_inflight.remove(e)
        return progressed

    def _pump_unit(self, e: _Phased) -> bool:
        """:meth:`_pump` for an optimizer collective: whether it moved (``e.peer`` is None once
        it is done)."""
        moved, finished = self._pump(e, lambda x, message: self._advance_unit(x, message) or None)
        if finished:
            e.peer = None
        return moved

    def _collect(self) -> None:
        """Look at the messages that came since the last look (the mailbox's ``drain``) and mark
        the schedules waiting for them due: the pieces' and the optimizer's conversations in
        flight are many (a bucket's, a ring's), so each arrival moves only its own."""
        mailbox = self.comm.mailbox
        if mailbox.arrivals == self._seen:  # nothing came
            return
        self._seen = mailbox.arrivals
        keys = mailbox.drain()
        if keys is None:  # more came than the mailbox kept: every conversation may have moved
            self._due_pieces.extend(self.inflight)
            self._due_units.extend(self.opt_inflight)
            self.opt_ready.extend(self.opt_recvs)  # each looks at its mailbox again
            self.opt_recvs.clear()
            return
        for key in keys:
            e = self._waiting.pop(key, None)
            if type(e) is _Receiving:  # an optimizer-phase receive: its message is here
                self.opt_recvs.remove(e.unit)
                self.opt_ready.append(e.unit)
            elif e is not None:
                (self._due_pieces if type(e) is _Inflight else self._due_units).append(e)

    def _run_unit(self, j: int) -> None:
        ops, env = self.units[j], self.env
        op, start = ops[0], self.clock()
        self.current = f"{op.op} (op {op.id}, optimizer phase)"
        if "optimizer" not in self.phases_entered:
            self._enter("optimizer")
        # a bucket's all-reduces run as one collective over their concatenation
        ins = ([env[v] for v in op.inputs] if len(ops) == 1
               else [np.concatenate([env[o.inputs[0]].reshape(-1) for o in ops])])
        out = self.unit_run[j](op, self.opt_attrs[op.id], ins, env.get(op.outputs[0]) if op.outputs else None,
                               OPTIMIZER_PIECE)
        if type(out) is _Comm:  # in flight with the pieces and the other units
            e = _Phased(j, out.gen, tag(op.bucket - 1 if op.bucket else op.channel, OPTIMIZER_PIECE), out.group, start)
            if not self._advance_unit(e, None):
                self._pump_unit(e)  # its first message may be here already
                if e.peer is not None:
                    self.opt_inflight.append(e)
            return
        for v, o in zip(op.outputs, out):
            env[v] = o
        self._note(op, OPTIMIZER_PIECE, start)
        self._unit_done(ops)

    def _advance_unit(self, e: _Phased, value) -> bool:
        """Step an optimizer collective until it waits for a message (False) or is done; a
        bucket's result is split back into its members' outputs."""
        done, got = self._drive(e.gen, value, e.group, e.tag)
        if done:
            ops = self.units[e.unit]
            if len(ops) == 1:
                for v in ops[0].outputs:  # a collective's result (a send has none)
                    self.env[v] = got
            else:
                flat, at = got.reshape(-1), 0
                for o in ops:
                    shape = self.decls[o.outputs[0]][0]
                    n = int(np.prod(shape))
                    self.env[o.outputs[0]] = flat[at:at + n].reshape(shape)
                    at += n
            end = self.clock()
            for o in ops:  # one firing of the bucket's collective, recorded for each member
                self._note(o, OPTIMIZER_PIECE, e.start, end)
            self._unit_done(ops)
            return True
        e.peer = got
        return False

    def _unit_done(self, ops: list) -> None:
        self.opt_left -= 1
        for op in ops:
            for v in op.outputs:  # readable once all its writers (receives, copies) have run
                self.opt_written[v] += 1
                if self.opt_written[v] == self.opt_writers[v]:
                    self._landed(v)

    def _finish_optimizer(self) -> None:
        """The pieces are done: run the units that write parameters and whatever is left, in
        dataflow order, waiting for messages as they come."""
        self.computing = False
        self.opt_ready.extend(self.opt_deferred)
        self.opt_deferred.clear()
        mailbox = self.comm.mailbox
        seen, idle_since = mailbox.arrivals, None
        while self.opt_left:
            if self._drive_optimizer():
                idle_since = None
                continue
            now = time.monotonic()
            idle_since = idle_since or now
            if now - idle_since > self.timeout:
                raise Stalled(self.rp.rank, self._optimizer_waits(), self.timeout, self._where(""))
            self._check_stuck(now - idle_since)
            try:
                seen = mailbox.wait(seen, min(0.05, self.timeout))
            except CommError as e:  # told to stop (another rank failed) or a peer unreachable
                raise Stalled(self.rp.rank, self._optimizer_waits(), self.timeout, self._where(str(e))) from e

    def _optimizer_waits(self) -> list[dict]:
        waits = []
        for e in self.opt_inflight:
            op = self.units[e.unit][0]
            waits.append(dict(op=op.id, name=op.op, piece=OPTIMIZER_PIECE, peer=e.peer, group=list(op.group),
                              channel=op.channel))
        for j in self.opt_recvs:
            op = self.units[j][0]
            waits.append(dict(op=op.id, name="recv", piece=OPTIMIZER_PIECE, peer=op.peer, group=[], channel=op.channel))
        return waits

    def _loop(self) -> None:
        total = len(self.actors) * self.k
        done = 0
        # forward work first, then the oldest piece: with the window this is 1F1B (a stage that
        # may take a new micro-batch runs its forward before the backward of an older one)
        ready: list[tuple[int, int, int]] = [(a.late, 0, a.index) for a in self.actors]
        heapq.heapify(ready)
        queued = set(range(len(self.actors)))
        mailbox = self.comm.mailbox
        seen = polled = mailbox.arrivals
        idle_since = None

        def wake(actors) -> None:
            for b in actors:
                if b.index not in queued and b.piece < self.k and not b.busy:
                    queued.add(b.index)
                    heapq.heappush(ready, (b.late, b.piece, b.index))

        while done < total:
            progressed = False
            while ready:
                *_, i = heapq.heappop(ready)
                queued.discard(i)
                a = self.actors[i]
                if a.busy or a.piece >= self.k or not self._can_fire(a):
                    continue
                self.current = f"{a.op.op} (op {a.op.id}, piece {a.piece})"
                if a.op.phase not in self.phases_entered:
                    self._enter(a.op.phase)
                woken = self._fire(a)
                progressed = True
                if not a.busy:
                    done += 1
                    woken.append(a)
                wake(woken)
                # between firings, not only once backward is done: a message that came moves its
                # collective on (the pieces' gradient reduce-scatters, the optimizer's buckets),
                # and a gradient that became final starts its reduction
                if mailbox.arrivals != polled:
                    polled = mailbox.arrivals
                    done += self._arrived(wake)[1]
                    self._drive_optimizer()
                elif self.opt_ready:
                    self._drive_optimizer()
            polled = mailbox.arrivals
            moved, finished = self._arrived(wake)
            done += finished
            progressed = self._drive_optimizer() or moved or progressed or bool(self._due_pieces)
            # receives whose message arrived and that may fire (not when the rank's window or the
            # receive's register is full: that would spin instead of waiting)
            if not progressed:
                for a in self.receivers:
                    if not a.busy and a.piece < self.k and a.index not in queued and self._can_fire(a):
                        queued.add(a.index)
                        heapq.heappush(ready, (a.late, a.piece, a.index))
                        progressed = True
            if progressed:
                idle_since = None
                continue
            now = time.monotonic()
            idle_since = idle_since or now
            if now - idle_since > self.timeout:
                raise self._stalled()
            self._check_stuck(now - idle_since)
            try:
                seen = mailbox.wait(seen, min(0.05, self.timeout))
            except CommError as e:  # told to stop (another rank failed) or a peer unreachable
                raise self._stalled(str(e)) from e

    def _arrived(self, wake: Callable) -> tuple[bool, int]:
        """Advance the pieces' communication in flight whose awaited message is here: whether
        any moved, and how many firings it completed (their actors are woken)."""
        moved, finished = False, 0
        self._collect()
        due, self._due_pieces = self._due_pieces, []
        for e in due:
            stepped, woken = self._pump(e)
            moved = moved or stepped
            if woken is not None:
                self.inflight.remove(e)
                finished += 1
                wake(woken + [e.actor])
        return moved, finished

    def _pump(self, e, advance: Callable | None = None, waiting: dict | None = None) -> tuple[bool, Any]:
        """Advance a schedule in flight (a piece's, an optimizer unit's, a per-step op's) over
        every message of it already here, then file it in ``waiting`` (default: the step's)
        under the message it waits for: whether it moved, and ``advance``'s result once it is
        done (None while it waits). ``advance(e, message)`` (default: a piece's) returns None
        until the schedule is done."""
        advance = advance or self._advance
        waiting = self._waiting if waiting is None else waiting
        mailbox, moved = self.comm.mailbox, False
        key = self._awaited(e)
        if waiting.get(key) is e:
            del waiting[key]
        while mailbox.ready(*key):
            moved = True
            result = advance(e, mailbox.try_take(*key))
            if result is not None:
                return True, result
            key = self._awaited(e)
        waiting[key] = e
        return moved, None

    def _awaited(self, e) -> tuple[int, int]:
        """The (communicator rank, tag) of the message schedule ``e`` waits for."""
        if type(e) is _Inflight:
            return self.index[e.step.peer_rank], e.step.tag
        return self.index[e.peer], e.tag

    # ------------------------------------------------------------------------------ firing
    def _can_fire(self, a: _Actor) -> bool:
        p = a.piece
        if p not in self._open and len(self._open) >= self.window:
            self._window_blocked[a.index] = a  # woken when a piece is done here
            return False  # the rank already works on as many micro-batches as it has registers
        for v in a.inputs:
            if self.written.get((v, p), 0) < self.writers[v]:
                return False
        for v in a.outputs:
            if (v, p) not in self.regs and self.held.get(v, 0) >= self.registers.get(v, 1):
                return False
        if a.op.kind == "recv" and not self.ordered:
            return self.comm.mailbox.ready(self.index[a.op.peer], tag(a.op.channel, p))
        return True

    def _value(self, v: int, p: int):
        if v in self.persistent:
            return self.persistent[v]
        if v in self.piece_inputs:
            return self.piece_inputs[v][p]
        return self.regs[(v, p)]

    def _fire(self, a: _Actor) -> list[_Actor]:
        """Fire ``a`` for its next piece; the actors that may have become ready."""
        op, p = a.op, a.piece
        start = self.clock()
        if p not in self._open:
            self._open[p] = len(self.actors)  # firings left before this piece is done here
        for v in a.outputs:  # claim the output registers
            if (v, p) not in self.regs:
                self.regs[(v, p)] = None
                self.held[v] += 1
                if v in self.saved:
                    self._holding[p] = self._holding.get(p, 0) + 1
                    self.peak_in_flight = max(self.peak_in_flight, len(self._holding))
        attrs = {k: self.seeds[p][v] if isinstance(v, SeedMarker) else v for k, v in a.attrs.items()} \
            if a.seeded else a.attrs
        outputs = a.outputs
        if a.members:  # a bucket: every member's input
            out = a.run(a.members, [self._value(m.inputs[0], p) for m in a.members], p)
        else:
            out = a.run(op, attrs, [self._value(v, p) for v in op.inputs],
                        self.regs[(outputs[0], p)] if outputs else None, p)
        if type(out) is _Comm:  # in flight: completes when its last message is in
            return self._start(a, out, start)
        for v, o in zip(outputs, out):
            self.regs[(v, p)] = o
        return self._complete(a, p, start)

    def _complete(self, a: _Actor, p: int, start: float) -> list[_Actor]:
        """``a`` has finished piece ``p``: publish its outputs, return its inputs' registers."""
        woken: list[_Actor] = []
        for v in a.outputs:
            key = (v, p)
            self.written[key] = self.written.get(key, 0) + 1
            if self.written[key] == self.writers[v]:  # readable: hand it to the consumers
                if v in self.sinks:
                    x = self.regs[key]
                    if v in self.sums:
                        self.sums[v] = self.sums[v] + x
                    elif self.k == 1 and not self.consumers[v] and type(x) is np.ndarray and x.flags.owndata:
                        self.sums[v] = x  # one piece, its own memory, read by nothing else: kept, not copied
                    else:
                        self.sums[v] = x.copy()
                    # a value's pieces complete in order (each writer fires them in order)
                    if p == self.k - 1 and v in self.grad_values:
                        self._final(v, self.sums[v])
                readers = len(self.consumers[v])
                if readers:
                    self.pending_reads[key] = readers
                    woken.extend(self.consumers[v])
                else:
                    self._free(v, p, woken)
        for v in a.inputs:
            key = (v, p)
            self.pending_reads[key] -= 1
            if self.pending_reads[key] == 0:
                del self.pending_reads[key]
                self._free(v, p, woken)
        a.piece += 1
        a.busy = False
        self._open[p] -= 1
        if not self._open[p]:  # the piece is done on this rank: the next may enter
            del self._open[p]
            woken.extend(self._window_blocked.values())  # the actors the full window held back
            self._window_blocked.clear()
        if a.members:  # one firing of the bucket's collective, recorded for each member
            end = self.clock()
            for m in a.members:
                self._note(m, p, start, end)
        else:
            self._note(a.op, p, start)
        return woken

    def _free(self, v: int, p: int, woken: list[_Actor]) -> None:
        del self.regs[(v, p)]
        del self.written[(v, p)]
        self.held[v] -= 1
        if v in self.saved:
            self._holding[p] -= 1
            if not self._holding[p]:
                del self._holding[p]
        woken.extend(self.producers[v])

    def _note(self, op, piece: int, start: float, end: float | None = None) -> None:
        if self.record:
            self.timeline.append((op.id, piece, start, self.clock() if end is None else end))

    # ------------------------------------------------------------------- communication actors
    def _start(self, a: _Actor, comm: _Comm, start: float) -> list[_Actor]:
        a.busy = True
        entry = _Inflight(a, comm.gen, None, start, comm.group)
        woken = self._advance(entry, None)
        if woken is None:
            _, woken = self._pump(entry)  # what it waits for may be here already
        if woken is None:
            self.inflight.append(entry)
            return []
        return woken

    def _advance(self, e: _Inflight, value) -> list[_Actor] | None:
        """Step a schedule until it waits for a message (None) or returns (the woken actors)."""
        a, p = e.actor, e.actor.piece
        t = tag(a.op.channel, p)
        done, got = self._drive(e.gen, value, e.group, t)
        if done:
            # a collective's result (a send has none); a bucket's, one per member
            for v, x in zip(a.outputs, got if a.members else [got] * len(a.outputs)):
                self.regs[(v, p)] = x
            return self._complete(a, p, e.start)
        e.step = _Awaited(got, t)
        return None

    def _drive(self, gen, value, group: list, t: int) -> tuple[bool, Any]:
        """Step a communication schedule, posting its sends (tagged ``t``), until it waits for
        a message — (False, the global rank it waits for) — or returns: (True, its result)."""
        try:
            step = gen.send(value)
            while isinstance(step, alg.Send):
                self.comm.post(step.array, self.index[group[step.peer]], t)
                step = gen.send(None)
        except StopIteration as stop:
            return True, stop.value
        if type(step) is Issue:  # ordered: the issuer runs it in its turn and files a marker here
            self.issuer.submit(step.event, step.job, t)
            return False, self.rp.rank
        return False, group[step.peer]

    def _run_per_step(self) -> None:
        """The per-step ops, before the pieces, in dataflow order: an op runs once its inputs are
        here (a value with several writers, such as a move assembled from receives, once all
        have run); its communication starts then and stays in flight with the others', so ZeRO
        3's parameter gathers go out together instead of one round trip after another."""
        env, mailbox, piece = self.persistent, self.comm.mailbox, PER_STEP_PIECE
        hoisted, writers = self.hoisted, self.hoisted_writers
        written: Counter = Counter()
        # an op runs once its inputs are here: a count of the missing ones per op, and the ops
        # each value still owes (values are final when all their writers have run)
        missing, owed = [0] * len(hoisted), defaultdict(list)
        for j, op in enumerate(hoisted):
            for v in dict.fromkeys(op.inputs):
                if not (v in env and writers[v] == 0):
                    missing[j] += 1
                    owed[v].append(j)
        queue = deque(j for j, m in enumerate(missing) if not m)
        waiting: dict[tuple[int, int], Any] = {}  # (source, tag) -> a receive's op index, or a schedule
        left = [len(hoisted)]
        mailbox.drain()  # from here on, each message that comes moves only its own conversation

        def done(op, outs, start: float, end: float | None = None) -> None:
            for v, o in zip(op.outputs, outs):
                env[v] = o
                written[v] += 1
                if written[v] == writers[v]:
                    for j in owed.pop(v, ()):
                        missing[j] -= 1
                        if not missing[j]:
                            queue.append(j)
            self._note(op, piece, start, end)
            left[0] -= 1

        def advance(e: _Phased, value) -> bool:  # until it waits for a message (False) or is done
            finished, got = self._drive(e.gen, value, e.group, e.tag)
            if finished:
                op = hoisted[e.unit]
                done(op, [got] * len(op.outputs), e.start)  # a collective's result (a send has none)
                return True
            e.peer = got
            return False

        def pump(e: _Phased) -> bool:  # take every message of it already here, then file it
            return self._pump(e, lambda x, message: advance(x, message) or None, waiting)[0]

        def per_step_waits() -> list[dict]:  # what this rank waits for, for the failure report
            waits = [dict(op=hoisted[x.unit].id, name=hoisted[x.unit].op, piece=piece, peer=x.peer,
                          group=list(hoisted[x.unit].group), channel=hoisted[x.unit].channel)
                     for x in waiting.values() if type(x) is not int]
            return waits + [dict(op=hoisted[x].id, name="recv", piece=piece, peer=hoisted[x].peer, group=[],
                                 channel=hoisted[x].channel) for x in waiting.values() if type(x) is int]

        seen, idle_since = mailbox.arrivals, None
        while left[0]:
            progressed = False
            while queue:
                j = queue.popleft()
                op = hoisted[j]
                if op.kind == "recv" and not self.ordered:
                    key = (self.index[op.peer], tag(op.channel, piece))
                    if not mailbox.ready(*key):
                        waiting[key] = j
                        continue
                progressed, start = True, self.clock()
                self.current = f"{op.op} (op {op.id}, per step)"
                if op.phase not in self.phases_entered:
                    self._enter(op.phase)
                out = self._handler(op)(op, self.hoisted_attrs[op.id], [env[v] for v in op.inputs],
                                        env.get(op.outputs[0]) if op.outputs else None, piece)
                if type(out) is _Comm:
                    e = _Phased(j, out.gen, tag(op.channel, piece), out.group, start)
                    if not advance(e, None):
                        pump(e)
                else:
                    done(op, out, start)
            keys = mailbox.drain()
            if keys is None:  # more came than the mailbox kept: look at every conversation
                due = list(waiting.values())
                waiting.clear()
            else:
                due = [waiting.pop(k) for k in keys if k in waiting]
            for x in due:
                if type(x) is int:
                    queue.append(x)  # a receive whose message came
                    progressed = True
                elif pump(x):
                    progressed = True
            if progressed or queue:
                idle_since = None
                continue
            now = time.monotonic()
            idle_since = idle_since or now
            if now - idle_since > self.timeout:
                raise Stalled(self.rp.rank, per_step_waits(), self.timeout, self._where(""))
            self._check_stuck(now - idle_since)
            try:
                seen = mailbox.wait(seen, min(0.05, self.timeout))
            except CommError as err:  # told to stop (another rank failed) or a peer unreachable
                raise Stalled(self.rp.rank, per_step_waits(), self.timeout, self._where(str(err))) from err

    # ------------------------------------------------------------------------ the handlers
    def _handler(self, op) -> Callable:
        key = op.op if op.kind == "local" else op.kind
        run = self.dispatch.get(key)
        if run is None:
            raise ArgumentError(f"rank {self.rp.rank}: op {op.id} ({op.kind} {op.op!r}) has no handler in the "
                                f"runtime (kinds: {', '.join(self.dispatch)}); re-lower the plan with this flowsys")
        return run

    def _bucket_handler(self, op) -> Callable:
        if op.kind == "collective" and op.op in ("all_gather", "reduce_scatter"):
            return self._gather_bucket if op.op == "all_gather" else self._reduce_scatter_bucket
        raise ArgumentError(f"rank {self.rp.rank}: op {op.id} ({op.kind} {op.op!r}) is in a bucket of the pieces' "
                            f"collectives, which fuses only all_gather and reduce_scatter; re-lower the plan with "
                            f"this flowsys")

    def _gather_bucket(self, members: list, ins: list, piece: int) -> _Comm:
        """One all-gather of the concatenation of this rank's flattened shards; the result
        (every rank's chunk, in group order) is split back into each member's gathered value
        along its own axis, from every rank's shard shape (the ``shards`` attribute)."""
        group = list(members[0].group)
        xp = self.xps.get(members[0].inputs[0], np)
        flat = xp.concatenate([x.reshape(-1) for x in ins])
        layout = []
        for m in members:
            attrs = decode_attrs(m.attrs)
            layout.append((parse(attrs["src"]).axis, [tuple(s) for s in attrs["shards"]]))
        if self.ordered:  # NCCL's all-gather (uneven chunks: the communicator pads them)
            ranks = [self.index[r] for r in group]
            schedule = self._issued(event_key(members[0], piece),
                                    Job("call", call=lambda: self.comm.all_gather(flat, 0, ranks)))
            return _Comm(_split_gathered(schedule, layout, xp), [self.rp.rank])
        return _Comm(_split_gathered(alg.ring_all_gather(group.index(self.rp.rank), len(group), flat), layout, xp),
                     group)

    def _reduce_scatter_bucket(self, members: list, ins: list, piece: int) -> _Comm:
        """One reduce-scatter whose chunk ``i`` is the concatenation of every member's chunk
        ``i`` (its ``array_split`` piece along its own axis), as each member's own would cut it."""
        group = list(members[0].group)
        n, me = len(group), group.index(self.rp.rank)
        xp = self.xps.get(members[0].inputs[0], np)
        cuts = []
        for m, x in zip(members, ins):
            axis = parse(decode_attrs(m.attrs)["dst"]).axis
            cuts.append([x[(slice(None),) * (axis % x.ndim) + (slice(*bounds(x.shape[axis], n, i)),)]
                         for i in range(n)])
        chunks = [xp.concatenate([c[i].reshape(-1) for c in cuts]) for i in range(n)]
        shapes = [c[me].shape for c in cuts]
        if self.ordered:  # NCCL moves equal counts: every chunk padded to the longest, cut back after
            width = max(c.size for c in chunks)
            padded = xp.zeros((n, width), dtype=chunks[0].dtype)
            for i, c in enumerate(chunks):
                padded[i, :c.size] = c
            ranks, mine = [self.index[r] for r in group], chunks[me].size
            schedule = self._issued(event_key(members[0], piece), Job(
                "call", call=lambda: self.comm.reduce_scatter(padded.reshape(-1), 0, ranks)[:mine]))
            return _Comm(_split_reduced(schedule, shapes), [self.rp.rank])
        return _Comm(_split_reduced(alg.ring_reduce_scatter_chunks(me, n, chunks), shapes), group)

    # ----------------------------------------------------- the ordered (NCCL) communication
    def _issued(self, event: tuple, job: Job):
        """A schedule that hands ``job`` to the issuer as ``event`` and returns its result."""
        yield Issue(event, job)
        return self.issuer.result(event)

    def _collective_ordered(self, op, attrs, ins, held, piece):
        """The plan's collective as the transport's own (NCCL's ``allReduce``, ...), in its turn."""
        native = _NATIVE.get(op.op)
        if native is None:
            raise CommError(f"unknown collective {op.op!r} in the plan (collectives: {', '.join(_NATIVE)})")
        ranks, x = [self.index[r] for r in op.group], ins[0]
        job = Job("call", call=lambda: native(self.comm, x, ranks, attrs))
        return _Comm(self._issued(event_key(op, piece), job), [self.rp.rank])

    def _send_ordered(self, op, attrs, ins, held, piece):
        x = ins[0]
        data = x if attrs["relay"] else x[_region(attrs["box"], attrs["src_origin"])]
        data = module_of(data).asarray(data)
        if not data.flags.c_contiguous:  # (ascontiguousarray alone would make a 0-d array 1-d)
            data = module_of(data).ascontiguousarray(data)
        job = Job("send", array=data, peer=self.index[op.peer])
        return _Comm(self._issued(event_key(op, piece), job), [self.rp.rank])

    def _recv_ordered(self, op, attrs, ins, held, piece):
        return _Comm(self._received(op, attrs, piece), [self.rp.rank])

    def _received(self, op, attrs, piece):
        data = yield from self._issued(event_key(op, piece), Job("recv", peer=self.index[op.peer]))
        v = op.outputs[0]  # what the value's other writers (copies, receives) filled in meanwhile
        held = self.env.get(v) if piece == OPTIMIZER_PIECE else \
            self.persistent.get(v) if piece == PER_STEP_PIECE else self.regs.get((v, piece))
        return self._add_region(op, attrs, held, data)

    def _compute(self, op, attrs, ins, held, piece):
        spec = OPS[op.op]
        xp = self.xps.get(op.outputs[0], np) if self.xps and op.outputs else np
        out = spec.kernel(xp, *ins, **attrs)
        results = []
        for v, o in zip(op.outputs, out if spec.multi_output else (out,)):
            o = xp.asarray(o)
            dtype = self.decls[v][1]
            results.append(o if o.dtype == dtype else o.astype(dtype))
        return results

    def _collective(self, op, attrs, ins, held, piece):
        group = list(op.group)
        return _Comm(plan_collective(op.op, attrs, group.index(self.rp.rank), len(group), ins[0]), group)

    def _send(self, op, attrs, ins, held, piece):
        x = ins[0]
        data = x if attrs["relay"] else x[_region(attrs["box"], attrs["src_origin"])]
        return _Comm(_one_send(0, contiguous(to_numpy(data))), [op.peer])

    def _recv(self, op, attrs, ins, held, piece):
        # the callers start a receive once its message is here (the blocking per-step ones wait)
        data = self.comm.mailbox.take(self.index[op.peer], tag(op.channel, piece), self.timeout)
        return [self._add_region(op, attrs, held, data)]

    def _copy_region(self, op, attrs, ins, held, piece):  # a move's piece that stays on this rank
        return [self._add_region(op, attrs, held, ins[0][_region(attrs["box"], attrs["src_origin"])])]

    def _add_region(self, op, attrs, held, data: np.ndarray) -> np.ndarray:
        v = op.outputs[0]
        if self.devices:  # a host <-> device copy where the two ends live apart
            data = to_device(data, self.devices[v]) if v in self.devices else to_numpy(data)
        if held is None:
            shape, dtype = self.decls[v]
            held = self.xps.get(v, np).zeros(shape, dtype=dtype)
        if attrs["relay"]:
            held[...] = data
        else:
            held[_region(attrs["box"], attrs["dst_origin"])] += data
        return held

    def _fill_zeros(self, op, attrs, ins, held, piece):  # a partial sum this rank holds none of
        shape, dtype = self.decls[op.outputs[0]]
        return [self.xps.get(op.outputs[0], np).zeros(shape, dtype=dtype)]

    def _boxing_step(self, op, attrs, ins, held, piece):  # slice, zeros, take_shard, identity
        return [run_step(op.op, attrs, attrs.get("index", 0), attrs.get("parts", 1), ins[0],
                         self.xps.get(op.outputs[0], np))]

    def _update(self, op, attrs, ins, held, piece):  # in place; its output is the updated input
        if len(ins) > 2 and not np.isfinite(ins[2]).all():  # fp16: a gradient overflowed; skip the step
            return [ins[0]]
        self.update(op, ins[0], ins[1])
        return [ins[0]]

    def _assign(self, op, attrs, ins, held, piece):  # ZeRO: the gathered updated shards into the variable
        ins[0][...] = ins[1]
        return [ins[0]]

    def _check_stuck(self, idle: float) -> None:
        """Ordered transports: the rank's progress hangs on its own issuer alone (no message
        comes from a peer), so a rank with nothing to fire whose issuer waits for an op that
        can never become ready is stuck for good: say so now, not after the timeout."""
        if self.issuer is not None and idle > 0.1:
            why = self.issuer.stuck()
            if why:
                raise OrderStuck(why)

    def _where(self, reason: str) -> str:
        """``reason``, and where the rank is in its NCCL order (ordered transports)."""
        if self.issuer is None:
            return reason
        return f"{reason or f'no progress for {self.timeout:g} s'}; NCCL order: {self.issuer.describe()}"

    def _stalled(self, reason: str = "") -> Stalled:
        waits = [dict(op=e.actor.op.id, name=e.actor.op.op, piece=e.actor.piece, peer=e.step.peer_rank,
                      group=list(e.actor.op.group), channel=e.actor.op.channel) for e in self.inflight]
        for a in self.actors:
            if a.op.kind == "recv" and a.piece < self.k and all(
                    self.written.get((v, a.piece), 0) >= self.writers[v] for v in a.inputs):
                waits.append(dict(op=a.op.id, name="recv", piece=a.piece, peer=a.op.peer, group=[],
                                  channel=a.op.channel))
        return Stalled(self.rp.rank, waits + self._optimizer_waits(), self.timeout, self._where(reason))


@dataclass(slots=True)
class _Comm:
    """A communication op started: this rank's schedule and the global ranks of its group."""

    gen: Any
    group: list


@dataclass(slots=True)
class _Awaited:
    peer_rank: int
    tag: int


@dataclass(slots=True)
class _Inflight:
    actor: _Actor
    gen: Any
    step: _Awaited | None
    start: float
    group: list


@dataclass(slots=True)
class _Receiving:
    """An optimizer-phase receive filed under the message it waits for."""

    unit: int


@dataclass(slots=True)
class _Phased:
    """An optimizer-phase collective in flight: its unit, schedule, tag, group and the rank it
    waits for."""

    unit: int
    gen: Any
    tag: int
    group: list
    start: float
    peer: int = -1


def _split_gathered(schedule, layout: list, xp=np):
    """A bucket's all-gather, then each member's gathered value: rank ``q``'s chunk holds every
    member's shard on ``q`` in turn; a member's value is its shards concatenated along its axis."""
    flat = yield from schedule
    pieces: list[list] = [[] for _ in layout]
    at = 0
    for q in range(len(layout[0][1])):
        for (_, shards), got in zip(layout, pieces):
            n = int(np.prod(shards[q]))
            got.append(flat[at:at + n].reshape(shards[q]))
            at += n
    return [xp.concatenate(got, axis=axis) for (axis, _), got in zip(layout, pieces)]


def _split_reduced(schedule, shapes: list):
    """A bucket's reduce-scatter, then each member's chunk of the sum."""
    flat = yield from schedule
    out, at = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[at:at + n].reshape(shape))
        at += n
    return out


# The plan's collectives as a communicator's own: fn(comm, x, ranks, attrs) (the ordered mode).
_NATIVE: dict[str, Callable] = {
    "all_reduce": lambda c, x, g, a: c.all_reduce(x, g, "sum"),
    "all_reduce_max": lambda c, x, g, a: c.all_reduce(x, g, "max"),
    "all_gather": lambda c, x, g, a: c.all_gather(x, parse(a["src"]).axis, g),
    "reduce_scatter": lambda c, x, g, a: c.reduce_scatter(x, parse(a["dst"]).axis, g, "sum"),
    "reduce_scatter_max": lambda c, x, g, a: c.reduce_scatter(x, parse(a["dst"]).axis, g, "max"),
    "all_to_all": lambda c, x, g, a: c.all_to_all(x, parse(a["dst"]).axis, parse(a["src"]).axis, g),
}


def _one_send(peer: int, x: np.ndarray):
    yield alg.Send(peer, x)


def _region(box, origin) -> tuple[slice, ...]:
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, origin))


def _micro(a: np.ndarray, i: int, k: int) -> np.ndarray:
    if k == 1:
        return a
    m = a.shape[0] // k
    return a[i * m:(i + 1) * m]


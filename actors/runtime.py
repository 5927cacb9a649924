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
made of the op's channel and the piece, so the conversations never mix.

The optimizer phase runs once per step, after the last piece, on the accumulated gradients.

Every firing is recorded (rank, op, piece, start, end, bytes): the actor timeline.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from comm import CommError, Communicator
from comm import algorithms as alg
from flowsys.device import contiguous
from flowsys.layout import bounds
from flowsys.ops import OPS
from flowsys.sbp import Broadcast, parse
from scheduler.lower import SeedMarker, decode_attrs

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
    __slots__ = ("op", "index", "attrs", "piece", "inputs", "outputs", "busy", "name", "late")

    def __init__(self, op, index: int):
        self.op, self.index = op, index
        self.attrs = decode_attrs(op.attrs)
        self.piece = 0                 # the next piece to fire for
        self.inputs: list[int] = []    # per-piece input values (persistent ones need no register)
        self.outputs = list(op.outputs)
        self.busy = False              # a communication schedule in flight
        self.name = op.op
        self.late = int(op.phase != "forward")  # scheduling priority: forward work first


class RankRuntime:
    """Runs one rank's plan: its actors for every piece, then its optimizer phase.

    ``comm`` is this rank's transport endpoint; ``index`` maps global ranks to communicator
    ranks; ``seeds[p][j]`` is dropout seed ``j`` of piece ``p``.
    """

    def __init__(self, rank_plan, comm: Communicator, index: dict[int, int] | None = None,
                 timeout: float = 60.0, record: bool = True):
        self.rp, self.comm, self.timeout, self.record = rank_plan, comm, timeout, record
        self.index = index if index is not None else {r: r for r in range(comm.world_size)}
        self.decls = {v.id: (tuple(v.shape), np.dtype(v.dtype)) for v in rank_plan.values}
        self.registers = {v.id: max(1, getattr(v, "registers", 1) or 1) for v in rank_plan.values}
        # at most this many micro-batches in flight on the rank (the plan's register count)
        self.window = max(self.registers.values(), default=1)
        self.timeline: list[tuple[int, int, float, float]] = []  # (op, piece, start, end) when recording
        self.current: str = "idle"      # what this rank is doing, for failure reports
        ops = list(rank_plan.ops)
        self.compute_ops = [op for op in ops if op.phase != "optimizer"]
        self.optimizer_ops = [op for op in ops if op.phase == "optimizer"]
        self.hoisted: list | None = None  # ops computed once per step (built on the first run)

    # ------------------------------------------------------------------------------ wiring
    def _build(self) -> None:
        """Ops the plan marks ``per_step`` (they read only parameters, constants and what is
        computed from them alone, such as a weight's transpose) run once per step before the
        pieces; every other op of the compute phase is an actor."""
        self.hoisted = [op for op in self.compute_ops if op.per_step]
        rest = [op for op in self.compute_ops if not op.per_step]
        self.actors = [_Actor(op, i) for i, op in enumerate(rest)]
        produced: dict[int, list[_Actor]] = {}
        for a in self.actors:
            for v in a.outputs:
                produced.setdefault(v, []).append(a)
        self.writers = {v: len(ws) for v, ws in produced.items()}
        self.consumers: dict[int, list[_Actor]] = {v: [] for v in produced}
        for a in self.actors:
            a.inputs = [v for v in dict.fromkeys(a.op.inputs) if v in produced]
            for v in a.inputs:
                self.consumers[v].append(a)
        self.producers = produced
        # activations: forward values a backward op reads; the pieces holding one are in flight
        self.saved = {v for v, ws in produced.items() if any(w.op.phase == "forward" for w in ws)
                      and any(c.op.phase == "backward" for c in self.consumers[v])}

    # ---------------------------------------------------------------------------------- run
    def run(self, fed: dict[int, Any], micro_batches: int, grads: dict[int, int], update: Callable,
            seeds: Sequence[Sequence[int]], outputs: Sequence[int] = ()) -> list:
        """Run one step; return this rank's ``outputs`` averaged over the pieces (None where a
        value does not live here). ``update(op, variable_array, grad_array)`` applies an update."""
        k = micro_batches
        inputs = set(self.rp.inputs)
        self.persistent = {vid: a for vid, a in fed.items() if vid not in inputs}
        if self.hoisted is None:
            self._build()
        for op in self.hoisted:  # once per step, before the pieces
            start = time.time()
            self.current = f"{op.op} (op {op.id}, per step)"
            self._run_blocking(op, self.persistent, PER_STEP_PIECE)
            self._note(op, PER_STEP_PIECE, start)
        self.piece_inputs = {vid: [_micro(a, i, k) for i in range(k)] for vid, a in fed.items() if vid in inputs}
        self.seeds = seeds
        self.k = k
        # registers: (value, piece) -> array, with the writers and consumers still to come
        self.regs: dict[tuple[int, int], np.ndarray] = {}
        self.written: dict[tuple[int, int], int] = {}
        self.pending_reads: dict[tuple[int, int], int] = {}
        self.held: dict[int, int] = {v: 0 for v in self.producers}
        # sinks: step outputs and gradients, summed over pieces as they complete
        grad_of = {g: var for var, g in grads.items()}
        self.sinks = {vid for vid in list(outputs) + list(grads.values()) if vid in self.producers}
        self.sums: dict[int, Any] = {}
        self.inflight: list[_Inflight] = []  # communication schedules waiting for a message
        for a in self.actors:
            a.piece, a.busy = 0, False
        self._holding: dict[int, int] = {}  # piece -> activations of it held
        self._open: dict[int, int] = {}  # pieces entered and not done on this rank -> firings left
        self.peak_in_flight = 0  # most micro-batches holding activations at once, this step
        self._loop()
        # the optimizer phase: gradients averaged over the pieces, then boxing and updates
        env = dict(self.persistent)
        for g in grad_of:
            if g in self.sums:
                env[g] = self.sums[g] if k == 1 else (self.sums[g] / k).astype(self.sums[g].dtype)
        self._optimizer_phase(env, update)
        self.current = "idle"
        outs = []
        for vid in outputs:
            if vid in self.sums:
                outs.append(np.asarray(self.sums[vid] / k).astype(self.decls[vid][1]) if k > 1 else self.sums[vid])
            elif vid in self.persistent:
                outs.append(self.persistent[vid])
            else:
                outs.append(None)
        return outs

    def _optimizer_phase(self, env: dict, update: Callable) -> None:
        """Gradient boxing, updates and ZeRO's gathers, in dataflow order: an op runs once its
        inputs are in ``env``, a collective starts then and stays in flight while others run
        (every gradient's all-reduce at once, as DDP overlaps its buckets), a receive runs once
        its message is here. Tags keep concurrent collectives apart on every rank."""
        pending = list(self.optimizer_ops)
        inflight: list[list] = []  # [op, schedule, group ranks, tag, rank awaited, start]
        mailbox = self.comm.mailbox
        seen, idle_since = mailbox.arrivals, None
        while pending or inflight:
            progressed, waiting = False, []
            for op in pending:
                if any(i not in env for i in op.inputs) or (
                        op.kind == "recv" and not mailbox.ready(self.index[op.peer], tag(op.channel, OPTIMIZER_PIECE))):
                    waiting.append(op)
                    continue
                progressed = True
                start = time.time()
                self.current = f"{op.op} (op {op.id}, optimizer phase)"
                if op.kind == "collective":
                    group = list(op.group)
                    gen = _collective(op.op, decode_attrs(op.attrs), group.index(self.rp.rank), len(group),
                                      env[op.inputs[0]])
                    entry = [op, gen, group, tag(op.channel, OPTIMIZER_PIECE), None, start]
                    if not self._advance_phase(entry, None, env):
                        inflight.append(entry)
                    continue
                if op.kind == "update":  # in place; its output is the updated input
                    update(op, env[op.inputs[0]], env[op.inputs[1]])
                    env[op.outputs[0]] = env[op.inputs[0]]
                elif op.op == "assign":  # ZeRO: the gathered updated shards into the variable
                    env[op.inputs[0]][...] = env[op.inputs[1]]
                    env[op.outputs[0]] = env[op.inputs[0]]
                else:
                    self._run_blocking(op, env, OPTIMIZER_PIECE)
                self._note(op, OPTIMIZER_PIECE, start)
            pending = waiting
            for entry in list(inflight):
                src = self.index[entry[4]]
                if mailbox.ready(src, entry[3]):
                    progressed = True
                    if self._advance_phase(entry, mailbox.try_take(src, entry[3]), env):
                        inflight.remove(entry)
            if progressed:
                idle_since = None
                continue
            waits = [dict(op=e[0].id, name=e[0].op, piece=OPTIMIZER_PIECE, peer=e[4], group=list(e[0].group),
                          channel=e[0].channel) for e in inflight]
            waits += [dict(op=op.id, name="recv", piece=OPTIMIZER_PIECE, peer=op.peer, group=[], channel=op.channel)
                      for op in pending if op.kind == "recv" and all(i in env for i in op.inputs)]
            now = time.monotonic()
            idle_since = idle_since or now
            if now - idle_since > self.timeout:
                raise Stalled(self.rp.rank, waits, self.timeout)
            try:
                seen = mailbox.wait(seen, min(0.05, self.timeout))
            except CommError as e:  # told to stop (another rank failed) or a peer unreachable
                raise Stalled(self.rp.rank, waits, self.timeout, str(e)) from e

    def _advance_phase(self, entry: list, value, env: dict) -> bool:
        """Step an optimizer-phase collective until it waits for a message (False) or is done."""
        op, gen, group, t = entry[0], entry[1], entry[2], entry[3]
        try:
            step = gen.send(value)
            while isinstance(step, alg.Send):
                self.comm.post(step.array, self.index[group[step.peer]], t)
                step = gen.send(None)
        except StopIteration as stop:
            env[op.outputs[0]] = stop.value
            self._note(op, OPTIMIZER_PIECE, entry[5])
            return True
        entry[4] = group[step.peer]
        return False

    def _loop(self) -> None:
        total = len(self.actors) * self.k
        done = 0
        # forward work first, then the oldest piece: with the window this is 1F1B (a stage that
        # may take a new micro-batch runs its forward before the backward of an older one)
        ready: list[tuple[int, int, int]] = [(a.late, 0, a.index) for a in self.actors]
        heapq.heapify(ready)
        queued = set(range(len(self.actors)))
        mailbox = self.comm.mailbox
        seen = mailbox.arrivals
        idle_since = None
        while done < total:
            progressed = False
            while ready:
                *_, i = heapq.heappop(ready)
                queued.discard(i)
                a = self.actors[i]
                if a.busy or a.piece >= self.k or not self._can_fire(a):
                    continue
                self.current = f"{a.op.op} (op {a.op.id}, piece {a.piece})"
                woken = self._fire(a)
                progressed = True
                if not a.busy:
                    done += 1
                    woken.append(a)
                for b in woken:
                    if b.index not in queued and b.piece < self.k and not b.busy:
                        queued.add(b.index)
                        heapq.heappush(ready, (b.late, b.piece, b.index))
            # advance communication in flight whose awaited message is here
            for e in list(self.inflight):
                src = self.index[e.step.peer_rank]
                if not mailbox.ready(src, e.step.tag):
                    continue
                progressed = True
                woken = self._advance(e, mailbox.try_take(src, e.step.tag))
                if woken is not None:
                    self.inflight.remove(e)
                    done += 1
                    for b in woken + [e.actor]:
                        if b.index not in queued and b.piece < self.k and not b.busy:
                            queued.add(b.index)
                            heapq.heappush(ready, (b.late, b.piece, b.index))
            # receives whose message arrived
            if not progressed:
                for a in self.actors:
                    if a.op.kind == "recv" and not a.busy and a.piece < self.k and a.index not in queued \
                            and mailbox.ready(self.index[a.op.peer], tag(a.op.channel, a.piece)):
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
            try:
                seen = mailbox.wait(seen, min(0.05, self.timeout))
            except CommError as e:  # told to stop (another rank failed) or a peer unreachable
                raise self._stalled(str(e)) from e

    # ------------------------------------------------------------------------------ firing
    def _can_fire(self, a: _Actor) -> bool:
        p = a.piece
        if p not in self._open and len(self._open) >= self.window:
            return False  # the rank already works on as many micro-batches as it has registers
        for v in a.inputs:
            if self.written.get((v, p), 0) < self.writers[v]:
                return False
        for v in a.outputs:
            if (v, p) not in self.regs and self.held.get(v, 0) >= self.registers.get(v, 1):
                return False
        if a.op.kind == "recv":
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
        start = time.time()
        if p not in self._open:
            self._open[p] = len(self.actors)  # firings left before this piece is done here
        for v in a.outputs:  # claim the output registers
            if (v, p) not in self.regs:
                self.regs[(v, p)] = None
                self.held[v] += 1
                if v in self.saved:
                    self._holding[p] = self._holding.get(p, 0) + 1
                    self.peak_in_flight = max(self.peak_in_flight, len(self._holding))
        if op.kind == "collective" or op.kind == "send":
            gen = self._schedule(a, p)
            return self._start(a, gen, start)
        ins = [self._value(v, p) for v in op.inputs]
        if op.kind == "compute":
            attrs = {k: self.seeds[p][v] if isinstance(v, SeedMarker) else v for k, v in a.attrs.items()}
            spec = OPS[op.op]
            out = spec.kernel(np, *ins, **attrs)
            results = out if spec.multi_output else (out,)
            for v, o in zip(a.outputs, results):
                o = np.asarray(o)
                dtype = self.decls[v][1]
                self.regs[(v, p)] = o if o.dtype == dtype else o.astype(dtype)
        elif op.kind == "recv":
            data = self.comm.mailbox.try_take(self.index[op.peer], tag(op.channel, p))
            self._write_region(a, p, data)
        elif op.op == "fill_zeros":
            shape, dtype = self.decls[a.outputs[0]]
            self.regs[(a.outputs[0], p)] = np.zeros(shape, dtype=dtype)
        elif op.op == "copy_region":
            box, x = a.attrs["box"], ins[0]
            self._write_region(a, p, x[_region(box, a.attrs["src_origin"])])
        else:
            self.regs[(a.outputs[0], p)] = _local_step(op.op, a.attrs, ins[0])
        return self._complete(a, p, start)

    def _write_region(self, a: _Actor, p: int, data: np.ndarray) -> None:
        v = a.outputs[0]
        buf = self.regs[(v, p)]
        if buf is None:
            shape, dtype = self.decls[v]
            buf = self.regs[(v, p)] = np.zeros(shape, dtype=dtype)
        if a.attrs["relay"]:
            buf[...] = data
        else:
            buf[_region(a.attrs["box"], a.attrs["dst_origin"])] += data

    def _complete(self, a: _Actor, p: int, start: float) -> list[_Actor]:
        """``a`` has finished piece ``p``: publish its outputs, return its inputs' registers."""
        woken: list[_Actor] = []
        for v in a.outputs:
            key = (v, p)
            self.written[key] = self.written.get(key, 0) + 1
            if self.written[key] == self.writers[v]:  # readable: hand it to the consumers
                if v in self.sinks:
                    x = self.regs[key]
                    self.sums[v] = x.copy() if v not in self.sums else self.sums[v] + x
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
            woken.extend(b for b in self.actors if b.piece < self.k and not b.busy)
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

    def _note(self, op, piece: int, start: float) -> None:
        if self.record:
            self.timeline.append((op.id, piece, start, time.time()))

    # ------------------------------------------------------------------- communication actors
    def _schedule(self, a: _Actor, p: int):
        op, attrs = a.op, a.attrs
        if op.kind == "send":
            x = self._value(op.inputs[0], p)
            data = x if attrs["relay"] else x[_region(attrs["box"], attrs["src_origin"])]
            return _one_send(0, contiguous(data)), [op.peer]
        group = list(op.group)
        return _collective(op.op, attrs, group.index(self.rp.rank), len(group), self._value(op.inputs[0], p)), group

    def _start(self, a: _Actor, scheduled, start: float) -> list[_Actor]:
        gen, group = scheduled
        a.busy = True
        entry = _Inflight(a, gen, None, start, group)
        woken = self._advance(entry, None)
        if woken is None:
            self.inflight.append(entry)
            return []
        return woken

    def _advance(self, e: _Inflight, value) -> list[_Actor] | None:
        """Step a schedule until it waits for a message (None) or returns (the woken actors)."""
        a, p = e.actor, e.actor.piece
        t = tag(a.op.channel, p)
        try:
            step = e.gen.send(value)
            while isinstance(step, alg.Send):
                self.comm.post(step.array, self.index[e.group[step.peer]], t)
                step = e.gen.send(None)
        except StopIteration as stop:
            if a.op.kind == "collective":
                self.regs[(a.outputs[0], p)] = stop.value
            return self._complete(a, p, e.start)
        e.step = _Awaited(e.group[step.peer], t)
        return None

    def _run_blocking(self, op, env: dict, piece: int) -> None:
        """An op run once per step (per-step ops before the pieces, the optimizer phase after):
        every rank runs these in plan order, so blocking is safe."""
        a = decode_attrs(op.attrs)
        if op.op == "fill_zeros":
            shape, dtype = self.decls[op.outputs[0]]
            env[op.outputs[0]] = np.zeros(shape, dtype=dtype)
            return
        x = env[op.inputs[0]] if op.inputs else None
        if op.kind == "compute":
            spec = OPS[op.op]
            out = spec.kernel(np, *(env[i] for i in op.inputs), **a)
            for v, o in zip(op.outputs, out if spec.multi_output else (out,)):
                env[v] = np.asarray(o).astype(self.decls[v][1], copy=False)
            return
        if op.kind in ("collective", "send", "recv") or op.op == "copy_region":
            t = tag(op.channel, piece)
            if op.kind == "collective":
                group = list(op.group)
                env[op.outputs[0]] = self.comm._drive(
                    _collective(op.op, a, group.index(self.rp.rank), len(group), x), [self.index[r] for r in group], t)
                return
            if op.kind == "send":
                self.comm.post(contiguous(x if a["relay"] else x[_region(a["box"], a["src_origin"])]),
                               self.index[op.peer], t)
                return
            out = op.outputs[0]
            if out not in env:
                shape, dtype = self.decls[out]
                env[out] = np.zeros(shape, dtype=dtype)
            data = (self.comm.mailbox.take(self.index[op.peer], t, self.timeout) if op.kind == "recv"
                    else x[_region(a["box"], a["src_origin"])])
            if a["relay"]:
                env[out][...] = data
            else:
                env[out][_region(a["box"], a["dst_origin"])] += data
            return
        env[op.outputs[0]] = _local_step(op.op, a, x)

    def _stalled(self, reason: str = "") -> Stalled:
        waits = [dict(op=e.actor.op.id, name=e.actor.op.op, piece=e.actor.piece, peer=e.step.peer_rank,
                      group=list(e.actor.op.group), channel=e.actor.op.channel) for e in self.inflight]
        for a in self.actors:
            if a.op.kind == "recv" and a.piece < self.k and all(
                    self.written.get((v, a.piece), 0) >= self.writers[v] for v in a.inputs):
                waits.append(dict(op=a.op.id, name="recv", piece=a.piece, peer=a.op.peer, group=[],
                                  channel=a.op.channel))
        return Stalled(self.rp.rank, waits, self.timeout, reason)


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


def _one_send(peer: int, x: np.ndarray):
    yield alg.Send(peer, x)


def _collective(name: str, attrs: dict, me: int, n: int, x: np.ndarray):
    src, dst = parse(attrs["src"]), parse(attrs["dst"])
    if name == "all_reduce":
        return alg.ring_all_reduce(me, n, x)
    if name == "all_gather":
        return alg.ring_all_gather(me, n, x, axis=src.axis)
    if name == "reduce_scatter":
        return alg.ring_reduce_scatter(me, n, x, axis=dst.axis)
    if name == "all_to_all":
        return alg.pairwise_all_to_all(me, n, x, split_axis=dst.axis, concat_axis=src.axis)
    raise CommError(f"unknown collective {name!r} in the plan")


def _local_step(name: str, attrs: dict, x: np.ndarray) -> np.ndarray:
    """The boxing steps that need no communication."""
    if name == "slice":
        dst = parse(attrs["dst"])
        lo, hi = bounds(x.shape[dst.axis], attrs["parts"], attrs["index"])
        return np.array(x[(slice(None),) * dst.axis + (slice(lo, hi),)])
    if name == "zeros":
        src = parse(attrs["src"])
        if isinstance(src, Broadcast):
            return x if attrs["index"] == 0 else np.zeros_like(x)
        z = np.zeros(attrs["group_shape"], dtype=x.dtype)
        lo, hi = bounds(attrs["group_shape"][src.axis], attrs["parts"], attrs["index"])
        z[(slice(None),) * src.axis + (slice(lo, hi),)] = x
        return z
    if name == "take_shard":
        piece = np.asarray(x)[tuple(slice(lo, hi) for lo, hi in attrs["box"])]
        return np.array(piece) if attrs["holds"] else np.zeros_like(piece)
    if name == "identity":
        return x
    raise RuntimeError(f"unknown local op {name!r} in the plan")


def _region(box, origin) -> tuple[slice, ...]:
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, origin))


def _micro(a: np.ndarray, i: int, k: int) -> np.ndarray:
    if k == 1:
        return a
    m = a.shape[0] // k
    return a[i * m:(i + 1) * m]


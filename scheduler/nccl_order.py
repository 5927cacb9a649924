"""One order for all of a device's NCCL operations, across its communicators, and its check.

NCCL matches a collective with the other members' calls on the same communicator by call order,
and a call blocks until every member has joined; a send blocks until its receive runs. A plan
whose ranks may start their collectives in any order (what the gRPC and in-process transports
allow: messages wait in mailboxes) can therefore hang on NCCL, within one communicator (two
orders) or across several (rank 0 waits in its dp all-reduce for rank 2, which waits in its tp
all-reduce for rank 3, which waits ...). :func:`fix_order` gives every rank the order to issue
its communication in: one global order of the plan's communication events (a collective, a
transfer or a bucket, per micro-batch), topological in every rank's data dependencies, each
rank issuing its own events in that order, so no cycle can form. OneFlow orders a device's NCCL
operations the same way. :func:`check_orders` takes any per-rank orders and names the ranks and
events of the first cycle: the check a hand-changed plan, or a runtime, is held to
(``comm.strict`` enforces an order as the calls are issued).

The order is micro-batch by micro-batch (all of piece 0's forward and backward before piece
1's): always feasible within the runtime's register window, at the price of pipeline stages not
overlapping their communication across pieces. A faster order (1F1B's) is the simulated
runtime's to give.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from comm.base import CommError
from flowsys.planformat.order import COMMUNICATION, event_key, event_of as _event_of, order_of
_CLASS = {"step": 0, "piece": 1, "optimizer": 2}  # per-step ops first, the optimizer's last


class OrderError(CommError):
    """Per-rank orders NCCL would hang on; the message names the ranks and the events."""


@dataclass(frozen=True, order=True)
class Event:
    """One communication every party issues once: a collective (its channel), a transfer (its
    two ends share the channel) or a bucket of collectives, in one piece (-1: once a step)."""

    key: tuple
    piece: int
    op: str = field(compare=False)
    ranks: tuple[int, ...] = field(compare=False)
    phase: str = field(compare=False)

    def __str__(self) -> str:
        when = "once a step" if self.piece < 0 else f"micro-batch {self.piece}"
        return f"{self.op} over ranks {list(self.ranks)} ({self.phase}, {when}, channel {self.key[-1]})"


def events(plan) -> dict[int, dict[tuple, Event]]:
    """Each rank's communication events of one step, by (key, piece)."""
    k = max(plan.micro_batches, 1)
    out: dict[int, dict[tuple, Event]] = {}
    for rp in plan.ranks:
        mine: dict[tuple, Event] = {}
        for op in rp.ops:
            if op.kind not in COMMUNICATION:
                continue
            ranks = tuple(op.group) if op.kind == "collective" else \
                tuple(sorted((rp.rank, op.peer)))
            name = op.op if op.kind == "collective" else "send/recv"
            for piece in _pieces(op, k):
                key, p = _event_of(op, piece)
                mine.setdefault((key, p), Event(key, p, name, ranks, op.phase))
        out[rp.rank] = mine
    return out


def _pieces(op, k: int) -> range:
    return range(-1, 0) if op.per_step or op.phase == "optimizer" else range(k)


def _class(op) -> str:
    return "optimizer" if op.phase == "optimizer" else "step" if op.per_step else "piece"


def _dependencies(rp, k: int) -> dict[tuple, set[tuple]]:
    """For each of the rank's events, the events it waits for on this rank: those whose outputs
    reach it through the rank's ops (compute, local steps) in the same piece; a per-step
    event's outputs reach every piece, every piece's reach the optimizer."""
    writers: dict[int, list] = {}
    for op in rp.ops:
        for v in op.outputs:
            writers.setdefault(v, []).append(op)
    memo: dict[int, frozenset] = {}  # op id -> the communication ops whose outputs it reads, through other ops

    def upstream(root) -> frozenset:
        """Iterative (a deep model's plan chains thousands of ops: no recursion limit)."""
        stack, entered = [(root, False)], set()
        while stack:
            op, ready = stack.pop()
            if op.id in memo:
                continue
            sources = [w for v in op.inputs for w in writers.get(v, ()) if w.id != op.id]
            if not ready:
                entered.add(op.id)
                stack.append((op, True))
                stack.extend((w, False) for w in sources if w.kind not in COMMUNICATION and w.id not in entered)
                continue
            found: set = set()
            for w in sources:
                found |= {w.id} if w.kind in COMMUNICATION else memo.get(w.id, frozenset())
            memo[op.id] = frozenset(found)
        return memo[root.id]

    by_id = {op.id: op for op in rp.ops}
    deps: dict[tuple, set[tuple]] = {}
    for op in rp.ops:
        if op.kind not in COMMUNICATION:
            continue
        for piece in _pieces(op, k):
            key = _event_of(op, piece)
            before = deps.setdefault(key, set())
            for u in upstream(op):
                src = by_id[u]
                if _event_of(src, -1)[0] == key[0]:
                    continue  # a bucket's own members
                src_pieces = [-1] if _class(src) != "piece" else \
                    ([piece] if _class(op) == "piece" else list(range(k)))
                before.update(_event_of(src, p) for p in src_pieces)
    return deps


def fix_order(plan) -> dict[int, list[Event]]:
    """Every rank's communication events in the order to issue them: one topological order of
    all ranks' dependencies together, per-step events first, then micro-batch by micro-batch,
    the optimizer's last, ties in the plan's op order."""
    k = max(plan.micro_batches, 1)
    per_rank = events(plan)
    everything: dict[tuple, Event] = {}
    position: dict[tuple, int] = {}
    cls: dict[tuple, int] = {}
    for rp in plan.ranks:
        for i, op in enumerate(rp.ops):
            if op.kind in COMMUNICATION:
                for piece in _pieces(op, k):
                    key = _event_of(op, piece)
                    position[key] = min(position.get(key, i), i)
                    cls[key] = _CLASS[_class(op)]
        everything.update(per_rank[rp.rank])
    after: dict[tuple, set[tuple]] = {key: set() for key in everything}
    waits: dict[tuple, int] = {key: 0 for key in everything}
    for rp in plan.ranks:
        for key, before in _dependencies(rp, k).items():
            for b in before:
                if key not in after[b]:
                    after[b].add(key)
                    waits[key] += 1

    def priority(key):
        return cls[key], key[1], position[key], key

    ready = [priority(key) for key, n in waits.items() if n == 0]
    heapq.heapify(ready)
    order: list[tuple] = []
    while ready:
        key = heapq.heappop(ready)[-1]
        order.append(key)
        for nxt in after[key]:
            waits[nxt] -= 1
            if waits[nxt] == 0:
                heapq.heappush(ready, priority(nxt))
    if len(order) != len(everything):
        stuck = sorted(str(everything[key]) for key, n in waits.items() if n)
        raise OrderError(f"the plan's communication depends on itself in a cycle: {'; '.join(stuck[:6])}")
    return {r: [per_rank[r][key] for key in order if key in per_rank[r]] for r in per_rank}


def attach(plan) -> None:
    """The compiler pass: write :func:`fix_order`'s order into every rank's plan
    (``RankPlan.comm_order``), replacing any order there; the runtime issues its NCCL calls in it."""
    orders = fix_order(plan)
    for rp in plan.ranks:
        del rp.comm_order[:]
        for e in orders[rp.rank]:
            kind, ident = e.key
            rp.comm_order.add(channel=ident if kind == "channel" else 0, bucket=ident if kind == "bucket" else 0,
                              piece=e.piece)


def check_plan(plan) -> None:
    """:func:`check_orders` on the orders the plan's ranks carry (``RankPlan.comm_order``): a plan
    whose order was changed on one rank, or misses an event, fails naming the ranks and events."""
    per_rank = events(plan)
    orders = {}
    for rp in plan.ranks:
        mine = per_rank[rp.rank]
        unknown = [key for key in order_of(rp) if key not in mine]
        if unknown:
            (kind, ident), piece = unknown[0]
            raise OrderError(f"rank {rp.rank}'s order names {kind} {ident} (piece {piece}), which none of its ops "
                             f"communicate on; re-lower the plan")
        orders[rp.rank] = [mine[key] for key in order_of(rp)]
    check_orders(orders, plan)


def check_orders(orders: dict[int, list[Event]], plan=None) -> None:
    """Raise :class:`OrderError` if NCCL would hang on ranks issuing ``orders``: a rank whose
    order leaves out or repeats one of its plan's events (with ``plan``), or a cycle of waits
    (each rank's next event waiting for a rank whose order puts another event first)."""
    if plan is not None:
        expected = events(plan)
        for r, mine in expected.items():
            got = [(e.key, e.piece) for e in orders.get(r, [])]
            if sorted(got) != sorted(mine):
                missing = [str(mine[x]) for x in mine if x not in got][:3]
                extra = [x for x in got if x not in mine or got.count(x) > 1][:3]
                raise OrderError(f"rank {r}'s order does not issue its plan's events once each: "
                                 f"missing {missing}, extra or repeated {extra}")
    edges: dict[tuple, list[tuple[tuple, int]]] = {}
    names: dict[tuple, Event] = {}
    for r, seq in orders.items():
        for a, b in zip(seq, seq[1:]):
            edges.setdefault((a.key, a.piece), []).append(((b.key, b.piece), r))
        for e in seq:
            names[(e.key, e.piece)] = e
    cycle = _find_cycle(edges)
    if cycle:
        steps = [f"rank {r} issues {names[a]} before {names[b]}" for a, b, r in cycle]
        raise OrderError("NCCL would hang (a cycle of waits across the ranks' orders): " + "; ".join(steps))


def _find_cycle(edges: dict[tuple, list[tuple[tuple, int]]]) -> list[tuple[tuple, tuple, int]]:
    """One cycle of the "issued before" graph, as (event, next event, rank) steps; [] if none."""
    state: dict[tuple, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(edges):
        if state.get(start):
            continue
        path: list[tuple[tuple, tuple, int]] = []
        stack = [(start, iter(edges.get(start, ())))]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            step = next(it, None)
            if step is None:
                state[node] = 2
                stack.pop()
                if path:
                    path.pop()
                continue
            nxt, r = step
            if state.get(nxt) == 1:
                path.append((node, nxt, r))
                begin = next(i for i, (a, _, _) in enumerate(path) if a == nxt)
                return path[begin:]
            if not state.get(nxt):
                state[nxt] = 1
                path.append((node, nxt, r))
                stack.append((nxt, iter(edges.get(nxt, ()))))
    return []


__all__ = ["COMMUNICATION", "Event", "OrderError", "attach", "check_orders", "check_plan", "event_key", "events",
           "fix_order", "order_of"]

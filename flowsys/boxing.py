"""The boxing planner: one place that turns a global tensor's layout into another.

``plan(shape, dtype, src_placement, src_sbp, dst_placement, dst_sbp)`` returns the steps, each
with the bytes it moves; ``execute`` runs a plan over a tensor's shards through the collectives
of :mod:`comm`. Eager global tensors and (later) the graph compiler call these same functions,
and signature choice ranks candidate signatures by ``plan(...).nbytes``.

Same placement, per mesh axis (T = bytes of the tensor the ranks of that mesh axis share, p =
their number), as in this table (OneFlow's boxing costs):

=========  ==================================  ==========
from → to  how                                 bytes
=========  ==================================  ==========
S(i)→S(j)  all-to-all                          (p-1)/p·T
S → B      all-gather                          (p-1)·T
S → P      keep own slice, zeros elsewhere     0
B → S      local slice                         0
B → P      rank 0 keeps, others zero           0
P → S      reduce-scatter                      (p-1)·T
P → B      all-reduce                          2(p-1)·T
=========  ==================================  ==========

A partial maximum ``P(max)`` (what the max of a vocabulary-split row gives) converts as ``P``
does, with op max: ``P(max) → B`` is ``all_reduce_max``, ``P(max) → S`` is
``reduce_scatter_max``, ``P(max) → P`` goes through ``B``; ``B → P(max)`` is free (every rank
keeps the value). Nothing else converts into ``P(max)``, nor does it move between placements.

N-D SBPs convert mesh axis by mesh axis, outermost first; an inner mesh axis that splits the
same tensor axis as a conversion is first gathered (its pieces nest inside the outer ones).
Between different placements, every destination rank receives the intersections it needs
straight from the source ranks (partial sums are summed by one destination and relayed to its
replicas), which costs what the table's last column says.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from comm import algorithms as _alg
from comm import CommError, drive
from flowsys.errors import ArgumentError, CommunicationError, SbpError
from flowsys.layout import NdSbp, bounds, fmt, holds_value, is_replica, local_shape, shard_box
from flowsys.placement import Placement
from flowsys.sbp import Broadcast, PartialMax, PartialSum, SbpValue, Split, parse

B, P = Broadcast(), PartialSum()


# -------------------------------------------------------------------------- the cost function


def cost(src: SbpValue, dst: SbpValue, nbytes: float, p1: int, p2: int | None = None, *,
         same_devices: bool = True) -> float:
    """Bytes moved converting one mesh axis from ``src`` to ``dst`` (the table above).

    ``nbytes`` is T, the logical bytes; ``p1``/``p2`` the producer/consumer device counts.
    """
    p2 = p1 if p2 is None else p2
    s, d = type(src), type(dst)
    if s is PartialMax and d is not PartialMax:  # as P, reduced by max (P(max) -> P goes through B)
        s = PartialSum
        if d is PartialSum:
            d = Broadcast
    elif d is PartialMax:
        d = PartialSum if s is PartialMax else Broadcast  # B -> P(max) keeps the value
    if same_devices:
        if s is Split and d is Split:
            return 0.0 if src == dst else (p1 - 1) / p1 * nbytes
        if s is Split and d is Broadcast:
            return (p1 - 1) * nbytes
        if s is PartialSum and d is Split:
            return (p1 - 1) * nbytes
        if s is PartialSum and d is Broadcast:
            return 2 * (p1 - 1) * nbytes
        return 0.0  # S->P, B->S, B->B, B->P, P->P: local
    if s is PartialSum:
        return {Split: p1, Broadcast: p1 + p2 - 1, PartialSum: p1}[d] * nbytes
    if d is Broadcast:
        return p2 * nbytes
    return float(nbytes)  # S->S, S->P, B->S, B->P: every element moves once


# ------------------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True)
class Transfer:
    src: int
    dst: int
    box: tuple[tuple[int, int], ...]  # the logical region sent
    relay: bool = False  # second phase: a destination root forwards its summed region


@dataclass(frozen=True, slots=True)
class Step:
    kind: str  # all_reduce, all_gather, reduce_scatter, all_to_all, slice, zeros, send_recv
    mesh_axis: int | None
    src: object
    dst: object
    nbytes: int

    def __repr__(self) -> str:
        where = f" on mesh axis {self.mesh_axis}" if self.mesh_axis is not None else ""
        return f"{self.kind}{where}: {self.src!r} -> {self.dst!r}, {self.nbytes} bytes"


@dataclass(frozen=True)
class Plan:
    shape: tuple[int, ...]
    dtype: np.dtype
    src_placement: Placement
    src_sbp: NdSbp
    dst_placement: Placement
    dst_sbp: NdSbp
    steps: tuple[Step, ...]
    transfers: tuple[Transfer, ...] = field(default=(), repr=False)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.steps)

    def __str__(self) -> str:
        head = f"boxing {fmt(self.src_sbp)} -> {fmt(self.dst_sbp)} of {self.dtype.name}{list(self.shape)}"
        if self.src_placement != self.dst_placement:
            head += f" from {self.src_placement!r} to {self.dst_placement!r}"
        body = "".join(f"\n  {s!r}" for s in self.steps) or "\n  nothing to do"
        return f"{head}: {self.nbytes} bytes{body}"


_KIND = {
    (Split, Split): "all_to_all", (Split, Broadcast): "all_gather", (Split, PartialSum): "zeros",
    (Broadcast, Split): "slice", (Broadcast, PartialSum): "zeros",
    (PartialSum, Split): "reduce_scatter", (PartialSum, Broadcast): "all_reduce",
    (PartialMax, Split): "reduce_scatter_max", (PartialMax, Broadcast): "all_reduce_max",
}


@functools.lru_cache(maxsize=4096)
def plan(shape: tuple[int, ...], dtype: np.dtype, src_placement: Placement, src_sbp: NdSbp,
         dst_placement: Placement, dst_sbp: NdSbp) -> Plan:
    """The steps converting a global tensor from one layout to another, with their bytes."""
    shape, dtype = tuple(shape), np.dtype(dtype)
    if src_placement != dst_placement and any(isinstance(v, PartialMax) for v in src_sbp):
        raise SbpError(f"boxing {fmt(src_sbp)} -> {fmt(dst_sbp)} of {dtype.name}{list(shape)}: a partial maximum "
                       f"P(max) cannot move between placements {src_placement!r} and {dst_placement!r}; convert it "
                       f"to B on its own placement first")
    if src_placement == dst_placement:
        steps = _same_placement_steps(shape, dtype, src_placement, tuple(src_sbp), tuple(dst_sbp))
        return Plan(shape, dtype, src_placement, tuple(src_sbp), dst_placement, tuple(dst_sbp), tuple(steps))
    transfers = _transfers(shape, src_placement, tuple(src_sbp), dst_placement, tuple(dst_sbp))
    nbytes = sum(math.prod(b - a for a, b in t.box) for t in transfers if t.src != t.dst) * dtype.itemsize
    steps = (Step("send_recv", None, tuple(src_sbp), tuple(dst_sbp), nbytes),)
    return Plan(shape, dtype, src_placement, tuple(src_sbp), dst_placement, tuple(dst_sbp), steps, tuple(transfers))


def _same_placement_steps(shape, dtype, placement: Placement, src: NdSbp, dst: NdSbp) -> list[Step]:
    state = list(src)
    steps: list[Step] = []

    def convert(k: int, to: SbpValue) -> None:
        frm = state[k]
        if frm == to or (type(frm) is type(to) and not isinstance(to, Split)):
            return
        if placement.mesh[k] == 1:  # one rank along the axis: every layout of it is the whole value
            state[k] = to
            return
        if isinstance(to, PartialMax) or isinstance(frm, PartialMax) and isinstance(to, PartialSum):
            if isinstance(frm, Broadcast):  # every rank keeps the value: the max of copies is the value
                state[k] = to
                return
            if not isinstance(frm, PartialMax):
                raise SbpError(f"boxing {fmt(src)} -> {fmt(dst)} of {dtype.name}{list(shape)}: only B or P(max) "
                               f"converts into a partial maximum P(max) (mesh axis {k} holds {frm!r})")
            convert(k, B)  # P(max) -> P: all-reduce by max, then rank 0 keeps the value
        frm = state[k]
        kind = _KIND[(type(frm), type(to))]
        nbytes = sum(_group_bytes(shape, dtype, placement, tuple(state), k, group, frm, to)
                     for group in placement.groups(k))
        steps.append(Step(kind, k, frm, to, int(nbytes)))
        state[k] = to

    for k in range(placement.ndim):
        if state[k] == dst[k]:
            continue
        axes = {v.axis for v in (state[k], dst[k]) if isinstance(v, Split)}
        for m in reversed(range(k + 1, placement.ndim)):  # inner splits of the same tensor axis nest
            if isinstance(state[m], Split) and state[m].axis in axes:
                convert(m, B)
        convert(k, dst[k])  # an inner axis gathered above is converted when the loop reaches it
    return steps


def _group_shape(shape, placement: Placement, state: NdSbp, k: int, group) -> tuple[int, ...]:
    """Shape of the tensor that the ranks of ``group`` (along mesh axis ``k``) lay out together."""
    whole = tuple(B if i == k else v for i, v in enumerate(state))
    return local_shape(shape, whole, placement.mesh, placement.coords(group[0]))


def _group_bytes(shape, dtype, placement, state, k, group, frm, to) -> int:
    gshape = _group_shape(shape, placement, state, k, group)
    t = math.prod(gshape) * dtype.itemsize
    n = len(group)
    if isinstance(frm, Split) and isinstance(to, Split):  # exact, for uneven pieces too
        rest = t // max(1, gshape[frm.axis] * gshape[to.axis]) if t else 0
        li = [b - a for a, b in (bounds(gshape[frm.axis], n, r) for r in range(n))]
        lj = [b - a for a, b in (bounds(gshape[to.axis], n, r) for r in range(n))]
        return (sum(li) * sum(lj) - sum(x * y for x, y in zip(li, lj))) * rest
    return int(cost(frm, to, t, n))


def _transfers(shape, sp: Placement, src: NdSbp, dp: Placement, dst: NdSbp) -> list[Transfer]:
    """Point-to-point pieces for a move between placements (see the module docstring)."""
    sources = []  # (rank, box) of one copy of every partial term's pieces
    for r in sp.ranks:
        c = sp.coords(r)
        if not is_replica(src, c):
            sources.append((r, shard_box(shape, src, sp.mesh, c)))
    has_partial = any(isinstance(v, PartialSum) for v in src)
    # without partial sums every replica of a box holds the same values: destinations take turns
    # among them, so no one source sends every copy
    holders: dict[tuple, list[int]] = {}
    if not has_partial:
        for r in sp.ranks:
            holders.setdefault(tuple(shard_box(shape, src, sp.mesh, sp.coords(r))), []).append(r)
    out: list[Transfer] = []
    roots: dict[tuple, int] = {}
    for k, d in enumerate(dp.ranks):
        c = dp.coords(d)
        if not holds_value(dst, c):
            continue  # a zero piece of a P destination
        box = shard_box(shape, dst, dp.mesh, c)
        if has_partial and box in roots:  # a replica of a summed region: relayed by its root
            out.append(Transfer(roots[box], d, box, relay=True))
            continue
        roots.setdefault(box, d)
        for s, sbox in sources:
            inter = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(sbox, box))
            if all(a < b for a, b in inter) or not shape:
                replicas = holders.get(tuple(sbox), [s])
                out.append(Transfer(d if d in replicas else replicas[k % len(replicas)], d, inter))
    return sorted(out, key=lambda t: t.relay)  # every direct piece before any relay


def estimate(shape, dtype, src_placement, src_sbp, dst_placement, dst_sbp) -> int:
    """Bytes a conversion moves (what signature choice minimises)."""
    return plan(tuple(shape), np.dtype(dtype), src_placement, tuple(src_sbp), dst_placement, tuple(dst_sbp)).nbytes


# ---------------------------------------------------------------------------------- execution


@dataclass(frozen=True, slots=True)
class Event:
    """One executed step, as traces and tests see it: ``nbytes`` is what the messages carried."""

    kind: str
    mesh_axis: int | None
    src: object
    dst: object
    nbytes: int
    shape: tuple[int, ...]
    placement: Placement


_observers: list[list[Event]] = []


@contextlib.contextmanager
def trace() -> Iterator[list[Event]]:
    """Collect every boxing step executed inside the block (nested blocks each see them all)."""
    events: list[Event] = []
    _observers.append(events)
    try:
        yield events
    finally:
        _observers.remove(events)


def _emit(event: Event) -> None:
    for events in _observers:
        events.append(event)


def execute(p: Plan, shards: Sequence, xp=np) -> list:
    """Run plan ``p`` over ``shards`` (one per source rank, mesh order); return the new shards."""
    try:
        return _execute(p, shards, xp)
    except CommError as err:
        raise CommunicationError(f"boxing {fmt(p.src_sbp)} -> {fmt(p.dst_sbp)} of {p.dtype.name}{list(p.shape)} "
                                 f"failed: {err}") from err


def _execute(p: Plan, shards: Sequence, xp) -> list:
    if p.src_placement != p.dst_placement:
        return _execute_move(p, shards, xp)
    placement, state, shards = p.src_placement, list(p.src_sbp), list(shards)
    for step in p.steps:
        k = step.mesh_axis
        moved = 0
        for group in placement.groups(k):
            idx = [placement.index(r) for r in group]
            new, nbytes = _convert_group(xp, [shards[i] for i in idx], step, placement, tuple(state), group, p.shape)
            moved += nbytes
            for i, a in zip(idx, new):
                shards[i] = a
        state[k] = step.dst
        _emit(Event(step.kind, k, step.src, step.dst, moved, p.shape, placement))
    return shards


# ------------------------------------------------------------------- the steps, written once
# Every boxing step, as the plan carries it (op name + attributes: ``src``/``dst`` as SBP strings,
# ``group_shape`` for S -> P, ``box``/``holds`` for take_shard), run by rank ``me`` of a group of
# ``n`` on its local array ``x``. A local step returns the new array; a collective returns the
# rank's ``comm.algorithms`` schedule, which eager boxing drives for the whole group at once
# (``comm.drive``) and the actor runtime drives over the transport, in flight with other work.


def _slice(attrs, me, n, x, xp):  # B -> S: keep my slice
    axis = parse(attrs["dst"]).axis
    lo, hi = bounds(x.shape[axis], n, me)
    return xp.array(x[(slice(None),) * axis + (slice(lo, hi),)], copy=True)


def _zeros(attrs, me, n, x, xp):  # S -> P: own slice in zeros of the group's shape; B -> P: rank 0 keeps
    src = parse(attrs["src"])
    if isinstance(src, Broadcast):
        return x if me == 0 else xp.zeros_like(x)
    shape = tuple(attrs["group_shape"])
    z = xp.zeros(shape, dtype=x.dtype)
    lo, hi = bounds(shape[src.axis], n, me)
    z[(slice(None),) * src.axis + (slice(lo, hi),)] = x
    return z


def _take_shard(attrs, me, n, x, xp):  # a local value laid out: this rank's box (zeros for a P non-holder)
    piece = xp.asarray(x)[tuple(slice(lo, hi) for lo, hi in attrs["box"])]
    return xp.array(piece, copy=True) if attrs["holds"] else xp.zeros_like(piece)


STEPS: dict[str, tuple[str, Callable]] = {  # name -> (plan op kind, fn(attrs, me, n, x, xp))
    "slice": ("local", _slice),
    "zeros": ("local", _zeros),
    "take_shard": ("local", _take_shard),
    "identity": ("local", lambda attrs, me, n, x, xp: x),
    # ``node_size`` (attrs, > 1): the hierarchical schedules (node, then rail); else the flat rings
    "all_reduce": ("collective", lambda attrs, me, n, x, xp:
                   _alg.hierarchical_all_reduce(me, n, x, attrs.get("node_size", 1))),
    "all_reduce_max": ("collective", lambda attrs, me, n, x, xp:
                       _alg.hierarchical_all_reduce(me, n, x, attrs.get("node_size", 1), op="max")),
    "reduce_scatter_max": ("collective", lambda attrs, me, n, x, xp: _alg.hierarchical_reduce_scatter(
        me, n, x, attrs.get("node_size", 1), axis=parse(attrs["dst"]).axis, op="max")),
    "all_gather": ("collective", lambda attrs, me, n, x, xp:
                   _alg.hierarchical_all_gather(me, n, x, attrs.get("node_size", 1), axis=parse(attrs["src"]).axis)),
    "reduce_scatter": ("collective", lambda attrs, me, n, x, xp: _alg.hierarchical_reduce_scatter(
        me, n, x, attrs.get("node_size", 1), axis=parse(attrs["dst"]).axis)),
    "all_to_all": ("collective", lambda attrs, me, n, x, xp: _alg.pairwise_all_to_all(
        me, n, x, split_axis=parse(attrs["dst"]).axis, concat_axis=parse(attrs["src"]).axis)),
}


def run_step(name: str, attrs: dict, me: int, n: int, x, xp=np):
    """Rank ``me``'s part (of ``n``) of boxing step ``name``: the new array for a local step, the
    rank's schedule for a collective (see :data:`STEPS`)."""
    entry = STEPS.get(name)
    if entry is None:
        raise ArgumentError(f"unknown boxing step {name!r} in the plan (known: {', '.join(STEPS)}); "
                            f"re-lower the plan with this flowsys version")
    return entry[1](attrs, me, n, x, xp)


def plan_collective(name: str, attrs: dict, me: int, n: int, x: np.ndarray):
    """Rank ``me``'s schedule (of ``n``) for a plan's collective op ``name`` whose attributes name
    the SBP it converts (``src`` to ``dst``): the actor runtime drives it, the cost model times it."""
    if STEPS.get(name, ("",))[0] != "collective":
        raise CommError(f"unknown collective {name!r} in the plan (collectives: "
                        f"{', '.join(k for k, (kind, _) in STEPS.items() if kind == 'collective')})")
    return run_step(name, attrs, me, n, x)


def _convert_group(xp, locals_, step: Step, placement, state, group, shape):
    """One step over one group of ranks, through :data:`STEPS`: (new locals, bytes sent)."""
    attrs = {"src": repr(step.src), "dst": repr(step.dst)}
    if step.kind == "zeros" and isinstance(step.src, Split):
        attrs["group_shape"] = _group_shape(shape, placement, state, step.mesh_axis, group)
    n = len(group)
    outs = [run_step(step.kind, attrs, me, n, a, xp) for me, a in enumerate(locals_)]
    if STEPS[step.kind][0] == "collective":
        return drive(outs)
    return outs, 0


def _execute_move(p: Plan, shards: Sequence, xp) -> list:
    sp, dp = p.src_placement, p.dst_placement
    ranks = sorted(set(sp.ranks) | set(dp.ranks))
    pos = {r: i for i, r in enumerate(ranks)}
    src_local = {r: shards[sp.index(r)] for r in sp.ranks}
    src_box = {r: shard_box(p.shape, p.src_sbp, sp.mesh, sp.coords(r)) for r in sp.ranks}
    dst_box = {r: shard_box(p.shape, p.dst_sbp, dp.mesh, dp.coords(r)) for r in dp.ranks}
    result = {r: xp.zeros(tuple(b - a for a, b in dst_box[r]), dtype=p.dtype) for r in dp.ranks}

    def rel(box, origin):
        return tuple(slice(a - o0, b - o0) for (a, b), (o0, _) in zip(box, origin))

    def schedule(r: int):
        for t in p.transfers:  # phase 1 sends, in plan order
            if t.src == r and not t.relay and t.dst != r:
                yield _alg.Send(pos[t.dst], src_local[r][rel(t.box, src_box[r])])
        for t in p.transfers:  # phase 1 receives (and local pieces), then relays
            if t.dst == r and not t.relay:
                piece = src_local[r][rel(t.box, src_box[r])] if t.src == r else (yield _alg.Recv(pos[t.src]))
                result[r][rel(t.box, dst_box[r])] += piece
        for t in p.transfers:
            if t.relay and t.src == r and t.dst != r:
                yield _alg.Send(pos[t.dst], result[r])
            elif t.relay and t.dst == r:
                result[r][...] = result[t.src] if t.src == r else (yield _alg.Recv(pos[t.src]))

    _, nbytes = drive([schedule(r) for r in ranks])
    _emit(Event("send_recv", None, p.src_sbp, p.dst_sbp, nbytes, p.shape, dp))
    return [result[r] for r in dp.ranks]


__all__ = ["cost", "plan", "estimate", "execute", "trace", "run_step", "plan_collective", "STEPS", "Plan", "Step",
           "Event", "Transfer"]

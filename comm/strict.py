"""A communicator that holds its ranks to NCCL's contract, on CPU arrays (for tests).

NCCL has no mailboxes: a collective is matched with the other members' calls *on the same
communicator* by call order and blocks until all of them have joined; a send blocks until the
peer's matching receive runs. So a program whose message-level transport (gRPC, in-process)
works can still hang on NCCL: two ranks issuing two collectives in opposite orders, or on two
communicators that wait on each other in a cycle, or two ranks that both send before they
receive. :class:`StrictHub` gives each rank (a thread) a :class:`StrictCommunicator` with
NCCL's semantics and checks, and raises :class:`ContractViolation` naming the ranks and the calls:

- the k-th collective of each member of a group is one collective: they must agree on the
  operation, dtype, shape (what NCCL's counts need) and reduce op;
- a collective, or a send/receive pair, completes only when every party has joined; when every
  live rank is blocked and none can complete, that is a deadlock, reported at once (no timeout)
  with what each rank waits in;
- with ``orders`` (rank -> the calls it must issue, in order: the order a compiler pass fixed for
  the device), a call out of that order is a violation before it blocks anything;
- :meth:`StrictCommunicator.exchange` is a group of sends and receives issued together (NCCL's
  ``groupStart``/``groupEnd``: a pipeline stage's two-way exchange), which completes as a whole.

>>> import threading, numpy as np
>>> hub = StrictHub(2)
>>> out = [None, None]
>>> def rank(r):
...     out[r] = hub.communicator(r).all_reduce(np.full(2, r + 1.0))
>>> ts = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
>>> _ = [t.start() for t in ts]; _ = [t.join() for t in ts]
>>> out[0].tolist(), out[1].tolist()
([3.0, 3.0], [3.0, 3.0])
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from comm.base import CommError, Communicator


@dataclass(frozen=True)
class Call:
    """One NCCL-level call of a rank: the operation, its communicator (a collective's ranks, or
    the pair ``(src, dst)`` of a transfer) and what the members must agree on."""

    op: str
    group: tuple[int, ...]
    dtype: str = ""
    shape: tuple[int, ...] = ()
    reduce: str = ""
    tag: int = 0

    def __str__(self) -> str:
        what = f"{self.dtype}{list(self.shape)}" if self.dtype else ""
        extra = f", {self.reduce}" if self.reduce else ""
        if self.op in ("send", "recv"):
            src, dst = self.group
            return f"{self.op}({what + ', ' if what else ''}tag {self.tag}) {src} -> {dst}"
        return f"{self.op}({what}{extra}) over ranks {list(self.group)}"

    def key(self) -> tuple[str, tuple[int, ...]]:
        """What an order names: the operation and its communicator."""
        return self.op, self.group


class ContractViolation(CommError):
    """A call that breaks NCCL's contract; the message names the ranks and the calls."""


class _Slot:
    """One matched collective (the k-th call of each member of a group) or transfer."""

    __slots__ = ("calls", "inputs", "results", "error", "size", "complete")

    def __init__(self, size: int):
        self.size = size
        self.calls: dict[int, Call] = {}
        self.inputs: dict[int, tuple] = {}  # rank -> (array, the operation's parameters)
        self.results: dict[int, object] = {}
        self.error: ContractViolation | None = None
        self.complete = False  # every party joined: results (or the error) are there


class StrictHub:
    """The ranks' shared state: matched calls, what each rank waits in, the fixed orders."""

    def __init__(self, world_size: int, timeout: float = 30.0, orders: dict[int, Sequence] | None = None):
        self.world_size, self.timeout = world_size, timeout
        self.orders = {r: [o.key() if isinstance(o, Call) else (o[0], tuple(o[1])) for o in seq]
                       for r, seq in (orders or {}).items()}
        self.cond = threading.Condition()
        self.slots: dict[tuple, _Slot] = {}
        self.counts: dict[tuple, int] = {}  # (rank, communicator key) -> calls so far
        self.issued: dict[int, int] = {}    # rank -> calls issued (its position in its order)
        self.waiting: dict[int, list[tuple[Call, _Slot]]] = {}  # rank -> the calls it is blocked in
        self.done: set[int] = set()
        self.failure: CommError | None = None  # a violation, or the abort that stopped every rank
        self.log: dict[int, list[Call]] = {}  # rank -> every call it issued, in order

    def communicator(self, rank: int) -> StrictCommunicator:
        return StrictCommunicator(self, rank)

    # ----------------------------------------------------------------------- the contract
    def join(self, rank: int, items: list[tuple[Call, object]]) -> list:
        """Rank ``rank`` issues ``items`` (call, input) together (one call, or one group) and
        blocks until every one has matched; returns their results in order."""
        with self.cond:
            self._raise_if_failed()
            slots = []
            for call, value in items:
                self.log.setdefault(rank, []).append(call)
                self._check_order(rank, call)
                slots.append(self._enter(rank, call, value))
            self.waiting[rank] = [(c, s) for (c, _), s in zip(items, slots)]
            self.cond.notify_all()
            deadline_left = self.timeout
            while not all(_settled(s) for s in slots):
                self._raise_if_failed()
                stuck = self._deadlock()
                if stuck:
                    self._fail(ContractViolation(stuck))
                if not self.cond.wait(timeout=min(deadline_left, 0.5)):
                    deadline_left -= 0.5
                    if deadline_left <= 0:
                        self._fail(ContractViolation(f"rank {rank}: no progress for {self.timeout:g} s: "
                                                     + self._describe_waits()))
            del self.waiting[rank]
            for s in slots:
                if s.error:
                    raise s.error
            return [s.results.pop(rank) for s in slots]

    def close(self, rank: int) -> None:
        with self.cond:
            self.done.add(rank)
            self.cond.notify_all()

    def _check_order(self, rank: int, call: Call) -> None:
        order = self.orders.get(rank)
        if order is None:
            return
        i = self.issued.get(rank, 0)
        self.issued[rank] = i + 1
        if i >= len(order):
            self._fail(ContractViolation(f"rank {rank} issued {call} (call {i}), but its order has only {len(order)} "
                                         f"calls"))
        if order[i] != call.key():
            want = f"{order[i][0]} over ranks {list(order[i][1])}"
            self._fail(ContractViolation(f"rank {rank} issued {call} as its call {i}, but the order fixed for its "
                                         f"device has {want} there"))

    def _enter(self, rank: int, call: Call, value) -> _Slot:
        comm = (call.op in ("send", "recv"), call.group)  # transfers match per pair, collectives per group
        k = self.counts.get((rank, comm), 0)
        self.counts[(rank, comm)] = k + 1
        size = 2 if call.op in ("send", "recv") else len(call.group)
        slot = self.slots.setdefault((comm, k), _Slot(size))
        slot.calls[rank], slot.inputs[rank] = call, value
        if len(slot.calls) == slot.size:
            del self.slots[(comm, k)]
            try:
                slot.results = _complete(slot)
            except ContractViolation as e:
                slot.error = e
            slot.complete = True
        return slot

    def _deadlock(self) -> str:
        """A report when some blocked ranks can never return: each waits (in a call, or a group
        of calls, that completes only as a whole) for a member that is itself blocked for good
        or finished. A rank that is running may yet join; a blocked rank joins nothing new until
        its own calls complete. "" when no rank is stuck."""
        live = set(range(self.world_size)) - self.done
        blocked = {r: [(c, s) for c, s in calls if not _settled(s)] for r, calls in self.waiting.items()}
        blocked = {r: calls for r, calls in blocked.items() if calls}
        may_join = live - set(blocked)  # running ranks
        moved = True
        while moved:  # the blocked ranks whose every missing member may still join
            moved = False
            for r, calls in blocked.items():
                if r not in may_join and all(set(c.group) - set(s.calls) <= may_join for c, s in calls):
                    may_join.add(r)
                    moved = True
        stuck = set(blocked) - may_join
        if not stuck:
            return ""
        return "deadlock (NCCL would hang): " + self._describe_waits(stuck)

    def _describe_waits(self, ranks=None) -> str:
        parts = []
        for rank in sorted(self.waiting if ranks is None else ranks):
            for call, slot in self.waiting[rank]:
                if not _settled(slot):
                    missing = sorted(set(call.group) - set(slot.calls))
                    parts.append(f"rank {rank} waits in {call}" + (f" for rank(s) {missing}" if missing else ""))
        return "; ".join(parts)

    def _fail(self, error: ContractViolation) -> None:
        self.failure = self.failure or error
        self.cond.notify_all()
        raise self.failure

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure


def _settled(slot: _Slot) -> bool:
    return slot.complete


def _complete(slot: _Slot) -> dict[int, object]:
    """The results of a matched collective or transfer, after checking its parties agree.
    ``slot.inputs[rank]`` is (array, the operation's parameters)."""
    calls = slot.calls
    first = calls[min(calls)]
    listing = "; ".join(f"rank {r} issued {c}" for r, c in sorted(calls.items()))
    if first.op in ("send", "recv"):
        send = next((r for r, c in calls.items() if c.op == "send"), None)
        recv = next((r for r, c in calls.items() if c.op == "recv"), None)
        if send is None or recv is None or calls[send].tag != calls[recv].tag:
            raise ContractViolation(f"mismatched transfer: {listing}")
        return {send: None, recv: np.array(slot.inputs[send][0], copy=True)}
    dtypes = {c.dtype for c in calls.values() if c.dtype}  # a broadcast's receivers may pass no buffer
    same_size = first.op in ("all_reduce", "reduce_scatter")  # NCCL's counts must agree
    if len({(c.op, c.reduce) for c in calls.values()}) > 1 or len(dtypes) > 1 or \
            (same_size and len({c.shape for c in calls.values()}) > 1):
        raise ContractViolation(f"the ranks of one collective over ranks {list(first.group)} disagree: {listing}")
    group = first.group
    ins = [slot.inputs[r][0] for r in group]
    params = slot.inputs[group[0]][1]
    op = first.op
    if op == "all_reduce":
        out = _reduce(ins, first.reduce)
        return {r: out.copy() for r in group}
    if op == "all_gather":
        out = np.concatenate(ins, axis=params["axis"])
        return {r: out.copy() for r in group}
    if op == "reduce_scatter":
        pieces = np.array_split(_reduce(ins, first.reduce), len(group), axis=params["axis"])
        return {r: pieces[i].copy() for i, r in enumerate(group)}
    if op == "broadcast":
        src = ins[group.index(params["root"])]
        return {r: np.array(src, copy=True) for r in group}
    if op == "all_to_all":
        split, concat = params["split_axis"], params["concat_axis"]
        parts = [np.array_split(x, len(group), axis=split) for x in ins]
        return {r: np.concatenate([parts[j][i] for j in range(len(group))], axis=concat) for i, r in enumerate(group)}
    return {r: None for r in group}  # barrier


def _reduce(arrays, op: str):
    out = np.array(arrays[0], copy=True)
    for a in arrays[1:]:
        out = np.maximum(out, a) if op == "max" else out + a
    return out


class StrictCommunicator(Communicator):
    """One rank's end of a :class:`StrictHub`: the base class's interface with NCCL's semantics
    (each call blocks until its parties have joined) and its contract checked."""

    ordered = True  # calls are matched by their order, as NCCL's are

    def __init__(self, hub: StrictHub, rank: int):
        super().__init__(rank, hub.world_size, hub.timeout)
        self.hub = hub

    def post(self, array, dst: int, tag: int = 0) -> None:
        self.send(array, dst, tag)

    def close(self) -> None:
        self.hub.close(self.rank)

    def abort(self, reason: str = "aborted by the caller") -> None:
        """Fail every call blocked in the hub, on every rank (as ``ncclCommAbort`` does its own)."""
        with self.hub.cond:
            self.hub.failure = self.hub.failure or CommError(f"rank {self.rank}: {reason}")
            self.hub.cond.notify_all()

    # ------------------------------------------------------------------- point to point
    def send(self, array, dst: int, tag: int = 0) -> None:
        """Blocks until rank ``dst`` receives it (NCCL's rule: two ranks that both send first hang)."""
        self._check_peer(dst)
        array = np.asarray(array)
        self.hub.join(self.rank, [(Call("send", (self.rank, dst), array.dtype.name, array.shape, tag=tag), (array, {}))])

    def recv(self, src: int, tag: int = 0) -> np.ndarray:
        self._check_peer(src)
        return self.hub.join(self.rank, [(Call("recv", (src, self.rank), tag=tag), (None, {}))])[0]

    def exchange(self, sends: Sequence[tuple], recvs: Sequence[tuple]) -> list[np.ndarray]:
        """Sends ``(array, dst, tag)`` and receives ``(src, tag)`` issued as one NCCL group: they
        complete together, so a two-way exchange does not deadlock. Returns the received arrays."""
        items = []
        for array, dst, tag in sends:
            self._check_peer(dst)
            array = np.asarray(array)
            items.append((Call("send", (self.rank, dst), array.dtype.name, array.shape, tag=tag), (array, {})))
        for src, tag in recvs:
            self._check_peer(src)
            items.append((Call("recv", (src, self.rank), tag=tag), (None, {})))
        return self.hub.join(self.rank, items)[len(sends):]

    # --------------------------------------------------------------------------- collectives
    def _collective(self, op: str, x, group, reduce: str = "", **params):
        group = tuple(self._group(group))
        x = None if x is None else np.asarray(x)
        call = Call(op, group, "" if x is None else x.dtype.name, () if x is None else x.shape, reduce)
        return self.hub.join(self.rank, [(call, (x, params))])[0]

    def all_reduce(self, x, group=None, op: str = "sum"):
        return self._collective("all_reduce", x, group, op)

    def all_gather(self, x, axis: int = 0, group=None):
        return self._collective("all_gather", x, group, axis=axis)

    def reduce_scatter(self, x, axis: int = 0, group=None, op: str = "sum"):
        return self._collective("reduce_scatter", x, group, op, axis=axis)

    def all_to_all(self, x, split_axis: int, concat_axis: int, group=None):
        return self._collective("all_to_all", x, group, split_axis=split_axis, concat_axis=concat_axis)

    def broadcast(self, x, root: int, group=None):
        group = self._group(group)
        if root not in group:
            raise CommError(f"broadcast: root rank {root} is not in the group {group}")
        return self._collective("broadcast", x, group, root=root)

    def barrier(self, group=None) -> None:
        self._collective("barrier", None, group)

"""Collective algorithms written once, per rank, as schedules of point-to-point messages.

Each algorithm is a generator run by one rank: it yields ``Send(peer, array)`` and
``Recv(peer)`` steps (``peer`` is an index into the group) and returns the rank's result. A
transport drives it: the in-process simulator steps every rank's generator in one thread, a
per-rank communicator (threads here, gRPC between processes) performs each step for real. The
algorithms are therefore the same whichever transport carries them.

Messages between a pair of ranks arrive in the order they were sent; nothing else is assumed.

>>> import numpy as np
>>> from comm.inprocess import run_group
>>> outs, sent = run_group(ring_all_reduce, [np.ones(4), 2 * np.ones(4)])
>>> outs[0].tolist(), sent
([3.0, 3.0, 3.0, 3.0], 64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator

import numpy as np


@dataclass(frozen=True, slots=True)
class Send:
    peer: int
    array: np.ndarray


@dataclass(frozen=True, slots=True)
class Recv:
    peer: int


Schedule = Generator[Send | Recv, Any, Any]


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """NumPy's ``array_split`` boundaries: the first ``n % parts`` pieces are one longer."""
    q, r = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + q + (1 if i < r else 0)
        out.append((start, stop))
        start = stop
    return out


REDUCE_OPS = ("sum", "max")


def _combine(op: str):
    """The in-place reduction ``acc <- op(acc, got)`` of reduce op ``op`` ("sum" or "max")."""
    if op == "sum":
        return lambda acc, got: np.add(acc, got, out=acc)
    if op == "max":
        return lambda acc, got: np.maximum(acc, got, out=acc)
    raise ValueError(f"unknown reduce op {op!r}; the collectives reduce with one of {REDUCE_OPS}")


def ring_all_reduce(me: int, n: int, x: np.ndarray, op: str = "sum") -> Schedule:
    """Reduce (``op``: "sum" or "max") over the group, on every rank: a ring reduce-scatter then
    a ring all-gather, so each rank sends 2(n-1)/n of the tensor (the bandwidth-optimal schedule)."""
    combine = _combine(op)
    if n == 1:
        return x.copy()
    flat = np.array(x, copy=True).reshape(-1)
    chunks = [flat[a:b] for a, b in _bounds(flat.size, n)]
    right, left = (me + 1) % n, (me - 1) % n
    for step in range(n - 1):  # reduce-scatter: afterwards chunk (me + 1) % n is fully reduced here
        yield Send(right, chunks[(me - step) % n])
        got = yield Recv(left)
        combine(chunks[(me - step - 1) % n], got)
    for step in range(n - 1):  # all-gather the summed chunks around the ring
        yield Send(right, chunks[(me + 1 - step) % n])
        chunks[(me - step) % n][...] = yield Recv(left)
    return flat.reshape(x.shape)


def ring_all_gather(me: int, n: int, x: np.ndarray, axis: int = 0) -> Schedule:
    """Concatenate every rank's piece along ``axis`` in group order (pieces may differ in length
    along ``axis``, as uneven splits do): each piece travels n-1 hops around the ring."""
    pieces: list[np.ndarray | None] = [None] * n
    pieces[me] = x
    right, left = (me + 1) % n, (me - 1) % n
    for step in range(n - 1):
        yield Send(right, pieces[(me - step) % n])
        pieces[(me - step - 1) % n] = yield Recv(left)
    return np.concatenate(pieces, axis=axis) if n > 1 else x.copy()


def _cut(x: np.ndarray, axis: int, a: int, b: int) -> np.ndarray:
    """``x[a:b]`` along ``axis``: a view (a range index would gather element by element)."""
    return x[(slice(None),) * (axis % x.ndim) + (slice(a, b),)]


def ring_reduce_scatter(me: int, n: int, x: np.ndarray, axis: int = 0, op: str = "sum") -> Schedule:
    """Rank i ends with piece i (``array_split`` along ``axis``) of the group's sum (or max)."""
    combine = _combine(op)
    if n == 1:
        return x.copy()
    bounds = _bounds(x.shape[axis], n)
    chunks = [np.array(_cut(x, axis, a, b), copy=True) for a, b in bounds]
    right, left = (me + 1) % n, (me - 1) % n
    for step in range(n - 1):  # after step s, chunk (me - s - 1) holds s + 2 addends
        yield Send(right, chunks[(me - step - 1) % n])
        got = yield Recv(left)
        combine(chunks[(me - step - 2) % n], got)
    return chunks[me]


def pairwise_all_to_all(me: int, n: int, x: np.ndarray, split_axis: int, concat_axis: int) -> Schedule:
    """Rank i cuts its tensor along ``split_axis`` into n pieces and sends piece j to rank j;
    it concatenates what it receives along ``concat_axis`` in group order."""
    bounds = _bounds(x.shape[split_axis], n)
    mine = [_cut(x, split_axis, a, b) for a, b in bounds]
    received: list[np.ndarray | None] = [None] * n
    received[me] = mine[me]
    for step in range(1, n):
        yield Send((me + step) % n, mine[(me + step) % n])
        received[(me - step) % n] = yield Recv((me - step) % n)
    return np.concatenate(received, axis=concat_axis) if n > 1 else np.array(mine[0], copy=True)


def tree_broadcast(me: int, n: int, x: np.ndarray | None, root: int = 0) -> Schedule:
    """Binomial tree from ``root``: n-1 messages, log2(n) rounds; non-roots pass ``x=None``."""
    rel = (me - root) % n
    value = x
    mask = 1
    while mask < n:  # receive from the parent: the rank that differs in the lowest set bit
        if rel & mask:
            value = yield Recv((rel - mask + root) % n)
            break
        mask <<= 1
    mask >>= 1
    while mask > 0:  # then forward to the children: rel + m for every m below that bit
        if rel + mask < n:
            yield Send((rel + mask + root) % n, value)
        mask >>= 1
    return value if me != root else np.array(value, copy=True)


def barrier(me: int, n: int, _unused=None) -> Schedule:
    """Nobody leaves before everybody has arrived: a dissemination barrier, ceil(log2 n) rounds
    in which rank i signals rank i + 2^k and waits for rank i - 2^k (empty messages)."""
    token = np.zeros(0, dtype=np.uint8)
    step = 1
    while step < n:
        yield Send((me + step) % n, token)
        yield Recv((me - step) % n)
        step <<= 1
    return None


def send(me: int, n: int, x: np.ndarray, peer: int) -> Schedule:
    yield Send(peer, x)


def recv(me: int, n: int, peer: int) -> Schedule:
    return (yield Recv(peer))

"""Collective algorithms written once, per rank, as schedules of point-to-point messages.

Each algorithm is a generator run by one rank: it yields ``Send(peer, array)`` and
``Recv(peer)`` steps (``peer`` is an index into the group) and returns the rank's result. A
transport drives it: the in-process simulator steps every rank's generator in one thread, a
per-rank communicator (threads here, gRPC between processes) performs each step for real. The
algorithms are therefore the same whichever transport carries them.

Messages between a pair of ranks arrive in the order they were sent; nothing else is assumed.

Hierarchical variants (``hierarchical_*``, for ranks grouped in consecutive nodes of ``L =
node_size`` ranks, ``N = n / L`` nodes; a rank's *rail* is the ranks with its local index on the
other nodes) send, per rank, for a tensor of T bytes (an all-gather piece or reduce-scatter
result of t = T / n bytes):

===========================  ==========================  ================  ================
schedule                     phases                      intra-node bytes  inter-node bytes
===========================  ==========================  ================  ================
hierarchical_all_reduce      node RS, rail AR, node AG   2(L-1)/L · T      2(N-1)/N · T/L
hierarchical_reduce_scatter  node RS, rail RS            (L-1) · N · t     (N-1) · t
hierarchical_all_gather      rail AG, node AG            (L-1) · N · t     (N-1) · t
===========================  ==========================  ================  ================

Per rank, the same total as the flat ring (2(n-1)/n · T for an all-reduce, (n-1) · t for the
others), of which under 2T/L (all-reduce) or T/L crosses nodes, each rank on its own rail (the
flat ring sends it all across from each node's last rank). A schedule talks to its node ring
neighbours, or its rail neighbours, in two phases; both send and receive the same fixed number
of messages per phase in the same order, so pairwise ordering is all that keeps the phases
apart. Where ``node_size`` does not divide ``n``, or is ``<= 1`` or ``>= n``, they are the flat
ring schedules.

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
    a ring all-gather, so each rank sends 2(n-1)/n of the tensor (the bandwidth-optimal schedule).
    Two ranks send each other the whole tensor once: the same bytes in one round."""
    combine = _combine(op)
    if n == 1:
        return x.copy()
    flat = _copy(x).reshape(-1)
    if n == 2:  # the ring's bytes (the whole tensor each way) in one exchange instead of two
        # rounds: half the latency, and the same result on both ranks (a + b == b + a)
        yield Send(1 - me, flat)
        combine(flat, (yield Recv(1 - me)))
        return flat.reshape(x.shape)
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


def _copy(x) -> np.ndarray:
    """A C-contiguous copy of ``x`` by its own ``copy`` method, so that array types other than
    NumPy's (CuPy's, the cost model's shape-only arrays) stay what they are."""
    return x.copy() if hasattr(x, "copy") else np.array(x, copy=True)


def _cut(x: np.ndarray, axis: int, a: int, b: int) -> np.ndarray:
    """``x[a:b]`` along ``axis``: a view (a range index would gather element by element)."""
    return x[(slice(None),) * (axis % x.ndim) + (slice(a, b),)]


def ring_reduce_scatter(me: int, n: int, x: np.ndarray, axis: int = 0, op: str = "sum") -> Schedule:
    """Rank i ends with piece i (``array_split`` along ``axis``) of the group's sum (or max)."""
    _combine(op)
    if n == 1:
        return x.copy()
    chunks = [_copy(_cut(x, axis, a, b)) for a, b in _bounds(x.shape[axis], n)]
    return (yield from ring_reduce_scatter_chunks(me, n, chunks, op))


def ring_reduce_scatter_chunks(me: int, n: int, chunks: list, op: str = "sum") -> Schedule:
    """:func:`ring_reduce_scatter` over chunks already cut (reduced in place): rank i ends with
    the group's reduction of chunk i. After step s, chunk (me - s - 1) holds s + 2 operands."""
    (mine,) = yield from _ring_reduce_scatter_bundles(me, list(range(n)), [[c] for c in chunks], _combine(op))
    return mine


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
    return np.concatenate(received, axis=concat_axis) if n > 1 else _copy(mine[0])


# ------------------------------------------------------------------ hierarchical (node, rail)
def _flat(n: int, node_size: int) -> bool:
    """Whether ``node_size`` leaves no two-level structure in a group of ``n``: the flat ring runs."""
    return node_size <= 1 or node_size >= n or n % node_size != 0


def _node_and_rail(me: int, n: int, node_size: int) -> tuple[int, int, list[int], list[int]]:
    """(my node, my index in it, the group indices of my node's ranks, those of my rail)."""
    node, local = divmod(me, node_size)
    return (node, local, [node * node_size + i for i in range(node_size)],
            [m * node_size + local for m in range(n // node_size)])


def _ring_reduce_scatter_bundles(me: int, peers: list[int], bundles: list[list[np.ndarray]], combine) -> Schedule:
    """Ring reduce-scatter among ``peers`` (group indices; I am ``peers[me]``) of one bundle (a list
    of arrays, reduced in place) per peer: afterwards ``bundles[me]`` holds the ring's reduction."""
    k = len(peers)
    right, left = peers[(me + 1) % k], peers[(me - 1) % k]
    for step in range(k - 1):  # as ring_reduce_scatter, one message per array of the bundle
        for a in bundles[(me - step - 1) % k]:
            yield Send(right, a)
        for a in bundles[(me - step - 2) % k]:
            combine(a, (yield Recv(left)))
    return bundles[me]


def _ring_all_gather_bundles(me: int, peers: list[int], mine: list[np.ndarray]) -> Schedule:
    """Ring all-gather among ``peers`` of one bundle per peer (every bundle has ``len(mine)``
    arrays, of any shapes): returns the bundles in ring order."""
    k = len(peers)
    right, left = peers[(me + 1) % k], peers[(me - 1) % k]
    bundles: list[list[np.ndarray] | None] = [None] * k
    bundles[me] = mine
    for step in range(k - 1):
        for a in bundles[(me - step) % k]:
            yield Send(right, a)
        got = []
        for _ in mine:
            got.append((yield Recv(left)))
        bundles[(me - step - 1) % k] = got
    return bundles


def hierarchical_all_reduce(me: int, n: int, x: np.ndarray, node_size: int, op: str = "sum") -> Schedule:
    """ring_all_reduce's result over nodes of ``node_size`` consecutive ranks: a ring
    reduce-scatter inside the node, a ring all-reduce of my chunk along my rail (the only
    inter-node traffic: 2(N-1)/N of 1/node_size of the tensor), a ring all-gather inside the node.

    >>> import numpy as np
    >>> from comm.inprocess import run_group
    >>> outs, _ = run_group(hierarchical_all_reduce, [np.arange(6) * r for r in range(4)], 2)
    >>> outs[3].tolist()
    [0, 6, 12, 18, 24, 30]
    """
    if _flat(n, node_size):
        return (yield from ring_all_reduce(me, n, x, op=op))
    combine = _combine(op)
    node, local, in_node, rail = _node_and_rail(me, n, node_size)
    flat = _copy(x).reshape(-1)
    chunks = [[flat[a:b]] for a, b in _bounds(flat.size, node_size)]
    (mine,) = yield from _ring_reduce_scatter_bundles(local, in_node, chunks, combine)  # the node's sum
    parts = [[mine[a:b]] for a, b in _bounds(mine.size, len(rail))]
    yield from _ring_reduce_scatter_bundles(node, rail, parts, combine)  # part ``node``: the group's sum
    summed = yield from _ring_all_gather_bundles(node, rail, parts[node])
    whole = yield from _ring_all_gather_bundles(local, in_node, [np.concatenate([p for (p,) in summed])])
    return np.concatenate([c for (c,) in whole]).reshape(x.shape)


def hierarchical_reduce_scatter(me: int, n: int, x: np.ndarray, node_size: int, axis: int = 0,
                                op: str = "sum") -> Schedule:
    """ring_reduce_scatter's result (rank i: piece i of the reduction) over nodes of ``node_size``
    consecutive ranks: inside the node, rank l reduces the pieces its rail will keep (l, l + L, ...);
    then a ring reduce-scatter of those along the rail."""
    if _flat(n, node_size):
        return (yield from ring_reduce_scatter(me, n, x, axis=axis, op=op))
    combine = _combine(op)
    node, local, in_node, rail = _node_and_rail(me, n, node_size)
    pieces = [_copy(_cut(x, axis, a, b)) for a, b in _bounds(x.shape[axis], n)]
    by_rail = [[pieces[m * node_size + i] for m in range(len(rail))] for i in range(node_size)]
    mine = yield from _ring_reduce_scatter_bundles(local, in_node, by_rail, combine)
    (piece,) = yield from _ring_reduce_scatter_bundles(node, rail, [[p] for p in mine], combine)
    return piece


def hierarchical_all_gather(me: int, n: int, x: np.ndarray, node_size: int, axis: int = 0) -> Schedule:
    """ring_all_gather's result (pieces of any lengths along ``axis``, in group order) over nodes of
    ``node_size`` consecutive ranks: my piece goes once along my rail (the inter-node part), then
    each rank passes its rail's pieces around the node."""
    if _flat(n, node_size):
        return (yield from ring_all_gather(me, n, x, axis=axis))
    node, local, in_node, rail = _node_and_rail(me, n, node_size)
    along_rail = yield from _ring_all_gather_bundles(node, rail, [x])
    by_rail = yield from _ring_all_gather_bundles(local, in_node, [p for (p,) in along_rail])
    return np.concatenate([by_rail[r % node_size][r // node_size] for r in range(n)], axis=axis)


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
    return value if me != root else _copy(value)


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

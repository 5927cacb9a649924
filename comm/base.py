"""The narrow interface every transport implements.

A transport provides one thing: ``post(array, dst, tag)``, a non-blocking delivery of a copy of
``array`` into rank ``dst``'s :class:`Mailbox`, filed under (this rank, ``tag``). Everything else
is built on it here, once: blocking ``send``/``recv`` (tag 0), and the collectives
(``all_reduce`` and ``reduce_scatter`` with ``op="sum"`` or ``"max"``, ``all_gather``, ``all_to_all``, ``broadcast``, ``barrier``),
which are the schedules of :mod:`comm.algorithms` driven over them, over the whole world or over
a ``group`` (a list of global ranks in order, e.g. one row of a device mesh).

Tags keep concurrent conversations apart: the actor runtime runs several collectives and
transfers at once, each under its own tag, and takes a message only when its tag is asked for.
Messages with the same (source, tag) arrive in the order they were posted.
"""

from __future__ import annotations

import abc
import threading
from collections import deque
from typing import Any, Callable, Sequence

import numpy as np

from comm import algorithms as alg


class CommError(RuntimeError):
    """A collective that cannot complete: a missing peer, a deadlock, a timeout."""


def _check_op(op: str, what: str) -> None:
    if op not in alg.REDUCE_OPS:
        raise CommError(f"{what}: unknown reduce op {op!r}; use one of {', '.join(map(repr, alg.REDUCE_OPS))}")


class Mailbox:
    """The messages that have arrived at one rank, filed by (source rank, tag). Thread-safe:
    transports put from their receiving threads, the rank takes from its own."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self._boxes: dict[tuple[int, int], deque] = {}
        self._cv = threading.Condition()
        self.arrivals = 0  # grows with every put: lets a waiter sleep until something new arrives
        self._error: BaseException | None = None

    def put(self, src: int, tag: int, array: np.ndarray) -> None:
        with self._cv:
            self._boxes.setdefault((src, tag), deque()).append(array)
            self.arrivals += 1
            self._cv.notify_all()

    def fail(self, error: BaseException) -> None:
        """Make every waiting and later take raise ``error`` (e.g. a peer became unreachable)."""
        with self._cv:
            if self._error is None:
                self._error = error
            self._cv.notify_all()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def ready(self, src: int, tag: int) -> bool:
        with self._cv:
            return bool(self._boxes.get((src, tag)))

    def try_take(self, src: int, tag: int) -> np.ndarray | None:
        with self._cv:
            box = self._boxes.get((src, tag))
            if not box:
                self.check()
                return None
            array = box.popleft()
            if not box:
                del self._boxes[(src, tag)]
            return array

    def take(self, src: int, tag: int, timeout: float) -> np.ndarray:
        """The next message from ``src`` under ``tag``; a :class:`CommError` naming ``src`` if none
        arrives within ``timeout`` seconds."""
        with self._cv:
            if not self._cv.wait_for(lambda: bool(self._boxes.get((src, tag))) or self._error is not None, timeout):
                raise CommError(f"rank {self.rank}: no message from rank {src} within {timeout:g} s "
                                f"(is rank {src} alive and in the same collective?)")
        array = self.try_take(src, tag)
        if array is None:
            self.check()
        return array

    def wait(self, seen: int, timeout: float) -> int:
        """Sleep until more than ``seen`` messages have arrived in all (or ``timeout``); the count."""
        with self._cv:
            self._cv.wait_for(lambda: self.arrivals > seen or self._error is not None, timeout)
            self.check()
            return self.arrivals

    def pending(self) -> list[tuple[int, int]]:
        """(source, tag) of every message not taken yet."""
        with self._cv:
            return sorted(k for k, box in self._boxes.items() if box)


class Communicator(abc.ABC):
    """One rank's end of a transport. Subclasses provide ``post`` (and may override ``close``)."""

    def __init__(self, rank: int, world_size: int, timeout: float = 60.0):
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.mailbox = Mailbox(rank)

    # -------------------------------------------------------------- what a transport provides
    @abc.abstractmethod
    def post(self, array: np.ndarray, dst: int, tag: int = 0) -> None:
        """Deliver a copy of ``array`` to rank ``dst`` under ``tag`` without waiting for it to
        arrive (the caller may reuse its buffer at once)."""

    def close(self) -> None:
        """Release the transport's resources (threads, sockets)."""

    # ------------------------------------------------------------------- point to point
    def send(self, array: np.ndarray, dst: int, tag: int = 0) -> None:
        """Deliver ``array`` to rank ``dst`` (a copy: the caller may reuse its buffer)."""
        self._check_peer(dst)
        self.post(np.asarray(array), dst, tag)

    def recv(self, src: int, tag: int = 0) -> np.ndarray:
        """The next array rank ``src`` sent to this rank under ``tag`` (in the order it was sent)."""
        self._check_peer(src)
        return self.mailbox.take(src, tag, self.timeout)

    # --------------------------------------------------------------------------- collectives
    def all_reduce(self, x: np.ndarray, group: Sequence[int] | None = None, op: str = "sum") -> np.ndarray:
        """The group's elementwise sum (``op="sum"``) or maximum (``op="max"``), on every rank."""
        _check_op(op, "all_reduce")
        return self._run(alg.ring_all_reduce, group, x, op=op)

    def all_gather(self, x: np.ndarray, axis: int = 0, group: Sequence[int] | None = None) -> np.ndarray:
        return self._run(alg.ring_all_gather, group, x, axis=axis)

    def reduce_scatter(self, x: np.ndarray, axis: int = 0, group: Sequence[int] | None = None,
                       op: str = "sum") -> np.ndarray:
        _check_op(op, "reduce_scatter")
        return self._run(alg.ring_reduce_scatter, group, x, axis=axis, op=op)

    def all_to_all(self, x: np.ndarray, split_axis: int, concat_axis: int,
                   group: Sequence[int] | None = None) -> np.ndarray:
        return self._run(alg.pairwise_all_to_all, group, x, split_axis=split_axis, concat_axis=concat_axis)

    def broadcast(self, x: np.ndarray | None, root: int, group: Sequence[int] | None = None) -> np.ndarray:
        group = self._group(group)
        if root not in group:
            raise CommError(f"broadcast: root rank {root} is not in the group {group}")
        return self._run(alg.tree_broadcast, group, x, root=group.index(root))

    def barrier(self, group: Sequence[int] | None = None) -> None:
        group = self._group(group)
        gen = alg.barrier(list(group).index(self.rank), len(group))
        self._drive(gen, group)

    # ------------------------------------------------------------------------------ plumbing
    def _group(self, group: Sequence[int] | None) -> list[int]:
        group = list(range(self.world_size)) if group is None else list(group)
        if self.rank not in group:
            raise CommError(f"rank {self.rank} is not in the group {group}")
        return group

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise CommError(f"rank {self.rank}: peer {peer} is not another rank of a world of {self.world_size}")

    def _run(self, algorithm: Callable[..., Any], group, x, **kwargs):
        group = self._group(group)
        return self._drive(algorithm(group.index(self.rank), len(group), x, **kwargs), group)

    def _drive(self, gen, group: list[int], tag: int = 0):
        value = None
        try:
            while True:
                step = gen.send(value)
                if isinstance(step, alg.Send):
                    self.send(step.array, group[step.peer], tag)
                    value = None
                else:
                    value = self.recv(group[step.peer], tag)
        except StopIteration as stop:
            return stop.value

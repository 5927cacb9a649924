"""The narrow interface every transport implements.

A transport provides point-to-point ``send`` and ``recv`` between global ranks; the collectives
(``all_reduce``, ``all_gather``, ``reduce_scatter``, ``all_to_all``, ``broadcast``,
``barrier``) are the schedules of :mod:`comm.algorithms` driven over them, over the whole
world or over a ``group`` (a list of global ranks in order, e.g. one row of a device mesh).
"""

from __future__ import annotations

import abc

from typing import Any, Callable, Sequence

import numpy as np

from comm import algorithms as alg


class CommError(RuntimeError):
    """A collective that cannot complete: a missing peer, a deadlock, a timeout."""


class Communicator(abc.ABC):
    """One rank's end of a transport. Subclasses provide ``send`` and ``recv``."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size

    # -------------------------------------------------------------- what a transport provides
    @abc.abstractmethod
    def send(self, array: np.ndarray, dst: int) -> None:
        """Deliver ``array`` to rank ``dst`` (a copy: the caller may reuse its buffer)."""

    @abc.abstractmethod
    def recv(self, src: int) -> np.ndarray:
        """The next array rank ``src`` sent to this rank (in the order it was sent)."""

    # --------------------------------------------------------------------------- collectives
    def all_reduce(self, x: np.ndarray, group: Sequence[int] | None = None) -> np.ndarray:
        return self._run(alg.ring_all_reduce, group, x)

    def all_gather(self, x: np.ndarray, axis: int = 0, group: Sequence[int] | None = None) -> np.ndarray:
        return self._run(alg.ring_all_gather, group, x, axis=axis)

    def reduce_scatter(self, x: np.ndarray, axis: int = 0, group: Sequence[int] | None = None) -> np.ndarray:
        return self._run(alg.ring_reduce_scatter, group, x, axis=axis)

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

    def _drive(self, gen, group: list[int]):
        value = None
        try:
            while True:
                step = gen.send(value)
                if isinstance(step, alg.Send):
                    self.send(step.array, group[step.peer])
                    value = None
                else:
                    value = self.recv(group[step.peer])
        except StopIteration as stop:
            return stop.value

"""The in-process transport: every rank lives in this process.

Two ways to drive the same per-rank schedules of :mod:`comm.algorithms`:

- :func:`run_group` steps every rank's schedule in one thread, in lock step. This is what the
  single controller uses to simulate a collective over the shards it holds: deterministic,
  no threads, and it counts the bytes each message carries.
- :class:`InProcessHub` and :class:`InProcessCommunicator` give each rank a blocking
  communicator with mailboxes, for ranks that run as threads (actors in the local backend);
  a receive that waits too long fails with the peer's rank instead of hanging. Each mailbox
  keeps the per-source bounds of :class:`~comm.base.Mailbox` as the gRPC transport's do: a
  ``send`` beyond them raises the receiver's :class:`~comm.base.CommError` in the sender (and
  fails the receiver's mailbox), so tests exercise them without sockets.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Sequence

import numpy as np

from comm.algorithms import Recv, Send, _copy
from comm.base import CommError, Communicator


def run_group(algorithm: Callable[..., Any], inputs: Sequence[Any], *args, **kwargs) -> tuple[list[Any], int]:
    """Run ``algorithm(me, n, inputs[me], *args, **kwargs)`` for every rank of a group of
    ``len(inputs)`` and return (each rank's result, total bytes sent).

    Messages are copied when sent, as a real transport would, so no rank sees another's buffer.
    """
    n = len(inputs)
    schedules = [algorithm(me, n, inputs[me], *args, **kwargs) for me in range(n)]
    return drive(schedules)


def drive(schedules: list) -> tuple[list[Any], int]:
    """Step per-rank schedules (generators) until all return; raise on a deadlock."""
    n = len(schedules)
    mailbox: dict[tuple[int, int], deque] = {}
    results: list[Any] = [None] * n
    waiting: list[Any] = [None] * n  # the step each rank is blocked on (a Recv), or None when done
    sent = 0

    def advance(me: int, value: Any) -> None:
        nonlocal sent
        gen = schedules[me]
        try:
            step = gen.send(value)
            while isinstance(step, Send):
                data = _copy(step.array)  # the receiver's own copy, of the sender's array type
                sent += data.nbytes
                mailbox.setdefault((me, step.peer), deque()).append(data)
                step = gen.send(None)
            waiting[me] = step
        except StopIteration as stop:
            results[me] = stop.value
            waiting[me] = None

    live = set()
    for me in range(n):
        advance(me, None)
        if waiting[me] is not None:
            live.add(me)
    while live:
        progress = False
        for me in sorted(live):
            step = waiting[me]
            if not isinstance(step, Recv):
                raise CommError(f"rank {me} yielded {step!r}; schedules yield Send or Recv steps")
            box = mailbox.get((step.peer, me))
            if box:
                advance(me, box.popleft())
                progress = True
                if waiting[me] is None:
                    live.discard(me)
        if not progress:
            blocked = ", ".join(f"rank {me} waits for rank {waiting[me].peer}" for me in sorted(live))
            raise CommError(f"collective deadlock: {blocked}")
    return results, sent


class InProcessHub:
    """The ranks of one process: one :class:`Mailbox` per rank, shared through the hub."""

    def __init__(self, world_size: int, timeout: float = 60.0):
        self.world_size = world_size
        self.timeout = timeout
        self._comms = [InProcessCommunicator(self, r) for r in range(world_size)]
        self._lock = threading.Lock()
        self.bytes_sent = 0

    def communicator(self, rank: int) -> InProcessCommunicator:
        return self._comms[rank]

    def deliver(self, src: int, dst: int, tag: int, array: np.ndarray) -> None:
        mailbox = self._comms[dst].mailbox
        mailbox.admit(src, np.asarray(array).nbytes)  # before the copy: over the bounds costs no memory
        data = np.array(array, copy=True)
        with self._lock:
            self.bytes_sent += data.nbytes
        mailbox.put(src, tag, data)


class InProcessCommunicator(Communicator):
    """One rank's end of an :class:`InProcessHub` (use one thread per rank)."""

    def __init__(self, hub: InProcessHub, rank: int):
        super().__init__(rank, hub.world_size, hub.timeout)
        self.hub = hub

    def post(self, array: np.ndarray, dst: int, tag: int = 0) -> None:
        self.hub.deliver(self.rank, dst, tag, array)

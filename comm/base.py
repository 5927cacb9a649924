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

What may wait in a mailbox is bounded per source rank (:data:`DEFAULT_MAX_MESSAGES` messages and
:data:`DEFAULT_MAX_BYTES` bytes, far above what a correct run leaves unconsumed; change them with
:meth:`Communicator.set_limits`): a peer that sends more fails the mailbox with a
:class:`CommError` naming it, and the transport refuses the message, so a misbehaving peer costs
an error, never unbounded memory or a blocked sender.
"""

from __future__ import annotations

import abc
import threading
from collections import deque
from typing import Any, Callable, Sequence

import numpy as np

from comm import algorithms as alg

DEFAULT_MAX_MESSAGES = 65_536  # per source rank; the workers' status reports alone reach thousands in a long step
DEFAULT_MAX_BYTES = 8 << 30  # per source rank


NEW_KEYS_LIMIT = 65536  # arrivals a mailbox remembers by key between drains


class CommError(RuntimeError):
    """A collective that cannot complete: a missing peer, a deadlock, a timeout."""


def _check_op(op: str, what: str) -> None:
    if op not in alg.REDUCE_OPS:
        raise CommError(f"{what}: unknown reduce op {op!r}; use one of {', '.join(map(repr, alg.REDUCE_OPS))}")


class Mailbox:
    """The messages that have arrived at one rank, filed by (source rank, tag). Thread-safe:
    transports put from their receiving threads, the rank takes from its own.

    At most ``max_messages`` messages and ``max_bytes`` bytes from one source wait here at once;
    a put beyond that fails the mailbox (and raises) with a :class:`CommError` naming the source.

    >>> box = Mailbox(rank=1, max_messages=2)
    >>> for i in range(2): box.put(0, 7, np.full(3, i))
    >>> box.put(0, 8, np.zeros(3))
    Traceback (most recent call last):
    comm.base.CommError: rank 1: rank 0 sent more than 2 unconsumed messages; ...
    """

    def __init__(self, rank: int = 0, max_messages: int = DEFAULT_MAX_MESSAGES, max_bytes: int = DEFAULT_MAX_BYTES):
        self.rank = rank
        self._boxes: dict[tuple[int, int], deque] = {}
        self._cv = threading.Condition()
        self.arrivals = 0  # grows with every put: lets a waiter sleep until something new arrives
        self._new: list[tuple[int, int]] | None = []  # (source, tag) put since the last drain
        self._error: BaseException | None = None
        self._held: dict[int, list[int]] = {}  # per source: [messages, bytes] waiting here
        self.max_messages, self.max_bytes = 0, 0
        self.set_limits(max_messages, max_bytes)

    def set_limits(self, max_messages: int | None = None, max_bytes: int | None = None) -> None:
        """Bound what may wait here per source rank (None keeps a bound as it is)."""
        for name, value in (("max_messages", max_messages), ("max_bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CommError(f"rank {self.rank}: {name}={value!r} must be a positive integer")
        with self._cv:
            self.max_messages = self.max_messages if max_messages is None else max_messages
            self.max_bytes = self.max_bytes if max_bytes is None else max_bytes

    def admit(self, src: int, nbytes: int) -> None:
        """Raise (and fail the mailbox with) a :class:`CommError` if one more message of
        ``nbytes`` from ``src`` would exceed the bounds; transports ask before they allocate."""
        with self._cv:
            self._admit(src, nbytes)

    def _admit(self, src: int, nbytes: int) -> None:
        messages, held = self._held.get(src, (0, 0))
        if messages + 1 > self.max_messages:
            over = f"more than {self.max_messages} unconsumed messages"
        elif held + nbytes > self.max_bytes:
            over = (f"more than {self.max_bytes} unconsumed bytes ({held} waiting, then a message of {nbytes})")
        else:
            return
        error = CommError(f"rank {self.rank}: rank {src} sent {over}; a correct run takes what it is sent, so rank "
                          f"{src} misbehaves or this rank stopped taking (raise the bounds with "
                          f"Communicator.set_limits(max_messages=..., max_bytes=...) if this much may wait)")
        if self._error is None:
            self._error = error
        self._cv.notify_all()
        raise error

    def put(self, src: int, tag: int, array: np.ndarray) -> None:
        with self._cv:
            self._admit(src, array.nbytes)
            self._boxes.setdefault((src, tag), deque()).append(array)
            held = self._held.setdefault(src, [0, 0])
            held[0] += 1
            held[1] += array.nbytes
            self.arrivals += 1
            if self._new is not None:
                self._new.append((src, tag))
                if len(self._new) > NEW_KEYS_LIMIT:  # nobody drains: stop keeping them
                    self._new = None
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
            held = self._held[src]
            held[0] -= 1
            held[1] -= array.nbytes
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

    def drain(self) -> list[tuple[int, int]] | None:
        """The (source, tag) of the messages put since the last drain, in arrival order, so a
        reader with many conversations in flight looks only at the ones that moved; None when
        more came than were kept (look at every conversation)."""
        with self._cv:
            new, self._new = self._new, []
            return new

    def pending(self) -> list[tuple[int, int]]:
        """(source, tag) of every message not taken yet."""
        with self._cv:
            return sorted(k for k, box in self._boxes.items() if box)


class Communicator(abc.ABC):
    """One rank's end of a transport. Subclasses provide ``post`` (and may override ``close``)."""

    # False: messages wait in mailboxes, so calls may start in any order. True (NCCL): calls are
    # matched by their order and block until every party joined; the actor runtime then issues
    # its communication in the order its plan fixes (actors.ordered) and needs ``exchange``.
    ordered = False

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

    def abort(self, reason: str = "aborted by the caller") -> None:
        """Make a call blocked in this transport fail with ``reason`` (an ordered transport's
        calls block until every party joined; a mailbox's waits are failed through it)."""

    def set_limits(self, max_messages: int | None = None, max_bytes: int | None = None) -> None:
        """Bound the messages and bytes that may wait unconsumed from each source rank (defaults
        :data:`DEFAULT_MAX_MESSAGES` and :data:`DEFAULT_MAX_BYTES`; None keeps a bound as it is).
        A peer that sends more fails this rank's mailbox with a :class:`CommError` naming it."""
        self.mailbox.set_limits(max_messages, max_bytes)

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

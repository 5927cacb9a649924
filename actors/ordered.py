"""A rank's communication issued in one fixed order, on a thread of its own (the NCCL mode).

NCCL has no mailboxes: a collective is matched with the other members' calls by call order and
blocks until all have joined, and a send blocks until its receive runs. The actor runtime fires
its communication ops whenever their inputs are ready, which on such a transport can hang (two
ranks starting two collectives in opposite orders). So on a transport that matches calls by
order (``Communicator.ordered``), the runtime hands each communication op to an :class:`Issuer`
the moment it could fire, and the issuer runs them strictly in the order the compiler fixed for
the device (``RankPlan.comm_order``, from :mod:`scheduler.nccl_order`), one after another, on
its own thread, while the runtime's thread goes on computing: the communication stream that
overlaps compute. Consecutive transfers of the order that are all handed over go out as one
NCCL group (a pipeline stage's two-way exchange).

A finished call's result waits here, and a zero-length marker goes into the rank's own mailbox
under the op's tag: the runtime's schedules in flight wait for it as for any message, so the
runtime's loop is the same on every transport.

On a GPU the issuer's thread uses a CUDA stream of its own; each call first waits (on the
device, not the host) for a CUDA event recorded on the compute stream when the op was handed
over, so NCCL reads its inputs only once the kernels writing them are done.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from comm import CommError

_MARK = np.zeros(0, np.uint8)  # what the issuer puts in the mailbox when a call is done


class OrderStuck(CommError):
    """A rank whose NCCL order asks for an op that can never become ready (its inputs wait for
    calls the order puts later): NCCL would hang; the message names the rank and the call."""


@dataclass(slots=True)
class Job:
    """One call of a rank: a collective (``call()`` runs it, blocking), or one end of a transfer
    (``send`` of ``array`` to communicator rank ``peer``, or ``recv`` from it); its tag is the one
    it is handed over with (:meth:`Issuer.submit`)."""

    kind: str                      # "call", "send" or "recv"
    call: Callable[[], Any] | None = None
    array: Any = None
    peer: int = -1


@dataclass(slots=True)
class Issue:
    """A schedule step (see ``RankRuntime._drive``): hand ``job`` over as the rank's ``event``;
    the schedule resumes when it is done, with its result."""

    event: tuple
    job: Job


class Issuer:
    """Runs one rank's jobs in its plan's order on a communication thread.

    ``comm`` is the rank's (ordered) communicator and ``me`` its rank on it: the completion
    markers are filed in ``comm.mailbox`` under (``me``, the op's tag).
    """

    def __init__(self, comm, me: int, name: str = "flowsys-comm"):
        self.comm, self.me, self.name = comm, me, name
        self.cond = threading.Condition()
        self.order: list[tuple] = []
        self.position: dict[tuple, int] = {}
        self.next = 0                    # the position in the order of the next call to issue
        self.jobs: dict[tuple, tuple] = {}     # event -> (job, tag, CUDA event or None)
        self.results: dict[tuple, Any] = {}    # event -> its result, or the error it raised
        self.running: list[tuple] = []   # the events of the call in progress
        self.closed = False
        self.thread: threading.Thread | None = None
        self.cupy = _cupy_of(comm)

    # ------------------------------------------------------------------- the runtime's side
    def begin(self, order: list[tuple]) -> None:
        """A step starts: its calls are ``order`` (event keys, each once)."""
        with self.cond:
            if self.jobs or self.next < len(self.order):
                raise CommError(f"rank {self.me}: a step began with {len(self.order) - self.next} call(s) of the "
                                f"last one not issued: {self.describe()}")
            self.order, self.next = list(order), 0
            self.position = {e: i for i, e in enumerate(self.order)}
            self.results.clear()
        if self.thread is None:
            self.thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self.thread.start()

    def submit(self, event: tuple, job: Job, tag: int) -> None:
        """``job`` may run as the rank's ``event`` (its inputs are ready); it runs in its turn."""
        ready = None
        if self.cupy is not None:  # the kernels that wrote its inputs, on the compute stream
            ready = self.cupy.cuda.Event()
            ready.record()
        with self.cond:
            if event not in self.position:
                raise CommError(f"rank {self.me}: {_name(event)} ({job.kind}) is not in the order fixed for this "
                                f"device ({len(self.order)} calls); re-lower the plan (scheduler.nccl_order.attach)")
            if self.position[event] < self.next or event in self.jobs:
                raise CommError(f"rank {self.me}: {_name(event)} was handed over twice in one step")
            self.jobs[event] = (job, tag, ready)
            self.cond.notify_all()

    def result(self, event: tuple) -> Any:
        """The result of ``event``'s call (raises the error it met)."""
        with self.cond:
            out = self.results.pop(event)
        if isinstance(out, BaseException):
            raise out
        return out

    def finish(self) -> None:
        """The step is done: every call of the order must have been issued."""
        with self.cond:
            if self.next < len(self.order) or self.jobs:
                raise CommError(f"rank {self.me}: the step ended with calls of its order not issued: "
                                f"{self.describe()}")

    def stuck(self) -> str:
        """Why this rank can never go on, when its runtime has nothing left to fire: no call in
        progress, no result waiting to be taken, and the next call of the order not handed over
        (its inputs wait for calls the order puts later). "" when it is not stuck so."""
        with self.cond:
            if self.running or self.results or self.next >= len(self.order) or self.order[self.next] in self.jobs:
                return ""
            return (f"rank {self.me}'s NCCL order issues {_name(self.order[self.next])} next (call {self.next} of "
                    f"{len(self.order)}), but that op never became ready: its inputs wait for calls the order puts "
                    f"later ({len(self.jobs)} handed over and waiting). The order contradicts the plan's data "
                    f"dependencies; fix it again with scheduler.nccl_order.attach")

    def describe(self) -> str:
        """Where the rank is in its order (for failure reports)."""
        if self.running:
            return f"in call {self.position.get(self.running[0], '?')} of {len(self.order)}: " + \
                ", ".join(_name(e) for e in self.running)
        if self.next >= len(self.order):
            return f"all {len(self.order)} calls of its order issued"
        want = self.order[self.next]
        return (f"call {self.next} of {len(self.order)} ({_name(want)}) not handed over yet; "
                f"{len(self.jobs)} later call(s) wait behind it")

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    # ------------------------------------------------------------------- the thread's side
    def _main(self) -> None:
        if self.cupy is not None:  # a stream of its own on the communicator's device
            self.cupy.cuda.Device(getattr(self.comm, "device", 0)).use()
            self.cupy.cuda.Stream(non_blocking=True).use()
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closed or (self.next < len(self.order)
                                                           and self.order[self.next] in self.jobs))
                if self.closed:
                    return
                batch = [self.order[self.next]]
                self.next += 1
                if self.jobs[batch[0]][0].kind != "call":  # transfers handed over together: one group
                    while self.next < len(self.order) and self.order[self.next] in self.jobs and \
                            self.jobs[self.order[self.next]][0].kind != "call":
                        batch.append(self.order[self.next])
                        self.next += 1
                items = [(e, *self.jobs.pop(e)) for e in batch]
                self.running = batch
            try:
                outs = self._run([(job, tag, ready) for _, job, tag, ready in items])
            except BaseException as err:  # noqa: BLE001 - the runtime's thread raises it
                outs = [err] * len(items)
            with self.cond:
                self.running = []
                for (event, _, _, _), out in zip(items, outs):
                    self.results[event] = out
            for _, _, tag, _ in items:
                self.comm.mailbox.put(self.me, tag, _MARK)

    def _run(self, items: list[tuple]) -> list:
        if self.cupy is not None:
            stream = self.cupy.cuda.get_current_stream()
            for _, _, ready in items:
                stream.wait_event(ready)
        if len(items) == 1 and items[0][0].kind == "call":
            return [items[0][0].call()]
        sends = [(job.array, job.peer, tag) for job, tag, _ in items if job.kind == "send"]
        recvs = [(job.peer, tag) for job, tag, _ in items if job.kind == "recv"]
        got = iter(self.comm.exchange(sends, recvs))
        return [None if job.kind == "send" else next(got) for job, _, _ in items]


def _name(event: tuple) -> str:
    (kind, ident), piece = event
    return f"{kind} {ident} ({'once a step' if piece < 0 else f'micro-batch {piece}'})"


def _cupy_of(comm):
    """CuPy, when the communicator works on CUDA arrays (NCCL), else None."""
    xp = getattr(comm, "xp", None)
    return xp if xp is not None and xp is not np and xp.__name__ == "cupy" else None

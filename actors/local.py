"""The local backend: one thread per rank, each running its ``RankPlan`` as register-based
actors (:mod:`actors.runtime`) and talking to the others only through ``comm``'s in-process
transport, exactly as workers on separate machines do over gRPC. A rank that fails is reported
by rank; a rank waiting on a dead peer times out naming it instead of hanging."""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from actors.runtime import Firing, RankRuntime, Stalled
from comm import CommError, InProcessHub


class RankFailed(RuntimeError):
    """A rank of a step failed: ``rank`` is the root cause, ``op`` what it was running."""

    def __init__(self, rank: int, error: BaseException | str, op: str = ""):
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        super().__init__(f"rank {rank} failed" + (f" while running {op}" if op else "") + f": {text}")
        self.rank, self.error, self.op = rank, error, op


def run_plans(plan, feed: Callable[[int], dict[int, Any]], grads: dict[int, int], updates: Callable,
              seeds: Sequence[Sequence[int]], outputs: Sequence[int] = (), timeout: float = 60.0,
              timeline: list[Firing] | None = None) -> dict[int, list]:
    """Run every rank's plan; return each rank's local ``outputs`` (averaged over micro-batches).

    ``feed(rank)`` gives the rank's local inputs, variables and constants; ``grads`` maps each
    trained variable to its gradient value (accumulated over micro-batches); ``updates(rank,
    op, variable_array, grad_array)`` applies an update op; ``seeds[piece]`` are the dropout
    seeds of each micro-batch. Every actor firing is appended to ``timeline`` when given.
    """
    ranks = [rp.rank for rp in plan.ranks]
    index = {r: i for i, r in enumerate(ranks)}
    hub = InProcessHub(len(ranks), timeout=timeout)
    results: dict[int, dict[int, Any]] = {}
    errors: dict[int, BaseException] = {}

    runtimes: dict[int, RankRuntime] = {}

    def main(rp) -> None:
        try:
            rt = runtimes[rp.rank] = RankRuntime(rp, hub.communicator(index[rp.rank]), index, timeout=timeout)
            results[rp.rank] = rt.run(feed(rp.rank), plan.micro_batches, grads,
                                      lambda op, var, grad: updates(rp.rank, op, var, grad), seeds, outputs)
        except BaseException as err:  # reported by rank below; the other ranks stop at once
            errors[rp.rank] = err
            if not isinstance(err, CommError):
                for q in range(len(ranks)):
                    if q != index[rp.rank]:
                        hub.communicator(q).mailbox.fail(CommError(f"aborted: rank {rp.rank} failed"))

    threads = [threading.Thread(target=main, args=(rp,), name=f"flowsys-rank-{rp.rank}") for rp in plan.ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5.0)
    if timeline is not None:
        for rt in runtimes.values():
            timeline.extend(rt.timeline)
    stuck = [r for r, t in zip(ranks, threads) if t.is_alive()]
    if stuck:
        raise RankFailed(stuck[0], TimeoutError(f"ranks {stuck} did not finish"))
    if errors:
        raise diagnose(errors, {r: rt.current for r, rt in runtimes.items()})
    return results


def diagnose(errors: dict[int, BaseException], doing: dict[int, str]) -> RankFailed:
    """One error for the driver from every rank's: the root cause is a rank that failed by
    itself, not one that timed out waiting for it; a collective that some ranks never joined
    names them."""
    causes = [r for r, e in errors.items() if not isinstance(e, CommError)]
    if causes:
        rank = min(causes)
        failed = RankFailed(rank, errors[rank], doing.get(rank, ""))
        failed.__cause__ = errors[rank]
        return failed
    stalled = {r: e for r, e in errors.items() if isinstance(e, Stalled)}
    for r, e in sorted(stalled.items()):
        for w in e.waits:
            if not w["group"]:
                continue
            joined = {q for q, f in stalled.items() if any(x["channel"] == w["channel"] for x in f.waits)}
            missing = [q for q in w["group"] if q not in joined]
            if missing:
                return RankFailed(missing[0], f"ranks {missing} never joined the {w['name']} over ranks {w['group']} "
                                  f"(op {w['op']}, piece {w['piece']}) that ranks {sorted(joined)} were waiting in "
                                  f"for {e.timeout:g} s", doing.get(missing[0], ""))
    rank = min(errors)
    failed = RankFailed(rank, errors[rank], doing.get(rank, ""))
    failed.__cause__ = errors[rank]
    return failed



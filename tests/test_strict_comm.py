"""The strict communicator (comm/strict.py): NCCL's contract on CPU arrays, one thread per rank.

Its results agree with the in-process transport's, and each way a program can hang NCCL (a
collective the members disagree on, two orders on one communicator, a cycle across
communicators, two ranks that both send first, a call out of the device's fixed order) is a
ContractViolation naming the ranks and the calls, raised at once rather than after a timeout.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from comm.strict import Call, ContractViolation, StrictHub

pytestmark = pytest.mark.timeout(60)


def run_ranks(world: int, body, orders=None, timeout: float = 20.0):
    """``body(comm)`` on every rank as a thread; each rank's result or the exception it raised."""
    hub = StrictHub(world, timeout=timeout, orders=orders)
    out: list = [None] * world

    def rank(r):
        comm = hub.communicator(r)
        try:
            out[r] = body(comm)
        except Exception as e:  # noqa: BLE001 - the test reads it
            out[r] = e
        finally:
            comm.close()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_collectives_and_transfers_compute_what_the_other_transports_do():
    def body(c):
        x = np.arange(6.0).reshape(2, 3) + c.rank
        sub = [0, 2] if c.rank in (0, 2) else [1, 3]
        out = {
            "sum": c.all_reduce(x), "max": c.all_reduce(x, op="max"), "gather": c.all_gather(x, axis=1),
            "scatter": c.reduce_scatter(np.ones((4, 2)) * c.rank, axis=0), "bcast": c.broadcast(x, root=2),
            "sub": c.all_reduce(x, group=sub), "a2a": c.all_to_all(np.full((4, 1), c.rank), 0, 1),
        }
        c.barrier()
        peer = c.rank ^ 1
        out["pair"] = c.exchange([(x, peer, 7)], [(peer, 7)])[0]
        return out

    res = run_ranks(4, body)
    xs = [np.arange(6.0).reshape(2, 3) + r for r in range(4)]
    for r, out in enumerate(res):
        assert not isinstance(out, Exception), out
        np.testing.assert_array_equal(out["sum"], sum(xs))
        np.testing.assert_array_equal(out["max"], xs[3])
        np.testing.assert_array_equal(out["gather"], np.concatenate(xs, axis=1))
        np.testing.assert_array_equal(out["scatter"], np.full((1, 2), 6.0))
        np.testing.assert_array_equal(out["bcast"], xs[2])
        np.testing.assert_array_equal(out["sub"], xs[0] + xs[2] if r in (0, 2) else xs[1] + xs[3])
        np.testing.assert_array_equal(out["a2a"], np.array([[0, 1, 2, 3]]))
        np.testing.assert_array_equal(out["pair"], xs[r ^ 1])


def test_members_that_disagree_on_a_collective_are_named():
    res = run_ranks(2, lambda c: c.all_reduce(np.ones(3, np.float32 if c.rank == 0 else np.float64)))
    for e in res:
        assert isinstance(e, ContractViolation)
        assert "rank 0 issued all_reduce(float32[3], sum)" in str(e) and "rank 1 issued all_reduce(float64[3], sum)" in str(e)


def test_two_orders_on_one_communicator_are_caught():
    def body(c):
        a, b = np.ones(2), np.ones(3)
        return (c.all_reduce(a), c.all_reduce(b)) if c.rank == 0 else (c.all_reduce(b), c.all_reduce(a))

    res = run_ranks(2, body)
    assert all(isinstance(e, ContractViolation) and "disagree" in str(e) for e in res)


def test_a_cycle_across_communicators_is_a_deadlock_named_at_once():
    """Each pair of three ranks is its own communicator, each rank starts with a different one:
    a message transport would finish, NCCL hangs; the report says who waits in what."""
    first = {0: [0, 1], 1: [1, 2], 2: [0, 2]}
    second = {0: [0, 2], 1: [0, 1], 2: [1, 2]}

    def body(c):
        c.all_reduce(np.ones(2), group=first[c.rank])
        return c.all_reduce(np.ones(2), group=second[c.rank])

    res = run_ranks(3, body, timeout=600.0)  # reported as a deadlock, not after the timeout
    assert all(isinstance(e, ContractViolation) for e in res)
    msg = str(res[0])
    assert msg.startswith("deadlock")
    assert "rank 0 waits in all_reduce(float64[2], sum) over ranks [0, 1] for rank(s) [1]" in msg
    assert "rank 1 waits in all_reduce(float64[2], sum) over ranks [1, 2] for rank(s) [2]" in msg


def test_two_ranks_that_both_send_first_hang_but_a_grouped_exchange_does_not():
    def both_send(c):
        peer = 1 - c.rank
        c.send(np.ones(2), peer, tag=3)
        return c.recv(peer, tag=3)

    res = run_ranks(2, both_send, timeout=600.0)
    assert all(isinstance(e, ContractViolation) and "send(float64[2], tag 3) 0 -> 1" in str(e) for e in res)
    ok = run_ranks(2, lambda c: c.exchange([(np.full(2, c.rank), 1 - c.rank, 3)], [(1 - c.rank, 3)])[0])
    assert [o.tolist() for o in ok] == [[1, 1], [0, 0]]


def test_a_call_out_of_the_devices_fixed_order_is_named():
    order = [Call("all_reduce", (0, 1)), Call("all_gather", (0, 1))]

    def body(c):
        if c.rank == 1:
            c.all_gather(np.ones(2))  # rank 1 swaps the two
        c.all_reduce(np.ones(2))
        return c.all_gather(np.ones(2)) if c.rank == 0 else None

    res = run_ranks(2, body, orders={0: order, 1: order}, timeout=600.0)
    assert isinstance(res[1], ContractViolation)
    assert ("rank 1 issued all_gather(float64[2]) over ranks [0, 1] as its call 0, but the order fixed for its device "
            "has all_reduce over ranks [0, 1] there") in str(res[1])

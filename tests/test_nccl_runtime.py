"""The actor runtime's NCCL code path, on CPU arrays: every plan run through the strict
communicator (comm.strict: NCCL's contract checked call by call), its communication issued by
actors.ordered in the order the compiler fixed (scheduler.nccl_order), checked against the
in-process transport and the single device step by step, for dp, tp, pp and dp x tp x pp with
ZeRO 1; and a changed order that NCCL would hang on, caught before the step and while it runs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import flowsys.runtime as driver
from actors.backends import LocalBackend
from actors.ordered import Issuer, Job
from comm.strict import StrictHub
from flowsys import runtime
from flowsys.errors import RankFailed
from flowsys.train import job_from_dict, run
from scheduler.nccl_order import OrderError, attach, order_of

LAYOUTS = {
    "dp2": dict(dp=2),
    "tp2": dict(tp=2),
    "pp2": dict(pp=2, micro_batches=2),
    "dp2xtp2xpp2-zero1": dict(dp=2, tp=2, pp=2, micro_batches=2, zero_stage=1),
}
STEPS = 3


def _job(parallel: dict):
    return job_from_dict({"model": dict(vocab_size=256, block_size=16, n_layer=2, n_head=4, n_embd=32),
                          "data": {"batch_size": 8, "max_bytes": 50_000},
                          "train": {"steps": STEPS, "log_every": 1, "eval_batches": 1}, "parallel": parallel})


def _train(parallel: dict, backend=None) -> tuple[list[float], object]:
    runtime.shutdown()
    runtime._backend = backend or LocalBackend(timeout=20)
    try:
        return run(_job(parallel), log=lambda *a: None)["losses"], runtime._backend
    finally:
        if backend is None:
            runtime.shutdown()


@pytest.fixture(scope="module")
def single():
    return _train({})[0]


@pytest.fixture(autouse=True)
def _fresh_backend():
    yield
    runtime.shutdown()


def _calls_by_event(rp) -> list[tuple[str, tuple]]:
    """What the strict hub must log for each event of the rank's order: (kind, ranks)."""
    by_key = {}
    for op in rp.ops:
        if op.kind in ("collective", "send", "recv"):
            key = ("bucket", op.bucket) if op.bucket else ("channel", op.channel)
            pair = (rp.rank, op.peer) if op.kind == "send" else (op.peer, rp.rank)
            by_key.setdefault(key, (op.kind, tuple(op.group) if op.kind == "collective" else pair))
    return [by_key[key] for key, _ in order_of(rp)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_nccl_code_path_equals_the_in_process_transport_and_one_device(single, layout):
    messages, _ = _train(LAYOUTS[layout])
    strict, backend = _train(LAYOUTS[layout], LocalBackend(timeout=20, ordered="strict"))
    np.testing.assert_allclose(strict, messages, rtol=1e-6)
    np.testing.assert_allclose(strict, single, rtol=2e-5)
    # every rank ran its steps' communication through the hub, in the order its plan fixes
    hub = backend.workers[0].ordered.hub
    assert hub.failure is None and hub.log
    for r, w in backend.workers.items():
        plans = [rp for rp in w.plans.values() if rp.comm_order]
        assert plans, f"rank {r} ran no plan with an NCCL order"
        rp = max(plans, key=lambda p: len(p.comm_order))  # the training step's
        want = _calls_by_event(rp)
        got = [(c.op if c.op in ("send", "recv") else "collective", c.group) for c in hub.log[r]]
        # transfers handed over together go as one group (sends listed first): the same calls,
        # and the collectives in the order's sequence
        assert any(sorted(got[i:i + len(want)]) == sorted(want) and _collectives(got[i:i + len(want)]) ==
                   _collectives(want) for i in range(len(got) - len(want) + 1)), \
            f"rank {r}: the hub never saw its plan's order in one piece"


def _collectives(calls: list) -> list:
    return [c for c in calls if c[0] == "collective"]


def _swap_on_one_rank(plan) -> int:
    """Swap two adjacent events of one rank's order that another rank shares (NCCL hangs)."""
    for rp in plan.ranks:
        order = order_of(rp)
        for i in range(len(order) - 1):
            a, b = rp.comm_order[i], rp.comm_order[i + 1]
            shared = [q for q in plan.ranks if q.rank != rp.rank and {order[i], order[i + 1]} <= set(order_of(q))]
            if shared:
                ea, eb = type(a)(), type(b)()
                ea.CopyFrom(a)
                eb.CopyFrom(b)
                rp.comm_order[i].CopyFrom(eb)
                rp.comm_order[i + 1].CopyFrom(ea)
                return rp.rank
    raise AssertionError("no two adjacent events shared with another rank")


def _changed_order(monkeypatch) -> dict:
    swapped = {}

    def attach_then_swap(plan):
        attach(plan)
        if "rank" not in swapped and sum(len(rp.comm_order) for rp in plan.ranks) > 20:  # the training step
            swapped["rank"] = _swap_on_one_rank(plan)

    monkeypatch.setattr(driver, "attach", attach_then_swap)
    return swapped


def test_a_plan_whose_order_was_changed_on_one_rank_is_refused_naming_it(monkeypatch):
    swapped = _changed_order(monkeypatch)
    with pytest.raises(OrderError, match="NCCL would hang") as err:
        _train(LAYOUTS["dp2xtp2xpp2-zero1"], LocalBackend(timeout=20, ordered="strict"))
    assert f"rank {swapped['rank']} issues" in str(err.value)


def test_a_changed_order_that_runs_anyway_is_caught_by_the_strict_communicator(monkeypatch):
    """Past the plan's check, the ranks issue their calls in their (changed) orders: the strict
    communicator reports the deadlock, or the disagreeing collective, at once, naming the ranks."""
    swapped = _changed_order(monkeypatch)
    monkeypatch.setattr(driver, "check_plan", lambda plan: None)
    with pytest.raises(RankFailed, match=r"deadlock \(NCCL would hang\)|disagree|never became ready") as err:
        _train(LAYOUTS["dp2xtp2xpp2-zero1"], LocalBackend(timeout=20, ordered="strict"))
    assert f"rank {swapped['rank']}" in str(err.value)


def _issuers(hub: StrictHub, orders: dict[int, list]) -> dict[int, Issuer]:
    out = {}
    for r, order in orders.items():
        out[r] = Issuer(hub.communicator(r), r)
        out[r].begin(order)
    return out


def _wait_result(issuer: Issuer, event, tag: int, timeout: float = 10.0):
    issuer.comm.mailbox.take(issuer.me, tag, timeout)
    return issuer.result(event)


def test_the_issuer_keeps_the_order_whatever_order_the_ops_come_in():
    hub = StrictHub(2, timeout=10)
    first, second = (("channel", 1), 0), (("channel", 2), 0)
    issuers = _issuers(hub, {0: [first, second], 1: [first, second]})
    out = {}

    def rank(r: int, flipped: bool) -> None:
        iss = issuers[r]
        jobs = {first: Job("call", call=lambda: iss.comm.all_reduce(np.full(2, r + 1.0), [0, 1])),
                second: Job("call", call=lambda: iss.comm.all_gather(np.full(1, float(r)), 0, [0, 1]))}
        for i, event in enumerate(reversed(list(jobs)) if flipped else jobs):
            iss.submit(event, jobs[event], tag=10 + (event == second))
        out[r] = [_wait_result(iss, first, 10), _wait_result(iss, second, 11)]
        iss.finish()
        iss.close()

    threads = [threading.Thread(target=rank, args=(r, r == 1)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert hub.failure is None
    for r in range(2):
        np.testing.assert_array_equal(out[r][0], [3.0, 3.0])
        np.testing.assert_array_equal(out[r][1], [0.0, 1.0])
        assert [c.op for c in hub.log[r]] == ["all_reduce", "all_gather"]


def test_a_two_way_exchange_handed_over_together_is_one_group():
    """1F1B: each stage sends to the other and receives from it in the same turn. Issued one by
    one, both sends would block (NCCL's deadlock); handed over together they go as one group."""
    hub = StrictHub(2, timeout=10)
    send, recv = (("channel", 1), 0), (("channel", 2), 0)
    issuers = _issuers(hub, {0: [send, recv], 1: [recv, send]})
    got = {}

    def rank(r: int) -> None:
        iss = issuers[r]
        if r == 0:  # the later call first: both are there when the thread takes the first
            iss.submit(recv, Job("recv", peer=1), tag=2)
            iss.submit(send, Job("send", array=np.arange(3.0), peer=1), tag=1)
            got[r] = _wait_result(iss, recv, 2)
        else:
            iss.submit(send, Job("send", array=np.ones(2), peer=0), tag=2)
            iss.submit(recv, Job("recv", peer=0), tag=1)
            got[r] = _wait_result(iss, recv, 1)
        iss.close()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert hub.failure is None
    np.testing.assert_array_equal(got[0], np.ones(2))
    np.testing.assert_array_equal(got[1], np.arange(3.0))


def test_an_op_outside_the_order_is_named():
    iss = Issuer(StrictHub(1).communicator(0), 0)
    iss.begin([(("channel", 1), 0)])
    with pytest.raises(Exception, match=r"channel 7 \(micro-batch 0\) \(call\) is not in the order fixed"):
        iss.submit((("channel", 7), 0), Job("call", call=lambda: None), tag=1)
    with pytest.raises(Exception, match=r"ended with calls of its order not issued: call 0 of 1 \(channel 1"):
        iss.finish()
    iss.close()

"""One order for every device's NCCL operations (scheduler/nccl_order.py): fixed for the plans
of dp, tp, pp and dp x tp x pp with ZeRO 1, consistent on every communicator and free of
cycles; and the check that names the ranks and events of an order NCCL would hang on."""

from __future__ import annotations

import pytest

import scheduler
from flowsys.plan import _compile
from flowsys.train import job_from_dict
from scheduler.nccl_order import Event, OrderError, check_orders, events, fix_order

LAYOUTS = {
    "dp2": dict(dp=2),
    "tp2": dict(tp=2),
    "pp2": dict(pp=2, micro_batches=2),
    "dp2xtp2xpp2-zero1": dict(dp=2, tp=2, pp=2, micro_batches=2, zero_stage=1),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def plan(request):
    job = job_from_dict({"model": dict(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=32),
                         "data": {"batch_size": 8}, "parallel": LAYOUTS[request.param]})
    return scheduler.lower(_compile(job, job.parallel.devices)[2])


def test_every_communicator_sees_one_order_and_no_cycle_forms(plan):
    orders = fix_order(plan)
    check_orders(orders, plan)
    assert sum(len(o) for o in orders.values()) > 0
    # each event's members issue the events they share in the same relative order
    position = {r: {(e.key, e.piece): i for i, e in enumerate(seq)} for r, seq in orders.items()}
    for r, seq in orders.items():
        for q in seq[0].ranks if seq else ():
            shared = [(e.key, e.piece) for e in seq if (e.key, e.piece) in position[q]]
            assert [position[q][x] for x in shared] == sorted(position[q][x] for x in shared), (r, q)
    # per-step events first, then micro-batch by micro-batch
    for seq in orders.values():
        pieces = [e.piece for e in seq if e.phase != "optimizer"]
        assert pieces == sorted(pieces)


def test_an_order_changed_on_one_rank_is_named(plan):
    orders = fix_order(plan)
    rank, i = next((r, i) for r, seq in orders.items() for i in range(len(seq) - 1)
                   if set(seq[i].ranks) & set(seq[i + 1].ranks) - {r})
    seq = list(orders[rank])
    seq[i], seq[i + 1] = seq[i + 1], seq[i]
    with pytest.raises(OrderError, match=rf"rank {rank} issues .* before ") as err:
        check_orders({**orders, rank: seq}, plan)
    assert str(seq[i]) in str(err.value) and str(seq[i + 1]) in str(err.value)


def test_an_order_that_drops_an_event_is_named(plan):
    orders = fix_order(plan)
    rank = next(r for r, seq in orders.items() if seq)
    with pytest.raises(OrderError, match=rf"rank {rank}'s order does not issue its plan's events once each"):
        check_orders({**orders, rank: orders[rank][1:]}, plan)


def test_a_cycle_across_communicators_is_caught():
    """Three ranks, each pair its own communicator, each rank starting with a different one: no
    communicator sees two orders, yet NCCL would hang."""
    a = Event(("channel", 1), 0, "all_reduce", (0, 1), "backward")
    b = Event(("channel", 2), 0, "all_reduce", (1, 2), "backward")
    c = Event(("channel", 3), 0, "all_reduce", (0, 2), "backward")
    with pytest.raises(OrderError, match="a cycle of waits") as err:
        check_orders({0: [a, c], 1: [b, a], 2: [c, b]})
    for r in range(3):
        assert f"rank {r} issues" in str(err.value)
    check_orders({0: [a, c], 1: [a, b], 2: [c, b]})  # one global order: fine


def test_events_pair_both_ends_of_a_transfer_and_every_member_of_a_collective(plan):
    per_rank = events(plan)
    owners: dict = {}
    for r, mine in per_rank.items():
        for key, e in mine.items():
            owners.setdefault(key, set()).add(r)
    for key, ranks in owners.items():
        e = next(per_rank[r][key] for r in ranks)
        assert ranks == set(e.ranks), (str(e), ranks)

"""ZeRO's per-piece collectives in buckets (FSDP's units): the lowering fuses consecutive
parameter all-gathers (forward, and backward's re-gathers) and backward's gradient
reduce-scatters into buckets up to the cap, identical on every rank of a group; the runtime
fires a bucket as one collective per piece; results stay bit for bit those of one collective
per parameter."""

from __future__ import annotations

import numpy as np
import pytest

import scheduler
from test_overlap import _bucketed, _train, buckets  # noqa: F401  (buckets: a fixture)

SMALL = 6 * 1024  # splits the test GPT's gathers and reduce-scatters into several buckets


def _group_bytes(rp, op) -> int:
    """What a member adds to its bucket: its group-wide value (the same on every rank)."""
    v = {v.id: v for v in rp.values}[op.outputs[0] if op.op == "all_gather" else op.inputs[0]]
    return int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize


def test_buckets_form_identically_on_a_group_and_respect_the_cap():
    _, step = _train("dp2xtp2", zero=3, steps=1)
    ir = step.ir
    plan = scheduler.lower(ir, bucket_bytes=SMALL)
    grads = set(ir.grads.values())
    by_rank = _bucketed(plan)
    for rp in plan.ranks:
        held = set(rp.variables.values())
        kinds = set()
        for bucket in by_rank[rp.rank]:
            first = bucket[0]
            assert len(bucket) >= 2 and first.bucket == first.channel + 1
            assert len({(op.op, op.phase, tuple(op.group)) for op in bucket}) == 1
            assert sum(_group_bytes(rp, op) for op in bucket) <= SMALL
            if first.op == "all_gather":  # shards held before the piece starts
                assert all(op.inputs[0] in held and op.phase in ("forward", "backward") for op in bucket)
            else:
                assert first.op == "reduce_scatter" and first.phase == "backward"
                assert all(op.outputs[0] in grads for op in bucket)
            kinds.add((first.op, first.phase))
        assert kinds == {("all_gather", "forward"), ("all_gather", "backward"), ("reduce_scatter", "backward")}
        # consecutive: a stream's members in plan order, the buckets cutting it into runs
        for phase, name in kinds:
            stream = [op.id for op in rp.ops if op.op == name and op.phase == phase and (op.bucket or (
                op.inputs[0] in held if name == "all_gather" else op.outputs[0] in grads))]
            runs = [op.bucket or -op.id for op in rp.ops if op.id in stream]
            for b in set(runs):
                at = [i for i, x in enumerate(runs) if x == b]
                assert at == list(range(at[0], at[0] + len(at))), (phase, name)
    for rp in plan.ranks:  # every rank of a group forms the same buckets
        for bucket in by_rank[rp.rank]:
            for peer in bucket[0].group:
                assert tuple(op.channel for op in bucket) in {tuple(op.channel for op in b) for b in by_rank[peer]}
    # the default cap puts each phase's stream into one bucket; 0 turns them off
    default = _bucketed(scheduler.lower(ir))
    assert all(len(bs) < len(by_rank[r]) for r, bs in default.items())
    assert all(not op.bucket for rp in scheduler.lower(ir, bucket_bytes=0).ranks for op in rp.ops)


def test_cost_model_times_a_bucket_as_one_collective():
    from actors.sim import predict
    from scheduler.cost import load_hardware

    _, step = _train("dp2", zero=3, steps=1)
    plan = scheduler.lower(step.ir, bucket_bytes=SMALL)
    bucket = {op.id: op.bucket for op in plan.ranks[0].ops if op.bucket}
    assert len(set(bucket.values())) < len(bucket)  # some bucket has several members
    pred = predict(plan, load_hardware("a100-80g"), record=True)
    mine = [f for f in pred.timeline if f.rank == 0 and f.op in bucket]
    # the simulated runtime fires a bucket's collective once per piece, recorded for every member
    assert len({(bucket[f.op], f.piece) for f in mine}) == len({(bucket[f.op], f.piece, f.start, f.end) for f in mine})


@pytest.mark.parametrize("layout,micro", [("dp2", 1), ("dp2", 2), ("dp2xtp2", 1)])
def test_bucketed_zero_3_gives_bitwise_the_unbucketed_step(buckets, layout, micro):  # noqa: F811
    runs = {}
    for cap in (None, 0, SMALL):  # None: the default cap (the graph's config)
        if cap is not None:
            buckets(cap)
        losses, step = _train(layout, micro=micro, zero=3, steps=2, record=True)
        gathers = {(f.rank, f.piece, f.start) for f in step.timeline if f.name == "all_gather"}
        scatters = {(f.rank, f.piece, f.start) for f in step.timeline if f.name == "reduce_scatter"}
        runs[cap] = losses, {k: v.numpy() for k, v in step.model.state_dict().items()}, len(gathers), len(scatters)
    want, want_params, gathers, scatters = runs[0]
    for cap in (SMALL, None):
        losses, params, n_gathers, n_scatters = runs[cap]
        assert losses == want, cap
        for name, value in params.items():
            np.testing.assert_array_equal(value, want_params[name], err_msg=f"{name}, cap {cap}")
        assert n_gathers < gathers and n_scatters < scatters, (cap, n_gathers, gathers, n_scatters, scatters)
    assert runs[None][2] < runs[SMALL][2]  # the default cap: fewer, larger buckets

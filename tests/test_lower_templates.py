"""Lowering every rank from templates: ranks alike up to their coordinates share one lowered
plan, and the plans instantiated from it equal, byte for byte, those lowered rank by rank."""

from __future__ import annotations

import pytest

import scheduler
from flowsys.plan import _compile
from flowsys.train import job_from_dict
from scheduler.lower import _Lowering

TINY = {"model": {"vocab_size": 256, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64, "dropout": 0.0},
        "data": {"batch_size": 16}}


def _ir(**parallel):
    job = job_from_dict({**TINY, "parallel": parallel})
    return _compile(job, job.parallel.devices)[2]


@pytest.mark.parametrize("parallel", [
    dict(dp=2, tp=2, pp=2, zero_stage=1, micro_batches=4, activation_checkpointing=True),
    dict(dp=2, tp=2, pp=2, zero_stage=3, micro_batches=2),
    dict(dp=2, tp=2, zero_stage=2),
    dict(pp=2, micro_batches=2),
    dict(dp=4, zero_stage=3),
], ids=["dp2xtp2xpp2-zero1", "dp2xtp2xpp2-zero3", "dp2xtp2-zero2", "pp2", "dp4-zero3-uneven"])
def test_plans_from_templates_equal_plans_lowered_rank_by_rank(parallel):
    ir = _ir(**parallel)
    fast, reference = scheduler.lower(ir), _Lowering(ir).lower_rank_by_rank()
    assert [rp.rank for rp in fast.ranks] == list(range(ir_devices(parallel)))
    assert fast.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True)
    assert fast == reference
    templates = _Lowering(ir).templates()
    assert sorted(r for t in templates for r in t.ranks) == list(range(ir_devices(parallel)))


def ir_devices(parallel) -> int:
    return parallel.get("dp", 1) * parallel.get("tp", 1) * parallel.get("pp", 1)


def test_templates_follow_the_geometry():
    # dp2 x tp2, even splits, no stages: one plan up to coordinates
    assert [t.ranks for t in _Lowering(_ir(dp=2, tp=2)).templates()] == [[0, 1, 2, 3]]
    # ZeRO shards the attention's (3, n_embd) bias rows over dp2 unevenly (2 + 1): one plan per dp row
    assert [t.ranks for t in _Lowering(_ir(dp=2, tp=2, zero_stage=1)).templates()] == [[0, 1], [2, 3]]
    # dp4: rows 1 + 1 + 1 + 0 over the data-parallel ranks: the first three alike
    assert [t.ranks for t in _Lowering(_ir(dp=4, zero_stage=1)).templates()] == [[0, 1, 2], [3]]
    # pipeline stages never share a template
    for t in _Lowering(_ir(dp=2, tp=2, pp=2, micro_batches=2)).templates():
        assert len({r // 4 for r in t.ranks}) == 1

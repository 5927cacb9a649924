"""Gradients reduce while backward runs, in buckets (DDP's overlap): the lowering fuses gradient
all-reduces into buckets in backward order, identical on every rank of a group; the runtime
starts a bucket's one collective as soon as its gradients are final, before backward ends (seen
on the recorded timeline); and results stay those of one device."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

import flowsys as fs
import scheduler
from flowsys import nn, optim
from flowsys.models.gpt import GPT, GPTConfig
from scheduler.lower import BUCKET_BYTES
from helpers import SumStep
from test_graph import TrainStep

B, S = fs.sbp.broadcast, fs.sbp.split
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
SMALL = 6 * 1024  # a bucket cap that splits the test GPT's gradients into several buckets
STEPS = 3


_real_lower = scheduler.lower


@pytest.fixture
def buckets(monkeypatch):
    """Lower every plan with bucket cap ``n``, whatever the graph's ``config.bucket_bytes`` says
    (the helpers here build graphs with the default)."""
    def use(n: int) -> None:
        monkeypatch.setattr(scheduler, "lower", lambda g, registers=1, bucket_bytes=None, **options: _real_lower(
            g, registers=registers, bucket_bytes=n, **options))
    return use


def _batches(n, batch=8):
    rng = np.random.default_rng(0)
    for _ in range(n):
        yield (fs.tensor(rng.integers(0, CFG.vocab_size, (batch, CFG.block_size))),
               fs.tensor(rng.integers(0, CFG.vocab_size, (batch, CFG.block_size))))


def _train(layout=None, micro=1, zero=0, steps=STEPS, record=False):
    """``layout``: None (one device), "dp2", "dp2xtp2" or "pp2xdp2" (two pipeline stages of two
    data-parallel ranks)."""
    fs.manual_seed(0)
    model = GPT(CFG)
    first, batch = None, S(0)
    if layout == "dp2":
        first = fs.placement("cpu", [0, 1])
        model.to_global(first, B)
    elif layout == "dp2xtp2":
        first, batch = fs.placement("cpu", [[0, 1], [2, 3]]), (S(0), B)
        model.to_global(first, GPT.parallel_plan(first, dp_axis=0, tp_axis=1))
    elif layout == "pp2xdp2":
        first, second = fs.placement("cpu", [0, 1]), fs.placement("cpu", [2, 3])
        model.to_global(first, GPT.parallel_plan(first, dp_axis=0))
        model.pipeline([first, second])
    step = TrainStep(model, optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1), micro,
                     "global" if layout is None else "plans")
    step.config.zero_stage = zero
    step.config.record_timeline = record
    losses = []
    for x, y in _batches(steps):
        if first is not None:
            x, y = x.to_global(first, batch), y.to_global(first, batch)
        losses.append(float(step(x, y)))
    return losses, step


def _bucketed(plan) -> dict[int, list]:
    """Per rank, its buckets: lists of plan ops, in plan order."""
    out = {}
    for rp in plan.ranks:
        members = defaultdict(list)
        for op in rp.ops:
            if op.bucket:
                members[op.bucket].append(op)
        out[rp.rank] = list(members.values())
    return out


# ----------------------------------------------------------------------------- lowering
def test_buckets_fill_in_backward_order_up_to_the_cap_and_match_across_a_group():
    _, step = _train("dp2xtp2", steps=1)
    ir = step.ir
    grads = set(ir.grads.values())
    plan = scheduler.lower(ir, bucket_bytes=SMALL)
    by_rank = _bucketed(plan)
    for rp in plan.ranks:
        size = {v.id: int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in rp.values}
        dtype = {v.id: v.dtype for v in rp.values}
        final_at = {v: i for i, op in enumerate(rp.ops) if op.phase != "optimizer" for v in op.outputs}
        reduces = [op for op in rp.ops if op.phase == "optimizer" and op.op == "all_reduce" and op.inputs[0] in grads]
        assert len(by_rank[rp.rank]) >= 2, "the cap splits the gradients into several buckets"
        for bucket in by_rank[rp.rank]:
            assert len(bucket) >= 2 and all(op.op == "all_reduce" and op.kind == "collective" for op in bucket)
            assert len({tuple(op.group) for op in bucket}) == 1 and len({dtype[op.inputs[0]] for op in bucket}) == 1
            assert sum(size[op.inputs[0]] for op in bucket) <= SMALL
            # consecutive in backward order among the group's gradient all-reduces, the id its first's channel
            stream = sorted((op for op in reduces if tuple(op.group) == tuple(bucket[0].group)),
                            key=lambda op: (final_at[op.inputs[0]], list(rp.ops).index(op)))
            ids = [op.id for op in stream]
            at = sorted(ids.index(op.id) for op in bucket)
            assert at == list(range(at[0], at[0] + len(at)))
            assert bucket[0].bucket == stream[at[0]].channel + 1
        # a gradient too large for the cap, or with no neighbour left, runs alone
        assert sum(not op.bucket for op in reduces) >= 1
    # every rank of a group forms the same buckets (channels name them on every rank)
    for rp in plan.ranks:
        for bucket in by_rank[rp.rank]:
            for peer in bucket[0].group:
                theirs = {tuple(op.channel for op in b) for b in by_rank[peer]}
                assert tuple(op.channel for op in bucket) in theirs, (rp.rank, peer)


def test_default_cap_is_ddps_and_zero_turns_buckets_off():
    _, step = _train("dp2", steps=1)
    assert BUCKET_BYTES == 25 * 2**20
    default = _bucketed(scheduler.lower(step.ir))
    # the test GPT's ~100 KiB of gradients: one bucket, which starts when the last is final
    assert [len(b) for b in default[0]] == [len(step.ir.grads)]
    assert _bucketed(scheduler.lower(step.ir, bucket_bytes=0)) == {0: [], 1: []}
    with pytest.raises(ValueError, match="bucket_bytes must be 0"):
        scheduler.lower(step.ir, bucket_bytes=-1)


# ------------------------------------------------------------------------------ results
@pytest.fixture(scope="module")
def single():
    out = {}
    for micro in (1, 2):
        losses, step = _train(None, micro)
        out[micro] = losses, {k: v.numpy() for k, v in step.model.state_dict().items()}
    return out


@pytest.mark.parametrize("layout, micro, zero", [
    ("dp2", 1, 0), ("dp2", 2, 0), ("dp2", 1, 2), ("dp2", 2, 3), ("dp2xtp2", 1, 0), ("pp2xdp2", 2, 0),
], ids=["dp2", "dp2-micro2", "zero2", "zero3-micro2", "dp2xtp2", "pipeline2xdp2"])
def test_overlapped_buckets_give_the_single_device_step(single, buckets, layout, micro, zero):
    buckets(SMALL)
    losses, step = _train(layout, micro, zero)
    ref_losses, ref_params = single[micro]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    # AdamW divides by sqrt(v): rounding-sized gradient entries move a parameter by a visible part
    # of the learning rate (1e-3); atol is 5 % of it (as in test_parallel)
    for name, value in step.model.state_dict().items():
        np.testing.assert_allclose(value.numpy(), ref_params[name], rtol=1e-3, atol=5e-5, err_msg=name)
    if zero == 0:
        assert all(len(b) >= 2 for b in _bucketed(step.plan()).values()), "buckets ran"


def test_buckets_give_bitwise_the_results_of_one_all_reduce_per_gradient(buckets):
    # over two ranks every element is summed once either way: the same bits
    buckets(0)
    alone, one_step = _train("dp2", micro=2)
    buckets(SMALL)
    fused, fused_step = _train("dp2", micro=2)
    assert alone == fused
    want = one_step.model.state_dict()
    for name, value in fused_step.model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), want[name].numpy(), err_msg=name)


# ------------------------------------------------------------------------------- trace
@pytest.mark.parametrize("micro", [1, 2])
def test_bucket_all_reduces_start_before_backward_ends(buckets, micro):
    buckets(SMALL)
    _, step = _train("dp2", micro, steps=2, record=True)
    ops = {(rp.rank, op.id): op for rp in step.plan().ranks for op in rp.ops}
    for rank in (0, 1):
        mine = [f for f in step.timeline if f.rank == rank]
        backward_ends = max(f.end for f in mine if f.phase == "backward")
        fused = [f for f in mine if f.kind == "collective" and ops[(rank, f.op)].bucket]
        spans = defaultdict(set)
        for f in fused:
            spans[ops[(rank, f.op)].bucket].add((f.start, f.end))
        # each bucket is one collective: its members share one firing's span
        assert len(spans) >= 2 and all(len(s) == 1 for s in spans.values())
        assert min(f.start for f in fused) < backward_ends, "the first bucket reduces while backward runs"
        # the gradients' updates run after the last piece's backward (they read the parameters)
        assert min(f.start for f in mine if f.kind == "update") >= backward_ends


def test_zero_2_updates_shards_and_gathers_while_backward_runs(buckets):
    # ZeRO 2 updates a copy of the parameter's shard: it need not wait for backward to end, nor
    # does the all-gather of the updated shard; only the assign into the parameter does. The
    # gradients' reduce-scatters are bucketed: a cap that makes several buckets of the test GPT's
    # (the default makes one, final only when backward ends)
    buckets(SMALL)
    _, step = _train("dp2", 1, zero=2, steps=1, record=True)
    overlapped = []
    for x, y in _batches(3):  # the overlap depends on how the two ranks' threads interleave: one step of three
        step(x.to_global(fs.placement("cpu", [0, 1]), S(0)), y.to_global(fs.placement("cpu", [0, 1]), S(0)))
        ends = {rank: max(f.end for f in step.timeline if f.rank == rank and f.phase == "backward") for rank in (0, 1)}
        for rank in (0, 1):
            mine = [f for f in step.timeline if f.rank == rank]
            assert min(f.start for f in mine if f.name == "assign") >= ends[rank]
        # on the rank that ends backward last, its peer's reduce-scatter messages for the first
        # gradients came long before: their shards were updated and gathered while backward ran
        last = max(ends, key=ends.get)
        mine = [f for f in step.timeline if f.rank == last]
        overlapped.append(min(f.start for f in mine if f.kind == "update") < ends[last]
                          and min(f.start for f in mine if f.name == "all_gather" and f.phase == "optimizer") < ends[last])
    assert any(overlapped)


class _Wide(fs.Graph):
    """Two 16 MiB layers: DDP's default 25 MiB cap gives them a bucket each."""

    def __init__(self, placement):
        super().__init__()
        fs.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024))
        self.net.to_global(placement, B)
        self.add_optimizer(optim.SGD(self.net.parameters(), lr=0.1))
        self.config.executor = "plans"
        self.config.record_timeline = True

    def build(self, x):
        loss = (self.net(x) ** 2).mean()
        loss.backward()
        return loss


def test_default_buckets_of_a_wider_model_overlap_backward():
    placement = fs.placement("cpu", [0, 1])
    step = _Wide(placement)
    x = fs.tensor(np.random.default_rng(0).standard_normal((8, 1024)).astype(np.float32)).to_global(placement, S(0))
    step(x)
    plan = step.plan()
    assert [len(b) for b in _bucketed(plan)[0]] == [2, 2]  # (weight, bias) of each layer
    ops = {op.id: op for op in plan.ranks[0].ops}
    mine = [f for f in step.timeline if f.rank == 0]
    backward_ends = max(f.end for f in mine if f.phase == "backward")
    first = min((f for f in mine if f.kind == "collective" and ops[f.op].bucket), key=lambda f: f.start)
    assert first.start < backward_ends
    assert ops[first.op].inputs[0] in {step.ir.grads[step.ir.variables[f"net.2.{p}"]] for p in ("weight", "bias")}


# --------------------------------------------------------------------------- cost model
def test_the_cost_model_overlaps_bucket_all_reduces_with_backward():
    from actors.sim import Simulator, predict
    from scheduler.cost import Hardware, Link

    placement = fs.placement("cpu", [0, 1])
    layers = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(6)])
    layers.to_global(placement, B)

    g = SumStep(layers)
    g.compile(fs.randn(4, 8).to_global(placement, S(0)))
    # every firing costs 1 ms, a message 0.1 ms: the first bucket is reduced long before backward ends
    hw = Hardware(name="ideal", device="cuda", peak_flops={"float32": 1e30}, memory_bandwidth=float("inf"),
                  memory=2**30, devices_per_node=8, intra_node=Link(float("inf"), 1e-4),
                  inter_node=Link(float("inf"), 1e-4), op_overhead=1e-3, step_overhead=0.0,
                  wire_bandwidth=float("inf"))
    plan = scheduler.lower(g.ir, bucket_bytes=2 * 8 * 8 * 4)  # two gradients a bucket
    assert [len(b) for b in _bucketed(plan)[0]] == [2, 2, 2]
    sim = Simulator(plan, hw, 2, record=True)
    sim.run()
    fired = [f for f in sim.timeline() if f.rank == 0]
    backward_ends = max(f.end for f in fired if f.phase == "backward")
    reduces = sorted({f.end for f in fired if f.kind == "collective" and f.phase == "optimizer"})
    assert len(reduces) == 3  # one collective a bucket
    assert reduces[0] < backward_ends
    assert max(f.end for f in fired if f.kind == "update") >= backward_ends
    # three collectives' firings instead of six: the step is shorter by their overhead
    alone = predict(scheduler.lower(g.ir, bucket_bytes=0), hw).step_s
    assert predict(plan, hw).step_s == pytest.approx(alone - 3e-3, rel=1e-6)



def test_graph_config_sets_the_bucket_cap():
    _, step = _train("dp2", steps=1)
    assert [len(b) for b in _bucketed(step.plan())[0]] == [len(step.ir.grads)]  # the default: one bucket
    step.config.bucket_bytes = SMALL
    assert len(_bucketed(step.plan())[0]) >= 2
    step.config.bucket_bytes = 0
    assert _bucketed(step.plan()) == {0: [], 1: []}

"""Pipeline parallelism from set_stage and register counts, and the 3-D parallel GPT: the same
losses as one device, in-flight micro-batches bounded per stage, clear errors for bad layouts."""

import numpy as np
import pytest

import flowsys as fs
from flowsys import nn, optim
from flowsys.models.gpt import GPT, GPTConfig
from test_graph import TrainStep

B, S = fs.sbp.broadcast, fs.sbp.split
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_embd=32)


def _batches(n, batch=8):
    rng = np.random.default_rng(0)
    for _ in range(n):
        yield (fs.tensor(rng.integers(0, CFG.vocab_size, (batch, CFG.block_size))),
               fs.tensor(rng.integers(0, CFG.vocab_size, (batch, CFG.block_size))))


def _train(micro, steps=10, stages=None, executor="plans", mesh3d=False, zero=0, checkpoint=False, vocab=False,
           sequence=False):
    fs.manual_seed(0)
    model = GPT(CFG)
    first = None
    if mesh3d:  # data x tensor parallel inside each of two pipeline stages, 8 ranks
        p0, p1 = fs.placement("cpu", [[0, 1], [2, 3]]), fs.placement("cpu", [[4, 5], [6, 7]])
        model.to_global(p0, GPT.parallel_plan(p0, dp_axis=0, tp_axis=1, vocab_parallel=vocab,
                                              sequence_parallel=sequence))
        model.pipeline([p0, p1])
        first = p0
    elif stages:
        placements = [fs.placement("cpu", [s]) for s in range(stages)]
        model.pipeline(placements)
        first = placements[0]
    if checkpoint:
        for block in model.transformer.h:
            block.activation_checkpointing = True
    step = TrainStep(model, optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1), micro, executor)
    step.config.zero_stage = zero
    losses = []
    for x, y in _batches(steps):
        if first is not None:
            sbp = (S(0), B) if mesh3d else B
            x, y = x.to_global(first, sbp), y.to_global(first, sbp)
        losses.append(float(step(x, y)))
    return losses, step


@pytest.fixture(scope="module")
def single():
    return {m: _train(m, executor="global")[0] for m in (4, 8)}


@pytest.mark.parametrize("stages, micro", [(2, 4), (2, 8), (4, 4), (4, 8)])
def test_pipeline_losses_equal_one_device(single, stages, micro):
    losses, step = _train(micro, stages=stages)
    np.testing.assert_allclose(losses, single[micro], rtol=1e-4)
    # a stage holds at most as many micro-batches as are ahead of it, like 1F1B
    for s in range(stages):
        assert 1 <= step.in_flight[s] <= stages - s
    assert step.in_flight[0] == min(stages, micro)
    assert [sorted({v.registers for v in rp.values}) for rp in step.plan().ranks] == [[stages - s] for s in range(stages)]


def test_peak_activations_count_the_micro_batches_a_stage_holds():
    """Stage s of p holds the activations it keeps for the backward pass for p - s micro-batches:
    its peak with 8 micro-batches exceeds its peak with one by p - s - 1 times what it keeps."""
    class Stages(fs.Graph):
        def __init__(self, p, micro):
            super().__init__()
            self.placements = [fs.placement("cpu", [s]) for s in range(p)]
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
                                         for _ in range(p)])
            for s, block in enumerate(self.blocks):
                block.set_stage(s, self.placements[s])
            self.add_optimizer(optim.SGD(self.blocks.parameters(), lr=0.1))
            self.config.gradient_accumulation_steps = micro
            self.config.executor = "plans"

        def build(self, x):
            for block in self.blocks:
                x = block(x)
            loss = (x * x).mean()
            loss.backward()
            return loss

    peaks = {}
    for micro in (1, 8):
        step = Stages(4, micro)
        step(fs.ones(4 * micro, 16).to_global(step.placements[0], B))  # 4 rows per micro-batch
        peaks[micro] = [rp.memory.peak_activations for rp in step.plan().ranks]
    extra = [many - one for many, one in zip(peaks[8], peaks[1])]
    assert extra[3] == 0  # the last stage holds one micro-batch at a time
    assert extra[2] > 0 and extra[1] == 2 * extra[2]  # stages 1 and 2 keep the same per micro-batch
    assert extra[0] > 0 and extra[0] % 3 == 0  # stage 0 keeps less (its input is the feed), three times over


def test_pipeline_on_the_driver_executor_too(single):
    losses, _ = _train(4, steps=3, stages=2, executor="global")
    np.testing.assert_allclose(losses, single[4][:3], rtol=1e-4)


def test_stage_edges_are_sends_and_receives():
    _, step = _train(4, steps=1, stages=2)
    text = step.explain()
    assert "send_recv" in text
    kinds = {op.kind for rp in step.plan().ranks for op in rp.ops}
    assert {"send", "recv"} <= kinds


@pytest.mark.timeout(120)
def test_3d_parallel_gpt_with_zero_1_and_checkpointing(single):
    losses, step = _train(4, mesh3d=True, zero=1, checkpoint=True)
    np.testing.assert_allclose(losses, single[4], rtol=1e-4)
    assert len(step.plan().ranks) == 8
    assert all(step.in_flight[r] <= 2 for r in range(4)) and all(step.in_flight[r] == 1 for r in range(4, 8))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("zero", [2, 3])
def test_3d_parallel_gpt_with_every_zero_stage_and_a_split_vocabulary(single, zero):
    """dp2 x tp2 x pp2 with ZeRO 2 or 3, the vocabulary split over tp and the tied embedding
    copied onto the last stage: every layout combination runs, equal to one device."""
    losses, _ = _train(4, steps=3, mesh3d=True, zero=zero, vocab=True)
    np.testing.assert_allclose(losses, single[4][:3], rtol=1e-4)


@pytest.mark.timeout(120)
def test_3d_parallel_gpt_with_sequence_parallelism_zero_1_and_checkpointing(single):
    """dp2 x tp2 x pp2 with the layer norms split along the sequence on each stage (the
    residual stream crosses the stage boundary in its sequence slices): equal to one device."""
    losses, step = _train(4, steps=3, mesh3d=True, zero=1, checkpoint=True, vocab=True, sequence=True)
    np.testing.assert_allclose(losses, single[4][:3], rtol=1e-4)
    assert "reduce_scatter" in step.explain()


def test_overlapping_stage_placements_are_refused():
    fs.manual_seed(0)
    model = GPT(CFG)
    model.pipeline([fs.placement("cpu", [0, 1]), fs.placement("cpu", [1, 2])])
    step = TrainStep(model, optim.AdamW(model.parameters()), 2, "plans")
    x, y = next(_batches(1))
    p0 = fs.placement("cpu", [0, 1])
    with pytest.raises(fs.GraphError, match=r"stages 0 \(ranks \[0, 1\]\) and 1 \(ranks \[1, 2\]\) overlap on ranks \[1\]"):
        step(x.to_global(p0, B), y.to_global(p0, B))


def test_micro_batches_must_divide_the_batch():
    fs.manual_seed(0)
    model = GPT(CFG).pipeline([fs.placement("cpu", [0]), fs.placement("cpu", [1])])
    step = TrainStep(model, optim.AdamW(model.parameters()), 3, "plans")
    x, y = next(_batches(1))
    p0 = fs.placement("cpu", [0])
    with pytest.raises(fs.GraphError, match="does not split into 3 equal micro-batches"):
        step(x.to_global(p0, B), y.to_global(p0, B))


def test_a_stage_on_two_placements_and_gaps_in_stage_numbers_are_refused():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    a.set_stage(0, fs.placement("cpu", [0]))
    b.set_stage(0, fs.placement("cpu", [1]))
    with pytest.raises(fs.ConfigError, match="stage 0 is set on two placements"):
        nn.Sequential(a, b).stages()
    with pytest.raises(fs.ConfigError, match="stage must be an int >= 0"):
        a.set_stage(-1, fs.placement("cpu", [0]))
    with pytest.raises(fs.ConfigError, match="use 1 to 4 stages"):
        GPT(CFG).pipeline([fs.placement("cpu", [r]) for r in range(5)])


def test_set_stage_runs_eagerly_too():
    fs.manual_seed(0)
    first = nn.Linear(3, 4).set_stage(0, fs.placement("cpu", [0]))
    second = nn.Linear(4, 2).set_stage(1, fs.placement("cpu", [1]))
    x = fs.randn(5, 3)
    y = second(first(x))
    assert y.placement.ranks == (1,)
    y.sum().backward()
    assert first.weight.grad is not None and first.weight.grad.placement.ranks == (0,)

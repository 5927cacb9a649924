"""Gradient clipping by the global norm in compiled steps (``config.grad_clip``, issue #17): on
every layout the same update as one device's eager step with ``clip_grad_norm_``, and the norm."""

import numpy as np
import pytest

import flowsys as fs
from flowsys import optim
from flowsys.models.gpt import GPT
from test_graph import CFG, TrainStep, _batches

B, S = fs.sbp.broadcast, fs.sbp.split
STEPS = 2
MAX_NORM = 0.1  # the GPT's gradient norm is about 1.1: clipping binds on every step


def _eager(max_norm):
    """One device, eager: backward, ``clip_grad_norm_``, SGD step."""
    fs.manual_seed(0)
    model = GPT(CFG)
    opt = optim.SGD(model.parameters(), lr=0.1)
    norms = []
    for x, y in _batches("gpt", n=STEPS):
        _, loss = model(x, y)
        loss.backward()
        norms.append(optim.clip_grad_norm_(model.parameters(), max_norm))
        opt.step()
        opt.zero_grad()
    return {k: v.numpy() for k, v in model.state_dict().items()}, norms


def _compiled(layout, max_norm, zero=0, micro=1, executor="plans"):
    fs.manual_seed(0)
    model = GPT(CFG)
    placement, batch = None, None
    if layout in ("dp2", "tp2"):
        placement = fs.placement("cpu", [0, 1])
        dp = layout == "dp2"
        model.to_global(placement, B if dp else GPT.parallel_plan(placement, dp_axis=None, tp_axis=0))
        batch = S(0) if dp else B
    elif layout == "dp2xtp2":
        placement = fs.placement("cpu", [[0, 1], [2, 3]])
        model.to_global(placement, GPT.parallel_plan(placement, dp_axis=0, tp_axis=1))
        batch = (S(0), B)
    elif layout == "pp2":  # the embedding's tied copy on the last stage: counted once, scaled twice
        placement = fs.placement("cpu", [0])
        model.pipeline([placement, fs.placement("cpu", [1])])
        batch = B
    step = TrainStep(model, optim.SGD(model.parameters(), lr=0.1), micro, executor)
    step.config.grad_clip = max_norm
    step.config.zero_stage = zero
    norms = []
    for x, y in _batches("gpt", n=STEPS):
        if placement is not None:
            x, y = x.to_global(placement, batch), y.to_global(placement, batch)
        step(x, y)
        norms.append(step.last_grad_norm)
    return {k: v.numpy() for k, v in model.state_dict().items()}, norms, step


@pytest.fixture(scope="module")
def single():
    return _eager(MAX_NORM)


@pytest.mark.parametrize("layout, zero, micro", [
    (None, 0, 1), ("dp2", 0, 1), ("tp2", 0, 1), ("dp2xtp2", 0, 1), ("pp2", 0, 2),
    ("dp2", 1, 1), ("dp2", 2, 1), ("dp2", 3, 1), ("dp2xtp2", 2, 1)])
def test_clipped_step_equals_one_device(single, layout, zero, micro):
    want, want_norms = single
    got, norms, _ = _compiled(layout, MAX_NORM, zero, micro)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    for k, v in got.items():
        np.testing.assert_allclose(v, want[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_the_reference_interpreter_clips_alike(single):
    got, norms, _ = _compiled("dp2", MAX_NORM, executor="global")
    np.testing.assert_allclose(norms, single[1], rtol=1e-5)
    for k, v in got.items():
        np.testing.assert_allclose(v, single[0][k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_the_norm_is_reduced_once_over_the_split_axes():
    """dp2 x tp2: the squared sums are partial along the tensor-parallel axis only (the data-parallel
    axis holds replicas once the gradients are reduced): one all-reduce of the total, of 8 bytes."""
    _, _, step = _compiled("dp2xtp2", MAX_NORM)
    ir = step.ir
    made = {o: n for n in ir.nodes for o in n.outputs}
    scale = next(n for n in ir.nodes if n.op == "clip_scale")
    total = made[scale.inputs[0]]
    assert total.kind == "boxing" and ir.values[total.inputs[0]].dtype == np.float64
    assert [str(s) for s in ir.values[total.inputs[0]].sbp] == ["B", "P"]  # replicated shards counted once
    lines = [ln for ln in step.explain().splitlines() if "sum_squares" in ln or "clip_scale" in ln]
    assert len(lines) == sum(1 for n in ir.nodes if n.op in ("sum_squares", "clip_scale")) > 1


def test_a_large_max_norm_changes_nothing():
    unclipped, _, _ = _compiled("dp2", 0.0)
    got, norms, _ = _compiled("dp2", 1e6)
    assert all(n > 0 for n in norms)
    for k, v in got.items():
        np.testing.assert_array_equal(v, unclipped[k], err_msg=k)


def test_grad_clip_must_not_be_negative():
    with pytest.raises(fs.GraphError, match="grad_clip"):
        _compiled(None, -1.0)


def test_the_cost_model_counts_the_norm():
    from scheduler.cost import op_flops

    assert op_flops("sum_squares", [(64, 32)], [()]) == 2 * 64 * 32
    assert op_flops("clip_scale", [()], [()]) > 0

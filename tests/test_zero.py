"""ZeRO stages 1-3 from SBPs: the same losses as one device, the ZeRO paper's model-state memory
per rank from the plan, and the bytes each stage moves."""

import numpy as np
import pytest

import flowsys as fs
from flowsys import optim
from flowsys.models.gpt import GPT
from test_graph import CFG, TrainStep, _batches

B, S = fs.sbp.broadcast, fs.sbp.split
RANKS = [0, 1, 2, 3]
STEPS = 10


def _train(stage, executor="global", mesh=RANKS, steps=STEPS, accumulation=1, dp_axis=0, tp_axis=None):
    """Data parallel over ``mesh`` (a 1-D mesh) or, with ``tp_axis``, Megatron tensor parallel
    along it and data parallel along ``dp_axis`` (None: tensor parallel only)."""
    fs.manual_seed(0)
    model = GPT(CFG)
    placement = fs.placement("cpu", mesh) if mesh is not None else None
    batch = S(0)
    if placement is not None and tp_axis is None:
        model.to_global(placement, B)
    elif placement is not None:
        model.to_global(placement, GPT.parallel_plan(placement, dp_axis=dp_axis, tp_axis=tp_axis))
        batch = tuple(S(0) if k == dp_axis else B for k in range(placement.ndim))
    step = TrainStep(model, optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1), accumulation, executor)
    step.config.zero_stage = stage
    losses = []
    for x, y in _batches("gpt", n=steps):
        if placement is not None:
            x, y = x.to_global(placement, batch), y.to_global(placement, batch)
        losses.append(float(step(x, y)))
    return losses, step


@pytest.fixture(scope="module")
def single():
    return _train(0, mesh=None)[0]


@pytest.mark.parametrize("executor", ["global", "plans"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_losses_equal_one_device(single, stage, executor):
    losses, step = _train(stage, executor)
    np.testing.assert_allclose(losses, single, rtol=1e-4)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("mesh, dp_axis", [([0, 1], None), ([[0, 1], [2, 3]], 0)], ids=["tp2", "dp2xtp2"])
def test_zero_with_tensor_parallelism_equals_one_device(single, stage, mesh, dp_axis):
    """Every ZeRO stage beside Megatron tensor parallelism (the tensor-parallel axis last): the
    same losses as one device. With no data-parallel axis (tp2), ZeRO's group is one rank: nothing
    is sharded, as DeepSpeed's ZeRO over a data-parallel world of one."""
    tp_axis = len(np.shape(mesh)) - 1
    losses, step = _train(stage, "plans", mesh=mesh, steps=4, dp_axis=dp_axis, tp_axis=tp_axis)
    np.testing.assert_allclose(losses, single[:4], rtol=1e-4)
    reduce_scatters = [n for n in step.ir.nodes if n.kind == "boxing" and "reduce_scatter" in n.op]
    assert bool(reduce_scatters) == (dp_axis is not None)  # ZeRO reduces gradients into shards, only along dp


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_on_a_mesh_axis_with_an_unsplit_batch_is_an_error(stage):
    """Everything broadcast along a mesh axis: a data-parallel axis whose batch was not split."""
    placement = fs.placement("cpu", [0, 1])
    model = GPT(CFG).to_global(placement, B)
    step = TrainStep(model, optim.AdamW(model.parameters(), lr=1e-3), 1, "plans")
    step.config.zero_stage = stage
    x, y = next(iter(_batches("gpt", n=1)))
    with pytest.raises(fs.GraphError, match="data-parallel mesh axis"):
        step(x.to_global(placement, B), y.to_global(placement, B))


def test_zero_2_with_gradient_accumulation(single):
    losses, step = _train(2, "plans", accumulation=2)
    reference, _ = _train(0, mesh=None, accumulation=2)
    np.testing.assert_allclose(losses, reference, rtol=1e-4)
    assert step.ir.micro_batches == 2


def test_model_state_memory_follows_the_zero_paper():
    """fp32 Adam: 4Ψ parameters, 4Ψ gradients, 8Ψ optimizer state, split over N_d ranks by stage."""
    n = len(RANKS)
    for stage, (params, grads, state) in {0: (4, 4, 8), 1: (4, 4, 8 / n), 2: (4, 4 / n, 8 / n),
                                          3: (4 / n, 4 / n, 8 / n)}.items():
        _, step = _train(stage, steps=1)
        psi = sum(p.size for p in step.model.parameters())
        for rp in step.plan().ranks:
            m = rp.memory
            assert (m.parameters, m.gradients, m.optimizer_state) == (params * psi, grads * psi, state * psi), stage


def test_zero_1_and_2_move_the_bytes_of_data_parallelism_and_3_half_again():
    sent = {stage: [rp.bytes_sent for rp in _train(stage, steps=1)[1].plan().ranks] for stage in (0, 1, 2, 3)}
    assert sent[1] == sent[0] and sent[2] == sent[0]
    assert all(1.3 < s3 / s0 <= 1.5 for s3, s0 in zip(sent[3], sent[0]))  # gathers in forward and backward


def test_zero_3_shards_the_parameters_and_gathers_where_used():
    _, step = _train(3, steps=1)
    from flowsys.sbp import Split

    for p in step.model.parameters():
        assert isinstance(p.sbp[0], Split), p.shape
    text = step.explain()
    assert "forward   BOXING all_gather" in text and "backward  BOXING all_gather" in text
    boxed = [line for line in text.splitlines() if "BOXING" in line]
    assert all("all_reduce" not in line for line in boxed if "[]" not in line)  # only the scalar loss is summed
    assert sum("reduce_scatter" in line for line in boxed) == len(list(step.model.parameters()))


def test_zero_without_a_data_parallel_axis_is_refused_before_running():
    fs.manual_seed(0)
    model = GPT(CFG)
    placement = fs.placement("cpu", RANKS)
    model.to_global(placement, B)
    for stage in (1, 3):
        step = TrainStep(model, optim.AdamW(model.parameters(), lr=1e-3))
        step.config.zero_stage = stage
        x, y = next(_batches("gpt"))
        with pytest.raises(fs.GraphError, match="needs a data-parallel mesh axis"):
            step(x.to_global(placement, B), y.to_global(placement, B))


def test_zero_stage_must_be_0_to_3():
    _, step = _train(0, steps=1)
    step.config.zero_stage = 4
    x, y = next(_batches("gpt"))
    placement = fs.placement("cpu", RANKS)
    with pytest.raises(fs.GraphError, match="zero_stage must be 0, 1, 2 or 3"):
        step(x.to_global(placement, S(0)), y.to_global(placement, S(0)))


def test_explain_shows_memory_per_rank():
    _, step = _train(2, steps=1)
    text = step.explain()
    assert "memory per rank (MiB)" in text
    rows = [line.split() for line in text.splitlines()[-len(RANKS):]]
    assert [int(r[0]) for r in rows] == RANKS
    psi = sum(p.size for p in step.model.parameters())
    assert float(rows[0][1]) == pytest.approx(4 * psi / 2**20, abs=1e-3)  # parameters
    assert float(rows[0][2]) == pytest.approx(psi / 2**20, abs=1e-3)  # gradients: 4Ψ/4

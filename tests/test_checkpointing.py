"""Activation checkpointing in graph mode: the same losses, fewer live activations in the plan,
and the recomputation visible in the graph."""

import numpy as np
import pytest

import flowsys as fs
from flowsys import nn, optim
from flowsys.models.gpt import GPT, GPTConfig
from flowsys.ops.fusion import part_names
from test_graph import CFG, TrainStep, _batches

B, S = fs.sbp.broadcast, fs.sbp.split


def _train(checkpoint, executor="global", mesh=None, cfg=CFG, steps=10):
    fs.manual_seed(0)
    model = GPT(cfg)
    if checkpoint:
        for block in model.transformer.h:
            block.activation_checkpointing = True
    placement = fs.placement("cpu", mesh) if mesh is not None else None
    if placement is not None:
        model.to_global(placement, GPT.parallel_plan(placement, dp_axis=0, tp_axis=1))
    step = TrainStep(model, optim.AdamW(model.parameters(), lr=1e-3), 1, executor)
    losses = []
    for x, y in _batches("gpt", n=steps):
        if placement is not None:
            x, y = x.to_global(placement, (S(0), B)), y.to_global(placement, (S(0), B))
        losses.append(float(step(x, y)))
    return losses, step


@pytest.mark.parametrize("executor", ["global", "plans"])
def test_checkpointing_keeps_the_losses_and_lowers_peak_activations(executor):
    plain, step0 = _train(False, executor)
    ckpt, step1 = _train(True, executor)
    np.testing.assert_allclose(ckpt, plain, rtol=1e-6)
    before = step0.plan().ranks[0].memory.peak_activations
    after = step1.plan().ranks[0].memory.peak_activations
    assert after < 0.8 * before, (before, after)


def test_checkpointing_on_a_dp_x_tp_mesh_with_dropout():
    cfg = GPTConfig(vocab_size=CFG.vocab_size, block_size=CFG.block_size, n_layer=2, n_head=4, n_embd=32, dropout=0.1)
    plain, _ = _train(False, "plans", [[0, 1], [2, 3]], cfg)
    ckpt, step = _train(True, "plans", [[0, 1], [2, 3]], cfg)
    np.testing.assert_allclose(ckpt, plain, rtol=1e-5)  # the recomputed dropout masks are the same
    assert all(rp.memory.peak_activations > 0 for rp in step.plan().ranks)


def test_recomputed_nodes_are_backward_copies_of_the_checkpointed_forward():
    _, step = _train(True, steps=1)
    g = step.ir

    def ops(phase):  # a fused node counts as its parts (the pass may fuse the forward and its copy apart)
        return [op for n in g.nodes if n.scope is not None and n.phase == phase
                for op in (part_names(n.attr["program"]) if n.op in ("fused_elementwise", "fused_rows") else [n.op])]

    scoped, copies = ops("forward"), ops("backward")
    assert scoped and copies and len(copies) <= len(scoped)
    assert set(copies) <= set(scoped)
    _, plain = _train(False, steps=1)
    assert not any(n.scope is not None for n in plain.ir.nodes)


def test_checkpointing_is_a_no_op_in_eager_mode():
    fs.manual_seed(0)
    layer = nn.Linear(4, 3)
    layer.activation_checkpointing = True
    x = fs.randn(2, 4)
    y = layer(x)
    y.sum().backward()
    np.testing.assert_allclose(layer.weight.grad.numpy(), np.tile(x.numpy().sum(0), (3, 1)), rtol=1e-6)

"""Graph mode: fs.Graph traces build() into one IR, the passes make it a training step, and
the local executor runs it — step for step equal to eager mode, on one device and on meshes."""

from __future__ import annotations

from collections import Counter

import time

import numpy as np
import pytest

import flowsys as fs
from flowsys import boxing, nn, optim
from flowsys.graph import passes
from flowsys.graph.ir import verify
from flowsys.models.gpt import GPT, GPTConfig
from flowsys.sbp import broadcast, partial_sum, split

B, P, S = broadcast, partial_sum, split
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


class TrainStep(fs.Graph):
    def __init__(self, model, opt, accumulation=1, executor="global"):
        super().__init__()
        self.model = model
        self.add_optimizer(opt)
        self.config.gradient_accumulation_steps = accumulation
        self.config.executor = executor

    def build(self, x, y):
        out = self.model(x, y) if isinstance(self.model, GPT) else self.model(x)
        loss = out[1] if isinstance(out, tuple) else ((out - y) ** 2).mean()
        loss.backward()
        return loss


def _mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))


def _batches(kind, n=5, batch=8):
    rng = np.random.default_rng(0)
    for _ in range(n):
        if kind == "gpt":
            yield (fs.tensor(rng.integers(0, CFG.vocab_size, (batch, CFG.block_size))),
                   fs.tensor(rng.integers(0, CFG.vocab_size, (batch, CFG.block_size))))
        else:
            yield fs.tensor(rng.standard_normal((batch, 6)).astype(np.float32)), fs.tensor(rng.standard_normal((batch, 3)).astype(np.float32))


def _run(kind, mode, mesh=None, dp_axis=None, tp_axis=None, accumulation=1, executor="global"):
    fs.manual_seed(0)
    model = GPT(CFG) if kind == "gpt" else _mlp()
    placement = fs.placement("cpu", mesh) if mesh is not None else None
    if placement is not None:
        plan = (GPT.parallel_plan(placement, dp_axis=dp_axis, tp_axis=tp_axis) if kind == "gpt"
                else {"0.*": tuple(S(0) if k == tp_axis else B for k in range(placement.ndim)),
                      "2.weight": tuple(S(1) if k == tp_axis else B for k in range(placement.ndim))})
        model.to_global(placement, plan)
    opt = optim.AdamW(model.parameters(), lr=1e-2 if kind == "mlp" else 1e-3, weight_decay=0.1)
    step = TrainStep(model, opt, accumulation, executor)
    losses = []
    for x, y in _batches(kind):
        if placement is not None:
            batch = tuple(S(0) if k == dp_axis else B for k in range(placement.ndim))
            x, y = x.to_global(placement, batch), y.to_global(placement, batch)
        if mode == "eager":
            loss = step.build.__func__(_Eager(model), x, y)
            opt.step()
            opt.zero_grad()
        else:
            loss = step(x, y)
        losses.append(loss.item())
    return losses, step


class _Eager:  # runs TrainStep.build eagerly on a model
    def __init__(self, model):
        self.model = model


MESHES = {"one device": (None, None, None), "dp2": ([0, 1], 0, None), "tp2": ([0, 1], None, 0),
          "dp2xtp2": ([[0, 1], [2, 3]], 0, 1)}


@pytest.mark.parametrize("executor", ["global", "plans"])
@pytest.mark.parametrize("kind", ["mlp", "gpt"])
@pytest.mark.parametrize("mesh", list(MESHES))
def test_graph_mode_matches_eager_mode(kind, mesh, executor):
    """Both executors: the single controller over the global IR, and every rank running its
    own lowered plan in a thread over the in-process transport."""
    eager, _ = _run(kind, "eager", *MESHES[mesh])
    graph, step = _run(kind, "graph", *MESHES[mesh], executor=executor)
    np.testing.assert_allclose(graph, eager, rtol=1e-5)
    assert len(step._compiled) == 1, "same shapes and layouts: compiled once"


@pytest.mark.parametrize("executor", ["global", "plans"])
@pytest.mark.parametrize("kind", ["mlp", "gpt"])
def test_gradient_accumulation_matches_the_same_global_batch(kind, executor):
    eager, _ = _run(kind, "eager", [[0, 1], [2, 3]], 0, 1)
    graph, step = _run(kind, "graph", [[0, 1], [2, 3]], 0, 1, accumulation=4, executor=executor)
    np.testing.assert_allclose(graph, eager, rtol=1e-5)
    assert step.ir.micro_batches == 4


def test_a_failing_rank_is_reported_by_rank_and_its_peers_do_not_hang(monkeypatch):
    from actors import backends, runtime

    _, step = _run("mlp", "graph", [0, 1, 2], None, 0, executor="plans")
    real = runtime.RankRuntime._fire

    def broken(self, a):
        if self.rp.rank == 1 and a.op.kind == "collective":
            raise RuntimeError("device lost")
        return real(self, a)

    monkeypatch.setattr(runtime.RankRuntime, "_fire", broken)
    x, y = next(_batches("mlp"))
    placement = fs.placement("cpu", [0, 1, 2])
    start = time.monotonic()
    with pytest.raises(backends.RankFailed, match=r"rank 1 failed while running \w+ \(op \d+, piece 0\): RuntimeError: device lost"):
        step(x.to_global(placement, B), y.to_global(placement, B))
    assert time.monotonic() - start < 5.0  # the peers are stopped, not left to time out


def test_verify_passes_after_every_pass():
    fs.manual_seed(0)
    model = GPT(CFG)
    placement = fs.placement("cpu", [[0, 1], [2, 3]])
    model.to_global(placement, GPT.parallel_plan(placement, dp_axis=0, tp_axis=1))
    step = TrainStep(model, optim.AdamW(model.parameters()))
    x, y = next(_batches("gpt"))
    x, y = x.to_global(placement, (S(0), B)), y.to_global(placement, (S(0), B))
    seen = []
    from flowsys.graph.trace import trace

    ir, _ = trace(step.build, [x, y], step._parameters())
    passes.compile_graph(ir, params_by_name=step._parameters(), optimizers=step._optimizers,
                         on_pass=lambda name, g: (verify(g, after=name), seen.append(name)))
    assert seen == list(passes.PASS_ORDER)


def _boxing_counts(step, min_shape_rank=3):
    ir = step.ir
    return Counter((n.phase, s.kind) for n in ir.nodes if n.kind == "boxing" and n.attr["plan"] is not None
                   for s in n.attr["plan"].steps if s.nbytes and len(ir.values[n.inputs[0]].shape) >= min_shape_rank)


def test_explain_megatron_gpt_lists_two_forward_and_two_backward_all_reduces_per_layer():
    _, step = _run("gpt", "graph", [0, 1], None, 0)
    counts = _boxing_counts(step)
    assert counts == {("forward", "all_reduce"): 2 * CFG.n_layer, ("backward", "all_reduce"): 2 * CFG.n_layer}
    text = step.explain()
    assert text.count("BOXING all_reduce") >= 4 * CFG.n_layer
    assert "bytes/step" in text and "boxing total" in text
    for n in step.ir.nodes:  # every boxing node's bytes are the cost table's
        plan = n.attr.get("plan") if n.kind == "boxing" else None
        if plan is not None and plan.nbytes:
            v = step.ir.values[n.inputs[0]]
            assert [s.kind for s in plan.steps] == ["all_reduce"]
            assert plan.nbytes == boxing.cost(P, B, v.nbytes, 2)


def test_explain_data_parallel_has_one_gradient_all_reduce_per_parameter():
    _, step = _run("gpt", "graph", [0, 1, 2, 3], 0, None)
    ir = step.ir
    grads = [n for n in ir.nodes if n.kind == "boxing" and n.phase == "optimizer"]
    assert len(grads) == len(ir.variables) == len(list(step.model.parameters()))
    for n in grads:
        v = ir.values[n.inputs[0]]
        assert n.op == "all_reduce" and n.attr["plan"].nbytes == boxing.cost(P, B, v.nbytes, 4)
    forward = [n for n in ir.nodes if n.kind == "boxing" and n.phase != "optimizer" and n.attr["plan"] is not None
               and n.attr["plan"].nbytes]
    assert all(ir.values[n.inputs[0]].shape == () for n in forward), "only the loss's token count is reduced"


def test_to_dot_highlights_boxing_and_labels_edges_with_sbps():
    _, step = _run("mlp", "graph", [0, 1], None, 0)
    dot = step.to_dot()
    assert dot.startswith("digraph flowsys") and "fillcolor" in dot and 'label="(S(1))"' in dot


# ---------------------------------------------------------------------------------- errors


class _Bad(fs.Graph):
    def __init__(self, model, body):
        super().__init__()
        self.model, self.body = model, body

    def build(self, x):
        return self.body(self, x)


@pytest.mark.parametrize("body,match", [
    (lambda g, x: g.model(x) * float(g.model(x).sum().numpy()), "inside Graph.build"),
    (lambda g, x: g.model(x) if g.model(x).sum() > 0 else -g.model(x), "inside Graph.build"),
    (lambda g, x: 3.0, "must return a tensor"),
    (lambda g, x: (g.model(x), "label"), "must return a tensor"),
])
def test_untraceable_builds_are_clear_compile_time_errors(body, match):
    step = _Bad(nn.Linear(2, 2), body)
    with pytest.raises(fs.GraphError, match=match):
        step(fs.ones(3, 2))


def test_parameters_on_incompatible_placements_fail_at_compile_time_naming_the_op():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].to_global(fs.placement("cpu", [0, 1]))
    model[1].to_global(fs.placement("cpu", [2, 3]))
    step = _Bad(model, lambda g, x: g.model(x))
    with pytest.raises(fs.PlacementError, match="linear: inputs are on different placements"):
        step(fs.ones(3, 2).to_global(fs.placement("cpu", [0, 1])))


def test_an_optimizer_over_parameters_the_graph_does_not_hold():
    model = nn.Linear(2, 2)
    step = TrainStep(model, optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(fs.GraphError, match="no module of this graph holds"):
        step(fs.ones(4, 2), fs.ones(4, 2))


def test_a_model_built_under_meta_init_compiles_to_the_same_graph():
    """Shapes and layouts only (no values): the graph, its boxing and the plans are those of
    the materialised model, so large models compile without being allocated."""
    from flowsys.global_tensor import GlobalValue

    placement = fs.placement("cpu", [[0, 1], [2, 3]])
    batch = (S(0), B)

    def compiled(meta: bool):
        fs.manual_seed(0)
        if meta:
            with nn.meta_init():
                model = GPT(CFG)
                model.to_global(placement, GPT.parallel_plan(placement, dp_axis=0, tp_axis=1))
            assert model.lm_head.weight._data._shards is None
            idx = fs.Tensor(GlobalValue(placement, batch, (8, CFG.block_size), np.dtype(np.int64), None))
        else:
            model = GPT(CFG)
            model.to_global(placement, GPT.parallel_plan(placement, dp_axis=0, tp_axis=1))
            idx = fs.zeros(8, CFG.block_size, dtype=fs.int64).to_global(placement, batch)
        step = TrainStep(model, optim.AdamW(model.parameters()))
        return step.compile(idx, idx)

    real, meta = compiled(False), compiled(True)
    assert [(n.kind, n.op, n.phase) for n in meta.nodes] == [(n.kind, n.op, n.phase) for n in real.nodes]
    from scheduler import lower

    assert [rp.memory for rp in lower(meta).ranks] == [rp.memory for rp in lower(real).ranks]


def test_a_new_input_shape_or_layout_compiles_again():
    fs.manual_seed(0)
    model = _mlp()
    step = TrainStep(model, optim.SGD(model.parameters(), lr=0.1))
    step(fs.ones(4, 6), fs.ones(4, 3))
    step(fs.ones(4, 6), fs.ones(4, 3))
    assert len(step._compiled) == 1
    step(fs.ones(8, 6), fs.ones(8, 3))
    assert len(step._compiled) == 2 and step.ir.values[step.ir.inputs[0]].shape == (8, 6)


class _Promoting(nn.Module):
    """A float16 weight met by float32 data: matmul promotes, so the weight's gradient is
    computed in float32 and must come back in float16 (PyTorch's rule: a gradient has its
    input's dtype)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(fs.tensor(np.linspace(-1, 1, 24, dtype=np.float16).reshape(6, 4)))

    def forward(self, x):
        return x @ self.w


def test_a_gradient_through_a_promoting_op_has_its_inputs_dtype_eager_and_compiled():
    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    want = (x.T @ np.ones((8, 4), np.float32)).astype(np.float16)  # d sum(x @ w) / dw
    model = _Promoting()
    (model(fs.tensor(x))).sum().backward()
    assert model.w.grad.dtype == np.float16
    np.testing.assert_array_equal(model.w.grad.numpy(), want)

    from helpers import SumStep

    placement = fs.placement("cpu", [0, 1])
    model = _Promoting()
    model.to_global(placement, {"w": (S(1),)})  # split by columns: tensor parallelism
    step = SumStep(model, lr=1.0)
    step(fs.tensor(x).to_global(placement, (B,)))
    assert model.w.dtype == np.float16
    np.testing.assert_allclose(model.w.numpy().astype(np.float32),
                               (np.linspace(-1, 1, 24, dtype=np.float16).reshape(6, 4) - want).astype(np.float32),
                               rtol=1e-3)

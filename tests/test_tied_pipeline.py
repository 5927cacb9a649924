"""The tied embedding across pipeline stages as Megatron-LM keeps it: a copy on the last stage,
tied by value, whose gradient is summed with the first stage's once per step (issue #16)."""

import numpy as np
import pytest

import flowsys as fs
from flowsys import nn, optim
from flowsys.graph.ir import GraphError
from flowsys.models.gpt import GPT, GPTConfig
from test_graph import TrainStep

B, S = fs.sbp.broadcast, fs.sbp.split
CFG = GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)
EMB = (CFG.vocab_size, CFG.n_embd)


def _batches(n=3, batch=8):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, CFG.vocab_size, (batch, CFG.block_size)),
             rng.integers(0, CFG.vocab_size, (batch, CFG.block_size))) for _ in range(n)]


def _model(layout):
    fs.manual_seed(0)
    model = GPT(CFG)
    if layout == "pp2":
        p0, p1 = fs.placement("cpu", [0]), fs.placement("cpu", [1])
        model.pipeline([p0, p1])
        return model, p0, B
    if layout == "pp2xdp2":
        p0, p1 = fs.placement("cpu", [0, 1]), fs.placement("cpu", [2, 3])
        model.to_global(p0, B)
        model.pipeline([p0, p1])
        return model, p0, S(0)
    return model, None, None


def _train(layout, micro, executor="plans"):
    model, first, sbp = _model(layout)
    step = TrainStep(model, optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), micro, executor)
    losses = []
    for x, y in _batches():
        x, y = fs.tensor(x), fs.tensor(y)
        if first is not None:
            x, y = x.to_global(first, sbp), y.to_global(first, sbp)
        losses.append(float(step(x, y)))
    return losses, model, step


@pytest.fixture(scope="module")
def single():
    return {m: _train(None, m, "global") for m in (2, 4)}


@pytest.mark.parametrize("layout, micro", [("pp2", 2), ("pp2", 4), ("pp2xdp2", 2)])
def test_tied_gpt_on_pipeline_stages_equals_one_device(single, layout, micro):
    losses, model, step = _train(layout, micro)
    ref_losses, ref, _ = single[micro]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    want = {k: v.numpy() for k, v in ref.state_dict().items()}
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v.numpy(), want[k], rtol=1e-4, atol=2e-5, err_msg=k)  # AdamW: near-zero gradients
    # two parameters, one value: the copies stay bitwise equal
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    assert head is not wte and head.tied_to is wte and head.placement != wte.placement
    np.testing.assert_array_equal(head.numpy(), wte.numpy())


def test_the_embedding_gradient_crosses_stages_once_per_step():
    _, _, step = _train("pp2", 4)
    ir = step.compile(*[t.to_global(fs.placement("cpu", [0]), B) for t in map(fs.tensor, _batches(1)[0])])
    moves = [n for n in ir.nodes if n.kind == "boxing" and ir.values[n.inputs[0]].shape == EMB
             and ir.values[n.inputs[0]].placement != ir.values[n.outputs[0]].placement]
    # the exchange between the two holders, in the optimizer phase: once per step, not per micro-batch
    assert len(moves) == 2 and all(n.phase == "optimizer" for n in moves)
    nbytes = int(np.prod(EMB)) * 4
    lines = [ln for ln in step.explain().splitlines() if "BOXING send_recv" in ln and str(list(EMB)) in ln]
    assert len(lines) == 2 and all(ln.split()[1] == "optimizer" and f"{nbytes} bytes/step" in ln for ln in lines)
    # the per-rank plans: each stage sends the embedding's gradient once, in the optimizer phase
    for rp in step.plan().ranks:
        sends = [op for op in rp.ops if op.kind == "send" and op.nbytes == nbytes]
        assert len(sends) == 1 and sends[0].phase == "optimizer"


def test_a_borrowed_parameter_moves_its_accumulated_gradient_once_per_step():
    """Without a copy, a parameter used on another stage: its gradient's move back is linear,
    so it runs once per step on the accumulated gradient."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.holder = nn.Linear(4, 4), nn.Linear(4, 4), nn.Module()
            self.holder.w = self.b.weight  # held by stage 0, used by stage 1 only

        def forward(self, x):
            return self.b(fs.nn.functional.gelu(self.a(x)))

    def build():
        fs.manual_seed(0)
        return Net()

    rng = np.random.default_rng(1)
    data = [(rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32))
            for _ in range(3)]
    ref = build()
    ref_step = TrainStep(ref, optim.AdamW(ref.parameters(), lr=1e-2), 4)
    ref_losses = [float(ref_step(fs.tensor(x), fs.tensor(y))) for x, y in data]
    model = build()
    p0, p1 = fs.placement("cpu", [0]), fs.placement("cpu", [1])
    model.holder.set_stage(0, p0)
    model.a.set_stage(0, p0)
    model.b.set_stage(1, p1)
    step = TrainStep(model, optim.AdamW(model.parameters(), lr=1e-2), 4, "plans")
    losses = [float(step(fs.tensor(x).to_global(p0, B), fs.tensor(y).to_global(p1, B))) for x, y in data]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(model.b.weight.numpy(), ref.b.weight.numpy(), rtol=1e-4, atol=1e-6)
    assert model.b.weight.placement == p0
    ir = step._last
    grad_of_w = ir.grads[ir.variables["model.b.weight"]]
    assert ir.values[grad_of_w].placement == p1  # accumulated on the stage that uses it
    back = [n for n in ir.nodes if n.kind == "boxing" and ir.values[n.inputs[0]].placement == p1
            and ir.values[n.outputs[0]].placement == p0 and ir.values[n.inputs[0]].shape == (4, 4)]
    assert [n.phase for n in back] == ["optimizer"]


def test_checkpoint_holds_the_embedding_once_and_loads_both_copies(tmp_path):
    _, model, step = _train("pp2", 2)
    opt = step._optimizers[0]
    path = fs.checkpoint.save(tmp_path, model, opt, step=3)
    import json
    tensors = json.loads((path / "meta.json").read_text())["tensors"]
    assert "param/transformer.wte.weight" in tensors and "param/lm_head.weight" not in tensors
    assert not any(k.startswith("state/lm_head.weight/") for k in tensors)
    saved = model.transformer.wte.weight.numpy().copy()
    # a fresh pipelined model (driver-side values) and one whose values live in the workers
    fresh, _, _ = _model("pp2")
    fresh_opt = optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    fs.checkpoint.load(path, fresh, fresh_opt)
    np.testing.assert_array_equal(fresh.transformer.wte.weight.numpy(), saved)
    np.testing.assert_array_equal(fresh.lm_head.weight.numpy(), saved)
    assert fresh_opt.state[id(fresh.lm_head.weight)].keys() == fresh_opt.state[id(fresh.transformer.wte.weight)].keys()
    # loads into both copies in the workers too, and training goes on from equal copies
    x, y = (fs.tensor(t).to_global(fs.placement("cpu", [0]), B) for t in _batches(1)[0])
    fs.checkpoint.load(path, model, opt)
    np.testing.assert_array_equal(model.lm_head.weight.numpy(), saved)
    step(x, y)
    np.testing.assert_array_equal(model.lm_head.weight.numpy(), model.transformer.wte.weight.numpy())
    # one device loads it too (the tie is the same parameter there)
    one = GPT(CFG)
    fs.checkpoint.load(path, one)
    np.testing.assert_array_equal(one.lm_head.weight.numpy(), saved)


def test_eager_pipeline_sums_the_tied_gradients_and_clips_them_once():
    ref, _, _ = _model(None)
    model, first, _ = _model("pp2")
    x, y = (fs.tensor(t) for t in _batches(1)[0])
    _, loss = ref(x, y)
    loss.backward()
    _, loss = model(x.to_global(first, B), y.to_global(first, B))
    loss.backward()
    ref_norm = optim.clip_grad_norm_(ref.parameters(), 1e9)
    norm = optim.clip_grad_norm_(model.parameters(), 1e9)  # the tied pair counted once
    assert norm == pytest.approx(ref_norm, rel=1e-5)
    np.testing.assert_allclose(model.lm_head.weight.grad.numpy(), ref.lm_head.weight.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(model.lm_head.weight.grad.numpy(), model.transformer.wte.weight.grad.numpy())
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    opt.step()  # summed already: not summed twice
    ref_opt = optim.AdamW(ref.parameters(), lr=1e-2)
    ref_opt.step()
    np.testing.assert_allclose(model.lm_head.weight.numpy(), ref.lm_head.weight.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(model.lm_head.weight.numpy(), model.transformer.wte.weight.numpy())


def test_training_one_copy_of_a_tied_pair_only_is_refused():
    model, first, _ = _model("pp2")
    params = [p for p in model.parameters() if p is not model.lm_head.weight]
    step = TrainStep(model, optim.AdamW(params, lr=1e-2), 2, "plans")
    x, y = (fs.tensor(t).to_global(first, B) for t in _batches(1)[0])
    with pytest.raises(GraphError, match="tied by value"):
        step(x, y)

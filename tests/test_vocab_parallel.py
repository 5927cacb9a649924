"""Vocabulary-parallel embedding and cross entropy (Megatron-LM's): the max reduction in every
transport, the P(max) boxing, and GPT on tp2 / tp4 / dp2 x tp2 against one device."""

import threading

import numpy as np
import pytest

import flowsys as fs
from comm import algorithms as alg
from comm.inprocess import InProcessHub, run_group
from flowsys import boxing
from flowsys.models import GPT, GPTConfig
from flowsys.models.gpt import vocab_parallel_cross_entropy
from flowsys.nn import functional as F
from flowsys.sbp import broadcast as B, partial_max as PMAX, partial_sum as P, split as S
from helpers import one_device_reference, one_sgd_step

CFG = GPTConfig(vocab_size=250, block_size=8, n_layer=1, n_head=2, n_embd=16)


def _threads(comms, fn):
    out = [None] * len(comms)
    ts = [threading.Thread(target=lambda r=r: out.__setitem__(r, fn(comms[r]))) for r in range(len(comms))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ring_all_reduce_and_reduce_scatter_take_a_max(n):
    xs = [np.random.default_rng(r).standard_normal((5, 3)) for r in range(n)]
    outs, _ = run_group(alg.ring_all_reduce, xs, op="max")
    for o in outs:
        np.testing.assert_array_equal(o, np.maximum.reduce(xs))
    outs, _ = run_group(alg.ring_reduce_scatter, xs, axis=0, op="max")
    np.testing.assert_array_equal(np.concatenate(outs), np.maximum.reduce(xs))
    with pytest.raises(ValueError, match="unknown reduce op 'min'"):
        run_group(alg.ring_all_reduce, xs, op="min")


def test_inprocess_and_grpc_communicators_reduce_by_max():
    from comm.grpc_transport import GrpcCommunicator

    hub = InProcessHub(3, timeout=10)
    comms = [hub.communicator(r) for r in range(3)]
    got = _threads(comms, lambda c: c.all_reduce(np.array([c.rank, -c.rank, 1.0]), op="max"))
    assert all(g.tolist() == [2.0, 0.0, 1.0] for g in got)
    got = _threads(comms, lambda c: c.all_reduce(np.array([c.rank, 1.0])))  # sum stays the default
    assert all(g.tolist() == [3.0, 3.0] for g in got)
    grpc = [GrpcCommunicator(r, 2, secret="vocab", timeout=10) for r in range(2)]
    try:
        addresses = [c.address for c in grpc]
        for c in grpc:
            c.connect(addresses)
        got = _threads(grpc, lambda c: c.all_reduce(np.array([c.rank, 5.0 - c.rank]), op="max"))
        assert all(g.tolist() == [1.0, 5.0] for g in got)
        got = _threads(grpc, lambda c: c.reduce_scatter(np.array([c.rank, -c.rank, 3.0, 0.0]), op="max"))
        assert got[0].tolist() == [1.0, 0.0] and got[1].tolist() == [3.0, 0.0]
    finally:
        for c in grpc:
            c.close()


def test_partial_max_boxing_plans_and_costs():
    pl = fs.placement("cpu", [0, 1, 2, 3])
    plan = boxing.plan((8,), np.dtype(np.float32), pl, (PMAX,), pl, (B,))
    assert [s.kind for s in plan.steps] == ["all_reduce_max"]
    assert plan.nbytes == boxing.cost(P, B, 32, 4) == boxing.cost(PMAX, B, 32, 4)
    assert [s.kind for s in boxing.plan((8,), np.dtype(np.float32), pl, (PMAX,), pl, (S(0),)).steps] == \
        ["reduce_scatter_max"]
    assert [s.kind for s in boxing.plan((8,), np.dtype(np.float32), pl, (PMAX,), pl, (P,)).steps] == \
        ["all_reduce_max", "zeros"]
    x = fs.tensor(np.arange(8.0, dtype=np.float32)).to_global(pl, PMAX)
    np.testing.assert_array_equal(x.numpy(), np.arange(8.0))
    with pytest.raises(fs.FlowsysError, match="P\\(max\\)"):
        boxing.plan((8,), np.dtype(np.float32), pl, (P,), pl, (PMAX,))


@pytest.mark.parametrize("sbp", [S(2), B, S(0)], ids=["vocab-split", "replicated", "batch-split"])
def test_vocab_parallel_cross_entropy_equals_cross_entropy(sbp):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, 4, 11)).astype(np.float32)
    t = rng.integers(0, 11, (2, 4))
    t[0, 0] = -1
    x0 = fs.tensor(X, requires_grad=True)
    F.cross_entropy(x0, fs.tensor(t), ignore_index=-1).backward()
    want = F.cross_entropy(fs.tensor(X), fs.tensor(t), ignore_index=-1).item()
    pl = fs.placement("cpu", [0, 1, 2])  # uneven: 11 classes on 3 ranks
    x = fs.tensor(X).to_global(pl, sbp).requires_grad_()
    with boxing.trace() as events:
        loss = vocab_parallel_cross_entropy(x, fs.tensor(t).to_global(pl, B), 11, ignore_index=-1)
    loss.backward()
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), x0.grad.numpy(), rtol=1e-5, atol=1e-7)
    if sbp == S(2):
        assert "all_reduce_max" in {e.kind for e in events}


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, CFG.vocab_size, (4, CFG.block_size))
    tgt = rng.integers(0, CFG.vocab_size, (4, CFG.block_size))
    tgt[0, :3] = -1
    return idx, tgt


@pytest.fixture(scope="module")
def reference():
    """One device: the state before, the loss and every gradient."""
    return one_device_reference(CFG, *_batch())


@pytest.mark.parametrize("mesh,dp_axis,tp_axis,padded", [
    ([0, 1], None, 0, False),
    ([0, 1, 2, 3], None, 0, True),  # 250 tokens padded to 512
    ([[0, 1], [2, 3]], 0, 1, False),
], ids=["tp2", "tp4-padded", "dp2xtp2"])
def test_compiled_gpt_vocab_parallel_equals_one_device(reference, mesh, dp_axis, tp_axis, padded):
    before, want_loss, want_grads = reference
    pl = fs.placement("cpu", mesh)
    tp = pl.mesh[tp_axis]
    model = GPT(CFG.padded_for(tp) if padded else CFG)
    if padded:
        assert model.lm_head.weight.shape == (512, 16)
    model.load_state_dict(before)
    model.to_global(pl, GPT.parallel_plan(pl, dp_axis=dp_axis, tp_axis=tp_axis, vocab_parallel=True))
    assert model.lm_head.weight.sbp[tp_axis] == S(0)
    step, loss = one_sgd_step(model, pl, dp_axis, *_batch())
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    text = step.explain()
    assert "all_reduce_max" in text
    after = model.state_dict()
    for name, p in model.named_parameters():
        key = name if name in before else "lm_head.weight"
        got = before[key] - after[key].numpy()  # SGD with lr 1: the gradient
        want = (want_grads[name] if name in want_grads else want_grads["lm_head.weight"]).reshape(got.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)
    assert after["lm_head.weight"].shape == (CFG.vocab_size, CFG.n_embd)


def test_checkpoints_move_between_vocabulary_paddings(tmp_path):
    """A job saved unpadded (dp4) resumes padded (tp4: 256 -> 512 rows) and back, as if it had
    gone on: the real rows are read, the padding starts at zero."""
    from flowsys import checkpoint
    from flowsys.data import ByteDataset
    from flowsys.plan import build, layout
    from flowsys.train import load_job

    fs.init(backend="local")
    batches = ByteDataset.from_stdlib(1 << 18).batches(16, 64)
    batch = (S(0), B)

    def job(dp, tp):
        j = load_job("examples/configs/tiny.yaml", {"parallel.dp": dp, "parallel.tp": tp, "parallel.zero_stage": 0})
        first = layout(j)[0]
        model, opt, step = build(j, [first], meta=True)
        return first, model, opt, step

    try:
        first, model, opt, step = job(4, 1)
        step(*batches.at(0, first, batch))
        checkpoint.save(tmp_path, model, opt, step=1)
        p4, padded, opt4, step4 = job(1, 4)
        assert padded.lm_head.weight.shape[0] == 512 and model.lm_head.weight.shape[0] == 256
        checkpoint.load(tmp_path, padded, opt4)
        np.testing.assert_allclose(float(step4(*batches.at(1, p4, batch))), float(step(*batches.at(1, first, batch))),
                                   rtol=1e-5)
        checkpoint.save(tmp_path, padded, opt4, step=2)
        back, again, opt1, step1 = job(4, 1)
        checkpoint.load(tmp_path, again, opt1)
        np.testing.assert_allclose(float(step1(*batches.at(2, back, batch))), float(step(*batches.at(2, first, batch))),
                                   rtol=1e-5)
        with pytest.raises(fs.StateDictError, match="has shape"):  # other than padding: still refused
            checkpoint.load(tmp_path, GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=32)))
    finally:
        fs.shutdown()

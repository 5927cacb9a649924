"""The driver is the controller, not the data plane: after the first step, a step moves a small
request and response per rank whatever the model's size; parameters are created by the workers
from their initialisers and stay there (pulled only when the driver is asked for values); the
workers read their own batches; eager and compiled runs start from the same parameters in every
layout."""

from __future__ import annotations

import numpy as np
import pytest

import flowsys as fs
from flowsys import nn, optim
from flowsys.data import ByteDataset
from flowsys.models import GPT, GPTConfig
from flowsys.sbp import broadcast as B, split
from flowsys.tensor import stored
from helpers import TrainStep

CFG = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=4, n_embd=32)
WIDE = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=4, n_embd=128)
BATCH = 8
LIMIT = 16 * 1024  # bytes per rank and step between driver and workers, both ways together

LAYOUTS = {  # mesh, dp axis, tp axis, pipeline second stage, ZeRO stage, micro-batches
    "dp2": ([0, 1], 0, None, None, 0, 1),
    "tp2": ([0, 1], None, 0, None, 0, 1),
    "dp2xtp2 zero1 m2": ([[0, 1], [2, 3]], 0, 1, None, 1, 2),
    "dp2 zero3": ([0, 1], 0, None, None, 3, 1),
    "pp2xdp2 m2": ([0, 1], 0, None, [2, 3], 0, 2),
}


@pytest.fixture(scope="module")
def data():
    return ByteDataset.from_stdlib(1 << 16)


@pytest.fixture(autouse=True)
def local_backend():
    fs.init(backend="local", timeout=30.0)
    yield
    fs.shutdown()


def _Train(model, opt, micro=1, zero=0) -> TrainStep:
    step = TrainStep(model, opt, micro)
    step.config.zero_stage = zero
    return step


class _Eval(fs.Graph):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def build(self, idx, targets):
        return self.model(idx, targets)[1]


def _model(layout: str, cfg=CFG, meta: bool = True):
    """The GPT laid out as ``layout`` (built without values: the workers create them), and the
    placement and SBP of its batch."""
    mesh, dp, tp, second, _, _ = LAYOUTS[layout]
    first = fs.placement("cpu", mesh)
    fs.manual_seed(0)
    with nn.meta_init() if meta else _nothing():
        model = GPT(cfg)
        model.to_global(first, GPT.parallel_plan(first, dp_axis=dp, tp_axis=tp))
        if second is not None:
            model.pipeline([first, fs.placement("cpu", second)])
    sbp = tuple(split(0) if axis == dp else B for axis in range(first.ndim))
    return model, first, sbp


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _train(layout: str, data, cfg=CFG, steps: int = 3):
    model, first, sbp = _model(layout, cfg)
    *_, zero, micro = LAYOUTS[layout]
    step = _Train(model, optim.AdamW(model.parameters(), lr=1e-3), micro, zero)
    batches = data.batches(BATCH, cfg.block_size)
    traffic = []
    for i in range(steps):
        step(*batches.at(i, first, sbp))
        traffic.append(step.traffic)
    return model, step, traffic


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_steady_step_moves_a_few_kib_per_rank_whatever_the_width(layout, data):
    sizes = {}
    for name, cfg in (("narrow", CFG), ("wide", WIDE)):
        model, step, traffic = _train(layout, data, cfg)
        first = traffic[0]
        for later in traffic[1:]:  # after the first step (plans, keys and constants): small and the same
            assert set(later) == set(first)
            for rank, (sent, back) in later.items():
                assert sent + back <= LIMIT, (name, rank, sent, back)
        sizes[name] = traffic[-1]
        # and the driver holds no parameter values: they were created in the workers and stay there
        assert all(stored(p)._shards is None for p in model.parameters())
    for rank, (sent, back) in sizes["wide"].items():  # 16x the parameters, not one byte more per step
        assert (sent, back) == sizes["narrow"][rank]


def test_the_first_step_sends_initialisers_not_values(data):
    _, _, traffic = _train("dp2", data, WIDE, steps=1)
    params = sum(p.size for p in GPT(WIDE).parameters()) * 4
    for sent, _ in traffic[0].values():
        assert sent < params / 20  # the plan's keys, constants and a few bytes per parameter


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eager_and_compiled_runs_start_from_the_same_parameters(layout, data):
    fs.manual_seed(0)
    eager = GPT(CFG)  # on the driver, one device
    want = {k: v.numpy() for k, v in eager.state_dict().items()}
    model, first, sbp = _model(layout)
    x, y = data.batches(BATCH, CFG.block_size).at(0)
    loss = float(_Eval(model)(x.to_global(first, sbp), y.to_global(first, sbp)))
    got = {k: v.numpy() for k, v in model.state_dict().items()}  # pulled from the workers
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with fs.no_grad():
        np.testing.assert_allclose(loss, eager(x, y)[1].item(), rtol=1e-5)


def test_workers_read_their_own_blocks_of_the_batch(data):
    batches = data.batches(BATCH, CFG.block_size, seed=3)
    x, y = batches.at(5)
    P = fs.placement("cpu", [[0, 1], [2, 3]])
    gx, gy = batches.at(5, P, (split(0), B))
    assert stored(gx)._shards is None  # nothing read here yet (`.shards` would read them)
    for rank in P.ranks:  # what a rank reads is its block of the one-device batch
        rows = slice(*{0: (0, 4), 1: (0, 4), 2: (4, 8), 3: (4, 8)}[rank])
        np.testing.assert_array_equal(gx.to_local(rank).numpy(), x.numpy()[rows])
        np.testing.assert_array_equal(gy.to_local(rank).numpy(), y.numpy()[rows])
    # y is x shifted by one token: next-token targets
    np.testing.assert_array_equal(x.numpy()[:, 1:], y.numpy()[:, :-1])
    # step s, sample i is the same sample whatever the batch's layout or who asks
    again = data.batches(BATCH, CFG.block_size, seed=3).at(5, fs.placement("cpu", [0, 1, 2]), split(0))[0]
    np.testing.assert_array_equal(again.numpy(), x.numpy())


def test_the_samples_digest_is_made_where_the_samples_are(data):
    model, first, sbp = _model("dp2xtp2 zero1 m2")
    step = _Train(model, optim.SGD(model.parameters(), lr=0.1), 2, 1)
    batches = data.batches(BATCH, CFG.block_size)
    inputs = batches.at(4, first, sbp)
    step(*inputs)
    assert stored(inputs[0])._shards is None  # the driver never read the batch
    x, y = batches.at(4)
    assert step.samples_digest == {0: int(x.numpy()[:, 0].sum()), 1: int(y.numpy()[:, 0].sum())}


def test_values_pulled_unchanged_are_not_sent_again_and_changed_ones_are(data):
    model, first, sbp = _model("dp2")
    step = _Train(model, optim.SGD(model.parameters(), lr=0.1))
    batches = data.batches(BATCH, CFG.block_size)
    step(*batches.at(0, first, sbp))
    step(*batches.at(1, first, sbp))
    quiet = step.traffic
    before = {k: v.numpy() for k, v in model.state_dict().items()}  # pulls
    step(*batches.at(2, first, sbp))
    assert step.traffic == quiet  # compared with what was pulled: nothing to send
    w = model.transformer.wpe.weight
    w.copy_(fs.zeros(w.shape))  # the user changes one parameter on the driver
    step(*batches.at(3, first, sbp))
    grown = {r: sent - quiet[r][0] for r, (sent, _) in step.traffic.items()}
    assert all(w.size * 4 <= g < 2 * w.size * 4 for g in grown.values()), grown  # that one, to every rank
    # its values reached the workers: after an SGD step from zeros, wpe is -lr * its gradient
    # (nonzero), while the others moved from where they were
    after = {k: v.numpy() for k, v in model.state_dict().items()}
    assert not np.array_equal(after["transformer.wpe.weight"], before["transformer.wpe.weight"])
    assert np.abs(after["transformer.wpe.weight"]).max() < 0.1 * np.abs(before["transformer.wpe.weight"]).max()


def test_compiled_evaluation_equals_eager_evaluation(data):
    from flowsys.train import evaluate, evaluate_compiled

    model, first, sbp = _model("dp2xtp2 zero1 m2")
    _Train(model, optim.AdamW(model.parameters(), lr=1e-3), 2, 1)(*data.batches(BATCH, 16).at(0, first, sbp))
    compiled = evaluate_compiled(model, data, BATCH, CFG.block_size, 2, first, sbp)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    fs.manual_seed(0)
    eager = GPT(CFG)
    eager.load_state_dict(state)
    np.testing.assert_allclose(compiled, evaluate(eager, data, BATCH, CFG.block_size, 2), rtol=1e-5)


def test_a_model_built_without_values_makes_them_where_and_when_they_are_needed(data):
    fs.manual_seed(0)
    want = {k: v.numpy() for k, v in GPT(CFG).state_dict().items()}
    fs.manual_seed(0)
    with nn.meta_init():
        local = GPT(CFG)
    fs.manual_seed(0)
    with nn.meta_init():
        laid = GPT(CFG)
    P = fs.placement("cpu", [0, 1])
    laid.to_global(P, GPT.parallel_plan(P, tp_axis=0))  # laid out after the block: still no values
    assert all(stored(p)._shards is None for p in laid.parameters())
    w = laid.transformer.h[0].mlp.c_fc.weight
    np.testing.assert_array_equal(w.to_local(1).numpy(), want["transformer.h.0.mlp.c_fc.weight"][w.shape[0] // 2:])
    for model in (local, laid):  # on the driver, from the initialisers
        got = {k: v.numpy() for k, v in model.state_dict().items()}
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)

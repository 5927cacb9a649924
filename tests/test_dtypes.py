"""bfloat16 and float16 tensors: ops and their gradients against PyTorch's bf16/fp16 results,
torch's promotion table, the wire (in-process collectives, worker messages, gRPC), safetensors
checkpoints, a global bf16 tensor's boxing, and a compiled bf16 step equal to eager mode."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import comm
import flowsys as fs
from actors.worker import decode, encode
from comm import algorithms as alg
from comm.grpc_transport import GrpcCommunicator
from flowsys import nn, optim
from flowsys.nn import functional as F

B, P, S = fs.sbp.broadcast, fs.sbp.partial_sum, fs.sbp.split
LOW = {"bfloat16": (fs.bfloat16, torch.bfloat16), "float16": (fs.float16, torch.float16)}
RTOL = ATOL = 1e-2


def _inputs(dtype, *shapes, positive=False, seed=0):
    """Random arrays already rounded to ``dtype`` (both libraries start from the same values)."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        a = rng.standard_normal(shape).astype(np.float32)
        out.append((np.abs(a) + 0.5 if positive else a).astype(dtype))
    return out


def _torch(a: np.ndarray, tdtype) -> torch.Tensor:
    return torch.tensor(a.astype(np.float32)).to(tdtype).requires_grad_()


def _close(got: fs.Tensor | np.ndarray, want: torch.Tensor, dtype):
    got = got.numpy() if isinstance(got, fs.Tensor) else got
    assert got.dtype == dtype, (got.dtype, dtype)
    np.testing.assert_allclose(got.astype(np.float32), want.detach().float().numpy(), rtol=RTOL, atol=ATOL)


# fs op, torch op, input shapes, positive inputs
CASES = {
    "add": (lambda a, b: a + b, lambda a, b: a + b, [(4, 5), (5,)], False),
    "sub": (lambda a, b: a - b, lambda a, b: a - b, [(4, 5), (4, 5)], False),
    "mul": (lambda a, b: a * b, lambda a, b: a * b, [(4, 5), (4, 1)], False),
    "div": (lambda a, b: a / b, lambda a, b: a / b, [(4, 5), (4, 5)], True),
    "scalar": (lambda a: a * 2.5 + 1, lambda a: a * 2.5 + 1, [(4, 5)], False),
    "exp": (fs.exp, torch.exp, [(4, 5)], False),
    "log": (fs.log, torch.log, [(4, 5)], True),
    "sqrt": (fs.sqrt, torch.sqrt, [(4, 5)], True),
    "tanh": (fs.tanh, torch.tanh, [(4, 5)], False),
    "relu": (F.relu, torch.relu, [(4, 5)], False),
    "gelu": (F.gelu, torch.nn.functional.gelu, [(4, 5)], False),
    "matmul": (lambda a, b: a @ b, lambda a, b: a @ b, [(3, 4, 8), (8, 5)], False),
    "linear": (F.linear, torch.nn.functional.linear, [(6, 8), (5, 8), (5,)], False),
    "sum": (lambda a: a.sum(axis=1), lambda a: a.sum(dim=1), [(4, 64)], False),
    "mean": (lambda a: a.mean(), lambda a: a.mean(), [(16, 32)], False),
    "softmax": (lambda a: F.softmax(a, -1), lambda a: torch.softmax(a, -1), [(4, 7)], False),
    "layer_norm": (lambda a, w, b: F.layer_norm(a, (8,), w, b),
                   lambda a, w, b: torch.nn.functional.layer_norm(a, (8,), w, b), [(4, 8), (8,), (8,)], False),
}


@pytest.mark.parametrize("low", list(LOW))
@pytest.mark.parametrize("case", list(CASES))
def test_op_and_gradient_match_torch(case, low):
    dtype, tdtype = LOW[low]
    fs_fn, torch_fn, shapes, positive = CASES[case]
    arrays = _inputs(dtype, *shapes, positive=positive)
    xs = [fs.tensor(a, requires_grad=True) for a in arrays]
    ts = [_torch(a, tdtype) for a in arrays]
    out, want = fs_fn(*xs), torch_fn(*ts)
    _close(out, want, dtype)
    seed = _inputs(dtype, tuple(want.shape), seed=1)[0]
    out.backward(fs.tensor(seed))
    want.backward(torch.tensor(seed.astype(np.float32)).to(tdtype))
    for x, t in zip(xs, ts):
        _close(x.grad, t.grad, dtype)  # gradients in the parameter's dtype


@pytest.mark.parametrize("low", list(LOW))
def test_cross_entropy_matches_torch(low):
    dtype, tdtype = LOW[low]
    (logits,) = _inputs(dtype, (6, 10))
    targets = np.array([1, 0, 9, 3, 3, 7])
    x, t = fs.tensor(logits, requires_grad=True), _torch(logits, tdtype)
    loss, want = F.cross_entropy(x, fs.tensor(targets)), torch.nn.functional.cross_entropy(t, torch.tensor(targets))
    _close(loss, want, dtype)
    loss.backward()
    want.backward()
    _close(x.grad, t.grad, dtype)


def test_sums_accumulate_in_float32():
    # 4096 ones and one 1/256 step each: bfloat16 accumulation would stall at 256
    x = fs.ones(4096, dtype=fs.bfloat16)
    assert x.sum().dtype == fs.bfloat16 and float(x.sum()) == 4096.0
    assert float(fs.full((4096,), 0.1, dtype=fs.float16).mean()) == pytest.approx(0.1, rel=1e-3)


def test_creation_casts_and_printing():
    x = fs.tensor([[1.0, 2.5], [3.0, -4.0]], dtype=fs.bfloat16)
    assert x.dtype == fs.bfloat16 and fs.zeros(2, 3, dtype=fs.float16).dtype == fs.float16
    assert x.numpy().dtype == fs.bfloat16 and x.astype(fs.float32).numpy().tolist() == [[1.0, 2.5], [3.0, -4.0]]
    assert x.half().dtype == fs.float16 and x.float().bfloat16().dtype == fs.bfloat16
    assert repr(x) == "tensor([[ 1. ,  2.5],\n        [ 3. , -4. ]], dtype=bfloat16)"
    assert fs.randn(3, dtype=fs.bfloat16).dtype == fs.bfloat16
    assert fs.tensor([1.0], dtype=fs.bfloat16, requires_grad=True).requires_grad
    # a cast differentiates: the gradient comes back in the input's dtype
    y = fs.tensor([1.5, 2.0], requires_grad=True)
    (y.astype(fs.bfloat16) * 3.0).sum().backward()
    assert y.grad.dtype == fs.float32 and y.grad.numpy().tolist() == [3.0, 3.0]


# --------------------------------------------------------------------------------- promotion
f32, f64, i64, i32 = fs.float32, fs.float64, fs.int64, fs.int32
PROMOTION = [  # torch.result_type's table
    (fs.bfloat16, fs.float16, f32), (fs.bfloat16, f32, f32), (fs.float16, f32, f32), (fs.bfloat16, f64, f64),
    (fs.bfloat16, i64, fs.bfloat16), (fs.float16, i32, fs.float16), (fs.bfloat16, fs.bool_, fs.bfloat16),
    (fs.bfloat16, fs.bfloat16, fs.bfloat16), (fs.float16, fs.float16, fs.float16),
]


@pytest.mark.parametrize("a, b, want", PROMOTION, ids=lambda d: getattr(d, "name", None))
def test_promotion_is_torchs(a, b, want):
    x, y = fs.ones(2, dtype=a), fs.ones(2, dtype=b)
    assert (x + y).dtype == want and (y * x).dtype == want
    assert fs.concatenate([x, y]).dtype == want
    tx, ty = torch.ones(2, dtype=getattr(torch, a.name if a != fs.bool_ else "bool")), torch.ones(
        2, dtype=getattr(torch, b.name if b != fs.bool_ else "bool"))
    assert torch.result_type(tx, ty) == getattr(torch, want.name)


@pytest.mark.parametrize("low", [fs.bfloat16, fs.float16], ids=lambda d: d.name)
def test_python_scalars_keep_the_low_dtype(low):
    x = fs.ones(3, dtype=low)
    assert (x + 1.5).dtype == low and (2.0 * x).dtype == low and (x / 3).dtype == low and (x ** 2).dtype == low
    assert (x > 0.5).dtype == fs.bool_


def test_a_cast_is_a_graph_node():
    class Step(fs.Graph):
        def build(self, x):
            return x.astype(fs.bfloat16) * 2.0

    step = Step()
    out = step(fs.tensor([1.0, 2.5]))
    assert out.dtype == fs.bfloat16 and out.numpy().astype(np.float32).tolist() == [2.0, 5.0]
    assert any(n.op == "astype" for n in step.ir.nodes)


# ------------------------------------------------------------------------------------- wire
@pytest.mark.parametrize("dtype", [fs.bfloat16, fs.float16], ids=lambda d: d.name)
def test_in_process_all_reduce_and_worker_messages(dtype):
    inputs = _inputs(dtype, (5, 3), (5, 3), (5, 3))
    outs, _ = comm.run_group(alg.ring_all_reduce, inputs)
    want = sum(a.astype(np.float32) for a in inputs)
    for out in outs:
        assert out.dtype == dtype
        np.testing.assert_allclose(out.astype(np.float32), want, rtol=RTOL, atol=ATOL)
    message = encode(7, inputs[0])
    assert message.dtype == dtype.name if dtype == fs.bfloat16 else message.dtype == "<f2"
    back = decode(message)
    assert back.dtype == dtype and back.tobytes() == inputs[0].tobytes()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "stream"])
def test_grpc_carries_bfloat16_by_name(shared_memory):
    comms = [GrpcCommunicator(r, 2, "test-secret", shared_memory=shared_memory) for r in range(2)]
    try:
        for c in comms:
            c.connect([c.address for c in comms])
        small, big = _inputs(fs.bfloat16, (3, 4), (256, 512))  # inline, and shared memory where allowed
        half = _inputs(fs.float16, (5,))[0]
        got = []
        receiver = threading.Thread(target=lambda: got.extend(comms[1].recv(0, tag=t) for t in range(3)))
        receiver.start()
        for tag, x in enumerate((small, big, half)):
            comms[0].send(x, 1, tag=tag)
        receiver.join(20)
        for x, y in zip((small, big, half), got, strict=True):
            assert y.dtype == x.dtype and y.shape == x.shape and y.tobytes() == x.tobytes()
    finally:
        for c in comms:
            c.close()


# -------------------------------------------------------------------------------- checkpoint
def _mlp(dtype):
    fs.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))
    for p in m.parameters():  # (casting a model is the precision policy's, a later step)
        p._data = p.numpy().astype(dtype)
        p.init = None
    return m


@pytest.mark.parametrize("dtype", [fs.bfloat16, fs.float16], ids=lambda d: d.name)
def test_checkpoint_round_trip(dtype, tmp_path):
    model = _mlp(dtype)
    saved = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    fs.checkpoint.save(tmp_path, model, step=1)
    other = _mlp(dtype)
    for p in other.parameters():
        p._data = np.zeros(p.shape, dtype)
    fs.checkpoint.load(tmp_path, other)
    for k, v in other.state_dict().items():
        assert v.dtype == dtype and v.numpy().tobytes() == saved[k].tobytes(), k


# ---------------------------------------------------------------------------- global tensors
def test_global_bfloat16_boxing():
    (a,) = _inputs(fs.bfloat16, (6, 4))
    (w,) = _inputs(fs.bfloat16, (4, 3), seed=1)
    p = fs.placement("cpu", [0, 1])
    x = fs.tensor(a).to_global(p, S(0))
    assert x.dtype == fs.bfloat16 and x.to_global(p, B).numpy().tobytes() == a.tobytes()  # all-gather
    y = fs.tensor(a).to_global(p, S(1)) @ fs.tensor(w).to_global(p, S(0))  # a partial sum
    assert y.dtype == fs.bfloat16 and y.sbp == (P,)
    want = torch.tensor(a.astype(np.float32)).bfloat16() @ torch.tensor(w.astype(np.float32)).bfloat16()
    _close(y.to_global(p, B).numpy(), want, fs.bfloat16)  # all-reduce
    _close(y.to_global(p, S(0)).numpy(), want, fs.bfloat16)  # reduce-scatter


# ------------------------------------------------------------------------------ graph mode
class TrainStep(fs.Graph):
    def __init__(self, model, opt):
        super().__init__()
        self.model = model
        self.add_optimizer(opt)

    def build(self, x, y):
        loss = ((self.model(x) - y) ** 2).mean()
        loss.backward()
        return loss


def test_compiled_bfloat16_step_equals_eager():
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((8, 6)).astype(fs.bfloat16), rng.standard_normal((8, 3)).astype(fs.bfloat16))
               for _ in range(3)]
    runs = {}
    for mode in ("eager", "graph"):
        model = _mlp(fs.bfloat16)
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step = TrainStep(model, opt) if mode == "graph" else None
        losses = []
        for x, y in batches:
            x, y = fs.tensor(x), fs.tensor(y)
            if step is not None:
                loss = step(x, y)
            else:
                loss = ((model(x) - y) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            assert loss.dtype == fs.bfloat16
            losses.append(float(loss))
        runs[mode] = losses, {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
        assert all(p.dtype == fs.bfloat16 for p in model.parameters())
    np.testing.assert_allclose(runs["graph"][0], runs["eager"][0], rtol=1e-2)
    for k, v in runs["eager"][1].items():
        np.testing.assert_allclose(runs["graph"][1][k], v, rtol=1e-2, atol=1e-2, err_msg=k)


def test_kernels_keep_an_op_s_wider_result():
    """The float32 compute of 16-bit operands rounds back only what it computed in float32: an
    op declaring a float64 result (the squared norm of gradient clipping) keeps it."""
    from flowsys.ops import OPS

    g = np.full(1000, 0.1, dtype=fs.bfloat16)
    out = OPS["sum_squares"].kernel(np, g)
    assert np.asarray(out).dtype == np.float64
    assert float(out) == pytest.approx(1000 * float(g[0]) ** 2, rel=1e-6)

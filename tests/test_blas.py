"""The CPU's matrix products on MKL (flowsys.ops.blas): every layout BLAS reads without a copy,
single GEMMs and stacks, split over the pool or not, against NumPy; what it does not take falls
back to NumPy; a GPT step trains the same on either library. The tests that need MKL run where
``flowsys[mkl]`` is installed (the test extras install it on Linux x86-64)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import flowsys as fs
from flowsys.ops import OPS, blas, fused
from tests.helpers import TrainStep

needs_mkl = pytest.mark.skipif(not blas.available(), reason="MKL's runtime is not installed (pip install 'flowsys[mkl]')")


@pytest.fixture
def mkl():
    before = blas.use("mkl")
    try:
        yield
    finally:
        blas.use(before)


def _operands(rng, batch, m, k, n, ta, tb, dtype):
    a = rng.standard_normal(batch + ((k, m) if ta else (m, k))).astype(dtype)
    b = rng.standard_normal(batch + ((n, k) if tb else (k, n))).astype(dtype)
    return (a.swapaxes(-1, -2) if ta else a), (b.swapaxes(-1, -2) if tb else b)


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_every_transposition_and_stack_equals_numpy(mkl, dtype, batch):
    rng = np.random.default_rng(0)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for (m, k, n), ta, tb in itertools.product([(1, 1, 1), (1, 5, 1), (3, 1, 4), (7, 5, 3), (1, 8, 9), (9, 8, 1)],
                                               (0, 1), (0, 1)):
        a, b = _operands(rng, batch, m, k, n, ta, tb, dtype)
        got = blas.matmul(a, b)
        assert got is not None and got.dtype == dtype and got.flags.c_contiguous, (m, k, n, ta, tb)
        np.testing.assert_allclose(got, a @ b, rtol=rtol, atol=rtol, err_msg=str((m, k, n, ta, tb)))


@needs_mkl
@pytest.mark.parametrize("threads", [1, 2])
def test_products_split_over_the_pool_equal_numpy(mkl, threads, monkeypatch):
    """Large enough to be split: a GEMM by rows (more rows than columns) or by columns, a stack
    by matrices; each part writes its own block of the output."""
    monkeypatch.setattr(fused, "_threads", threads)
    rng = np.random.default_rng(1)
    for batch, (m, k, n) in [((), (600, 300, 200)), ((), (40, 500, 900)), ((48,), (64, 256, 64))]:
        for ta, tb in itertools.product((0, 1), (0, 1)):
            a, b = _operands(rng, batch, m, k, n, ta, tb, np.float32)
            np.testing.assert_allclose(blas.matmul(a, b), a @ b, rtol=1e-4, atol=1e-4)


@needs_mkl
def test_strided_heads_broadcast_stacks_and_out(mkl):
    """Attention's q, k, v are strided views of one projection: read in place. A batch axis of
    one broadcasts. ``out`` is written in place."""
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((2, 16, 3, 4, 8)).astype(np.float32)
    q, k = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in (0, 1))
    np.testing.assert_allclose(blas.matmul(q, k.swapaxes(-1, -2)), q @ k.swapaxes(-1, -2), rtol=1e-5, atol=1e-6)
    a, b = rng.standard_normal((4, 1, 5, 6)).astype(np.float32), rng.standard_normal((3, 6, 2)).astype(np.float32)
    np.testing.assert_allclose(blas.matmul(a, b), a @ b, rtol=1e-5, atol=1e-6)
    out = np.empty((5, 2), np.float32)
    assert blas.matmul(a[0, 0], b[0], out=out) is out
    np.testing.assert_allclose(out, a[0, 0] @ b[0], rtol=1e-5, atol=1e-6)


@needs_mkl
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_triangular_products_skip_the_zeros_and_equal_numpy(mkl, threads, dtype, monkeypatch):
    """``tri``: the left operand is zero above ("lower") or below ("upper") its diagonal, as causal
    attention's probabilities (and, transposed, in their gradients). Blocks of rows take only
    their triangle's columns; square, wide and tall matrices, stored as they are or transposed
    (a transposed view of the probabilities), one matrix or a stack split over the pool. Rows of
    an upper operand past its columns are zeros."""
    monkeypatch.setattr(fused, "_threads", threads)
    rng = np.random.default_rng(4)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for batch, (m, k, n) in [((32,), (128, 128, 64)), ((2, 3), (100, 70, 33)), ((), (70, 40, 8)), ((3,), (20, 90, 5)),
                             ((2,), (1, 1, 1))]:
        for tri, keep in (("lower", np.tril), ("upper", np.triu)):
            a = keep(rng.standard_normal(batch + (m, k))).astype(dtype)
            b = rng.standard_normal(batch + (k, n)).astype(dtype)
            transposed = np.ascontiguousarray(a.swapaxes(-1, -2)).swapaxes(-1, -2)
            for x in (a, transposed):
                np.testing.assert_allclose(blas.matmul(x, b, tri=tri), a @ b, rtol=rtol, atol=rtol)
    # through the op and its gradient (the transpose is triangular the other way)
    p = np.tril(rng.standard_normal((4, 64, 64))).astype(dtype)
    v = rng.standard_normal((4, 64, 16)).astype(dtype)
    np.testing.assert_allclose(OPS["matmul"].kernel(np, p, v, tri="lower"), p @ v, rtol=rtol, atol=rtol)
    pt, vt = fs.tensor(p, requires_grad=True), fs.tensor(v, requires_grad=True)
    from flowsys.tensor import apply
    (apply("matmul", pt, vt, tri="lower") * fs.tensor(v[..., :1])).sum().backward()
    g = np.broadcast_to(v[..., :1], (4, 64, 16))
    np.testing.assert_allclose(pt.grad.numpy(), g @ v.swapaxes(-1, -2), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(vt.grad.numpy(), p.swapaxes(-1, -2) @ g, rtol=rtol, atol=rtol)


def test_a_triangular_operand_is_never_split_along_its_matrix():
    """Its triangle is in global rows and columns: a shard of either (or a partial sum) is not
    triangular in its own coordinates, so only the batch axes and b's columns may split."""
    from flowsys.ops.registry import Spec
    from flowsys.sbp import PartialSum, Split
    specs = (Spec((2, 8, 8), np.float32), Spec((2, 8, 4), np.float32))
    plain = OPS["matmul"].sbp(specs, {})
    rows = OPS["matmul"].sbp(specs, {"tri": "lower"})
    assert {r.ins for r in rows} < {r.ins for r in plain}
    assert not [r for r in rows if r.ins[0] in (Split(1), Split(2)) or isinstance(r.ins[0], PartialSum)]
    assert [r for r in rows if r.ins[0] == Split(0)] and [r for r in rows if r.ins[1] == Split(2)]
    with pytest.raises(fs.errors.ShapeError, match="tri"):
        OPS["matmul"].infer(*specs, tri="diagonal")


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_sum_over_leading_axes_is_a_product_with_ones(mkl, dtype):
    """A bias's gradient (the output's gradient summed over its rows) runs as a row of ones times
    the rows on MKL; any other sum, and small ones, are NumPy's."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 128, 3, 64)).astype(dtype)
    exact = x.astype(np.float64)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for axis in [(0, 1), (1, 0), (-4, -3), 0, (0, 1, 2)]:
        got = OPS["sum"].kernel(np, x, axis=axis)
        assert got.dtype == dtype and got.shape == exact.sum(axis=axis).shape
        np.testing.assert_allclose(got, exact.sum(axis=axis), rtol=rtol, atol=rtol * 30)
    for axis, keep in [((1, 2), False), ((0, 1), True), (None, False)]:  # NumPy's
        np.testing.assert_allclose(OPS["sum"].kernel(np, x, axis=axis, keepdims=keep),
                                   exact.sum(axis=axis, keepdims=keep), rtol=rtol, atol=rtol * 30)
    assert blas.ones_row(5, dtype).shape == (1, 5)


def test_a_large_add_on_the_pool_equals_numpy():
    rng = np.random.default_rng(6)
    x, y = (rng.standard_normal((1024, 300)).astype(np.float32) for _ in range(2))
    np.testing.assert_array_equal(OPS["add"].kernel(np, x, y), x + y)
    np.testing.assert_array_equal(OPS["add"].kernel(np, x.T, y.T), x.T + y.T)  # strided: NumPy's


@needs_mkl
def test_what_blas_cannot_read_falls_back_to_numpy(mkl):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 8)).astype(np.float32)
    assert blas.matmul(x[::2, ::2], x[::2, ::2]) is None  # no unit stride
    assert blas.matmul(x, x.astype(np.float64)) is None  # mixed dtypes: NumPy's promotion
    assert blas.matmul(x.astype(np.int64), x.astype(np.int64)) is None
    assert blas.matmul(x[0], x) is None  # 1-D: NumPy's rules
    assert blas.matmul(np.ones((0, 3), np.float32), np.ones((3, 2), np.float32)) is None
    assert blas.matmul(x, x, out=np.empty((8, 8), np.float64)) is None
    # the op still gives NumPy's answer through its fallback
    np.testing.assert_allclose(OPS["matmul"].kernel(np, x[::2, ::2], x[::2, ::2]), x[::2, ::2] @ x[::2, ::2],
                               rtol=1e-6)


def test_numpy_backend_and_bad_names():
    before = blas.use("numpy")
    try:
        assert blas.backend() == "numpy"
        assert blas.matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32)) is None
        with pytest.raises(fs.ConfigError, match="'auto', 'numpy' or 'mkl'"):
            blas.use("openblas")
    finally:
        blas.use(before)


def test_asking_for_mkl_without_it_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(blas, "_load", lambda: None)
    before = blas.backend()
    with pytest.raises(fs.ConfigError, match=r"pip install 'flowsys\[mkl\]'"):
        blas.use("mkl")
    assert blas.backend() == before
    monkeypatch.setattr(blas, "_active", before)
    blas.use("auto")  # auto without MKL: NumPy, no error
    assert blas.backend() == "numpy"


def _train(backend: str, steps: int = 3):
    before = blas.use(backend)
    try:
        cfg = fs.models.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
        fs.manual_seed(0)
        model = fs.models.GPT(cfg)
        idx = fs.tensor(np.random.default_rng(0).integers(0, 64, (4, 16)))
        # SGD: an update linear in the gradient (AdamW turns the rounding noise of a gradient near
        # zero into a step of lr either way)
        step = TrainStep(model, fs.optim.SGD(model.parameters(), lr=0.1))
        losses = [float(step(idx, idx).numpy()) for _ in range(steps)]
        return losses, {k: v.numpy() for k, v in model.state_dict().items()}
    finally:
        blas.use(before)


@needs_mkl
def test_a_gpt_step_trains_the_same_on_mkl_and_numpy():
    ref_losses, ref_state = _train("numpy")
    losses, state = _train("mkl")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for k in ref_state:
        np.testing.assert_allclose(state[k], ref_state[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_a_large_concatenation_on_the_pool_equals_numpy():
    """Attention's q, k and v gradients: along an inner axis, the leading axis split over the pool."""
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((8, 128, 1, 256)).astype(np.float32) for _ in range(3)]
    for axis in (2, -2):
        np.testing.assert_array_equal(OPS["concatenate"].kernel(np, *xs, axis=axis), np.concatenate(xs, axis=axis))
    mixed = [xs[0], xs[1].astype(np.float64)]  # NumPy's promotion
    np.testing.assert_array_equal(OPS["concatenate"].kernel(np, *mixed, axis=2), np.concatenate(mixed, axis=2))
    with pytest.raises(ValueError):
        OPS["concatenate"].kernel(np, xs[0], xs[1][:4], axis=2)


@needs_mkl
@pytest.mark.parametrize("threads", [1, 2])
def test_a_linears_two_gradients_side_by_side_equal_numpy(mkl, threads, monkeypatch):
    """``linear_grads``: the input gradient on the calling thread, the weight gradient on a pool
    thread, each whole (``blas.matmul_pair``); with one thread, or where MKL does not take them,
    one after the other as linear_grad_input and linear_grad_weight compute them."""
    monkeypatch.setattr(fused, "_threads", threads)
    rng = np.random.default_rng(8)
    g, w, x = (rng.standard_normal(s).astype(np.float32) for s in ((4, 64, 96), (96, 48), (4, 64, 48)))
    gx, gw = OPS["linear_grads"].kernel(np, g, w, x)
    np.testing.assert_allclose(gx, g @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, np.einsum("bto,bti->oi", g, x), rtol=1e-4, atol=1e-4)
    assert gw.flags.owndata or gw.base.flags.owndata
    out = [np.empty((256, 48), np.float32), np.empty((96, 48), np.float32)]
    g2, x2 = g.reshape(256, 96), x.reshape(256, 48)
    assert blas.matmul_pair((g2, w, out[0]), (g2.T, x2, out[1])) is (threads == 2)
    if threads == 2:
        np.testing.assert_allclose(out[1], g2.T @ x2, rtol=1e-4, atol=1e-4)
    stack = rng.standard_normal((2, 8, 8)).astype(np.float32)
    assert blas.matmul_pair((stack, stack, np.empty_like(stack)), (g2.T, x2, out[1])) is False  # 2-D only

"""The fused float32 CPU kernels against their NumPy twins (the ops' reference expressions),
computed in float64, and against PyTorch; split over threads exactly as on one."""

import math

import numpy as np
import pytest
import torch

import flowsys as fs
from flowsys.ops import elementwise as E
from flowsys.ops import OPS, fused, fusion, scalar
from flowsys.ops import nn as N
from flowsys.ops.optim import _adamw_update

pytestmark = pytest.mark.skipif(not fused.ENABLED, reason="Numba is not importable or FLOWSYS_JIT=0")

RNG = np.random.default_rng(0)


def f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """Run each check on one thread and split over two (small parts, so splits happen)."""
    monkeypatch.setattr(fused, "_MIN_PER_THREAD", 64)
    monkeypatch.setattr(fused, "_threads", fused._threads)
    fused.set_threads(request.param)
    return request.param


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_grad_match_numpy_twin_and_torch(threads, approximate):
    x, g = f32(37, 129, scale=3.0), f32(37, 129)
    x[0, :4] = [0.0, -0.0, 40.0, -40.0]
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    y64 = E._gelu(np, x64, approximate)
    # GELU's kernels are generated from its scalar rules (flowsys.ops.fusion) on float32 NumPy arrays
    y = E.gelu(np, x, approximate=approximate)
    grad = E.gelu_grad(np, x, y, g, approximate=approximate)
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, E._gelu_grad(np, x64, y64, g64, approximate), rtol=1e-5, atol=2e-5)
    tx = torch.from_numpy(x64).requires_grad_()
    ty = torch.nn.functional.gelu(tx, approximate=approximate)
    (tg,) = torch.autograd.grad(ty, tx, torch.from_numpy(g64))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, tg.numpy(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_and_grad_equal_linear_bias_then_gelu(threads, approximate):
    """bias_gelu(z, b) = gelu(z + b), generated from its row rule; its gradient's dz and db (the
    column sum, over blocks of 32 rows in float32, then in float64) against float64 and PyTorch."""
    z, g, b = f32(3, 70, 129, scale=3.0), f32(3, 70, 129), f32(129)
    z64, g64, b64 = z.astype(np.float64), g.astype(np.float64), b.astype(np.float64)
    y = E.bias_gelu(np, z, b, approximate=approximate)
    dz, db = E.bias_gelu_grad(np, z, b, g, approximate=approximate)
    assert y.dtype == dz.dtype == db.dtype == np.float32 and db.shape == (129,)
    tz, tb = (torch.from_numpy(a).requires_grad_() for a in (z64, b64))
    ty = torch.nn.functional.gelu(tz + tb, approximate=approximate)
    ty.backward(torch.from_numpy(g64))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dz, tz.grad.numpy(), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-5, atol=1e-4)
    # the float64 kernels, and the xp expressions they replace (FLOWSYS_JIT=0)
    np.testing.assert_allclose(E.bias_gelu(np, z64, b64, approximate=approximate), ty.detach().numpy(), rtol=1e-10,
                               atol=1e-14)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(fused, "ENABLED", False)
    try:
        dz_x, db_x = E.bias_gelu_grad(np, z64, b64, g64, approximate=approximate)
    finally:
        monkey.undo()
    np.testing.assert_allclose(dz_x, tz.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db_x, tb.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_erf_is_accurate_odd_and_saturates():
    """The kernels' erf (a rational fit, no exp): within 5e-7 of erf on [-6, 6], odd, +-1 past
    4, NaN through."""
    x = np.concatenate([np.linspace(-6, 6, 120_001), [1e30, -1e30, np.inf, -np.inf, np.nan]]).astype(np.float32)
    out = np.empty_like(x)

    @fused.numba.njit(fastmath=fused._FLAGS)
    def erf(a, o):
        for i in range(a.size):
            o[i] = fused._erf(a[i])

    erf(x, out)
    ref = np.array([math.erf(v) for v in x[:120_001].astype(np.float64)])
    np.testing.assert_allclose(out[:120_001], ref, rtol=0, atol=5e-7)
    np.testing.assert_array_equal(out[:60_000], -out[120_000:60_000:-1])
    assert np.abs(out[:-1]).max() <= 1 and out[-5] == 1 and out[-4] == -1 and out[-3] == 1 and out[-2] == -1
    assert np.isnan(out[-1])


def test_exp_is_accurate_and_saturates_like_numpy():
    x = np.concatenate([np.linspace(-87, 88, 100_001), [-1e30, -100.0, 100.0, np.inf, -np.inf, np.nan]]).astype(np.float32)
    out = np.empty_like(x)

    @fused.numba.njit
    def exp(a, o):
        for i in range(a.size):
            o[i] = fused._exp(a[i])

    exp(x, out)
    ref = np.exp(x.astype(np.float64))
    finite = slice(0, 100_001)
    np.testing.assert_allclose(out[finite], ref[finite], rtol=5e-7)
    assert out[-6] == 0 and out[-5] == 0 and out[-4] == np.inf and out[-3] == np.inf and out[-2] == 0
    assert np.isnan(out[-1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tq,tk", [(16, 16), (5, 9), (9, 5)])
def test_softmax_rows_with_scale_and_causal_mask(threads, causal, tq, tk):
    s = f32(3, 2, tq, tk, scale=4.0)
    mask = np.triu(np.full((tq, tk), -np.inf), k=1) if causal else 0.0
    z = s.astype(np.float64) * 0.3 + mask
    ref = N.softmax(np, z)
    got = N.scaled_softmax(np, s, scale=0.3, causal=causal)  # generated from its row rule
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    inplace = s.copy()
    assert fusion.row_one("scaled_softmax", (inplace,), out=inplace, scale=0.3, causal=causal) is inplace
    np.testing.assert_allclose(inplace, ref, rtol=1e-6, atol=1e-7)
    st = torch.from_numpy(s.astype(np.float64))
    want = torch.nn.functional.scaled_dot_product_attention  # the same mask as PyTorch's
    eye = torch.eye(tk, dtype=torch.float64).expand(3, 2, tk, tk)
    q = st * 0.3  # scores = (q k^T) with k = I and scale 1: PyTorch's probabilities times the identity
    np.testing.assert_allclose(got, want(q, eye, eye, is_causal=causal, scale=1.0).numpy(), rtol=1e-5, atol=1e-6)


def _ln64(x, n_axes=1, eps=1e-5):
    """Layer norm in float64 NumPy: the reference for the generated kernels."""
    axes = tuple(range(x.ndim - n_axes, x.ndim))
    d = x - x.mean(axis=axes, keepdims=True)
    return d / np.sqrt((d * d).mean(axis=axes, keepdims=True) + eps)


def test_softmax_grad_logsumexp_and_cross_entropy_grad(threads):
    y = N.softmax(np, f32(6, 50, 33)).astype(np.float32)
    g = f32(6, 50, 33)
    y64, g64 = y.astype(np.float64), g.astype(np.float64)
    want = y64 * (g64 - (g64 * y64).sum(-1, keepdims=True))
    np.testing.assert_allclose(N.softmax_grad(np, y, g), want, rtol=1e-5, atol=1e-6)  # generated
    np.testing.assert_allclose(N.softmax_grad(np, y, g, scale=0.25), 0.25 * want, rtol=1e-5, atol=1e-6)
    # cross entropy and its gradient (generated: a target index per row), ignored rows included
    logits = f32(300, 517, scale=5.0)
    t = RNG.integers(0, 517, 300)
    t[[3, 77]] = -100
    scale = RNG.random(300).astype(np.float32)
    tl = torch.from_numpy(logits.astype(np.float64)).requires_grad_()
    loss = torch.nn.functional.cross_entropy(tl, torch.from_numpy(t), reduction="none", ignore_index=-100)
    loss.backward(torch.from_numpy(scale.astype(np.float64)))
    got = N.cross_entropy(np, logits, t, ignore_index=-100)
    assert got.dtype == np.float32 and got[3] == 0 and got[77] == 0
    np.testing.assert_allclose(got, loss.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(N.cross_entropy_grad(np, logits, t, scale, ignore_index=-100), tl.grad.numpy(),
                               rtol=1e-5, atol=1e-7)
    ref = N._ce_grad_block(np, logits.astype(np.float64), np.where(t < 0, 0, t), np.where(t < 0, 0, scale))
    np.testing.assert_allclose(N.cross_entropy_grad(np, logits, t, scale, ignore_index=-100), ref, rtol=1e-5, atol=1e-7)


def test_nan_propagates_through_row_kernels():
    x = f32(4, 10)
    x[1, 0] = np.nan  # key 0 is one every causal query sees
    for out in (N.softmax(np, x), N.scaled_softmax(np, x, causal=True), N.layer_norm(np, x, eps=1e-5)):
        assert np.isnan(out[1]).any()
        assert np.isfinite(np.delete(out, 1, axis=0)).all()
    ce = N.cross_entropy(np, x, np.zeros(4, np.int64))
    assert np.isnan(ce[1]) and np.isfinite(np.delete(ce, 1)).all()


@pytest.mark.parametrize("n", [1, 7, 256, 1000])
def test_layer_norm_and_grad(threads, n):
    x, g = f32(40, n, scale=2.0) + 3.0, f32(40, n)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    np.testing.assert_allclose(N.layer_norm(np, x, eps=1e-5), _ln64(x64), rtol=1e-4, atol=2e-5)  # generated
    y = _ln64(x64)
    rstd = 1 / np.sqrt(((x64 - x64.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True) + 1e-5)
    want = rstd * (g64 - g64.mean(-1, keepdims=True) - y * (g64 * y).mean(-1, keepdims=True))
    np.testing.assert_allclose(N.layer_norm_grad(np, x, g, eps=1e-5), want, rtol=1e-4, atol=5e-5)  # generated


@pytest.mark.parametrize("n", [1, 7, 256])
def test_layer_norm_affine_and_grad(threads, n):
    x, g, w, b = f32(40, n, scale=2.0) + 3.0, f32(40, n), f32(n), f32(n)
    x64, g64, w64, b64 = (a.astype(np.float64) for a in (x, g, w, b))
    np.testing.assert_allclose(N.layer_norm_affine(np, x, w, b, eps=1e-5), _ln64(x64) * w64 + b64,  # generated
                               rtol=1e-4, atol=5e-5)
    got = N.layer_norm_affine_grad(np, x, w, g, eps=1e-5)  # generated: dx per row, dw and db over rows
    fused_on = fused.ENABLED
    fused.ENABLED = False  # the reference: the NumPy expression, in float64
    try:
        want = N.layer_norm_affine_grad(np, x64, w64, g64, eps=1e-5)
    finally:
        fused.ENABLED = fused_on
    for a, e in zip(got, want):
        assert a.dtype == np.float32 and a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)
    tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x64, w64, b64))
    torch.nn.functional.layer_norm(tx, (n,), tw, tb, 1e-5).backward(torch.from_numpy(g64))
    for a, t in zip(got, (tx, tw, tb)):
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_adamw_matches_numpy_twin_and_torch(threads):
    """The generated AdamW kernel (flowsys.ops.scalar.adamw, updating in place) against the NumPy
    twin in float64 and against torch.optim.AdamW."""
    p, g = f32(1000, 3), f32(1000, 3)
    m, v = f32(1000, 3) * 0.1, np.abs(f32(1000, 3)) * 0.01
    ref = [a.astype(np.float64) for a in (p, g, m, v)]
    hyper = dict(decay=1 - 1e-3 * 0.1, beta1=0.9, beta2=0.95, c2=1 / math.sqrt(1 - 0.95 ** 3), eps=1e-8,
                 step=1e-3 / (1 - 0.9 ** 3))
    assert fusion.run_rule(scalar.adamw, (p, g, m, v, *(np.asarray(h, np.float32) for h in hyper.values())),
                           (p, m, v))
    _adamw_update(np, *ref, np.empty_like(ref[0]), hyper["decay"], hyper["beta1"], hyper["beta2"], hyper["c2"],
                  hyper["eps"], hyper["step"])
    for got, want in zip((p, m, v), (ref[0], ref[2], ref[3])):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=5e-7)
    assert not fusion.run_rule(scalar.adamw, (p, g, m, v), (p.T, m, v))  # not C-contiguous: the caller's NumPy path
    # the op, three steps, against PyTorch
    p0, grads = f32(40, 7), [f32(40, 7) for _ in range(3)]
    tp = torch.from_numpy(p0.copy()).requires_grad_()
    opt = torch.optim.AdamW([tp], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    state = [p0.copy(), np.zeros_like(p0), np.zeros_like(p0)]
    for t, gr in enumerate(grads, 1):
        tp.grad = torch.from_numpy(gr)
        opt.step()
        state = list(OPS["adamw_update"].kernel(np, state[0], gr, state[1], state[2], step=t, lr=1e-2, betas=(0.9, 0.95),
                                                eps=1e-8, weight_decay=0.1, inplace=True))
    np.testing.assert_allclose(state[0], tp.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state[1], opt.state[tp]["exp_avg"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state[2], opt.state[tp]["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-9)


def test_ops_give_the_same_results_with_and_without_the_kernels(monkeypatch):
    """A GPT step through the registered ops: fused kernels on, then the NumPy twins."""
    cfg = fs.models.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    idx = fs.tensor(RNG.integers(0, 64, (3, 16)))

    def run():
        fs.manual_seed(0)
        model = fs.models.GPT(cfg)
        opt = fs.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(3):
            _, loss = model(idx, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, model.state_dict()

    on_losses, on_state = run()
    monkeypatch.setattr(fused, "ENABLED", False)
    off_losses, off_state = run()
    np.testing.assert_allclose(on_losses, off_losses, rtol=2e-5)
    for k in on_state:
        # atol: the key bias has no gradient but rounding noise, which AdamW turns into ~1e-5 steps
        np.testing.assert_allclose(on_state[k].numpy(), off_state[k].numpy(), rtol=1e-3, atol=1e-4, err_msg=k)


def test_tune_malloc_keeps_large_arrays_memory_unless_told_not_to(monkeypatch):
    from flowsys.device import tune_malloc

    monkeypatch.setenv("FLOWSYS_MALLOC", "0")
    assert tune_malloc() is False
    monkeypatch.delenv("FLOWSYS_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own glibc setting wins
    assert tune_malloc() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert tune_malloc() is True

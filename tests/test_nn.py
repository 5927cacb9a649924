"""nn.Module bookkeeping and the layers, checked against torch.nn with the same weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flowsys as fs
from flowsys import nn
import flowsys.nn.functional as F


def to_torch(t: fs.Tensor) -> torch.Tensor:
    return torch.from_numpy(t.numpy().copy())


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.scale = nn.Parameter(fs.ones(4))
        self.register_buffer("running", fs.zeros(4))
        self.register_buffer("cache", fs.zeros(2), persistent=False)

    def forward(self, x):
        return self.fc(x) * self.scale


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Parameter(fs.zeros(2))
        self.inner = Inner()
        self.head = nn.Linear(4, 2, bias=False)
        self.plain = 3  # an ordinary attribute, not state

    def forward(self, x):
        return self.head(self.inner(x))


# ------------------------------------------------------------------------------ registration


def test_named_parameters_in_registration_order():
    m = Outer()
    assert [n for n, _ in m.named_parameters()] == [
        "first", "inner.scale", "inner.fc.weight", "inner.fc.bias", "head.weight"]
    assert [p.shape for p in m.parameters()] == [(2,), (4,), (4, 3), (4,), (2, 4)]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in m.parameters())
    assert m.plain == 3 and "plain" not in dict(m.named_parameters())


def test_parameters_assigned_in_init_order():
    """Parameters set directly on the module come before submodules' (torch's order)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.w = nn.Parameter(fs.zeros(1))

    assert [n for n, _ in M().named_parameters()] == ["w", "a.weight", "a.bias"]
    assert list(M().state_dict()) == ["w", "a.weight", "a.bias"]


def test_nested_modules_and_children():
    m = Outer()
    assert [n for n, _ in m.named_modules()] == ["", "inner", "inner.fc", "head"]
    assert [n for n, _ in m.named_children()] == ["inner", "head"]
    assert m.inner.fc.weight.shape == (4, 3)
    with pytest.raises(AttributeError):
        m.does_not_exist


def test_reassigning_replaces_and_deleting_removes():
    m = Outer()
    m.head = nn.Linear(4, 5)
    assert dict(m.named_parameters())["head.weight"].shape == (5, 4)
    assert "head.bias" in dict(m.named_parameters())
    m.head = None  # no longer a module: an ordinary attribute
    assert not any(n.startswith("head") for n, _ in m.named_parameters())
    del m.first
    assert "first" not in dict(m.named_parameters())


def test_buffers_persistent_and_not():
    m = Outer()
    assert [n for n, _ in m.named_buffers()] == ["inner.running", "inner.cache"]
    sd = m.state_dict()
    assert "inner.running" in sd and "inner.cache" not in sd
    assert not any(b is p for b in m.inner._buffers.values() for p in m.parameters())
    assert "inner.running" not in dict(m.named_parameters())


def test_assigning_a_tensor_to_a_buffer_updates_the_buffer():
    """As torch: ``self.running = new`` (running statistics) keeps it a saved buffer."""
    m = Inner()
    m.running = fs.full((4,), 3.0)
    assert list(m.state_dict()).count("running") == 1
    np.testing.assert_array_equal(m.state_dict()["running"].numpy(), np.full(4, 3.0))
    m.cache = fs.ones(2)
    assert "cache" not in m.state_dict() and [n for n, _ in m.named_buffers()] == ["running", "cache"]
    np.testing.assert_array_equal(m.cache.numpy(), np.ones(2))


def test_re_registering_a_buffer_as_persistent_saves_it():
    m = nn.Module()
    m.register_buffer("stat", fs.zeros(2), persistent=False)
    assert "stat" not in m.state_dict()
    m.register_buffer("stat", fs.ones(2))
    assert list(m.state_dict()) == ["stat"]


def test_module_before_super_init_is_an_error():
    class Bad(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(fs.zeros(1))

    with pytest.raises(AttributeError, match="super"):
        Bad()


def test_module_list_sequential_dict_indexing():
    layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    layers.append(nn.Linear(2, 5))
    assert len(layers) == 4 and layers[-1].out_features == 5 and layers[0] is list(layers)[0]
    assert [n for n, _ in layers.named_parameters()][:2] == ["0.weight", "0.bias"]
    assert "3.weight" in layers.state_dict()

    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert len(seq) == 3 and isinstance(seq[1], nn.ReLU) and seq[-1].out_features == 2
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = fs.randn(5, 3)
    want = seq[2](F.relu(seq[0](x)))
    np.testing.assert_array_equal(seq(x).numpy(), want.numpy())

    d = nn.ModuleDict({"enc": nn.Linear(2, 3), "dec": nn.Linear(3, 2)})
    assert "enc" in d and "other" not in d and len(d) == 2
    assert list(d.keys()) == ["enc", "dec"] and d["dec"].in_features == 3
    assert list(d.state_dict()) == ["enc.weight", "enc.bias", "dec.weight", "dec.bias"]


def test_shared_module_parameters_once_state_dict_under_each_name():
    """As torch: parameters() lists a shared module's once, state_dict() under every name."""
    shared = nn.Linear(2, 2)
    seq = nn.Sequential(shared, shared)
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias"]
    assert [n for n, _ in seq.named_modules()] == ["", "0"]
    tshared = torch.nn.Linear(2, 2)
    tseq = torch.nn.Sequential(tshared, tshared)
    assert list(seq.state_dict()) == list(tseq.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    seq.load_state_dict(tseq.state_dict())
    np.testing.assert_array_equal(shared.weight.numpy(), tshared.weight.detach().numpy())


# -------------------------------------------------------------------------------- modes


def test_train_eval_propagate_and_toggle_dropout():
    m = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Dropout(0.5)))
    assert all(sub.training for sub in m.modules())
    assert m.eval() is m
    assert not any(sub.training for sub in m.modules())
    x = fs.ones(64, 8)
    drop = m[1]
    np.testing.assert_array_equal(drop(x).numpy(), x.numpy())  # identity in eval
    m.train()
    assert all(sub.training for sub in m.modules())
    y = drop(x).numpy()
    assert set(np.unique(y)) <= {0.0, 2.0}  # dropped or scaled by 1/(1-p)
    assert 0.3 < (y == 0).mean() < 0.7
    m.train(False)
    assert not drop.training


def test_dropout_rejects_bad_p_and_p0_is_identity():
    with pytest.raises(ValueError):
        nn.Dropout(1.5)
    x = fs.randn(4, 4)
    np.testing.assert_array_equal(nn.Dropout(0.0)(x).numpy(), x.numpy())


def test_zero_grad_clears_every_parameter():
    m = Outer()
    m(fs.randn(2, 3)).sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if n != "first")
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_gradients_accumulate_until_zero_grad():
    lin = nn.Linear(3, 2)
    x = fs.randn(4, 3)
    lin(x).sum().backward()
    once = lin.weight.grad.numpy().copy()
    lin(x).sum().backward()
    np.testing.assert_allclose(lin.weight.grad.numpy(), 2 * once, rtol=1e-6)
    lin.zero_grad()
    lin(x).sum().backward()
    np.testing.assert_allclose(lin.weight.grad.numpy(), once, rtol=1e-6)


# ---------------------------------------------------------------------- layers vs torch


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(bias):
    fs.manual_seed(0)
    lin = nn.Linear(5, 7, bias=bias)
    ref = torch.nn.Linear(5, 7, bias=bias)
    ref.load_state_dict({k: to_torch(v) for k, v in lin.state_dict().items()})
    xn = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    x = fs.tensor(xn, requires_grad=True)
    xt = torch.from_numpy(xn).requires_grad_()
    y, yt = lin(x), ref(xt)
    assert y.shape == (2, 3, 7)
    np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    gn = np.random.default_rng(1).standard_normal((2, 3, 7)).astype(np.float32)
    y.backward(fs.tensor(gn))
    yt.backward(torch.from_numpy(gn))
    np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin.weight.grad.numpy(), ref.weight.grad.numpy(), rtol=1e-5, atol=1e-6)
    if bias:
        np.testing.assert_allclose(lin.bias.grad.numpy(), ref.bias.grad.numpy(), rtol=1e-5, atol=1e-6)
    else:
        assert lin.bias is None and list(lin.state_dict()) == ["weight"]


def test_linear_with_a_weight_of_several_out_axes_matches_torch():
    """F.linear with weight (3, 4, 5): outputs (..., 3, 4), as three projections stacked (GPT's q, k, v)."""
    rng = np.random.default_rng(0)
    xn, wn, bn, gn = (rng.standard_normal(s).astype(np.float32) for s in ((2, 6, 5), (3, 4, 5), (3, 4), (2, 6, 3, 4)))
    x, w, b = (fs.tensor(a, requires_grad=True) for a in (xn, wn, bn))
    xt, wt, bt = (torch.from_numpy(a).requires_grad_() for a in (xn, wn, bn))
    y = F.linear(x, w, b)
    yt = torch.einsum("btk,ock->btoc", xt, wt) + bt
    np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    y.backward(fs.tensor(gn))
    yt.backward(torch.from_numpy(gn))
    for mine, ref in ((x, xt), (w, wt), (b, bt)):
        np.testing.assert_allclose(mine.grad.numpy(), ref.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_linear_default_init_bounds():
    fs.manual_seed(1)
    lin = nn.Linear(64, 128)
    bound = 1 / math.sqrt(64)
    w, b = lin.weight.numpy(), lin.bias.numpy()
    assert w.dtype == np.float32 and w.shape == (128, 64) and b.shape == (128,)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(w).max() > 0.9 * bound  # uses the whole range
    assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform's std
    assert abs(w.mean()) < 0.01


def test_init_is_reproducible_under_manual_seed():
    fs.manual_seed(5)
    a = nn.Linear(4, 4).weight.numpy().copy()
    fs.manual_seed(5)
    b = nn.Linear(4, 4).weight.numpy().copy()
    c = nn.Linear(4, 4).weight.numpy().copy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(b, c)


def test_embedding_matches_torch():
    fs.manual_seed(0)
    emb = nn.Embedding(10, 4)
    assert emb.weight.shape == (10, 4)
    ref = torch.nn.Embedding(10, 4)
    ref.load_state_dict({k: to_torch(v) for k, v in emb.state_dict().items()})
    idx = np.array([[1, 3, 3], [0, 9, 1]], dtype=np.int64)
    y, yt = emb(fs.tensor(idx)), ref(torch.from_numpy(idx))
    assert y.shape == (2, 3, 4)
    np.testing.assert_array_equal(y.numpy(), yt.detach().numpy())
    gn = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    y.backward(fs.tensor(gn))
    yt.backward(torch.from_numpy(gn))
    # repeated indices accumulate, unused rows get zero
    np.testing.assert_allclose(emb.weight.grad.numpy(), ref.weight.grad.numpy(), rtol=1e-6, atol=1e-7)
    assert not emb.weight.grad.numpy()[2].any()


@pytest.mark.parametrize("shape,bias", [((6,), True), ((6,), False), ((3, 6), True)])
def test_layer_norm_matches_torch(shape, bias):
    ln = nn.LayerNorm(shape, bias=bias)
    rng = np.random.default_rng(0)
    ln.weight.copy_(rng.standard_normal(ln.weight.shape).astype(np.float32))
    if bias:
        ln.bias.copy_(rng.standard_normal(ln.bias.shape).astype(np.float32))
    ref = torch.nn.LayerNorm(shape, bias=bias)
    ref.load_state_dict({k: to_torch(v) for k, v in ln.state_dict().items()})
    xn = (3 + 2 * rng.standard_normal((4, 3, 6))).astype(np.float32)
    x = fs.tensor(xn, requires_grad=True)
    xt = torch.from_numpy(xn).requires_grad_()
    y, yt = ln(x), ref(xt)
    np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    gn = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(fs.tensor(gn))
    yt.backward(torch.from_numpy(gn))
    np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ln.weight.grad.numpy(), ref.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    if bias:
        np.testing.assert_allclose(ln.bias.grad.numpy(), ref.bias.grad.numpy(), rtol=1e-4, atol=1e-5)
    else:
        assert list(ln.state_dict()) == ["weight"]


def test_layer_norm_defaults():
    ln = nn.LayerNorm(5)
    assert ln.eps == 1e-5
    assert (ln.weight.numpy() == 1).all() and (ln.bias.numpy() == 0).all()
    y = ln(fs.randn(3, 5)).numpy()
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-3)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch(approximate):
    xn = np.linspace(-6, 6, 97, dtype=np.float32).reshape(1, 97)
    x = fs.tensor(xn, requires_grad=True)
    xt = torch.from_numpy(xn).requires_grad_()
    y = nn.GELU(approximate)(x)
    yt = torch.nn.GELU(approximate)(xt)
    assert y.shape == (1, 97)
    np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    yt.sum().backward()
    # atol: 1 - tanh² cancels in float32 in the far tails (both libraries are ~1e-6 off there)
    np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy(), rtol=1e-5, atol=5e-6)


def test_default_gelu_is_exact_erf():
    x = fs.tensor([1.0])
    exact = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert nn.GELU()(x).item() == pytest.approx(exact, rel=1e-6)
    assert nn.GELU("tanh")(x).item() != pytest.approx(exact, rel=1e-6)


# ------------------------------------------------------------------------------ state dict


def test_state_dict_shares_memory_and_round_trips():
    fs.manual_seed(0)
    a, b = Outer(), Outer()
    sd = a.state_dict()
    assert list(sd) == ["first", "inner.scale", "inner.running", "inner.fc.weight", "inner.fc.bias", "head.weight"]
    assert np.shares_memory(sd["head.weight"].numpy(), a.head.weight.numpy())
    a.inner.running.copy_(np.arange(4, dtype=np.float32))
    result = b.load_state_dict(a.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k].numpy(), v.numpy())
    x = fs.randn(2, 3)
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
    # a copy, not an alias: changing a afterwards leaves b alone
    a.head.weight.zero_()
    assert b.head.weight.numpy().any()


def test_load_state_dict_from_numpy_arrays():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict({k: v.numpy().astype(np.float64) for k, v in a.state_dict().items()})
    assert b.weight.dtype == np.float32
    np.testing.assert_array_equal(b.weight.numpy(), a.weight.numpy())


def test_load_state_dict_non_strict_reports_keys():
    m = nn.Linear(3, 2)
    w = np.full((2, 3), 7.0, np.float32)
    result = m.load_state_dict({"weight": w, "extra": np.zeros(1)}, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(m.weight.numpy(), w)


def test_load_state_dict_from_an_equivalent_torch_model():
    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 8)
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
            self.norm = torch.nn.LayerNorm(8)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8, bias=False) for _ in range(2)])

        def forward(self, idx):
            x = self.norm(self.body(self.emb(idx)))
            for blk in self.blocks:
                x = x + blk(x)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
            self.norm = nn.LayerNorm(8)
            self.blocks = nn.ModuleList([nn.Linear(8, 8, bias=False) for _ in range(2)])

        def forward(self, idx):
            x = self.norm(self.body(self.emb(idx)))
            for blk in self.blocks:
                x = x + blk(x)
            return x

    torch.manual_seed(0)
    ref = TorchNet()
    with torch.no_grad():
        ref.norm.weight.normal_()
        ref.norm.bias.normal_()
    net = Net()
    assert list(net.state_dict()) == list(ref.state_dict())
    net.load_state_dict(ref.state_dict())  # torch tensors, directly
    idx = np.array([[0, 5, 10], [3, 3, 7]], dtype=np.int64)
    np.testing.assert_allclose(net(fs.tensor(idx)).numpy(), ref(torch.from_numpy(idx)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)

"""Optimizers, gradient clipping and the LR schedule, step for step against torch.optim."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flowsys as fs
from flowsys import nn, optim

SHAPES = [(4, 3), (3,), (2, 2, 2)]


def twin_params(seed: int = 0):
    """The same starting values as flowsys Parameters and torch leaf tensors."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    return [nn.Parameter(a.copy()) for a in arrays], [torch.tensor(a, requires_grad=True) for a in arrays]


def set_grads(fparams, tparams, step: int):
    """A gradient that depends on the current value (so errors compound) plus per-step noise."""
    rng = np.random.default_rng(1000 + step)
    for fp, tp in zip(fparams, tparams):
        g = (0.5 * fp.numpy() + rng.standard_normal(fp.shape)).astype(np.float32)
        if step % 3 == 2:
            g *= 1e-3  # some small gradients too: Adam's normalisation must not blow them up differently
        fp.grad = fs.tensor(g)
        tp.grad = torch.from_numpy(g.copy())


def run_both(fopt, topt, fparams, tparams, steps: int = 10):
    for step in range(steps):
        set_grads(fparams, tparams, step)
        fopt.step()
        topt.step()
    return [p.numpy() for p in fparams], [p.detach().numpy() for p in tparams]


def assert_same(fvals, tvals, rtol, atol=1e-6):
    for f, t in zip(fvals, tvals):
        np.testing.assert_allclose(f, t, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------ SGD


@pytest.mark.parametrize("kw", [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, weight_decay=0.1),
    dict(lr=0.05, momentum=0.8, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
], ids=["plain", "momentum", "nesterov", "weight_decay", "dampening", "nesterov_wd"])
def test_sgd_matches_torch(kw):
    fparams, tparams = twin_params()
    start = [p.numpy().copy() for p in fparams]
    fvals, tvals = run_both(optim.SGD(fparams, **kw), torch.optim.SGD(tparams, **kw), fparams, tparams)
    assert_same(fvals, tvals, rtol=1e-5)
    assert not np.allclose(fvals[0], start[0])  # the parameters did move


def test_sgd_updates_in_place():
    fparams, _ = twin_params()
    arrays = [p._data for p in fparams]
    for p in fparams:
        p.grad = fs.ones_like(p)
    optim.SGD(fparams, lr=0.5).step()
    assert all(p._data is a for p, a in zip(fparams, arrays))


def test_sgd_skips_parameters_without_grad():
    fparams, _ = twin_params()
    before = [p.numpy().copy() for p in fparams]
    fparams[1].grad = fs.ones(SHAPES[1])
    optim.SGD(fparams, lr=1.0, momentum=0.9).step()
    np.testing.assert_array_equal(fparams[0].numpy(), before[0])
    np.testing.assert_allclose(fparams[1].numpy(), before[1] - 1.0)


def test_sgd_nesterov_needs_momentum():
    fparams, _ = twin_params()
    with pytest.raises(fs.ConfigError):
        optim.SGD(fparams, lr=0.1, nesterov=True)


# ---------------------------------------------------------------------------------- AdamW


@pytest.mark.parametrize("kw", [
    dict(lr=1e-2),
    dict(lr=1e-2, weight_decay=0.0),
    dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
], ids=["defaults", "no_decay", "custom"])
def test_adamw_matches_torch(kw):
    fparams, tparams = twin_params(1)
    fvals, tvals = run_both(optim.AdamW(fparams, **kw), torch.optim.AdamW(tparams, **kw), fparams, tparams)
    assert_same(fvals, tvals, rtol=1e-5, atol=1e-6)


def test_adamw_defaults_are_torchs():
    fparams, tparams = twin_params()
    fopt, topt = optim.AdamW(fparams), torch.optim.AdamW(tparams)
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert fopt.defaults[key] == topt.defaults[key], key


def test_adamw_param_groups_with_their_own_lr_and_weight_decay():
    fparams, tparams = twin_params(2)
    fgroups = [{"params": fparams[:1], "lr": 1e-2, "weight_decay": 0.2},
               {"params": fparams[1:], "weight_decay": 0.0}]
    tgroups = [{"params": tparams[:1], "lr": 1e-2, "weight_decay": 0.2},
               {"params": tparams[1:], "weight_decay": 0.0}]
    fopt = optim.AdamW(fgroups, lr=3e-3, betas=(0.9, 0.95))
    topt = torch.optim.AdamW(tgroups, lr=3e-3, betas=(0.9, 0.95))
    assert [g["lr"] for g in fopt.param_groups] == [1e-2, 3e-3]
    assert [g["weight_decay"] for g in fopt.param_groups] == [0.2, 0.0]
    fvals, tvals = run_both(fopt, topt, fparams, tparams)
    assert_same(fvals, tvals, rtol=1e-5, atol=1e-6)


def test_changing_a_groups_lr_between_steps_is_honoured():
    fparams, tparams = twin_params(3)
    fopt, topt = optim.AdamW(fparams, lr=1e-2), torch.optim.AdamW(tparams, lr=1e-2)
    for step in range(6):
        for g in (*fopt.param_groups, *topt.param_groups):
            g["lr"] = 1e-2 * (step + 1) / 6
        set_grads(fparams, tparams, step)
        fopt.step()
        topt.step()
    assert_same([p.numpy() for p in fparams], [p.detach().numpy() for p in tparams], rtol=1e-5)


def test_weight_decay_alone_shrinks_decoupled():
    """With a zero gradient AdamW only decays: p <- p (1 - lr wd); Adam's moments stay zero."""
    p = nn.Parameter(np.full(3, 2.0, np.float32))
    p.grad = fs.zeros(3)
    optim.AdamW([p], lr=0.1, weight_decay=0.5).step()
    np.testing.assert_allclose(p.numpy(), 2.0 * (1 - 0.05), rtol=1e-6)


def test_adamw_rejects_bad_betas():
    with pytest.raises(fs.ConfigError):
        optim.AdamW(twin_params()[0], betas=(1.0, 0.999))


# ------------------------------------------------------------------ the registered update ops


@pytest.mark.parametrize("make,kw", [
    (optim.SGD, dict(lr=0.05, maximize=True)),
    (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True)),
    (optim.AdamW, dict(lr=1e-2, weight_decay=0.1, maximize=True)),
], ids=["sgd", "sgd_nesterov_wd", "adamw"])
def test_maximize_matches_torch(make, kw):
    fparams, tparams = twin_params(7)
    fvals, tvals = run_both(make(fparams, **kw), getattr(torch.optim, make.__name__)(tparams, **kw), fparams, tparams)
    assert_same(fvals, tvals, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,kw", [
    (optim.SGD, dict(lr=0.05, momentum=0.9)),
    (optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.1)),
    (optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.95))),
], ids=["sgd_momentum", "sgd_dampening_wd", "adamw"])
def test_state_keeps_torchs_keys_and_values(make, kw):
    """Checkpoints store ``opt.state`` under torch's keys: the values are torch's after each step."""
    fparams, tparams = twin_params(8)
    fopt, topt = make(fparams, **kw), getattr(torch.optim, make.__name__)(tparams, **kw)
    for step in range(4):
        set_grads(fparams, tparams, step)
        fopt.step()
        topt.step()
        for fp, tp in zip(fparams, tparams):
            fstate, tstate = fopt.state[id(fp)], topt.state[tp]
            assert set(fstate) == set(tstate), (set(fstate), set(tstate))
            for key, want in tstate.items():
                want = want.numpy() if isinstance(want, torch.Tensor) else want
                np.testing.assert_allclose(np.asarray(fstate[key]), want, rtol=1e-5, atol=1e-7, err_msg=key)
    assert fopt.state[id(fparams[0])].get("step", 4) == 4


SGD_VARIANTS = [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
                dict(lr=0.05, momentum=0.7, dampening=0.5, maximize=True)]
ADAMW_VARIANTS = [dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, maximize=True)]


@pytest.mark.parametrize("name,kw", [("sgd_update", kw) for kw in SGD_VARIANTS]
                         + [("adamw_update", kw) for kw in ADAMW_VARIANTS])
def test_op_kernel_steps_as_torch_in_float64(name, kw):
    """The functional kernel, its outputs fed back as the next step's inputs, in float64 against
    torch.optim stepping float64 tensors: the rule itself, without float32 rounding."""
    rng = np.random.default_rng(9)
    p = rng.standard_normal((5, 4))
    tp = torch.tensor(p.copy(), requires_grad=True)
    topt = (torch.optim.SGD if name == "sgd_update" else torch.optim.AdamW)([tp], **kw)
    kernel = fs.ops.OPS[name].kernel
    state: tuple = ()
    for step in range(1, 7):
        g = rng.standard_normal(p.shape) + 0.5 * p
        tp.grad = torch.tensor(g)
        topt.step()
        if name == "adamw_update":
            state = state or (np.zeros_like(p), np.zeros_like(p))
            p, *state = kernel(np, p, g, *state, step=step, **kw)
        else:
            p, *state = kernel(np, p, g, *state, **kw)
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14, err_msg=f"step {step}")


@pytest.mark.parametrize("name,attrs", [("sgd_update", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
                                        ("adamw_update", dict(lr=0.1, step=3, weight_decay=0.1))])
@pytest.mark.parametrize("shape", [(7, 3), (40000,)], ids=["small", "blocked"])  # above chunked.BLOCK: slices
def test_op_in_place_equals_functional(name, attrs, shape):
    rng = np.random.default_rng(10)
    ins = [rng.standard_normal(shape).astype(np.float32) for _ in range(3 if name == "sgd_update" else 4)]
    ins[-1] = np.abs(ins[-1])  # a second moment is non-negative
    kernel = fs.ops.OPS[name].kernel
    want = kernel(np, *ins, **attrs)
    owned = [a.copy() for a in ins]
    got = kernel(np, *owned, **attrs, inplace=True)
    assert got[0] is owned[0] and all(o is a for o, a in zip(got[1:], owned[2:]))  # the new values in the inputs
    for w, o in zip(want, got):
        np.testing.assert_allclose(o, w, rtol=1e-6, atol=1e-7)


def test_an_update_of_a_mismatched_gradient_names_the_op_and_shapes():
    p = nn.Parameter(np.ones((2, 3), np.float32))
    p.grad = fs.ones(3, 2)
    with pytest.raises(fs.ShapeError, match=r"sgd_update: grad float32\[3, 2\] does not match param float32\[2, 3\]"):
        optim.SGD([p], lr=0.1).step()
    p.grad = fs.ones(2, 3, dtype=fs.float64)
    with pytest.raises(fs.DTypeError, match="adamw_update: grad float64"):
        optim.AdamW([p]).step()


def test_sgd_update_refuses_a_momentum_buffer_without_momentum():
    a = np.ones(3, np.float32)
    with pytest.raises(fs.FlowsysError, match="momentum buffer"):
        fs.ops.OPS["sgd_update"].infer(*(fs.ops.Spec(a.shape, a.dtype),) * 3, lr=0.1)


class _LinearStep(fs.Graph):
    def __init__(self, model, opt, executor):
        super().__init__()
        self.model = model
        self.add_optimizer(opt)
        self.config.executor = executor

    def build(self, x, y):
        loss = ((self.model(x) - y) ** 2).mean()
        loss.backward()
        return loss


@pytest.mark.parametrize("executor", ["global", "plans"])
@pytest.mark.parametrize("make,kw", [
    (optim.SGD, dict(lr=0.1)),
    (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
], ids=["sgd", "sgd_nesterov", "adamw"])
def test_graph_mode_updates_are_the_registered_ops_and_match_torch(make, kw, executor):
    """A compiled step names its update nodes by the registered op, budgets its state by it, and
    steps (on the driver, or in the workers) as torch.optim does."""
    fs.manual_seed(0)
    model = nn.Linear(4, 3)
    tmodel = torch.nn.Linear(4, 3)
    with torch.no_grad():
        tmodel.weight.copy_(torch.from_numpy(model.weight.numpy()))
        tmodel.bias.copy_(torch.from_numpy(model.bias.numpy()))
    step = _LinearStep(model, make(model.parameters(), **kw), executor)
    topt = getattr(torch.optim, make.__name__)(tmodel.parameters(), **kw)
    rng = np.random.default_rng(11)
    for _ in range(4):
        x, y = (rng.standard_normal((8, n)).astype(np.float32) for n in (4, 3))
        loss = step(fs.tensor(x), fs.tensor(y))
        topt.zero_grad()
        tloss = ((tmodel(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean()
        tloss.backward()
        topt.step()
        assert float(loss.numpy()) == pytest.approx(tloss.item(), rel=1e-5)
    np.testing.assert_allclose(model.weight.numpy(), tmodel.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bias.numpy(), tmodel.bias.detach().numpy(), rtol=1e-5, atol=1e-6)
    updates = [n for n in step.ir.nodes if n.kind == "update"]
    assert {n.op for n in updates} == {make.update_op} and len(updates) == 2
    arrays = 2 if make is optim.AdamW else int(bool(kw.get("momentum")))
    (rp,) = step.plan().ranks
    assert rp.memory.optimizer_state == arrays * rp.memory.parameters


# ------------------------------------------------------------------------------ zero_grad


def test_zero_grad_sets_to_none_or_zeros():
    fparams, _ = twin_params()
    opt = optim.SGD(fparams, lr=0.1)
    for p in fparams:
        p.grad = fs.ones_like(p)
    grads = [p.grad for p in fparams]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.numpy().any() for p, g in zip(fparams, grads))
    opt.zero_grad()
    assert all(p.grad is None for p in fparams)


def test_zero_grad_then_backward_starts_fresh():
    lin = nn.Linear(3, 1)
    opt = optim.SGD(lin.parameters(), lr=0.1)
    x = fs.randn(2, 3)
    lin(x).sum().backward()
    first = lin.weight.grad.numpy().copy()
    opt.zero_grad()
    lin(x).sum().backward()
    np.testing.assert_allclose(lin.weight.grad.numpy(), first)


# ------------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    fparams, tparams = twin_params(4)
    set_grads(fparams, tparams, 0)
    before = [p.grad.numpy().copy() for p in fparams]
    ftotal = optim.clip_grad_norm_(fparams, max_norm)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, max_norm)
    want = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in before))
    assert ftotal == pytest.approx(float(ttotal), rel=1e-6) == pytest.approx(want, rel=1e-6)
    for fp, tp in zip(fparams, tparams):
        np.testing.assert_allclose(fp.grad.numpy(), tp.grad.numpy(), rtol=1e-6, atol=1e-8)
    after = math.sqrt(sum(float((p.grad.numpy().astype(np.float64) ** 2).sum()) for p in fparams))
    if max_norm < want:
        assert after == pytest.approx(max_norm, rel=1e-5)
    else:
        for fp, g in zip(fparams, before):
            np.testing.assert_array_equal(fp.grad.numpy(), g)  # untouched below the limit


def test_clip_grad_norm_ignores_parameters_without_grad_and_takes_generators():
    fparams, tparams = twin_params(5)
    set_grads(fparams, tparams, 1)
    fparams[0].grad, tparams[0].grad = None, None
    ftotal = optim.clip_grad_norm_((p for p in fparams), 1.0)
    ttotal = torch.nn.utils.clip_grad_norm_((p for p in tparams), 1.0)
    assert ftotal == pytest.approx(float(ttotal), rel=1e-6)
    assert fparams[0].grad is None
    np.testing.assert_allclose(fparams[2].grad.numpy(), tparams[2].grad.numpy(), rtol=1e-6)


def test_clip_grad_norm_of_a_single_tensor():
    fparams, tparams = twin_params(6)
    set_grads(fparams, tparams, 0)
    ftotal = optim.clip_grad_norm_(fparams[0], 0.1)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams[0], 0.1)
    assert ftotal == pytest.approx(float(ttotal), rel=1e-6)
    np.testing.assert_allclose(fparams[0].grad.numpy(), tparams[0].grad.numpy(), rtol=1e-6)


# --------------------------------------------------------------------------------- schedule


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's ``train.py: get_lr``, verbatim but for the arguments."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("warmup,total,min_lr", [(10, 100, 6e-5), (0, 20, 0.0), (3, 4, 1e-4), (1, 7, 1e-5)])
def test_warmup_cosine_is_nanogpts_get_lr(warmup, total, min_lr):
    base = 6e-4
    for it in range(total + 5):
        got = optim.warmup_cosine(it, base_lr=base, warmup_steps=warmup, total_steps=total, min_lr=min_lr)
        assert got == pytest.approx(nanogpt_get_lr(it, base, warmup, total, min_lr), rel=1e-12, abs=1e-15), it


def test_warmup_cosine_without_a_decay_phase():
    """warmup_steps == total_steps (nanoGPT divides by zero there): warmup, then min_lr."""
    lrs = [optim.warmup_cosine(i, base_lr=1.0, warmup_steps=4, total_steps=4, min_lr=0.1) for i in range(7)]
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.1, 0.1, 0.1])


def test_warmup_cosine_shape():
    kw = dict(base_lr=1.0, warmup_steps=4, total_steps=24, min_lr=0.1)
    lrs = [optim.warmup_cosine(i, **kw) for i in range(30)]
    warm = lrs[:4]
    np.testing.assert_allclose(np.diff(warm), warm[0])  # linear
    assert lrs[4] == 1.0  # peak right after warmup
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then never increases
    assert lrs[14] == pytest.approx(0.55)  # halfway through the decay: the midpoint
    assert lrs[24:] == [0.1] * 6  # min_lr at the end and after


def test_warmup_cosine_scheduler_drives_every_group():
    fparams, _ = twin_params()
    opt = optim.AdamW([{"params": fparams[:1], "lr": 1.0}, {"params": fparams[1:], "lr": 0.5}], lr=0.1)
    sched = optim.WarmupCosine(opt, warmup_steps=3, total_steps=12, min_lr=0.01)
    seen = [sched.get_last_lr()]
    for _ in range(14):
        sched.step()
        seen.append(sched.get_last_lr())
    for it, (a, b) in enumerate(seen):
        assert a == pytest.approx(nanogpt_get_lr(it, 1.0, 3, 12, 0.01))
        assert b == pytest.approx(nanogpt_get_lr(it, 0.5, 3, 12, 0.01))
    assert [g["lr"] for g in opt.param_groups] == seen[-1] == [0.01, 0.01]


def test_warmup_cosine_rejects_negative_steps():
    opt = optim.SGD(twin_params()[0], lr=0.1)
    with pytest.raises(fs.ConfigError, match="-1"):
        optim.WarmupCosine(opt, warmup_steps=-1, total_steps=5)
    with pytest.raises(fs.ConfigError, match="-2"):
        optim.WarmupCosine(opt, warmup_steps=0, total_steps=-2)


def test_warmup_longer_than_the_run_warms_up_then_holds_min_lr():
    """A short (debug) run: total_steps < warmup_steps is allowed; past total_steps it is min_lr."""
    opt = optim.SGD(twin_params()[0], lr=1.0)
    sched = optim.WarmupCosine(opt, warmup_steps=10, total_steps=3, min_lr=0.05)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(12):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[:10] == pytest.approx([(i + 1) / 11 for i in range(10)])
    assert lrs[10:] == [0.05] * 3


# ------------------------------------------------------------------------------- config


def test_unknown_group_option_raises_config_error():
    fparams, _ = twin_params()
    with pytest.raises(fs.ConfigError, match="momentun"):
        optim.SGD([{"params": fparams, "momentun": 0.9}], lr=0.1)
    with pytest.raises(fs.ConfigError, match="beta1"):
        optim.AdamW([{"params": fparams[:1]}, {"params": fparams[1:], "beta1": 0.9}])


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1), lambda ps: optim.AdamW(ps)], ids=["SGD", "AdamW"])
def test_empty_parameter_list_raises(make):
    with pytest.raises(fs.ConfigError) as e:
        make([])
    assert isinstance(e.value, fs.FlowsysError) and "empty" in str(e.value)
    with pytest.raises(fs.ConfigError):
        make(iter([]))

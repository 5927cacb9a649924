"""Check flowsys ops against NumPy, PyTorch and finite differences (in the spirit of tinygrad's
``helper_test_op``).

>>> check_op(lambda x, y: x @ y, [(3, 4), (4, 5)], np.matmul, torch.matmul)   # doctest: +SKIP

builds random inputs of those shapes, runs the flowsys function, compares its forward with the
NumPy and the PyTorch reference (values, shapes and dtypes), then pulls a random weighting of the
outputs back through flowsys and through torch autograd and compares the gradients.
:func:`check_grad_fd` checks flowsys' own gradients in float64 against central differences.

An entry of ``shapes`` is one of
- a shape: a float32 input uniform in [-2, 2] that gets a gradient;
- an :class:`Arg`: another dtype (integers and bools never get a gradient), a domain (``low=0.1``
  for log), values kept apart (``distinct=True``: no ties, no kinks, for max/relu/maximum) or
  ``grad=False``;
- an array: used as is (indices, masks); float arrays get a gradient unless wrapped in an Arg.
"""

from __future__ import annotations

import itertools

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from flowsys.global_tensor import GlobalValue
from flowsys.layout import as_slices, shard_box
from flowsys.sbp import PartialSum, broadcast, split
import torch

import flowsys as fs

torch.set_num_threads(1)  # small ops: threads only add noise to the timings


@dataclass(frozen=True)
class Arg:
    """How to build one input: ``shape`` or a fixed ``value``, its dtype and domain."""

    shape: tuple[int, ...] = ()
    dtype: Any = np.float32
    low: float = -2.0
    high: float = 2.0
    grad: bool | None = None  # None: floats get a gradient, integers and bools do not
    distinct: bool = False  # values at least (high - low) / (2 * size) apart, in random order
    value: Any = None  # a fixed array instead of random values


def _arg(spec) -> Arg:
    if isinstance(spec, Arg):
        return spec
    if isinstance(spec, (np.ndarray, np.generic)):
        return Arg(value=np.asarray(spec))
    return Arg(shape=tuple(int(d) for d in spec))


def make_inputs(shapes: Sequence, rng: np.random.Generator, dtype=None) -> tuple[list[np.ndarray], list[bool]]:
    """The arrays described by ``shapes`` and whether each gets a gradient. ``dtype`` overrides
    the dtype of every floating-point input (``check_grad_fd`` uses float64)."""
    arrays, needs = [], []
    for spec in map(_arg, shapes):
        if spec.value is not None:
            a = np.array(spec.value)
            if dtype is not None and a.dtype.kind == "f":
                a = a.astype(dtype)
        else:
            dt = np.dtype(spec.dtype if dtype is None or np.dtype(spec.dtype).kind != "f" else dtype)
            n = math.prod(spec.shape)
            if dt == np.bool_:
                a = rng.random(spec.shape) < 0.5
            elif dt.kind in "iu":
                a = rng.integers(int(spec.low), int(spec.high), size=spec.shape, endpoint=True).astype(dt)
            elif spec.distinct:
                # A shuffled grid, jittered by less than a quarter step: ties and kinks (0 for relu)
                # stay far away compared with a finite-difference step.
                step = (spec.high - spec.low) / max(n, 1)
                grid = spec.low + step * (np.arange(n) + 0.37 + rng.uniform(-0.2, 0.2, n))
                a = rng.permutation(grid).reshape(spec.shape).astype(dt)
            else:
                a = rng.uniform(spec.low, spec.high, spec.shape).astype(dt)
        arrays.append(a)
        needs.append(a.dtype.kind == "f" if spec.grad is None else bool(spec.grad))
    return arrays, needs


def _as_list(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _torch_dtype_to_numpy(dt: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dt).numpy().dtype


def _compare(name: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    if want.dtype.kind in "fc" or got.dtype.kind in "fc":
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol,
                                   equal_nan=True, err_msg=name)
    else:
        np.testing.assert_array_equal(got, want, err_msg=name)


def check_op(
    fs_fn: Callable[..., Any],
    shapes: Sequence,
    np_ref: Callable[..., Any] | None = None,
    torch_ref: Callable[..., Any] | None = None,
    *,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    grad_rtol: float | None = None,
    grad_atol: float | None = None,
    check_dtype: bool | str = True,
    grad: bool = True,
) -> list[fs.Tensor]:
    """Run ``fs_fn`` on random inputs and compare it with ``np_ref`` and ``torch_ref``.

    Forward outputs (a tensor or a list/tuple of them) must match both references in shape and
    value, and in dtype (``check_dtype``: True for both references, ``"numpy"`` or ``"torch"`` for
    one, False for none). With ``grad``, the gradients of ``sum(w * out)`` for random ``w`` must
    match torch autograd's for every input that gets one. Returns flowsys' outputs.
    """
    assert np_ref is not None or torch_ref is not None, "check_op needs a reference"
    rng = np.random.default_rng(seed)
    arrays, needs = make_inputs(shapes, rng)
    grad_rtol = rtol if grad_rtol is None else grad_rtol
    grad_atol = atol if grad_atol is None else grad_atol

    xs = [fs.tensor(a, requires_grad=n) for a, n in zip(arrays, needs)]
    outs = _as_list(fs_fn(*xs))
    got = [o.numpy() for o in outs]
    for x, a in zip(xs, arrays):  # the op must not write into its inputs
        np.testing.assert_array_equal(x.numpy(), a, err_msg="flowsys op modified its input")

    if np_ref is not None:
        want = [np.asarray(w) for w in _as_list(np_ref(*[a.copy() for a in arrays]))]
        assert len(got) == len(want), f"{len(got)} outputs, numpy gives {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(f"forward output {i} vs numpy", g, w, rtol, atol)
            if check_dtype in (True, "numpy"):
                assert g.dtype == w.dtype, f"output {i}: dtype {g.dtype}, numpy gives {w.dtype}"

    if torch_ref is None:
        return outs
    ts = [torch.tensor(a, requires_grad=n) for a, n in zip(arrays, needs)]
    touts = _as_list(torch_ref(*ts))
    assert len(got) == len(touts), f"{len(got)} outputs, torch gives {len(touts)}"
    for i, (g, t) in enumerate(zip(got, touts)):
        _compare(f"forward output {i} vs torch", g, t.detach().numpy(), rtol, atol)
        if check_dtype in (True, "torch"):
            assert g.dtype == _torch_dtype_to_numpy(t.dtype), f"output {i}: dtype {g.dtype}, torch gives {t.dtype}"

    if not (grad and any(needs)):
        return outs
    pairs = [(o, t) for o, t in zip(outs, touts) if t.requires_grad]
    for o, t in pairs:
        assert o.requires_grad, f"flowsys output of shape {o.shape} does not require grad, torch's does"
    if not pairs:
        return outs
    weights = [rng.uniform(-1.0, 1.0, o.shape).astype(o.dtype) for o, _ in pairs]
    if len(pairs) == 1:
        pairs[0][0].backward(gradient=fs.tensor(weights[0]))
    else:
        sum(((o * fs.tensor(w)).sum() for (o, _), w in zip(pairs, weights)), fs.tensor(0.0)).backward()
    torch.autograd.backward([t for _, t in pairs], [torch.tensor(w) for w in weights])
    for i, (x, t) in enumerate(zip(xs, ts)):
        if not needs[i]:
            continue
        want = t.grad.numpy() if t.grad is not None else np.zeros(t.shape, arrays[i].dtype)
        assert x.grad is not None or not want.any(), f"input {i}: flowsys gave no gradient, torch's is nonzero"
        g = x.grad.numpy() if x.grad is not None else np.zeros_like(want)
        assert g.dtype == arrays[i].dtype, f"input {i}: gradient dtype {g.dtype}, input is {arrays[i].dtype}"
        _compare(f"gradient of input {i} vs torch", g, want, grad_rtol, grad_atol)
    return outs


def check_grad_fd(
    fs_fn: Callable[..., Any],
    shapes: Sequence,
    *,
    seed: int = 0,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> None:
    """Check flowsys' float64 gradients of ``sum(w * fs_fn(*inputs))`` against central differences.

    Every floating-point input is made float64; each element of an input that gets a gradient is
    nudged by ``eps`` both ways (so keep the inputs to a few dozen elements).
    """
    rng = np.random.default_rng(seed)
    arrays, needs = make_inputs(shapes, rng, dtype=np.float64)
    assert any(needs), "check_grad_fd needs an input that gets a gradient"
    xs = [fs.tensor(a, requires_grad=n) for a, n in zip(arrays, needs)]
    outs = [o for o in _as_list(fs_fn(*xs)) if o.dtype.kind == "f"]
    for o in outs:
        assert o.dtype == np.float64, f"float64 inputs gave a {o.dtype} output"
    weights = [rng.uniform(-1.0, 1.0, o.shape) for o in outs]
    sum(((o * fs.tensor(w)).sum() for o, w in zip(outs, weights)), fs.tensor(0.0, dtype=np.float64)).backward()

    def f(args) -> float:
        with fs.no_grad():
            res = [o.numpy() for o in _as_list(fs_fn(*[fs.tensor(a) for a in args])) if o.dtype.kind == "f"]
        return float(sum(np.sum(w * r) for w, r in zip(weights, res)))

    nonzero = False
    for i, (x, a) in enumerate(zip(xs, arrays)):
        if not needs[i]:
            continue
        numeric = np.zeros(a.shape)
        args = [b.copy() for b in arrays]
        for j in np.ndindex(a.shape):
            args[i][j] = a[j] + eps
            up = f(args)
            args[i][j] = a[j] - eps
            down = f(args)
            args[i][j] = a[j]
            numeric[j] = (up - down) / (2 * eps)
        analytic = x.grad.numpy() if x.grad is not None else np.zeros(a.shape)
        assert analytic.dtype == np.float64
        np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i} vs central differences")
        nonzero = nonzero or bool(np.abs(numeric).max(initial=0.0) > 1e-6)
    assert nonzero, "every gradient is zero: the check would pass for any rule; change the inputs"


def laid_out(a: np.ndarray, nd, placement, rng=0) -> GlobalValue:
    """``a`` laid out as ``nd`` on ``placement``; along P mesh axes the shards hold random addends
    of the value (one per combination of P-axis coordinates, equal across B replicas).
    ``rng`` is a generator or a seed."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    p_axes = [k for k, v in enumerate(nd) if isinstance(v, PartialSum)]
    combos = list(itertools.product(*(range(placement.mesh[k]) for k in p_axes)))
    terms = {}
    for c in combos[:-1]:
        noise = rng.standard_normal(a.shape) if a.dtype.kind == "f" else rng.integers(-5, 5, a.shape)
        terms[c] = noise.astype(a.dtype)
    terms[combos[-1]] = a - sum(terms.values()) if terms else a.copy()
    shards = []
    for rank in placement.ranks:
        coords = placement.coords(rank)
        term = terms[tuple(coords[k] for k in p_axes)]
        shards.append(term[as_slices(shard_box(a.shape, nd, placement.mesh, coords))].copy())
    return GlobalValue(placement, nd, a.shape, a.dtype, shards)


class SumStep(fs.Graph):
    """A one-input training step on per-rank plans: ``model(x).sum()`` as the loss, SGD at
    ``lr`` (the cost-model tests' data-parallel step)."""

    def __init__(self, model, lr: float = 0.0):
        super().__init__()
        self.model = model
        self.add_optimizer(fs.optim.SGD(model.parameters(), lr=lr))
        self.config.executor = "plans"

    def build(self, x):
        loss = self.model(x).sum()
        loss.backward()
        return loss


class TrainStep(fs.Graph):
    """The graph-mode training step every test writes the same way: ``model(idx, targets)``
    returns ``(logits, loss)``; backward; the optimizer's update."""

    def __init__(self, model, opt, accumulation: int = 1, executor: str = "auto"):
        super().__init__()
        self.model = model
        self.add_optimizer(opt)
        self.config.gradient_accumulation_steps = accumulation
        self.config.executor = executor

    def build(self, idx, targets):
        _, loss = self.model(idx, targets)
        loss.backward()
        return loss


def one_device_reference(cfg, idx: np.ndarray, tgt: np.ndarray) -> tuple[dict, float, dict]:
    """A GPT of ``cfg`` seeded 0 on one device, eager: its state dict before the step, the loss
    on (``idx``, ``tgt``) and every parameter's gradient (what a laid-out run must reproduce)."""
    from flowsys.models import GPT

    fs.manual_seed(0)
    model = GPT(cfg)
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    _, loss = model(fs.tensor(idx), fs.tensor(tgt))
    loss.backward()
    return before, loss.item(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


def one_sgd_step(model, placement, dp_axis, idx: np.ndarray, tgt: np.ndarray) -> tuple[TrainStep, float]:
    """One compiled step of ``model`` with SGD at lr 1 (each update is minus the gradient), the
    batch split along mesh axis ``dp_axis`` (None: whole on every rank): the step and its loss."""
    step = TrainStep(model, fs.optim.SGD(model.parameters(), lr=1.0))
    batch = tuple(split(0) if k == dp_axis else broadcast for k in range(placement.ndim))
    loss = step(fs.tensor(idx).to_global(placement, batch), fs.tensor(tgt).to_global(placement, batch))
    return step, loss.item()

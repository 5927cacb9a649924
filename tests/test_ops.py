"""Numerics of every public op: forward against NumPy and PyTorch, gradients against torch
autograd (float32) and against central finite differences (float64)."""

from __future__ import annotations

import operator

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import flowsys as fs
import flowsys.nn.functional as F
from flowsys.ops import OPS, Spec
from helpers import Arg, check_grad_fd, check_op

HYP = settings(max_examples=20, deadline=None)
SEEDS = st.integers(0, 2**32 - 1)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4)


def broadcastable(n: int, min_dims: int = 0, max_dims: int = 4):
    return hnp.mutually_broadcastable_shapes(num_shapes=n, min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=4)


@st.composite
def shape_and_axis(draw, min_dims=1, max_dims=4):
    """A shape and an ``axis=`` for it: None, an int (maybe negative) or a tuple in any order."""
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=4))
    nd = len(shape)
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        return shape, None
    if kind == "int":
        return shape, draw(st.integers(-nd, nd - 1))
    axes = draw(st.lists(st.integers(0, nd - 1), unique=True, min_size=1, max_size=nd))
    return shape, tuple(a - nd if draw(st.booleans()) else a for a in axes)


def _dims(axis, ndim):
    """flowsys/NumPy ``axis`` as torch's ``dim`` (torch reads dim=() as 'all axes')."""
    return tuple(range(ndim)) if axis is None else axis


def _torch_getitem(t, index):
    """``t[index]`` in torch, which has no negative slice steps: those axes are flipped first
    (such slices must come before any None or Ellipsis, so their position is their axis)."""
    items = list(index) if isinstance(index, tuple) else [index]
    for axis, item in enumerate(items):
        if isinstance(item, slice) and item.step is not None and item.step < 0:
            assert all(i is not None and i is not Ellipsis for i in items[:axis])
            n = t.shape[axis]
            picked = np.arange(n)[item]
            t = t.flip(axis)
            items[axis] = slice(n - 1 - picked[0], n - picked[-1], -item.step) if picked.size else slice(0, 0)
    conv = tuple(torch.from_numpy(np.asarray(i)) if isinstance(i, (list, np.ndarray)) else i for i in items)
    return t[conv if isinstance(index, tuple) else conv[0]]


# ------------------------------------------------------------------------------------ matmul

MATMUL_SHAPES = [
    [(4,), (4,)], [(3, 4), (4,)], [(4,), (4, 5)], [(3, 4), (4, 5)], [(2, 3, 4), (4, 5)],
    [(2, 3, 4), (2, 4, 5)], [(2, 1, 3, 4), (5, 4, 2)], [(4,), (2, 4, 5)], [(2, 3, 4), (4,)],
    [(3, 4), (2, 4, 5)], [(1, 3, 4), (2, 1, 4, 5)],
]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
@pytest.mark.parametrize("fn", [fs.matmul, operator.matmul], ids=["fs.matmul", "@"])
def test_matmul(fn, shapes):
    check_op(fn, shapes, np.matmul, torch.matmul)


@HYP
@given(batch=broadcastable(2, max_dims=3), mkn=st.tuples(*[st.integers(1, 5)] * 3), seed=SEEDS)
def test_matmul_broadcast_batch(batch, mkn, seed):
    (ba, bb), _ = batch
    m, k, n = mkn
    check_op(operator.matmul, [ba + (m, k), bb + (k, n)], np.matmul, torch.matmul, seed=seed)


def test_matmul_shape_errors():
    with pytest.raises(fs.ShapeError, match="do not align"):
        fs.ones(3, 4) @ fs.ones(5, 2)
    with pytest.raises(fs.ShapeError, match="batch axes"):
        fs.ones(2, 3, 4) @ fs.ones(3, 4, 5)


# ---------------------------------------------------------------------------- binary arithmetic

BINARY = {
    "+": (operator.add, (-2.0, 2.0)),
    "-": (operator.sub, (-2.0, 2.0)),
    "*": (operator.mul, (-2.0, 2.0)),
    "/": (operator.truediv, (0.5, 2.0)),  # divisor kept away from 0
    "**": (operator.pow, (0.5, 2.0)),  # positive base: d/dy x**y = x**y log x
}


@pytest.mark.parametrize("op", BINARY)
@HYP
@given(bs=broadcastable(2), seed=SEEDS)
def test_binary_broadcasting(op, bs, seed):
    fn, (low, high) = BINARY[op]
    (sa, sb), _ = bs
    if op == "/":
        shapes = [sa, Arg(sb, low=low, high=high)]
    elif op == "**":
        shapes = [Arg(sa, low=low, high=high), sb]
    else:
        shapes = [sa, sb]
    check_op(fn, shapes, fn, fn, seed=seed)


SCALAR_CASES = {
    "x + 2.5": lambda x: x + 2.5, "2.5 + x": lambda x: 2.5 + x, "x - 3": lambda x: x - 3,
    "3 - x": lambda x: 3 - x, "x * -1.5": lambda x: x * -1.5, "2 * x": lambda x: 2 * x,
    "x / 4": lambda x: x / 4, "2.5 / x": lambda x: 2.5 / x, "x ** 2": lambda x: x**2,
    "x ** 0.5": lambda x: x**0.5, "x ** -1": lambda x: x**-1, "2.0 ** x": lambda x: 2.0**x,
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", SCALAR_CASES)
def test_python_scalar_operands_keep_the_tensor_dtype(case, dtype):
    fn = SCALAR_CASES[case]
    (out,) = check_op(fn, [Arg((3, 4), dtype=dtype, low=0.5, high=2.0)], fn, fn)
    assert out.dtype == dtype


INT_SCALAR_CASES = {"x + 2": lambda x: x + 2, "3 - x": lambda x: 3 - x, "x * -2": lambda x: x * -2,
                    "-x": lambda x: -x}


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("case", INT_SCALAR_CASES)
def test_integer_arithmetic_stays_integer(case, dtype):
    fn = INT_SCALAR_CASES[case]
    check_op(fn, [Arg((3, 4), dtype=dtype, low=-5, high=5)], fn, fn)


def test_integer_true_division_gives_float32_like_torch():
    x = Arg((3, 4), dtype=np.int64, low=-5, high=5)
    y = Arg((4,), dtype=np.int64, low=1, high=4)
    (out,) = check_op(operator.truediv, [x, y], operator.truediv, operator.truediv, check_dtype="torch")
    assert out.dtype == fs.float32


def test_numpy_array_operands_on_either_side():
    a = np.random.default_rng(1).uniform(0.5, 2.0, (4,)).astype(np.float32)
    ta = torch.from_numpy(a)
    cases = [(lambda x, a: x + a), (lambda x, a: a + x), (lambda x, a: a - x), (lambda x, a: a * x),
             (lambda x, a: a / x), (lambda x, a: x @ a), (lambda x, a: a @ x.T)]
    for fn in cases:
        check_op(lambda x: fn(x, a), [Arg((3, 4), low=0.5, high=2.0)], lambda x: fn(x, a), lambda t: fn(t, ta))


def test_neg():
    check_op(operator.neg, [(2, 3)], np.negative, torch.neg)
    check_op(operator.neg, [()], np.negative, torch.neg)


def test_broadcast_mismatch_is_a_shape_error():
    with pytest.raises(fs.ShapeError, match="do not broadcast"):
        fs.ones(2, 3) + fs.ones(4)


# ------------------------------------------------------------------------------------- unary

UNARY = {
    "exp": (fs.exp, np.exp, torch.exp, -2.0),
    "log": (fs.log, np.log, torch.log, 0.1),
    "sqrt": (fs.sqrt, np.sqrt, torch.sqrt, 0.1),
    "tanh": (fs.tanh, np.tanh, torch.tanh, -2.0),
}


@pytest.mark.parametrize("name", UNARY)
@HYP
@given(shape=SHAPES, seed=SEEDS)
def test_unary(name, shape, seed):
    fn, np_fn, torch_fn, low = UNARY[name]
    check_op(fn, [Arg(shape, low=low)], np_fn, torch_fn, seed=seed)
    check_op(lambda x: getattr(x, name)(), [Arg(shape, low=low)], np_fn, torch_fn, seed=seed)


@pytest.mark.parametrize("name", UNARY)
def test_unary_finite_differences(name):
    check_grad_fd(UNARY[name][0], [Arg((3, 4), low=UNARY[name][3])])


def test_transcendental_of_integers_is_a_dtype_error():
    with pytest.raises(fs.DTypeError, match="floating-point"):
        fs.exp(fs.arange(3))


# --------------------------------------------------------------------------- maximum / minimum


@pytest.mark.parametrize("fn,np_fn,torch_fn", [(fs.maximum, np.maximum, torch.maximum),
                                               (fs.minimum, np.minimum, torch.minimum)], ids=["maximum", "minimum"])
@HYP
@given(bs=broadcastable(2), seed=SEEDS)
def test_maximum_minimum_broadcasting(fn, np_fn, torch_fn, bs, seed):
    (sa, sb), _ = bs
    check_op(fn, [sa, sb], np_fn, torch_fn, seed=seed)


@pytest.mark.parametrize("fn,np_fn,torch_fn", [(fs.maximum, np.maximum, torch.maximum),
                                               (fs.minimum, np.minimum, torch.minimum)], ids=["maximum", "minimum"])
def test_maximum_minimum_ties_split_the_gradient(fn, np_fn, torch_fn):
    a = np.array([[1.0, -2.0, 3.0], [0.5, 0.5, -1.0]], np.float32)
    b = np.array([[1.0, -1.0, 3.0], [0.5, 2.0, -1.0]], np.float32)  # four ties
    check_op(fn, [a, b], np_fn, torch_fn)
    x = fs.tensor(a, requires_grad=True)
    fn(x, x).sum().backward()  # every element ties with itself: the halves add up to 1
    np.testing.assert_array_equal(x.grad.numpy(), np.ones_like(a))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_maximum_minimum_with_python_scalars_keep_dtype(dtype):
    c = 1 if dtype == np.int32 else 0.25
    x = np.random.default_rng(0).integers(-3, 4, (3, 4)).astype(dtype)
    cases = [(lambda x: fs.maximum(x, c), lambda a: np.maximum(a, c)),
             (lambda x: fs.maximum(c, x), lambda a: np.maximum(c, a)),
             (lambda x: fs.minimum(x, c), lambda a: np.minimum(a, c)),
             (lambda x: fs.minimum(c, x), lambda a: np.minimum(c, a))]
    for fn, np_fn in cases:
        out = fn(fs.tensor(x))
        assert out.dtype == dtype, f"{out.dtype} != {np.dtype(dtype)}"
        np.testing.assert_array_equal(out.numpy(), np_fn(x))


# ------------------------------------------------------------------------------------- where


@HYP
@given(bs=broadcastable(3), seed=SEEDS)
def test_where_broadcasting(bs, seed):
    (sc, sx, sy), _ = bs
    check_op(fs.where, [Arg(sc, dtype=bool), sx, sy], np.where, torch.where, seed=seed)


def test_where_with_scalars():
    check_op(lambda x: fs.where(x > 0, x, 0.0), [(3, 4)], lambda x: np.where(x > 0, x, 0.0),
             lambda x: torch.where(x > 0, x, 0.0))
    check_op(lambda x: fs.where(x > 0, 1.5, x), [(3, 4)], lambda x: np.where(x > 0, 1.5, x),
             lambda x: torch.where(x > 0, 1.5, x))


def test_where_needs_a_bool_condition():
    with pytest.raises(fs.DTypeError, match="must be bool"):
        fs.where(fs.ones(3), fs.ones(3), fs.zeros(3))


# ------------------------------------------------------------------------------- comparisons

COMPARISONS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
               ">=": operator.ge}


@pytest.mark.parametrize("op", COMPARISONS)
@HYP
@given(bs=broadcastable(2), dtype=st.sampled_from([np.int64, np.float32]), seed=SEEDS)
def test_comparisons(op, bs, dtype, seed):
    fn = COMPARISONS[op]
    (sa, sb), _ = bs
    rng = np.random.default_rng(seed)  # few distinct values, so ties are common
    a, b = (rng.integers(0, 3, s).astype(dtype) for s in (sa, sb))
    (out,) = check_op(fn, [a, Arg(value=b)], fn, fn)
    assert out.dtype == fs.bool_ and not out.requires_grad
    check_op(lambda x: fn(x, 1), [a], lambda x: fn(x, 1), lambda x: fn(x, 1))
    check_op(lambda x: fn(1, x), [a], lambda x: fn(1, x), lambda x: fn(1, x))


# -------------------------------------------------------------------------------- reductions

REDUCTIONS = {
    "sum": (fs.sum, np.sum, lambda t, ax, kd: torch.sum(t, dim=_dims(ax, t.ndim), keepdim=kd)),
    "mean": (fs.mean, np.mean, lambda t, ax, kd: torch.mean(t, dim=_dims(ax, t.ndim), keepdim=kd)),
    "max": (fs.max, np.max, lambda t, ax, kd: torch.amax(t, dim=_dims(ax, t.ndim), keepdim=kd)),
    "min": (fs.min, np.min, lambda t, ax, kd: torch.amin(t, dim=_dims(ax, t.ndim), keepdim=kd)),
    "var": (fs.var, np.var, lambda t, ax, kd: torch.var(t, dim=_dims(ax, t.ndim), correction=0, keepdim=kd)),
}


@pytest.mark.parametrize("name", REDUCTIONS)
@HYP
@given(sa=shape_and_axis(), keepdims=st.booleans(), seed=SEEDS)
def test_reductions(name, sa, keepdims, seed):
    shape, axis = sa
    fn, np_fn, torch_fn = REDUCTIONS[name]
    x = Arg(shape, distinct=True)  # no ties: max/min have a unique winner
    check_op(lambda t: fn(t, axis=axis, keepdims=keepdims), [x], lambda a: np_fn(a, axis=axis, keepdims=keepdims),
             lambda t: torch_fn(t, axis, keepdims), seed=seed)


@pytest.mark.parametrize("method", ["sum", "mean", "max", "min", "var"])
def test_reduction_methods_and_list_axes(method):
    fn, np_fn, _ = REDUCTIONS[method]
    a = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
    x = fs.tensor(a)
    np.testing.assert_allclose(getattr(x, method)(axis=[0, 2]).numpy(), np_fn(a, axis=(0, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(getattr(x, method)().numpy(), np_fn(a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["max", "min"])
def test_max_min_ties_split_the_gradient_evenly(name):
    a = np.array([[3.0, 1.0, 3.0, 3.0], [-2.0, 0.0, -2.0, 0.0]], np.float32)
    fn, np_fn, torch_fn = REDUCTIONS[name]
    for axis in [None, 1, 0]:
        check_op(lambda t: fn(t, axis=axis), [a], lambda x: np_fn(x, axis=axis), lambda t: torch_fn(t, axis, False))


@pytest.mark.parametrize("ddof", [0, 1])
@HYP
@given(sa=shape_and_axis(), seed=SEEDS)
def test_var_ddof(ddof, sa, seed):
    shape, axis = sa
    n = np.prod([shape[a] for a in np.atleast_1d(_dims(axis, len(shape)))])
    if n - ddof <= 0:
        return
    check_op(lambda t: fs.var(t, axis=axis, ddof=ddof), [shape], lambda a: np.var(a, axis=axis, ddof=ddof),
             lambda t: torch.var(t, dim=_dims(axis, t.ndim), correction=ddof), seed=seed)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_])
def test_sum_of_integers_is_int64(dtype):
    a = np.random.default_rng(0).integers(0, 5, (3, 4)).astype(dtype)
    for axis in [None, 0, (0, 1)]:
        out = fs.sum(fs.tensor(a), axis=axis)
        assert out.dtype == fs.int64
        np.testing.assert_array_equal(out.numpy(), np.sum(a, axis=axis, dtype=np.int64))
    m = fs.mean(fs.tensor(a), axis=1)
    assert m.dtype == fs.float32
    np.testing.assert_allclose(m.numpy(), a.mean(axis=1), rtol=1e-6)


def test_reduction_of_empty_axes():
    np.testing.assert_array_equal(fs.sum(fs.zeros(0, 3), axis=0).numpy(), np.zeros(3))
    with pytest.raises(fs.ShapeError, match="empty axis"):
        fs.max(fs.zeros(0, 3), axis=0)


@HYP
@given(sa=shape_and_axis(), keepdims=st.booleans(), seed=SEEDS)
def test_argmax(sa, keepdims, seed):
    shape, axis = sa
    if isinstance(axis, tuple):
        axis = axis[0]
    x = Arg(shape, distinct=True)
    torch_ref = None if axis is None and keepdims else lambda t: torch.argmax(t, dim=axis, keepdim=keepdims)
    (out,) = check_op(lambda t: fs.argmax(t, axis=axis, keepdims=keepdims), [x],
                      lambda a: np.argmax(a, axis=axis, keepdims=keepdims), torch_ref, seed=seed)
    assert out.dtype == fs.int64 and not out.requires_grad


def test_argmax_method_and_ties_take_the_first():
    x = fs.tensor([[1.0, 5.0, 5.0], [7.0, 7.0, 0.0]])
    assert x.argmax(axis=1).tolist() == [1, 0]
    assert x.argmax().item() == 3


# ---------------------------------------------------------------------------------- reshaping

RESHAPES = [((2, 3, 4), (6, 4)), ((2, 3, 4), (-1,)), ((2, 3, 4), (4, -1)), ((2, 3, 4), (2, -1, 3)),
            ((6,), (1, 6, 1)), ((1,), ()), ((), (1, 1)), ((2, 3, 4), (24, -1))]


@pytest.mark.parametrize("shape,new", RESHAPES, ids=str)
def test_reshape(shape, new):
    check_op(lambda t: fs.reshape(t, new), [shape], lambda a: np.reshape(a, new), lambda t: t.reshape(new))
    check_op(lambda t: t.reshape(*new), [shape], lambda a: np.reshape(a, new), lambda t: t.reshape(new))
    check_op(lambda t: t.view(new), [shape], lambda a: np.reshape(a, new), lambda t: t.reshape(new))


@HYP
@given(shape=SHAPES, seed=SEEDS)
def test_flatten_and_reshape_minus_one(shape, seed):
    check_op(lambda t: t.flatten(), [shape], np.ravel, torch.flatten, seed=seed)
    if shape:
        new = (shape[0], -1)
        check_op(lambda t: fs.reshape(t, new), [shape], lambda a: a.reshape(new), lambda t: t.reshape(new), seed=seed)


def test_reshape_errors():
    with pytest.raises(fs.ShapeError, match="cannot reshape"):
        fs.ones(2, 3).reshape(4, 2)
    with pytest.raises(fs.ShapeError, match="only one dimension"):
        fs.ones(2, 3).reshape(-1, -1)


@HYP
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4), seed=SEEDS)
def test_transpose(data, shape, seed):
    nd = len(shape)
    perm = tuple(data.draw(st.permutations(range(nd))))
    neg = tuple(p - nd if data.draw(st.booleans()) else p for p in perm)
    check_op(lambda t: fs.transpose(t, neg), [shape], lambda a: np.transpose(a, perm), lambda t: t.permute(perm),
             seed=seed)
    check_op(lambda t: t.transpose(*perm), [shape], lambda a: np.transpose(a, perm), lambda t: t.permute(perm),
             seed=seed)
    rev = tuple(range(nd))[::-1]
    check_op(fs.transpose, [shape], np.transpose, lambda t: t.permute(rev), seed=seed)
    check_op(lambda t: t.T, [shape], lambda a: a.T, lambda t: t.permute(rev), seed=seed)


def test_transpose_needs_a_permutation():
    with pytest.raises(fs.ShapeError, match="permutation"):
        fs.transpose(fs.ones(2, 3), (0, 0))


@HYP
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4), seed=SEEDS)
def test_swapaxes_expand_dims_squeeze(data, shape, seed):
    nd = len(shape)
    a, b = data.draw(st.integers(-nd, nd - 1)), data.draw(st.integers(-nd, nd - 1))
    check_op(lambda t: fs.swapaxes(t, a, b), [shape], lambda x: np.swapaxes(x, a, b),
             lambda t: torch.swapaxes(t, a, b), seed=seed)
    e = data.draw(st.integers(-nd - 1, nd))
    check_op(lambda t: fs.expand_dims(t, e), [shape], lambda x: np.expand_dims(x, e),
             lambda t: torch.unsqueeze(t, e), seed=seed)
    check_op(fs.squeeze, [shape], np.squeeze, torch.squeeze, seed=seed)
    ones = [i for i, d in enumerate(shape) if d == 1]
    if ones:
        s = data.draw(st.sampled_from(ones)) - data.draw(st.sampled_from([0, nd]))
        check_op(lambda t: t.squeeze(s), [shape], lambda x: np.squeeze(x, s), lambda t: torch.squeeze(t, s), seed=seed)


def test_squeeze_of_a_non_unit_axis_is_an_error():
    with pytest.raises(fs.FlowsysError, match="not 1"):
        fs.squeeze(fs.ones(2, 3), 1)


@pytest.mark.parametrize("fn", [lambda x: fs.expand_dims(x, 3), lambda x: fs.expand_dims(x, -4),
                                lambda x: fs.squeeze(x, 2)], ids=["expand_dims 3", "expand_dims -4", "squeeze 2"])
def test_out_of_range_axis_is_an_error(fn):
    with pytest.raises((fs.FlowsysError, IndexError, ValueError)):
        fn(fs.ones(1, 1))


@st.composite
def broadcast_source(draw):
    """A target shape and a source that broadcasts to it (leading axes dropped, some set to 1)."""
    target = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4))
    lead = draw(st.integers(0, len(target)))
    src = tuple(1 if draw(st.booleans()) else d for d in target[lead:])
    return src, target


@HYP
@given(st_=broadcast_source(), seed=SEEDS)
def test_broadcast_to(st_, seed):
    src, target = st_
    check_op(lambda t: fs.broadcast_to(t, target), [src], lambda a: np.broadcast_to(a, target),
             lambda t: torch.broadcast_to(t, target), seed=seed)


def test_broadcast_to_error():
    with pytest.raises(fs.ShapeError, match="cannot broadcast"):
        fs.broadcast_to(fs.ones(3), (3, 2))


# -------------------------------------------------------------------- concatenate / stack / split


@HYP
@given(base=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4), data=st.data(), seed=SEEDS)
def test_concatenate_and_stack(base, data, seed):
    nd = len(base)
    axis = data.draw(st.integers(-nd, nd - 1))
    sizes = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=4).filter(any))
    shapes = [base[: axis % nd] + (s,) + base[axis % nd + 1:] for s in sizes]
    check_op(lambda *xs: fs.concatenate(xs, axis=axis), shapes, lambda *a: np.concatenate(a, axis=axis),
             lambda *t: torch.cat(t, dim=axis), seed=seed)
    k = data.draw(st.integers(-nd - 1, nd))
    check_op(lambda *xs: fs.stack(xs, axis=k), [base] * len(sizes), lambda *a: np.stack(a, axis=k),
             lambda *t: torch.stack(t, dim=k), seed=seed)


def test_concatenate_mixed_dtypes_and_errors():
    out = fs.concatenate([fs.ones(2, dtype=fs.int64), fs.ones(3, dtype=fs.float64)])
    assert out.dtype == fs.float64 and out.shape == (5,)
    with pytest.raises(fs.ShapeError, match="differ outside axis"):
        fs.concatenate([fs.ones(2, 3), fs.ones(2, 4)], axis=0)


def test_concatenate_of_zero_dimensional_tensors_is_a_shape_error():
    with pytest.raises(fs.ShapeError, match="stack"):
        fs.concatenate([fs.tensor(1.0), fs.tensor(2.0)])


SPLITS = [((6, 4), 3, 0), ((6, 4), 2, -1), ((6, 4), [1, 4], 0), ((3, 7), [2, 2, 5], 1), ((3, 7), [0, 7], -1),
          ((5, 2), [-2], 0), ((5, 2), [1, -1], 0), ((6, 2), [4, 2], 0), ((2, 6), [1, 9], 1), ((6,), [3, 3], 0)]


@pytest.mark.parametrize("shape,ios,axis", SPLITS, ids=str)
def test_split(shape, ios, axis):
    torch_ios = ios if isinstance(ios, int) else [i % shape[axis] if i < 0 else i for i in ios]
    specs = OPS["split"].infer(Spec(shape, np.dtype(np.float32)), indices_or_sections=ios, axis=axis)
    assert [s.shape for s in specs] == [p.shape for p in np.split(np.zeros(shape), ios, axis=axis)]
    check_op(lambda t: fs.split(t, ios, axis=axis), [shape], lambda a: np.split(a, ios, axis=axis),
             lambda t: torch.tensor_split(t, torch_ios, dim=axis))


def test_split_that_does_not_divide_is_an_error():
    with pytest.raises(fs.ShapeError, match="equal sections"):
        fs.split(fs.ones(5), 2)


# --------------------------------------------------------------------------------------- take


TAKES = [((6, 3), np.array([[0, 5, 0], [-1, 2, 0]]), 0),  # embedding lookup, repeated and negative ids
         ((6,), np.array([3, 3, -6]), 0), ((2, 5, 3), np.array([4, -1, 4, 0]), 1),
         ((2, 3, 4), np.array([[1, -4], [1, 1]]), -1), ((4, 3), np.array(2), 0), ((4, 3), np.array([1, 1, 1]), 1)]


@pytest.mark.parametrize("shape,idx,axis", TAKES, ids=str)
def test_take(shape, idx, axis):
    def torch_take(t, i):
        return t[(slice(None),) * (axis % t.ndim) + (i,)]

    check_op(lambda t, i: fs.take(t, i, axis=axis), [shape, idx], lambda a, i: np.take(a, i, axis=axis), torch_take)
    check_op(lambda t: fs.take(t, idx.tolist(), axis=axis), [shape], lambda a: np.take(a, idx, axis=axis),
             lambda t: torch_take(t, torch.from_numpy(idx)))


def test_take_with_int32_indices_and_embedding():
    idx = np.array([[1, 0], [1, 3]], np.int32)
    check_op(lambda w, i: F.embedding(i, w), [(4, 5), idx], lambda w, i: w[i], lambda w, i: TF.embedding(i.long(), w))


def test_take_needs_integer_indices():
    with pytest.raises(fs.DTypeError, match="integers"):
        fs.take(fs.ones(3, 2), fs.ones(2))


# ----------------------------------------------------------------------------------- indexing

_MASK = np.array([[True, False, True, False, False], [False, False, False, False, False],
                  [True, True, True, True, True], [False, True, False, False, True]])
INDICES = [
    1, -1, slice(1, 3), slice(None, None, -1), slice(None, None, -2), slice(3, 0, -1), (slice(None, None, 2), 1),
    None, (Ellipsis, 0), (1, Ellipsis, None), (slice(None), None, slice(1, None)), (-3, slice(-4, -1)),
    (slice(None), slice(None, None, -1)), Ellipsis,
    [0, 2, 0],  # repeated rows accumulate
    np.array([[0, 1], [3, 3]]), ([0, 1, 1], [2, 0, 2]), (slice(None), [1, 1, -1]), (1, [4, 0, 4]),
    ([-1, 0], Ellipsis, [0, 0]), (slice(1, None), [0, 3]), _MASK, _MASK[:, 0], (_MASK[:, 0], slice(2, None)),
    (slice(None), np.array([True, False, True, True, False])),
]


@pytest.mark.parametrize("index", INDICES, ids=str)
def test_getitem(index):
    check_op(lambda t: t[index], [(4, 5)], lambda a: a[index], lambda t: _torch_getitem(t, index))


@pytest.mark.parametrize("index", [np.array([2, 0, 2]), _MASK], ids=["ints", "mask"])
def test_getitem_with_tensor_indices(index):
    check_op(lambda t: t[fs.tensor(index)], [(4, 5)], lambda a: a[index], lambda t: t[torch.from_numpy(index)])


def test_getitem_with_a_comparison_mask():
    check_op(lambda t: t[t > 0], [(3, 4)], lambda a: a[a > 0], lambda t: t[t > 0])


def test_getitem_of_a_3d_tensor():
    for index in [(slice(None), [0, 2, 2], slice(None, None, -1)), (Ellipsis, 1), ([1, 0], 2)]:
        check_op(lambda t: t[index], [(2, 3, 4)], lambda a: a[index], lambda t: _torch_getitem(t, index))


@pytest.mark.parametrize("index", [(0, None, [1, 1]), (1, slice(None), [0, 3, 0])], ids=str)
def test_getitem_int_and_array_apart_follow_numpy(index):
    # An int and an array separated by a slice (or None) are both advanced in NumPy, so their axes
    # go first; torch applies the int first. flowsys follows NumPy: check against it and by FD.
    check_op(lambda t: t[index], [(2, 3, 4)], lambda a: a[index])
    check_grad_fd(lambda t: t[index], [(2, 3, 4)])


def test_getitem_out_of_range_is_a_shape_error():
    with pytest.raises(fs.ShapeError, match="does not fit"):
        fs.ones(2, 3)[5]


# ------------------------------------------------------------------------------------- astype

ASTYPES = [(np.float32, np.float64), (np.float64, np.float32), (np.float32, np.int64), (np.float32, np.int32),
           (np.int64, np.float32), (np.bool_, np.float32), (np.float32, np.bool_), (np.int32, np.int64)]


@pytest.mark.parametrize("src,dst", ASTYPES, ids=lambda d: np.dtype(d).name)
def test_astype(src, dst):
    torch_dst = torch.from_numpy(np.zeros(0, dst)).dtype
    (out,) = check_op(lambda t: fs.astype(t, dst), [Arg((3, 4), dtype=src, low=-3, high=3)], lambda a: a.astype(dst),
                      lambda t: t.to(torch_dst))
    assert out.dtype == dst
    check_op(lambda t: t.astype(dst), [Arg((3, 4), dtype=src, low=-3, high=3)], lambda a: a.astype(dst),
             lambda t: t.to(torch_dst))


def test_astype_shorthands():
    x = fs.tensor([1.7, -2.2])
    assert x.double().dtype == fs.float64 and x.float().dtype == fs.float32
    assert x.long().tolist() == [1, -2]


# ---------------------------------------------------------------------- nn.functional: pointwise


@HYP
@given(shape=SHAPES, seed=SEEDS)
def test_relu(shape, seed):
    check_op(F.relu, [Arg(shape, distinct=True)], lambda a: np.maximum(a, 0), torch.relu, seed=seed)
    check_op(lambda t: t.relu(), [Arg(shape, distinct=True)], lambda a: np.maximum(a, 0), torch.relu, seed=seed)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@HYP
@given(shape=SHAPES, seed=SEEDS)
def test_gelu(approximate, shape, seed):
    check_op(lambda t: F.gelu(t, approximate=approximate), [Arg(shape, low=-4, high=4)], None,
             lambda t: TF.gelu(t, approximate=approximate), seed=seed)


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(fs.ones(2), approximate="sigmoid")


# ----------------------------------------------------------------------- softmax / log_softmax


def _np_softmax(a, axis):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@HYP
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5), seed=SEEDS)
def test_softmax_and_log_softmax(data, shape, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = Arg(shape, low=-5, high=5)
    check_op(lambda t: F.softmax(t, axis=axis), [x], lambda a: _np_softmax(a, axis),
             lambda t: torch.softmax(t, dim=axis), seed=seed)
    check_op(lambda t: F.log_softmax(t, axis=axis), [x], lambda a: np.log(_np_softmax(a.astype(np.float64), axis)),
             lambda t: torch.log_softmax(t, dim=axis), seed=seed, check_dtype="torch")


def test_softmax_is_stable_for_large_logits():
    x = fs.tensor([[1000.0, 1000.0], [-1000.0, 0.0]])
    np.testing.assert_allclose(F.softmax(x).numpy(), [[0.5, 0.5], [0.0, 1.0]])
    np.testing.assert_allclose(F.log_softmax(x).numpy(), [[-np.log(2), -np.log(2)], [-1000.0, 0.0]], rtol=1e-6)


# -------------------------------------------------------------------------------- cross entropy


def _np_cross_entropy(logits, t, ignore_index, reduction):
    ls = np.log(_np_softmax(logits.astype(np.float64), -1))
    valid = t != ignore_index
    picked = np.take_along_axis(ls, np.where(valid, t, 0)[..., None], -1)[..., 0]
    losses = np.where(valid, -picked, 0.0)
    out = {"none": losses, "sum": losses.sum(), "mean": losses.sum() / valid.sum()}[reduction]
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lead", [(6,), (2, 5)], ids=["(N,C)", "(B,T,C)"])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy(reduction, lead, ignore_index):
    n_classes = 4
    t = np.random.default_rng(0).integers(0, n_classes, lead)
    t.flat[1] = ignore_index
    t.flat[0] = 3  # at least one target counts

    def torch_ref(x, tt):
        out = TF.cross_entropy(x.reshape(-1, n_classes), tt.reshape(-1), ignore_index=ignore_index, reduction=reduction)
        return out.reshape(lead) if reduction == "none" else out

    check_op(lambda x, tt: F.cross_entropy(x, tt, ignore_index=ignore_index, reduction=reduction),
             [Arg(lead + (n_classes,), low=-4, high=4), t], lambda x, tt: _np_cross_entropy(x, tt, ignore_index, reduction),
             torch_ref)


def test_cross_entropy_targets_as_int32_and_lists():
    logits = fs.tensor(np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32))
    want = F.cross_entropy(logits, fs.tensor([0, 4, 2])).item()
    assert F.cross_entropy(logits, fs.tensor(np.array([0, 4, 2], np.int32))).item() == pytest.approx(want, rel=1e-6)
    assert F.cross_entropy(logits, [0, 4, 2]).item() == pytest.approx(want, rel=1e-6)


def test_cross_entropy_errors():
    logits = fs.zeros(2, 3)
    with pytest.raises(fs.FlowsysError, match="out of range"):
        F.cross_entropy(logits, [0, 3])
    with pytest.raises(fs.ShapeError, match="do not match"):
        F.cross_entropy(logits, [0, 1, 2])
    with pytest.raises(fs.FlowsysError, match="reduction"):
        F.cross_entropy(logits, [0, 1], reduction="max")


# ----------------------------------------------------------------------------------- layer norm


@pytest.mark.parametrize("normalized", [(6,), (3, 6)], ids=["1 axis", "2 axes"])
@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias", "bias"])
def test_layer_norm(normalized, affine):
    shapes = [(2, 3, 6)]
    if "weight" in affine:
        shapes.append(normalized)
    if "bias" in affine:
        shapes.append(normalized)

    def unpack(args):
        x, rest = args[0], list(args[1:])
        w = rest.pop(0) if "weight" in affine else None
        b = rest.pop(0) if "bias" in affine else None
        return x, w, b

    def fs_fn(*args):
        x, w, b = unpack(args)
        return F.layer_norm(x, normalized, w, b, eps=1e-5)

    def torch_fn(*args):
        x, w, b = unpack(args)
        return TF.layer_norm(x, normalized, w, b, eps=1e-5)

    check_op(fs_fn, shapes, None, torch_fn, rtol=2e-5)


def test_layer_norm_shape_mismatch():
    with pytest.raises(fs.FlowsysError, match="normalized_shape"):
        F.layer_norm(fs.ones(2, 3), (4,))


# --------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("args", [dict(p=0.0), dict(p=0.5, training=False), dict(p=0.0, training=False)], ids=str)
def test_dropout_identity(args):
    check_op(lambda t: F.dropout(t, **args), [(3, 4)], lambda a: a, lambda t: TF.dropout(t, **args))


def test_dropout_is_deterministic_under_manual_seed():
    x = fs.ones(64, 64)
    fs.manual_seed(123)
    a = F.dropout(x, 0.3).numpy()
    fs.manual_seed(123)
    b = F.dropout(x, 0.3).numpy()
    c = F.dropout(x, 0.3).numpy()  # the next call draws a fresh mask
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_1_minus_p_scaled(p):
    fs.manual_seed(7)
    a = np.random.default_rng(0).uniform(1.0, 2.0, (200, 500)).astype(np.float32)
    x = fs.tensor(a, requires_grad=True)
    y = F.dropout(x, p)
    out = y.numpy()
    kept = out != 0
    assert abs(kept.mean() - (1 - p)) < 0.01  # 100k draws: 5+ standard deviations
    np.testing.assert_allclose(out[kept], a[kept] / (1 - p), rtol=1e-6)
    assert y.dtype == fs.float32
    w = np.random.default_rng(1).uniform(-1, 1, a.shape).astype(np.float32)
    y.backward(gradient=fs.tensor(w))
    np.testing.assert_allclose(x.grad.numpy(), np.where(kept, w / (1 - p), 0.0), rtol=1e-6)


def test_dropout_p_one_zeros_everything_and_bad_p_is_rejected():
    np.testing.assert_array_equal(F.dropout(fs.ones(3, 4), 1.0).numpy(), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="p must be"):
        F.dropout(fs.ones(3), 1.5)


# ------------------------------------------------------------------------ scaled dot-product attention

SDPA_CASES = {
    "self": dict(q=(2, 3, 5, 4), k=(2, 3, 5, 4), v=(2, 3, 5, 4)),
    "Tq<Tk": dict(q=(2, 3, 4), k=(2, 6, 4), v=(2, 6, 5)),
    "Tq>Tk": dict(q=(1, 6, 4), k=(1, 3, 4), v=(1, 3, 2)),
    "scale": dict(q=(2, 4, 8), k=(2, 4, 8), v=(2, 4, 8), scale=0.3),
    "broadcast batch": dict(q=(2, 3, 4, 8), k=(1, 3, 6, 8), v=(3, 6, 8)),
    "2-D": dict(q=(5, 4), k=(5, 4), v=(5, 3)),
    # Probabilities larger than q, k and v together: the fused op, which recomputes them.
    "long": dict(q=(1, 2, 20, 2), k=(1, 2, 20, 2), v=(1, 2, 20, 2)),
    "long Tq<Tk": dict(q=(2, 12, 2), k=(2, 30, 2), v=(2, 30, 3)),
}


def _torch_sdpa(q, k, v, **kw):
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q, k, v = (t.expand(batch + t.shape[-2:]) for t in (q, k, v))
    return TF.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", SDPA_CASES)
def test_scaled_dot_product_attention(case, is_causal):
    c = dict(SDPA_CASES[case])
    shapes = [c.pop("q"), c.pop("k"), c.pop("v")]
    check_op(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, **c), shapes, None,
             lambda q, k, v: _torch_sdpa(q, k, v, is_causal=is_causal, **c), rtol=2e-5)


def _attention_mask(shape, seed=0):
    mask = np.random.default_rng(seed).random(shape) < 0.5
    mask[..., np.arange(shape[-2]) % shape[-1]] = False
    mask[..., np.arange(shape[-2]), np.arange(shape[-2]) % shape[-1]] = True  # no row is fully masked
    return mask


@pytest.mark.parametrize("mask_shape", [(4, 6), (2, 1, 4, 6)], ids=str)
def test_sdpa_bool_mask(mask_shape):
    mask = _attention_mask(mask_shape)
    shapes = [(2, 3, 4, 8), (2, 3, 6, 8), (2, 3, 6, 8), mask]
    check_op(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), shapes, None,
             lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=m), rtol=2e-5)


def test_sdpa_bool_mask_with_causal_matches_the_combined_mask():
    mask = _attention_mask((5, 5))
    causal = np.tril(np.ones((5, 5), bool))
    shapes = [(2, 5, 4), (2, 5, 4), (2, 5, 3), mask]
    check_op(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True), shapes, None,
             lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=m & torch.from_numpy(causal)),
             rtol=2e-5)


def test_sdpa_additive_float_mask_and_mask_free_composed_path():
    shapes = [(2, 4, 8), (2, 6, 8), (2, 6, 8), Arg((4, 6), low=-3, high=0)]
    check_op(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.5), shapes, None,
             lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.5), rtol=2e-5)
    # dropout_p with training=False takes the fused path; an all-True mask the composed one: both equal torch.
    all_true = np.ones((4, 6), bool)
    check_op(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.5, training=False),
             shapes[:3] + [all_true], None, lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v),
             rtol=2e-5)



def test_sdpa_with_dropout_is_the_fused_probabilities_dropped_then_times_v():
    """Training with dropout: one fused scale-mask-softmax, dropout on its probabilities, then
    ``@ v`` (Megatron-LM's order); values and gradients equal the same steps written out."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 6, 4)) for _ in range(3))

    def run(fn):
        fs.manual_seed(7)
        ts = [fs.tensor(a, requires_grad=True) for a in (q, k, v)]
        out = fn(*ts)
        (out * fs.tensor(np.arange(out.size, dtype=np.float64).reshape(out.shape))).sum().backward()
        return [out.numpy()] + [t.grad.numpy() for t in ts]

    def written_out(q, k, v):
        causal = fs.tensor(np.tril(np.ones((6, 6), bool)))
        att = F.softmax(fs.where(causal, (q @ k.swapaxes(-1, -2)) * 0.5, fs.tensor(-np.inf)), axis=-1)
        return F.dropout(att, 0.3) @ v

    got = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True))
    for a, b in zip(got, run(written_out)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert (got[0] != run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))[0]).any()


# ----------------------------------------------------------------- float64 finite differences

FD_CASES = {
    "matmul batched": (operator.matmul, [(2, 3, 4), (4, 2)]),
    "matmul 1-D @ batched": (operator.matmul, [(3,), (2, 3, 4)]),
    "matmul broadcast batch": (operator.matmul, [(2, 1, 2, 3), (3, 3, 2)]),
    "add broadcast": (operator.add, [(2, 3), (3,)]),
    "sub broadcast": (operator.sub, [(2, 1), (1, 3)]),
    "mul broadcast": (operator.mul, [(2, 3), (2, 1)]),
    "div": (operator.truediv, [(2, 3), Arg((3,), low=0.5)]),
    "pow": (operator.pow, [Arg((2, 3), low=0.5), (3,)]),
    "neg": (operator.neg, [(2, 3)]),
    "maximum": (fs.maximum, [Arg((2, 3), distinct=True), Arg((3,), distinct=True, low=-1.9, high=1.7)]),
    "minimum": (fs.minimum, [Arg((2, 3), distinct=True), Arg((3,), distinct=True, low=-1.9, high=1.7)]),
    "where": (fs.where, [Arg((2, 3), dtype=bool), (2, 3), (3,)]),
    "sum tuple axis": (lambda x: fs.sum(x, axis=(0, 2), keepdims=True), [(2, 3, 4)]),
    "mean": (lambda x: fs.mean(x, axis=-1), [(2, 3, 4)]),
    "var ddof=1": (lambda x: fs.var(x, axis=(0, 2), ddof=1), [(2, 3, 4)]),
    "max axis": (lambda x: fs.max(x, axis=1), [Arg((2, 3, 4), distinct=True)]),
    "min all": (fs.min, [Arg((2, 3, 4), distinct=True)]),
    "reshape": (lambda x: x.reshape(4, -1), [(2, 3, 4)]),
    "transpose": (lambda x: fs.transpose(x, (2, 0, 1)), [(2, 3, 4)]),
    "broadcast_to": (lambda x: fs.broadcast_to(x, (2, 3, 4)), [(3, 1)]),
    "getitem basic": (lambda x: x[::-1, None, 1:3], [(3, 4)]),
    "getitem advanced repeated": (lambda x: x[[0, 2, 0], 1:], [(3, 4)]),
    "getitem mask": (lambda x: x[_MASK], [(4, 5)]),
    "take": (lambda t: fs.take(t, [[0, 3], [-1, 0]]), [(4, 3)]),
    "take axis 1": (lambda t: fs.take(t, [2, -1, 2], axis=1), [(2, 3, 2)]),
    "concatenate": (lambda a, b: fs.concatenate([a, b], axis=1), [(2, 3), (2, 2)]),
    "stack": (lambda a, b: fs.stack([a, b], axis=-1), [(2, 3), (2, 3)]),
    "split": (lambda x: fs.split(x, [1, 3], axis=1), [(2, 5)]),
    "split overlapping": (lambda x: fs.split(x, [3, 1], axis=1), [(2, 5)]),
    "astype": (lambda x: x.astype(fs.float64), [(2, 3)]),
    "relu": (F.relu, [Arg((3, 4), distinct=True)]),
    "gelu": (F.gelu, [Arg((3, 4), low=-4, high=4)]),
    "gelu tanh": (lambda x: F.gelu(x, approximate="tanh"), [Arg((3, 4), low=-4, high=4)]),
    "softmax": (lambda x: F.softmax(x, axis=0), [(3, 4)]),
    "log_softmax": (F.log_softmax, [(3, 4)]),
    "cross_entropy": (lambda x: F.cross_entropy(x, fs.tensor([[0, 2, -100], [1, 1, 3]])), [(2, 3, 4)]),
    "cross_entropy none": (lambda x: F.cross_entropy(x, fs.tensor([0, 2, 1]), reduction="none"), [(3, 4)]),
    "layer_norm affine": (lambda x, w, b: F.layer_norm(x, (3, 4), w, b), [(2, 3, 4), (3, 4), (4,)]),
    "dropout": (lambda x: (fs.manual_seed(5), F.dropout(x, 0.4))[1], [(3, 4)]),
    "sdpa causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    [(2, 3, 4), (2, 5, 4), (2, 5, 3)]),
    "sdpa bool mask": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                       [(3, 4), (5, 4), (5, 3), _attention_mask((3, 5))]),
}


@pytest.mark.parametrize("case", FD_CASES)
def test_finite_differences(case):
    fn, shapes = FD_CASES[case]
    check_grad_fd(fn, shapes)

"""Reductions (NumPy ``axis=`` / ``keepdims=`` semantics) and broadcast_to, their adjoint.

``mean`` is not an op: the tensor API writes it as ``sum * (1/n)`` with ``n`` from the logical
shape, so a mean over a split axis is a partial sum scaled by a constant, exact on any mesh.
"""

from __future__ import annotations

import math

import numpy as np

from flowsys.errors import ShapeError
from flowsys.ops import blas
from flowsys.ops import sbp_rules as R
from flowsys.ops.registry import (Spec, flops_per_input, local_shape_attr, normalize_axes, register, sum_to_shape,
                                  view_cost)


def accumulation_dtype(dtype: np.dtype, requested=None) -> np.dtype:
    """The standard's result type of a sum or product (and their running forms): integers widen
    to the default integer type of their signedness (int64 / uint64), bools count as integers,
    floats keep theirs; ``requested`` (the ``dtype=`` argument) wins."""
    if requested is not None:
        return np.dtype(requested)
    if dtype.kind in "bi":
        return np.dtype(np.int64)
    if dtype.kind == "u":
        return np.dtype(np.uint64)
    return dtype


_INDEX = np.dtype(np.int64)


def _reduced_shape(shape, axes, keepdims):
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _reduce_infer(op, *, empty_ok, out=lambda dtype, requested: dtype):
    """Inference of a reduction over ``axis`` (None: all); ``out(input dtype, dtype=)`` is the
    result's dtype (by default the input's)."""

    def infer(x: Spec, *, axis=None, keepdims=False, dtype=None) -> Spec:
        axes = normalize_axes(op, axis, x.shape)
        if not empty_ok and any(x.shape[a] == 0 for a in axes):
            raise ShapeError(f"{op}: cannot reduce over an empty axis of a tensor of shape {x.shape}")
        return Spec(_reduced_shape(x.shape, axes, keepdims), out(x.dtype, dtype))

    return infer


def _reduce_rows(op, *, linear):
    """Rows of a reduction: kept axes split; a split reduced axis gives P only for a sum (an
    extreme, a product or an index along a split axis would be shard-local)."""

    def rows(specs, attrs):
        x = specs[0]
        return R.reduction(x, normalize_axes(op, attrs.get("axis"), x.shape), attrs.get("keepdims", False),
                           linear=linear)

    return rows


def _expand_back(b, g, x, axis, keepdims):
    """Reshape a reduced gradient so it broadcasts against ``x`` again."""
    axes = normalize_axes("sum", axis, x.shape)
    if not keepdims:
        g = b.reshape(g, shape=_reduced_shape(x.shape, axes, True))
    return g


def _sum_grad(b, g, out, x, *, axis=None, keepdims=False, dtype=None):
    g = b.broadcast_to(_expand_back(b, g, x, axis, keepdims), shape=tuple(x.shape))
    return [g if g.dtype == x.dtype else b.astype(g, dtype=x.dtype)]


# The family's cost: one operation (an add or a compare) per element reduced.
_REDUCTION = flops_per_input(1)


@register("sum", infer=_reduce_infer("sum", empty_ok=True, out=accumulation_dtype), sbp=_reduce_rows("sum", linear=True),
          grad=_sum_grad, cost=_REDUCTION)
def sum_(xp, x, *, axis=None, keepdims=False, dtype=None):
    acc = accumulation_dtype(x.dtype, dtype)
    if xp is np and not keepdims:
        out = _leading_sum(x, axis, acc)
        if out is not None:
            return out
    return xp.sum(x, axis=axis, keepdims=keepdims, dtype=acc)


def _leading_sum(x, axis, acc):
    """A sum over the leading axes of a large C-contiguous float array (a bias's gradient: the
    output's gradient summed over its rows) as the product of a row of ones with its rows, on
    MKL (``blas.matmul``), or None. NumPy adds the rows one after another, at a third of the
    memory's speed: a GPT layer's four bias gradients, read cold, took 1.02 ms, MKL's products 0.79."""
    if x.dtype != acc or x.dtype not in (np.float32, np.float64) or x.ndim < 2 or not x.flags.c_contiguous:
        return None
    axes = normalize_axes("sum", axis, x.ndim)
    lead = len(axes)
    if axes != tuple(range(lead)) or lead == x.ndim:
        return None
    rows, cols = math.prod(x.shape[:lead]), math.prod(x.shape[lead:])
    if rows < 64 or rows * cols < 1 << 16:
        return None
    out = blas.matmul(blas.ones_row(rows, x.dtype), x.reshape(rows, cols))
    return None if out is None else out.reshape(x.shape[lead:])


# No gradient rule: the product rule divides by the input, wrong where it is zero.
@register("prod", infer=_reduce_infer("prod", empty_ok=True, out=accumulation_dtype),
          sbp=_reduce_rows("prod", linear=False), cost=_REDUCTION)
def prod(xp, x, *, axis=None, keepdims=False, dtype=None):
    return xp.prod(x, axis=axis, keepdims=keepdims, dtype=accumulation_dtype(x.dtype, dtype))


def _extreme_grad(b, g, out, x, *, axis=None, keepdims=False):
    # The gradient goes to the extreme elements, split evenly among ties (as torch.amax does).
    out_k = _expand_back(b, out, x, axis, keepdims)
    g_k = _expand_back(b, g, x, axis, keepdims)
    hit = b.astype(b.eq(x, out_k), dtype=g.dtype)
    count = b.sum(hit, axis=axis, keepdims=True)
    return [b.mul(hit, b.div(g_k, count))]


@register("max", infer=_reduce_infer("max", empty_ok=False), sbp=_reduce_rows("max", linear=False),
          grad=_extreme_grad, cost=_REDUCTION)
def max_(xp, x, *, axis=None, keepdims=False):
    return xp.max(x, axis=axis, keepdims=keepdims)


@register("min", infer=_reduce_infer("min", empty_ok=False), sbp=_reduce_rows("min", linear=False),
          grad=_extreme_grad, cost=_REDUCTION)
def min_(xp, x, *, axis=None, keepdims=False):
    return xp.min(x, axis=axis, keepdims=keepdims)


@register("argmax", infer=_reduce_infer("argmax", empty_ok=False, out=lambda dtype, requested: _INDEX),
          sbp=_reduce_rows("argmax", linear=False), cost=_REDUCTION)
def argmax(xp, x, *, axis=None, keepdims=False):
    return xp.argmax(x, axis=axis, keepdims=keepdims).astype(np.int64, copy=False)


@register("argmin", infer=_reduce_infer("argmin", empty_ok=False, out=lambda dtype, requested: _INDEX),
          sbp=_reduce_rows("argmin", linear=False), cost=_REDUCTION)
def argmin(xp, x, *, axis=None, keepdims=False):
    return xp.argmin(x, axis=axis, keepdims=keepdims).astype(np.int64, copy=False)


def _broadcast_to_infer(x: Spec, *, shape) -> Spec:
    shape = tuple(int(d) for d in shape)
    try:
        np.broadcast_shapes(x.shape, shape)
        ok = len(shape) >= x.ndim and all(d in (1, t) for d, t in zip(x.shape[::-1], shape[::-1]))
    except ValueError:
        ok = False
    if not ok:
        raise ShapeError(f"broadcast_to: cannot broadcast a tensor of shape {x.shape} to {shape}")
    return Spec(shape, x.dtype)


def _broadcast_to_rows(specs, attrs):
    x, shape = specs[0], tuple(attrs["shape"])
    lead = len(shape) - x.ndim
    rows = [R.SbpRow((R.S(i),), (R.S(i + lead),), "a split axis that is not stretched stays split")
            for i, d in enumerate(x.shape) if d == shape[i + lead]]
    rows.append(R.replicated(1))
    rows.append(R.SbpRow((R.P,), (R.P,), "broadcasting is linear"))
    return rows


@register("broadcast_to", infer=_broadcast_to_infer, sbp=_broadcast_to_rows, lower=local_shape_attr(), cost=view_cost,
          grad=lambda b, g, out, x, *, shape: [sum_to_shape(b, g, x.shape)])
def broadcast_to(xp, x, *, shape):
    return xp.broadcast_to(x, shape)

"""Reductions (NumPy ``axis=`` / ``keepdims=`` semantics) and broadcast_to, their adjoint.

``mean`` is not an op: the tensor API writes it as ``sum * (1/n)`` with ``n`` from the logical
shape, so a mean over a split axis is a partial sum scaled by a constant, exact on any mesh.
"""

from __future__ import annotations

import numpy as np

from flowsys.errors import ShapeError
from flowsys.ops import sbp_rules as R
from flowsys.ops.arrays import accumulation_dtype
from flowsys.ops.registry import (Spec, flops_per_input, local_shape_attr, normalize_axes, register, sum_to_shape,
                                  view_cost)


def _reduced_shape(shape, axes, keepdims):
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _reduce_infer(op, *, empty_ok):
    def infer(x: Spec, *, axis=None, keepdims=False, dtype=None) -> Spec:
        axes = normalize_axes(op, axis, x.shape)
        if not empty_ok and any(x.shape[a] == 0 for a in axes):
            raise ShapeError(f"{op}: cannot reduce over an empty axis of a tensor of shape {x.shape}")
        out = accumulation_dtype(op, x.dtype, dtype) if op == "sum" else x.dtype
        return Spec(_reduced_shape(x.shape, axes, keepdims), out)

    return infer


def _expand_back(b, g, x, axis, keepdims):
    """Reshape a reduced gradient so it broadcasts against ``x`` again."""
    axes = normalize_axes("sum", axis, x.shape)
    if not keepdims:
        g = b.reshape(g, shape=_reduced_shape(x.shape, axes, True))
    return g


def _sum_grad(b, g, out, x, *, axis=None, keepdims=False, dtype=None):
    g = b.broadcast_to(_expand_back(b, g, x, axis, keepdims), shape=tuple(x.shape))
    return [g if g.dtype == x.dtype else b.astype(g, dtype=x.dtype)]


def _sum_rows(specs, attrs):
    x = specs[0]
    return R.reduction(x, normalize_axes("sum", attrs.get("axis"), x.shape), attrs.get("keepdims", False), linear=True)


# The family's cost: one operation (an add or a compare) per element reduced.
_REDUCTION = flops_per_input(1)


@register("sum", infer=_reduce_infer("sum", empty_ok=True), sbp=_sum_rows, grad=_sum_grad, cost=_REDUCTION)
def sum_(xp, x, *, axis=None, keepdims=False, dtype=None):
    return xp.sum(x, axis=axis, keepdims=keepdims, dtype=accumulation_dtype("sum", x.dtype, dtype))


def _extreme_grad(b, g, out, x, *, axis=None, keepdims=False):
    # The gradient goes to the extreme elements, split evenly among ties (as torch.amax does).
    out_k = _expand_back(b, out, x, axis, keepdims)
    g_k = _expand_back(b, g, x, axis, keepdims)
    hit = b.astype(b.eq(x, out_k), dtype=g.dtype)
    count = b.sum(hit, axis=axis, keepdims=True)
    return [b.mul(hit, b.div(g_k, count))]


def _extreme_rows(specs, attrs):
    x = specs[0]
    return R.reduction(x, normalize_axes("max", attrs.get("axis"), x.shape), attrs.get("keepdims", False), linear=False)


@register("max", infer=_reduce_infer("max", empty_ok=False), sbp=_extreme_rows, grad=_extreme_grad, cost=_REDUCTION)
def max_(xp, x, *, axis=None, keepdims=False):
    return xp.max(x, axis=axis, keepdims=keepdims)


@register("min", infer=_reduce_infer("min", empty_ok=False), sbp=_extreme_rows, grad=_extreme_grad, cost=_REDUCTION)
def min_(xp, x, *, axis=None, keepdims=False):
    return xp.min(x, axis=axis, keepdims=keepdims)


def _argmax_infer(x: Spec, *, axis=None, keepdims=False) -> Spec:
    if axis is None:
        return Spec((1,) * x.ndim if keepdims else (), np.dtype(np.int64))
    return Spec(_reduce_infer("argmax", empty_ok=False)(x, axis=axis, keepdims=keepdims).shape, np.dtype(np.int64))


def _argmax_rows(specs, attrs):
    # Indices along a split axis would be shard-local, so only the kept axes may be split.
    x = specs[0]
    return R.reduction(x, normalize_axes("argmax", attrs.get("axis"), x.shape), attrs.get("keepdims", False), linear=False)


@register("argmax", infer=_argmax_infer, sbp=_argmax_rows, cost=_REDUCTION)
def argmax(xp, x, *, axis=None, keepdims=False):
    return xp.argmax(x, axis=axis, keepdims=keepdims).astype(np.int64, copy=False)


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

"""The Array API standard's ops along an axis: scans, orderings, triangles, repeats.

Each keeps its axis whole on a rank: any other axis may be split (``along`` rows), as for
softmax. Sorting is ``argsort`` then ``take_along_axis``, so its gradient is the gather's adjoint
(a scatter-add). ``cumulative_prod`` registers no gradient rule (nor does ``prod``, a reduction
in ``flowsys.ops.reduce``): the product rule divides by the input, wrong where it is zero, and
flowsys gives no gradient rather than a wrong one.
"""

from __future__ import annotations

import numpy as np

from flowsys.errors import ArgumentError, DTypeError, ShapeError
from flowsys.ops import sbp_rules as R
from flowsys.ops.reduce import accumulation_dtype
from flowsys.ops.registry import (Spec, copy_cost, flops_per_input, flops_per_output, gather_cost, normalize_axes,
                                  normalize_axis, register, scatter_add_cost)

B, P, S = R.B, R.P, R.S


def _along(*partial, n_in=1):
    """Rows of an op working along ``attrs['axis']`` (None: the whole tensor): any other axis split."""

    def rows(specs, attrs):
        axis = attrs.get("axis")
        if axis is None:
            return [R.replicated(len(specs))] + [R.SbpRow(ins, (P,), why) for ins, why in partial]
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        return R.pointwise(specs, partial, skip_axes=axes)

    return rows


# --------------------------------------------------------------------------------------- scans


def _scan_infer(op):
    def infer(x: Spec, *, axis, include_initial=False, dtype=None) -> Spec:
        ax = normalize_axis(op, axis, x.shape)
        shape = list(x.shape)
        shape[ax] += bool(include_initial)
        return Spec(tuple(shape), accumulation_dtype(x.dtype, dtype))

    return infer


def _cumsum_grad(b, g, out, x, *, axis, include_initial=False, dtype=None):
    # d out[i] / d x[j] = 1 for j < i (+1 with an initial zero): the reversed running sum of g.
    ax = axis % x.ndim
    rev = b.flip(b.cumulative_sum(b.flip(g, axis=(ax,)), axis=ax), axis=(ax,))
    if include_initial:
        rev = b.getitem(rev, index=(slice(None),) * ax + (slice(1, None),))
    return [rev if rev.dtype == x.dtype else b.astype(rev, dtype=x.dtype)]


@register("cumulative_sum", infer=_scan_infer("cumulative_sum"), sbp=_along(), grad=_cumsum_grad,
          cost=flops_per_output(1))
def cumulative_sum(xp, x, *, axis, include_initial=False, dtype=None):
    out = xp.cumsum(x, axis=axis, dtype=accumulation_dtype(x.dtype, dtype))
    return _with_initial(xp, out, axis, include_initial, 0)


@register("cumulative_prod", infer=_scan_infer("cumulative_prod"), sbp=_along(), cost=flops_per_output(1))
def cumulative_prod(xp, x, *, axis, include_initial=False, dtype=None):
    out = xp.cumprod(x, axis=axis, dtype=accumulation_dtype(x.dtype, dtype))
    return _with_initial(xp, out, axis, include_initial, 1)


def _with_initial(xp, out, axis, include_initial, value):
    if not include_initial:
        return out
    shape = list(out.shape)
    shape[axis] = 1
    return xp.concatenate([xp.full(shape, value, dtype=out.dtype), out], axis=axis)


# ----------------------------------------------------------------------------------- reorderings


def _flip_infer(x: Spec, *, axis=None) -> Spec:
    normalize_axes("flip", axis, x.shape)
    return x


@register("flip", infer=_flip_infer, sbp=_along(((P,), "reordering is linear")), cost=copy_cost,
          grad=lambda b, g, out, x, *, axis=None: [b.flip(g, axis=axis)])
def flip(xp, x, *, axis=None):
    return xp.flip(x, axis=axis).copy()


def _roll_infer(x: Spec, *, shift, axis=None) -> Spec:
    if axis is not None:
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        for a in axes:
            normalize_axis("roll", a, x.shape)
        if not isinstance(shift, int) and len(shift) != len(axes):
            raise ShapeError(f"roll: {len(shift)} shifts for {len(axes)} axes; give one shift per axis")
    elif not isinstance(shift, int):
        raise ArgumentError(f"roll: without axis, shift is one integer (the tensor rolls flattened), got {shift}")
    return x


def _neg_shift(shift):
    return -shift if isinstance(shift, int) else tuple(-s for s in shift)


@register("roll", infer=_roll_infer, sbp=_along(((P,), "reordering is linear")), cost=copy_cost,
          grad=lambda b, g, out, x, *, shift, axis=None: [b.roll(g, shift=_neg_shift(shift), axis=axis)])
def roll(xp, x, *, shift, axis=None):
    return xp.roll(x, shift, axis=axis)


def _argsort_infer(x: Spec, *, axis=-1, descending=False, stable=True) -> Spec:
    if x.dtype.kind == "c":
        raise DTypeError(f"argsort: complex values have no order, got {x}; sort fs.real(x) or fs.abs(x)")
    normalize_axis("argsort", axis, x.shape)
    return Spec(x.shape, np.dtype(np.int64))


@register("argsort", infer=_argsort_infer, sbp=_along(), cost=flops_per_input(8))
def argsort(xp, x, *, axis=-1, descending=False, stable=True):
    """Ascending order, ties in input order. Descending keeps ties in input order too: sort the
    reversed axis ascending, then reverse the result and map the positions back."""
    if not descending:
        return xp.argsort(x, axis=axis, kind="stable").astype(np.int64, copy=False)
    n = x.shape[axis]
    rev = xp.argsort(xp.flip(x, axis=axis), axis=axis, kind="stable")
    return (n - 1 - xp.flip(rev, axis=axis)).astype(np.int64, copy=False)


def _take_along_infer(x: Spec, idx: Spec, *, axis=-1) -> Spec:
    if idx.dtype.kind not in "iu":
        raise DTypeError(f"take_along_axis: indices must be integers, got {idx}; cast them with .astype(fs.int64)")
    ax = normalize_axis("take_along_axis", axis, x.shape)
    if idx.ndim != x.ndim:
        raise ShapeError(f"take_along_axis: indices of shape {idx.shape} for a tensor of shape {x.shape}: "
                         f"both need {x.ndim} dimensions")
    shape = []
    for i, (d, k) in enumerate(zip(x.shape, idx.shape)):
        if i == ax:
            shape.append(k)
        elif d == k or 1 in (d, k):
            shape.append(max(d, k) if 0 not in (d, k) else 0)
        else:
            raise ShapeError(f"take_along_axis: indices of shape {idx.shape} do not broadcast against the tensor's "
                             f"shape {x.shape} outside axis {ax}")
    return Spec(tuple(shape), x.dtype)


def _take_along_rows(specs, attrs):
    x, idx = specs
    ax = normalize_axis("take_along_axis", attrs.get("axis", -1), x.shape)
    rows = [R.SbpRow((S(i), S(i)), (S(i),), "gathering along another axis keeps this one split")
            for i in range(x.ndim) if i != ax and x.shape[i] == idx.shape[i]]
    return rows + [R.replicated(2), R.SbpRow((P, B), (P,), "gathering is linear in the values")]


def _take_along_grad(b, g, out, x, idx, *, axis=-1):
    return [b.take_along_axis_grad(g, idx, axis=axis, shape=tuple(x.shape)), None]


@register("take_along_axis", infer=_take_along_infer, sbp=_take_along_rows, grad=_take_along_grad, cost=gather_cost)
def take_along_axis(xp, x, idx, *, axis=-1):
    ax = axis % x.ndim
    shape = tuple(k if i == ax else max(d, k) for i, (d, k) in enumerate(zip(x.shape, idx.shape)))
    x = xp.broadcast_to(x, tuple(d if i == ax else s for i, (d, s) in enumerate(zip(x.shape, shape))))
    return xp.take_along_axis(x, xp.broadcast_to(idx, shape), axis=ax)


def _take_along_grad_rows(specs, attrs):
    g, idx = specs
    ax = normalize_axis("take_along_axis_grad", attrs.get("axis", -1), len(attrs["shape"]))
    rows = [R.SbpRow((S(i), S(i)), (S(i),), "scattering along another axis keeps this one split")
            for i in range(g.ndim) if i != ax and g.shape[i] == idx.shape[i] == attrs["shape"][i]]
    return rows + [R.replicated(2), R.SbpRow((P, B), (P,), "scatter-add is linear in the gradient")]


@register("take_along_axis_grad", infer=lambda g, idx, *, axis=-1, shape: Spec(tuple(shape), g.dtype),
          sbp=_take_along_grad_rows, cost=scatter_add_cost,
          grad=lambda b, gg, out, g, idx, *, axis=-1, shape: [b.take_along_axis(gg, idx, axis=axis), None])
def take_along_axis_grad(xp, g, idx, *, axis=-1, shape):
    """Adjoint of take_along_axis: each gathered element of ``g`` added back where it came
    from (repeated indices accumulate; an input broadcast against the indices sums over it)."""
    ax = axis % len(shape)
    full = tuple(g.shape[i] if i != ax else shape[ax] for i in range(len(shape)))
    z = xp.zeros(full, dtype=g.dtype)
    idx = xp.broadcast_to(idx, g.shape)
    idx = xp.where(idx < 0, idx + shape[ax], idx)
    grids = list(xp.indices(g.shape, sparse=True))
    grids[ax] = idx
    xp.add.at(z, tuple(grids), g)
    for i, d in enumerate(shape):  # sum over axes the input was broadcast along
        if d == 1 and z.shape[i] != 1:
            z = z.sum(axis=i, keepdims=True)
    return z


def _searchsorted_infer(x1: Spec, x2: Spec, *, side="left") -> Spec:
    if x1.ndim != 1:
        raise ShapeError(f"searchsorted: the sorted tensor must be 1-D, got shape {x1.shape}")
    if side not in ("left", "right"):
        raise ArgumentError(f"searchsorted: side is 'left' or 'right', got {side!r}")
    if x1.dtype.kind == "c" or x2.dtype.kind == "c":
        raise DTypeError(f"searchsorted: complex values have no order, got {x1} and {x2}")
    return Spec(x2.shape, np.dtype(np.int64))


def _searchsorted_rows(specs, attrs):
    x1, x2 = specs
    rows = [R.SbpRow((B, S(i)), (S(i),), "each rank looks up its share of the values") for i in range(x2.ndim)]
    return rows + [R.replicated(2)]


@register("searchsorted", infer=_searchsorted_infer, sbp=_searchsorted_rows, cost=flops_per_output(8))
def searchsorted(xp, x1, x2, *, side="left"):
    return xp.searchsorted(x1, x2, side=side).astype(np.int64, copy=False)


# ----------------------------------------------------------------------------- triangles, repeats


def _tri_infer(op):
    def infer(x: Spec, *, k=0) -> Spec:
        if x.ndim < 2:
            raise ShapeError(f"{op}: takes a tensor of at least 2 dimensions (a stack of matrices), got shape {x.shape}")
        return x

    return infer


def _tri_rows(specs, attrs):
    return R.pointwise(specs, [((P,), "masking is linear")], skip_axes=(-2, -1))


for _name in ("tril", "triu"):
    register(_name, infer=_tri_infer(_name), sbp=_tri_rows, cost=copy_cost,
             grad=(lambda n: lambda b, g, out, x, *, k=0: [getattr(b, n)(g, k=k)])(_name))(
        (lambda n: lambda xp, x, *, k=0: getattr(xp, n)(x, k))(_name))


def _repeat_infer(x: Spec, *, repeats, axis=None) -> Spec:
    n = x.shape[normalize_axis("repeat", axis, x.shape)] if axis is not None else int(np.prod(x.shape))
    if isinstance(repeats, int):
        if repeats < 0:
            raise ArgumentError(f"repeat: repeats must be non-negative, got {repeats}")
        total = n * repeats
    else:
        if len(repeats) not in (1, n):
            raise ShapeError(f"repeat: {len(repeats)} repeat counts for an axis of size {n}; give 1 or {n}")
        if any(r < 0 for r in repeats):
            raise ArgumentError(f"repeat: repeats must be non-negative, got {repeats}")
        total = sum(repeats) if len(repeats) == n else n * repeats[0]
    if axis is None:
        return Spec((total,), x.dtype)
    ax = axis % x.ndim
    return Spec(x.shape[:ax] + (total,) + x.shape[ax + 1:], x.dtype)


def _repeat_grad(b, g, out, x, *, repeats, axis=None):
    return [b.repeat_grad(g, repeats=repeats, axis=axis, shape=tuple(x.shape))]


@register("repeat", infer=_repeat_infer, sbp=_along(((P,), "repeating is linear")), grad=_repeat_grad, cost=copy_cost)
def repeat(xp, x, *, repeats, axis=None):
    return xp.repeat(x, repeats if isinstance(repeats, int) else xp.asarray(repeats, dtype=np.int64), axis=axis)


@register("repeat_grad", infer=lambda g, *, repeats, axis=None, shape: Spec(tuple(shape), g.dtype),
          sbp=_along(((P,), "summing copies is linear")), cost=flops_per_input(1),
          grad=lambda b, gg, out, g, *, repeats, axis=None, shape: [b.repeat(gg, repeats=repeats, axis=axis)])
def repeat_grad(xp, g, *, repeats, axis=None, shape):
    """Adjoint of repeat: each element's copies summed back into it."""
    if axis is None:  # repeat flattened first
        n, gm, rest = int(np.prod(shape)), g, ()
    else:
        ax = axis % len(shape)
        n, gm, rest = shape[ax], xp.moveaxis(g, ax, 0), tuple(shape[:ax]) + tuple(shape[ax + 1:])
    owner = np.repeat(np.arange(n), np.broadcast_to(np.asarray(repeats, dtype=np.int64), (n,)))
    z = xp.zeros((n,) + rest, dtype=g.dtype)
    xp.add.at(z, xp.asarray(owner), gm)
    return z.reshape(shape) if axis is None else xp.moveaxis(z, 0, ax)

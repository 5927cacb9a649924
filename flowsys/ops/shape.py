"""Ops that move data without arithmetic: reshape, transpose, indexing, concatenate/split, take."""

from __future__ import annotations

import math

import numpy as np

from flowsys.errors import AxisError, DTypeError, IndexOutOfRange, ShapeError
from flowsys.ops import fused
from flowsys.ops import sbp_rules as R
from flowsys.ops.registry import (Cost, Spec, copy_cost, gather_cost, local_shape_attr, nbytes, normalize_axis,
                                  promote_types, register, scatter_add_cost, view_cost)

B, P, S = R.B, R.P, R.S


def _linear_rows(n_in=1):
    """Rows for a data-movement op whose axes do not map simply: B and P only."""
    return lambda specs, attrs: [R.replicated(n_in), R.SbpRow((P,) * n_in, (P,), "moving data is linear")]


# ------------------------------------------------------------------------------------ reshape


def _resolve_shape(x: Spec, shape) -> tuple[int, ...]:
    shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    size = math.prod(x.shape)
    if shape.count(-1) > 1:
        raise ShapeError(f"reshape: only one dimension may be -1, got {shape}")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or size % known:
            raise ShapeError(f"reshape: cannot reshape a tensor of shape {x.shape} (size {size}) into {shape}")
        shape = tuple(size // known if d == -1 else d for d in shape)
    if math.prod(shape) != size:
        raise ShapeError(f"reshape: cannot reshape a tensor of shape {x.shape} (size {size}) into {shape}")
    return shape


def _reshape_rows(specs, attrs):
    """A split axis survives a reshape when its shards stay contiguous blocks of one output
    axis: it maps onto an output axis of the same size, or it is cut into factors and the split
    goes to the leading one, or it leads a group of axes merged into one; in every case with
    the same number of elements before it. (Uneven pieces that no longer line up are ruled out
    per mesh when the shard shapes are checked.)"""
    x = specs[0]
    out = _resolve_shape(x, attrs["shape"])
    rows = []
    for i, d in enumerate(x.shape):
        before = math.prod(x.shape[:i])
        for j, e in enumerate(out):
            if math.prod(out[:j]) != before or e <= 1 and d > 1:
                continue
            if e == d:
                rows.append(R.SbpRow((S(i),), (S(j),), "the split axis is kept whole by the reshape"))
            elif d % e == 0 and any(math.prod(out[j:k]) == d for k in range(j + 2, len(out) + 1)):
                rows.append(R.SbpRow((S(i),), (S(j),), "the split axis is cut into factors; its leading factor carries the split"))
            elif e % d == 0 and any(math.prod(x.shape[i:m]) == e for m in range(i + 2, x.ndim + 1)):
                rows.append(R.SbpRow((S(i),), (S(j),), "the split axis leads the axes merged into one"))
            break
    return rows + _linear_rows()(specs, attrs)


# No arithmetic in this family: its ops cost the bytes they move. reshape counts a copy: a view
# of a contiguous input, it copies one that is not (what a transpose gives).
@register("reshape", infer=lambda x, *, shape: Spec(_resolve_shape(x, shape), x.dtype), sbp=_reshape_rows,
          lower=local_shape_attr(), cost=copy_cost,
          grad=lambda b, g, out, x, *, shape: [b.reshape(g, shape=tuple(x.shape))])
def reshape(xp, x, *, shape):
    return xp.reshape(x, shape)


# ---------------------------------------------------------------------------------- transpose


def _perm(x: Spec, axes) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(x.ndim))[::-1]
    axes = tuple(normalize_axis("transpose", int(a), x.ndim) for a in axes)
    if sorted(axes) != list(range(x.ndim)):
        raise ShapeError(f"transpose: axes {axes} are not a permutation of the {x.ndim} axes of shape {x.shape}")
    return axes


def _transpose_rows(specs, attrs):
    x = specs[0]
    perm = _perm(x, attrs.get("axes"))
    rows = [R.SbpRow((S(p),), (S(j),), "transpose moves the split axis along") for j, p in enumerate(perm)]
    return rows + _linear_rows()(specs, attrs)


@register("transpose", infer=lambda x, *, axes=None: Spec(tuple(x.shape[p] for p in _perm(x, axes)), x.dtype),
          sbp=_transpose_rows, cost=view_cost,
          grad=lambda b, g, out, x, *, axes=None: [b.transpose(g, axes=tuple(np.argsort(_perm(x, axes)).tolist()))])
def transpose(xp, x, *, axes=None):
    return xp.transpose(x, axes)


# ----------------------------------------------------------------------------------- indexing


def _getitem_infer(x: Spec, *, index) -> Spec:
    try:
        shape = np.broadcast_to(np.empty((), x.dtype), x.shape)[index].shape
    except IndexError as e:
        raise AxisError(f"getitem: index {index!r} does not fit a tensor of shape {x.shape}: {e}") from None
    return Spec(tuple(shape), x.dtype)


def _getitem_grad(b, g, out, x, *, index):
    return [b.getitem_grad(g, index=index, shape=tuple(x.shape))]


def _getitem_cost(ins, outs, attrs):
    """Basic indexing gives a view; advanced indexing gathers (reads and writes) the output."""
    return Cost(0, 2 * nbytes(outs[0])) if _is_advanced(attrs.get("index", ())) else Cost()


@register("getitem", infer=_getitem_infer, sbp=_linear_rows(), grad=_getitem_grad, cost=_getitem_cost)
def getitem(xp, x, *, index):
    return x[index]


def _is_advanced(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(not isinstance(i, (slice, int, np.integer, type(None), type(Ellipsis))) for i in items)


@register("getitem_grad", infer=lambda g, *, index, shape: Spec(tuple(shape), g.dtype), sbp=_linear_rows(),
          cost=lambda ins, outs, attrs: Cost(0, nbytes(outs[0]) + 2 * nbytes(ins[0])),  # zeros, then g written in
          grad=lambda b, gg, out, g, *, index, shape: [b.getitem(gg, index=index)])
def getitem_grad(xp, g, *, index, shape):
    """Scatter ``g`` into zeros of ``shape`` at ``index``, adding where indices repeat."""
    z = xp.zeros(shape, dtype=g.dtype)
    if _is_advanced(index):
        xp.add.at(z, index, g)
    else:
        z[index] = g
    return z


# --------------------------------------------------------------------------- concatenate / split


def _concat_infer(*xs: Spec, axis=0) -> Spec:
    if not xs:
        raise ShapeError("concatenate: needs at least one tensor")
    if xs[0].ndim == 0:
        raise ShapeError("concatenate: zero-dimensional tensors have no axis to join along; use fs.stack")
    ax = normalize_axis("concatenate", axis, xs[0].ndim)
    for s in xs[1:]:
        if s.ndim != xs[0].ndim or any(a != c for i, (a, c) in enumerate(zip(s.shape, xs[0].shape)) if i != ax):
            shapes = ", ".join(str(t.shape) for t in xs)
            raise ShapeError(f"concatenate: shapes {shapes} differ outside axis {axis}; only the concatenation axis may differ")
    shape = list(xs[0].shape)
    shape[ax] = sum(s.shape[ax] for s in xs)
    return Spec(tuple(shape), promote_types(*(s.dtype for s in xs)))


def _concat_rows(specs, attrs):
    ax = normalize_axis("concatenate", attrs.get("axis", 0), specs[0].ndim)
    n = len(specs)
    rows = [R.SbpRow((S(i),) * n, (S(i),), "concatenating along another axis keeps this one split")
            for i in range(specs[0].ndim) if i != ax]
    return rows + _linear_rows(n)(specs, attrs)


def _concat_grad(b, g, out, *xs, axis=0):
    ax = normalize_axis("concatenate", axis, len(g.shape))
    bounds = np.cumsum([x.shape[ax] for x in xs])[:-1].tolist()
    return list(b.split(g, indices_or_sections=bounds, axis=ax))


@register("concatenate", infer=_concat_infer, sbp=_concat_rows, grad=_concat_grad, cost=copy_cost)
def concatenate(xp, *xs, axis=0):
    if xp is np:
        out = _concatenate_on_pool(xs, axis)
        if out is not None:
            return out
    return xp.concatenate(xs, axis=axis)


def _concatenate_on_pool(xs, axis):
    """A large concatenation along an inner axis (attention's q, k and v gradients), its leading
    axis split over the pool's threads (NumPy copies without the GIL): 282 -> 194 us for three
    (8, 128, 1, 256) float32 arrays. None where NumPy's own is as good (small, along axis 0) or
    the arrays are not alike (NumPy then promotes, or says why not)."""
    first = xs[0] if xs else None
    if len(xs) < 2 or type(first) is not np.ndarray or first.ndim < 2 or not isinstance(axis, (int, np.integer)):
        return None
    ax = int(axis) % first.ndim if -first.ndim <= axis < first.ndim else None
    if not ax or any(type(x) is not np.ndarray or x.dtype != first.dtype or x.ndim != first.ndim
                     or x.shape[:ax] + x.shape[ax + 1:] != first.shape[:ax] + first.shape[ax + 1:] for x in xs):
        return None
    total = sum(x.size for x in xs)
    if total < 1 << 18:
        return None
    shape = first.shape[:ax] + (sum(x.shape[ax] for x in xs),) + first.shape[ax + 1:]
    out = np.empty(shape, first.dtype)
    fused._split(lambda lo, hi: np.concatenate([x[lo:hi] for x in xs], axis=ax, out=out[lo:hi]),
                 shape[0], per_item=total // shape[0])
    return out


def _split_bounds(x: Spec, indices_or_sections, axis) -> list[int]:
    n = x.shape[axis]
    if isinstance(indices_or_sections, (int, np.integer)):
        k = int(indices_or_sections)
        if k <= 0 or n % k:
            raise ShapeError(f"split: axis {axis} of shape {x.shape} does not divide into {k} equal sections; "
                             f"pass explicit indices instead")
        return [n // k * i for i in range(1, k)]
    return [int(i) for i in indices_or_sections]


def _split_pieces(x: Spec, indices_or_sections, axis) -> list[tuple[int, int]]:
    """Each piece's [start, stop) along ``axis``: np.split slices ``x[cut_i:cut_i+1]``, so indices
    may be negative (from the end), past the end, or out of order (overlapping pieces)."""
    n = x.shape[axis]
    cuts = [0, *_split_bounds(x, indices_or_sections, axis), n]
    return [slice(lo, hi).indices(n)[:2] for lo, hi in zip(cuts[:-1], cuts[1:])]


def _split_infer(x: Spec, *, indices_or_sections, axis=0):
    ax = normalize_axis("split", axis, x.ndim)
    outs = []
    for lo, hi in _split_pieces(x, indices_or_sections, ax):
        shape = list(x.shape)
        shape[ax] = max(hi - lo, 0)
        outs.append(Spec(tuple(shape), x.dtype))
    return tuple(outs)


def _split_rows(specs, attrs):
    x = specs[0]
    ax = normalize_axis("split", attrs.get("axis", 0), x.ndim)
    k = len(_split_infer(x, indices_or_sections=attrs["indices_or_sections"], axis=ax))
    rows = [R.SbpRow((S(i),), (S(i),) * k, "splitting along another axis keeps this one split")
            for i in range(x.ndim) if i != ax]
    return rows + [R.replicated(1, k), R.SbpRow((P,), (P,) * k, "moving data is linear")]


def _split_grad(b, gs, outs, x, *, indices_or_sections, axis=0):
    ax = normalize_axis("split", axis, len(x.shape))
    pieces = [(lo, max(lo, hi)) for lo, hi in _split_pieces(Spec(tuple(x.shape), x.dtype), indices_or_sections, ax)]
    if all(hi == lo for (_, hi), (lo, _) in zip(pieces, pieces[1:])) and pieces[-1][1] == x.shape[ax]:
        # The pieces tile the axis in order (the usual case): the gradient is their concatenation.
        parts = [g if g is not None else b.zeros_like(o) for g, o in zip(gs, outs)]
        return [b.concatenate(*parts, axis=axis)]
    # Out-of-order indices give overlapping pieces: scatter each piece's gradient and add them up.
    total = None
    for g, (lo, hi) in zip(gs, pieces):
        if g is not None:
            part = b.getitem_grad(g, index=(slice(None),) * ax + (slice(lo, hi),), shape=tuple(x.shape))
            total = part if total is None else b.add(total, part)
    return [total]


@register("split", infer=_split_infer, sbp=_split_rows, grad=_split_grad, multi_output=True, cost=view_cost)
def split(xp, x, *, indices_or_sections, axis=0):
    return tuple(xp.split(x, indices_or_sections, axis=axis))


@register("zeros_like", infer=lambda x: x, sbp=lambda specs, attrs: R.pointwise(specs, [((P,), "zero is a partial sum of zeros")]),
          cost=lambda ins, outs, attrs: Cost(0, nbytes(outs[0])))  # writes zeros, reads nothing
def zeros_like(xp, x):
    return xp.zeros_like(x)


# ---------------------------------------------------------------------------------------- take


def _take_infer(a: Spec, idx: Spec, *, axis=0) -> Spec:
    if idx.dtype.kind not in "iu":
        raise DTypeError(f"take: indices must be integers, got {idx}; cast them with .astype(fs.int64)")
    ax = normalize_axis("take", axis, a.ndim)
    return Spec(a.shape[:ax] + idx.shape + a.shape[ax + 1:], a.dtype)


def _take_rows(specs, attrs):
    a, idx = specs
    ax = normalize_axis("take", attrs.get("axis", 0), a.ndim)
    rows = []
    for i in range(a.ndim):
        if i != ax:
            j = i if i < ax else i + idx.ndim - 1
            rows.append(R.SbpRow((S(i), B), (S(j),), "gathering along another axis keeps this one split"))
    for i in range(idx.ndim):
        rows.append(R.SbpRow((B, S(i)), (S(ax + i),), "each rank gathers the rows for its share of the indices"))
    rows.append(R.replicated(2))
    rows.append(R.SbpRow((P, B), (P,), "gathering rows is linear in the table"))
    # S(axis) x B -> P would need out-of-range indices to read zeros: that is the boxing of a
    # vocabulary-parallel embedding, left to a dedicated op rather than this row table.
    return rows


@register("take", infer=_take_infer, sbp=_take_rows, cost=gather_cost,
          grad=lambda b, g, out, a, idx, *, axis=0: [b.take_grad(g, idx, axis=axis, shape=tuple(a.shape)), None])
def take(xp, a, idx, *, axis=0):
    n = a.shape[axis]
    if idx.size and (int(idx.max()) >= n or int(idx.min()) < -n):
        bad = int(idx.max()) if int(idx.max()) >= n else int(idx.min())
        raise IndexOutOfRange(f"take: index {bad} is out of range for axis {axis} of size {n} "
                              f"(table shape {a.shape}); valid indices are -{n}..{n - 1}")
    return xp.take(a, idx, axis=axis)


def _take_grad_rows(specs, attrs):
    g, idx = specs
    ax = normalize_axis("take_grad", attrs.get("axis", 0), len(attrs["shape"]))
    rows = []
    for i in range(len(attrs["shape"])):
        if i != ax:
            j = i if i < ax else i + idx.ndim - 1
            rows.append(R.SbpRow((S(j), B), (S(i),), "scattering along another axis keeps this one split"))
    for i in range(idx.ndim):
        rows.append(R.SbpRow((S(ax + i), S(i)), (P,), "each rank scatters its share; the total is the sum"))
    return rows + [R.replicated(2), R.SbpRow((P, B), (P,), "scatter-add is linear in the gradient")]


@register("take_grad", infer=lambda g, idx, *, axis=0, shape: Spec(tuple(shape), g.dtype), sbp=_take_grad_rows,
          lower=local_shape_attr(), cost=scatter_add_cost,
          grad=lambda b, gg, out, g, idx, *, axis=0, shape: [b.take(gg, idx, axis=axis), None])
def take_grad(xp, g, idx, *, axis=0, shape):
    """Adjoint of take: add each gathered slice of ``g`` back at its index (repeats accumulate)."""
    ax = axis % len(shape)
    z = xp.zeros(shape, dtype=g.dtype)
    zm = xp.moveaxis(z, ax, 0)
    flat_idx = idx.reshape(-1)
    flat_idx = xp.where(flat_idx < 0, flat_idx + zm.shape[0], flat_idx)
    gm = xp.moveaxis(g, list(range(ax, ax + idx.ndim)), list(range(idx.ndim))).reshape((flat_idx.size,) + zm.shape[1:])
    if zm.ndim == 2 and ax == 0 and fused.scatter_add_rows(z, flat_idx, gm):
        return z  # the embedding gradient's one-pass kernel (float32)
    if zm.ndim == 2 and xp is np:
        # Sort-and-segment-sum: much faster than np.add.at for embedding-sized scatters.
        order = np.argsort(flat_idx, kind="stable")
        sorted_idx = flat_idx[order]
        starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]]) if sorted_idx.size else sorted_idx
        if sorted_idx.size:
            zm[sorted_idx[starts]] = np.add.reduceat(gm[order], starts, axis=0)
    else:
        xp.add.at(zm, flat_idx, gm)
    return z

"""The Python Array API standard (2024.12) over :class:`Tensor`: ``flowsys`` is the namespace.

Every function here is a registered op (``flowsys.ops``) or a composition of them, so it runs
on local tensors, on global tensors (by the ops' SBP rows) and inside ``fs.Graph`` (traced), and
differentiates where the standard's function is differentiable. The functions whose output shape
depends on the values (``nonzero``, ``unique_*``) run eagerly only: inside a graph they raise a
:class:`GraphError`, as JAX's do under ``jit``.

Where NumPy and the standard differ, this follows the standard; ``docs/array-api.md`` lists the
differences (default float32, integer sums in int64, ``abs`` of a complex tensor real, ...).

>>> import flowsys as fs
>>> x = fs.asarray([[3, 1], [2, 5]])
>>> fs.sort(x, axis=1).tolist(), fs.cumulative_sum(x, axis=0).tolist()
([[1, 3], [2, 5]], [[3, 1], [5, 6]])
"""

from __future__ import annotations

import builtins
import importlib.util
import math
from collections import namedtuple
from dataclasses import dataclass

import ml_dtypes
import numpy as np

import flowsys as _flowsys
from flowsys.errors import ArgumentError, AxisError, DTypeError, GraphError, ShapeError
from flowsys.functions import _place, asarray, zeros, zeros_like
from flowsys.ops.math import BINARY, UNARY, check_category, real_dtype
from flowsys.ops.registry import bfloat16, is_floating, normalize_axes, normalize_axis, promote_types
from flowsys.tensor import DEFAULT_FLOAT, Tensor, _axis_attr, _float_pair, _operand, _pair, apply

__array_api_version__ = "2024.12"

# ------------------------------------------------------------------------------------- dtypes

bool = np.dtype(np.bool_)  # noqa: A001 - the standard's name
int8, int16, int32, int64 = (np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64))
uint8, uint16, uint32, uint64 = (np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64))
float32, float64 = np.dtype(np.float32), np.dtype(np.float64)
complex64, complex128 = np.dtype(np.complex64), np.dtype(np.complex128)

e, inf, nan, pi = math.e, math.inf, math.nan, math.pi
newaxis = None

_DTYPES = {d.name: d for d in (bool, int8, int16, int32, int64, uint8, uint16, uint32, uint64, float32, float64,
                               complex64, complex128)}
_KINDS = {
    "bool": lambda d: d == bool,
    "signed integer": lambda d: d.kind == "i",
    "unsigned integer": lambda d: d.kind == "u",
    "integral": lambda d: d.kind in "iu",
    "real floating": is_floating,  # float16 and bfloat16 included
    "complex floating": lambda d: d.kind == "c",
    "numeric": lambda d: d.kind in "iuc" or is_floating(d),
}


def _t(x) -> Tensor:
    return x if isinstance(x, Tensor) else asarray(x)


def _operands(x1, x2) -> tuple[Tensor, Tensor]:
    """Two operands of a binary function; one may be a Python scalar, which takes the tensor's
    dtype (the standard's rule, as for operators)."""
    if isinstance(x1, Tensor):
        return _pair(x1, x2)
    if isinstance(x2, Tensor):
        return _pair(x2, x1)[::-1]
    return _t(x1), _t(x2)


# ---------------------------------------------------------------------------------- elementwise


def _unary(name: str, op: str):
    def f(x, /):
        return apply(op, _t(x))

    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"The standard's ``{name}``, elementwise (op ``{op}``)."
    return f


def _binary(name: str, op: str):
    def f(x1, x2, /):
        return apply(op, *_operands(x1, x2))

    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"The standard's ``{name}``, elementwise with broadcasting (op ``{op}``)."
    return f


_STANDARD_UNARY = {**{n: n for n in UNARY}, "negative": "neg", "exp": "exp", "log": "log", "sqrt": "sqrt",
                   "tanh": "tanh", "logical_not": "logical_not"}
_STANDARD_BINARY = {**{n: n for n in BINARY}, "add": "add", "subtract": "sub", "multiply": "mul", "pow": "pow",
                    "maximum": "maximum", "equal": "eq", "not_equal": "ne", "less": "lt", "less_equal": "le",
                    "greater": "gt", "greater_equal": "ge"}
globals().update({name: _unary(name, op) for name, op in _STANDARD_UNARY.items()})
globals().update({name: _binary(name, op) for name, op in _STANDARD_BINARY.items()})


def divide(x1, x2, /):
    """True division; integer operands divide as float32 (the default floating type)."""
    return apply("div", *_float_pair(*_operands(x1, x2)))


def clip(x, /, min=None, max=None):  # noqa: A002 - the standard's names
    """``x`` limited to ``[min, max]`` (either may be None, a scalar or a tensor); NaN stays NaN.
    The result keeps ``x``'s dtype."""
    x = _t(x)
    check_category("clip", "real-valued", x)
    out = x
    for bound, below in ((min, True), (max, False)):
        if bound is None:
            continue
        b = _operand(bound, x) if not isinstance(bound, Tensor) else bound
        if b.dtype != x.dtype:
            b = b.astype(x.dtype)
        out = apply("where", apply("lt" if below else "gt", out, b), b, out)
    return apply("astype", x, dtype=x.dtype, copy=True) if out is x else out


# --------------------------------------------------------------------------------- statistics


def _dtype_attr(dtype):
    return None if dtype is None else np.dtype(dtype)


def sum(x, /, axis=None, *, dtype=None, keepdims: builtins.bool = False):  # noqa: A001
    """Integers and bools sum in int64 (uint64 for unsigned), floats in their own type."""
    return apply("sum", _t(x), axis=_axis_attr(axis), keepdims=keepdims, dtype=_dtype_attr(dtype))


def prod(x, /, axis=None, *, dtype=None, keepdims: builtins.bool = False):
    """The product (integers in int64 / uint64). No gradient rule: see ``flowsys.ops.reduce``."""
    return apply("prod", _t(x), axis=_axis_attr(axis), keepdims=keepdims, dtype=_dtype_attr(dtype))


def mean(x, /, axis=None, *, keepdims: builtins.bool = False):
    return _t(x).mean(axis, keepdims)


def var(x, /, axis=None, *, correction=0.0, keepdims: builtins.bool = False, ddof=None):
    """Variance with ``correction`` degrees of freedom removed (NumPy's ``ddof`` also taken)."""
    return _t(x).var(axis, keepdims, correction if ddof is None else ddof)


def std(x, /, axis=None, *, correction=0.0, keepdims: builtins.bool = False, ddof=None):
    return apply("sqrt", var(x, axis, correction=correction, keepdims=keepdims, ddof=ddof))


def max(x, /, axis=None, *, keepdims: builtins.bool = False):  # noqa: A001
    return _t(x).max(axis, keepdims)


def min(x, /, axis=None, *, keepdims: builtins.bool = False):  # noqa: A001
    return _t(x).min(axis, keepdims)


def _scan(op, x, axis, dtype, include_initial):
    x = _t(x)
    if axis is None:
        if x.ndim != 1:
            raise AxisError(f"{op}: axis=None takes a 1-D tensor, got shape {x.shape}; pass axis=")
        axis = 0
    axis = normalize_axis(op, axis, x.shape)
    return apply(op, x, axis=axis, include_initial=builtins.bool(include_initial), dtype=_dtype_attr(dtype))


def cumulative_sum(x, /, axis=None, *, dtype=None, include_initial: builtins.bool = False):
    """Running sums along ``axis`` (required unless ``x`` is 1-D); ``include_initial`` puts a zero first."""
    return _scan("cumulative_sum", x, axis, dtype, include_initial)


def cumulative_prod(x, /, axis=None, *, dtype=None, include_initial: builtins.bool = False):
    """Running products along ``axis``; ``include_initial`` puts a one first. No gradient rule."""
    return _scan("cumulative_prod", x, axis, dtype, include_initial)


# ----------------------------------------------------------------------------------- searching


def argmax(x, /, axis=None, *, keepdims: builtins.bool = False):
    return _t(x).argmax(axis, keepdims)


def argmin(x, /, axis=None, *, keepdims: builtins.bool = False):
    x = _t(x)
    return apply("argmin", x, axis=None if axis is None else normalize_axis("argmin", axis, x.shape), keepdims=keepdims)


def count_nonzero(x, /, axis=None, *, keepdims: builtins.bool = False):
    """The number of non-zero elements (int64), a sum: exact on a split axis."""
    x = _t(x)
    return apply("sum", apply("ne", x, _operand(0, x)), axis=_axis_attr(axis), keepdims=keepdims)


def any(x, /, axis=None, *, keepdims: builtins.bool = False):  # noqa: A001
    """Whether any element is true (non-zero): a count compared with 0, so a split axis works."""
    return apply("gt", count_nonzero(x, axis=axis, keepdims=keepdims), _t(0))


def all(x, /, axis=None, *, keepdims: builtins.bool = False):  # noqa: A001
    """Whether every element is true (non-zero): the zeros counted, compared with 0."""
    x = _t(x)
    zeros = apply("sum", apply("eq", x, _operand(0, x)), axis=_axis_attr(axis), keepdims=keepdims)
    return apply("eq", zeros, _t(0))


def where(condition, x1, x2, /):
    """Elements of ``x1`` where ``condition`` holds, else of ``x2`` (broadcasting; either may be
    a Python scalar, which takes the other's dtype)."""
    x1, x2 = _operands(x1, x2)
    return apply("where", _t(condition), x1, x2)


def searchsorted(x1, x2, /, *, side="left", sorter=None):
    """Where each of ``x2`` would go in the sorted 1-D ``x1`` (``sorter``: the order that sorts it)."""
    x1 = _t(x1)
    if sorter is not None:
        x1 = take(x1, _t(sorter), axis=0)
    x2 = _operand(x2, x1) if not isinstance(x2, Tensor) else x2
    return apply("searchsorted", x1, x2, side=side)


def _concrete(op: str, x: Tensor) -> np.ndarray:
    """``x``'s value, for a function whose output shape depends on it (not traceable)."""
    try:
        return x.numpy()
    except GraphError:
        raise GraphError(f"{op}: the output's shape depends on the tensor's values, which a graph does not know "
                         f"when it is traced (as under jax.jit); call it outside Graph.build(), or use a "
                         f"fixed-shape form such as fs.where(mask, x, 0)") from None


def _like(value: np.ndarray, x: Tensor) -> Tensor:
    """A value computed from ``x``'s logical value, where ``x`` lives (replicated if global)."""
    return _place(np.array(value, order="C"), x.device if x.placement is None else "cpu", False, x.placement)


def nonzero(x, /):
    """The indices of the non-zero elements, one int64 tensor per axis (eager only)."""
    x = _t(x)
    if x.ndim == 0:
        raise ShapeError("nonzero: a 0-d tensor has no axes to index; reshape it to (1,) first")
    return tuple(_like(i.astype(np.int64), x) for i in np.nonzero(_concrete("nonzero", x)))


# --------------------------------------------------------------------------------------- sets

UniqueAll = namedtuple("UniqueAll", ["values", "indices", "inverse_indices", "counts"])
UniqueCounts = namedtuple("UniqueCounts", ["values", "counts"])
UniqueInverse = namedtuple("UniqueInverse", ["values", "inverse_indices"])


def unique_all(x, /):
    """Distinct values (sorted; every NaN distinct), first indices, inverse indices (``x``'s
    shape) and counts (eager only)."""
    x = _t(x)
    r = np.unique_all(_concrete("unique_all", x))
    return UniqueAll(_like(r.values, x), _like(r.indices.astype(np.int64), x),
                     _like(r.inverse_indices.astype(np.int64).reshape(x.shape), x), _like(r.counts.astype(np.int64), x))


def unique_counts(x, /):
    x = _t(x)
    r = np.unique_counts(_concrete("unique_counts", x))
    return UniqueCounts(_like(r.values, x), _like(r.counts.astype(np.int64), x))


def unique_inverse(x, /):
    x = _t(x)
    r = np.unique_inverse(_concrete("unique_inverse", x))
    return UniqueInverse(_like(r.values, x), _like(r.inverse_indices.astype(np.int64).reshape(x.shape), x))


def unique_values(x, /):
    x = _t(x)
    return _like(np.unique_values(_concrete("unique_values", x)), x)


# ------------------------------------------------------------------------------------- sorting


def argsort(x, /, axis=-1, *, descending: builtins.bool = False, stable: builtins.bool = True):
    """Indices that sort ``x`` along ``axis``; always stable (ties keep their order)."""
    x = _t(x)
    return apply("argsort", x, axis=normalize_axis("argsort", axis, x.shape), descending=builtins.bool(descending))


def sort(x, /, axis=-1, *, descending: builtins.bool = False, stable: builtins.bool = True):
    """``x`` sorted along ``axis``: a gather by :func:`argsort`, so it has a gradient."""
    x = _t(x)
    axis = normalize_axis("sort", axis, x.shape)
    return apply("take_along_axis", x, argsort(x, axis=axis, descending=descending), axis=axis)


# -------------------------------------------------------------------------------- manipulation


def broadcast_to(x, /, shape):
    return apply("broadcast_to", _t(x), shape=tuple(int(d) for d in shape))


def broadcast_shapes(*shapes) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ShapeError(f"broadcast_shapes: shapes {' and '.join(map(str, shapes))} do not broadcast") from None


def broadcast_arrays(*arrays) -> list[Tensor]:
    arrays = [_t(a) for a in arrays]
    shape = broadcast_shapes(*(a.shape for a in arrays))
    return [a if a.shape == shape else broadcast_to(a, shape) for a in arrays]


def concatenate(arrays, axis: int = 0):
    """NumPy's name for :func:`concat`."""
    return concat(arrays, axis=axis)


def concat(arrays, /, axis=0):
    """Join tensors along an existing ``axis`` (``axis=None``: flattened first)."""
    arrays = [_t(a) for a in arrays]
    if not arrays:
        raise ArgumentError("concat: needs at least one tensor")
    if axis is None:
        arrays, axis = [a.reshape(-1) for a in arrays], 0
    dtype = promote_types(*(a.dtype for a in arrays))
    return apply("concatenate", *(a.astype(dtype) for a in arrays), axis=axis)


def expand_dims(x, /, axis=0):
    """``x`` with a size-1 axis inserted at ``axis`` (an int or a tuple of them)."""
    x = _t(x)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    ndim = x.ndim + len(axes)
    new = sorted(normalize_axis("expand_dims", a, ndim) for a in axes)
    if len(set(new)) != len(new):
        raise AxisError(f"expand_dims: repeated axis in {axis}")
    shape, it = [], iter(x.shape)
    for i in range(ndim):
        shape.append(1 if i in new else next(it))
    return x.reshape(tuple(shape))


def flip(x, /, axis=None):
    x = _t(x)
    return apply("flip", x, axis=None if axis is None else normalize_axes("flip", axis, x.shape))


def moveaxis(x, source, destination, /):
    x = _t(x)
    src = (source,) if isinstance(source, int) else tuple(source)
    dst = (destination,) if isinstance(destination, int) else tuple(destination)
    if len(src) != len(dst):
        raise AxisError(f"moveaxis: {len(src)} source axes but {len(dst)} destinations")
    src = [normalize_axis("moveaxis", a, x.shape) for a in src]
    dst = [normalize_axis("moveaxis", a, x.shape) for a in dst]
    if len(set(src)) != len(src) or len(set(dst)) != len(dst):
        raise AxisError(f"moveaxis: repeated axis in {source} or {destination}")
    order = [a for a in range(x.ndim) if a not in src]
    for d, s in sorted(zip(dst, src)):
        order.insert(d, s)
    return permute_dims(x, tuple(order))


def permute_dims(x, /, axes):
    x = _t(x)
    axes = tuple(int(a) for a in axes)
    if sorted(normalize_axis("permute_dims", a, x.shape) for a in axes) != list(range(x.ndim)):
        raise AxisError(f"permute_dims: {axes} is not a permutation of the {x.ndim} axes of shape {x.shape}")
    return apply("transpose", x, axes=axes)


def repeat(x, repeats, /, axis=None):
    """Each element repeated ``repeats`` times (an int, or one count per element along ``axis``;
    ``axis=None`` repeats the flattened tensor). A tensor of counts is read: eager only."""
    x = _t(x)
    if isinstance(repeats, Tensor):
        repeats = _concrete("repeat", repeats)
    if not isinstance(repeats, int):
        repeats = tuple(int(r) for r in np.asarray(repeats).reshape(-1))
    if axis is not None:
        axis = normalize_axis("repeat", axis, x.shape)
    return apply("repeat", x, repeats=repeats, axis=axis)


def reshape(x, /, shape, *, copy=None):
    x = _t(x)
    shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    out = x.reshape(shape)
    return apply("astype", out, dtype=out.dtype, copy=True) if copy else out


def roll(x, /, shift, *, axis=None):
    x = _t(x)
    shift = int(shift) if isinstance(shift, (int, np.integer)) else tuple(int(s) for s in shift)
    if axis is not None:
        axis = normalize_axis("roll", axis, x.shape) if isinstance(axis, (int, np.integer)) else \
            tuple(normalize_axis("roll", a, x.shape) for a in axis)
        if isinstance(axis, tuple) and isinstance(shift, int):
            shift = (shift,) * len(axis)
    return apply("roll", x, shift=shift, axis=axis)


def squeeze(x, /, axis=None):
    """``x`` without the size-1 axes ``axis`` (an int or a tuple; None: every size-1 axis)."""
    x = _t(x)
    if axis is None:
        return x.reshape(tuple(d for d in x.shape if d != 1))
    axes = normalize_axes("squeeze", axis, x.shape)
    for a in axes:
        if x.shape[a] != 1:
            raise ShapeError(f"squeeze: axis {a} of shape {x.shape} has size {x.shape[a]}, not 1")
    return x.reshape(tuple(d for i, d in enumerate(x.shape) if i not in axes))


def stack(arrays, /, axis=0):
    """Join tensors of one shape along a new ``axis``."""
    arrays = [_t(a) for a in arrays]
    if not arrays:
        raise ArgumentError("stack: needs at least one tensor")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ShapeError(f"stack: tensors of different shapes {sorted(shapes)}; stack takes one shape")
    axis = normalize_axis("stack", axis, arrays[0].ndim + 1)
    return concat([expand_dims(a, axis=axis) for a in arrays], axis=axis)


def tile(x, repetitions, /):
    """``x`` repeated ``repetitions[i]`` times along axis ``i``: a broadcast and a reshape, so
    it has a gradient and SBP rows."""
    x = _t(x)
    reps = tuple(int(r) for r in repetitions)
    n = builtins.max(x.ndim, len(reps))
    shape = (1,) * (n - x.ndim) + x.shape
    reps = (1,) * (n - len(reps)) + reps
    inter = tuple(v for r, d in zip(reps, shape) for v in (1, d))
    target = tuple(v for r, d in zip(reps, shape) for v in (r, d))
    return broadcast_to(x.reshape(inter), target).reshape(tuple(r * d for r, d in zip(reps, shape)))


def unstack(x, /, axis=0):
    """The slices of ``x`` along ``axis``, as a tuple."""
    x = _t(x)
    axis = normalize_axis("unstack", axis, x.shape)
    return tuple(x[(slice(None),) * axis + (i,)] for i in range(x.shape[axis]))


# ------------------------------------------------------------------------------ linear algebra


def matmul(x1, x2, /):
    x1, x2 = _t(x1), _t(x2)
    return apply("matmul", x1, x2)


def matrix_transpose(x, /):
    return _t(x).mT


def tensordot(x1, x2, /, *, axes=2):
    """Contract the last ``axes`` axes of ``x1`` with the first of ``x2`` (or the listed pairs):
    a transpose, a reshape and a matmul."""
    x1, x2 = _t(x1), _t(x2)
    if isinstance(axes, int):
        if axes < 0:
            raise ArgumentError(f"tensordot: axes must be non-negative, got {axes}")
        a1, a2 = list(range(x1.ndim - axes, x1.ndim)), list(range(axes))
    else:
        a1 = [normalize_axis("tensordot", a, x1.shape) for a in axes[0]]
        a2 = [normalize_axis("tensordot", a, x2.shape) for a in axes[1]]
    for i, j in zip(a1, a2):
        if x1.shape[i] != x2.shape[j] and 1 not in (x1.shape[i], x2.shape[j]):
            raise ShapeError(f"tensordot: axis {i} of {x1.shape} and axis {j} of {x2.shape} differ in size")
    k = [builtins.max(x1.shape[i], x2.shape[j]) for i, j in zip(a1, a2)]
    free1 = [i for i in range(x1.ndim) if i not in a1]
    free2 = [j for j in range(x2.ndim) if j not in a2]
    dtype = promote_types(x1.dtype, x2.dtype)
    p1 = permute_dims(x1, free1 + a1)
    p1 = broadcast_to(p1, tuple(x1.shape[i] for i in free1) + tuple(k)).astype(dtype)
    p2 = permute_dims(x2, a2 + free2)
    p2 = broadcast_to(p2, tuple(k) + tuple(x2.shape[j] for j in free2)).astype(dtype)
    m = math.prod(x1.shape[i] for i in free1)
    n = math.prod(x2.shape[j] for j in free2)
    out = matmul(p1.reshape((m, math.prod(k))), p2.reshape((math.prod(k), n)))
    return out.reshape(tuple(x1.shape[i] for i in free1) + tuple(x2.shape[j] for j in free2))


def vecdot(x1, x2, /, axis=-1):
    """The dot product of vectors along ``axis`` (the first operand conjugated), broadcasting
    the other axes."""
    x1, x2 = _t(x1), _t(x2)
    if not -builtins.min(x1.ndim, x2.ndim) <= axis < 0 and not 0 <= axis < builtins.min(x1.ndim, x2.ndim):
        raise AxisError(f"vecdot: axis {axis} is out of range for shapes {x1.shape} and {x2.shape}")
    a1, a2 = normalize_axis("vecdot", axis, x1.shape), normalize_axis("vecdot", axis, x2.shape)
    if x1.shape[a1] != x2.shape[a2]:
        raise ShapeError(f"vecdot: axis {axis} has size {x1.shape[a1]} in {x1.shape} but {x2.shape[a2]} in {x2.shape}")
    if x1.dtype.kind == "c":
        x1 = apply("conj", x1)
    x1, x2 = moveaxis(x1, a1, -1), moveaxis(x2, a2, -1)
    product = apply("mul", x1, x2)
    return sum(product, axis=-1, dtype=product.dtype)  # the operands' type: no widening of integers


# ----------------------------------------------------------------------------------- indexing


def take(x, indices, /, axis=None):
    """Slices of ``x`` at ``indices`` along ``axis``: ``take(table, ids)`` is an embedding lookup.
    Without ``axis``, axis 0 (the standard asks for ``axis`` unless ``x`` is 1-D; flowsys keeps
    its earlier default rather than flattening as NumPy does)."""
    x = _t(x)
    if axis is None:
        axis = 0
    idx = indices if isinstance(indices, Tensor) else asarray(np.asarray(indices, dtype=np.int64))
    return apply("take", x, idx, axis=normalize_axis("take", axis, x.shape))


def take_along_axis(x, indices, /, axis=-1):
    x = _t(x)
    return apply("take_along_axis", x, _t(indices), axis=normalize_axis("take_along_axis", axis, x.shape))


# ------------------------------------------------------------------------------------ utility


def diff(x, /, axis=-1, *, n=1, prepend=None, append=None):
    """The ``n``-th forward difference along ``axis``, with ``prepend``/``append`` joined first."""
    x = _t(x)
    axis = normalize_axis("diff", axis, x.shape)
    if n < 0:
        raise ArgumentError(f"diff: n must be non-negative, got {n}")
    parts = [p for p in (prepend, x, append) if p is not None]
    if len(parts) > 1:
        x = concat([_t(p) for p in parts], axis=axis)
    head = (slice(None),) * axis
    for _ in range(n):
        if x.shape[axis] == 0:
            break
        x = apply("sub", x[head + (slice(1, None),)], x[head + (slice(None, -1),)]) if x.dtype != bool else \
            apply("ne", x[head + (slice(1, None),)], x[head + (slice(None, -1),)])
    return x


# --------------------------------------------------------------------------------- data types


def astype(x, dtype, /, *, copy: builtins.bool = True, device=None):
    """``x`` as ``dtype``; a copy unless ``copy=False`` and nothing changes."""
    x, dtype = _t(x), np.dtype(dtype)
    out = x if dtype == x.dtype and not copy else apply("astype", x, dtype=dtype, copy=builtins.bool(copy))
    return out if device is None else out.to(device)


def _dtype_of(x) -> np.dtype:
    return x.dtype if isinstance(x, Tensor) else np.dtype(x)


def can_cast(from_, to, /) -> builtins.bool:
    """Whether the standard's promotion rules allow casting ``from_`` to ``to`` (no kind is lost)."""
    return builtins.bool(np.can_cast(_dtype_of(from_), np.dtype(to), casting="safe") or
                         (_dtype_of(from_) == bfloat16 and is_floating(to) and np.dtype(to).itemsize >= 4))


def result_type(*arrays_and_dtypes):
    """The dtype of an op on these tensors, dtypes and Python scalars (scalars take the
    tensors' types: ``result_type(int8_x, 1) == int8``)."""
    dtypes = [_dtype_of(a) for a in arrays_and_dtypes if not isinstance(a, (builtins.bool, int, float, complex))]
    scalars = [a for a in arrays_and_dtypes if isinstance(a, (builtins.bool, int, float, complex))]
    if not dtypes:
        raise ArgumentError("result_type: needs at least one tensor or dtype (Python scalars alone have no dtype)")
    out = promote_types(*dtypes)
    for s in scalars:
        if isinstance(s, complex) and out.kind != "c":
            out = complex128 if out == float64 else complex64
        elif isinstance(s, float) and out.kind in "biu":
            out = DEFAULT_FLOAT
        elif isinstance(s, int) and not isinstance(s, builtins.bool) and out == bool:
            out = int64
    return out


def isdtype(dtype, kind) -> builtins.bool:
    """Whether ``dtype`` is of ``kind``: a dtype, one of the standard's kind names ('bool',
    'signed integer', 'unsigned integer', 'integral', 'real floating' — float16 and bfloat16
    included —, 'complex floating', 'numeric') or a tuple of them."""
    dtype = np.dtype(dtype)
    if isinstance(kind, tuple):
        return builtins.any(isdtype(dtype, k) for k in kind)
    if isinstance(kind, str):
        if kind not in _KINDS:
            raise ArgumentError(f"isdtype: unknown kind {kind!r}; one of {', '.join(map(repr, _KINDS))}")
        return builtins.bool(_KINDS[kind](dtype))
    return dtype == np.dtype(kind)


@dataclass(frozen=True)
class finfo_object:
    """Machine limits of a floating type (Python floats, as the standard asks)."""

    bits: int
    eps: float
    max: float
    min: float
    smallest_normal: float
    dtype: np.dtype


@dataclass(frozen=True)
class iinfo_object:
    bits: int
    max: int
    min: int
    dtype: np.dtype


def finfo(type, /) -> finfo_object:  # noqa: A002 - the standard's name
    dtype = _dtype_of(type)
    if not (is_floating(dtype) or dtype.kind == "c"):
        raise DTypeError(f"finfo: takes a floating-point dtype, got {dtype}; iinfo describes integers")
    f = ml_dtypes.finfo(dtype) if dtype == bfloat16 else np.finfo(dtype)
    return finfo_object(int(f.bits), float(f.eps), float(f.max), float(f.min), float(f.smallest_normal),
                        real_dtype(dtype))


def iinfo(type, /) -> iinfo_object:  # noqa: A002
    dtype = _dtype_of(type)
    if dtype.kind not in "iu":
        raise DTypeError(f"iinfo: takes an integer dtype, got {dtype}; finfo describes floating types")
    i = np.iinfo(dtype)
    return iinfo_object(int(i.bits), int(i.max), int(i.min), dtype)


# ------------------------------------------------------------------------------------- creation


def empty(shape, *more, dtype=None, device=None, **kw):
    """Like :func:`zeros` (flowsys does not hand out uninitialised memory)."""
    return zeros(shape, *more, dtype=dtype, device=device, **kw)


def empty_like(x, /, *, dtype=None, device=None):
    return zeros_like(x, dtype=dtype, device=device)


def full_like(x, /, fill_value, *, dtype=None, device=None):
    """``fill_value`` in ``x``'s shape, dtype (unless given) and device or placement."""
    dtype = x.dtype if dtype is None else np.dtype(dtype)
    return _place(np.full(x.shape, fill_value, dtype), x.device if device is None else device, False, x.placement,
                  x.sbp)


def eye(n_rows, n_cols=None, /, *, k=0, dtype=None, device=None):
    return asarray(np.eye(n_rows, n_cols, k=k, dtype=DEFAULT_FLOAT if dtype is None else np.dtype(dtype)),
                   device=device)


def linspace(start, stop, /, num, *, dtype=None, device=None, endpoint: builtins.bool = True):
    """``num`` evenly spaced values from ``start`` to ``stop`` (float32 unless a complex bound
    makes it complex64)."""
    if dtype is None:
        dtype = complex64 if builtins.any(isinstance(v, complex) for v in (start, stop)) else DEFAULT_FLOAT
    dtype = np.dtype(dtype)
    wide = complex128 if dtype.kind == "c" else float64
    return asarray(np.linspace(start, stop, num, endpoint=endpoint, dtype=wide).astype(dtype), device=device)


def meshgrid(*arrays, indexing="xy"):
    """Coordinate grids from 1-D tensors (broadcasts, so global and traced tensors work)."""
    if indexing not in ("xy", "ij"):
        raise ArgumentError(f"meshgrid: indexing is 'xy' or 'ij', got {indexing!r}")
    arrays = [_t(a) for a in arrays]
    for a in arrays:
        if a.ndim != 1:
            raise ShapeError(f"meshgrid: takes 1-D tensors, got shape {a.shape}")
    n = len(arrays)
    shape = [a.shape[0] for a in arrays]
    if indexing == "xy" and n > 1:
        shape[0], shape[1] = shape[1], shape[0]
    out = []
    for i, a in enumerate(arrays):
        pos = (1 if i == 0 else 0 if i == 1 else i) if indexing == "xy" and n > 1 else i
        view = [1] * n
        view[pos] = a.shape[0]
        out.append(broadcast_to(a.reshape(tuple(view)), tuple(shape)))
    return out


def tril(x, /, *, k=0):
    return apply("tril", _t(x), k=int(k))


def triu(x, /, *, k=0):
    return apply("triu", _t(x), k=int(k))


def from_dlpack(x, /, *, device=None, copy=None):
    """A tensor sharing the memory of any DLPack producer (NumPy, PyTorch, CuPy, flowsys)."""
    if copy is not None or device is not None:
        arr = np.from_dlpack(x, device=device, copy=copy)
    else:
        arr = np.from_dlpack(x)
    return asarray(arr)


# ----------------------------------------------------------------------------------- inspection


class Info:
    """What ``fs.__array_namespace_info__()`` returns: devices, default and supported dtypes."""

    def capabilities(self) -> dict:
        return {"boolean indexing": True, "data-dependent shapes": True, "max dimensions": 64}

    def default_device(self):
        return "cpu"

    def devices(self) -> list:
        return ["cpu"] + (["cuda"] if importlib.util.find_spec("cupy") is not None else [])

    def default_dtypes(self, *, device=None) -> dict:
        return {"real floating": DEFAULT_FLOAT, "complex floating": complex64, "integral": int64, "indexing": int64}

    def dtypes(self, *, device=None, kind=None) -> dict:
        if kind is None:
            return dict(_DTYPES)
        return {name: d for name, d in _DTYPES.items() if isdtype(d, kind)}


def __array_namespace_info__() -> Info:
    return Info()


__all__ = list(_flowsys._ARRAY_API)  # the package lists the names so that importing it stays light

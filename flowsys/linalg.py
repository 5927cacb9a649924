"""The Array API standard's ``linalg`` extension (2024.12): ``fs.linalg``.

All 23 functions: the factorisations and solvers are registered ops (``flowsys.ops.decomp``:
stacks of matrices, batch axes split on a mesh), the rest compose ops (norms, ``trace``,
``diagonal``, ``cross``, ``outer``, ``matrix_power``, ``matrix_rank``), so every function runs on
local, global and traced tensors. Gradients where ``flowsys.ops.decomp`` says.

>>> import flowsys as fs
>>> a = fs.asarray([[4.0, 2.0], [2.0, 3.0]])
>>> fs.linalg.cholesky(a).tolist(), round(float(fs.linalg.det(a)), 4)
([[2.0, 0.0], [1.0, 1.4142135381698608]], 8.0)
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np

from flowsys import array_api as A
from flowsys.array_api import _t, matmul, matrix_transpose, tensordot, vecdot
from flowsys.errors import ArgumentError, ShapeError
from flowsys.ops.math import check_category, real_dtype
from flowsys.ops.registry import normalize_axes, normalize_axis
from flowsys.tensor import Tensor, apply

__all__ = ["cholesky", "cross", "det", "diagonal", "eigh", "eigvalsh", "inv", "matmul", "matrix_norm", "matrix_power",
           "matrix_rank", "matrix_transpose", "outer", "pinv", "qr", "slogdet", "solve", "svd", "svdvals", "tensordot",
           "trace", "vecdot", "vector_norm"]

EighResult = namedtuple("EighResult", ["eigenvalues", "eigenvectors"])
QRResult = namedtuple("QRResult", ["Q", "R"])
SlogdetResult = namedtuple("SlogdetResult", ["sign", "logabsdet"])
SVDResult = namedtuple("SVDResult", ["U", "S", "Vh"])


def cholesky(x, /, *, upper: bool = False):
    """The Cholesky factor of symmetric (Hermitian) positive-definite matrices: lower, or upper."""
    return apply("cholesky", _t(x), upper=bool(upper))


def det(x, /):
    return apply("det", _t(x))


def inv(x, /):
    return apply("inv", _t(x))


def slogdet(x, /):
    """The sign and the log of the absolute value of the determinant (without overflow)."""
    return SlogdetResult(*apply("slogdet", _t(x)))


def solve(x1, x2, /):
    """``x`` with ``x1 @ x = x2``; a 1-D ``x2`` is one vector (the standard's rule)."""
    return apply("solve", _t(x1), _t(x2))


def eigh(x, /):
    """Eigenvalues (ascending) and eigenvectors of symmetric (Hermitian) matrices. No gradient."""
    return EighResult(*apply("eigh", _t(x)))


def eigvalsh(x, /):
    return apply("eigvalsh", _t(x))


def qr(x, /, *, mode: str = "reduced"):
    return QRResult(*apply("qr", _t(x), mode=mode))


def svd(x, /, *, full_matrices: bool = True):
    return SVDResult(*apply("svd", _t(x), full_matrices=bool(full_matrices)))


def svdvals(x, /):
    """The singular values, descending (with a gradient: ``U diag(g) Vh``)."""
    return apply("svdvals", _t(x))


def pinv(x, /, *, rtol=None):
    """The pseudo-inverse (``rtol``: a number or one per matrix; by default max(M, N) times the
    dtype's epsilon, the standard's choice). No gradient."""
    x = _t(x)
    if rtol is None:
        rtol = max(x.shape[-2:]) * float(np.finfo(real_dtype(x.dtype)).eps)
    return apply("pinv", x, A.astype(_t(rtol), real_dtype(x.dtype)) if isinstance(rtol, Tensor) else
                 _t(np.asarray(rtol, dtype=real_dtype(x.dtype))))


def matrix_rank(x, /, *, rtol=None):
    """The number of singular values above ``rtol`` times the largest (int64); ``rtol``
    defaults to max(M, N) times the dtype's epsilon, and may be a tensor (one per matrix)."""
    x = _t(x)
    if x.ndim < 2:
        raise ShapeError(f"matrix_rank: takes a matrix or a stack of them, got shape {x.shape}")
    s = svdvals(x)
    if rtol is None:
        rtol = max(x.shape[-2:]) * float(np.finfo(s.dtype).eps)
    rtol = A.astype(_t(rtol), s.dtype) if isinstance(rtol, Tensor) else _t(np.asarray(rtol, dtype=s.dtype))
    if rtol.ndim:
        rtol = rtol.reshape(tuple(rtol.shape) + (1,))
    tol = apply("mul", A.max(s, axis=-1, keepdims=True), rtol)
    return A.count_nonzero(apply("gt", s, tol), axis=-1)


def diagonal(x, /, *, offset: int = 0):
    """The ``offset`` diagonal of each matrix (a gather, so it has a gradient)."""
    x = _t(x)
    if x.ndim < 2:
        raise ShapeError(f"diagonal: takes a matrix or a stack of them, got shape {x.shape}")
    m, n = x.shape[-2:]
    start_r, start_c = (0, offset) if offset >= 0 else (-offset, 0)
    k = max(0, min(m - start_r, n - start_c))
    rows, cols = np.arange(start_r, start_r + k), np.arange(start_c, start_c + k)
    return x[(Ellipsis, rows, cols)]


def trace(x, /, *, offset: int = 0, dtype=None):
    """The sum of each matrix's ``offset`` diagonal (integers in int64, as ``sum``)."""
    return A.sum(diagonal(x, offset=offset), axis=-1, dtype=dtype)


def outer(x1, x2, /):
    x1, x2 = _t(x1), _t(x2)
    if x1.ndim != 1 or x2.ndim != 1:
        raise ShapeError(f"outer: takes two vectors, got shapes {x1.shape} and {x2.shape}")
    return A.multiply(x1.reshape((-1, 1)), x2.reshape((1, -1)))


def cross(x1, x2, /, *, axis: int = -1):
    """The cross product of 3-vectors along ``axis`` (counted from the end; the other axes
    broadcast)."""
    x1, x2 = _t(x1), _t(x2)
    a1, a2 = normalize_axis("cross", axis, x1.shape), normalize_axis("cross", axis, x2.shape)
    if x1.shape[a1] != 3 or x2.shape[a2] != 3:
        raise ShapeError(f"cross: axis {axis} must have size 3, got shapes {x1.shape} and {x2.shape}")
    u, v = A.moveaxis(x1, a1, -1), A.moveaxis(x2, a2, -1)
    c = [u[..., i] for i in range(3)], [v[..., i] for i in range(3)]
    (p0, p1, p2), (q0, q1, q2) = c
    parts = [p1 * q2 - p2 * q1, p2 * q0 - p0 * q2, p0 * q1 - p1 * q0]
    return A.moveaxis(A.stack(parts, axis=-1), -1, a1 - x1.ndim)  # counted from the end: operands broadcast


def matrix_power(x, n, /):
    """``x`` multiplied by itself ``n`` times (``n`` < 0: of its inverse; 0: the identity)."""
    x = _t(x)
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise ShapeError(f"matrix_power: takes square matrices, got shape {x.shape}")
    n = int(n)
    if n == 0:
        eye = np.broadcast_to(np.eye(x.shape[-1], dtype=x.dtype), x.shape)
        return apply("add", apply("mul", x, _t(np.zeros((), x.dtype))), _t(np.array(eye)))
    if n < 0:
        x, n = inv(x), -n
    result, square = None, x
    while n:  # repeated squaring
        if n & 1:
            result = square if result is None else matmul(result, square)
        n >>= 1
        if n:
            square = matmul(square, square)
    return result


def vector_norm(x, /, *, axis=None, keepdims: bool = False, ord=2):  # noqa: A002 - the standard's name
    """The ``ord``-norm over ``axis`` (all axes by default), of real dtype."""
    x = _t(x)
    check_category("vector_norm", "floating-point", x)
    axes = normalize_axes("vector_norm", axis, x.shape)
    a = A.abs(x)
    if axis is None and x.ndim > 1:  # the norm of the flattened tensor
        a, axes = a.reshape(-1), (0,)
        out = _norm(a, axes, False, ord)
        return out.reshape((1,) * x.ndim) if keepdims else out
    return _norm(a, axes, keepdims, ord)


def _norm(a, axes, keepdims, ord):  # noqa: A002
    if ord == math.inf:
        return A.max(a, axis=axes, keepdims=keepdims)
    if ord == -math.inf:
        return A.min(a, axis=axes, keepdims=keepdims)
    if ord == 0:
        return A.astype(A.count_nonzero(a, axis=axes, keepdims=keepdims), a.dtype)
    if ord == 1:
        return A.sum(a, axis=axes, keepdims=keepdims)
    if ord == 2:
        return apply("sqrt", A.sum(a * a, axis=axes, keepdims=keepdims))
    if not isinstance(ord, (int, float)):
        raise ArgumentError(f"vector_norm: ord is a number or +-inf, got {ord!r}")
    return A.sum(a ** float(ord), axis=axes, keepdims=keepdims) ** (1.0 / ord)


def matrix_norm(x, /, *, keepdims: bool = False, ord="fro"):  # noqa: A002
    """The ``ord`` norm of each matrix: 'fro', 'nuc', 1, -1, 2, -2, inf, -inf."""
    x = _t(x)
    check_category("matrix_norm", "floating-point", x)
    if x.ndim < 2:
        raise ShapeError(f"matrix_norm: takes a matrix or a stack of them, got shape {x.shape}")
    a = A.abs(x)
    if ord == "fro":
        out = apply("sqrt", A.sum(a * a, axis=(-2, -1)))
    elif ord in ("nuc", 2, -2):
        s = svdvals(x)
        out = A.sum(s, axis=-1) if ord == "nuc" else A.max(s, axis=-1) if ord == 2 else A.min(s, axis=-1)
    elif ord in (1, -1):
        cols = A.sum(a, axis=-2)
        out = A.max(cols, axis=-1) if ord == 1 else A.min(cols, axis=-1)
    elif ord in (math.inf, -math.inf):
        rows = A.sum(a, axis=-1)
        out = A.max(rows, axis=-1) if ord == math.inf else A.min(rows, axis=-1)
    else:
        raise ArgumentError(f"matrix_norm: ord is 'fro', 'nuc', 1, -1, 2, -2, inf or -inf, got {ord!r}")
    return out.reshape(tuple(out.shape) + (1, 1)) if keepdims else out


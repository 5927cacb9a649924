"""Matrix functions of the Array API's ``linalg`` extension: inverse, determinant, solve and the
decompositions, on stacks of matrices (the last two axes; any leading axis is a batch).

Each works matrix by matrix, so its rows split any batch axis (the matrices stay whole on a
rank). Gradients: ``inv``, ``det``, ``slogdet``, ``solve``, ``cholesky``, ``eigvalsh`` and
``svdvals`` have rules (for real matrices, written with other registered ops); the full ``eigh``,
``svd`` and ``qr`` decompositions and ``pinv`` have none (their adjoints need the spectrum to be
simple and are left out rather than half right): their outputs do not require grad.
"""

from __future__ import annotations

import numpy as np

from flowsys.errors import ArgumentError, ShapeError
from flowsys.ops import sbp_rules as R
from flowsys.ops.linalg import _swap_last
from flowsys.ops.math import check_category, real_dtype
from flowsys.ops.registry import Cost, Spec, moved, numel, register, sum_to_shape

B, S = R.B, R.S


def _matrices(op: str, x: Spec, square: bool = True) -> None:
    check_category(op, "floating-point", x)
    if x.ndim < 2 or (square and x.shape[-1] != x.shape[-2]):
        raise ShapeError(f"{op}: takes a {'square ' if square else ''}matrix or a stack of them (..., M, "
                         f"{'M' if square else 'N'}), got shape {x.shape}")


def _batch_rows(n_out=1, keep=2):
    """Rows of a matrix-by-matrix op: any batch axis split on every operand and output that has it."""

    def rows(specs, attrs):
        batch = specs[0].ndim - keep if len({s.ndim for s in specs}) == 1 else 0  # batch axes line up
        out = []
        for i in range(max(batch, 0)):
            if all(s.shape[i] == specs[0].shape[i] for s in specs):
                out.append(R.SbpRow((S(i),) * len(specs), (S(i),) * n_out, "each matrix of the batch is independent"))
        return out + [R.replicated(len(specs), n_out)]

    return rows


def _cubic(ins, outs, attrs):
    """An O(n^3) factorisation per matrix of the batch."""
    n = ins[0].shape[-1]
    return Cost(2 * numel(ins[0]) * n, moved(ins, outs))


def _unsqueeze2(b, x):
    return b.reshape(x, shape=tuple(x.shape) + (1, 1))


# --------------------------------------------------------------------------------------- inverse


def _inv_infer(x: Spec) -> Spec:
    _matrices("inv", x)
    return x


@register("inv", infer=_inv_infer, sbp=_batch_rows(), cost=_cubic,
          grad=lambda b, g, out, x: [b.neg(b.matmul(_swap_last(b, out), b.matmul(g, _swap_last(b, out))))])
def inv(xp, x):
    return xp.linalg.inv(x)


def _det_infer(x: Spec) -> Spec:
    _matrices("det", x)
    return Spec(x.shape[:-2], x.dtype)


@register("det", infer=_det_infer, sbp=_batch_rows(), cost=_cubic,
          grad=lambda b, g, out, x: [b.mul(_unsqueeze2(b, b.mul(g, out)), _swap_last(b, b.inv(x)))])
def det(xp, x):
    return xp.linalg.det(x)


def _slogdet_infer(x: Spec):
    _matrices("slogdet", x)
    return Spec(x.shape[:-2], x.dtype), Spec(x.shape[:-2], real_dtype(x.dtype))


def _slogdet_grad(b, gs, outs, x):
    g = gs[1]  # the sign is piecewise constant
    return [None if g is None else b.mul(_unsqueeze2(b, g), _swap_last(b, b.inv(x)))]


@register("slogdet", infer=_slogdet_infer, sbp=_batch_rows(n_out=2), cost=_cubic, multi_output=True, grad=_slogdet_grad)
def slogdet(xp, x):
    sign, logabs = xp.linalg.slogdet(x)
    return sign, logabs


def _solve_infer(a: Spec, y: Spec) -> Spec:
    _matrices("solve", a)
    check_category("solve", "floating-point", y)
    if y.ndim == 1:  # a vector: the standard's rule (NumPy 2's too)
        if y.shape[0] != a.shape[-1]:
            raise ShapeError(f"solve: a vector of {y.shape[0]} for matrices of shape {a.shape}")
        return Spec(a.shape[:-1], np.result_type(a.dtype, y.dtype))
    if y.shape[-2] != a.shape[-1]:
        raise ShapeError(f"solve: right-hand sides of shape {y.shape} for matrices of shape {a.shape}: "
                         f"their second-to-last axis must be {a.shape[-1]}")
    try:
        batch = np.broadcast_shapes(a.shape[:-2], y.shape[:-2])
    except ValueError:
        raise ShapeError(f"solve: batch axes of {a.shape} and {y.shape} do not broadcast") from None
    return Spec(tuple(batch) + y.shape[-2:], np.result_type(a.dtype, y.dtype))


def _solve_grad(b, g, out, a, y):
    vec = len(y.shape) == 1
    g2 = b.reshape(g, shape=tuple(g.shape) + (1,)) if vec else g
    o2 = b.reshape(out, shape=tuple(out.shape) + (1,)) if vec else out
    gy = b.solve(_swap_last(b, a), g2)  # A^-T g
    ga = b.neg(b.matmul(gy, _swap_last(b, o2)))
    gy = b.reshape(gy, shape=tuple(g.shape)) if vec else gy
    return [sum_to_shape(b, ga, tuple(a.shape)) if b.needs[0] else None,
            sum_to_shape(b, gy, tuple(y.shape)) if b.needs[1] else None]


@register("solve", infer=_solve_infer, sbp=_batch_rows(keep=2), cost=_cubic, grad=_solve_grad)
def solve(xp, a, y):
    return xp.linalg.solve(a, y)  # NumPy 2 broadcasts the batch; a 1-D y is one vector


# -------------------------------------------------------------------------------- decompositions


def _cholesky_infer(x: Spec, *, upper=False) -> Spec:
    _matrices("cholesky", x)
    return x


def _cholesky_grad(b, g, out, x, *, upper=False):
    """A = L L^T: dA = L^-T Phi(L^T dL) L^-1, symmetrised (Phi: the lower triangle, half diagonal)."""
    low = _swap_last(b, out) if upper else out
    gl = _swap_last(b, g) if upper else g
    phi = b.tril(b.matmul(_swap_last(b, low), gl), k=0)
    phi = b.sub(phi, b.mul(b.sub(phi, b.tril(phi, k=-1)), 0.5))
    inv_l = b.inv(low)
    ga = b.matmul(_swap_last(b, inv_l), b.matmul(phi, inv_l))
    return [b.mul(b.add(ga, _swap_last(b, ga)), 0.5)]


@register("cholesky", infer=_cholesky_infer, sbp=_batch_rows(), cost=_cubic, grad=_cholesky_grad)
def cholesky(xp, x, *, upper=False):
    low = xp.linalg.cholesky(x)
    return xp.conj(xp.swapaxes(low, -1, -2)) if upper else low


def _eigh_infer(x: Spec):
    _matrices("eigh", x)
    return Spec(x.shape[:-1], real_dtype(x.dtype)), x


@register("eigh", infer=_eigh_infer, sbp=_batch_rows(n_out=2), cost=_cubic, multi_output=True)
def eigh(xp, x):
    w, v = xp.linalg.eigh(x)
    return w, v


def _eigvalsh_grad(b, g, out, x):
    _, v = b.eigh(x)  # dA = V diag(g) V^T
    return [b.matmul(b.mul(v, b.reshape(g, shape=tuple(g.shape[:-1]) + (1, g.shape[-1]))), _swap_last(b, v))]


@register("eigvalsh", infer=lambda x: _eigh_infer(x)[0], sbp=_batch_rows(), cost=_cubic, grad=_eigvalsh_grad)
def eigvalsh(xp, x):
    return xp.linalg.eigvalsh(x)


def _qr_infer(x: Spec, *, mode="reduced"):
    _matrices("qr", x, square=False)
    if mode not in ("reduced", "complete"):
        raise ArgumentError(f"qr: mode is 'reduced' or 'complete', got {mode!r}")
    m, n = x.shape[-2:]
    k = min(m, n) if mode == "reduced" else m
    return Spec(x.shape[:-1] + (k,), x.dtype), Spec(x.shape[:-2] + (k, n), x.dtype)


@register("qr", infer=_qr_infer, sbp=_batch_rows(n_out=2), cost=_cubic, multi_output=True)
def qr(xp, x, *, mode="reduced"):
    q, r = xp.linalg.qr(x, mode=mode)
    return q, r


def _svd_infer(x: Spec, *, full_matrices=True):
    _matrices("svd", x, square=False)
    m, n = x.shape[-2:]
    k = min(m, n)
    u = x.shape[:-2] + ((m, m) if full_matrices else (m, k))
    vh = x.shape[:-2] + ((n, n) if full_matrices else (k, n))
    return Spec(u, x.dtype), Spec(x.shape[:-2] + (k,), real_dtype(x.dtype)), Spec(vh, x.dtype)


@register("svd", infer=_svd_infer, sbp=_batch_rows(n_out=3), cost=_cubic, multi_output=True)
def svd(xp, x, *, full_matrices=True):
    u, s, vh = xp.linalg.svd(x, full_matrices=full_matrices)
    return u, s, vh


def _svdvals_grad(b, g, out, x):
    u, _, vh = b.svd(x, full_matrices=False)  # dA = U diag(g) V^T
    return [b.matmul(b.mul(u, b.reshape(g, shape=tuple(g.shape[:-1]) + (1, g.shape[-1]))), vh)]


@register("svdvals", infer=lambda x: _svd_infer(x)[1], sbp=_batch_rows(), cost=_cubic, grad=_svdvals_grad)
def svdvals(xp, x):
    return xp.linalg.svd(x, compute_uv=False)


def _pinv_infer(x: Spec, rtol: Spec) -> Spec:
    _matrices("pinv", x, square=False)
    try:
        batch = np.broadcast_shapes(x.shape[:-2], rtol.shape)
    except ValueError:
        raise ShapeError(f"pinv: rtol of shape {rtol.shape} does not broadcast against the batch of {x.shape}") from None
    return Spec(tuple(batch) + (x.shape[-1], x.shape[-2]), x.dtype)


@register("pinv", infer=_pinv_infer, sbp=lambda specs, attrs: [R.replicated(2)], cost=_cubic)
def pinv(xp, x, rtol):
    """The pseudo-inverse; singular values below ``rtol`` times the largest count as zero
    (``rtol`` broadcasts against the batch: one per matrix)."""
    return xp.linalg.pinv(x, rtol=rtol)

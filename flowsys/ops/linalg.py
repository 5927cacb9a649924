"""matmul with NumPy semantics (1-D operands, broadcast batch axes); SBP rows from its einsum."""

from __future__ import annotations

import math
import string

import numpy as np

from flowsys.errors import ShapeError
from flowsys.ops import blas
from flowsys.ops import sbp_rules as R
from flowsys.ops.registry import OPS, Cost, SbpRow, Spec, moved, numel, register, result_dtype, sum_to_shape
from flowsys.sbp import PartialSum, Split

B, P, S = R.B, R.P, R.S


def mm(xp, a, b, out=None, tri=None):
    """``a @ b`` on ``xp``: MKL's GEMM where ``flowsys.ops.blas`` runs the CPU's products, else
    ``xp.matmul`` (into ``out`` if given). ``tri`` ("lower"/"upper"): ``a`` is zero above/below
    its diagonal, and MKL skips those blocks (``blas.matmul``); the product is the same."""
    if xp is np:
        result = blas.matmul(a, b, out, tri=tri)
        if result is not None:
            return result
    return xp.matmul(a, b) if out is None else xp.matmul(a, b, out=out)


def _matmul_shape(a: Spec, b: Spec) -> tuple[int, ...]:
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"matmul: operands must have at least 1 dimension, got {a.shape} @ {b.shape}; use * for scalars")
    k_a = a.shape[-1]
    k_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if k_a != k_b:
        raise ShapeError(
            f"matmul: shapes {a.shape} @ {b.shape} do not align: the last axis of the left operand ({k_a}) "
            f"must equal the {'only' if b.ndim == 1 else 'second-to-last'} axis of the right operand ({k_b})"
        )
    try:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ShapeError(f"matmul: batch axes of {a.shape} @ {b.shape} do not broadcast") from None
    m = a.shape[-2:-1] if a.ndim >= 2 else ()
    n = b.shape[-1:] if b.ndim >= 2 else ()
    return tuple(batch) + tuple(m) + tuple(n)


def matmul_subscripts(a: Spec, b: Spec) -> tuple[str, str, str]:
    """The einsum of a NumPy matmul of these operands, e.g. ``("xmk", "kn", "xmn")``."""
    nb = max(a.ndim - 2, b.ndim - 2, 0)
    batch = string.ascii_lowercase[:nb].translate(str.maketrans("kmn", "uvw"))
    a_sub = (batch[nb - (a.ndim - 2):] + "mk") if a.ndim >= 2 else "k"
    b_sub = (batch[nb - (b.ndim - 2):] + "kn") if b.ndim >= 2 else "k"
    out = batch + ("m" if a.ndim >= 2 else "") + ("n" if b.ndim >= 2 else "")
    return a_sub, b_sub, out


def _matmul_rows(specs, attrs):
    a_sub, b_sub, out = matmul_subscripts(*specs)
    rows = R.einsum((a_sub, b_sub), out, specs)
    if attrs.get("tri"):
        # a's triangle is in its global rows and columns: a shard of either axis (or a partial
        # sum of a) is not triangular in its own, so only the other axes may split
        a = specs[0]
        rows = [r for r in rows if r.ins[0] not in (S(a.ndim - 2), S(a.ndim - 1), P)]
    return rows


def _swap_last(b, x):
    n = len(x.shape)
    return b.transpose(x, axes=tuple(range(n - 2)) + (n - 1, n - 2))


_FLIP = {"lower": "upper", "upper": "lower"}


def _matmul_grad(b, g, out, x, y, *, tri=None):
    """matmul's gradients; with ``tri``, ``x``'s transpose is triangular the other way, and its
    product with ``g`` skips the zeros (``x``'s own gradient is the whole product, as without)."""
    xs, ys = tuple(x.shape), tuple(y.shape)
    gx = gy = None
    if tri:
        if b.needs[0]:
            gx = sum_to_shape(b, b.matmul(g, _swap_last(b, y)), xs)
        if b.needs[1]:
            gy = sum_to_shape(b, b.matmul(_swap_last(b, x), g, tri=_FLIP[tri]), ys)
        return [gx, gy]
    if len(xs) >= 2 and len(ys) == 2:
        # The common Linear case: fold the batch axes into rows so each gradient is one GEMM.
        if b.needs[0]:
            gx = b.matmul(g, b.transpose(y))
        if b.needs[1]:
            x2 = b.reshape(x, shape=(-1, xs[-1]))
            gy = b.matmul(b.transpose(x2), b.reshape(g, shape=(-1, ys[-1])))
        return [gx, gy]
    x2 = x if len(xs) > 1 else b.reshape(x, shape=(1,) + xs)
    y2 = y if len(ys) > 1 else b.reshape(y, shape=ys + (1,))
    out2 = _matmul_shape(Spec(tuple(x2.shape), x.dtype), Spec(tuple(y2.shape), y.dtype))
    g2 = b.reshape(g, shape=out2)
    if b.needs[0]:
        gx = b.reshape(sum_to_shape(b, b.matmul(g2, _swap_last(b, y2)), tuple(x2.shape)), shape=xs)
    if b.needs[1]:
        gy = b.reshape(sum_to_shape(b, b.matmul(_swap_last(b, x2), g2), tuple(y2.shape)), shape=ys)
    return [gx, gy]


def _matmul_cost(ins, outs, attrs):
    """Every output element is a dot product over k (1-D operands included: NumPy's rules). With
    ``tri`` too: the skipped zeros count, as MFU figures count a causal attention's products
    (Megatron-LM's Eq. 3), so a step's FLOPs do not depend on the kernels."""
    return Cost(2 * numel(outs[0]) * ins[0].shape[-1], moved(ins, outs), gemm=True)


def _matmul_infer(a: Spec, b: Spec, *, tri=None) -> Spec:
    if tri not in (None, "lower", "upper"):
        raise ShapeError(f"matmul: tri is 'lower', 'upper' or None, got {tri!r}")
    if tri and (a.ndim < 2 or b.ndim < 2):
        raise ShapeError(f"matmul: tri={tri!r} needs matrices, got {a.shape} @ {b.shape}")
    return Spec(_matmul_shape(a, b), result_dtype(a, b))


@register("matmul", infer=_matmul_infer, sbp=_matmul_rows, grad=_matmul_grad, cost=_matmul_cost)
def matmul(xp, a, b, *, tri=None):
    """``a @ b`` with NumPy's semantics. ``tri="lower"`` (``"upper"``) promises that each matrix of
    ``a`` is zero above (below) its diagonal, as a causal attention's probabilities are: the
    product is the same, and skips those blocks where MKL runs it."""
    if b.ndim == 2 and a.ndim > 2 and not tri:
        # One large GEMM instead of a batch of small ones.
        return mm(xp, a.reshape(math.prod(a.shape[:-1]), a.shape[-1]), b).reshape(a.shape[:-1] + (b.shape[-1],))
    return mm(xp, a, b, tri=tri)


# ---------------------------------------------------------------------------------------- linear


def _linear_infer(x: Spec, w: Spec, b: Spec | None = None) -> Spec:
    if x.ndim < 1 or w.ndim < 2 or (b is not None and b.shape != w.shape[:-1]) or x.shape[-1] != w.shape[-1]:
        raise ShapeError(
            f"linear: input {x.shape}, weight {w.shape}" + (f" and bias {b.shape}" if b is not None else "")
            + " do not fit: the weight is (out_features..., in_features) with in_features = the input's last "
            f"axis ({x.shape[-1] if x.ndim else '?'})" + (", and the bias is (out_features...)" if b is not None else ""))
    return Spec(x.shape[:-1] + w.shape[:-1], result_dtype(x, w) if b is None else result_dtype(x, w, b))


def _linear_subscripts(x: Spec, w: Spec) -> tuple[str, str, str]:
    """The einsum of ``x @ w.T`` for a weight of shape (out..., in), e.g. ``"uvk", "nk", "uvn"``."""
    letters = iter(c for c in string.ascii_lowercase if c != "k")
    batch = "".join(next(letters) for _ in range(x.ndim - 1))
    outs = "".join(next(letters) for _ in range(w.ndim - 1))
    return batch + "k", outs + "k", batch + outs


def _linear_rows(specs, attrs):
    """matmul's rows for ``x @ w.T`` with the bias following the output: split with an
    out-feature axis, whole beside split rows, a partial sum beside a partial-sum output (so
    that it is added once)."""
    x, w = specs[:2]
    x_sub, w_sub, out_sub = _linear_subscripts(x, w)
    if len(specs) == 2:  # no bias
        return R.einsum((x_sub, w_sub), out_sub, (x, w))
    rows = []
    for row in R.einsum((x_sub, w_sub), out_sub, (x, w)):
        out = row.outs[0]
        if isinstance(out, PartialSum):
            bias = P
        elif isinstance(out, Split) and out.axis >= x.ndim - 1:
            bias = S(out.axis - (x.ndim - 1))
        else:
            bias = B
        rows.append(SbpRow(row.ins + (bias,), row.outs, row.reason))
    return rows


def _linear_grad(b, g, out, x, w, bias=None):
    if b.needs[0] and b.needs[1]:  # the pair in one op, which runs them side by side
        gx, gw = b.linear_grads(g, w, x)
    else:
        gx = b.linear_grad_input(g, w) if b.needs[0] else None
        gw = b.linear_grad_weight(g, x) if b.needs[1] else None
    if bias is None:
        return [gx, gw]
    gb = (b.sum(g, axis=tuple(range(len(x.shape) - 1))) if len(x.shape) > 1 else g) if b.needs[2] else None
    return [gx, gw, gb]


def _grad_input_subscripts(g: Spec, w: Spec) -> tuple[tuple[str, str], str]:
    x_sub, w_sub, out_sub = _linear_subscripts(Spec(g.shape[:g.ndim - (w.ndim - 1)] + w.shape[-1:], g.dtype), w)
    return (out_sub, w_sub), x_sub


def _grad_weight_subscripts(g: Spec, x: Spec) -> tuple[tuple[str, str], str]:
    w = Spec(g.shape[x.ndim - 1:] + x.shape[-1:], g.dtype)
    x_sub, w_sub, out_sub = _linear_subscripts(x, w)
    return (out_sub, x_sub), w_sub


def _linear_grad_cost(ins, outs, attrs):
    """Both gradients of linear: every element of ``g`` meets every in-feature once."""
    return Cost(2 * numel(ins[0]) * outs[0].shape[-1], moved(ins, outs), gemm=True)


@register("linear_grad_input",
          infer=lambda g, w: Spec(g.shape[:g.ndim - (w.ndim - 1)] + w.shape[-1:], result_dtype(g, w)),
          sbp=lambda specs, attrs: R.einsum(*_grad_input_subscripts(*specs), specs), cost=_linear_grad_cost)
def linear_grad_input(xp, g, w):
    """``g @ w`` over all of the weight's out-feature axes: linear's input gradient, one GEMM."""
    batch = g.shape[:g.ndim - (w.ndim - 1)]
    n, k = math.prod(w.shape[:-1]), w.shape[-1]
    return mm(xp, g.reshape(math.prod(batch), n), w.reshape(n, k)).reshape(batch + (k,))


@register("linear_grad_weight",
          infer=lambda g, x: Spec(g.shape[x.ndim - 1:] + x.shape[-1:], result_dtype(g, x)),
          sbp=lambda specs, attrs: R.einsum(*_grad_weight_subscripts(*specs), specs), cost=_linear_grad_cost)
def linear_grad_weight(xp, g, x):
    """``g.T @ x`` summed over the batch axes: linear's weight gradient, one GEMM, in the
    weight's own (out..., in) layout."""
    rows = math.prod(x.shape[:-1])
    n, k = math.prod(g.shape[x.ndim - 1:]), x.shape[-1]
    # Into an array of the weight's shape that owns its memory, so that autograd can hand it
    # on as the gradient without a copy.
    out = xp.empty(g.shape[x.ndim - 1:] + (k,), dtype=np.result_type(g, x))
    mm(xp, g.reshape(rows, n).T, x.reshape(rows, k), out=out.reshape(n, k))
    return out


def _grads_infer(g: Spec, w: Spec, x: Spec) -> tuple[Spec, Spec]:
    return OPS["linear_grad_input"].infer(g, w), OPS["linear_grad_weight"].infer(g, x)


def _grads_rows(specs, attrs):
    """The rows of linear_grad_input and of linear_grad_weight that lay out ``g`` alike."""
    g, w, x = specs
    rows = []
    for gi in R.einsum(*_grad_input_subscripts(g, w), (g, w)):
        for gw in R.einsum(*_grad_weight_subscripts(g, x), (g, x)):
            if gi.ins[0] == gw.ins[0]:
                rows.append(SbpRow((gi.ins[0], gi.ins[1], gw.ins[1]), (gi.outs[0], gw.outs[0]),
                                   f"input gradient: {gi.reason}; weight gradient: {gw.reason}"))
    return rows


def _grads_cost(ins, outs, attrs):
    """linear_grad_input's and linear_grad_weight's products; ``g`` is read once."""
    g = ins[0]
    return Cost(2 * numel(g) * (outs[0].shape[-1] + outs[1].shape[-1]), moved(ins, outs), gemm=True)


@register("linear_grads", infer=_grads_infer, sbp=_grads_rows, multi_output=True, cost=_grads_cost)
def linear_grads(xp, g, w, x):
    """Both gradients of linear at once: ``linear_grad_input(g, w)`` and ``linear_grad_weight(g, x)``.
    The two products take as many multiply-adds; on MKL each runs whole on its own thread
    (``blas.matmul_pair``), where one after the other each would split over the threads."""
    if xp is np:
        batch = g.shape[:g.ndim - (w.ndim - 1)]
        rows, n, k, kx = math.prod(batch), math.prod(w.shape[:-1]), w.shape[-1], x.shape[-1]  # (shards: k, kx apart)
        gx = np.empty(batch + (k,), np.result_type(g, w))
        gw = np.empty(g.shape[x.ndim - 1:] + (kx,), np.result_type(g, x))
        g2 = g.reshape(rows, n)
        if x.size == rows * kx and blas.matmul_pair((g2, w.reshape(n, k), gx.reshape(rows, k)),
                                                    (g2.T, x.reshape(rows, kx), gw.reshape(n, kx))):
            return gx, gw
    return linear_grad_input(xp, g, w), linear_grad_weight(xp, g, x)


def _linear_cost(ins, outs, attrs):
    """Fused: the product ``x @ w.T`` and the bias (if any) added to each output element."""
    out = numel(outs[0])
    return Cost(2 * out * ins[0].shape[-1] + (out if len(ins) == 3 else 0), moved(ins, outs), gemm=True)


@register("linear", infer=_linear_infer, sbp=_linear_rows, grad=_linear_grad, cost=_linear_cost)
def linear(xp, x, w, b=None):
    """``x @ w.T + b`` with a PyTorch (out_features, in_features) weight: one GEMM, the bias (if
    any) added in place into its output (PyTorch's addmm). A weight (out..., in) gives outputs
    (..., out...): one GEMM for several projections stored apart (attention's q, k, v). Without
    a bias it is the product alone, whose weight gradient comes in the weight's own layout (a
    tied embedding's two gradients then add without a transposed read)."""
    k = w.shape[-1]
    x2, wt = x.reshape(math.prod(x.shape[:-1]), k), w.reshape(math.prod(w.shape[:-1]), k).T
    if b is not None and xp is np:  # MKL adds the bias into each block of the product (addmm)
        out = blas.matmul(x2, wt, bias=b.reshape(-1))
        if out is not None:
            return out.reshape(x.shape[:-1] + w.shape[:-1])
    out = mm(xp, x2, wt)
    if b is None:
        return out.reshape(x.shape[:-1] + w.shape[:-1])
    b = b.reshape(-1)
    if out.dtype == np.result_type(out, b):
        out += b
    else:
        out = out + b
    return out.reshape(x.shape[:-1] + w.shape[:-1])

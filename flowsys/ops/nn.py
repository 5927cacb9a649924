"""Neural-network ops: softmax family, cross entropy, layer norm, dropout, attention.

Each has a fused kernel; its gradient is another registered op (``*_grad``) or a composition of
registered ops, so graph mode differentiates these exactly as eager autograd does.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from flowsys.errors import ArgumentError, DTypeError, IndexOutOfRange, ShapeError
from flowsys.ops import fusion, scalar
from flowsys.ops import sbp_rules as R
from flowsys.ops.chunked import map_rows
from flowsys.ops.linalg import mm
from flowsys.ops.scalar import RowRule
from flowsys.ops.registry import (Cost, Spec, copy_cost, flops_per_input, gather_cost, is_floating, moved, nbytes,
                                  normalize_axis, numel, register, result_dtype, scatter_add_cost, sum_to_shape)

B, P, S = R.B, R.P, R.S


def _float_same(op):
    def infer(x: Spec, **attrs) -> Spec:
        if not is_floating(x.dtype):
            raise DTypeError(f"{op}: takes a floating-point tensor, got {x}")
        if "axis" in attrs:
            normalize_axis(op, attrs["axis"], x.ndim)
        return x

    return infer


def _along_axis_rows(*partial):
    """Rows of an op that works along ``axis``: any other axis may be split."""
    return lambda specs, attrs: R.pointwise(specs, partial, skip_axes=(attrs.get("axis", -1),))


# ------------------------------------------------------------------------------------- softmax


# FLOPs per element of the first input: softmax finds the max, subtracts it, exponentiates, sums
# and divides; its gradient multiplies, sums, subtracts and multiplies.
_SOFTMAX, _SOFTMAX_GRAD = 5, 4


def _last_axis(attrs) -> int | None:
    """One trailing axis per row when the op works along the last axis; None (not fused) else."""
    axis = attrs.get("axis", -1)
    return 1 if axis == -1 else None


@register("softmax", infer=_float_same("softmax"), sbp=_along_axis_rows(), cost=flops_per_input(_SOFTMAX),
          grad=lambda b, g, out, x, *, axis=-1: [b.softmax_grad(out, g, axis=axis)],
          row=RowRule(scalar.softmax, _last_axis))
def softmax(xp, x, *, axis=-1):
    if normalize_axis("softmax", axis, x.ndim) == x.ndim - 1 and xp is np and x.ndim:
        out = fusion.row_one("softmax", (x,))  # generated from the row rule
        if out is not None:
            return out
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _scaled_softmax_rows(specs, attrs):
    """Split any axis but the last (the softmax's) and, under the causal mask, the queries' (a
    query's row index picks its keys)."""
    x = specs[0]
    skip = (-1, -2) if attrs.get("causal") and x.ndim >= 2 else (-1,)
    return R.pointwise(specs, skip_axes=skip)


def _scaled_softmax_infer(x: Spec, *, scale=1.0, causal=False) -> Spec:
    if not is_floating(x.dtype):
        raise DTypeError(f"scaled_softmax: takes a floating-point tensor, got {x}")
    if causal and x.ndim < 2:
        raise ShapeError(f"scaled_softmax: a causal mask needs (..., queries, keys), got {x.shape}")
    return x


@register("scaled_softmax", infer=_scaled_softmax_infer, sbp=_scaled_softmax_rows, cost=flops_per_input(_SOFTMAX + 1),
          grad=lambda b, g, out, x, *, scale=1.0, causal=False: [
              b.softmax_grad(out, g, axis=-1, scale=scale, **({"causal": True} if causal else {}))],
          row=RowRule(scalar.scaled_softmax, lambda attrs: 1, causal=lambda attrs: attrs.get("causal", False)))
def scaled_softmax(xp, x, *, scale=1.0, causal=False):
    """softmax(x * scale) over the last axis, keys after each query masked out under ``causal``
    (PyTorch's top-left aligned mask over the last two axes): attention's probabilities."""
    if xp is np:
        out = fusion.row_one("scaled_softmax", (x,), scale=scale, causal=causal)  # generated from the row rule
        if out is not None:
            return out
    z = x * scale
    if causal:
        z = z + _causal_bias(xp, *x.shape[-2:], z.dtype)
    return softmax(xp, z)


def _softmax_grad_infer(y: Spec, g: Spec, *, axis=-1, scale=1.0, causal=False) -> Spec:
    if causal and (y.ndim < 2 or normalize_axis("softmax_grad", axis, y.ndim) != y.ndim - 1):
        raise ShapeError(f"softmax_grad: causal probabilities are (..., queries, keys) over the last axis, "
                         f"got {y.shape} along axis {axis}")
    return Spec(y.shape, result_dtype(y, g))


def _softmax_grad_rows(specs, attrs):
    """Split any axis but the softmax's and, for causal probabilities, the queries'."""
    skip = (attrs.get("axis", -1), -2) if attrs.get("causal") else (attrs.get("axis", -1),)
    return R.pointwise(specs, [((B, P), "linear in the incoming gradient")], skip_axes=skip)


@register("softmax_grad", infer=_softmax_grad_infer, sbp=_softmax_grad_rows, cost=flops_per_input(_SOFTMAX_GRAD),
          row=RowRule(scalar.softmax_grad, _last_axis, causal=lambda attrs: attrs.get("causal", False)))
def softmax_grad(xp, y, g, *, axis=-1, scale=1.0, causal=False):
    """``scale`` times the gradient of softmax at output ``y`` (attention folds its scale in).
    ``causal`` promises that ``y`` is a causal softmax's (0 past each query): the generated
    kernel then stops each row at its diagonal."""
    if normalize_axis("softmax_grad", axis, y.ndim) == y.ndim - 1 and xp is np and y.shape == g.shape:
        out = fusion.row_one("softmax_grad", (y, g), axis=-1, scale=scale,
                             **({"causal": True} if causal else {}))  # generated from the row rule
        if out is not None:
            return out
    gy = g * y
    out = gy - y * gy.sum(axis=axis, keepdims=True)
    if scale != 1.0:
        out *= scale
    return out


@register("log_softmax", infer=_float_same("log_softmax"), sbp=_along_axis_rows(), cost=flops_per_input(_SOFTMAX),
          grad=lambda b, g, out, x, *, axis=-1: [b.log_softmax_grad(out, g, axis=axis)])
def log_softmax(xp, x, *, axis=-1):
    shifted = x - x.max(axis=axis, keepdims=True)
    shifted -= xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return shifted


@register("log_softmax_grad", infer=lambda y, g, *, axis=-1: Spec(y.shape, result_dtype(y, g)),
          sbp=_along_axis_rows(((B, P), "linear in the incoming gradient")), cost=flops_per_input(_SOFTMAX_GRAD))
def log_softmax_grad(xp, y, g, *, axis=-1):
    return g - xp.exp(y) * g.sum(axis=axis, keepdims=True)


# ------------------------------------------------------------------------------- cross entropy


def _ce_infer(logits: Spec, targets: Spec, *, ignore_index=-100) -> Spec:
    if not is_floating(logits.dtype):
        raise DTypeError(f"cross_entropy: logits must be floating point, got {logits}")
    if targets.dtype.kind not in "iu":
        raise DTypeError(f"cross_entropy: targets must be integer class indices, got {targets}; "
                         f"use .astype(fs.int64)")
    if logits.shape[:-1] != targets.shape:
        raise ShapeError(
            f"cross_entropy: logits {logits.shape} and targets {targets.shape} do not match; logits are "
            f"(..., classes) and targets (...), e.g. logits (N, C) with targets (N,)")
    return Spec(targets.shape, logits.dtype)


def _ce_rows(specs, attrs):
    logits, targets = specs
    rows = [R.SbpRow((S(i), S(i)), (S(i),), "each row's loss needs only that row") for i in range(targets.ndim)]
    return rows + [R.replicated(2)]


def _check_targets(xp, t, n_classes, ignore_index):
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if bool(bad.any()):
        raise IndexOutOfRange(
            f"cross_entropy: target {int(t[bad].reshape(-1)[0])} is out of range for {n_classes} classes "
            f"(and is not ignore_index={ignore_index})")


# Fused: log-softmax over the classes, then the target's entry picked (per element of the logits).
_CROSS_ENTROPY = _SOFTMAX + 1


@register("cross_entropy", infer=_ce_infer, sbp=_ce_rows, cost=flops_per_input(_CROSS_ENTROPY),
          grad=lambda b, g, out, logits, t, *, ignore_index=-100: [
              b.cross_entropy_grad(logits, t, g, ignore_index=ignore_index), None],
          row=RowRule(scalar.cross_entropy, lambda attrs: 1, lead=(1,)))
def cross_entropy(xp, logits, targets, *, ignore_index=-100):
    """Per-row negative log-likelihood of the target class; rows with ``ignore_index`` give 0."""
    n_classes = logits.shape[-1]
    x = logits.reshape(-1, n_classes)
    t = targets.reshape(-1)
    _check_targets(xp, t, n_classes, ignore_index)
    if xp is np:
        out = fusion.row_one("cross_entropy", (x, t), ignore_index=ignore_index)  # generated from the row rule
        if out is not None:
            return out.reshape(targets.shape)
    valid = t != ignore_index
    safe_t = xp.where(valid, t, 0)
    lse = map_rows(xp, lambda rows: _logsumexp_rows(xp, rows), x, dtype=x.dtype)
    picked = x[xp.arange(x.shape[0]), safe_t]
    return xp.where(valid, lse - picked, 0).astype(logits.dtype, copy=False).reshape(targets.shape)


def _logsumexp_rows(xp, x):
    m = x.max(axis=-1)
    e = x - m[:, None]
    xp.exp(e, out=e)
    return xp.log(e.sum(axis=-1)) + m


def _ce_grad_rows(specs, attrs):
    logits, targets, g = specs
    rows = [R.SbpRow((S(i), S(i), S(i)), (S(i),), "each row's gradient needs only that row") for i in range(targets.ndim)]
    return rows + [R.replicated(3), R.SbpRow((B, B, P), (P,), "linear in the incoming gradient")]


@register("cross_entropy_grad", infer=lambda logits, t, g, *, ignore_index=-100: logits, sbp=_ce_grad_rows,
          cost=flops_per_input(_CROSS_ENTROPY),  # softmax again, minus the one-hot, times the gradient
          row=RowRule(scalar.cross_entropy_grad, lambda attrs: 1, lead=(1, 2)))
def cross_entropy_grad(xp, logits, targets, g, *, ignore_index=-100):
    n_classes = logits.shape[-1]
    x = logits.reshape(-1, n_classes)
    t = targets.reshape(-1)
    if xp is np:
        out = fusion.row_one("cross_entropy_grad", (x, t, g.reshape(-1).astype(x.dtype, copy=False)),
                             ignore_index=ignore_index)  # generated from the row rule
        if out is not None:
            return out.reshape(logits.shape)
    valid = t != ignore_index
    scale = xp.where(valid, g.reshape(-1), 0).astype(x.dtype, copy=False)
    return map_rows(xp, lambda xr, tr, sr: _ce_grad_block(xp, xr, tr, sr), x, xp.where(valid, t, 0),
                    scale).reshape(logits.shape)


def _ce_grad_block(xp, x, t, scale):
    """(softmax(x) - onehot(t)) * scale for a block of rows."""
    p = x - x.max(axis=-1, keepdims=True)
    xp.exp(p, out=p)
    p *= (scale / p.sum(axis=-1))[:, None]
    p[xp.arange(x.shape[0]), t] -= scale
    return p


# ---------------------------------------------------------------------------------- layer norm


def _ln_infer(x: Spec, *, n_axes=1, eps=1e-5) -> Spec:
    if not is_floating(x.dtype):
        raise DTypeError(f"layer_norm: takes a floating-point tensor, got {x}")
    if not 1 <= n_axes <= x.ndim:
        raise ShapeError(f"layer_norm: cannot normalise the last {n_axes} axes of a tensor of shape {x.shape}")
    return x


def _ln_rows(specs, attrs, *partial):
    n = attrs.get("n_axes", 1)
    return R.pointwise(specs, partial, skip_axes=range(specs[0].ndim - n, specs[0].ndim))


def _ln_stats(xp, x, n_axes, eps):
    """Rows (the normalised axes flattened), the centred rows, 1/std per row as a column, and the
    row-mean as a function: means are matrix-vector products, which BLAS does in one fast pass."""
    n = math.prod(x.shape[x.ndim - n_axes:])
    rows = x.reshape(-1, n)
    w = xp.full(n, 1.0 / n, dtype=x.dtype)

    def mean(a):
        return (a @ w)[:, None]

    xc = rows - mean(rows)
    rstd = 1.0 / xp.sqrt(mean(xc * xc) + eps)
    return xc, rstd, mean


# FLOPs per element of layer norm (two row statistics, centring, scaling) and of its gradient,
# which makes half as many again.
_LAYER_NORM, _LAYER_NORM_GRAD = 8, 12


def _ln_axes(attrs) -> int:
    return attrs.get("n_axes", 1)


@register("layer_norm", infer=_ln_infer, sbp=_ln_rows, cost=flops_per_input(_LAYER_NORM),
          grad=lambda b, g, out, x, *, n_axes=1, eps=1e-5: [b.layer_norm_grad(x, g, n_axes=n_axes, eps=eps)],
          row=RowRule(scalar.layer_norm, _ln_axes))
def layer_norm(xp, x, *, n_axes=1, eps=1e-5):
    """(x - mean) / sqrt(var + eps) over the last ``n_axes`` axes (the affine part is separate)."""
    if xp is np:
        out = fusion.row_one("layer_norm", (x,), n_axes=n_axes, eps=eps)  # generated from the row rule
        if out is not None:
            return out
    xc, rstd, _ = _ln_stats(xp, x, n_axes, eps)
    xc *= rstd
    return xc.reshape(x.shape)


@register("layer_norm_grad", infer=lambda x, g, *, n_axes=1, eps=1e-5: Spec(x.shape, result_dtype(x, g)),
          sbp=lambda specs, attrs: _ln_rows(specs, attrs, ((B, P), "linear in the incoming gradient")),
          cost=flops_per_input(_LAYER_NORM_GRAD), row=RowRule(scalar.layer_norm_grad, _ln_axes))
def layer_norm_grad(xp, x, g, *, n_axes=1, eps=1e-5):
    if xp is np and x.shape == g.shape:
        out = fusion.row_one("layer_norm_grad", (x, g), n_axes=n_axes, eps=eps)  # generated from the row rule
        if out is not None:
            return out
    y, rstd, mean = _ln_stats(xp, x, n_axes, eps)
    y *= rstd
    g = g.reshape(y.shape)
    dx = g - mean(g)
    y *= mean(g * y)
    dx -= y
    dx *= rstd
    return dx.reshape(x.shape)


def _ln_affine_infer(x: Spec, w: Spec, b: Spec, *, n_axes=1, eps=1e-5) -> Spec:
    _ln_infer(x, n_axes=n_axes, eps=eps)
    normalized = x.shape[x.ndim - n_axes:]
    if w.shape != normalized or b.shape != normalized:
        raise ShapeError(f"layer_norm: weight {w.shape} and bias {b.shape} must have the normalised shape "
                         f"{normalized} of the input {x.shape}")
    return Spec(x.shape, result_dtype(x, w, b))


def _ln_affine_rows(specs, attrs):
    """Rows split the input on an axis that is not normalised; the weight and bias stay whole."""
    x, n = specs[0], attrs.get("n_axes", 1)
    rows = [R.SbpRow((S(i), B, B), (S(i),), "each row is normalised on its own") for i in range(x.ndim - n)]
    return rows + [R.replicated(3)]


def _ln_affine_grad_rows(specs, attrs):
    """(x, w, g) -> (dx, dw, db): rows split x and g alike; dw and db, sums over the rows, are
    then partial sums."""
    x, n = specs[0], attrs.get("n_axes", 1)
    rows = [R.SbpRow((S(i), B, S(i)), (S(i), P, P), "rows are independent; weight sums are partial")
            for i in range(x.ndim - n)]
    return rows + [R.replicated(3, 3), R.SbpRow((B, B, P), (P, P, P), "linear in the incoming gradient")]


@register("layer_norm_affine", infer=_ln_affine_infer, sbp=_ln_affine_rows,
          cost=flops_per_input(_LAYER_NORM + 2),  # fused: layer_norm, then * w + b
          grad=lambda b, g, out, x, w, bias, *, n_axes=1, eps=1e-5: list(
              b.layer_norm_affine_grad(x, w, g, n_axes=n_axes, eps=eps)),
          row=RowRule(scalar.layer_norm_affine, _ln_axes))
def layer_norm_affine(xp, x, w, b, *, n_axes=1, eps=1e-5):
    """layer_norm(x) * w + b: PyTorch's LayerNorm in one op (and one pass on the CPU)."""
    if xp is np:
        out = fusion.row_one("layer_norm_affine", (x, w, b), n_axes=n_axes, eps=eps)  # generated from the row rule
        if out is not None:
            return out
    return layer_norm(xp, x, n_axes=n_axes, eps=eps) * w + b


def _ln_affine_grad_infer(x: Spec, w: Spec, g: Spec, *, n_axes=1, eps=1e-5):
    dtype = result_dtype(x, w, g)
    return Spec(x.shape, dtype), Spec(w.shape, dtype), Spec(w.shape, dtype)


@register("layer_norm_affine_grad", infer=_ln_affine_grad_infer, sbp=_ln_affine_grad_rows, multi_output=True,
          cost=flops_per_input(_LAYER_NORM_GRAD + 4),  # fused: layer_norm_grad of g * w; dw += g * y; db += g
          row=RowRule(scalar.layer_norm_affine_grad, _ln_axes))
def layer_norm_affine_grad(xp, x, w, g, *, n_axes=1, eps=1e-5):
    """The gradients of layer_norm_affine for input, weight and bias."""
    if xp is np and g.shape == x.shape:
        out = fusion.row_one("layer_norm_affine_grad", (x, w, g), n_axes=n_axes, eps=eps)  # generated: row rule
        if out is not None:
            return out
    xc, rstd, _ = _ln_stats(xp, x, n_axes, eps)
    rows = g.reshape(xc.shape)
    dw = (rows * (xc * rstd)).sum(axis=0).reshape(w.shape)
    db = rows.sum(axis=0).reshape(w.shape)
    return layer_norm_grad(xp, x, g * w, n_axes=n_axes, eps=eps), dw, db


# ------------------------------------------------------------------------------------- dropout


def uniform(xp, seed: int, shape, *, offset=None, logical_shape=None) -> np.ndarray:
    """Counter-based uniform [0, 1) floats: element i depends only on (seed, i), so any shard of a
    logical tensor regenerates its own part of the mask (splitmix64 of the flat logical index).
    ``offset`` and ``logical_shape`` place a shard of shape ``shape`` inside the logical tensor."""
    if offset is None:
        z = xp.arange(math.prod(shape), dtype=np.uint64)
    else:  # the flat logical index of every element of the shard
        strides = np.cumprod((1,) + tuple(logical_shape)[:0:-1])[::-1]
        z = xp.zeros((), dtype=np.uint64)
        for ax, (o, n) in enumerate(zip(offset, shape)):
            idx = (xp.arange(n, dtype=np.uint64) + np.uint64(o)) * np.uint64(strides[ax])
            z = z[..., None] + idx if ax else idx
        z = z.reshape(-1) if len(shape) else z.reshape(1)
    z = z + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return ((z >> np.uint64(40)).astype(np.float32) * (1.0 / (1 << 24))).reshape(shape)


def _dropout_infer(x: Spec, *, p, seed, offset=None, logical_shape=None) -> Spec:
    if not 0.0 <= p <= 1.0:
        raise ArgumentError(f"dropout: p must be in [0, 1], got {p}")
    return _float_same("dropout")(x)


def _dropout_lower(attrs, shard):
    return {**attrs, "offset": shard.in_offsets[0], "logical_shape": shard.logical_outs[0].shape}


@register("dropout", infer=_dropout_infer,
          sbp=lambda specs, attrs: R.pointwise(specs, [((P,), "with a fixed mask, dropout is linear")],
                                               reason="the mask is a function of the logical index"),
          grad=lambda b, g, out, x, *, p, seed, offset=None, logical_shape=None: [b.dropout(g, p=p, seed=seed)],
          lower=_dropout_lower, cost=flops_per_input(3))  # the mask's compare, the scale, the select
def dropout(xp, x, *, p, seed, offset=None, logical_shape=None):
    """Zero each element with probability ``p`` (mask from ``seed``), scale the rest by 1/(1-p)."""
    if p >= 1.0:
        return xp.zeros_like(x)
    keep = uniform(xp, seed, x.shape, offset=offset, logical_shape=logical_shape) >= p
    return xp.where(keep, x * (1.0 / (1.0 - p)), 0).astype(x.dtype, copy=False)


# ----------------------------------------------------------------------------------- attention


def _sdpa_infer(q: Spec, k: Spec, v: Spec, *, is_causal=False, scale=None) -> Spec:
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ShapeError(f"scaled_dot_product_attention: q, k, v need (..., seq, dim), got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ShapeError(
            f"scaled_dot_product_attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit: q and k need the "
            f"same last axis, k and v the same sequence length")
    try:
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ShapeError(f"scaled_dot_product_attention: batch axes of {q.shape}, {k.shape}, {v.shape} do not broadcast") from None
    return Spec(tuple(batch) + (q.shape[-2], v.shape[-1]), result_dtype(q, k, v))


def _sdpa_rows(specs, attrs):
    """Batch/head axes split alike on every operand holding them (broadcast ones stay B); the
    query axis may be split with keys and values whole, except under a causal mask, whose
    diagonal depends on each query's global position."""
    nb = max(s.ndim for s in specs) - 2
    batch = np.broadcast_shapes(*(s.shape[:-2] for s in specs))
    rows = []
    for i in range(nb):
        ins = []
        for s in specs:
            j = i - (nb - (s.ndim - 2))
            ins.append(S(j) if j >= 0 and s.shape[j] == batch[i] else B)
        rows.append(R.SbpRow(tuple(ins), (S(i),), "batch and head axes are independent"))
    q = specs[0]
    if not attrs.get("is_causal", False):
        ins = (S(q.ndim - 2),) + (B,) * (len(specs) - 1)
        rows.append(R.SbpRow(ins, (S(nb),), "each query attends over all keys on its own"))
    return rows + [R.replicated(len(specs))]


def _scale(q_dim, scale):
    return float(scale) if scale is not None else 1.0 / math.sqrt(q_dim)


@functools.lru_cache(maxsize=16)
def _causal_bias_np(tq: int, tk: int, dtype: np.dtype) -> np.ndarray:
    bias = np.triu(np.full((tq, tk), -np.inf, dtype=dtype), k=1)
    bias.flags.writeable = False
    return bias


def _causal_bias(xp, tq, tk, dtype):
    """0 where query i may attend key j (j <= i, top-left aligned as PyTorch), -inf elsewhere."""
    bias = _causal_bias_np(tq, tk, np.dtype(dtype))
    return bias if xp is np else xp.asarray(bias)


def _probs(xp, q, k, is_causal, scale):
    att = mm(xp, q, xp.swapaxes(k, -1, -2))
    if xp is np:  # the generated scaled (causal) softmax, in place
        out = fusion.row_one("scaled_softmax", (att,), out=att, scale=scale, causal=is_causal)
        if out is not None:
            return out
    att *= scale
    if is_causal:
        att += _causal_bias(xp, *att.shape[-2:], att.dtype)
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    return att


def _probs_infer(q: Spec, k: Spec, *, is_causal=False, scale=None) -> Spec:
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    return Spec(tuple(batch) + (q.shape[-2], k.shape[-2]), result_dtype(q, k))


def _probs_grad(b, g, out, q, k, *, is_causal=False, scale=None):
    """From the kept probabilities ``out``: nothing is recomputed."""
    ds = b.softmax_grad(out, g, axis=-1, scale=_scale(q.shape[-1], scale), **({"causal": True} if is_causal else {}))
    tri = _causal_tri(is_causal)  # under the mask, ds is zero above its diagonal, as the probabilities
    gq = sum_to_shape(b, b.matmul(ds, k, **tri), tuple(q.shape)) if b.needs[0] else None
    gk = sum_to_shape(b, b.matmul(_swap(b, ds), q, **_causal_tri(is_causal, "upper")), tuple(k.shape)) \
        if b.needs[1] else None
    return [gq, gk]


def _causal_tri(is_causal: bool, tri: str = "lower") -> dict:
    """matmul's ``tri`` attribute for a product by causal probabilities (or their gradient):
    zero above the diagonal, below it once transposed."""
    return {"tri": tri} if is_causal else {}


def _probs_cost(ins, outs, attrs):
    """The product ``q k^T``, then 5 per score (scale, mask, max, exp, normalise); the scores are
    written by the product, then read and written again by the softmax."""
    q, scores = ins[0], outs[0]
    return Cost((2 * q.shape[-1] + 5) * numel(scores), moved(ins, outs) + 2 * nbytes(scores), gemm=True)


@register("sdpa_probs", infer=_probs_infer, sbp=_sdpa_rows, grad=_probs_grad, cost=_probs_cost)
def sdpa_probs(xp, q, k, *, is_causal=False, scale=None):
    """softmax(q k^T * scale) with the causal mask: the attention weights."""
    return _probs(xp, q, k, is_causal, _scale(q.shape[-1], scale))


def _swap(b, x):
    n = len(x.shape)
    return b.transpose(x, axes=tuple(range(n - 2)) + (n - 1, n - 2))


def _sdpa_grad(b, g, out, q, k, v, *, is_causal=False, scale=None):
    s = _scale(q.shape[-1], scale)
    p = b.sdpa_probs(q, k, is_causal=is_causal, scale=s)
    gv = sum_to_shape(b, b.matmul(_swap(b, p), g, **_causal_tri(is_causal, "upper")), tuple(v.shape)) \
        if b.needs[2] else None
    return _probs_grad(b, b.matmul(g, _swap(b, v)), p, q, k, is_causal=is_causal, scale=s) + [gv]


def _sdpa_cost(ins, outs, attrs):
    """Fused: sdpa_probs, then the product of its probabilities (kept inside) with ``v``."""
    q, k, v = ins
    probs = _probs_infer(q, k)
    first = _probs_cost([q, k], [probs], attrs)
    return Cost(first.flops + 2 * numel(probs) * v.shape[-1],
                first.bytes + nbytes(probs) + nbytes(v) + nbytes(outs[0]), gemm=True)


@register("scaled_dot_product_attention", infer=_sdpa_infer, sbp=_sdpa_rows, grad=_sdpa_grad, cost=_sdpa_cost)
def scaled_dot_product_attention(xp, q, k, v, *, is_causal=False, scale=None):
    """softmax(q k^T * scale [+ causal mask]) v, with PyTorch's top-left aligned causal mask."""
    return mm(xp, _probs(xp, q, k, is_causal, _scale(q.shape[-1], scale)), v, tri="lower" if is_causal else None)


# ------------------------------------------------------------ vocabulary-parallel (Megatron-LM)
# The embedding table and the tied head split along the vocabulary over tensor parallelism:
# each rank holds the rows [offset, offset + local) of the table and the logits of those classes.
# ``offset`` is the shard's place in the vocabulary, set per rank by the ``lower`` rules below.


def _vocab_embedding_infer(table: Spec, idx: Spec, *, vocab_size, offset=0) -> Spec:
    if idx.dtype.kind not in "iu":
        raise DTypeError(f"vocab_embedding: token ids must be integers, got {idx}; cast them with .astype(fs.int64)")
    if table.ndim != 2:
        raise ShapeError(f"vocab_embedding: the table must be (vocab, dim), got {table.shape}")
    return Spec(idx.shape + (table.shape[1],), table.dtype)


def _vocab_embedding_rows(specs, attrs):
    table, idx = specs
    rows = [R.SbpRow((S(0), B), (P,), "each rank looks up the ids of its vocabulary slice, zeros for the others")]
    rows += [R.SbpRow((B, S(i)), (S(i),), "each rank looks up its share of the ids") for i in range(idx.ndim)]
    rows.append(R.SbpRow((S(1), B), (S(idx.ndim),), "each rank gathers its columns of the rows"))
    return rows + [R.replicated(2), R.SbpRow((P, B), (P,), "gathering rows is linear in the table")]


def _check_ids(xp, idx, vocab_size, op):
    if idx.size and (int(idx.max()) >= vocab_size or int(idx.min()) < 0):
        bad = int(idx.max()) if int(idx.max()) >= vocab_size else int(idx.min())
        raise IndexOutOfRange(f"{op}: token id {bad} is out of range for a vocabulary of {vocab_size}; "
                              f"valid ids are 0..{vocab_size - 1}")


def _local_ids(xp, idx, offset, n):
    """Ids relative to the slice [offset, offset + n), and the mask of those inside it."""
    local = idx - offset
    inside = (local >= 0) & (local < n)
    return xp.where(inside, local, 0), inside


@register("vocab_embedding", infer=_vocab_embedding_infer, sbp=_vocab_embedding_rows, cost=gather_cost,
          lower=lambda attrs, shard: {**attrs, "offset": int(shard.in_offsets[0][0])},
          grad=lambda b, g, out, table, idx, *, vocab_size, offset=0: [
              b.vocab_embedding_grad(g, idx, vocab_size=vocab_size, shape=tuple(table.shape)), None])
def vocab_embedding(xp, table, idx, *, vocab_size, offset=0):
    """Rows ``idx`` of ``table`` for the ids in this shard's slice [offset, offset + rows), zero
    rows for the others: on a vocabulary-split table the sum over ranks is the embedding."""
    _check_ids(xp, idx, vocab_size, "vocab_embedding")
    local, inside = _local_ids(xp, idx, offset, table.shape[0])
    out = xp.take(table, local, axis=0)
    if not bool(inside.all()):
        out *= inside[..., None].astype(out.dtype)
    return out


def _vocab_embedding_grad_rows(specs, attrs):
    g, idx = specs
    rows = [R.SbpRow((B, B), (S(0),), "each rank scatters only the ids of its vocabulary slice")]
    rows += [R.SbpRow((S(i), S(i)), (P,), "each rank scatters its share of the ids; the total is the sum")
             for i in range(idx.ndim)]
    rows.append(R.SbpRow((S(idx.ndim), B), (S(1),), "each rank scatters its columns"))
    return rows + [R.replicated(2), R.SbpRow((P, B), (P,), "scatter-add is linear in the gradient")]


@register("vocab_embedding_grad", infer=lambda g, idx, *, vocab_size, shape, offset=0: Spec(tuple(shape), g.dtype),
          sbp=_vocab_embedding_grad_rows, cost=scatter_add_cost,
          lower=lambda attrs, shard: {**attrs, "shape": shard.outs[0].shape, "offset": int(shard.out_offsets[0][0])})
def vocab_embedding_grad(xp, g, idx, *, vocab_size, shape, offset=0):
    """Adjoint of vocab_embedding: this slice's rows of the scatter-add of ``g`` at ``idx``."""
    local, inside = _local_ids(xp, idx.reshape(-1), offset, shape[0])
    rows = g.reshape(idx.size, shape[1])
    if not bool(inside.all()):
        local, rows = local[inside], rows[inside]
    out = xp.zeros(tuple(shape), dtype=g.dtype)
    if xp is np:
        np.add.at(out, local, rows)
    else:
        xp.add.at(out, local, rows)
    return out


def _vocab_max_infer(x: Spec) -> Spec:
    if not is_floating(x.dtype) or x.ndim < 1:
        raise DTypeError(f"vocab_max: takes floating-point logits (..., classes), got {x}")
    return Spec(x.shape[:-1], x.dtype)


def _vocab_max_rows(specs, attrs):
    x = specs[0]
    rows = [R.SbpRow((S(x.ndim - 1),), (R.PMAX,), "each rank's maximum over its classes; the row's is the largest")]
    rows += [R.SbpRow((S(i),), (S(i),), "each row's maximum needs only that row") for i in range(x.ndim - 1)]
    return rows + [R.replicated(1)]


@register("vocab_max", infer=_vocab_max_infer, sbp=_vocab_max_rows, cost=flops_per_input(1),
          grad=lambda b, g, out, x: [b.vocab_max_grad(x, out, g)])
def vocab_max(xp, x):
    """The maximum over the class axis: the shift that keeps cross entropy's exponentials finite
    (cross entropy detaches it: its value does not depend on the shift)."""
    return x.max(axis=-1)


def _ce_parts_infer(x: Spec, t: Spec, m: Spec, *, vocab_size, ignore_index=-100, offset=0):
    _ce_infer(x, t)
    if m.shape != t.shape:
        raise ShapeError(f"vocab_ce_parts: the row maxima {m.shape} must have the targets' shape {t.shape}")
    return Spec(t.shape, x.dtype), Spec(t.shape, x.dtype)


def _ce_parts_rows(specs, attrs):
    x, t, m = specs
    rows = [R.SbpRow((S(x.ndim - 1), B, B), (P, P), "each rank sums its classes' exponentials and picks the "
                                                    "targets in its slice; the totals are sums")]
    rows += [R.SbpRow((S(i), S(i), S(i)), (S(i), S(i)), "each row needs only that row") for i in range(t.ndim)]
    return rows + [R.replicated(3, 2)]


def _ce_parts_grad(b, g, out, x, t, m, *, vocab_size, ignore_index=-100, offset=0):
    g_sum, g_pick = g
    zeros = None
    if g_sum is None or g_pick is None:
        zeros = b.zeros_like(out[0])
    gx = b.vocab_ce_parts_grad(x, t, m, zeros if g_sum is None else g_sum, zeros if g_pick is None else g_pick,
                               ignore_index=ignore_index) if b.needs[0] else None
    gm = b.neg(b.mul(g_sum, out[0])) if b.needs[2] and g_sum is not None else None  # d sum / d m = -sum
    return [gx, None, gm]


@register("vocab_ce_parts", infer=_ce_parts_infer, sbp=_ce_parts_rows, multi_output=True, grad=_ce_parts_grad,
          cost=flops_per_input(_CROSS_ENTROPY - 1),  # cross entropy's work without the max (vocab_max)
          lower=lambda attrs, shard: {**attrs, "offset": int(shard.in_offsets[0][-1])})
def vocab_ce_parts(xp, x, t, m, *, vocab_size, ignore_index=-100, offset=0):
    """Per row: the sum of exp(logit - m) over this shard's classes and the target's logit when
    the target is in this shard's slice [offset, offset + classes) (else 0). Summed over the
    ranks of a vocabulary split they give cross entropy: log(sum) + m - target logit."""
    n = x.shape[-1]
    rows, tf = x.reshape(-1, n), t.reshape(-1)
    _check_targets(xp, tf, vocab_size, ignore_index)
    local, inside = _local_ids(xp, tf, offset, n)
    inside &= tf != ignore_index
    picked = xp.where(inside, rows[xp.arange(rows.shape[0]), local], 0).astype(x.dtype, copy=False)
    e = rows - m.reshape(-1, 1)
    xp.exp(e, out=e)
    return e.sum(axis=-1).reshape(t.shape), picked.reshape(t.shape)


def _ce_parts_grad_rows(specs, attrs):
    x, t = specs[0], specs[1]
    rows = [R.SbpRow((S(x.ndim - 1), B, B, B, B), (S(x.ndim - 1),), "softmax minus one-hot on each rank's "
                                                                    "classes: no communication")]
    rows += [R.SbpRow((S(i),) * 5, (S(i),), "each row needs only that row") for i in range(t.ndim)]
    return rows + [R.replicated(5, 1), R.SbpRow((B, B, B, P, P), (P,), "linear in the incoming gradients")]


@register("vocab_ce_parts_grad", infer=lambda x, t, m, gs, gp, *, ignore_index=-100, offset=0: x,
          sbp=_ce_parts_grad_rows, lower=lambda attrs, shard: {**attrs, "offset": int(shard.in_offsets[0][-1])},
          cost=flops_per_input(_CROSS_ENTROPY))
def vocab_ce_parts_grad(xp, x, t, m, g_sum, g_pick, *, ignore_index=-100, offset=0):
    """The adjoint of vocab_ce_parts, ``g_sum * exp(logit - m) + g_pick * onehot(target)``, on this
    shard's classes (cross entropy's g_pick is -g: softmax minus one-hot)."""
    n = x.shape[-1]
    rows, tf = x.reshape(-1, n), t.reshape(-1)
    out = rows - m.reshape(-1, 1)
    xp.exp(out, out=out)
    out *= g_sum.reshape(-1, 1).astype(x.dtype, copy=False)
    local, inside = _local_ids(xp, tf, offset, n)
    inside &= tf != ignore_index
    r = xp.arange(rows.shape[0])[inside]
    out[r, local[inside]] += g_pick.reshape(-1)[inside].astype(x.dtype, copy=False)
    return out.reshape(x.shape)


def _vocab_max_grad_rows(specs, attrs):
    x = specs[0]
    rows = [R.SbpRow((S(x.ndim - 1), B, B), (S(x.ndim - 1),), "each rank marks where its classes hold the row maximum")]
    rows += [R.SbpRow((S(i), S(i), S(i)), (S(i),), "each row needs only that row") for i in range(x.ndim - 1)]
    return rows + [R.replicated(3), R.SbpRow((B, B, P), (P,), "linear in the incoming gradient")]


# No FLOPs of its own: cross entropy's count (vocab_ce_parts_grad's) holds them, so that a split
# vocabulary does not change the model's FLOPs; its time is the bytes it moves.
@register("vocab_max_grad", infer=lambda x, m, g: Spec(x.shape, result_dtype(x, g)), sbp=_vocab_max_grad_rows,
          cost=copy_cost)
def vocab_max_grad(xp, x, m, g):
    """The gradient of the row maximum: ``g`` where a logit equals it, zero elsewhere."""
    return (x == m[..., None]) * g[..., None]

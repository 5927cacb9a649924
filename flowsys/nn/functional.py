"""Functional neural-network ops with PyTorch's names and arguments (class axis last).

>>> import flowsys as fs
>>> import flowsys.nn.functional as F
>>> F.softmax(fs.tensor([0., 0.]), axis=-1).numpy().tolist()
[0.5, 0.5]
"""

from __future__ import annotations

import math

import numpy as np

from flowsys.errors import ArgumentError, ShapeError
from flowsys.array_api import take
from flowsys.functions import next_seed, tensor
from flowsys.tensor import Tensor, apply


def relu(x: Tensor) -> Tensor:
    return apply("relu", x)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU, exact (erf) or with ``approximate='tanh'`` (GPT-2's)."""
    return apply("gelu", x, approximate=approximate)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return apply("softmax", x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return apply("log_softmax", x, axis=axis)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Softmax cross entropy of ``logits`` (..., C) against integer ``targets`` (...).

    Targets equal to ``ignore_index`` contribute nothing; ``'mean'`` divides by the number of the
    others (PyTorch's semantics). Unlike PyTorch the class axis is the last one, so (B, T, C)
    logits take (B, T) targets directly.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ArgumentError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(targets, Tensor):
        targets = tensor(targets)
    losses = apply("cross_entropy", logits, targets, ignore_index=ignore_index)
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    count = (targets != ignore_index).sum().astype(logits.dtype)
    return total / count


def nll_loss(log_probs: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood of ``targets`` under ``log_probs`` (..., C)."""
    return cross_entropy(log_probs, targets, ignore_index)


def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalise over the trailing ``normalized_shape`` axes, then scale and shift."""
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[-len(normalized_shape):]) != normalized_shape:
        raise ShapeError(f"layer_norm: input shape {x.shape} does not end with normalized_shape {normalized_shape}")
    if weight is not None and bias is not None and tuple(weight.shape) == tuple(bias.shape) == normalized_shape:
        return apply("layer_norm_affine", x, weight, bias, n_axes=len(normalized_shape), eps=float(eps))
    y = apply("layer_norm", x, n_axes=len(normalized_shape), eps=float(eps))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero elements with probability ``p`` and scale the rest by 1/(1-p); identity when not training."""
    if not training or p == 0.0:
        return x
    return apply("dropout", x, p=float(p), seed=next_seed())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` with PyTorch's (out_features, in_features) weight. The weight may
    also be (out..., in_features) and the bias (out...): outputs (..., out...)."""
    if bias is None:
        return apply("linear", x, weight) if weight.ndim >= 2 else x @ weight.T
    return apply("linear", x, weight, bias)


def embedding(indices: Tensor, weight: Tensor) -> Tensor:
    return take(weight, indices, axis=0)


def _by_probs(att: Tensor, v: Tensor, is_causal: bool) -> Tensor:
    """Attention probabilities times the values; causal ones are zero above the diagonal (dropout
    keeps them so), which the product is told (matmul's ``tri``) so that it skips them."""
    return apply("matmul", att, v, tri="lower") if is_causal else att @ v


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 training: bool = True) -> Tensor:
    """softmax(q kᵀ · scale + mask) v over (..., seq, head_dim) tensors, as PyTorch's.

    Without a mask or dropout this is one fused op; with dropout it is the fused probabilities
    (``sdpa_probs``), dropout, then ``@ v``, as Megatron-LM runs it; with a mask it is composed of
    registered ops.
    ``attn_mask`` is a bool tensor (True = attend) or an additive float tensor.

    The fused op keeps nothing but its inputs and recomputes the probabilities in the backward
    pass (as flash attention does), which saves memory when they are the larger part: long
    sequences. Where they are no larger than q, k and v together, the probabilities are kept
    for the backward pass instead (``sdpa_probs``, then ``@ v``).
    """
    if attn_mask is None:
        if dropout_p == 0.0 or not training:
            tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
            if tq * tk <= (tq + 2 * tk) * d:
                return _by_probs(apply("sdpa_probs", q, k, is_causal=is_causal, scale=scale), v, is_causal)
            return apply("scaled_dot_product_attention", q, k, v, is_causal=is_causal, scale=scale)
        # Megatron-LM's order: one fused scale-mask-softmax, dropout on its probabilities, then @ v.
        att = apply("sdpa_probs", q, k, is_causal=is_causal, scale=scale)
        return _by_probs(dropout(att, dropout_p, training), v, is_causal)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    att = (q @ k.swapaxes(-1, -2)) * s
    if is_causal:
        tq, tk = att.shape[-2:]
        causal = tensor(np.tril(np.ones((tq, tk), dtype=bool)))
        att = apply("where", causal, att, tensor(-math.inf, dtype=att.dtype))
    if attn_mask is not None:
        if attn_mask.dtype.kind == "b":
            att = apply("where", attn_mask, att, tensor(-math.inf, dtype=att.dtype))
        else:
            att = att + attn_mask
    att = softmax(att, axis=-1)
    att = dropout(att, dropout_p, training)
    return att @ v

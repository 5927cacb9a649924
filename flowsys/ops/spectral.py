"""Discrete Fourier transforms (the Array API ``fft`` extension), registered from one table.

A transform works along its axes only, so any other axis may be split (``pointwise`` rows that
skip the transformed axes). Complex values take no gradients in flowsys, so the transforms have
no gradient rules; ``fftshift``/``ifftshift`` are rolls (``flowsys.fft``) and have theirs.
"""

from __future__ import annotations

import numpy as np

from flowsys.errors import ArgumentError, ShapeError
from flowsys.ops import sbp_rules as R
from flowsys.ops.math import check_category, real_dtype
from flowsys.ops.registry import Cost, Spec, moved, normalize_axis, numel, register

NORMS = ("backward", "ortho", "forward")


def complex_dtype(dtype: np.dtype) -> np.dtype:
    """The complex type of a real one's precision (float32 -> complex64, float64 -> complex128)."""
    return np.dtype(np.complex128 if np.dtype(dtype) in (np.float64, np.complex128) else np.complex64)


# name: (input category, output kind: "complex" | "real", length rule of the last transformed axis)
#   "same": n (default: the input's length); "half": n // 2 + 1 (real to complex);
#   "full": n (default: 2 * (m - 1), complex to real)
TRANSFORMS = {
    "fft": ("floating-point", "complex", "same"), "ifft": ("floating-point", "complex", "same"),
    "fftn": ("floating-point", "complex", "same"), "ifftn": ("floating-point", "complex", "same"),
    "rfft": ("real floating-point", "complex", "half"), "rfftn": ("real floating-point", "complex", "half"),
    "ihfft": ("real floating-point", "complex", "half"),
    "irfft": ("floating-point", "real", "full"), "irfftn": ("floating-point", "real", "full"),
    "hfft": ("floating-point", "real", "full"),
}


def _axes_and_sizes(op, x: Spec, s, axes):
    """The transformed axes and the length each is read at (``s``; ``n`` for the 1-D forms)."""
    if axes is None:
        axes = tuple(range(x.ndim)) if s is None else tuple(range(x.ndim - len(s), x.ndim))
    axes = tuple(normalize_axis(op, a, x.shape) for a in axes)
    if len(set(axes)) != len(axes):
        raise ShapeError(f"{op}: repeated axis in {axes} for a tensor of shape {x.shape}")
    if s is not None and len(s) != len(axes):
        raise ShapeError(f"{op}: {len(s)} sizes for {len(axes)} axes")
    return axes, tuple(s) if s is not None else None


def _infer(op):
    category, out, rule = TRANSFORMS[op]

    def infer(x: Spec, *, s=None, axes=None, norm="backward") -> Spec:
        check_category(op, category, x)
        if norm not in NORMS:
            raise ArgumentError(f"{op}: norm is one of {NORMS}, got {norm!r}")
        axes, sizes = _axes_and_sizes(op, x, s, axes)
        if not op.endswith("n") and len(axes) != 1:
            raise ArgumentError(f"{op}: transforms one axis, got axes {axes}; {op}n takes several")
        shape = list(x.shape)
        for i, a in enumerate(axes):
            n = sizes[i] if sizes is not None and sizes[i] != -1 else None
            last = i == len(axes) - 1
            if last and rule == "half":
                shape[a] = (n if n is not None else x.shape[a]) // 2 + 1
            elif last and rule == "full":
                shape[a] = n if n is not None else 2 * (x.shape[a] - 1)
            else:
                shape[a] = n if n is not None else x.shape[a]
            if shape[a] < 1:
                raise ShapeError(f"{op}: axis {a} of {x.shape} gives a transform of length {shape[a]}; pass n= or s=")
        dtype = complex_dtype(x.dtype) if out == "complex" else real_dtype(complex_dtype(x.dtype))
        return Spec(tuple(shape), dtype)

    return infer


def _rows(specs, attrs):
    x = specs[0]
    axes, _ = _axes_and_sizes("fft", x, attrs.get("s"), attrs.get("axes"))
    return R.pointwise(specs, skip_axes=axes)


def _cost(ins, outs, attrs):
    """5 n log2 n per transformed length (the radix-2 count)."""
    n = max(numel(outs[0]), 1)
    return Cost(int(5 * n * max(np.log2(n), 1)), moved(ins, outs))


def _kernel(op):
    one_axis = not op.endswith("n")

    def kernel(xp, x, *, s=None, axes=None, norm="backward"):
        axes, sizes = _axes_and_sizes(op, Spec(x.shape, x.dtype), s, axes)
        if one_axis:
            return getattr(xp.fft, op)(x, n=None if sizes is None else sizes[0], axis=axes[0], norm=norm)
        return getattr(xp.fft, op)(x, s=sizes, axes=axes, norm=norm)

    return kernel


for _op in TRANSFORMS:
    register(_op, infer=_infer(_op), sbp=_rows, cost=_cost, low_precision="native")(_kernel(_op))
del _op

"""The Array API standard's ``fft`` extension (2024.12): ``fs.fft``.

The transforms are registered ops (``flowsys.ops.spectral``: any axis they do not transform may
be split on a mesh); ``fftshift``/``ifftshift`` are rolls, so differentiable; ``fftfreq`` and
``rfftfreq`` make the sample frequencies (float32 by default, as every creation function).

>>> import flowsys as fs
>>> fs.fft.fft(fs.asarray([1.0, 0.0, 0.0, 0.0])).tolist()
[(1+0j), (1+0j), (1+0j), (1+0j)]
"""

from __future__ import annotations

import numpy as np

from flowsys.array_api import _t, asarray, roll
from flowsys.ops.registry import normalize_axes
from flowsys.tensor import DEFAULT_FLOAT, apply

__all__ = ["fft", "ifft", "fftn", "ifftn", "rfft", "irfft", "rfftn", "irfftn", "hfft", "ihfft", "fftfreq",
           "rfftfreq", "fftshift", "ifftshift"]


def _one_axis(op: str):
    def f(x, /, *, n=None, axis=-1, norm="backward"):
        return apply(op, _t(x), s=None if n is None else (int(n),), axes=(int(axis),), norm=norm)

    f.__name__ = f.__qualname__ = op
    f.__doc__ = f"NumPy's ``fft.{op}`` along ``axis``, read at length ``n``, normalised as ``norm`` says."
    return f


def _n_axes(op: str):
    def f(x, /, *, s=None, axes=None, norm="backward"):
        return apply(op, _t(x), s=None if s is None else tuple(int(v) for v in s),
                     axes=None if axes is None else tuple(int(a) for a in axes), norm=norm)

    f.__name__ = f.__qualname__ = op
    f.__doc__ = f"NumPy's ``fft.{op}`` over ``axes`` (all by default), read at sizes ``s``."
    return f


fft, ifft, rfft, irfft, hfft, ihfft = (_one_axis(op) for op in ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft"))
fftn, ifftn, rfftn, irfftn = (_n_axes(op) for op in ("fftn", "ifftn", "rfftn", "irfftn"))


def fftfreq(n, /, *, d=1.0, dtype=None, device=None):
    """The sample frequencies of an ``n``-point transform with spacing ``d``."""
    return asarray(np.fft.fftfreq(int(n), d=d).astype(DEFAULT_FLOAT if dtype is None else np.dtype(dtype)),
                   device=device)


def rfftfreq(n, /, *, d=1.0, dtype=None, device=None):
    return asarray(np.fft.rfftfreq(int(n), d=d).astype(DEFAULT_FLOAT if dtype is None else np.dtype(dtype)),
                   device=device)


def _shift(x, axes, sign):
    x = _t(x)
    axes = normalize_axes("fftshift", axes, x.shape)
    if not axes:
        return apply("astype", x, dtype=x.dtype, copy=True)
    return roll(x, tuple(sign * (x.shape[a] // 2) for a in axes), axis=axes)


def fftshift(x, /, *, axes=None):
    """The zero frequency moved to the middle: a roll by half of each axis in ``axes``."""
    return _shift(x, axes, +1)


def ifftshift(x, /, *, axes=None):
    return _shift(x, axes, -1)

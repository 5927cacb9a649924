"""NumPy-style functions: creation, random numbers and the array API over :class:`Tensor`.

>>> import flowsys as fs
>>> fs.sum(fs.arange(4), axis=0).item()
6
"""

from __future__ import annotations

import numpy as np

from flowsys import device as _device
from flowsys.errors import FlowsysError, PlacementError
from flowsys.global_tensor import make_global
from flowsys.sbp import broadcast
from flowsys.tensor import DEFAULT_FLOAT, Tensor, _operand, apply, float64, int64

# ------------------------------------------------------------------------------------- random

_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed flowsys' global generator (initialisation, ``randn``/``rand``, dropout masks)."""
    global _rng
    _rng = np.random.default_rng(int(seed))


def generator() -> np.random.Generator:
    return _rng


def generator_state(rng: np.random.Generator) -> dict:
    """``rng``'s state, JSON-serialisable (its 128-bit integers as strings), for checkpoints."""
    state = rng.bit_generator.state
    return {"bit_generator": state["bit_generator"], "state": {k: str(v) for k, v in state["state"].items()},
            "has_uint32": state["has_uint32"], "uinteger": state["uinteger"]}


def set_generator_state(rng: np.random.Generator, state: dict) -> None:
    """Restore what :func:`generator_state` returned into ``rng`` (of the same kind)."""
    if state["bit_generator"] != type(rng.bit_generator).__name__:
        raise ValueError(f"RNG state of a {state['bit_generator']} generator, not {type(rng.bit_generator).__name__}")
    rng.bit_generator.state = {**state, "state": {k: int(v) for k, v in state["state"].items()}}


def rng_state() -> dict:
    """The global generator's state, JSON-serialisable (for checkpoints)."""
    return generator_state(_rng)


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    global _rng
    rng = np.random.default_rng()
    set_generator_state(rng, state)
    _rng = rng


def next_seed() -> int:
    """A fresh 63-bit seed drawn from the global generator (for counter-based dropout masks)."""
    return int(_rng.integers(0, 2**63 - 1))


# ----------------------------------------------------------------------------------- creation


def _dtype(dtype, default=DEFAULT_FLOAT) -> np.dtype:
    return np.dtype(default if dtype is None else dtype)


def _shape(shape) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return tuple(int(d) for d in shape)


def _place(array: np.ndarray, device: str, requires_grad: bool, placement=None, sbp=None) -> Tensor:
    """A leaf tensor holding ``array``: local on ``device``, or, given a ``placement``, global
    with ``array`` as its logical value laid out as ``sbp`` (broadcast by default)."""
    if placement is not None:
        return Tensor(make_global(array, placement, broadcast if sbp is None else sbp), requires_grad)
    if sbp is not None:
        raise PlacementError("sbp= needs placement= too, e.g. fs.randn(8, 4, placement=fs.placement('cpu', [0, 1]), "
                             "sbp=fs.sbp.split(0))")
    return Tensor(_device.to_device(array, device), requires_grad)


def tensor(data, dtype=None, requires_grad: bool = False, device: str = "cpu", placement=None, sbp=None) -> Tensor:
    """A tensor from (nested) Python data or an array; Python floats give float32.

    >>> tensor([[1., 2.], [3., 4.]]).dtype
    dtype('float32')
    """
    if isinstance(data, Tensor):
        data = data.numpy()
    elif hasattr(data, "detach") and hasattr(data, "cpu"):  # a torch tensor
        data = data.detach().cpu().numpy()
    arr = np.array(data, dtype=dtype)
    if dtype is None and arr.dtype == float64 and not isinstance(data, np.ndarray):
        arr = arr.astype(DEFAULT_FLOAT)
    return _place(arr, device, requires_grad, placement, sbp)


def asarray(data, dtype=None, device: str = "cpu") -> Tensor:
    """Like ``np.asarray``: keeps a NumPy array's dtype and shares its memory when it can."""
    if isinstance(data, Tensor):
        return data if dtype is None else data.astype(dtype)
    if isinstance(data, np.ndarray):
        return _place(np.asarray(data, dtype=dtype), device, False)
    return tensor(data, dtype=dtype, device=device)


def zeros(*shape, dtype=None, requires_grad: bool = False, device: str = "cpu", placement=None, sbp=None) -> Tensor:
    return _place(np.zeros(_shape(shape), _dtype(dtype)), device, requires_grad, placement, sbp)


def ones(*shape, dtype=None, requires_grad: bool = False, device: str = "cpu", placement=None, sbp=None) -> Tensor:
    return _place(np.ones(_shape(shape), _dtype(dtype)), device, requires_grad, placement, sbp)


def full(shape, fill_value, dtype=None, requires_grad: bool = False, device: str = "cpu", placement=None, sbp=None) -> Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if dtype is None:
        dtype = int64 if isinstance(fill_value, int) and not isinstance(fill_value, bool) else (
            np.bool_ if isinstance(fill_value, bool) else DEFAULT_FLOAT)
    return _place(np.full(shape, fill_value, _dtype(dtype)), device, requires_grad, placement, sbp)


def zeros_like(x: Tensor, dtype=None) -> Tensor:
    """Zeros of ``x``'s shape, device or placement and SBP."""
    return _place(np.zeros(x.shape, _dtype(dtype, x.dtype)), x.device, False, x.placement, x.sbp)


def ones_like(x: Tensor, dtype=None) -> Tensor:
    """Ones of ``x``'s shape, device or placement and SBP (for ``P``, the ones are the sum)."""
    return _place(np.ones(x.shape, _dtype(dtype, x.dtype)), x.device, False, x.placement, x.sbp)


def arange(start, stop=None, step=1, dtype=None, device: str = "cpu", placement=None, sbp=None) -> Tensor:
    """Like ``np.arange``; integer arguments give int64."""
    if stop is None:
        start, stop = 0, start
    ints = all(isinstance(v, (int, np.integer)) for v in (start, stop, step))
    return _place(np.arange(start, stop, step, dtype=_dtype(dtype, int64 if ints else DEFAULT_FLOAT)), device, False,
                  placement, sbp)


def randn(*shape, dtype=None, requires_grad: bool = False, device: str = "cpu", placement=None, sbp=None) -> Tensor:
    """Standard normal samples from the global generator (see :func:`manual_seed`). With
    ``placement=``/``sbp=`` the same logical samples, laid out as a global tensor."""
    dt = _dtype(dtype)
    return _place(_rng.standard_normal(_shape(shape), dtype=np.float64).astype(dt), device, requires_grad,
                  placement, sbp)


def rand(*shape, dtype=None, requires_grad: bool = False, device: str = "cpu", placement=None, sbp=None) -> Tensor:
    dt = _dtype(dtype)
    return _place(_rng.random(_shape(shape), dtype=np.float64).astype(dt), device, requires_grad, placement, sbp)


def randint(low: int, high: int, shape, device: str = "cpu", placement=None, sbp=None) -> Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return _place(_rng.integers(low, high, size=shape, dtype=np.int64), device, False, placement, sbp)


# ---------------------------------------------------------------------------------- array API


def _t(x, like: Tensor | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return _operand(x, like) if like is not None else tensor(x)


def matmul(a, b) -> Tensor:
    a = _t(a)
    return apply("matmul", a, _t(b, a))


def exp(x) -> Tensor:
    return _t(x).exp()


def log(x) -> Tensor:
    return _t(x).log()


def sqrt(x) -> Tensor:
    return _t(x).sqrt()


def tanh(x) -> Tensor:
    return _t(x).tanh()


def maximum(x, y) -> Tensor:
    x = _t(x, y if isinstance(y, Tensor) else None)
    return apply("maximum", x, _t(y, x))


def minimum(x, y) -> Tensor:
    # Convert a Python scalar against the other operand first, as maximum does, so it keeps that dtype.
    x = _t(x, y if isinstance(y, Tensor) else None)
    return -maximum(-x, -_t(y, x))


def where(condition, x, y) -> Tensor:
    """Elements of ``x`` where ``condition`` holds, else of ``y`` (broadcasting)."""
    like = x if isinstance(x, Tensor) else y if isinstance(y, Tensor) else None
    x = _t(x, like)
    y = _t(y, x)
    return apply("where", _t(condition), x, y)


def sum(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - NumPy's name
    return _t(x).sum(axis, keepdims)


def mean(x, axis=None, keepdims: bool = False) -> Tensor:
    return _t(x).mean(axis, keepdims)


def var(x, axis=None, keepdims: bool = False, ddof: int = 0) -> Tensor:
    return _t(x).var(axis, keepdims, ddof)


def max(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - NumPy's name
    return _t(x).max(axis, keepdims)


def min(x, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - NumPy's name
    return _t(x).min(axis, keepdims)


def argmax(x, axis=None, keepdims: bool = False) -> Tensor:
    return _t(x).argmax(axis, keepdims)


def reshape(x, shape) -> Tensor:
    return _t(x).reshape(shape)


def transpose(x, axes=None) -> Tensor:
    return _t(x).transpose(axes) if axes is not None else _t(x).transpose()


def swapaxes(x, a: int, b: int) -> Tensor:
    return _t(x).swapaxes(a, b)


def expand_dims(x, axis: int) -> Tensor:
    return _t(x).expand_dims(axis)


def squeeze(x, axis=None) -> Tensor:
    return _t(x).squeeze(axis)


def broadcast_to(x, shape) -> Tensor:
    return apply("broadcast_to", _t(x), shape=tuple(shape))


def concatenate(xs, axis: int = 0) -> Tensor:
    xs = [_t(x) for x in xs]
    if not xs:
        raise FlowsysError("concatenate: needs at least one tensor")
    return apply("concatenate", *xs, axis=axis)


def stack(xs, axis: int = 0) -> Tensor:
    return concatenate([_t(x).expand_dims(axis) for x in xs], axis=axis)


def split(x, indices_or_sections, axis: int = 0) -> list[Tensor]:
    """Like ``np.split``: ``sections`` equal parts, or cut before each index in a list."""
    ios = indices_or_sections if isinstance(indices_or_sections, int) else tuple(int(i) for i in indices_or_sections)
    return list(apply("split", _t(x), indices_or_sections=ios, axis=axis))


def take(a, indices, axis: int = 0) -> Tensor:
    """Like ``np.take`` with an axis: ``take(table, ids)`` is an embedding lookup."""
    idx = indices if isinstance(indices, Tensor) else tensor(np.asarray(indices, dtype=np.int64))
    return apply("take", _t(a), idx, axis=axis)


def astype(x, dtype) -> Tensor:
    return _t(x).astype(dtype)


def allclose(a, b, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    return bool(np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol))

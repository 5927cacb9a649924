"""NumPy-style functions: creation, random numbers and the array API over :class:`Tensor`.

>>> import flowsys as fs
>>> fs.sum(fs.arange(4), axis=0).item()
6
"""

from __future__ import annotations

import math

import numpy as np

from flowsys import device as _device
from flowsys.errors import ArgumentError, DTypeError, PlacementError
from flowsys.global_tensor import make_global
from flowsys.sbp import broadcast
from flowsys.tensor import DEFAULT_FLOAT, Tensor, apply, float64, int64

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


def _place(array: np.ndarray, device: str | None, requires_grad: bool, placement=None, sbp=None) -> Tensor:
    """A leaf tensor holding ``array``: local on ``device``, or, given a ``placement``, global
    with ``array`` as its logical value laid out as ``sbp`` (broadcast by default)."""
    if placement is not None:
        return Tensor(make_global(array, placement, broadcast if sbp is None else sbp), requires_grad)
    if sbp is not None:
        raise PlacementError("sbp= needs placement= too, e.g. fs.randn(8, 4, placement=fs.placement('cpu', [0, 1]), "
                             "sbp=fs.sbp.split(0))")
    return Tensor(_device.to_device(array, device or "cpu"), requires_grad)


def _defaults(arr: np.ndarray) -> np.ndarray:
    """Python data NumPy read as float64 / complex128 takes the default float32 / complex64."""
    if arr.dtype == float64:
        return arr.astype(DEFAULT_FLOAT)
    if arr.dtype == np.complex128:
        return arr.astype(np.complex64)
    return arr


def _from_python(data, dtype) -> np.ndarray:
    try:
        arr = np.array(data, dtype=dtype)
    except OverflowError:
        raise ArgumentError(f"a Python integer does not fit int64 (or the dtype {dtype}): {data!r}"[:300]) from None
    if arr.dtype == object:
        raise DTypeError(f"cannot make a tensor from {type(data).__name__} data (ragged lists, or objects that are "
                         f"not numbers): {data!r}"[:300])
    return arr if dtype is not None else _defaults(arr)


def tensor(data, dtype=None, requires_grad: bool = False, device: str = "cpu", placement=None, sbp=None) -> Tensor:
    """A tensor from (nested) Python data or an array; Python floats give float32.

    >>> tensor([[1., 2.], [3., 4.]]).dtype
    dtype('float32')
    """
    if isinstance(data, Tensor):
        data = data.numpy()
    elif hasattr(data, "detach") and hasattr(data, "cpu"):  # a torch tensor
        data = data.detach().cpu().numpy()
    arr = np.array(data, dtype=dtype) if isinstance(data, np.ndarray) else _from_python(data, dtype)
    return _place(arr, device, requires_grad, placement, sbp)


def asarray(obj, /, *, dtype=None, device=None, copy=None) -> Tensor:
    """The standard's ``asarray``: a tensor, a NumPy array (its dtype kept, its memory shared
    when it can be), any object with ``__dlpack__`` or the buffer protocol, or Python data
    (float32, complex64 and int64 by default). ``copy=True`` always copies; ``copy=False``
    never does, and raises where it would have to."""
    dtype = None if dtype is None else np.dtype(dtype)
    if isinstance(obj, Tensor):
        if (dtype is None or dtype == obj.dtype) and not copy:
            return obj if device is None or device == obj.device else obj.to(device)
        if copy is False:
            raise ArgumentError(f"asarray: copy=False but a {obj.dtype} tensor becomes {dtype}: that needs a copy")
        out = obj.astype(dtype or obj.dtype, copy=True)
        return out if device is None else out.to(device)
    if not isinstance(obj, (np.ndarray, np.generic)) and (hasattr(obj, "__dlpack__") or isinstance(obj, memoryview)
                                                         or hasattr(obj, "__array__")):
        obj = np.asarray(obj)
    if isinstance(obj, (np.ndarray, np.generic)):
        if copy is False:
            arr = np.asarray(obj, dtype=dtype)
            if isinstance(obj, np.ndarray) and not np.shares_memory(arr, obj) and arr.size:
                raise ArgumentError(f"asarray: copy=False but the {obj.dtype} array becomes {dtype}: that needs a copy")
        else:
            arr = np.array(obj, dtype=dtype, copy=bool(copy) or None)
        return _place(np.asarray(arr), device, False)
    if copy is False:
        raise ArgumentError(f"asarray: copy=False, but {type(obj).__name__} data must be copied into a tensor")
    return _place(_from_python(obj, dtype), device, False)


def zeros(shape, *more, dtype=None, device=None, requires_grad: bool = False, placement=None, sbp=None) -> Tensor:
    """Zeros of ``shape`` (a tuple, or the sizes as arguments: ``zeros(2, 3)``)."""
    return _place(np.zeros(_shape((shape,) + more), _dtype(dtype)), device, requires_grad, placement, sbp)


def ones(shape, *more, dtype=None, device=None, requires_grad: bool = False, placement=None, sbp=None) -> Tensor:
    return _place(np.ones(_shape((shape,) + more), _dtype(dtype)), device, requires_grad, placement, sbp)


def _fill_dtype(fill_value) -> np.dtype:
    if isinstance(fill_value, (bool, np.bool_)):
        return np.dtype(np.bool_)
    if isinstance(fill_value, (int, np.integer)):
        return int64
    if isinstance(fill_value, complex):
        return np.dtype(np.complex64)
    return DEFAULT_FLOAT


def full(shape, fill_value, *, dtype=None, device=None, requires_grad: bool = False, placement=None,
         sbp=None) -> Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if isinstance(fill_value, Tensor):
        fill_value = fill_value.item()
    dtype = _fill_dtype(fill_value) if dtype is None else np.dtype(dtype)
    return _place(np.full(shape, fill_value, dtype), device, requires_grad, placement, sbp)


def zeros_like(x: Tensor, /, *, dtype=None, device=None) -> Tensor:
    """Zeros of ``x``'s shape, device or placement and SBP."""
    return _place(np.zeros(x.shape, _dtype(dtype, x.dtype)), device or x.device, False, x.placement, x.sbp)


def ones_like(x: Tensor, /, *, dtype=None, device=None) -> Tensor:
    """Ones of ``x``'s shape, device or placement and SBP (for ``P``, the ones are the sum)."""
    return _place(np.ones(x.shape, _dtype(dtype, x.dtype)), device or x.device, False, x.placement, x.sbp)


def arange(start, /, stop=None, step=1, *, dtype=None, device=None, placement=None, sbp=None) -> Tensor:
    """Like ``np.arange``; integer arguments give int64, others float32."""
    if stop is None:
        start, stop = 0, start
    ints = all(isinstance(v, (int, np.integer)) for v in (start, stop, step))
    dtype = _dtype(dtype, int64 if ints else DEFAULT_FLOAT)
    if ints or dtype.kind in "iu":
        values = np.arange(start, stop, step, dtype=dtype)
    else:  # computed in float64 and rounded once, so the count is the standard's ceil((stop - start) / step)
        n = max(math.ceil((stop - start) / step), 0)
        values = (start + step * np.arange(n, dtype=np.float64)).astype(dtype)
    return _place(values, device, False, placement, sbp)


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


# ------------------------------------------------------------------------- NumPy names beyond the standard
# (the standard's functions are in flowsys.array_api)


def transpose(x, axes=None) -> Tensor:
    x = x if isinstance(x, Tensor) else tensor(x)
    return x.transpose(axes) if axes is not None else x.transpose()


def swapaxes(x, a: int, b: int) -> Tensor:
    return (x if isinstance(x, Tensor) else tensor(x)).swapaxes(a, b)


def split(x, indices_or_sections, axis: int = 0) -> list[Tensor]:
    """Like ``np.split``: ``sections`` equal parts, or cut before each index in a list."""
    ios = indices_or_sections if isinstance(indices_or_sections, int) else tuple(int(i) for i in indices_or_sections)
    return list(apply("split", x if isinstance(x, Tensor) else tensor(x), indices_or_sections=ios, axis=axis))


def allclose(a, b, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    return bool(np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol))

"""The op registry: one record per op with everything about it.

Each op is registered once with
- its **kernel**, written once against ``xp`` (numpy or cupy): ``kernel(xp, *arrays, **attrs)``;
- its **shape/dtype inference** over :class:`Spec` values, which also validates the input and
  raises :class:`FlowsysError` naming the op, the shapes and the fix;
- its **gradient**, written with other registered ops through a builder ``b`` (``b.mul(g, y)``),
  so that eager autograd and the graph compiler differentiate with the same rules;
- its **SBP signature rows**: under which input SBPs running it shard by shard gives the right
  logical result, each row with its one-line reason;
- for the few ops whose attributes describe the logical tensor (a target shape, a mask seed's
  positions), a **lower** rule giving a shard's attributes from its local shapes and offsets.

This module and the op families beside it are shared vocabulary: they import nothing of
flowsys beyond ``flowsys.sbp`` and ``flowsys.errors``, so every layer may use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from flowsys.errors import FlowsysError, ShapeError
from flowsys.sbp import SbpValue


@dataclass(frozen=True, slots=True)
class Spec:
    """The abstract value of a tensor: its shape and dtype (what inference works on)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"{self.dtype.name}{list(self.shape)}"


@dataclass(frozen=True, slots=True)
class SbpRow:
    """One valid signature: input SBPs -> output SBPs, and why running shard by shard is right."""

    ins: tuple[SbpValue, ...]
    outs: tuple[SbpValue, ...]
    reason: str

    def __repr__(self) -> str:
        ins = ", ".join(map(repr, self.ins))
        outs = ", ".join(map(repr, self.outs))
        return f"({ins}) -> ({outs})  # {self.reason}"


# grad(b, g, out, *inputs, **attrs) -> one gradient (or None) per input.  ``g`` and ``out`` are a
# single value for single-output ops and a tuple for multi-output ops; ``g`` entries may be None.
GradRule = Callable[..., "list[Any] | tuple[Any, ...]"]
# sbp(specs, attrs) -> rows, given the inputs' specs (rows depend on ranks and broadcasting).
SbpRule = Callable[[tuple[Spec, ...], dict[str, Any]], list[SbpRow]]


@dataclass(frozen=True, slots=True)
class Shard:
    """What a lower rule knows about one rank's part of an op application: the local specs of
    its inputs and outputs, and where each sits in its logical tensor (start index per axis)."""

    ins: tuple[Spec, ...]
    outs: tuple[Spec, ...]
    in_offsets: tuple[tuple[int, ...], ...]
    out_offsets: tuple[tuple[int, ...], ...]
    logical_outs: tuple[Spec, ...]


# lower(attrs, shard) -> the attributes one rank runs the kernel with.
LowerRule = Callable[[dict[str, Any], Shard], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class OpDef:
    name: str
    kernel: Callable[..., Any]
    infer: Callable[..., Spec | tuple[Spec, ...]]
    sbp: SbpRule
    grad: GradRule | None = None
    multi_output: bool = False
    doc: str = field(default="", compare=False)
    lower: LowerRule | None = None


OPS: dict[str, OpDef] = {}


def register(
    name: str,
    *,
    infer: Callable[..., Spec | tuple[Spec, ...]],
    sbp: SbpRule,
    grad: GradRule | None = None,
    multi_output: bool = False,
    lower: LowerRule | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``kernel`` as op ``name`` with its rules (one registration per op)."""

    def deco(kernel: Callable[..., Any]) -> Callable[..., Any]:
        if name in OPS:
            raise FlowsysError(f"op {name!r} is registered twice; each op has one registration")
        OPS[name] = OpDef(name, kernel, infer, sbp, grad, multi_output, kernel.__doc__ or "", lower)
        return kernel

    return deco


def local_shape_attr(name: str = "shape") -> LowerRule:
    """Lower rule of ops with a target-shape attribute: a shard targets its own output shape."""
    return lambda attrs, shard: {**attrs, name: shard.outs[0].shape}


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise FlowsysError(f"no op named {name!r} is registered") from None


# ----------------------------------------------------------------------------- helpers for rules


def broadcast_shapes(op: str, *specs: Spec) -> tuple[int, ...]:
    first = specs[0].shape
    if all(s.shape == first for s in specs):  # the common case, without NumPy's general path
        return tuple(first)
    try:
        return tuple(np.broadcast_shapes(*(s.shape for s in specs)))
    except ValueError:
        shapes = " and ".join(str(s.shape) for s in specs)
        raise ShapeError(
            f"{op}: shapes {shapes} do not broadcast (NumPy rules: trailing axes must be equal "
            f"or 1); reshape one operand or insert a size-1 axis"
        ) from None


def result_dtype(*specs: Spec) -> np.dtype:
    first = specs[0].dtype
    if all(s.dtype == first for s in specs):
        return first
    return np.result_type(*(s.dtype for s in specs))


def normalize_axis(op: str, axis: int, ndim: int) -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise ShapeError(f"{op}: axis {axis} is out of range for a tensor of {ndim} dimensions")
    return axis % max(ndim, 1)


def normalize_axes(op: str, axis, ndim: int) -> tuple[int, ...]:
    """``axis`` as NumPy takes it (None, int or tuple) -> sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (int(axis),)
    out = tuple(sorted({normalize_axis(op, int(a), ndim) for a in axis}))
    if len(out) != len(axis):
        raise ShapeError(f"{op}: repeated axis in {axis}")
    return out


def sum_to_shape(b, g, shape: tuple[int, ...]):
    """The gradient of broadcasting: sum ``g`` over the axes that broadcasting added or stretched."""
    if g is None or tuple(g.shape) == tuple(shape):
        return g
    lead = len(g.shape) - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1
    )
    if axes:
        g = b.sum(g, axis=axes, keepdims=True)
    if lead or tuple(g.shape) != tuple(shape):
        g = b.reshape(g, shape=tuple(shape))
    return g

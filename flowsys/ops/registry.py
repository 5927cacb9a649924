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
  positions), a **lower** rule giving a shard's attributes from its local shapes and offsets;
- its **cost**: the FLOPs one application makes and the bytes its kernel moves, on the specs it
  runs on (what the cost model times and MFU counts; ``flowsys.ops.cost`` asks any op by name).

This module and the op families beside it are shared vocabulary: they import nothing of
flowsys beyond ``flowsys.sbp`` and ``flowsys.errors``, so every layer may use them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import ml_dtypes
import numpy as np

from flowsys.errors import AxisError, FlowsysError, ShapeError
from flowsys.sbp import SbpValue


# ------------------------------------------------------------------------------------ dtypes
# bfloat16 comes from ml_dtypes: a NumPy dtype whose ``kind`` is "V", so "is it floating?" is
# ``is_floating``, never ``dtype.kind == "f"``, and it travels and is saved by its name
# (``dtype_text``), never by its code "<V2", which would read back as raw bytes.

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
LOW_FLOATS = (float16, bfloat16)  # computed in float32 by the kernels, rounded back once
_LOW_SET = frozenset(LOW_FLOATS)


def is_floating(dtype) -> bool:
    """Whether ``dtype`` is a real floating type (float16/32/64 or bfloat16)."""
    return dtype is not None and (np.dtype(dtype).kind == "f" or dtype == bfloat16)


def dtype_text(dtype) -> str:
    """How a dtype is written on the wire and in checkpoints: NumPy's code (``"<f4"``), or the
    name of an ml_dtypes type (``"bfloat16"``; ``np.dtype`` reads both back)."""
    dtype = np.dtype(dtype)
    return dtype.name if dtype == bfloat16 else dtype.str


def promote_types(*dtypes) -> np.dtype:
    """The result dtype of an op on tensors of ``dtypes``, as PyTorch promotes: with a bfloat16
    or float16 operand, a floating tensor's type wins over integer and bool tensors
    (bf16 + int64 -> bf16), and bfloat16 meets float16 at float32; otherwise NumPy's rules."""
    dtypes = [np.dtype(d) for d in dtypes]
    floats = [d for d in dtypes if is_floating(d)]
    if any(d in LOW_FLOATS for d in floats):
        return functools.reduce(np.result_type, floats)
    return np.result_type(*dtypes)


def _low_precision(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel`` made right for bfloat16/float16 operands: NumPy rounds them after every ufunc,
    accumulates sums in them and gives float32 for a bfloat16 matmul, so the kernel runs on
    float32 copies and its float32 outputs are rounded back once to the operands' type (what
    PyTorch's kernels do; an op's float64 result stays float64). An in-place kernel (``inplace=True``) writes its copies back. CuPy
    computes float16 itself."""

    @functools.wraps(kernel)
    def run(xp, *arrays, **attrs):
        for a in arrays:
            if getattr(a, "dtype", None) in _LOW_SET:
                return _in_float32(kernel, xp, arrays, attrs)
        return kernel(xp, *arrays, **attrs)

    return run


def _in_float32(kernel, xp, arrays, attrs):
    dtypes = [getattr(a, "dtype", None) for a in arrays]
    low = {d for d in dtypes if d in _LOW_SET}
    if xp is not np and bfloat16 not in low:
        return kernel(xp, *arrays, **attrs)
    wide = [a.astype(float32) if d in _LOW_SET else a for a, d in zip(arrays, dtypes)]
    wider = any(is_floating(d) and d not in _LOW_SET for d in dtypes)
    target = next(iter(low)) if len(low) == 1 and not wider else None  # mixed: float32 or wider is right
    out = kernel(xp, *wide, **attrs)
    written = {}
    if attrs.get("inplace"):
        for a, w in zip(arrays, wide):
            if w is not a:
                a[...] = w
                written[id(w)] = a

    def back(o):
        if id(o) in written:
            return written[id(o)]
        if target is None or getattr(o, "dtype", None) != float32:
            return o
        return xp.asarray(o).astype(target)

    return type(out)(back(o) for o in out) if isinstance(out, (tuple, list)) else back(out)


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
class Cost:
    """What one application of an op costs: ``flops`` (a multiply and an add count as two),
    ``bytes`` its kernel reads plus writes, and ``gemm``: whether it is a matrix product, bound
    by the matrix units' peak rather than by memory."""

    flops: int = 0
    bytes: int = 0
    gemm: bool = False


# cost(ins, outs, attrs) -> Cost, on the specs of one application (logical, or one rank's shard).
CostRule = Callable[[list[Spec], list[Spec], dict[str, Any]], Cost]


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
    cost: CostRule | None = None
    # elementwise ops: the computation on one element (flowsys.ops.scalar), which the fusion pass
    # composes into generated kernels; None: the op is not fused
    scalar: Callable[..., Any] | None = field(default=None, compare=False)
    # ops reducing over rows of their last axes (layer norm, softmax): the computation on one
    # element of a row (flowsys.ops.scalar.RowRule), fused with the elementwise ops around it
    row: Any = field(default=None, compare=False)


OPS: dict[str, OpDef] = {}


def register(
    name: str,
    *,
    infer: Callable[..., Spec | tuple[Spec, ...]],
    sbp: SbpRule,
    grad: GradRule | None = None,
    multi_output: bool = False,
    lower: LowerRule | None = None,
    low_precision: str = "float32",
    cost: CostRule | None = None,
    scalar: Callable[..., Any] | None = None,
    row: Any = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``kernel`` as op ``name`` with its rules (one registration per op).
    ``low_precision``: ``"float32"`` (bfloat16/float16 operands computed in float32, see
    ``_low_precision``) or ``"native"`` (the kernel takes them as they are, e.g. a cast).
    ``cost``: FLOPs and bytes of one application (without one: :func:`copy_cost`).
    ``scalar``: an elementwise op's rule on one element (``flowsys.ops.scalar``), for fusion.
    ``row``: a row-reducing op's rule on one element of a row (``flowsys.ops.scalar.RowRule``)."""

    def deco(kernel: Callable[..., Any]) -> Callable[..., Any]:
        if name in OPS:
            raise FlowsysError(f"op {name!r} is registered twice; each op has one registration")
        if low_precision not in ("float32", "native"):
            raise FlowsysError(f"op {name!r}: low_precision is 'float32' or 'native', got {low_precision!r}")
        run = _low_precision(kernel) if low_precision == "float32" else kernel
        OPS[name] = OpDef(name, run, infer, sbp, grad, multi_output, kernel.__doc__ or "", lower, cost, scalar, row)
        return kernel

    return deco


def local_shape_attr(name: str = "shape") -> LowerRule:
    """Lower rule of ops with a target-shape attribute: a shard targets its own output shape."""
    return lambda attrs, shard: {**attrs, name: shard.outs[0].shape}


def numel(spec: Spec) -> int:
    return math.prod(spec.shape)


def nbytes(spec: Spec) -> int:
    return math.prod(spec.shape) * spec.dtype.itemsize


def moved(ins: list[Spec], outs: list[Spec]) -> int:
    """Bytes of a kernel that reads each input once and writes each output once."""
    return sum(map(nbytes, ins)) + sum(map(nbytes, outs))


def copy_cost(ins: list[Spec], outs: list[Spec], attrs: dict[str, Any]) -> Cost:
    """An op without arithmetic that reads its inputs and writes its outputs once (and the cost
    of an op registered without a rule)."""
    return Cost(0, moved(ins, outs))


def view_cost(ins: list[Spec], outs: list[Spec], attrs: dict[str, Any]) -> Cost:
    """A kernel returning a view of its input (NumPy and CuPy alike): nothing moves."""
    return Cost()


def gather_cost(ins: list[Spec], outs: list[Spec], attrs: dict[str, Any]) -> Cost:
    """A gather of rows ``(table, ids)``: the ids read, and each output row read from the table
    and written (the rest of the table is not touched)."""
    return Cost(0, nbytes(ins[1]) + 2 * nbytes(outs[0]))


def scatter_add_cost(ins: list[Spec], outs: list[Spec], attrs: dict[str, Any]) -> Cost:
    """A scatter-add of ``(g, ids)``: the output zeroed, the ids and ``g`` read, and each of
    ``g``'s rows added into the output (read and written)."""
    return Cost(0, nbytes(outs[0]) + nbytes(ins[1]) + 3 * nbytes(ins[0]))


def flops_per_input(n: int) -> CostRule:
    """Cost rule of an op doing ``n`` FLOPs per element of its first input, reading its inputs
    and writing its outputs once."""
    return lambda ins, outs, attrs: Cost(n * numel(ins[0]), moved(ins, outs))


def flops_per_output(n: int) -> CostRule:
    """Cost rule of an op doing ``n`` FLOPs per element of its first output (elementwise ops
    with broadcasting), reading its inputs and writing its outputs once."""
    return lambda ins, outs, attrs: Cost(n * numel(outs[0]), moved(ins, outs))


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
    return promote_types(*(s.dtype for s in specs))


def normalize_axis(op: str, axis: int, ndim: int | tuple[int, ...]) -> int:
    """``axis`` as a non-negative index (``ndim``: the rank, or the shape, which the error names)."""
    shape, ndim = (ndim, len(ndim)) if isinstance(ndim, tuple) else (None, ndim)
    if not -ndim <= axis < ndim:
        where = f"shape {shape} ({ndim} dimensions)" if shape is not None else f"{ndim} dimensions"
        raise AxisError(f"{op}: axis {axis} is out of range for a tensor of {where}; valid axes are "
                        + (f"-{ndim}..{ndim - 1}" if ndim else "none (a 0-d tensor: pass axis=None)"))
    return axis % ndim


def normalize_axes(op: str, axis, ndim: int | tuple[int, ...]) -> tuple[int, ...]:
    """``axis`` as NumPy takes it (None, int or tuple) -> sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(len(ndim) if isinstance(ndim, tuple) else ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (int(axis),)
    out = tuple(sorted({normalize_axis(op, int(a), ndim) for a in axis}))
    if len(out) != len(axis):
        raise AxisError(f"{op}: repeated axis in {axis} for a tensor of {'shape ' if isinstance(ndim, tuple) else ''}"
                        f"{ndim}{'' if isinstance(ndim, tuple) else ' dimensions'}")
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

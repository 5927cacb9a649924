"""The op registry and the op families that fill it (importing this package registers them all)."""

from flowsys.ops.registry import OPS, OpDef, SbpRow, Spec, get_op, register, sum_to_shape
from flowsys.ops import arrays, decomp, elementwise, linalg, math, nn, optim, reduce, shape, spectral  # noqa: F401  (registration)

__all__ = ["OPS", "OpDef", "SbpRow", "Spec", "get_op", "register", "sum_to_shape"]

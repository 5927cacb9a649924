"""The op registry and the op families that fill it (importing this package registers them all)."""

from flowsys.ops.registry import OPS, OpDef, SbpRow, Spec, get_op, register, sum_to_shape
from flowsys.ops import arrays, decomp, elementwise, linalg, math, nn, optim, reduce, shape, spectral  # noqa: F401  (registration)
from flowsys.ops import fusion  # noqa: F401,E402  (the fused op, after the ops it fuses)

__all__ = ["OPS", "OpDef", "SbpRow", "Spec", "get_op", "register", "sum_to_shape"]

"""The Array API standard's elementwise functions, registered from one table per family.

Each entry names the op, the NumPy/CuPy function its kernel calls, the dtype category the
standard lets it take (checked by ``infer``, with a message naming the op and the fix), what its
output dtype is, its gradient rule (None where it has none: integer, bool and piecewise-constant
outputs) and the partial-sum rows of the linear ones. Everything else the family shares: the
pointwise SBP rows (split any output axis, all-B), one cost rule, and the float32 evaluation
of bfloat16/float16 operands. ``flowsys.ops.elementwise`` holds the ops flowsys had before
(add, mul, exp, ...); the namespace (``flowsys.array_api``) maps the standard's names onto both.

Complex operands run (the kernels are NumPy's) but do not take gradients: ``requires_grad``
takes real floating tensors only.
"""

from __future__ import annotations

import math

import numpy as np

from flowsys.errors import DTypeError
from flowsys.ops import sbp_rules as R
from flowsys.ops.registry import Spec, broadcast_shapes, flops_per_output, is_floating, register, result_dtype, sum_to_shape

B, P = R.B, R.P

# ------------------------------------------------------------------------------ dtype categories
# The standard's names for what a function takes; bfloat16/float16 count as real floating.

CATEGORIES = {
    "boolean": lambda d: d == np.bool_,
    "integer": lambda d: d.kind in "iu",
    "integer or boolean": lambda d: d.kind in "biu",
    "real floating-point": is_floating,
    "floating-point": lambda d: is_floating(d) or d.kind == "c",
    "complex floating-point": lambda d: d.kind == "c",
    "real-valued": lambda d: d.kind in "iu" or is_floating(d),
    "real-valued or boolean": lambda d: d.kind in "biu" or is_floating(d),
    "numeric": lambda d: d.kind in "iuc" or is_floating(d),
    "any": lambda d: True,
}

_FIX = {
    "boolean": "compare first (x > 0) or cast with x.astype(fs.bool)",
    "integer": "cast with x.astype(fs.int64)",
    "integer or boolean": "cast with x.astype(fs.int64)",
    "real floating-point": "cast with x.astype(fs.float32)",
    "floating-point": "cast with x.astype(fs.float32)",
    "complex floating-point": "a real tensor's imaginary part is fs.zeros_like(x)",
    "real-valued": "take the real part (fs.real) or the magnitude (fs.abs) first",
    "real-valued or boolean": "take the real part (fs.real) or the magnitude (fs.abs) first",
    "numeric": "cast with x.astype(fs.int64)",
}


def check_category(op: str, category: str, *specs: Spec) -> None:
    for s in specs:
        if not CATEGORIES[category](s.dtype):
            raise DTypeError(f"{op}: takes tensors of a {category} dtype, got {s}; {_FIX[category]}")


def real_dtype(dtype: np.dtype) -> np.dtype:
    """The real type of a complex dtype (complex64 -> float32); other dtypes are their own."""
    return np.dtype(np.float32) if dtype == np.complex64 else np.dtype(np.float64) if dtype == np.complex128 else dtype


_SAME, _BOOL, _REAL = "same", "bool", "real"  # output dtype: the operands', bool, the real type


def _unary_infer(op, category, out):
    def infer(x: Spec) -> Spec:
        check_category(op, category, x)
        dtype = x.dtype if out == _SAME else np.dtype(bool) if out == _BOOL else real_dtype(x.dtype)
        return Spec(x.shape, dtype)

    return infer


def _binary_infer(op, category, out):
    def infer(x: Spec, y: Spec) -> Spec:
        check_category(op, category, x, y)
        return Spec(broadcast_shapes(op, x, y), result_dtype(x, y) if out == _SAME else np.dtype(bool))

    return infer


def _rows(*partial):
    return lambda specs, attrs: R.pointwise(specs, partial)


_LINEAR = ((P,), "linear over the reals: a partial sum in, a partial sum out")


def _zero(b, g, out, x):
    return [b.mul(g, 0.0)]


# ------------------------------------------------------------- where NumPy misses the standard


def _real(xp, x):
    """NumPy's real of a real array is a view of it: a copy here, as every op's output is its own."""
    return xp.real(x) if x.dtype.kind == "c" else xp.array(x)


def _reciprocal(xp, x):
    """NumPy's reciprocal of a complex 0 is nan; the standard's is inf, as 1 / x gives."""
    return xp.divide(x.dtype.type(1), x) if x.dtype.kind == "c" else xp.reciprocal(x)


def _expm1(xp, x):
    return _complex_expm1(xp, x) if x.dtype.kind == "c" else xp.expm1(x)


def _complex_expm1(xp, z):
    """exp(z) - 1 without cancellation near 0, with the standard's special cases (NumPy's
    complex expm1 misses them): re = expm1(a) cos(b) - 2 sin^2(b/2), im = exp(a) sin(b)."""
    a, b = z.real, z.imag
    with np.errstate(all="ignore"):
        re = xp.expm1(a) * xp.cos(b) - 2.0 * xp.sin(b / 2) ** 2
        im = xp.exp(a) * xp.sin(b)
        # the real axis: expm1 of a (+0 for a zero, as the standard has it), b's signed zero kept
        re, im = xp.where(b == 0, xp.where(a == 0, 0.0, xp.expm1(a)), re), xp.where(b == 0, b, im)
        wild = ~xp.isfinite(b)
        re = xp.where(wild & (a == -xp.inf), -1.0, xp.where(wild & (a == xp.inf), xp.inf, re))
        im = xp.where(wild & (a == -xp.inf), 0.0, xp.where(wild & (a == xp.inf), xp.nan, im))
    return complex_from(xp, re, im, z.dtype)


def complex_from(xp, re, im, dtype):
    """The complex array ``re + im j``, signed zeros kept (``re + 1j * im`` would lose them)."""
    out = xp.empty(xp.broadcast_shapes(re.shape, im.shape), dtype)
    out.real, out.imag = re, im
    return out


def _floor_divide(xp, x, y):
    """NumPy's floor division, with the standard's floor(x / y) where an operand is infinite
    (NumPy gives nan or -1 there)."""
    out = xp.floor_divide(x, y)
    if out.dtype.kind == "f":
        out = xp.where(xp.isinf(x) | xp.isinf(y), xp.floor(xp.true_divide(x, y)), out)
    return out


# --------------------------------------------------------------------------------- unary table
# name: (kernel: xp's function of that name, or a function of (xp, x); category, output dtype,
#        gradient rule or None, partial rows, FLOPs)

UNARY = {
    "abs": ("absolute", "numeric", _REAL, lambda b, g, out, x: [b.mul(g, b.sign(x))], (), 1),
    "acos": ("arccos", "floating-point", _SAME,
             lambda b, g, out, x: [b.neg(b.div(g, b.sqrt(b.sub(1.0, b.mul(x, x)))))], (), 8),
    "acosh": ("arccosh", "floating-point", _SAME,
              lambda b, g, out, x: [b.div(g, b.sqrt(b.sub(b.mul(x, x), 1.0)))], (), 8),
    "asin": ("arcsin", "floating-point", _SAME,
             lambda b, g, out, x: [b.div(g, b.sqrt(b.sub(1.0, b.mul(x, x))))], (), 8),
    "asinh": ("arcsinh", "floating-point", _SAME,
              lambda b, g, out, x: [b.div(g, b.sqrt(b.add(b.mul(x, x), 1.0)))], (), 8),
    "atan": ("arctan", "floating-point", _SAME, lambda b, g, out, x: [b.div(g, b.add(b.mul(x, x), 1.0))], (), 8),
    "atanh": ("arctanh", "floating-point", _SAME, lambda b, g, out, x: [b.div(g, b.sub(1.0, b.mul(x, x)))], (), 8),
    "bitwise_invert": ("invert", "integer or boolean", _SAME, None, (), 1),
    "ceil": ("ceil", "real-valued", _SAME, _zero, (), 1),
    "conj": ("conjugate", "numeric", _SAME, lambda b, g, out, x: [g], (_LINEAR,), 1),
    "cos": ("cos", "floating-point", _SAME, lambda b, g, out, x: [b.neg(b.mul(g, b.sin(x)))], (), 4),
    "cosh": ("cosh", "floating-point", _SAME, lambda b, g, out, x: [b.mul(g, b.sinh(x))], (), 4),
    "expm1": (_expm1, "floating-point", _SAME, lambda b, g, out, x: [b.mul(g, b.add(out, 1.0))], (), 4),
    "floor": ("floor", "real-valued", _SAME, _zero, (), 1),
    "imag": ("imag", "complex floating-point", _REAL, None, (_LINEAR,), 1),
    "isfinite": ("isfinite", "numeric", _BOOL, None, (), 1),
    "isinf": ("isinf", "numeric", _BOOL, None, (), 1),
    "isnan": ("isnan", "numeric", _BOOL, None, (), 1),
    "logical_not": ("logical_not", "boolean", _BOOL, None, (), 1),
    "log1p": ("log1p", "floating-point", _SAME, lambda b, g, out, x: [b.div(g, b.add(x, 1.0))], (), 4),
    "log2": ("log2", "floating-point", _SAME, lambda b, g, out, x: [b.div(g, b.mul(x, math.log(2.0)))], (), 4),
    "log10": ("log10", "floating-point", _SAME, lambda b, g, out, x: [b.div(g, b.mul(x, math.log(10.0)))], (), 4),
    "positive": ("positive", "numeric", _SAME, lambda b, g, out, x: [g], (_LINEAR,), 0),
    "real": (_real, "numeric", _REAL, lambda b, g, out, x: [g], (_LINEAR,), 0),
    "reciprocal": (_reciprocal, "floating-point", _SAME, lambda b, g, out, x: [b.neg(b.mul(g, b.mul(out, out)))], (), 1),
    "round": ("round", "numeric", _SAME, _zero, (), 1),
    "sign": ("sign", "numeric", _SAME, _zero, (), 1),
    "signbit": ("signbit", "real floating-point", _BOOL, None, (), 1),
    "sin": ("sin", "floating-point", _SAME, lambda b, g, out, x: [b.mul(g, b.cos(x))], (), 4),
    "sinh": ("sinh", "floating-point", _SAME, lambda b, g, out, x: [b.mul(g, b.cosh(x))], (), 4),
    "square": ("square", "numeric", _SAME, lambda b, g, out, x: [b.mul(g, b.mul(x, 2.0))], (), 1),
    "tan": ("tan", "floating-point", _SAME, lambda b, g, out, x: [b.mul(g, b.add(b.mul(out, out), 1.0))], (), 4),
    "trunc": ("trunc", "real-valued", _SAME, _zero, (), 1),
}


def _kernel(fn):
    """A table entry's kernel: ``fn`` itself, or xp's function of that name."""
    return fn if callable(fn) else (lambda xp, *arrays: getattr(xp, fn)(*arrays))


for _name, (_fn, _cat, _out, _grad, _partial, _flops) in UNARY.items():
    register(_name, infer=_unary_infer(_name, _cat, _out), sbp=_rows(*_partial), grad=_grad,
             cost=flops_per_output(_flops))(_kernel(_fn))


# -------------------------------------------------------------------------------- binary table


def _sq_sum(b, x, y):
    return b.add(b.mul(x, x), b.mul(y, y))


def _atan2_grad(b, g, out, y, x):
    d = _sq_sum(b, x, y)
    return [sum_to_shape(b, b.div(b.mul(g, x), d), y.shape) if b.needs[0] else None,
            sum_to_shape(b, b.neg(b.div(b.mul(g, y), d)), x.shape) if b.needs[1] else None]


def _hypot_grad(b, g, out, x, y):
    return [sum_to_shape(b, b.mul(g, b.div(x, out)), x.shape) if b.needs[0] else None,
            sum_to_shape(b, b.mul(g, b.div(y, out)), y.shape) if b.needs[1] else None]


def _logaddexp_grad(b, g, out, x, y):
    return [sum_to_shape(b, b.mul(g, b.exp(b.sub(x, out))), x.shape) if b.needs[0] else None,
            sum_to_shape(b, b.mul(g, b.exp(b.sub(y, out))), y.shape) if b.needs[1] else None]


def _copysign_grad(b, g, out, x, y):
    # d copysign(x, y)/dx = +1 where the sign was kept, -1 where it flipped; nothing flows to y.
    flip = b.astype(b.ne(b.signbit(x), b.signbit(out)), dtype=g.dtype)
    return [sum_to_shape(b, b.mul(g, b.sub(1.0, b.mul(flip, 2.0))), x.shape) if b.needs[0] else None, None]


def _minimum_grad(b, g, out, x, y):
    # Ties split the gradient in half, as maximum's rule (and PyTorch) does.
    share = b.add(b.astype(b.lt(x, y), dtype=g.dtype), b.mul(b.astype(b.eq(x, y), dtype=g.dtype), 0.5))
    return [sum_to_shape(b, b.mul(g, share), x.shape) if b.needs[0] else None,
            sum_to_shape(b, b.sub(g, b.mul(g, share)), y.shape) if b.needs[1] else None]


def _remainder_grad(b, g, out, x, y):
    # x - floor(x / y) * y: the floor is piecewise constant.
    return [sum_to_shape(b, g, x.shape) if b.needs[0] else None,
            sum_to_shape(b, b.neg(b.mul(g, b.floor_divide(x, y))), y.shape) if b.needs[1] else None]


def _zero2(b, g, out, x, y):
    return [sum_to_shape(b, b.mul(g, 0.0), x.shape) if b.needs[0] else None,
            sum_to_shape(b, b.mul(g, 0.0), y.shape) if b.needs[1] else None]


# name: (kernel as in UNARY, category, output dtype, gradient rule or None, FLOPs)
BINARY = {
    "atan2": ("arctan2", "real floating-point", _SAME, _atan2_grad, 8),
    "bitwise_and": ("bitwise_and", "integer or boolean", _SAME, None, 1),
    "bitwise_or": ("bitwise_or", "integer or boolean", _SAME, None, 1),
    "bitwise_xor": ("bitwise_xor", "integer or boolean", _SAME, None, 1),
    "bitwise_left_shift": ("left_shift", "integer", _SAME, None, 1),
    "bitwise_right_shift": ("right_shift", "integer", _SAME, None, 1),
    "copysign": ("copysign", "real floating-point", _SAME, _copysign_grad, 1),
    "floor_divide": (_floor_divide, "real-valued", _SAME, _zero2, 1),
    "hypot": ("hypot", "real floating-point", _SAME, _hypot_grad, 4),
    "logaddexp": ("logaddexp", "real floating-point", _SAME, _logaddexp_grad, 8),
    "logical_and": ("logical_and", "boolean", _BOOL, None, 1),
    "logical_or": ("logical_or", "boolean", _BOOL, None, 1),
    "logical_xor": ("logical_xor", "boolean", _BOOL, None, 1),
    "minimum": ("minimum", "real-valued or boolean", _SAME, _minimum_grad, 1),
    "nextafter": ("nextafter", "real floating-point", _SAME, None, 1),
    "remainder": ("remainder", "real-valued", _SAME, _remainder_grad, 1),
}


def _binary_kernel(fn):
    kernel = _kernel(fn)

    def run(xp, x, y):
        with np.errstate(all="ignore"):  # integer division by zero gives 0, as the standard leaves it open
            return kernel(xp, x, y)

    return run


for _name, (_fn, _cat, _out, _grad, _flops) in BINARY.items():
    register(_name, infer=_binary_infer(_name, _cat, _out), sbp=_rows(), grad=_grad,
             cost=flops_per_output(_flops))(_binary_kernel(_fn))

del _name, _fn, _cat, _out, _grad, _partial, _flops

FAMILIES = {"unary": tuple(UNARY), "binary": tuple(BINARY)}

"""Elementwise ops (NumPy broadcasting): arithmetic, transcendental, comparisons, activations.

Constants inside kernels are Python floats, never NumPy float64 scalars, so float32 stays float32.
"""

from __future__ import annotations

import math

import numpy as np

from flowsys.errors import ArgumentError, DTypeError, ShapeError
from flowsys.ops import fused, fusion, scalar
from flowsys.ops import sbp_rules as R
from flowsys.ops.chunked import map_blocks
from flowsys.ops.math import check_category, complex_from
from flowsys.ops.scalar import RowRule
from flowsys.ops.registry import (Cost, Spec, broadcast_shapes, flops_per_input, flops_per_output, is_floating, moved,
                                  register, result_dtype, sum_to_shape)

B, P, S = R.B, R.P, R.S


def _binary(op):
    def infer(x: Spec, y: Spec) -> Spec:
        return Spec(broadcast_shapes(op, x, y), result_dtype(x, y))

    return infer


def _compare(op):
    def infer(x: Spec, y: Spec) -> Spec:
        return Spec(broadcast_shapes(op, x, y), np.dtype(bool))

    return infer


def _float_unary(op):
    def infer(x: Spec) -> Spec:
        if not is_floating(x.dtype) and x.dtype.kind != "c":
            raise DTypeError(f"{op}: takes a floating-point tensor, got {x}; cast it with x.astype(fs.float32)")
        return x

    return infer


def _same(x: Spec) -> Spec:
    return x


def _pointwise_rows(*partial):
    return lambda specs, attrs: R.pointwise(specs, partial)


_no_partial = _pointwise_rows()

# The family's cost: one operation per output element, each input read and the output written
# once; the ops that make more per element (pow, tanh, gelu) register their own count.
_ELEMENTWISE = flops_per_output(1)

# --------------------------------------------------------------------------------- arithmetic


@register("add", infer=_binary("add"), sbp=_pointwise_rows(((P, P), "the sum of partial sums is a partial sum of the sum")),
          cost=_ELEMENTWISE, scalar=lambda x, y: x + y,
          grad=lambda b, g, out, x, y: [sum_to_shape(b, g, x.shape), sum_to_shape(b, g, y.shape)])
def add(xp, x, y):
    if getattr(x, "size", 0) >= _THREADED_ADD and getattr(y, "shape", None) == x.shape and fused.usable(xp, x, y) \
            and x.flags.c_contiguous and y.flags.c_contiguous:
        out = fusion.run_one("add", (x, y))  # split over the pool: a residual, a tied weight's two gradients
        if out is not None:
            return out
    return xp.add(x, y)


_THREADED_ADD = 1 << 18  # elements: 1M floats took 457 us in NumPy, 272 on two threads; 256K 86 and 58


@register("sub", infer=_binary("sub"), sbp=_pointwise_rows(((P, P), "the difference of partial sums is a partial sum")),
          cost=_ELEMENTWISE, scalar=lambda x, y: x - y,
          grad=lambda b, g, out, x, y: [sum_to_shape(b, g, x.shape),
                                        sum_to_shape(b, b.neg(g), y.shape) if b.needs[1] else None])
def sub(xp, x, y):
    return xp.subtract(x, y)


@register("mul", infer=_binary("mul"), cost=_ELEMENTWISE, scalar=lambda x, y: x * y,
          sbp=_pointwise_rows(((P, B), "mul is linear in its first operand"), ((B, P), "mul is linear in its second operand")),
          grad=lambda b, g, out, x, y: [sum_to_shape(b, b.mul(g, y), x.shape) if b.needs[0] else None,
                                        sum_to_shape(b, b.mul(g, x), y.shape) if b.needs[1] else None])
def mul(xp, x, y):
    return xp.multiply(x, y)


@register("div", infer=_binary("div"), sbp=_pointwise_rows(((P, B), "dividing by a replicated value is linear")),
          cost=_ELEMENTWISE, scalar=lambda x, y: x / y,
          grad=lambda b, g, out, x, y: [sum_to_shape(b, b.div(g, y), x.shape) if b.needs[0] else None,
                                        sum_to_shape(b, b.neg(b.mul(g, b.div(out, y))), y.shape) if b.needs[1] else None])
def div(xp, x, y):
    return xp.true_divide(x, y)


def _numeric(op):
    def infer(x: Spec) -> Spec:
        check_category(op, "numeric", x)
        return x

    return infer


@register("neg", infer=_numeric("negative (-x)"), sbp=_pointwise_rows(((P,), "neg is linear")), cost=_ELEMENTWISE,
          scalar=lambda x: -x,
          grad=lambda b, g, out, x: [b.neg(g)])
def neg(xp, x):
    return xp.negative(x)


def _pow_grad(b, g, out, x, y):
    gx = gy = None
    if b.needs[0]:
        gx = sum_to_shape(b, b.mul(g, b.mul(y, b.pow(x, b.sub(y, 1.0)))), x.shape)
    if b.needs[1]:
        gy = sum_to_shape(b, b.mul(g, b.mul(out, b.log(x))), y.shape)
    return [gx, gy]


@register("pow", infer=_binary("pow"), sbp=_no_partial, grad=_pow_grad, cost=flops_per_output(2))
def pow_(xp, x, y):
    return xp.power(x, y)


@register("exp", infer=_float_unary("exp"), sbp=_no_partial, grad=lambda b, g, out, x: [b.mul(g, out)],
          cost=_ELEMENTWISE, scalar=lambda x: scalar.exp(x))
def exp(xp, x):
    return xp.exp(x)


@register("log", infer=_float_unary("log"), sbp=_no_partial, grad=lambda b, g, out, x: [b.div(g, x)],
          cost=_ELEMENTWISE, scalar=lambda x: scalar.log(x))
def log(xp, x):
    return xp.log(x)


@register("sqrt", infer=_float_unary("sqrt"), sbp=_no_partial, cost=_ELEMENTWISE, scalar=lambda x: scalar.sqrt(x),
          grad=lambda b, g, out, x: [b.div(b.mul(g, 0.5), out)])
def sqrt(xp, x):
    return xp.sqrt(x)


@register("tanh", infer=_float_unary("tanh"), sbp=_no_partial, cost=flops_per_output(4), scalar=lambda x: scalar.tanh(x),
          grad=lambda b, g, out, x: [b.mul(g, b.sub(1.0, b.mul(out, out)))])
def tanh(xp, x):
    out = xp.tanh(x)
    if x.dtype.kind == "c":  # the standard's +-1 +- 0j at an infinite real part (NumPy's zero has the wrong sign)
        a, b = x.real, x.imag
        edge = xp.isinf(a) & xp.isfinite(b)
        out = xp.where(edge, complex_from(xp, xp.copysign(1.0, a), xp.copysign(0.0, xp.sin(2 * b)), x.dtype), out)
    return out


def _maximum_grad(b, g, out, x, y):
    # Ties split the gradient in half, as PyTorch does.
    share = b.add(b.astype(b.gt(x, y), dtype=g.dtype), b.mul(b.astype(b.eq(x, y), dtype=g.dtype), 0.5))
    gx = sum_to_shape(b, b.mul(g, share), x.shape) if b.needs[0] else None
    gy = sum_to_shape(b, b.sub(g, b.mul(g, share)), y.shape) if b.needs[1] else None
    return [gx, gy]


@register("maximum", infer=_binary("maximum"), sbp=_no_partial, grad=_maximum_grad, cost=_ELEMENTWISE,
          scalar=lambda x, y: scalar.maximum(x, y))
def maximum(xp, x, y):
    return xp.maximum(x, y)


def _where_infer(c: Spec, x: Spec, y: Spec) -> Spec:
    if c.dtype != np.bool_:
        raise DTypeError(f"where: the condition must be bool, got {c}; compare first, e.g. fs.where(x > 0, x, y)")
    return Spec(broadcast_shapes("where", c, x, y), result_dtype(x, y))


@register("where", infer=_where_infer, cost=_ELEMENTWISE,
          sbp=_pointwise_rows(((B, P, P), "selecting with a replicated mask is linear in the selected values")),
          grad=lambda b, g, out, c, x, y: [
              None,
              sum_to_shape(b, b.where(c, g, 0.0), x.shape) if b.needs[1] else None,
              sum_to_shape(b, b.where(c, 0.0, g), y.shape) if b.needs[2] else None])
def where(xp, c, x, y):
    return xp.where(c, x, y)


def _astype_infer(x: Spec, *, dtype, copy=False) -> Spec:
    return Spec(x.shape, np.dtype(dtype))


def _astype_rows(specs, attrs):
    float_to_float = is_floating(specs[0].dtype) and is_floating(attrs["dtype"])
    partial = [((P,), "a float cast commutes with the sum (up to rounding)")] if float_to_float else []
    return R.pointwise(specs, partial)


def _astype_cost(ins, outs, attrs):
    """A copy into the new type; none when the type is already right (unless ``copy`` asks)."""
    return Cost(0, 0 if ins[0].dtype == outs[0].dtype and not attrs.get("copy") else moved(ins, outs))


@register("astype", infer=_astype_infer, sbp=_astype_rows, low_precision="native", cost=_astype_cost,
          grad=lambda b, g, out, x, *, dtype, copy=False: [b.astype(g, dtype=x.dtype) if is_floating(x.dtype) else None])
def astype(xp, x, *, dtype, copy=False):
    """``x`` as ``dtype``: the same array when the type is right, unless ``copy`` asks for a new one."""
    return x.astype(dtype, copy=copy)


# --------------------------------------------------------------------------------- comparisons
# Not differentiable: their outputs are bool.

for _name, _fn in [("eq", "equal"), ("ne", "not_equal"), ("lt", "less"), ("le", "less_equal"),
                   ("gt", "greater"), ("ge", "greater_equal")]:
    register(_name, infer=_compare(_name), sbp=_no_partial, cost=_ELEMENTWISE)(
        (lambda f: lambda xp, x, y: getattr(xp, f)(x, y))(_fn))


# --------------------------------------------------------------------------------- activations


@register("relu", infer=_same, sbp=_no_partial, cost=_ELEMENTWISE, scalar=lambda x: scalar.maximum(x, 0.0),
          grad=lambda b, g, out, x: [b.where(b.gt(x, 0.0), g, 0.0)])
def relu(xp, x):
    return xp.maximum(x, 0)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def erf(xp, x):
    """erf, exact for float64 (math.erf) and to ~1e-6 for float32 (Abramowitz-Stegun 7.1.26)."""
    if xp is not np:
        import cupyx.scipy.special  # noqa: PLC0415 - only on a GPU worker

        return cupyx.scipy.special.erf(x)
    if x.dtype == np.float64:
        return np.vectorize(math.erf, otypes=[np.float64])(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.copysign(1.0 - poly * np.exp(-a * a), x)


def _gelu_infer(x: Spec, *, approximate: str = "none") -> Spec:
    if approximate not in ("none", "tanh"):
        raise ArgumentError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _float_unary("gelu")(x)


@register("gelu", infer=_gelu_infer, sbp=_no_partial, cost=flops_per_output(10), scalar=scalar.gelu,
          grad=lambda b, g, out, x, *, approximate="none": [b.gelu_grad(x, out, g, approximate=approximate)])
def gelu(xp, x, *, approximate="none"):
    out = fusion.run_one("gelu", (x,), approximate=approximate) if fused.usable(xp, x) else None
    if out is not None:  # its scalar rule, generated (flowsys.ops.fusion)
        return out
    return map_blocks(xp, lambda v: _gelu(xp, v, approximate), x)


def _gelu(xp, x, approximate):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + erf(xp, x * _INV_SQRT_2))


@register("gelu_grad", infer=lambda x, y, g, *, approximate="none": Spec(x.shape, result_dtype(x, g)),
          cost=flops_per_output(14), scalar=lambda x, y, g, *, approximate="none": scalar.gelu_grad(x, g, approximate),
          sbp=_pointwise_rows(((B, B, P), "the gradient is linear in the incoming gradient")))
def gelu_grad(xp, x, y, g, *, approximate="none"):
    """g * d gelu(x)/dx, reusing the forward output ``y = x * cdf(x)``: cdf = y / x, so the
    backward pass does not evaluate erf (or tanh) again. The generated float32 kernel (its
    scalar rule) does: one pass computing it is cheaper than the division."""
    out = fusion.run_one("gelu_grad", (x, y, g), approximate=approximate) if fused.usable(xp, x, y, g) else None
    if out is not None:
        return out
    return map_blocks(xp, lambda v, o, w: _gelu_grad(xp, v, o, w, approximate), x, y, g)


# ------------------------------------------------------------------ a linear's bias, then GELU
# An MLP's first linear without its bias, then bias_gelu: the bias is added in GELU's own pass, so
# the product is not filled with the bias first and read back (PyTorch's addmm), and its
# gradient is summed in GELU's backward pass, not in a pass of its own. The row machinery of
# flowsys.ops.fusion generates both kernels (no reductions: the bias is an input of one row's shape).


def _bias_gelu_infer(z: Spec, b: Spec, *, approximate: str = "none") -> Spec:
    _gelu_infer(z, approximate=approximate)
    _gelu_infer(b, approximate=approximate)
    if z.ndim < 1 or b.shape != z.shape[-1:]:
        raise ShapeError(f"bias_gelu: the bias must be one value per column of {z}: shape {z.shape[-1:]}, got {b}")
    return Spec(z.shape, result_dtype(z, b))


def _bias_gelu_rows(specs, attrs):
    """Split any axis of z; the bias follows its columns (whole beside split rows)."""
    z = specs[0]
    rows = [R.SbpRow((S(i), B) + (S(i),) * (len(specs) - 2), (S(i),), "elementwise, a row's bias whole")
            for i in range(z.ndim - 1)]
    rows.append(R.SbpRow((S(z.ndim - 1), S(0)) + (S(z.ndim - 1),) * (len(specs) - 2), (S(z.ndim - 1),),
                         "elementwise, each column with its bias"))
    return rows + [R.replicated(len(specs))]


@register("bias_gelu", infer=_bias_gelu_infer, sbp=_bias_gelu_rows, cost=flops_per_output(11),
          grad=lambda b, g, out, z, bias, *, approximate="none": list(
              b.bias_gelu_grad(z, bias, g, approximate=approximate)),
          row=RowRule(scalar.bias_gelu, lambda attrs: 1))
def bias_gelu(xp, z, b, *, approximate="none"):
    """gelu(z + b) with ``b`` one value per column: a linear's bias added in GELU's pass."""
    if xp is np:
        out = fusion.row_one("bias_gelu", (z, b), approximate=approximate)  # generated from the row rule
        if out is not None:
            return out
    return _gelu(xp, z + b, approximate)


def _bias_gelu_grad_rows(specs, attrs):
    """As bias_gelu's, with g as z; the bias's gradient, a sum over the rows, is partial where the
    rows split; linear in g."""
    z = specs[0]
    rows = [R.SbpRow((S(i), B, S(i)), (S(i), P), "rows are independent; the bias's sums are partial")
            for i in range(z.ndim - 1)]
    rows.append(R.SbpRow((S(z.ndim - 1), S(0), S(z.ndim - 1)), (S(z.ndim - 1), S(0)), "each column with its bias"))
    return rows + [R.replicated(3, 2), R.SbpRow((B, B, P), (P, P), "linear in the incoming gradient")]


@register("bias_gelu_grad", infer=lambda z, b, g, *, approximate="none": (Spec(z.shape, result_dtype(z, b, g)),
                                                                          Spec(b.shape, result_dtype(z, b, g))),
          sbp=_bias_gelu_grad_rows, multi_output=True, cost=flops_per_input(15),
          row=RowRule(scalar.bias_gelu_grad, lambda attrs: 1))
def bias_gelu_grad(xp, z, b, g, *, approximate="none"):
    """(dz, db) of bias_gelu: dz = g * gelu'(z + b), db its sum over the rows, in one pass."""
    if xp is np and g.shape == z.shape:
        out = fusion.row_one("bias_gelu_grad", (z, b, g), approximate=approximate)
        if out is not None:
            return tuple(out)
    h = z + b
    dz = _gelu_grad(xp, h, _gelu(xp, h, approximate), g, approximate)
    return dz, dz.sum(axis=tuple(range(dz.ndim - 1)))


def _gelu_grad(xp, x, y, g, approximate):
    zero = x == 0
    cdf = xp.where(zero, 0.5, y / xp.where(zero, 1.0, x))  # 0.5 * (1 + tanh(u)) in the tanh form
    if approximate == "tanh":
        inner = 2.0 * cdf - 1.0
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        return g * (cdf + 0.5 * x * (1.0 - inner * inner) * d_inner)
    return g * (cdf + x * (_INV_SQRT_2PI * xp.exp(-0.5 * x * x)))

"""Scalar rules: what an elementwise op computes on one element, as an expression.

An op registered with ``scalar=rule`` states its computation once more, on one element: ``rule``
takes one :class:`Expr` per input (and the op's attributes) and returns the :class:`Expr` of its
output, written with ordinary operators and this module's functions::

    @register("add", ..., scalar=lambda x, y: x + y)
    @register("gelu", ..., scalar=scalar.gelu)  # gelu(x, approximate="none") below

The fusion pass (``flowsys.graph.fuse``) chains such ops into one node, and the code generators
(``flowsys.ops.fusion``) render each part's rule as one assignment of the fused kernel: as Python
for a Numba kernel on the CPU (:func:`render` with ``target="numba"``), as C for a CuPy
``ElementwiseKernel`` on CUDA (``target="cuda"``). The op's own kernel (its xp expression) stays the reference the generated
kernels are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Functions an expression may call, with their names per target: (numba float32, numba float64, cuda).
FUNCTIONS = {
    "exp": ("_exp32", "math.exp", "exp"),
    "log": ("math.log", "math.log", "log"),
    "sqrt": ("math.sqrt", "math.sqrt", "sqrt"),
    "tanh": ("math.tanh", "math.tanh", "tanh"),
    "erf": ("_erf32", "math.erf", "erf"),
    "maximum": ("_maximum", "_maximum", "_maximum"),
}


@dataclass(frozen=True)
class Expr:
    """A node of a scalar expression: ``op`` applied to ``args`` (an input's index or a constant's
    value for the leaves)."""

    op: str  # "in", "const", "+", "-", "*", "/", "**", "neg", "<", ">", "==", "where", or a FUNCTIONS name
    args: tuple = ()

    def __add__(self, o): return Expr("+", (self, _e(o)))
    def __radd__(self, o): return Expr("+", (_e(o), self))
    def __sub__(self, o): return Expr("-", (self, _e(o)))
    def __rsub__(self, o): return Expr("-", (_e(o), self))
    def __mul__(self, o): return Expr("*", (self, _e(o)))
    def __rmul__(self, o): return Expr("*", (_e(o), self))
    def __truediv__(self, o): return Expr("/", (self, _e(o)))
    def __rtruediv__(self, o): return Expr("/", (_e(o), self))
    def __pow__(self, o): return Expr("**", (self, _e(o)))
    def __neg__(self): return Expr("neg", (self,))
    def __lt__(self, o): return Expr("<", (self, _e(o)))
    def __gt__(self, o): return Expr(">", (self, _e(o)))
    def eq(self, o): return Expr("==", (self, _e(o)))


def _e(x) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool):
        return Expr("const", (float(x),))
    raise TypeError(f"a scalar rule combines expressions and numbers, got {type(x).__name__}")


def arg(i: int) -> Expr:
    return Expr("in", (i,))


def _call(name: str):
    return lambda *xs: Expr(name, tuple(_e(x) for x in xs))


exp, log, sqrt, tanh, erf, maximum = (_call(n) for n in ("exp", "log", "sqrt", "tanh", "erf", "maximum"))


def where(c: Expr, x, y) -> Expr:
    return Expr("where", (c, _e(x), _e(y)))


# ------------------------------------------------------------------------------------ row rules
@dataclass(frozen=True)
class RowRule:
    """What an op that reduces over the rows of its last axes computes, stated on one element of
    a row: ``expr(row, *inputs, **attrs)`` returns the output element's :class:`Expr`, in which
    ``row.sum(e)``, ``row.max(e)`` and ``row.mean(e)`` stand for ``e`` reduced over the element's
    row (``e`` may hold reductions itself: a variance is ``row.mean(d * d)`` with ``d`` holding
    ``row.mean(x)``). ``axes(attrs)`` is how many trailing axes a row spans, or None where the
    attributes leave the op out of fusion (a softmax over another axis). The op's first input
    has the output's shape; the others that are not 0-d have the row's (layer norm's weight).

        @register("layer_norm", ..., row=RowRule(_ln_row, lambda attrs: attrs.get("n_axes", 1)))
    """

    expr: Any
    axes: Any
    lead: tuple[int, ...] = ()  # inputs with one value per row (the rows' leading shape): targets
    # causal(attrs): under these attributes a row's elements past its query (col > query) add
    # nothing to its reductions and are 0 in its output (a causal softmax and its gradient), so
    # the generated kernel of the op alone stops each row at its diagonal
    causal: Any = None


class _Row:
    """The reductions a row rule may use, and ``col``: the element's index within its row."""

    col = Expr("col")
    query = Expr("query")  # the row's index along the second-to-last axis (a query of attention)

    @staticmethod
    def sum(e) -> Expr:
        return Expr("rsum", (_e(e),))

    @staticmethod
    def max(e) -> Expr:
        return Expr("rmax", (_e(e),))

    @staticmethod
    def mean(e) -> Expr:
        return Expr("rmean", (_e(e),))

    @staticmethod
    def colsum(e) -> Expr:
        """An output: ``e`` summed over the rows, one value per column (a weight's gradient)."""
        return Expr("csum", (_e(e),))


ROW = _Row()
REDUCTIONS = ("rsum", "rmax", "rmean")


def layer_norm(row, x: Expr, *, eps=1e-5, **_) -> Expr:
    d = x - row.mean(x)
    return d / sqrt(row.mean(d * d) + eps)


def layer_norm_affine(row, x: Expr, w: Expr, b: Expr, *, eps=1e-5, **_) -> Expr:
    return layer_norm(row, x, eps=eps) * w + b


def layer_norm_grad(row, x: Expr, g: Expr, *, eps=1e-5, **_) -> Expr:
    """dx of layer_norm at x for incoming g: rstd * (g - mean(g) - y * mean(g * y)), with
    mean(g * y) written rstd * mean(g * d): it then needs the row's mean alone, so the generated
    kernel sums it in the variance's pass (3 passes over a row, not 4)."""
    d = x - row.mean(x)
    rstd = 1.0 / sqrt(row.mean(d * d) + eps)
    y = d * rstd
    return rstd * (g - row.mean(g) - y * (rstd * row.mean(g * d)))


def layer_norm_affine_grad(row, x: Expr, w: Expr, g: Expr, *, eps=1e-5, **_) -> tuple[Expr, Expr, Expr]:
    """(dx, dw, db) of layer_norm_affine: dx is layer_norm_grad's for g * w; dw and db sum g * y
    and g over the rows."""
    y = layer_norm(row, x, eps=eps)
    return layer_norm_grad(row, x, g * w, eps=eps), row.colsum(g * y), row.colsum(g)


def bias_gelu(row, z: Expr, b: Expr, *, approximate="none", **_) -> Expr:
    """gelu(z + b), b one value per column (a linear's bias, added in GELU's pass)."""
    return gelu(z + b, approximate)


def bias_gelu_grad(row, z: Expr, b: Expr, g: Expr, *, approximate="none", **_) -> tuple[Expr, Expr]:
    """(dz, db) of bias_gelu: dz = g * gelu'(z + b); db sums dz over the rows."""
    dz = gelu_grad(z + b, g, approximate)
    return dz, row.colsum(dz)


def softmax(row, x: Expr, **_) -> Expr:
    e = exp(x - row.max(x))
    return e / row.sum(e)


def softmax_grad(row, y: Expr, g: Expr, *, scale=1.0, **_) -> Expr:
    return scale * y * (g - row.sum(g * y))


def scaled_softmax(row, x: Expr, *, scale=1.0, causal=False) -> Expr:
    """softmax(x * scale) with keys after the query masked out (``causal``, top-left aligned)."""
    z = x * scale
    if causal:
        z = where(row.col > row.query, -math.inf, z)
    return softmax(row, z)


def cross_entropy(row, x: Expr, t: Expr, *, ignore_index=-100) -> Expr:
    """-log softmax(x)[t] per row (``t`` the row's target class), 0 where ``t`` is ignore_index."""
    m = row.max(x)
    lse = log(row.sum(exp(x - m))) + m
    return where(t.eq(ignore_index), 0.0, lse - row.sum(where(row.col.eq(t), x, 0.0)))


def cross_entropy_grad(row, x: Expr, t: Expr, g: Expr, *, ignore_index=-100) -> Expr:
    """(softmax(x) - onehot(t)) * g per element (``g`` the row's incoming gradient)."""
    e = exp(x - row.max(x))
    return where(t.eq(ignore_index), 0.0, (e / row.sum(e) - where(row.col.eq(t), 1.0, 0.0)) * g)


# ------------------------------------------------------------------------------ the rules' helpers
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(x: Expr, approximate: str = "none") -> Expr:
    if approximate == "tanh":  # 0.5 (1 + tanh u) = 1 / (1 + exp(-2u)): no cancellation near u = 0
        return x / (1.0 + exp(-2.0 * SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + erf(x * INV_SQRT_2))


def gelu_grad(x: Expr, g: Expr, approximate: str = "none") -> Expr:
    if approximate == "tanh":
        s = 1.0 / (1.0 + exp(-2.0 * SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
        du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        return g * (s + 2.0 * x * s * (1.0 - s) * du)
    return g * (0.5 * (1.0 + erf(x * INV_SQRT_2)) + x * INV_SQRT_2PI * exp(-0.5 * x * x))


def adamw(p: Expr, g: Expr, m: Expr, v: Expr, decay, beta1, beta2, c2, eps, step) -> tuple[Expr, Expr, Expr]:
    """One AdamW update of one element: (param, exp_avg, exp_avg_sq) after it. The step's numbers
    (``decay`` = 1 - lr * weight_decay, ``c2`` = 1 / sqrt(1 - beta2**t), ``step`` = lr / (1 -
    beta1**t)) come in as scalars, so one kernel serves every step."""
    m2 = beta1 * m + (1.0 - beta1) * g
    v2 = beta2 * v + (1.0 - beta2) * g * g
    return p * decay - step * m2 / (sqrt(v2) * c2 + eps), m2, v2


# ----------------------------------------------------------------------------------- rendering
LITERALS = (0.0, 1.0, -1.0, 0.5, 2.0)  # constants kept in the source text; others may be hoisted


def render(e: Expr, names: list[str], target: str, dtype: np.dtype, bound: dict | None = None,
           consts: dict | None = None) -> str:
    """``e`` as source text of ``target`` computing in ``dtype``; ``names[i]`` is input i's name,
    ``bound`` names subexpressions computed already (a row's reductions). With ``consts`` (a dict
    from value to name, filled here), constants other than :data:`LITERALS` are named ``k0``,
    ``k1``, ... instead of written out, so kernels that differ only in them (a layer norm's eps,
    attention's scale) share one source and one compilation; the caller passes their values.
    Constants carry the dtype (Numba would compute ``float32 * 0.5`` in float64)."""
    dtype = np.dtype(dtype)
    f32 = dtype == np.float32
    bound = bound or {}

    def go(x: Expr) -> str:
        op, a = x.op, x.args
        if op not in ("in", "const", "col", "query") and x in bound:
            return bound[x]
        if op in REDUCTIONS:
            raise ValueError(f"a row reduction ({op}) is rendered only once computed (bound)")
        if op == "col":
            return "j"
        if op == "query":
            return "qi"
        if op == "in":
            return names[a[0]]
        if op == "const":
            if consts is not None and math.isfinite(a[0]) and float(a[0]) not in LITERALS:
                return consts.setdefault(float(a[0]), f"k{len(consts)}")
            v = repr(float(a[0])) if math.isfinite(a[0]) else ("np.inf" if a[0] > 0 else "-np.inf")
            if target == "cuda":
                return f"(({_ctype(dtype)}){v if math.isfinite(a[0]) else ('INFINITY' if a[0] > 0 else '-INFINITY')})"
            return f"f32({v})" if f32 else v
        if op in ("+", "-", "*", "/", "<", ">", "=="):
            return f"({go(a[0])} {op} {go(a[1])})"
        if op == "**":
            return f"pow({go(a[0])}, {go(a[1])})" if target == "cuda" else f"({go(a[0])} ** {go(a[1])})"
        if op == "neg":
            return f"(-{go(a[0])})"
        if op == "where":
            c, y, z = (go(v) for v in a)
            return f"({c} ? {y} : {z})" if target == "cuda" else f"({y} if {c} else {z})"
        names_ = FUNCTIONS[op]
        fn = names_[2] if target == "cuda" else names_[0 if f32 else 1]
        if target == "cuda" and f32 and op in ("exp", "log", "sqrt", "tanh", "erf"):
            fn += "f"
        return f"{fn}({', '.join(go(v) for v in a)})"

    return go(e)


def _ctype(dtype: np.dtype) -> str:
    return {"float32": "float", "float64": "double"}[np.dtype(dtype).name]


def evaluate(rule, n_inputs: int, attrs: dict[str, Any]) -> Expr:
    """Op rule ``rule`` applied to fresh inputs 0 .. n_inputs - 1."""
    return _e(rule(*(arg(i) for i in range(n_inputs)), **attrs))


def substitute(e: Expr, args: list[Expr]) -> Expr:
    """``e`` with input leaf i replaced by ``args[i]``: a part's rule applied to earlier parts'
    expressions, so that a fused program becomes one expression per output."""
    memo: dict = {}

    def go(x: Expr) -> Expr:
        if x.op == "in":
            return args[x.args[0]]
        if x.op in ("const", "col", "query"):
            return x
        got = memo.get(id(x))
        if got is None:
            got = memo[id(x)] = Expr(x.op, tuple(go(a) for a in x.args))
        return got

    return go(e)


def per_element(e: Expr, elementwise: set[int]) -> bool:
    """Whether ``e`` varies along its row: it reads input k in ``elementwise`` (one value per
    element) or ``col`` outside a reduction. Otherwise it is one value per row."""
    if e.op in REDUCTIONS or e.op == "const":
        return False
    if e.op == "in":
        return e.args[0] in elementwise
    if e.op == "col":
        return True
    if e.op == "query":
        return False
    return any(isinstance(a, Expr) and per_element(a, elementwise) for a in e.args)


def calls(e: Expr) -> bool:
    """Whether ``e`` calls a function (exp, erf, ...): worth computing once."""
    return e.op in FUNCTIONS or any(isinstance(a, Expr) and calls(a) for a in e.args)


def holds(e: Expr, sub: Expr, skip: Expr | None = None) -> bool:
    """Whether ``sub`` is ``e`` or one of its subexpressions (not counting those inside ``skip``)."""
    if e == skip:
        return False
    return e == sub or any(isinstance(a, Expr) and holds(a, sub, skip) for a in e.args)


def reductions(outs: list[Expr]) -> list[Expr]:
    """The distinct row reductions in ``outs``, each after those it holds (the order to compute them)."""
    order: list[Expr] = []
    seen: set = set()

    def go(x: Expr) -> None:
        if x.op in ("in", "const", "col", "query") or x in seen:
            return
        seen.add(x)
        for a in x.args:
            go(a)
        if x.op in REDUCTIONS:
            order.append(x)

    for o in outs:
        go(o)
    return order

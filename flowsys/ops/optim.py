"""Optimizer updates as ops: ``sgd_update`` and ``adamw_update``, with torch.optim's rules.

An update takes the parameter, its gradient and the optimizer's state arrays for it, and gives the
new parameter and the new state; the hyper-parameters are attributes. The eager optimizers
(``flowsys.optim``), the graph executor and the workers all step through :func:`update_in_place`,
which feeds an op from an optimizer's per-parameter state dict (torch's keys, which checkpoints
store) and writes the results back: what an update is, what it keeps and what it costs are here.

By default a kernel is functional, like every op; ``inplace=True`` writes the new parameter and
state into the input arrays, for the callers that own them. Updates are not differentiated:
they register no gradient rule, so autograd and the autodiff pass never record them.

>>> import numpy as np
>>> from flowsys.ops import OPS
>>> p, g = np.ones(2, np.float32), np.full(2, 0.5, np.float32)
>>> OPS["sgd_update"].kernel(np, p, g, lr=0.1)[0].tolist()
[0.949999988079071, 0.949999988079071]
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from flowsys.errors import ArgumentError, DTypeError, FlowsysError, ShapeError
from flowsys.ops import fusion, scalar
from flowsys.ops import sbp_rules as R
from flowsys.ops.chunked import BLOCK
from flowsys.ops.registry import Cost, OpDef, Spec, flops_per_input, is_floating, moved, nbytes, numel, register


def _check_operands(op: str, specs: tuple[Spec, ...], names: tuple[str, ...]) -> None:
    param = specs[0]
    for spec, name in zip(specs, names):
        if not is_floating(spec.dtype):
            raise DTypeError(f"{op}: {name} must be floating-point, got {spec}; an update steps float parameters")
        if spec.shape != param.shape:
            raise ShapeError(f"{op}: {name} {spec} does not match param {param}; an update is elementwise, so param, "
                             f"grad and state must have the same shape (give the gradient its parameter's layout)")
        if spec.dtype != param.dtype:
            raise DTypeError(f"{op}: {name} {spec} has another dtype than param {param}; cast it to {param.dtype.name}")


def _update_rows(n_out: Callable[[dict], int]):
    """Rows of an update: elementwise, so every operand split along the same axis, or all B.
    No P row: an update is not linear (weight decay, momentum and Adam's square root see the
    whole value), so partial sums must be reduced before it."""
    return lambda specs, attrs: R.pointwise(specs, n_out=n_out(attrs),
                                            reason="elementwise: an element's update reads only the same "
                                                   "element of the gradient and the state")


# ------------------------------------------------------------------------------------------ SGD


def _sgd_infer(param: Spec, grad: Spec, *state: Spec, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
               nesterov=False, maximize=False, inplace=False) -> tuple[Spec, ...]:
    if len(state) > 1 or (state and not momentum):
        raise ArgumentError(f"sgd_update: takes param, grad and, when momentum != 0, a momentum buffer; got "
                            f"{2 + len(state)} inputs with momentum={momentum}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ArgumentError("sgd_update: Nesterov momentum needs momentum > 0 and dampening = 0, got "
                            f"momentum={momentum}, dampening={dampening}")
    _check_operands("sgd_update", (param, grad, *state), ("param", "grad", "momentum_buffer"))
    return (param, param) if momentum else (param,)


def _update_cost(flops: int) -> Callable:
    """An update's cost: ``flops`` per element; the parameter, its gradient and each state array
    read once, the parameter and each state array written once (in place or not). In a plan the
    state stays in the worker, named by the op's ``state`` attribute rather than passed as
    inputs and outputs: it is read and written all the same."""

    def cost(ins: list[Spec], outs: list[Spec], attrs: dict[str, Any]) -> Cost:
        kept = 2 * len(attrs.get("state", ())) * nbytes(ins[0])
        return Cost(flops * numel(ins[0]), moved(ins, outs) + kept)

    return cost


@register("sgd_update", infer=_sgd_infer, multi_output=True, sbp=_update_rows(lambda a: 2 if a.get("momentum") else 1),
          cost=_update_cost(4))  # per element: decay, momentum, descent
def sgd_update(xp, param, grad, *momentum_buffer, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
               nesterov=False, maximize=False, inplace=False):
    """(param,) or, with momentum, (param, momentum_buffer) after one step of ``torch.optim.SGD``.
    Without a buffer input (the first step) the buffer starts as the gradient itself, as torch's."""
    lr, momentum, dampening, weight_decay = float(lr), float(momentum), float(dampening), float(weight_decay)
    d = xp.negative(grad) if maximize else grad
    if weight_decay:
        d = d + weight_decay * param
    buf = None
    if momentum:
        if momentum_buffer:
            buf = momentum_buffer[0] if inplace else momentum_buffer[0].copy()
            buf *= momentum
            buf += (1.0 - dampening) * d
        else:
            buf = d.copy()
        d = d + momentum * buf if nesterov else buf
    if inplace:
        param -= lr * d
    else:
        param = param - lr * d
    return (param,) if buf is None else (param, buf)


# ---------------------------------------------------------------------------------------- AdamW


def _adamw_infer(param: Spec, grad: Spec, exp_avg: Spec, exp_avg_sq: Spec, *, step, lr=1e-3, betas=(0.9, 0.999),
                 eps=1e-8, weight_decay=1e-2, maximize=False, inplace=False) -> tuple[Spec, ...]:
    if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
        raise ArgumentError(f"adamw_update: betas must be two numbers in [0, 1), got {betas}")
    if int(step) != step or step < 1:
        raise ArgumentError(f"adamw_update: step is the count of this update, 1 on the first; got {step}")
    _check_operands("adamw_update", (param, grad, exp_avg, exp_avg_sq), ("param", "grad", "exp_avg", "exp_avg_sq"))
    return param, param, param


@register("adamw_update", infer=_adamw_infer, multi_output=True, sbp=_update_rows(lambda a: 3),
          cost=_update_cost(12))  # per element: decay, the two moments, the square root and the step
def adamw_update(xp, param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=1e-2, maximize=False, inplace=False):
    """(param, exp_avg, exp_avg_sq) after update number ``step`` of ``torch.optim.AdamW``."""
    p, m, v = (param, exp_avg, exp_avg_sq) if inplace else (param.copy(), exp_avg.copy(), exp_avg_sq.copy())
    g = xp.negative(grad) if maximize else grad
    lr, beta1, beta2, eps = float(lr), float(betas[0]), float(betas[1]), float(eps)
    decay = 1.0 - lr * float(weight_decay)
    c2 = 1.0 / math.sqrt(1.0 - beta2 ** step)  # 1 / sqrt(bias correction 2)
    step_size = lr / (1.0 - beta1 ** step)
    if xp is np:  # the generated kernel of the rule (flowsys.ops.scalar.adamw), in place
        hyper = [np.asarray(h, p.dtype) for h in (decay, beta1, beta2, c2, eps, step_size)]
        if fusion.run_rule(scalar.adamw, (p, g, m, v, *hyper), (p, m, v)):
            return p, m, v
    if xp is np and p.size > BLOCK and all(a.flags.c_contiguous for a in (p, g, m, v)):
        # Memory-bound: nine passes over cache-sized slices instead of over the whole array.
        fp, fg, fm, fv = (a.reshape(-1) for a in (p, g, m, v))
        tmp = np.empty(BLOCK, dtype=p.dtype)
        for s in range(0, fp.size, BLOCK):
            n = min(BLOCK, fp.size - s)
            _adamw_update(np, fp[s:s + n], fg[s:s + n], fm[s:s + n], fv[s:s + n], tmp[:n],
                          decay, beta1, beta2, c2, eps, step_size)
    else:
        _adamw_update(xp, p, g, m, v, xp.empty_like(p), decay, beta1, beta2, c2, eps, step_size)
    return p, m, v


def _adamw_update(xp, p, g, m, v, tmp, decay, beta1, beta2, c2, eps, step):
    """One AdamW step in place with one temporary (``tmp``): the NumPy twin of the generated
    kernel (``flowsys.ops.scalar.adamw``)."""
    p *= decay
    xp.multiply(g, 1.0 - beta1, out=tmp)
    m *= beta1
    m += tmp
    xp.multiply(g, g, out=tmp)
    tmp *= 1.0 - beta2
    v *= beta2
    v += tmp
    xp.sqrt(v, out=tmp)
    tmp *= c2
    tmp += eps
    xp.divide(m, tmp, out=tmp)
    tmp *= step
    p -= tmp


# ------------------------------------------------------------------ clipping by the global norm
# torch.nn.utils.clip_grad_norm_ in a compiled step: each gradient's squared sum in float64 as
# its update sees it (its layout), one total (the boxing planner reduces it over exactly the mesh
# axes its shards were split along, so a replicated shard counts once), then the scale.


def _sum_squares_infer(x: Spec) -> Spec:
    if not is_floating(x.dtype):
        raise DTypeError(f"sum_squares: takes a floating-point gradient, got {x}")
    return Spec((), np.dtype(np.float64))


def _sum_squares_rows(specs, attrs):
    x = specs[0]
    rows = [R.SbpRow((R.S(i),), (R.P,), "the squares of a split axis sum to per-rank partial sums")
            for i in range(x.ndim)]
    rows.append(R.replicated(1))  # no P row: squaring a partial sum is not a partial sum of squares
    return rows


@register("sum_squares", infer=_sum_squares_infer, sbp=_sum_squares_rows,
          cost=flops_per_input(2))  # a multiply and an add per element
def sum_squares(xp, x):
    """The sum of ``x``'s squared elements, in float64 (a gradient's squared L2 norm)."""
    x64 = x.astype(np.float64)
    return xp.asarray(xp.sum(x64 * x64))


def _clip_scale_infer(total: Spec, *loss_scale: Spec, max_norm, eps=1e-6, dtype="float32") -> Spec:
    if total.shape != () or any(s.shape != () for s in loss_scale) or len(loss_scale) > 1:
        raise ShapeError(f"clip_scale: takes the squared global norm as a scalar and, with loss scaling, the loss "
                         f"scale as a scalar; got {(total, *loss_scale)}")
    if not float(max_norm) >= 0:
        raise ArgumentError(f"clip_scale: max_norm must be > 0 (0: no clipping, only unscaling), got {max_norm}")
    if not loss_scale and not float(max_norm):
        raise ArgumentError("clip_scale: with max_norm 0 (no clipping) it only unscales, so it needs the loss scale")
    return Spec((), np.dtype(dtype))


@register("clip_scale", infer=_clip_scale_infer, sbp=lambda specs, attrs: [R.replicated(len(specs))],
          cost=lambda ins, outs, attrs: Cost(4, moved(ins, outs)))  # sqrt, add, divide, min of one scalar
def clip_scale(xp, total, *loss_scale, max_norm, eps=1e-6, dtype="float32"):
    """The factor every gradient is multiplied by before its update: ``min(1, max_norm / (norm +
    eps))`` for the squared norm ``total``, as ``clip_grad_norm_`` scales; with a loss scale ``s``
    (fp16) the gradients and ``total`` are scaled, so the factor is ``1/s`` times the clipping of
    the unscaled norm (``max_norm`` 0: unscaling only). Computed in float64, then cast to the
    gradients' dtype."""
    inv = 1.0 / xp.asarray(loss_scale[0], dtype=np.float64) if loss_scale else 1.0
    factor = inv
    if float(max_norm):
        norm = xp.sqrt(xp.asarray(total, dtype=np.float64)) * inv
        factor = xp.minimum(1.0, float(max_norm) / (norm + float(eps))) * inv
    return xp.asarray(factor, dtype=dtype)


# ----------------------------------------------------------------- optimizer state <-> op operands
# An optimizer keeps, per parameter, a dict under torch's keys ("momentum_buffer"; "step",
# "exp_avg", "exp_avg_sq"), and a parameter group's hyper-parameters under torch's names. Per
# update op: which group entries are its attributes, and how its state inputs come from the dict
# (what exists, how it starts): state(xp, param, state, hyper) -> (fields, inputs, attributes).


def _sgd_state(xp, param, state: dict, hyper: dict):
    # on the first step there is no buffer yet: the op starts it from the gradient
    fields = state_fields("sgd_update", hyper)
    return fields, [state[f] for f in fields if f in state], {}


def _adamw_state(xp, param, state: dict, hyper: dict):
    if not state:
        state.update(step=0, exp_avg=xp.zeros_like(param), exp_avg_sq=xp.zeros_like(param))
    return ("exp_avg", "exp_avg_sq"), [state["exp_avg"], state["exp_avg_sq"]], {"step": int(state["step"]) + 1}


_HYPER = {"sgd_update": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
          "adamw_update": ("lr", "betas", "eps", "weight_decay", "maximize")}
_STATE = {"sgd_update": _sgd_state, "adamw_update": _adamw_state}


def state_fields(name: str, hyper: dict) -> tuple[str, ...]:
    """The arrays update op ``name`` keeps per parameter between steps under the group's
    hyper-parameters ``hyper`` (what a plan budgets memory for)."""
    if name == "sgd_update":
        return ("momentum_buffer",) if hyper.get("momentum", 0) else ()
    if name == "adamw_update":
        return "exp_avg", "exp_avg_sq"
    raise FlowsysError(f"no update op named {name!r}; known: {sorted(_STATE)}")


def update_in_place(op: OpDef, xp, param, grad, state: dict[str, Any], hyper: dict[str, Any]) -> None:
    """One optimizer step of the array ``param`` in place by update op ``op``, from ``grad``,
    with the parameter's state dict ``state`` (updated too) and its group's ``hyper``.

    >>> import numpy as np
    >>> from flowsys.ops import OPS
    >>> p, state = np.ones(2, np.float32), {}
    >>> update_in_place(OPS["adamw_update"], np, p, np.ones(2, np.float32), state, {"lr": 0.1})
    >>> [round(float(x), 4) for x in p], state["step"]
    ([0.899, 0.899], 1)
    """
    if op.name not in _STATE:
        raise FlowsysError(f"{op.name} is not an update op; known: {sorted(_STATE)}")
    attrs = {k: hyper[k] for k in _HYPER[op.name] if k in hyper}
    if "betas" in attrs:
        attrs["betas"] = tuple(attrs["betas"])  # JSON (the workers' hyper-parameters) makes it a list
    fields, ins, extra = _STATE[op.name](xp, param, state, hyper)
    attrs.update(extra, inplace=True)
    op.infer(*(Spec(a.shape, np.dtype(a.dtype)) for a in (param, grad, *ins)), **attrs)
    outs = op.kernel(xp, param, grad, *ins, **attrs)
    for field, new in zip(fields, outs[1:]):
        state[field] = new
    if "step" in extra:
        state["step"] = extra["step"]

"""Optimizers with PyTorch's update rules, updating parameter arrays in place.

Each optimizer names its registered update op (``flowsys.ops.optim``: ``sgd_update``,
``adamw_update``), where its rule, its state and its cost are; here are parameter groups and the
per-parameter state, kept under torch's keys (``momentum_buffer``; ``step``, ``exp_avg``,
``exp_avg_sq``) as checkpoints store them.

>>> import flowsys as fs
>>> from flowsys import optim
>>> w = fs.nn.Parameter(fs.ones(2))
>>> opt = optim.SGD([w], lr=0.5)
>>> (w * w).sum().backward(); opt.step()
>>> w.numpy().tolist()
[0.0, 0.0]
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from flowsys.device import module_of
from flowsys.errors import ConfigError
from flowsys.global_tensor import GlobalValue
from flowsys.ops import OPS
from flowsys.ops.optim import update_in_place
from flowsys.optim.state import lay_out_state
from flowsys.tensor import Tensor


class Optimizer:
    """Parameter groups (dicts with ``params`` and hyper-parameters) and per-parameter state."""

    update_op = ""  # the registered op that updates a parameter (set by each optimizer)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], defaults: dict[str, Any]):
        params = list(params)
        if not params:
            raise ConfigError(f"{type(self).__name__}: got an empty parameter list")
        if self.update_op not in OPS:
            raise ConfigError(f"{type(self).__name__}: update_op {self.update_op!r} is not a registered op")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        for g in groups:
            unknown = set(g) - set(defaults) - {"params"}
            if unknown:
                raise ConfigError(f"{type(self).__name__}: unknown option(s) {sorted(unknown)} in a parameter group")
            self.param_groups.append({**self.defaults, **g, "params": list(g["params"])})
        self.state: dict[int, dict[str, Any]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def step(self) -> None:
        from flowsys.nn.module import sum_tied_grads_  # noqa: PLC0415

        sum_tied_grads_(p for group in self.param_groups for p in group["params"])  # tied copies: one gradient
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update_param(p, p.grad._data, group)

    def update_param(self, p: Tensor, grad, group: dict) -> None:
        """Update ``p`` in place from ``grad`` (an array, or a global value)."""
        self.update_value(id(p), p._data, grad, group)

    def update_value(self, key: int, target, grad, group: dict) -> None:
        """Update ``target`` in place (a parameter's array or global value; under ZeRO, graph mode's
        shard of it) from ``grad`` with the state kept under ``key`` (the parameter's id)."""
        state = self.state.setdefault(key, {})
        if type(target) is GlobalValue and "__logical__" in state:  # loaded from a checkpoint: lay it out now
            state = self.state[key] = lay_out_state(state, target.placement, target.sbp)
        op = OPS[self.update_op]
        if type(target) is GlobalValue:
            # Each rank updates its own shard with its shard of the gradient, which has the
            # parameter's layout (autograd and graph mode box leaf gradients to it).
            grad = grad.with_layout(target.placement, target.sbp)
            for r, (shard, g) in enumerate(zip(target.shards, grad.shards)):
                update_in_place(op, module_of(shard), shard, g, state.setdefault(r, {}), group)
        else:
            update_in_place(op, module_of(target), target, grad, state, group)


class SGD(Optimizer):
    """SGD with momentum, dampening, Nesterov and (coupled) weight decay, as ``torch.optim.SGD``."""

    update_op = "sgd_update"

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov, maximize=maximize))


class AdamW(Optimizer):
    """Adam with decoupled weight decay, step for step as ``torch.optim.AdamW``."""

    update_op = "adamw_update"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, maximize: bool = False):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ConfigError(f"AdamW: betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      maximize=maximize))


def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, eps: float = 1e-6) -> float:
    """Scale gradients so their global L2 norm is at most ``max_norm``; returns the norm before.

    A parameter and its tied copy (``Parameter.tied_to``, a pipeline's tied embedding) are one
    parameter: their gradients are summed first (as the optimizer's step would) and counted once."""
    from flowsys.nn.module import sum_tied_grads_, tied_source  # noqa: PLC0415

    if isinstance(parameters, Tensor):  # one tensor, as torch takes (iterating it would give its rows)
        parameters = [parameters]
    parameters = list(parameters)
    sum_tied_grads_(parameters)
    present = {id(p) for p in parameters}
    counted = [p for p in parameters if id(tied_source(p)) not in present]
    grads = [p.grad for p in counted if p.grad is not None]
    copies = [p.grad for p in parameters if id(tied_source(p)) in present and p.grad is not None]
    if not grads:
        return 0.0
    total = math.sqrt(sum(_squared_norm(g) for g in grads))
    scale = max_norm / (total + eps)
    if scale < 1.0:
        for g in grads + copies:  # scaling is linear: every shard of any layout scales alike
            for a in g._data.shards if type(g._data) is GlobalValue else (g._data,):
                a *= scale
    return total


def _squared_norm(g: Tensor) -> float:
    if type(g._data) is GlobalValue:
        g64 = g.astype("float64")
        return float((g64 * g64).sum().item())
    return float((g._data.astype("float64") ** 2).sum())

"""Optimizers with PyTorch's update rules, updating parameter arrays in place.

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

import numpy as np

from flowsys.device import module_of
from flowsys.errors import ConfigError
from flowsys.ops import fused
from flowsys.global_tensor import GlobalValue
from flowsys.tensor import Tensor


class Optimizer:
    """Parameter groups (dicts with ``params`` and hyper-parameters) and per-parameter state."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], defaults: dict[str, Any]):
        params = list(params)
        if not params:
            raise ConfigError(f"{type(self).__name__}: got an empty parameter list")
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
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update_param(p, p.grad._data, group)

    def update_param(self, p: Tensor, grad, group: dict) -> None:
        """Update ``p`` in place from ``grad`` (an array, or a global value); graph mode's
        update nodes call this too."""
        state = self.state.setdefault(id(p), {})
        if type(p._data) is GlobalValue and "__logical__" in state:  # loaded from a checkpoint: lay it out now
            from flowsys.checkpoint import lay_out_state  # noqa: PLC0415

            state = self.state[id(p)] = lay_out_state(state, p._data.placement, p._data.sbp)
        if type(p._data) is GlobalValue:
            # Each rank updates its own shard with its shard of the gradient, which has the
            # parameter's layout (autograd and graph mode box leaf gradients to it).
            grad = grad.with_layout(p._data.placement, p._data.sbp)
            for r, (shard, g) in enumerate(zip(p._data.shards, grad.shards)):
                self._update(shard, g, state.setdefault(r, {}), group)
        else:
            self._update(p._data, grad, state, group)

    @staticmethod
    def _update(p, g, state: dict, group: dict) -> None:  # pragma: no cover - abstract
        raise TypeError("this optimizer defines no update rule")


class SGD(Optimizer):
    """SGD with momentum, dampening, Nesterov and (coupled) weight decay, as ``torch.optim.SGD``."""

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    @staticmethod
    def _update(p, g, state, group):
        if group["weight_decay"]:
            g = g + group["weight_decay"] * p
        mu = group["momentum"]
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= mu
                buf += (1.0 - group["dampening"]) * g
            g = g + mu * buf if group["nesterov"] else buf
        p -= group["lr"] * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay, step for step as ``torch.optim.AdamW``."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ConfigError(f"AdamW: betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @staticmethod
    def _update(p, g, state, group):
        if not state:
            state["step"] = 0
            state["exp_avg"] = module_of(p).zeros_like(p)
            state["exp_avg_sq"] = module_of(p).zeros_like(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        lr, t = group["lr"], state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        xp = module_of(p)
        decay = 1.0 - lr * group["weight_decay"]
        c2 = 1.0 / math.sqrt(1.0 - beta2 ** t)
        step = lr / (1.0 - beta1 ** t)
        if fused.usable(xp, p, g, m, v) and fused.adamw(p, g, m, v, decay=decay, beta1=beta1, beta2=beta2, c2=c2,
                                                        eps=group["eps"], step=step):
            return
        if xp is np and p.size > _BLOCK and all(a.flags.c_contiguous for a in (p, g, m, v)):
            # Memory-bound: nine passes over cache-sized slices instead of over the whole array.
            fp, fg, fm, fv = (a.reshape(-1) for a in (p, g, m, v))
            tmp = np.empty(_BLOCK, dtype=p.dtype)
            for s in range(0, fp.size, _BLOCK):
                n = min(_BLOCK, fp.size - s)
                _adamw_update(np, fp[s:s + n], fg[s:s + n], fm[s:s + n], fv[s:s + n], tmp[:n],
                              decay, beta1, beta2, c2, group["eps"], step)
        else:
            _adamw_update(xp, p, g, m, v, xp.empty_like(p), decay, beta1, beta2, c2, group["eps"], step)


_BLOCK = 1 << 15


def _adamw_update(xp, p, g, m, v, tmp, decay, beta1, beta2, c2, eps, step):
    """One AdamW step in place with one temporary (``tmp``)."""
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


def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, eps: float = 1e-6) -> float:
    """Scale gradients so their global L2 norm is at most ``max_norm``; returns the norm before."""
    if isinstance(parameters, Tensor):  # one tensor, as torch takes (iterating it would give its rows)
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    total = math.sqrt(sum(_squared_norm(g) for g in grads))
    scale = max_norm / (total + eps)
    if scale < 1.0:
        for g in grads:  # scaling is linear: every shard of any layout scales alike
            for a in g._data.shards if type(g._data) is GlobalValue else (g._data,):
                a *= scale
    return total


def _squared_norm(g: Tensor) -> float:
    if type(g._data) is GlobalValue:
        g64 = g.astype("float64")
        return float((g64 * g64).sum().item())
    return float((g._data.astype("float64") ** 2).sum())


def update_rule(name: str):
    """The in-place update ``rule(param, grad, state, group)`` of the optimizer class ``name``:
    what a worker runs for a plan's update op, with the state it keeps and the hyper-parameters
    the driver sends each step."""
    cls = {"SGD": SGD, "AdamW": AdamW}.get(name)
    if cls is None:
        raise ConfigError(f"no update rule for optimizer {name!r}; known: SGD, AdamW")
    return cls._update

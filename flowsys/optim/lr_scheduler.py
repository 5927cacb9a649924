"""Learning-rate schedules."""

from __future__ import annotations

import math

from flowsys.errors import ConfigError
from flowsys.optim.optimizer import Optimizer


def warmup_cosine(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``total_steps`` (nanoGPT's ``get_lr``, step for step); ``min_lr`` afterwards."""
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)  # nanoGPT's: reaches base_lr at warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


class WarmupCosine:
    """Sets each group's ``lr`` from :func:`warmup_cosine`; call ``step()`` once per optimizer step.

    >>> from flowsys import nn, optim
    >>> opt = optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    >>> sched = optim.WarmupCosine(opt, warmup_steps=3, total_steps=10)
    >>> opt.param_groups[0]["lr"]
    0.25
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
        if warmup_steps < 0 or total_steps < 0:
            raise ConfigError(f"WarmupCosine: warmup_steps ({warmup_steps}) and total_steps ({total_steps}) must be >= 0")
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.warmup_steps, self.total_steps, self.min_lr = warmup_steps, total_steps, min_lr
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = warmup_cosine(self.last_step, base_lr=base, warmup_steps=self.warmup_steps,
                                    total_steps=self.total_steps, min_lr=self.min_lr)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

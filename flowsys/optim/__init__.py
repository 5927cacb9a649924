"""Optimizers and schedules: ``from flowsys import optim``."""

from flowsys.optim.lr_scheduler import WarmupCosine, warmup_cosine
from flowsys.optim.optimizer import SGD, AdamW, Optimizer, clip_grad_norm_

__all__ = ["Optimizer", "SGD", "AdamW", "clip_grad_norm_", "WarmupCosine", "warmup_cosine"]

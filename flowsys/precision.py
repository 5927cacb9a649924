"""Mixed precision: which ops run in the low dtype, ``fs.autocast``, and dynamic loss scaling.

One policy, applied while a region is traced (``Graph.config.precision``) or run eagerly
(``with fs.autocast(fs.bfloat16):``), as Megatron keeps a model in bf16 around fp32 masters:

- every floating parameter is cast to the low dtype at its first use in the region, once (the
  cast is cached, as ``torch.autocast`` caches the casts of leaf weights), so its matmuls, its
  saved activations and, under ZeRO 3, its gathers are in the low dtype; the parameter itself
  stays float32 and is what the optimizer updates (the fp32 master weights);
- the inputs of the matmul-like ops (:data:`LOW_OPS`) are cast to the low dtype;
- the losses (:data:`FLOAT32_OPS`) take float32 inputs, so a loss and its reductions are float32;
- every other op computes as its inputs say: a bfloat16/float16 operand is computed in float32
  inside the kernel and written back in the low dtype once (softmax, layer norm, GELU), see
  ``flowsys.ops.registry``.

Gradients come back through the casts, so a parameter's gradient is float32: accumulated over
micro-batches and reduced across ranks in float32 (Megatron's main grads) unless
``Graph.config.grad_reduce_dtype`` names the low dtype.

float16's range is narrow, so fp16 training scales the loss (:class:`LossScaler`, the rules of
``torch.amp.GradScaler``): the backward pass starts from the scale instead of 1, the gradients are
unscaled before clipping, and a step whose gradients hold an inf or NaN is skipped (one "all
finite" test of the global squared gradient norm, in the plan) and halves the scale.

>>> import flowsys as fs
>>> w = fs.ones(2, 2, requires_grad=True)
>>> with fs.autocast(fs.bfloat16):
...     y = fs.ones(3, 2) @ w
>>> y.dtype.name, w.dtype.name
('bfloat16', 'float32')
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from flowsys.errors import ArgumentError
from flowsys.ops.registry import bfloat16, float16, is_floating

float32 = np.dtype(np.float32)

# inputs cast to the low dtype: the GEMMs, where the low dtype's speed and memory are
LOW_OPS = frozenset({"matmul", "linear", "scaled_dot_product_attention", "sdpa_probs"})
# inputs cast to float32: the losses (their log-sum-exp and mean in float32, the loss a float32)
FLOAT32_OPS = frozenset({"cross_entropy", "log_softmax", "vocab_max", "vocab_ce_parts"})

PRECISIONS = {"fp32": None, "bf16": bfloat16, "fp16": float16}


def low_dtype(precision) -> np.dtype | None:
    """The compute dtype a precision names (``"fp32" | "bf16" | "fp16"``, or a dtype); None
    for float32 (no policy)."""
    if precision is None:
        return None
    if isinstance(precision, str) and precision in PRECISIONS:
        return PRECISIONS[precision]
    try:
        dtype = np.dtype(precision)
    except TypeError:
        dtype = None
    if dtype == float32:
        return None
    if dtype in (bfloat16, float16):
        return dtype
    raise ArgumentError(f"precision must be one of {sorted(PRECISIONS)} (or fs.float32 / fs.bfloat16 / "
                        f"fs.float16), got {precision!r}")


def compute_dtype(precision) -> np.dtype:
    """The dtype a precision computes in: float32 for ``"fp32"``, else its low dtype."""
    return low_dtype(precision) or float32


def precision_name(dtype) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for a compute dtype (None: float32)."""
    dtype = low_dtype(dtype)
    return next(k for k, v in PRECISIONS.items() if v == dtype)


class _Policy:
    __slots__ = ("dtype", "cache")

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.cache: dict[int, tuple[Any, Any]] = {}  # id(parameter) -> (parameter, its cast)


_local = threading.local()


def current() -> _Policy | None:
    """The innermost autocast policy of this thread (None outside, or while suspended)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


class autocast:  # noqa: N801 - torch's and the design's name
    """Run the ops inside in ``dtype`` by the policy above (``fs.bfloat16`` or ``fs.float16``;
    ``fs.float32`` or ``enabled=False`` turns it off inside). Backward runs outside it, in the
    dtypes forward chose."""

    def __init__(self, dtype=bfloat16, enabled: bool = True):
        self.dtype = low_dtype(dtype) if enabled else None

    def __enter__(self):
        stack = _local.__dict__.setdefault("stack", [])
        stack.append(_Policy(self.dtype) if self.dtype is not None else None)
        return self

    def __exit__(self, *exc) -> None:
        _local.stack.pop()


def suspended() -> autocast:
    """A region without a policy (backward passes; the compiler's own graph building)."""
    return autocast(enabled=False)


def cast_inputs(name: str, inputs: tuple) -> tuple:
    """``inputs`` of op ``name`` as the active policy wants them (called by ``tensor.apply``)."""
    policy = current()
    if policy is None or name == "astype":
        return inputs
    out = []
    for t in inputs:
        dtype = t._data.dtype
        if not is_floating(dtype):
            out.append(t)
            continue
        leaf = t.is_parameter and t.requires_grad  # an nn.Parameter being trained (traced ones too)
        if name in FLOAT32_OPS:
            want = float32
        elif name in LOW_OPS or leaf:
            want = policy.dtype
        else:
            want = dtype
        if want == dtype or dtype == np.float64:  # float64 is asked for explicitly: left alone
            out.append(t)
        elif leaf and want == policy.dtype:
            hit = policy.cache.get(id(t))
            if hit is None or hit[0] is not t:
                hit = policy.cache[id(t)] = (t, t.astype(want))
            out.append(hit[1])
        else:
            out.append(t.astype(want))
    return tuple(out)


class LossScaler:
    """Dynamic loss scaling as ``torch.amp.GradScaler``: the loss is multiplied by ``scale``
    before backward; after a step whose gradients were all finite the count of good steps grows,
    and every ``growth_interval`` good steps the scale is multiplied by ``growth_factor``; a step
    with an inf or NaN gradient is skipped (no parameter or optimizer state changes) and the scale
    is multiplied by ``backoff_factor``. Its state goes into checkpoints (``state_dict``)."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        if not init_scale > 0 or not growth_factor > 1 or not 0 < backoff_factor < 1 or int(growth_interval) < 1:
            raise ArgumentError(f"LossScaler: needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
                                f"growth_interval >= 1; got {init_scale}, {growth_factor}, {backoff_factor}, "
                                f"{growth_interval}")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.good_steps = 0      # finite steps since the scale last changed
        self.skipped_steps = 0   # steps skipped for a non-finite gradient, in all
        self.last_skipped = False

    def update(self, finite: bool) -> None:
        """After a step: ``finite`` says whether every gradient was finite (and the step taken)."""
        self.last_skipped = not finite
        if not finite:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped_steps += 1
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "good_steps": self.good_steps,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        if not math.isfinite(float(state["scale"])) or not float(state["scale"]) > 0:
            raise ArgumentError(f"LossScaler: a saved scale must be finite and > 0, got {state['scale']!r}")
        self.scale = float(state["scale"])
        self.growth_factor = float(state.get("growth_factor", self.growth_factor))
        self.backoff_factor = float(state.get("backoff_factor", self.backoff_factor))
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))
        self.good_steps = int(state.get("good_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def __repr__(self) -> str:
        return f"LossScaler(scale={self.scale:g}, good_steps={self.good_steps}, skipped_steps={self.skipped_steps})"

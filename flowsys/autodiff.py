"""Reverse mode, one walk for both engines: the eager tape and the graph's ``autodiff`` pass.

Both walk recorded op applications from the last back to the first, calling each op's gradient
rule (``OpDef.grad``) with a builder that applies registered ops to tensors: the eager tape
(``flowsys.tensor.run_backward``) on arrays, the graph pass (``flowsys.graph.passes.autodiff``)
on traced symbols, so that the rules' ops trace the backward graph. What differs (how a node's
inputs and outputs are found, where gradients are summed) is the engine's, a :class:`Engine`.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

from flowsys.errors import GradError


class Node:
    """One op application on the eager tape: what backward needs to run the op's gradient rule."""

    __slots__ = ("op", "inputs", "attrs", "out_data")

    def __init__(self, op, inputs: tuple, attrs: dict, out_data: tuple):
        self.op, self.inputs, self.attrs, self.out_data = op, inputs, attrs, out_data


class Engine(abc.ABC):
    """What :func:`walk` asks of an engine. Pending gradients are ``(tensor, owned)`` pairs,
    ``owned`` saying whether the engine may add into the tensor's array in place."""

    @abc.abstractmethod
    def outputs(self, node) -> Sequence:
        """The keys of ``node``'s outputs among the pending gradients."""

    @abc.abstractmethod
    def applied(self, node) -> tuple[Any, Sequence, Sequence, dict]:
        """``(op, inputs, outputs, attrs)`` of ``node`` as tensors; an input's ``requires_grad``
        says whether it needs a gradient."""

    def owned(self, node, pending: list, in_grads) -> Sequence[bool]:
        """Which of the rule's input gradients the engine owns (none unless it says so)."""
        return [False] * len(in_grads)

    def gradient(self, g):
        """An input gradient as the engine keeps it (the rule's tensor itself unless it says so)."""
        return g

    @abc.abstractmethod
    def accumulate(self, pending: dict, t, g, owned: bool) -> None:
        """Add gradient ``g`` (checked against input ``t``) to what ``t`` has received."""


def walk(nodes: Sequence, pending: dict, engine: Engine, builder) -> None:
    """Reverse mode over ``nodes`` (producers before consumers) from the ``pending`` gradients.

    A node with no pending output gradient, or no input that needs one, is skipped; otherwise
    its op's gradient rule runs through ``builder(needs)``, and each needed input's gradient is
    checked against the input's shape, cast to its dtype (an op that promoted, float16 @
    float32: the input's own dtype, as PyTorch) and handed to the engine to accumulate."""
    for node in reversed(nodes):
        got = [pending.pop(k, None) for k in engine.outputs(node)]
        if all(p is None for p in got):
            continue
        op, inputs, outs, attrs = engine.applied(node)
        needs = tuple(t.requires_grad for t in inputs)
        if not any(needs):
            continue
        gouts = [p[0] if p is not None else None for p in got]
        b = builder(needs)
        if op.multi_output:
            in_grads = op.grad(b, tuple(gouts), tuple(outs), *inputs, **attrs)
        else:
            in_grads = op.grad(b, gouts[0], outs[0], *inputs, **attrs)
        for t, g, own in zip(inputs, in_grads, engine.owned(node, got, in_grads)):
            if g is None or not t.requires_grad:
                continue
            g = engine.gradient(g)
            if g.shape != t.shape:
                raise GradError(f"internal: gradient rule of {op.name} gave shape {g.shape} for an input of shape {t.shape}")
            if g.dtype != t.dtype:
                g, own = g.astype(t.dtype), True
            engine.accumulate(pending, t, g, own)

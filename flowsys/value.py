"""The value protocol: what a :class:`flowsys.Tensor` asks of the value it holds.

A tensor's ``_data`` is one of three kinds of value: an eager array (NumPy, or CuPy on a GPU;
kept raw, as optimizers update ``p._data`` in place), a ``GlobalValue``
(``flowsys.global_tensor``: shards laid out over a placement) or, while ``Graph.build()`` is
traced, a ``Symbol`` (``flowsys.graph.trace``: a graph value). Each kind is a
:class:`ValueKind`, registered here for its value type by the module that defines the type (the
eager array's is ``flowsys.tensor``'s default), so ``tensor.py`` asks the kind of its value
instead of testing types, and a tensor method or op is written once for all three.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

import numpy as np

from flowsys import device as _device
from flowsys.autodiff import Node
from flowsys.autograd import is_grad_enabled
from flowsys.errors import GradError, PlacementError, ShapeError
from flowsys.ops.registry import bfloat16, is_floating


class ValueKind(abc.ABC):
    """One kind of tensor value. Methods take the value (``v``), or the tensor where they need
    its autograd state (``t``); they never make tensors, which is ``tensor.py``'s job. What is
    defined here is shared by more than one kind; the abstract methods each kind defines, and
    the eager tape's (``layout_grad``, ``accumulate``, ``add``) the kinds whose values reach it."""

    priority = 0  # an op on several kinds of value runs as the highest says: traced > global > eager

    @abc.abstractmethod
    def device(self, v) -> str:
        """The device type the value lives on ("cpu", "cuda")."""

    @abc.abstractmethod
    def xp(self, v):
        """The array module the value's kernels run against."""

    def placement(self, v):
        """The devices a global value lives on (None for a local one)."""
        return None

    def sbp(self, v):
        """One SBP value per mesh axis of a global value (None otherwise)."""
        return None

    @abc.abstractmethod
    def logical(self, v):
        """The whole value as one array of its module (a global value gathered on the driver)."""

    @abc.abstractmethod
    def run(self, op, datas: Sequence, attrs: dict, out_spec) -> tuple:
        """Op ``op`` applied to values ``datas`` (at least one of this kind): its output values."""

    def record(self, op, inputs: Sequence, attrs: dict, outs: Sequence) -> None:
        """How the op's output tensors ``outs`` join autograd: on the eager tape, a :class:`Node`
        when grad mode is on, the op has a gradient rule and an input requires grad."""
        if op.grad is not None and is_grad_enabled() and any(t.requires_grad for t in inputs):
            node = Node(op, tuple(inputs), attrs, tuple(o._data for o in outs))
            for i, o in enumerate(outs):
                o._node, o._index, o.requires_grad = node, i, is_floating(o._data.dtype)

    @abc.abstractmethod
    def to_global(self, v, placement, sbp):
        """The value laid out over ``placement`` as ``sbp`` says (``v`` itself if it is already)."""

    def to_local(self, v, rank: int):
        """Rank ``rank``'s shard of a global value."""
        raise PlacementError("to_local: this tensor is not global; .to_global(placement, sbp) makes one")

    def to_device(self, v, device: str):
        return _device.to_device(_device.to_numpy(self.logical(v)), device)

    def mark_loss(self, t) -> bool:
        """Whether ``t.backward()`` is the compiler's (a traced loss, marked for the autodiff
        pass); False: the eager tape runs it."""
        return False

    def broadcast(self, v, array):
        """A logical ``array`` laid out as ``v`` is, replicated (a backward pass's seed)."""
        return array

    def layout_grad(self, v, g):
        """The gradient of a layout change whose input was ``v``: the output's gradient ``g``
        (of any kind) in the input's layout."""
        raise _off_tape(self, "layout_grad")

    def accumulate(self, v, acc, g, owned: bool):
        """Gradient ``g`` (of any kind) of a leaf holding ``v``, added into its gradient ``acc``
        in place, or (``acc`` None) as its new gradient, which must not share ``g``'s memory
        unless ``owned`` says the backward pass owns it."""
        raise _off_tape(self, "accumulate")

    def add(self, a, a_owned: bool, b, b_owned: bool) -> tuple[Any, bool]:
        """The sum of two gradient contributions and whether the backward pass owns it."""
        raise _off_tape(self, "add")

    def copy_(self, v, src) -> None:
        """Overwrite ``v`` in place with value ``src``."""
        if src.shape != v.shape:
            raise ShapeError(f"copy_: source shape {src.shape} does not match {v.shape}")
        v[...] = src

    def zero_(self, v) -> None:
        v[...] = 0

    def describe(self, v, requires_grad: bool) -> str:
        """What ``repr`` shows inside ``tensor(...)``."""
        shown = _device.to_numpy(self.logical(v))
        shown = shown.astype(np.float32) if shown.dtype == bfloat16 else shown  # NumPy formats ml_dtypes' own way
        body = np.array2string(shown, separator=", ", precision=4, threshold=20, prefix="tensor(")
        extra = "" if v.dtype == np.float32 else f", dtype={v.dtype.name}"  # float32: the default
        grad = ", requires_grad=True" if requires_grad else ""
        return f"{body}{extra}{self.repr_suffix(v)}{grad}"

    def repr_suffix(self, v) -> str:
        """Where the value lives, as ``repr`` says it."""
        device = self.device(v)
        return "" if device == "cpu" else f", device='{device}'"


def _off_tape(kind: ValueKind, what: str) -> GradError:
    """A tape-only method asked of a kind whose values never reach the eager tape (a traced
    value: the graph's autodiff pass differentiates it)."""
    return GradError(f"internal: {type(kind).__name__}.{what}: its values are not on the eager tape")


KINDS: dict[type, ValueKind] = {}  # value type -> kind; any other type is an eager array


def register(value_type: type, kind: ValueKind) -> None:
    KINDS[value_type] = kind


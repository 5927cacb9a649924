"""The tensor: a value on a device plus the tape that reverse-mode autograd walks.

The value is an eager array, a global value or, while ``Graph.build()`` is traced, a symbol;
what differs between them the value's kind says (``flowsys.value``). Every operation goes
through :func:`apply`, which validates with the op's inference rule, has the inputs' kind run
it (a kernel, the kernel rank by rank, a traced node) and, when grad mode is on and an input
requires grad, records a :class:`~flowsys.autodiff.Node`. ``backward()`` walks the nodes in
reverse topological order (:func:`flowsys.autodiff.walk`, which the graph's autodiff pass
shares) and calls each op's gradient rule with a builder that applies registered ops to tensors.

>>> import flowsys as fs
>>> x = fs.tensor([[1., 2.], [3., 4.]], requires_grad=True)
>>> (x * x).sum().backward()
>>> x.grad.numpy().tolist()
[[2.0, 4.0], [6.0, 8.0]]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import flowsys as _flowsys
from flowsys import device as _device
from flowsys import precision as _precision
from flowsys.autodiff import Engine, Node, walk
from flowsys.autograd import no_grad
from flowsys.errors import DTypeError, GradError, GraphError, PlacementError, ShapeError
from flowsys.global_tensor import make_global
from flowsys.ops import OPS, OpDef, Spec
from flowsys.ops.registry import bfloat16, float16, is_floating, normalize_axes, normalize_axis, promote_types
from flowsys.placement import Placement
from flowsys.sbp import broadcast as _B
from flowsys.value import KINDS, ValueKind

float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)
int64 = np.dtype(np.int64)
int32 = np.dtype(np.int32)
bool_ = np.dtype(np.bool_)
DEFAULT_FLOAT = float32


class Tensor:
    __slots__ = ("_data", "requires_grad", "grad", "_node", "_index", "__weakref__")
    __array_priority__ = 1000  # numpy_array * tensor defers to Tensor.__rmul__
    is_parameter = False  # nn.Parameter says True (a precision policy casts parameters once)

    def __init__(self, data, requires_grad: bool = False):
        self._data = data
        self.grad: Tensor | None = None
        self._node: Node | None = None
        self._index = 0
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    # ------------------------------------------------------------------ properties and conversion
    @property
    def shape(self) -> tuple[int, ...]:
        return self._data.shape

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    @property
    def ndim(self) -> int:
        return self._data.ndim

    @property
    def size(self) -> int:
        return self._data.size

    @property
    def device(self) -> str:
        d = self._data
        return _kind(d).device(d)

    @property
    def xp(self):
        d = self._data
        return _kind(d).xp(d)

    # ------------------------------------------------------------------------- global tensors
    @property
    def is_global(self) -> bool:
        d = self._data
        return _kind(d).placement(d) is not None

    @property
    def placement(self) -> Placement | None:
        """The devices a global tensor lives on (None for a local tensor)."""
        d = self._data
        return _kind(d).placement(d)

    @property
    def sbp(self) -> tuple | None:
        """One SBP value per mesh axis of a global tensor (None for a local tensor)."""
        d = self._data
        return _kind(d).sbp(d)

    def to_global(self, placement: Placement | None = None, sbp=None) -> Tensor:
        """This tensor laid out over ``placement`` as ``sbp`` says.

        A local tensor is the logical value: it is distributed (``sbp`` defaults to broadcast).
        A global tensor is converted by the boxing planner (same placement: collectives;
        another placement: point-to-point moves); unset arguments keep their current value.
        The conversion is differentiable: its gradient is the incoming one, converted back.
        """
        d = self._data
        kind = _kind(d)
        out = kind.to_global(d, placement, sbp)
        if out is d:
            return self
        t = Tensor(out)
        kind.record(_TO_GLOBAL, (self,), {}, (t,))
        return t

    def to_local(self, rank: int) -> Tensor:
        """Rank ``rank``'s shard of a global tensor, as a local tensor (not differentiable). A
        parameter whose newest values live in the workers (a compiled step ran) is pulled
        from them first."""
        d = self._data
        return Tensor(_kind(d).to_local(d, rank))

    @property
    def data(self) -> Tensor:
        return self.detach()

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    @property
    def T(self) -> Tensor:
        return self.transpose()

    def numpy(self) -> np.ndarray:
        """The value as a NumPy array (a copy for GPU tensors, shared memory for CPU ones); the
        logical value of a global tensor (gathered on the driver). A parameter whose newest
        values live in the workers is pulled from them first; a batch the workers read is read
        here."""
        d = self._data
        return _device.to_numpy(_kind(d).logical(d))

    def item(self):
        if self.size != 1:
            raise ShapeError(f"item: only a one-element tensor converts to a Python scalar, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a.astype(dtype) if dtype is not None else a

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __bool__(self) -> bool:
        return bool(self.item())

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __index__(self) -> int:
        if self.dtype.kind not in "iu":
            raise TypeError(f"only integer tensors can be used as an index, got {self.dtype}")
        return int(self.item())

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        d = self._data
        return f"tensor({_kind(d).describe(d, self.requires_grad)})"

    # ------------------------------------------------------------------------------- autograd
    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        if requires_grad and not is_floating(self.dtype):
            raise GradError(f"only floating-point tensors can require gradients, got dtype {self.dtype}")
        if not requires_grad and self._node is not None:
            raise GradError("requires_grad_(False) on a non-leaf tensor; use .detach() instead")
        self.requires_grad = bool(requires_grad)
        return self

    def detach(self) -> Tensor:
        """A tensor sharing this value, cut from the tape."""
        return Tensor(self._data)

    def backward(self, gradient: Tensor | None = None) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad`` (``gradient`` for non-scalars)."""
        d = self._data
        kind = _kind(d)
        if kind.mark_loss(self):  # inside Graph.build(): the autodiff pass does the work
            return
        if not self.requires_grad:
            raise GradError(
                f"backward: this tensor (shape {self.shape}) does not require grad: no input of the "
                f"computation had requires_grad=True, or it ran under fs.no_grad()")
        if gradient is None:
            if self.size != 1:
                raise GradError(
                    f"backward: the output has shape {self.shape}, not a single element; pass "
                    f"gradient= of that shape (or reduce it first, e.g. loss.sum().backward())")
            seed = self.xp.ones(self.shape, dtype=self.dtype)
        else:
            seed = gradient.numpy() if isinstance(gradient, Tensor) else self.xp.asarray(gradient, dtype=self.dtype)
            if seed.shape != self.shape:
                raise GradError(f"backward: gradient has shape {seed.shape} but the output has shape {self.shape}")
        run_backward(self, kind.broadcast(d, seed))

    # ---------------------------------------------------------------------------- arithmetic
    def __add__(self, o):
        return apply("add", *_pair(self, o))

    def __radd__(self, o):
        return apply("add", *_pair(self, o)[::-1])

    def __sub__(self, o):
        return apply("sub", *_pair(self, o))

    def __rsub__(self, o):
        return apply("sub", *_pair(self, o)[::-1])

    def __mul__(self, o):
        return apply("mul", *_pair(self, o))

    def __rmul__(self, o):
        return apply("mul", *_pair(self, o)[::-1])

    def __truediv__(self, o):
        return apply("div", *_float_pair(*_pair(self, o)))

    def __rtruediv__(self, o):
        return apply("div", *_float_pair(*_pair(self, o)[::-1]))

    def __pow__(self, o):
        return apply("pow", *_pair(self, o))

    def __rpow__(self, o):
        return apply("pow", *_pair(self, o)[::-1])

    def __neg__(self):
        return apply("neg", self)

    def __matmul__(self, o):
        return apply("matmul", *_pair(self, o))

    def __rmatmul__(self, o):
        return apply("matmul", *_pair(self, o)[::-1])

    def __eq__(self, o):  # type: ignore[override]
        return apply("eq", *_pair(self, o))

    def __ne__(self, o):  # type: ignore[override]
        return apply("ne", *_pair(self, o))

    def __lt__(self, o):
        return apply("lt", *_pair(self, o))

    def __le__(self, o):
        return apply("le", *_pair(self, o))

    def __gt__(self, o):
        return apply("gt", *_pair(self, o))

    def __ge__(self, o):
        return apply("ge", *_pair(self, o))

    def __invert__(self):
        return apply("bitwise_invert", self)

    def __abs__(self):
        return apply("abs", self)

    def __pos__(self):
        return apply("positive", self)

    def __floordiv__(self, o):
        return apply("floor_divide", *_pair(self, o))

    def __rfloordiv__(self, o):
        return apply("floor_divide", *_pair(self, o)[::-1])

    def __mod__(self, o):
        return apply("remainder", *_pair(self, o))

    def __rmod__(self, o):
        return apply("remainder", *_pair(self, o)[::-1])

    def __and__(self, o):
        return apply("bitwise_and", *_pair(self, o))

    def __rand__(self, o):
        return apply("bitwise_and", *_pair(self, o)[::-1])

    def __or__(self, o):
        return apply("bitwise_or", *_pair(self, o))

    def __ror__(self, o):
        return apply("bitwise_or", *_pair(self, o)[::-1])

    def __xor__(self, o):
        return apply("bitwise_xor", *_pair(self, o))

    def __rxor__(self, o):
        return apply("bitwise_xor", *_pair(self, o)[::-1])

    def __lshift__(self, o):
        return apply("bitwise_left_shift", *_pair(self, o))

    def __rlshift__(self, o):
        return apply("bitwise_left_shift", *_pair(self, o)[::-1])

    def __rshift__(self, o):
        return apply("bitwise_right_shift", *_pair(self, o))

    def __rrshift__(self, o):
        return apply("bitwise_right_shift", *_pair(self, o)[::-1])

    def __getitem__(self, index):
        return apply("getitem", self, index=_normalize_index(index))

    # ------------------------------------------------------------------------- NumPy methods
    def exp(self):
        return apply("exp", self)

    def log(self):
        return apply("log", self)

    def sqrt(self):
        return apply("sqrt", self)

    def tanh(self):
        return apply("tanh", self)

    def relu(self):
        return apply("relu", self)

    def abs(self):
        return apply("abs", self)  # d|x|/dx is sign(x): 0 at 0, as in PyTorch

    def sum(self, axis=None, keepdims: bool = False):
        return apply("sum", self, axis=_axis_attr(axis), keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        # sum / n, with n from the (logical) shape: exact under any split of the reduced axes, and
        # NumPy's rounding (a division, not a multiplication by 1/n).
        x = self if is_floating(self.dtype) or self.dtype.kind == "c" else self.astype(DEFAULT_FLOAT)
        n = math.prod(self.shape[a] for a in normalize_axes("mean", _axis_attr(axis), self.shape))
        return x.sum(axis, keepdims) / n if n else x.sum(axis, keepdims) * math.nan

    def var(self, axis=None, keepdims: bool = False, ddof: float = 0):
        """The variance with ``ddof`` degrees of freedom removed (the standard's ``correction``)."""
        if not is_floating(self.dtype):
            raise DTypeError(f"var: takes a real floating-point tensor, got {self.dtype}; cast with .astype(fs.float32)")
        centred = self - self.mean(axis, keepdims=True)
        n = math.prod(self.shape[a] for a in normalize_axes("var", _axis_attr(axis), self.shape))
        return (centred * centred).sum(axis, keepdims) * (1.0 / (n - ddof) if n - ddof > 0 else math.nan)

    def max(self, axis=None, keepdims: bool = False):
        return apply("max", self, axis=_axis_attr(axis), keepdims=keepdims)

    def min(self, axis=None, keepdims: bool = False):
        return apply("min", self, axis=_axis_attr(axis), keepdims=keepdims)

    def argmax(self, axis=None, keepdims: bool = False):
        return apply("argmax", self, axis=None if axis is None else normalize_axis("argmax", axis, self.shape),
                     keepdims=keepdims)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return apply("reshape", self, shape=tuple(int(d) for d in shape))

    view = reshape

    def flatten(self):
        return self.reshape(-1)

    def transpose(self, *axes):
        axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return apply("transpose", self, axes=tuple(axes) if axes else None)

    def swapaxes(self, a: int, b: int):
        perm = list(range(self.ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return self.transpose(perm)

    def expand_dims(self, axis: int):
        axis = normalize_axis("expand_dims", axis, self.ndim + 1)
        return self.reshape(self.shape[:axis] + (1,) + self.shape[axis:])

    def squeeze(self, axis=None):
        if axis is None:
            return self.reshape(tuple(d for d in self.shape if d != 1))
        if self.ndim == 0:
            raise ShapeError(f"squeeze: a 0-d tensor has no axis {axis}")
        axis = normalize_axis("squeeze", axis, self.shape)
        if self.shape[axis] != 1:
            raise ShapeError(f"squeeze: axis {axis} of shape {self.shape} has size {self.shape[axis]}, not 1")
        return self.reshape(self.shape[:axis] + self.shape[axis + 1:])

    def astype(self, dtype, copy: bool = False):
        """This tensor as ``dtype`` (itself when the type is right, unless ``copy``)."""
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return apply("astype", self, dtype=dtype, copy=True) if copy else self
        return apply("astype", self, dtype=dtype)

    float = lambda self: self.astype(float32)  # noqa: E731
    double = lambda self: self.astype(float64)  # noqa: E731
    half = lambda self: self.astype(float16)  # noqa: E731
    bfloat16 = lambda self: self.astype(bfloat16)  # noqa: E731
    long = lambda self: self.astype(int64)  # noqa: E731

    def to(self, device: str) -> Tensor:
        """The same value on ``device`` ('cpu' or 'cuda'); a leaf stays a leaf."""
        if device == self.device:
            return self
        d = self._data
        return Tensor(_kind(d).to_device(d, device), self.requires_grad)

    # in-place helpers used by optimizers and init (no autograd)
    def copy_(self, src) -> Tensor:
        """Overwrite the value in place (a global tensor takes the logical value of ``src``)."""
        d = self._data
        kind = _kind(d)
        if isinstance(src, Tensor):
            s = src._data
            src = _kind(s).logical(s)
        else:
            src = kind.xp(d).asarray(src, dtype=d.dtype)
        kind.copy_(d, src)
        return self

    def zero_(self) -> Tensor:
        d = self._data
        _kind(d).zero_(d)
        return self


    # ------------------------------------------------------------------------------- Array API
    @property
    def mT(self) -> Tensor:
        """The matrix transpose: the last two axes swapped."""
        if self.ndim < 2:
            raise ShapeError(f"mT: takes a stack of matrices (2 or more dimensions), got shape {self.shape}")
        return self.swapaxes(-1, -2)

    def __array_namespace__(self, *, api_version: str | None = None):
        """The module whose functions take this tensor: ``flowsys`` (the Array API standard)."""
        if api_version not in (None, "2021.12", "2022.12", "2023.12", "2024.12"):
            raise ValueError(f"flowsys implements the Array API standard 2024.12 (and earlier); got {api_version!r}")
        return _flowsys

    def to_device(self, device, /, *, stream=None) -> Tensor:
        return self.to(device)

    def __complex__(self) -> complex:
        return complex(self.item())

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """Hand the value to another library without a copy (a global tensor's logical value)."""
        kw = {k: v for k, v in (("stream", stream), ("max_version", max_version), ("dl_device", dl_device),
                                ("copy", copy)) if v is not None}
        return self._dlpack_source().__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._dlpack_source().__dlpack_device__()

    def _dlpack_source(self):
        value = self.numpy()  # a traced tensor has no value to share: a clear GraphError
        return value if self.is_global or self.device == "cpu" else stored(self)

    def __setitem__(self, index, value) -> None:
        """Write ``value`` into this tensor at ``index`` (NumPy's rules), outside autograd: a
        tensor that requires grad, or was computed by a recorded op, is not written in place."""
        if self.requires_grad or self._node is not None:
            raise GradError(f"__setitem__: this tensor (shape {self.shape}) is part of autograd (requires_grad or "
                            f"computed from one that does); write into x.detach() or under a copy instead")
        current = self.numpy()  # a traced tensor raises a GraphError here
        value = value.numpy() if isinstance(value, Tensor) else value
        index = _normalize_index(index)
        if self.is_global:
            current = current.copy()
            current[index] = value
            self.copy_(current)
        else:
            self._data[index] = self.xp.asarray(value) if self.device != "cpu" else value


# ------------------------------------------------------------------------------------ apply


def stored(t: Tensor):
    """``t``'s data as it is here, without pulling a parameter's newer values from the workers
    (for code that needs only its layout, or swaps it: tracing, compiling, lowering)."""
    return _SLOT.__get__(t)


def store(t: Tensor, value) -> None:
    """Set ``t``'s data without touching where a parameter's values live (tracing swaps a
    parameter for a symbol and back)."""
    _SLOT.__set__(t, value)


_SLOT = Tensor.__dict__["_data"]


def apply(name: str, *inputs: Tensor, **attrs) -> Any:
    """Run registered op ``name`` on tensors: validate, have the inputs' kind of highest priority
    run it (traced over global over eager), record for autograd as that kind says."""
    op = OPS[name]
    if getattr(_precision._local, "stack", None):  # under fs.autocast (or a traced precision policy)
        inputs = _precision.cast_inputs(name, inputs)
    datas = [t._data for t in inputs]
    out_spec = op.infer(*[Spec(d.shape, d.dtype) for d in datas], **attrs)
    kind = _ruling(datas)
    outs = [Tensor(v) for v in kind.run(op, datas, attrs, out_spec)]
    kind.record(op, inputs, attrs, outs)
    return tuple(outs) if op.multi_output else outs[0]


class _ArrayKind(ValueKind):
    """An eager array (NumPy, or CuPy on a GPU), kept raw in ``_data``: the default kind."""

    def device(self, v) -> str:
        return _device.device_of(v)

    def xp(self, v):
        return _device.module_of(v)

    def logical(self, v):
        return v

    def run(self, op: OpDef, datas, attrs: dict, out_spec) -> tuple:
        xp = _device.module_of(datas[0]) if datas else np
        out = op.kernel(xp, *datas, **attrs)
        if op.multi_output:
            return tuple(xp.asarray(o) for o in out)
        out = xp.asarray(out)
        return (out if out.dtype == out_spec.dtype else out.astype(out_spec.dtype),)  # the inferred dtype (numpy scalars)

    def to_global(self, v, placement: Placement | None, sbp):
        """A local value is the logical value: distributed (``sbp`` defaults to broadcast)."""
        if placement is None:
            raise PlacementError(f"to_global: a local tensor of shape {v.shape} needs a placement, "
                                 f"e.g. x.to_global(fs.placement('cpu', [0, 1]), fs.sbp.split(0))")
        return make_global(v, placement, _B if sbp is None else sbp)

    def layout_grad(self, v, g):
        """A local input's gradient is the logical value."""
        k = _kind(g)
        return g if k is self else _device.to_numpy(k.logical(g))

    def accumulate(self, v, acc, g, owned: bool):
        k = _kind(g)
        if k is not self:  # a local tensor used beside global ones gets the logical gradient
            g = k.logical(g)
        if g.dtype != v.dtype:
            g = g.astype(v.dtype)
        if acc is None:
            # A copy unless this backward pass owns the array: gradient rules pass arrays through
            # (add hands the same one to both inputs, the caller's seed may be it), and later
            # accumulation adds in place. Gradients are kept C-contiguous, as optimizers expect.
            return g if owned and g.flags.c_contiguous else g.copy()
        acc += g
        return acc

    def add(self, a, a_owned: bool, b, b_owned: bool) -> tuple[Any, bool]:
        """In place into whichever of the two this pass owns."""
        for acc, other, own in ((a, b, a_owned), (b, a, b_owned)):
            if own and acc.shape == other.shape and acc.dtype == promote_types(acc.dtype, other.dtype):
                acc += other
                return acc, True
        return a + b, type(a) is np.ndarray


_EAGER = _ArrayKind()


def _kind(value) -> ValueKind:
    """The kind of a tensor value (a type not registered with ``flowsys.value`` is an array)."""
    return KINDS.get(type(value), _EAGER)


def _ruling(values) -> ValueKind:
    """The kind of highest priority among ``values``: the one that runs an op on them."""
    kind = _EAGER
    for v in values:
        k = KINDS.get(type(v), _EAGER)
        if k.priority > kind.priority:
            kind = k
    return kind


class _Builder:
    """What gradient rules call: ``b.mul(g, y)`` applies registered op ``mul`` to tensors."""

    __slots__ = ("needs",)

    def __init__(self, needs: tuple[bool, ...]):
        self.needs = needs

    def __getattr__(self, name: str):
        if name not in OPS:
            raise AttributeError(name)

        def call(*args, **attrs):
            like = next(a for a in args if isinstance(a, Tensor))
            return apply(name, *(a if isinstance(a, Tensor) else _operand(a, like) for a in args), **attrs)

        return call


def _topo_nodes(root: Tensor) -> list[Node]:
    order, seen = [], set()
    stack = [(root._node, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for t in node.inputs:
            if t._node is not None and id(t._node) not in seen:
                stack.append((t._node, False))
    return order  # post-order: producers before consumers


def run_backward(root: Tensor, seed) -> None:
    """Reverse mode over the tape from ``root``, seeded with the value ``seed``."""
    if root._node is None:  # a leaf: its gradient is the seed itself
        _accumulate_leaf(root, seed)
        return
    pending = {(id(root._node), root._index): (Tensor(seed), False)}
    with no_grad(), _precision.suspended():  # backward runs in the dtypes forward chose
        walk(_topo_nodes(root), pending, _TAPE, _Builder)


class _Tape(Engine):
    """The eager tape's side of :func:`~flowsys.autodiff.walk`. A pending gradient is kept with
    whether this pass owns its array outright (a fresh kernel output handed to one consumer): an
    owned array becomes a leaf's ``.grad`` without a copy and takes further contributions in
    place, as PyTorch's engine steals a gradient buffer nothing else references."""

    def outputs(self, node: Node) -> list:
        return [(id(node), i) for i in range(len(node.out_data))]

    def applied(self, node: Node):
        return node.op, node.inputs, [Tensor(o) for o in node.out_data], node.attrs

    def owned(self, node: Node, pending, in_grads) -> list[bool]:
        """NumPy arrays that own their memory, are not forward data of the node, appear once
        among the node's input gradients, and are either new or an owned incoming gradient
        passed through (as ``add`` does)."""
        forward = {id(t._data) for t in node.inputs} | {id(o) for o in node.out_data}
        incoming = {id(p[0]._data): p[1] for p in pending if p is not None}
        arrays = [g._data if g is not None else None for g in in_grads]
        return [type(a) is np.ndarray and a.flags.owndata and a.flags.writeable and id(a) not in forward
                and incoming.get(id(a), True) and sum(x is a for x in arrays) == 1 for a in arrays]

    def accumulate(self, pending: dict, t: Tensor, g: Tensor, owned: bool) -> None:
        if t._node is None:
            _accumulate_leaf(t, g._data, owned)
            return
        key = (id(t._node), t._index)
        prev = pending.get(key)
        pending[key] = (g, owned) if prev is None else _add(prev, g._data, owned)


_TAPE = _Tape()


def _add(prev: tuple[Tensor, bool], b, b_owned: bool) -> tuple[Tensor, bool]:
    """Sum two gradient contributions as the kind of higher priority does."""
    a, a_owned = prev[0]._data, prev[1]
    total, owned = _ruling((a, b)).add(a, a_owned, b, b_owned)
    return Tensor(total), owned


def _accumulate_leaf(t: Tensor, g, owned: bool = False) -> None:
    d = t._data
    if t.grad is None:
        t.grad = Tensor(_kind(d).accumulate(d, None, g, owned))
    else:
        _kind(d).accumulate(d, t.grad._data, g, owned)


def _to_global_grad(b, g, out, x):
    """The gradient of a layout change is the incoming gradient converted back to the input's
    layout (as PyTorch's DTensor redistribute; the input's kind says how)."""
    d = x._data
    return [Tensor(_kind(d).layout_grad(d, g._data))]


_TO_GLOBAL = OpDef("to_global", kernel=None, infer=None, sbp=None, grad=_to_global_grad)


# ------------------------------------------------------------------------ operand conversion


def _operand(value, like: Tensor) -> Tensor:
    """Python scalars take the tensor's dtype (a float with an integer tensor gives float32), as
    in NumPy 2 and PyTorch, so float32 math stays float32."""
    if isinstance(value, Tensor):
        return value
    xp = like.xp
    if isinstance(value, (bool, np.bool_)):
        return Tensor(xp.asarray(value, dtype=bool_))
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return Tensor(xp.asarray(value, dtype=like.dtype if like.dtype != bool_ else int64))
    if isinstance(value, (float, np.floating)):
        return Tensor(xp.asarray(value, dtype=like.dtype if is_floating(like.dtype) or like.dtype.kind == "c"
                                 else DEFAULT_FLOAT))
    if isinstance(value, (complex, np.complexfloating)):
        dtype = like.dtype if like.dtype.kind == "c" else np.dtype(np.complex128 if like.dtype == float64 else np.complex64)
        return Tensor(xp.asarray(value, dtype=dtype))
    arr = xp.asarray(value)
    if arr.dtype == float64 and not isinstance(value, np.ndarray):
        arr = arr.astype(DEFAULT_FLOAT)
    return Tensor(arr)


def _pair(t: Tensor, value) -> tuple[Tensor, Tensor]:
    """``t`` and ``value`` as operands of a binary op; a Python float with an integer or bool
    tensor makes the tensor float32 first (PyTorch's rule: the result is float32, not float64)."""
    if isinstance(value, (float, np.floating)) and t.dtype.kind in "biu":
        t = t.astype(DEFAULT_FLOAT)
    elif isinstance(value, (complex, np.complexfloating)) and t.dtype.kind in "biu":
        t = t.astype(np.complex64)
    return t, _operand(value, t)


def _float_pair(x: Tensor, y: Tensor):
    if x.dtype.kind in "biu" and y.dtype.kind in "biu":  # true division of integers gives floats
        return x.astype(DEFAULT_FLOAT), y.astype(DEFAULT_FLOAT)
    return x, y


def _axis_attr(axis):
    return tuple(axis) if isinstance(axis, list) else axis


def _normalize_index(index):
    """Tensors and lists inside an index become NumPy arrays (constants of the op). A traced
    tensor cannot be one: a boolean mask's result has as many elements as the mask has true
    values, which a graph does not know when it is traced."""
    items = index if isinstance(index, tuple) else (index,)
    out = []
    for i in items:
        if isinstance(i, Tensor):
            try:
                i = i.numpy()
            except GraphError:
                raise GraphError(
                    "indexing with a tensor computed inside Graph.build(): with a boolean mask the output's shape "
                    "depends on the mask's values (as under jax.jit); use fs.where(mask, x, 0) for a fixed shape, "
                    "or fs.take / fs.take_along_axis for integer indices") from None
        elif isinstance(i, list):
            i = np.asarray(i)
        elif isinstance(i, np.integer):
            i = int(i)
        out.append(i)
    return tuple(out) if isinstance(index, tuple) else out[0]

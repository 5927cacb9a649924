"""``Module`` and ``Parameter``: torch-style containers whose state dicts load PyTorch's.

>>> from flowsys import nn
>>> m = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
>>> [k for k in m.state_dict()]
['0.weight', '0.bias', '2.weight', '2.bias']
"""

from __future__ import annotations

import fnmatch
import weakref
from collections import OrderedDict
from typing import Any, Iterator, NamedTuple

import numpy as np

from flowsys.errors import StateDictError
from flowsys.graph.trace import Symbol
from flowsys.rng import Initial
from flowsys.tensor import Tensor


_STORED = Tensor.__dict__["_data"]  # the slot behind Parameter._data (flowsys.tensor.stored)


class Parameter(Tensor):
    """A tensor that is a module's learnable state (requires grad by default).

    Once a compiled graph has run on a backend, the parameter's current values live in the
    workers (laid out by its SBP); the driver's copy is stale until something reads it
    (``numpy()``, ``state_dict()``, an eager op, ``fs.checkpoint.save``), which pulls the values
    from the workers on demand. Its shape, dtype and layout never need a pull."""

    __slots__ = ("state_shape", "init", "_home", "_unmade", "tied_to", "valid_rows")
    is_parameter = True

    def __init__(self, data, requires_grad: bool = True, state_shape: tuple[int, ...] | None = None):
        # The parameter this one is a copy of, tied by value (a pipeline's tied embedding on the
        # last stage, :meth:`Module.set_stage` with ``copy_tied``): one state in checkpoints,
        # one gradient (the two copies' summed once per step), the same updates. None otherwise.
        self.tied_to = None
        # the rows that are state when the rest of axis 0 is padding (a vocabulary padded for
        # tensor parallelism): checkpoints then move between paddings
        self.valid_rows = None
        self._home = None  # the backend whose workers hold newer values than this copy
        self._unmade = False  # built under nn.meta_init(): the local array holds no values yet, ``init`` says them
        array = data._data if isinstance(data, Tensor) else np.asarray(data, dtype=np.float32)
        super().__init__(array, requires_grad)
        # The shape this parameter has in state dicts, when the module stores it in another
        # shape of the same size (e.g. a fused projection kept as (3, C, C) for (3C, C)).
        self.state_shape = tuple(state_shape) if state_shape is not None else None
        # How the initial value was made (an ``rng.InitSpec``, set by ``nn.init``), so a worker can
        # create its own shard; None once a value is put in another way (``copy_``).
        self.init = None

    @property
    def _data(self):
        """The values, pulled from the workers first when they hold newer ones (not while a
        graph is traced: then the parameter stands for a symbol)."""
        d = _STORED.__get__(self)
        if self._home is not None and type(d) is not Symbol:
            self._home.pull(self)
            d = _STORED.__get__(self)
        elif self._unmade and type(d) is np.ndarray:  # built without values: made when first needed
            from flowsys.rng import materialize  # noqa: PLC0415

            d[...] = materialize(self.init, d.shape, d.dtype)
            self._unmade = False
        return d

    @_data.setter
    def _data(self, value) -> None:
        """New values (or a new layout) set here: what the workers held is superseded."""
        if self._home is not None:
            self._home.forget(self)
        self._unmade = False
        _STORED.__set__(self, value)

    # what needs no values never pulls
    shape = property(lambda self: _STORED.__get__(self).shape)
    dtype = property(lambda self: _STORED.__get__(self).dtype)
    ndim = property(lambda self: _STORED.__get__(self).ndim)
    size = property(lambda self: _STORED.__get__(self).size)
    is_global = property(lambda self: _global_value(_STORED.__get__(self)) or Tensor.is_global.fget(self))
    placement = property(lambda self: _STORED.__get__(self).placement if _global_value(_STORED.__get__(self))
                         else Tensor.placement.fget(self))
    sbp = property(lambda self: Tensor.sbp.fget(self) if _global_value(_STORED.__get__(self)) else None)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()

    def copy_(self, src) -> Parameter:
        """Overwrite the value in place; it is no longer what ``init`` describes, and what the
        workers held of it is superseded (nothing is pulled to be overwritten)."""
        if self._home is not None:
            self._home.forget(self)
        super().copy_(src)
        self.init = None
        return self


def _global_value(d) -> bool:
    from flowsys.global_tensor import GlobalValue  # noqa: PLC0415

    return type(d) is GlobalValue


def _plan_sbp(plan: dict, name: str, default):
    """The SBP of the first pattern matching ``name`` (a leading ``*.`` also matches nothing,
    so ``*.mlp.c_fc.weight`` names the block's own ``mlp.c_fc.weight`` too)."""
    for pattern, value in plan.items():
        if fnmatch.fnmatchcase(name, pattern) or (pattern.startswith("*.") and fnmatch.fnmatchcase(name, pattern[2:])):
            return value
    return default


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.numpy()
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


class Module:
    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_input_sbp", None)
        # graph mode: recompute this module's forward activations in the backward pass
        object.__setattr__(self, "activation_checkpointing", False)
        object.__setattr__(self, "_stage", None)  # (stage, placement) from set_stage

    # ------------------------------------------------------------------------ registration
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}: call super().__init__() before assigning {name!r}")
        if name in self._buffers and not isinstance(value, Parameter) and (value is None or isinstance(value, Tensor)):
            self._buffers[name] = value  # assigning to a buffer updates it (e.g. running statistics), as torch
            return
        for table in (self._parameters, self._buffers, self._modules):
            table.pop(name, None)
        if isinstance(value, Parameter):
            self.__dict__.pop(name, None)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self.__dict__.pop(name, None)
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        for table in ("_parameters", "_buffers", "_modules"):
            if table in d and name in d[table]:
                return d[table][name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __delattr__(self, name: str) -> None:
        for table in (self._parameters, self._buffers, self._modules):
            if name in table:
                del table[name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """Non-learnable state (e.g. running statistics) that moves and saves with the module."""
        self.__dict__.pop(name, None)
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent.discard(name)
        else:
            self._non_persistent.add(name)

    def add_module(self, name: str, module: Module | None) -> None:
        self._modules[name] = module

    # --------------------------------------------------------------------------- traversal
    def named_modules(self, prefix: str = "", memo: set | None = None,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, Module]]:
        """Submodules by dotted name; a shared one appears once unless ``remove_duplicate=False``."""
        memo = set() if memo is None else memo
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(f"{prefix}.{name}" if prefix else name, memo, remove_duplicate)

    def modules(self) -> Iterator[Module]:
        return (m for _, m in self.named_modules())

    def named_children(self) -> Iterator[tuple[str, Module]]:
        return ((n, m) for n, m in self._modules.items() if m is not None)

    def children(self) -> Iterator[Module]:
        return (m for _, m in self.named_children())

    def named_parameters(self, prefix: str = "", remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        """Parameters by dotted name; a tied parameter appears once, under its first name."""
        seen: set[int] = set()
        for mod_name, m in self.named_modules(prefix):
            for name, p in m._parameters.items():
                if p is None or (remove_duplicate and id(p) in seen):
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> Iterator[Parameter]:
        return (p for _, p in self.named_parameters())

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]:
        for mod_name, m in self.named_modules():
            for name, b in m._buffers.items():
                if b is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), b

    def num_parameters(self) -> int:
        """Elements of the model's parameters, a tied copy (a pipeline's last stage's embedding)
        counted once."""
        return sum(p.size for p in self.parameters() if getattr(p, "tied_to", None) is None)

    # ------------------------------------------------------------------------- state dict
    def _state_items(self) -> Iterator[tuple[str, Tensor]]:
        for mod_name, m in self.named_modules(remove_duplicate=False):  # a shared module under each name, as torch
            pre = f"{mod_name}." if mod_name else ""
            for name, p in m._parameters.items():
                if p is not None:
                    yield pre + name, p
            for name, b in m._buffers.items():
                if b is not None and name not in m._non_persistent:
                    yield pre + name, b

    def state_dict(self) -> OrderedDict[str, Tensor]:
        """Name -> tensor (sharing memory for local tensors), PyTorch's names and shapes; tied
        weights appear under each name. Parameters whose newest values live in the workers (a
        compiled step ran) are pulled from them first (all at once)."""
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name, t in self._state_items():
            shape = getattr(t, "state_shape", None)
            out[name] = t.detach().reshape(shape) if shape else t.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True) -> IncompatibleKeys:
        """Copy values (flowsys, NumPy or PyTorch tensors) into this module's state.

        With ``strict``, missing, unexpected and wrongly shaped keys are all reported in one
        :class:`StateDictError` and nothing is changed.
        """
        targets = dict(self._state_items())
        # the shapes state dicts have (no values needed: nothing is pulled from the workers)
        own = {k: tuple(getattr(t, "state_shape", None) or t.shape) for k, t in targets.items()}
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        arrays, mismatched = {}, []
        for k, shape in own.items():
            if k in state_dict:
                a = _to_numpy(state_dict[k])
                if tuple(a.shape) != shape:
                    mismatched.append(f"{k}: checkpoint {tuple(a.shape)} vs model {shape}")
                else:
                    arrays[k] = a
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            problems.append("wrong shapes: " + "; ".join(mismatched))
        if problems:
            raise StateDictError(
                f"load_state_dict into {type(self).__name__}: " + " | ".join(problems)
                + " (check the model config matches the checkpoint, or pass strict=False to skip missing/unexpected keys)")
        for k, a in arrays.items():
            t = targets[k]
            t.copy_(a.astype(t.dtype, copy=False).reshape(t.shape))
        return IncompatibleKeys(missing, unexpected)

    # --------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def apply(self, fn) -> Module:
        for m in list(self.modules())[::-1]:
            fn(m)
        return self

    def to(self, device: str) -> Module:
        """Move parameters and buffers to ``device`` in place (tied parameters stay tied)."""
        from flowsys.device import array_module, to_numpy  # noqa: PLC0415

        xp = array_module(device)
        moved: dict[int, Any] = {}
        for m in self.modules():
            for table in (m._parameters, m._buffers):
                for t in table.values():
                    if t is not None and id(t) not in moved:
                        moved[id(t)] = t._data = xp.asarray(to_numpy(t._data)) if device != "cpu" else to_numpy(t._data)
        return self

    def to_global(self, placement, sbp=None) -> Module:
        """Make every parameter and buffer a global tensor on ``placement``, in place.

        ``sbp`` is one SBP (or N-D tuple) for all of them, or a plan: a dict from name patterns
        (``fnmatch``-style, matched against ``named_parameters()`` names; a leading ``*.`` also
        matches at the top level) to SBPs; the first matching pattern wins and unmatched
        tensors are broadcast. Megatron-style tensor
        parallelism on a GPT, for example::

            model.to_global(P, {"*.c_attn.*": S(0), "*.mlp.c_fc.*": S(0),
                                "*.c_proj.weight": S(1)})

        A pattern that names a module (not a parameter) constrains the layout of that module's
        global tensor inputs: they are converted to the given SBP before its ``forward`` (a
        user constraint that signature choice then works from), and their gradients are
        converted back in the backward pass. Megatron's all-reduce before each layer norm is
        ``{"*.ln_1": B, "*.ln_2": B, ...}``; :meth:`GPT.parallel_plan` writes such plans.

        Tied parameters stay tied; gradients are dropped (they had the old layout).
        """
        from flowsys.global_tensor import GlobalValue  # noqa: PLC0415
        from flowsys.layout import normalize_sbp  # noqa: PLC0415
        from flowsys.nn.init import is_meta  # noqa: PLC0415
        from flowsys.sbp import broadcast  # noqa: PLC0415

        plan = sbp if isinstance(sbp, dict) else None
        done: set[int] = set()
        for m_name, m in self.named_modules(remove_duplicate=False):
            if plan is not None and m_name:
                want = _plan_sbp(plan, m_name, None)
                if want is not None:
                    nd = tuple(want) if isinstance(want, (tuple, list)) else (want,) * placement.ndim
                    object.__setattr__(m, "_input_sbp", nd)
            for table in (m._parameters, m._buffers):
                for name, t in table.items():
                    if t is None or id(t) in done:
                        continue
                    done.add(id(t))
                    full = f"{m_name}.{name}" if m_name else name
                    want = _plan_sbp(plan, full, broadcast) if plan is not None else (broadcast if sbp is None else sbp)
                    if (is_meta() or getattr(t, "_unmade", False)) and getattr(t, "init", None) is not None:
                        # layout only: a shard is made from t.init where (and when) it is needed
                        t._data = GlobalValue(placement, normalize_sbp(want, placement, t.shape), t.shape, t.dtype,
                                              None, Initial(t.init, tuple(t.shape), np.dtype(t.dtype)))
                    else:
                        t._data = t.detach().to_global(placement, want)._data
                    t.grad = None
        return self

    # ---------------------------------------------------------------------------------- call
    def forward(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} defines no forward()")

    def set_stage(self, stage: int, placement, copy_tied: bool = False) -> Module:
        """Put this module on pipeline stage ``stage``, run on ``placement``: its parameters move
        there (keeping their SBP when the meshes have the same shape, else broadcast; a parameter
        an earlier stage already holds, such as a tied embedding, stays there and is moved to this
        stage where this module uses it: its accumulated gradient moves back once per step), and
        its tensor inputs are moved there when it is called. In graph mode the moves are
        send/receive nodes between the stages' devices, and the micro-batches
        (``gradient_accumulation_steps``) flow through the stages as a pipeline.

        With ``copy_tied``, a parameter another stage holds gets a copy on this stage instead,
        tied to it by value (Megatron-LM's tied embedding): made equal (from the same
        initialiser, or the same values), its local gradient accumulated over the micro-batches,
        the two gradients summed once per step (graph mode: an optimizer-phase exchange between
        the two stages) and both updated alike. Checkpoints hold it once (under the first name)
        and load it into both; ``state_dict`` lists it under each name, as a tied weight.

        >>> import flowsys as fs
        >>> layer = fs.nn.Linear(4, 4).set_stage(1, fs.placement("cpu", [1]))
        >>> layer.weight.placement.ranks, layer(fs.ones(2, 4)).placement.ranks
        ((1,), (1,))
        """
        from flowsys.errors import ConfigError  # noqa: PLC0415
        from flowsys.placement import Placement  # noqa: PLC0415

        if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
            raise ConfigError(f"{type(self).__name__}.set_stage: stage must be an int >= 0, got {stage!r}")
        if not isinstance(placement, Placement):
            raise ConfigError(f"{type(self).__name__}.set_stage: placement must be fs.placement(...), got {placement!r}")
        for m in self.modules():
            for table in (m._parameters, m._buffers):
                for name, t in list(table.items()):
                    if t is None:
                        continue
                    held = _STAGE_OF.get(id(t))
                    if held is not None and held != stage:
                        if copy_tied and isinstance(t, Parameter):  # a copy of its own here, tied by value
                            table[name] = _tied_copy(t, placement)
                            _hold(table[name], stage)
                        continue  # else another stage holds it (a tied parameter): moved where used
                    if held is None:
                        _hold(t, stage)
                    t._data = _moved_data(t, placement)
                    t.grad = None
        object.__setattr__(self, "_stage", (stage, placement))
        return self

    def __call__(self, *args, **kwargs):
        if self._stage is not None:  # a pipeline stage: inputs and borrowed parameters move here
            placement = self._stage[1]
            args = tuple(_moved(a, placement) if isinstance(a, Tensor) else a for a in args)
            borrowed = [(m, name, p) for m in self.modules() for name, p in m._parameters.items()
                        if p is not None and p.is_global and p.placement != placement]
            if borrowed:
                for m, name, p in borrowed:
                    m._parameters[name] = _moved(p, placement)
                try:
                    return self._call(args, kwargs)
                finally:
                    for m, name, p in borrowed:
                        m._parameters[name] = p
        return self._call(args, kwargs)

    def _call(self, args, kwargs):
        if self._input_sbp is not None:  # a layout constraint from a parallel plan
            args = tuple(a.to_global(sbp=self._input_sbp) if isinstance(a, Tensor) and a.is_global else a for a in args)
        if self.activation_checkpointing:
            from flowsys.graph import trace  # noqa: PLC0415

            tracer = trace.active()
            if tracer is not None:
                with tracer.checkpointed():
                    return self.forward(*args, **kwargs)
        return self.forward(*args, **kwargs)

    def stages(self) -> dict[int, Any]:
        """The pipeline stages of this module and its submodules: stage -> placement."""
        out: dict[int, Any] = {}
        for m in self.modules():
            if m._stage is not None:
                stage, placement = m._stage
                if out.setdefault(stage, placement) != placement:
                    from flowsys.errors import ConfigError  # noqa: PLC0415

                    raise ConfigError(f"pipeline stage {stage} is set on two placements, {out[stage]!r} and "
                                      f"{placement!r}; give each stage one placement")
        return out

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): " + repr(m).replace("\n", "\n  ") for name, m in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


_STAGE_OF: dict[int, int] = {}  # parameter id -> the pipeline stage holding it


def _hold(t: Tensor, stage: int) -> None:
    _STAGE_OF[id(t)] = stage
    weakref.finalize(t, _STAGE_OF.pop, id(t), None)


def _tied_copy(p: Parameter, placement) -> Parameter:
    """A copy of ``p`` on ``placement`` tied to it by value: the same initialiser (a worker
    creates equal values from it) or, once ``p`` holds other values, those values."""
    primary = p.tied_to if p.tied_to is not None else p
    copy = Parameter(np.empty(0, dtype=np.float32), requires_grad=p.requires_grad, state_shape=p.state_shape)
    copy._data = _moved_data(p, placement)
    copy.init, copy.tied_to, copy.valid_rows = p.init, primary, p.valid_rows
    return copy


def tied_source(p) -> Parameter | None:
    """The parameter ``p`` is a tied copy of (None when it is none)."""
    return getattr(p, "tied_to", None)


def sum_tied_grads_(parameters) -> None:
    """Eager mode's once-per-step sum of tied copies' gradients: each pair among ``parameters``
    (a copy and its primary) gets the sum of the two local gradients, each in its own layout, so
    that both take the same update. Idempotent until the gradients change."""
    params = list(parameters)
    by_id = {id(p): p for p in params}
    for c in params:
        a = by_id.get(id(tied_source(c)))
        if a is None or (a.grad is None and c.grad is None):
            continue
        done = _SUMMED.get(id(c))
        if done is not None and done[0]() is a.grad and done[1]() is c.grad:
            continue
        ga, gc = a.grad, c.grad
        if ga is None or gc is None:
            ga, gc = (ga if ga is not None else _moved_like(gc, a)), (gc if gc is not None else _moved_like(ga, c))
            total_a, total_c = ga, gc
        else:
            total_a = ga + _moved_like(gc, a)
            total_c = _moved_like(ga, c) + gc
        a.grad, c.grad = total_a.detach(), total_c.detach()
        _SUMMED[id(c)] = (weakref.ref(a.grad), weakref.ref(c.grad))


_SUMMED: dict[int, tuple] = {}  # tied copy id -> weak references to the (primary, copy) gradients already summed


def _moved_like(g: Tensor, p: Tensor) -> Tensor:
    """Gradient ``g`` in parameter ``p``'s layout (a copy: no arithmetic)."""
    if p.is_global:
        return g.to_global(placement=p.placement, sbp=p.sbp).detach()
    return Tensor(np.array(g.numpy())) if g.is_global else g.detach()


def _moved_data(t: Tensor, placement):
    """``t``'s data moved to ``placement`` (layout only for a meta tensor: it has no values)."""
    from flowsys.global_tensor import GlobalValue  # noqa: PLC0415
    from flowsys.layout import normalize_sbp  # noqa: PLC0415
    from flowsys.sbp import broadcast  # noqa: PLC0415

    d = t._data
    if type(d) is GlobalValue and d._shards is None:
        sbp = d.sbp if d.placement.mesh == placement.mesh else broadcast
        return GlobalValue(placement, normalize_sbp(sbp, placement, d.shape), d.shape, d.dtype, None, d.source)
    return _moved(t.detach(), placement)._data


def _moved(t: Tensor, placement) -> Tensor:
    """``t`` on ``placement``: the same SBP when the meshes have the same shape, else broadcast."""
    from flowsys.sbp import broadcast  # noqa: PLC0415

    if not t.is_global:
        return t.to_global(placement, broadcast)
    if t.placement == placement:
        return t
    same = t.placement.mesh == placement.mesh
    return t.to_global(placement=placement, sbp=t.sbp if same else broadcast)

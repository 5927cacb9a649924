"""In-place initialisers, counter-based so that any shard can be made on its own, and
``meta_init()``: build a model with shapes and layouts but no values.

Each random initialiser draws one 64-bit key from flowsys' global generator (so ``fs.manual_seed``
and the order of creation decide everything), records an :class:`~flowsys.rng.InitSpec` on a
parameter (``p.init``) and fills the values from (key, flat logical index): a global tensor's
shards get exactly the slices of the one-device value, and a worker holding only the spec, the
logical shape, the dtype and its layout makes the same shard (``rng.shard_values``).

>>> import numpy as np
>>> import flowsys as fs
>>> from flowsys import nn, rng
>>> fs.manual_seed(0)
>>> w = nn.init.normal_(nn.Parameter(np.zeros((2, 3), np.float32)), 0.0, 0.02)
>>> w.init.kind, w.init.params
('normal', (0.0, 0.02))
>>> bool((w.numpy() == rng.materialize(w.init, (2, 3), "float32")).all())
True
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from flowsys import device as _device
from flowsys import rng
from flowsys.errors import ConfigError
from flowsys.functions import generator
from flowsys.global_tensor import GlobalValue
from flowsys.nn.module import Module, Parameter
from flowsys.tensor import Tensor, stored

_meta = threading.local()


@contextlib.contextmanager
def meta_init():
    """Inside this block initialisers draw no values (they still draw their keys and record
    ``p.init``) and ``Module.to_global`` lays out no shards for parameters that have a spec:
    they have shapes, dtypes, placements and SBPs but no values (``GlobalValue.shards is None``).
    Enough to compile a graph for a model too large to materialise here; :func:`materialize_`
    (or a worker, per shard) makes the values later, equal to an eager build's."""
    _meta.on = getattr(_meta, "on", 0) + 1
    try:
        yield
    finally:
        _meta.on -= 1


def is_meta() -> bool:
    return getattr(_meta, "on", 0) > 0


def _init(t: Tensor, kind: str, params: tuple = ()) -> Tensor:
    key = int(generator().integers(0, 1 << 64, dtype=np.uint64)) if kind in ("normal", "uniform") else 0
    spec = rng.InitSpec(kind, params, key)
    if isinstance(t, Parameter):
        t.init = spec
    if not is_meta():
        fill_(t, spec)
    elif isinstance(t, Parameter) and type(stored(t)) is np.ndarray:
        t._unmade = True  # its values are made from the spec when first needed (or by the workers)
    return t


def normal_(t: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    return _init(t, "normal", (mean, std))


def uniform_(t: Tensor, a: float = 0.0, b: float = 1.0) -> Tensor:
    return _init(t, "uniform", (a, b))


def constant_(t: Tensor, value: float) -> Tensor:
    return _init(t, "constant", (value,))


def zeros_(t: Tensor) -> Tensor:
    return _init(t, "zeros")


def ones_(t: Tensor) -> Tensor:
    return _init(t, "ones")


def fill_(t: Tensor, spec: rng.InitSpec) -> Tensor:
    """Write the values ``spec`` describes into ``t`` in place: a local tensor the whole value,
    each shard of a global one its own block (made by itself: no full tensor is built). A global
    tensor without shards (built under :func:`meta_init`) gets them."""
    d = t._data
    if type(d) is GlobalValue:
        xp = d.xp
        shards = [xp.asarray(v) for v in rng.all_shards(spec, d.shape, d.dtype, d.placement, d.sbp)]
        if d._shards is None:
            d.shards = shards
        else:
            for dst, src in zip(d.shards, shards):
                dst[...] = src
    elif hasattr(d, "__setitem__"):
        d[...] = _device.module_of(d).asarray(rng.materialize(spec, d.shape, d.dtype))
    else:
        raise ConfigError(f"nn.init: cannot initialise a tensor of shape {t.shape} while a graph is traced; "
                          f"initialise parameters before Graph.build")
    return t


def materialize_(module: Module) -> Module:
    """Give every parameter of ``module`` that has an ``init`` spec the values it describes, in
    its current layout, each shard made by itself: for a model built under :func:`meta_init`,
    the values an eager build with the same seed has. Parameters without a spec (values the
    user put in) keep theirs.

    >>> import flowsys as fs
    >>> from flowsys import nn
    >>> fs.manual_seed(1); eager = nn.Linear(3, 2)
    >>> fs.manual_seed(1)
    >>> with nn.meta_init():
    ...     lazy = nn.Linear(3, 2).to_global(fs.placement("cpu", [0, 1]), fs.sbp.split(0))
    >>> bool((materialize_(lazy).weight.numpy() == eager.weight.numpy()).all())
    True
    """
    for name, p in module.named_parameters():
        if p.init is not None:
            fill_(p, p.init)
        elif type(stored(p)) is GlobalValue and stored(p)._shards is None:
            raise ConfigError(f"materialize_: parameter {name} {tuple(p.shape)} has neither values nor an init "
                              f"spec; give it one with nn.init (e.g. nn.init.zeros_) before to_global")
    return module

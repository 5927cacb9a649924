"""In-place initialisers drawing from flowsys' global generator (see ``fs.manual_seed``), and
``meta_init()``: build a model with shapes and layouts but no values, to compile it only.
"""

from __future__ import annotations

import contextlib
import threading

from flowsys.functions import generator
from flowsys.tensor import Tensor

_meta = threading.local()


@contextlib.contextmanager
def meta_init():
    """Inside this block initialisers draw nothing and ``Module.to_global`` lays out no shards:
    parameters have shapes, dtypes, placements and SBPs but no values. Enough to compile a graph
    (``Graph.compile``, ``scheduler.lower``) for a model too large to materialise here."""
    _meta.on = getattr(_meta, "on", 0) + 1
    try:
        yield
    finally:
        _meta.on -= 1


def is_meta() -> bool:
    return getattr(_meta, "on", 0) > 0


def normal_(t: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    if not is_meta():
        t._data[...] = generator().normal(mean, std, size=t.shape)
    return t


def uniform_(t: Tensor, a: float = 0.0, b: float = 1.0) -> Tensor:
    if not is_meta():
        t._data[...] = generator().uniform(a, b, size=t.shape)
    return t


def zeros_(t: Tensor) -> Tensor:
    return t if is_meta() else t.zero_()


def ones_(t: Tensor) -> Tensor:
    if not is_meta():
        t._data[...] = 1
    return t

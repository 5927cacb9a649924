"""In-place initialisers drawing from flowsys' global generator (see ``fs.manual_seed``)."""

from __future__ import annotations

from flowsys.functions import generator
from flowsys.tensor import Tensor


def normal_(t: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    t._data[...] = generator().normal(mean, std, size=t.shape)
    return t


def uniform_(t: Tensor, a: float = 0.0, b: float = 1.0) -> Tensor:
    t._data[...] = generator().uniform(a, b, size=t.shape)
    return t


def zeros_(t: Tensor) -> Tensor:
    return t.zero_()


def ones_(t: Tensor) -> Tensor:
    t._data[...] = 1
    return t

"""Op attributes in a plan: canonical JSON, and the dropout seed slots they may hold.

A graph node's attributes are Python values (tuples, slices, NumPy arrays and dtypes, seeds);
a plan op carries them as one JSON string, so a worker decodes them without pickle and two
equal attribute dicts always encode to the same text.

>>> text = encode_attrs({"axes": (0, 1), "keep": slice(None, 2), "seed": SeedRef(3)})
>>> text
'{"axes":{"tuple":[0,1]},"keep":{"slice":[null,2,null]},"seed":{"seed":3}}'
>>> decode_attrs(text)
{'axes': (0, 1), 'keep': slice(None, 2, None), 'seed': 3}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class SeedRef:
    """A dropout seed drawn afresh on every run (the forward node and its gradient share it):
    the ``index``-th seed of the run, as traced into the graph."""

    index: int


class SeedMarker(int):
    """A :class:`SeedRef` as decoded from a plan: the seed's index, which the executor replaces
    with the run's seed before the kernel sees it."""


def encode_attrs(attrs: dict[str, Any]) -> str:
    """Canonical JSON of op attributes (tuples, slices, ``...``, arrays, dtypes, seeds kept apart)."""
    return json.dumps({k: _encode(v) for k, v in sorted(attrs.items())}, sort_keys=True, separators=(",", ":"))


def decode_attrs(text: str) -> dict[str, Any]:
    """Inverse of :func:`encode_attrs` (a :class:`SeedRef` comes back as a :class:`SeedMarker`)."""
    return {k: _decode(v) for k, v in json.loads(text).items()} if text else {}


def _encode(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, tuple):
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, slice):
        return {"slice": [v.start, v.stop, v.step]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, np.ndarray):
        return {"array": v.tolist(), "dtype": v.dtype.name}
    if isinstance(v, np.dtype):
        return {"dtype": v.name}
    if isinstance(v, SeedRef):
        return {"seed": v.index}
    if isinstance(v, type) and issubclass(v, np.generic):
        return {"dtype": np.dtype(v).name}
    raise TypeError(f"cannot encode attribute value {v!r} of type {type(v).__name__}")


def _decode(v):
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        if "tuple" in v:
            return tuple(_decode(x) for x in v["tuple"])
        if "slice" in v:
            return slice(*v["slice"])
        if "ellipsis" in v:
            return Ellipsis
        if "array" in v:
            return np.array(v["array"], dtype=v["dtype"])
        if "dtype" in v:
            return np.dtype(v["dtype"])
        if "seed" in v:
            return SeedMarker(v["seed"])
    return v

"""Placements: which devices hold a tensor, arranged as a mesh.

``placement("cpu", [0, 1, 2, 3])`` is a 1-D mesh of four ranks; ``placement("cpu", [[0, 1],
[2, 3]])`` a 2x2 mesh whose first axis might carry data parallelism and the second tensor
parallelism. A global tensor has one SBP value per mesh axis.

This module is shared vocabulary: it imports nothing of flowsys beyond ``flowsys.errors``.

>>> p = placement("cpu", [[0, 1], [2, 3]])
>>> p.mesh, p.ranks, p.group(1, along=0)
((2, 2), (0, 1, 2, 3), (1, 3))
"""

from __future__ import annotations

import itertools
from functools import cached_property

import numpy as np

from flowsys.errors import PlacementError

DEVICE_TYPES = ("cpu", "cuda")


class Placement:
    """A device type and a mesh of distinct ranks (frozen, hashable)."""

    __slots__ = ("type", "mesh", "ranks", "__dict__")

    def __init__(self, type: str, ranks):
        if type not in DEVICE_TYPES:
            raise PlacementError(f"placement: device type must be one of {DEVICE_TYPES}, got {type!r}")
        arr = np.array(ranks, dtype=object)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        try:
            grid = np.array(arr.tolist(), dtype=np.int64)
        except (TypeError, ValueError):
            raise PlacementError(f"placement: ranks must be a list or a rectangular nested list of ints, got {ranks!r}") from None
        if grid.size == 0:
            raise PlacementError("placement: needs at least one rank")
        flat = tuple(int(r) for r in grid.reshape(-1))
        if min(flat) < 0 or len(set(flat)) != len(flat):
            raise PlacementError(f"placement: ranks must be distinct non-negative ints, got {ranks!r}")
        self.type = type
        self.mesh = tuple(int(d) for d in grid.shape)
        self.ranks = flat

    @property
    def ndim(self) -> int:
        return len(self.mesh)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @cached_property
    def _index(self) -> dict[int, int]:
        return {r: i for i, r in enumerate(self.ranks)}

    def index(self, rank: int) -> int:
        """Position of ``rank`` in the flat (row-major) mesh order."""
        try:
            return self._index[rank]
        except KeyError:
            raise PlacementError(f"rank {rank} is not in {self!r} (its ranks are {list(self.ranks)})") from None

    def coords(self, rank: int) -> tuple[int, ...]:
        return tuple(int(c) for c in np.unravel_index(self.index(rank), self.mesh))

    def rank_at(self, coords) -> int:
        return self.ranks[int(np.ravel_multi_index(tuple(coords), self.mesh))]

    def group(self, rank: int, along: int) -> tuple[int, ...]:
        """The ranks that differ from ``rank`` only in mesh axis ``along``, in mesh order."""
        c = list(self.coords(rank))
        out = []
        for i in range(self.mesh[along]):
            c[along] = i
            out.append(self.rank_at(c))
        return tuple(out)

    def groups(self, along: int) -> list[tuple[int, ...]]:
        """Every group of ranks along mesh axis ``along`` (the rows a collective runs over)."""
        others = [range(d) if i != along else range(1) for i, d in enumerate(self.mesh)]
        return [self.group(self.rank_at(c), along) for c in itertools.product(*others)]

    def nested(self):
        return np.array(self.ranks).reshape(self.mesh).tolist()

    def __eq__(self, other) -> bool:
        return isinstance(other, Placement) and (self.type, self.mesh, self.ranks) == (other.type, other.mesh, other.ranks)

    def __hash__(self) -> int:
        return hash((self.type, self.mesh, self.ranks))

    def __repr__(self) -> str:
        return f"placement(type={self.type!r}, ranks={self.nested()})"


def placement(type: str = "cpu", ranks=None) -> Placement:
    """``fs.placement("cpu", [0, 1, 2, 3])`` (1-D) or ``fs.placement("cpu", [[0, 1], [2, 3]])`` (2-D)."""
    if ranks is None:
        raise PlacementError("placement: pass ranks, e.g. fs.placement('cpu', [0, 1]) or [[0, 1], [2, 3]]")
    return Placement(type, ranks)

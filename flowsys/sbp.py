"""SBP values: how a logical tensor is laid out over one axis of a device mesh.

``S(i)`` splits tensor axis ``i`` across the mesh axis, ``B`` broadcasts (every rank holds the
whole value) and ``P`` is a partial sum (the logical value is the sum over ranks). ``P(max)`` is
a partial maximum (the logical value is the elementwise maximum over ranks): only ops produce it
(e.g. the max of a vocabulary-split row, for cross entropy), and boxing turns it into ``B`` with
an all-reduce of op max (``all_reduce_max``). These are
tiny frozen values with the print forms used in logs, errors and ``explain()``.

This module is shared vocabulary: it imports nothing else of flowsys.

>>> split(1), broadcast, partial_sum
(S(1), B, P)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Split:
    axis: int

    def __repr__(self) -> str:
        return f"S({self.axis})"


@dataclass(frozen=True, slots=True)
class Broadcast:
    def __repr__(self) -> str:
        return "B"


@dataclass(frozen=True, slots=True)
class PartialSum:
    def __repr__(self) -> str:
        return "P"


@dataclass(frozen=True, slots=True)
class PartialMax:
    def __repr__(self) -> str:
        return "P(max)"


SbpValue = Split | Broadcast | PartialSum | PartialMax

broadcast = Broadcast()
partial_sum = PartialSum()
partial_max = PartialMax()


def split(axis: int) -> Split:
    """``S(axis)``: the logical tensor is cut along ``axis``, one piece per rank."""
    return Split(int(axis))


class SbpTuple(tuple):
    """A global tensor's SBP: one value per mesh axis. On a 1-D mesh it also equals its single
    value, so ``g.sbp == split(0)`` and ``g.sbp == (split(0),)`` both hold."""

    __slots__ = ()

    def __eq__(self, other) -> bool:
        if isinstance(other, (Split, Broadcast, PartialSum, PartialMax)):
            return len(self) == 1 and self[0] == other
        return tuple.__eq__(self, other)

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self[0]) if len(self) == 1 else tuple.__hash__(self)


def parse(text: str) -> SbpValue:
    """Inverse of ``repr``: ``parse("S(0)") == split(0)``."""
    text = text.strip()
    if text == "B":
        return broadcast
    if text == "P":
        return partial_sum
    if text == "P(max)":
        return partial_max
    if text.startswith("S(") and text.endswith(")"):
        return split(int(text[2:-1]))
    raise ValueError(f"not an SBP value: {text!r} (expected S(i), B, P or P(max))")


__all__ = ["Split", "Broadcast", "PartialSum", "PartialMax", "SbpValue", "SbpTuple", "split", "broadcast",
           "partial_sum", "partial_max", "parse"]

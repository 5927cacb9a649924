"""Where each rank's shard sits in a global tensor: the geometry of N-D SBP.

An N-D SBP is applied mesh axis by mesh axis, outermost first: on a 2x2 mesh, ``(S(0), S(0))``
cuts axis 0 in two for mesh row 0/1 and cuts each half in two again for the mesh column.
Splits follow ``np.array_split`` (the first ``n % p`` pieces are one longer), so lengths that
the ranks do not divide are fine. For ``P``, the rank whose coordinate on that mesh axis is 0
holds the value when a logical value is distributed, and the others hold zeros. For ``P(max)``
(a partial maximum) every rank holds the value: the maximum of copies is the value.

Shared vocabulary: imports nothing of flowsys beyond the SBP values, placements and errors.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from flowsys.errors import SbpError
from flowsys.ops.registry import Shard, Spec, is_floating
from flowsys.placement import Placement
from flowsys.sbp import Broadcast, PartialMax, PartialSum, SbpValue, Split

NdSbp = tuple[SbpValue, ...]


def bounds(n: int, parts: int, i: int) -> tuple[int, int]:
    """Start and stop of piece ``i`` of ``n`` items cut into ``parts`` (``np.array_split``)."""
    q, r = divmod(n, parts)
    start = i * q + min(i, r)
    return start, start + q + (1 if i < r else 0)


def normalize_sbp(sbp, placement: Placement, shape: Sequence[int], *, what: str = "to_global") -> NdSbp:
    """An SBP value or tuple as an N-D SBP for ``placement``, checked against ``shape``.

    A single value (not a tuple) applies to every mesh axis; a tuple must have one value per
    mesh axis. Split axes may be negative and must exist in the tensor.
    """
    if isinstance(sbp, (Split, Broadcast, PartialSum, PartialMax)):
        values = (sbp,) * placement.ndim
    elif isinstance(sbp, (tuple, list)):
        values = tuple(sbp)
        if len(values) != placement.ndim:
            raise SbpError(
                f"{what}: the SBP {fmt(values)} has {len(values)} value(s) but the placement's mesh {placement.mesh} "
                f"has {placement.ndim} axis(es); give one SBP per mesh axis, e.g. {fmt((Broadcast(),) * placement.ndim)}")
    else:
        raise SbpError(f"{what}: expected an SBP value (fs.sbp.split(i), fs.sbp.broadcast, fs.sbp.partial_sum) "
                       f"or a tuple of them, got {sbp!r}")
    out = []
    for v in values:
        if not isinstance(v, (Split, Broadcast, PartialSum, PartialMax)):
            raise SbpError(f"{what}: {v!r} in {values!r} is not an SBP value")
        if isinstance(v, Split):
            nd = len(shape)
            if not -nd <= v.axis < nd:
                raise SbpError(f"{what}: {v!r} splits axis {v.axis}, but the tensor of shape {tuple(shape)} has "
                               f"{nd} axis(es); split one of axes 0..{nd - 1} (or -{nd}..-1)")
            v = Split(v.axis % nd)
        out.append(v)
    return tuple(out)


def fmt(nd: Sequence[SbpValue]) -> str:
    """``(S(0), B)``: how N-D SBPs print in messages and ``explain()``."""
    return "(" + ", ".join(map(repr, nd)) + ")"


def shard_box(shape: Sequence[int], nd_sbp: NdSbp, mesh: Sequence[int], coords: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(start, stop) per tensor axis of the shard at mesh ``coords``."""
    start, stop = [0] * len(shape), list(shape)
    for k, v in enumerate(nd_sbp):
        if isinstance(v, Split):
            a = v.axis
            lo, hi = bounds(stop[a] - start[a], mesh[k], coords[k])
            start[a], stop[a] = start[a] + lo, start[a] + hi
    return tuple(zip(start, stop))


def local_shape(shape, nd_sbp, mesh, coords) -> tuple[int, ...]:
    return tuple(b - a for a, b in shard_box(shape, nd_sbp, mesh, coords))


def shard_of(ins, in_sbps, outs, out_sbps, mesh, coords) -> Shard:
    """What an op's ``lower`` rule sees on the rank at ``coords``: local specs and offsets of its
    inputs and outputs (``ins``/``outs`` are logical specs, ``*_sbps`` their N-D SBPs)."""
    def local(specs, nds):
        return tuple(Spec(local_shape(s.shape, nd, mesh, coords), s.dtype) for s, nd in zip(specs, nds))

    def offsets(specs, nds):
        return tuple(tuple(a for a, _ in shard_box(s.shape, nd, mesh, coords)) for s, nd in zip(specs, nds))

    return Shard(local(ins, in_sbps), local(outs, out_sbps), offsets(ins, in_sbps), offsets(outs, out_sbps), tuple(outs))


def holds_value(nd_sbp: NdSbp, coords) -> bool:
    """Whether the rank at ``coords`` holds the value (not zeros) when a value is laid out as P."""
    return all(c == 0 for v, c in zip(nd_sbp, coords) if isinstance(v, PartialSum))


def is_replica(nd_sbp: NdSbp, coords) -> bool:
    """Whether the rank is a non-first copy along some B mesh axis (its shard repeats another)."""
    return any(c != 0 for v, c in zip(nd_sbp, coords) if isinstance(v, Broadcast))


def as_slices(box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def distribute(xp, array, placement: Placement, nd_sbp: NdSbp) -> list:
    """Each rank's shard of the logical ``array`` (copies: no two ranks share a buffer)."""
    shards = []
    for rank in placement.ranks:
        c = placement.coords(rank)
        piece = array[as_slices(shard_box(array.shape, nd_sbp, placement.mesh, c))]
        shards.append(xp.array(piece, copy=True) if holds_value(nd_sbp, c) else xp.zeros_like(piece))
    return shards


def assemble(xp, shards: Sequence, placement: Placement, nd_sbp: NdSbp, shape, dtype):
    """The logical value: splits placed at their boxes, partial sums added, partial maxima
    maxed, one copy of replicas."""
    if any(isinstance(v, PartialMax) for v in nd_sbp):
        if any(isinstance(v, PartialSum) for v in nd_sbp):
            raise SbpError(f"assemble: {fmt(nd_sbp)} mixes a partial sum and a partial maximum, which have no "
                           f"single logical value; convert one of them to B first")
        out = xp.full(tuple(shape), -np.inf if is_floating(dtype) else np.iinfo(dtype).min, dtype=dtype)
        for rank, shard in zip(placement.ranks, shards):
            c = placement.coords(rank)
            if not is_replica(nd_sbp, c):
                region = as_slices(shard_box(shape, nd_sbp, placement.mesh, c))
                out[region] = xp.maximum(out[region], shard)
        return out
    out = xp.zeros(tuple(shape), dtype=dtype)
    for rank, shard in zip(placement.ranks, shards):
        c = placement.coords(rank)
        if not is_replica(nd_sbp, c):
            out[as_slices(shard_box(shape, nd_sbp, placement.mesh, c))] += shard
    return out


__all__ = ["NdSbp", "bounds", "normalize_sbp", "shard_box", "local_shape", "holds_value", "is_replica",
           "distribute", "assemble", "fmt", "as_slices", "shard_of"]

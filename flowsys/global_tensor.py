"""Global tensors in eager mode: a logical value laid out over a placement by an SBP.

The driver is the single controller: a :class:`GlobalValue` holds every rank's shard as a
separate array (this is also the single-node simulation users debug with). An op on global
tensors picks a signature from the op's SBP rows (:func:`choose_signature`: the least boxing
cost given the inputs' layouts), converts the inputs with the boxing planner, runs the kernel
rank by rank on the local shards and returns global outputs laid out as the signature says.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from flowsys import boxing
from flowsys import device as _device
from flowsys.errors import FlowsysError, PlacementError, SbpError, ShapeError
from flowsys.layout import NdSbp, assemble, distribute, fmt, normalize_sbp, shard_of
from flowsys.ops import OPS
from flowsys.ops.registry import OpDef, SbpRow, Shard, Spec, is_floating
from flowsys.placement import Placement
from flowsys.sbp import Broadcast, PartialSum, SbpTuple
from flowsys.value import ValueKind, register


class GlobalValue:
    """What a global tensor holds: its placement, N-D SBP, logical shape and dtype, and the
    shards (one array per rank, in the placement's mesh order)."""

    __slots__ = ("placement", "sbp", "shape", "dtype", "_shards", "source")

    def __init__(self, placement: Placement, sbp: NdSbp, shape, dtype, shards: list | None, source=None):
        self.placement, self.sbp = placement, tuple(sbp)
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self._shards = shards
        # where the values come from when they are not here: an object with ``read(box)`` giving
        # the block ``box`` of the logical value (a batch the workers read themselves); the
        # driver reads its shards only when asked for them
        self.source = source

    @property
    def shards(self) -> list | None:
        """One array per rank (None for a meta value: a layout without values)."""
        if self._shards is None and self.source is not None:
            self._shards = [self._read(self.placement.coords(r)) for r in self.placement.ranks]
        return self._shards

    def _read(self, coords):
        """The shard at mesh ``coords``, read from the source (zeros where a partial sum holds
        none of the value)."""
        from flowsys.layout import holds_value, shard_box  # noqa: PLC0415

        block = self.source.read(shard_box(self.shape, self.sbp, self.placement.mesh, coords))
        return block if holds_value(self.sbp, coords) else self.xp.zeros_like(block)

    @shards.setter
    def shards(self, value: list | None) -> None:
        self._shards = value

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def xp(self):
        return _device.array_module(self.placement.type)

    def local(self, rank: int):
        return self.shards[self.placement.index(rank)]

    def logical(self):
        """The logical value (gathered on the driver): splits placed, partials summed."""
        return assemble(self.xp, self.shards, self.placement, self.sbp, self.shape, self.dtype)

    def copy(self) -> GlobalValue:
        return GlobalValue(self.placement, self.sbp, self.shape, self.dtype, [s.copy() for s in self.shards])

    def with_layout(self, placement: Placement, sbp: NdSbp) -> GlobalValue:
        """This value converted to another layout through the boxing planner (self if equal)."""
        if placement == self.placement and tuple(sbp) == self.sbp:
            return self
        if self._shards is None:  # a meta value, or one read from its source when asked: the new layout
            return GlobalValue(placement, sbp, self.shape, self.dtype, None, self.source)
        p = boxing.plan(self.shape, self.dtype, self.placement, self.sbp, placement, tuple(sbp))
        return GlobalValue(placement, sbp, self.shape, self.dtype, boxing.execute(p, self.shards, self.xp))

    def __repr__(self) -> str:
        return f"GlobalValue({self.dtype.name}{list(self.shape)}, {self.placement!r}, sbp={fmt(self.sbp)})"


def make_global(array, placement: Placement, sbp, *, what: str = "to_global") -> GlobalValue:
    """Lay the logical ``array`` out over ``placement`` as ``sbp`` says (copies for every rank)."""
    nd = normalize_sbp(sbp, placement, array.shape, what=what)
    xp = _device.array_module(placement.type)
    array = xp.asarray(array)
    return GlobalValue(placement, nd, array.shape, array.dtype, distribute(xp, array, placement, nd))


# --------------------------------------------------------------------------- signature choice


@dataclass(frozen=True, slots=True)
class Signature:
    """The N-D signature an op runs under: one row per mesh axis, read across."""

    rows: tuple[SbpRow, ...]
    ins: tuple[NdSbp, ...]
    outs: tuple[NdSbp, ...]
    cost: int

    def __repr__(self) -> str:
        ins = ", ".join(map(fmt, self.ins))
        outs = ", ".join(map(fmt, self.outs))
        return f"({ins}) -> ({outs}), {self.cost} bytes of boxing"


_choice_cache: dict[Any, Signature] = {}


def _attrs_key(attrs: dict) -> Any:
    key = tuple(sorted(attrs.items()))
    try:
        hash(key)
    except TypeError:
        return None  # e.g. an index holding an array: not cached
    return key


def choose_signature(op: OpDef, specs: Sequence[Spec], attrs: dict, layouts: Sequence[NdSbp],
                     placement: Placement, out_sbp: Sequence[NdSbp] | None = None) -> Signature:
    """Among the op's N-D signatures (its rows per mesh axis) that are valid for these shapes
    on this mesh, the one whose input boxing moves the fewest bytes; ties go to the one that
    changes the fewest inputs, then to the earlier row. ``out_sbp`` pins the outputs' SBPs."""
    specs, layouts = tuple(specs), tuple(tuple(nd) for nd in layouts)
    pinned = tuple(tuple(nd) for nd in out_sbp) if out_sbp is not None else None
    akey = _attrs_key(attrs)
    key = (op.name, specs, akey, layouts, placement, pinned) if akey is not None else None
    if key is not None and key in _choice_cache:
        return _choice_cache[key]
    rows = op.sbp(specs, attrs)
    out_specs = op.infer(*specs, **attrs)
    out_specs = tuple(out_specs) if op.multi_output else (out_specs,)
    ranked = []
    for order, combo in enumerate(itertools.product(rows, repeat=placement.ndim)):
        ins = tuple(tuple(r.ins[i] for r in combo) for i in range(len(specs)))
        outs = tuple(tuple(r.outs[j] for r in combo) for j in range(len(out_specs)))
        if pinned is not None and outs != pinned:
            continue
        if any(isinstance(v, PartialSum) and not (s.dtype.kind in "iuc" or is_floating(s.dtype)) for s, nd in zip(specs, ins) for v in nd):
            continue
        cost = sum(boxing.estimate(s.shape, s.dtype, placement, have, placement, want)
                   for s, have, want in zip(specs, layouts, ins))
        changed = sum(have != want for have, want in zip(layouts, ins))
        ranked.append((cost, changed, order, Signature(combo, ins, outs, cost)))
    ranked.sort(key=lambda t: t[:3])
    for *_, sig in ranked:
        if _fits(op, specs, out_specs, attrs, sig, placement):
            if key is not None:
                _choice_cache[key] = sig
            return sig
    wanted = f" with outputs {', '.join(map(fmt, pinned))}" if pinned else ""
    raise SbpError(
        f"{op.name}: no signature{wanted} fits inputs {', '.join(f'{s}' for s in specs)} on mesh {placement.mesh}; "
        f"its rows are {rows}. Lay the inputs out as one of these rows with .to_global(sbp=...)")


def _shard_context(specs, out_specs, sig: Signature, placement: Placement, coords) -> Shard:
    return shard_of(specs, sig.ins, out_specs, sig.outs, placement.mesh, coords)


def _fits(op: OpDef, specs, out_specs, attrs, sig: Signature, placement: Placement) -> bool:
    """Whether running the kernel on every rank's shard gives exactly the shards the output
    SBPs describe (uneven splits can break a row: merging axes moves the cut points)."""
    seen = set()
    for rank in placement.ranks:
        ctx = _shard_context(specs, out_specs, sig, placement, placement.coords(rank))
        if (ctx.ins, ctx.outs, ctx.in_offsets) in seen:
            continue
        seen.add((ctx.ins, ctx.outs, ctx.in_offsets))
        local_attrs = op.lower(attrs, ctx) if op.lower else attrs
        try:
            got = op.infer(*ctx.ins, **local_attrs)
        except FlowsysError:
            return False
        got = tuple(got) if op.multi_output else (got,)
        if tuple(g.shape for g in got) != tuple(o.shape for o in ctx.outs):
            return False
    return True


# ---------------------------------------------------------------------------------- execution


def common_placement(op_name: str, values: Sequence[Any]) -> Placement:
    return single_placement(op_name, {v.placement for v in values if isinstance(v, GlobalValue)})


def single_placement(op_name: str, placements) -> Placement:
    """The one placement of an op's global inputs (flowsys never moves data between placements
    implicitly: that is a PlacementError naming both)."""
    placements = set(placements)
    if len(placements) > 1:
        names = " and ".join(sorted(map(repr, placements)))
        raise PlacementError(
            f"{op_name}: inputs are on different placements, {names}; move one with "
            f".to_global(placement=...) first (flowsys does not move data between placements implicitly)")
    return placements.pop()


def apply_global(op: OpDef, datas: Sequence[Any], attrs: dict, out_specs) -> list[GlobalValue]:
    """Run ``op`` over global inputs (local ones count as broadcast constants)."""
    placement = common_placement(op.name, datas)
    values = [d if isinstance(d, GlobalValue) else make_global(d, placement, Broadcast()) for d in datas]
    specs = tuple(Spec(v.shape, v.dtype) for v in values)
    out_specs = tuple(out_specs) if op.multi_output else (out_specs,)
    sig = choose_signature(op, specs, attrs, [v.sbp for v in values], placement)
    return run_signature(op, values, attrs, sig, out_specs)


def run_signature(op: OpDef, values: Sequence[GlobalValue], attrs: dict, sig: Signature, out_specs) -> list[GlobalValue]:
    """Box the inputs to ``sig``'s layouts and run the kernel on every rank's shards."""
    placement = values[0].placement
    xp = _device.array_module(placement.type)
    specs = tuple(Spec(v.shape, v.dtype) for v in values)
    values = [v.with_layout(placement, nd) for v, nd in zip(values, sig.ins)]
    per_rank = []
    for r, rank in enumerate(placement.ranks):
        local_attrs = attrs
        if op.lower:
            local_attrs = op.lower(attrs, _shard_context(specs, out_specs, sig, placement, placement.coords(rank)))
        out = op.kernel(xp, *(v.shards[r] for v in values), **local_attrs)
        per_rank.append(tuple(out) if op.multi_output else (out,))
    outs = []
    for j, (spec, nd) in enumerate(zip(out_specs, sig.outs)):
        shards = [xp.asarray(o[j]) for o in per_rank]
        shards = [s if s.dtype == spec.dtype else s.astype(spec.dtype) for s in shards]
        outs.append(GlobalValue(placement, nd, spec.shape, spec.dtype, shards))
    return outs


def signatures(op: OpDef, specs: Sequence[Spec], attrs: dict, placement: Placement) -> list[Signature]:
    """Every N-D signature of ``op`` for these inputs on ``placement``'s mesh that fits the
    shapes (rows read across the mesh axes; uneven splits can rule some out)."""
    out_specs = op.infer(*specs, **attrs)
    out_specs = tuple(out_specs) if op.multi_output else (out_specs,)
    found = []
    for combo in itertools.product(op.sbp(tuple(specs), attrs), repeat=placement.ndim):
        sig = Signature(combo, tuple(tuple(r.ins[i] for r in combo) for i in range(len(specs))),
                        tuple(tuple(r.outs[j] for r in combo) for j in range(len(out_specs))), 0)
        if _fits(op, tuple(specs), out_specs, attrs, sig, placement):
            found.append(sig)
    return found


class GlobalKind(ValueKind):
    """A global tensor's value: ops run by :func:`apply_global`, gradients laid out as the
    values they belong to, in-place writes shard by shard."""

    priority = 1

    def device(self, v: GlobalValue) -> str:
        return v.placement.type

    def xp(self, v: GlobalValue):
        return v.xp

    def placement(self, v: GlobalValue) -> Placement:
        return v.placement

    def sbp(self, v: GlobalValue) -> SbpTuple:
        return SbpTuple(v.sbp)

    def logical(self, v: GlobalValue):
        return v.logical()

    def run(self, op: OpDef, datas, attrs: dict, out_spec) -> list[GlobalValue]:
        return apply_global(op, datas, attrs, out_spec)

    def to_global(self, v: GlobalValue, placement: Placement | None, sbp) -> GlobalValue:
        """Converted by the boxing planner (same placement: collectives; another placement:
        point-to-point moves); unset arguments keep their current value."""
        placement = v.placement if placement is None else placement
        nd = v.sbp if sbp is None else normalize_sbp(sbp, placement, v.shape)
        if sbp is None and placement.ndim != len(nd):
            raise PlacementError(f"to_global: the new {placement!r} has {placement.ndim} mesh axes but the tensor's "
                                 f"SBP {fmt(nd)} has {len(nd)}; pass sbp= for the new mesh")
        return v.with_layout(placement, nd)

    def to_local(self, v: GlobalValue, rank: int):
        if rank not in v.placement.ranks:
            raise PlacementError(
                f"to_local: rank {rank} is not in the tensor's {v.placement!r}; pick one of {list(v.placement.ranks)}")
        return v.local(rank)

    def to_device(self, v: GlobalValue, device: str):
        raise PlacementError(f"to: a global tensor moves with .to_global(placement=...), not .to({device!r})")

    def broadcast(self, v: GlobalValue, array) -> GlobalValue:
        return make_global(array, v.placement, Broadcast())

    def layout_grad(self, v: GlobalValue, g) -> GlobalValue:
        """As PyTorch's DTensor redistribute: a partial-sum input's gradient is replicated (the
        gradient of a sum reaches every addend whole)."""
        want = tuple(Broadcast() if isinstance(s, PartialSum) else s for s in v.sbp)
        g = g if type(g) is GlobalValue else self.broadcast(v, g)
        return g.with_layout(v.placement, want)

    def accumulate(self, v: GlobalValue, acc, g, owned: bool) -> GlobalValue:
        """The gradient takes the parameter's layout: for a replicated parameter used under a
        split batch this is the data-parallel all-reduce (P -> B)."""
        g = g if type(g) is GlobalValue else self.broadcast(v, g)
        g = g.with_layout(v.placement, v.sbp)
        if g.dtype != v.dtype:
            g = GlobalValue(g.placement, g.sbp, g.shape, v.dtype, [s.astype(v.dtype) for s in g.shards])
        if acc is None:
            return g.copy()
        for a, s in zip(acc.shards, g.shards):
            a += s
        return acc

    def add(self, a, a_owned: bool, b, b_owned: bool) -> tuple[GlobalValue, bool]:
        op = OPS["add"]
        return self.run(op, (a, b), {}, op.infer(Spec(a.shape, a.dtype), Spec(b.shape, b.dtype)))[0], False

    def copy_(self, v: GlobalValue, src) -> None:
        """``v`` takes the logical value ``src``."""
        src = _device.to_numpy(src)
        if tuple(src.shape) != v.shape:
            raise ShapeError(f"copy_: source shape {tuple(src.shape)} does not match {v.shape}")
        for shard, new in zip(v.shards, make_global(src.astype(v.dtype), v.placement, v.sbp).shards):
            shard[...] = new

    def zero_(self, v: GlobalValue) -> None:
        for a in v.shards:
            a[...] = 0

    def repr_suffix(self, v: GlobalValue) -> str:
        return f", placement={v.placement!r}, sbp={fmt(v.sbp)}"


register(GlobalValue, GlobalKind())

__all__ = ["GlobalValue", "Signature", "make_global", "choose_signature", "signatures", "apply_global", "run_signature",
           "common_placement"]

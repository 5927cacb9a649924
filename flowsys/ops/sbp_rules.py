"""Generators of SBP signature rows shared by the op families.

A rule depends on the inputs' ranks and on broadcasting, so each op's ``sbp`` is a small
function of the input specs; the reasons stay beside the op that uses them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from flowsys.ops.registry import SbpRow, Spec
from flowsys.sbp import Broadcast, PartialMax, PartialSum, SbpValue, Split

B = Broadcast()
P = PartialSum()
PMAX = PartialMax()
S = Split


def replicated(n_in: int, n_out: int = 1) -> SbpRow:
    return SbpRow((B,) * n_in, (B,) * n_out, "every rank holds the whole inputs and computes the whole result")


def pointwise(
    specs: Sequence[Spec],
    partial: Iterable[tuple[tuple[SbpValue, ...], str]] = (),
    *,
    skip_axes: Iterable[int] = (),
    n_out: int = 1,
    reason: str = "elementwise: an output element needs only the inputs at the same index",
) -> list[SbpRow]:
    """Rows of a broadcasting elementwise op: split any output axis (inputs that broadcast along
    it stay B), all-B, plus the op's own partial-sum rows. ``skip_axes`` are output axes the op
    reduces over internally (e.g. softmax's axis), which cannot be split."""
    out_shape = tuple(np.broadcast_shapes(*(s.shape for s in specs)))
    n = len(out_shape)
    skip = {a % n for a in skip_axes} if n else set()
    rows = []
    for i in range(n):
        if i in skip:
            continue
        ins = []
        for s in specs:
            j = i - (n - s.ndim)
            ins.append(S(j) if j >= 0 and s.shape[j] == out_shape[i] else B)
        rows.append(SbpRow(tuple(ins), (S(i),) * n_out, reason))
    rows.append(replicated(len(specs), n_out))
    rows.extend(SbpRow(tuple(ins), (P,) * n_out, why) for ins, why in partial)
    return rows


def reduction(spec: Spec, axes: tuple[int, ...], keepdims: bool, *, linear: bool) -> list[SbpRow]:
    """Rows of a reduction over ``axes``: kept axes stay split; a split reduced axis gives P when
    the reduction is a sum (``linear``); sums are linear, so P stays P."""
    rows = []
    for i in range(spec.ndim):
        if i in axes:
            if linear:
                rows.append(SbpRow((S(i),), (P,), "summing a split axis leaves per-rank partial sums"))
        else:
            j = i if keepdims else i - sum(a < i for a in axes)
            rows.append(SbpRow((S(i),), (S(j),), "kept axes are reduced independently per slice"))
    rows.append(replicated(1))
    if linear:
        rows.append(SbpRow((P,), (P,), "a sum of partial sums is a partial sum"))
    return rows


def einsum(in_subs: Sequence[str], out_sub: str, specs: Sequence[Spec]) -> list[SbpRow]:
    """Rows of a contraction given its einsum subscripts (e.g. ``"mk", "kn" -> "mn"``).

    A letter kept in the output may be split on every operand holding it (operands where it is
    broadcast, size 1, stay B); a contracted letter split on all operands gives P. The op is linear
    in each operand, so P in one operand with B elsewhere gives P.
    """
    letters = dict.fromkeys("".join(in_subs) + out_sub)
    sizes = {}
    for sub, s in zip(in_subs, specs):
        for c, d in zip(sub, s.shape):
            sizes[c] = max(sizes.get(c, 1), d)
    rows = []
    for c in letters:
        ins = tuple(
            S(sub.index(c)) if c in sub and s.shape[sub.index(c)] == sizes[c] else B
            for sub, s in zip(in_subs, specs)
        )
        if c in out_sub:
            rows.append(SbpRow(ins, (S(out_sub.index(c)),), f"'{c}' is kept: each slice is computed independently"))
        elif all(c in sub for sub in in_subs):
            rows.append(SbpRow(ins, (P,), f"'{c}' is contracted: each rank sums its share, the total is the sum"))
    rows.append(replicated(len(specs)))
    for k in range(len(specs)):
        ins = tuple(P if i == k else B for i in range(len(specs)))
        rows.append(SbpRow(ins, (P,), "a contraction is linear in each operand"))
    return rows

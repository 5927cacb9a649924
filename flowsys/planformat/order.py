"""A plan's communication events, as the NCCL order names them (vocabulary: the scheduler fixes
the order, the actor runtime follows it).

An event is one communication every party issues once per step: a collective (its channel), a
transfer (its two ends share the channel) or a bucket of collectives run as one, in one
micro-batch, or once a step (piece -1: per-step ops and the optimizer phase). Its key is
``(("channel", c) | ("bucket", b), piece)``.
"""

from __future__ import annotations

COMMUNICATION = ("collective", "send", "recv")  # the op kinds that communicate


def event_of(op, piece: int) -> tuple:
    """The key of ``op``'s event in ``piece`` (as given: -1 for once a step)."""
    if op.bucket:
        return ("bucket", op.bucket), piece
    return ("channel", op.channel), piece


def event_key(op, piece: int) -> tuple:
    """The event an op's communication belongs to when it runs for ``piece`` (a per-step op's
    and the optimizer's are once a step, whatever piece number their messages carry)."""
    return event_of(op, -1 if op.per_step or op.phase == "optimizer" else piece)


def order_of(rank_plan) -> list[tuple]:
    """A rank plan's NCCL order (``RankPlan.comm_order``) as event keys; [] when it has none."""
    return [(("bucket", e.bucket) if e.bucket else ("channel", e.channel), e.piece) for e in rank_plan.comm_order]

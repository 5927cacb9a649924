"""From the compiled global graph to per-rank physical plans.

``lower(graph)`` gives a :class:`flowsys.planformat.Plan`: for every rank, its local values
(local shapes), its compute ops (attributes lowered to the shard), every boxing node turned
into the collectives, sends and receives it runs (with groups, peers and channel ids), its
updates, a memory estimate and the bytes it sends per step. Plans are protobuf messages:
``Plan.FromString(plan.SerializeToString()) == plan``.
"""

from scheduler.lower import lower

__all__ = ["lower"]

"""The plan format: what the driver ships to each device's worker, and how workers read it.

Part of the shared vocabulary: the scheduler writes plans, the actors run them, and neither
imports the other; this package imports nothing else of ours (importing it loads no ``nn``,
``optim`` or ``Graph``).

- ``plan.proto`` and its generated ``plan_pb2`` (``Plan``, ``RankPlan``, ``Op``, ``Value``, the
  step and state messages); ``Plan.FromString(plan.SerializeToString()) == plan``;
- ``encode_attrs`` / ``decode_attrs``: an op's attributes as canonical JSON;
- ``SeedRef`` (a traced dropout seed slot) and ``SeedMarker`` (the same slot, decoded);
- ``REQUEST_BYTES``: what a step's request to one rank and its response carry in steady state
  (step number, seeds, hyper-parameters, losses), as the cost model budgets the driver.
"""

from flowsys.planformat import plan_pb2
from flowsys.planformat.attrs import SeedMarker, SeedRef, decode_attrs, encode_attrs
from flowsys.planformat.plan_pb2 import Plan, RankPlan

REQUEST_BYTES = 1024

__all__ = ["REQUEST_BYTES", "plan_pb2", "Plan", "RankPlan", "encode_attrs", "decode_attrs", "SeedRef", "SeedMarker"]

"""The cost model's reporting side: what a step costs in FLOPs and driver bytes, and the figures
``flowsys plan`` prints beside a prediction.

The cost model splits along three seams:

- **hardware specs and probes**: :mod:`scheduler.hardware` (``load_hardware``, the shipped
  specs in ``scheduler/hardware/*.yaml``, the probes and kernel timers of this machine);
- **the simulation**: :mod:`actors.sim`, the actor runtime's own scheduling code run with null
  kernels on a simulated clock (``actors.sim.predict``); ``flowsys.plan.predict`` adds this
  machine's kernel timers where a spec asks for them;
- **reporting**: this module. FLOPs come from the op registry's cost rules
  (:mod:`flowsys.ops.cost`), re-exported here with the spec's names, so ``from scheduler.cost
  import load_hardware, graph_flops`` keeps working. Lowering never imports the simulation.
"""

from __future__ import annotations

import numpy as np

from flowsys.ops.cost import graph_flops, op_flops  # noqa: F401 - the op registry's cost rules, re-exported
from flowsys.planformat import REQUEST_BYTES
from scheduler.hardware import (  # noqa: F401 - the spec's names, re-exported for ``from scheduler.cost import``
    _MEASURE_LIMIT,
    HARDWARE_DIR,
    Hardware,
    Link,
    available,
    clear_kernel_times,
    load_hardware,
    measure_collective,
    measure_kernel,
    probe_gemm,
    probe_memory_bandwidth,
)


def feed_bytes(rank_plan, fed_inputs: bool = False) -> int:
    """Bytes the driver moves for one rank per step. Parameters, gradients and optimizer state
    stay in the workers and a worker reads its own batch, so that is the request and the
    response; with ``fed_inputs``, also the inputs the driver sends itself (a user's own
    tensors passed to the step)."""
    if not fed_inputs:
        return REQUEST_BYTES
    decl = {v.id: (tuple(v.shape), np.dtype(v.dtype)) for v in rank_plan.values}
    return REQUEST_BYTES + sum(int(np.prod(decl[v][0])) * decl[v][1].itemsize for v in rank_plan.inputs if v in decl)


def megatron_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> int:
    """FLOPs of one GPT training step as Megatron-LM counts them (Narayanan et al. 2021, "Efficient
    Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", Eq. 3), with full
    activation recomputation: ``96 B s l h^2 (1 + s / 6h + V / 16lh)``. The paper's TFLOP/s per
    GPU are this over the step time and the GPUs."""
    return int(96 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden)))

"""A GPT training step compiled once and run on a backend: worker threads, or one Ray actor per
device talking gRPC — the same plan, the same losses. The driver only controls: the workers
create the model's parameters, read their rows of each batch and keep the optimizer state; a
step sends them its number.

    python examples/distributed_gpt.py [--backend local|ray] [--steps 5] [--mesh 2x2]
    flowsys launch --nodes 4 examples/distributed_gpt.py      # on four simulated Ray nodes

``--mesh DPxTP`` lays the model out data x tensor parallel (Megatron-style) over DP*TP ranks.
``--backend ray`` starts a local Ray cluster unless this process already joined one (or
``FLOWSYS_ADDRESS`` names one).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import flowsys as fs
from flowsys.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64)


class TrainStep(fs.Graph):
    def __init__(self, model, opt):
        super().__init__()
        self.model = model
        self.add_optimizer(opt)

    def build(self, idx, targets):
        _, loss = self.model(idx, targets)
        loss.backward()
        return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["local", "ray"], default=None,
                    help="default: ray under `flowsys launch`, else local")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--mesh", default="2x2", help="data x tensor parallel degrees, e.g. 2x2, 4x1, 1x2")
    args = ap.parse_args()
    dp, tp = (int(n) for n in args.mesh.lower().split("x"))
    backend = fs.init(backend=args.backend)  # None: FLOWSYS_BACKEND (set by `flowsys launch`), else local
    args.backend = backend.name
    if args.backend == "ray":
        import ray  # noqa: PLC0415

        print(f"Ray nodes: {sum(n['Alive'] for n in ray.nodes())}")
    fs.manual_seed(0)
    placement = fs.placement("cpu", np.arange(dp * tp).reshape(dp, tp).tolist())
    with fs.nn.meta_init():  # shapes and layouts only: each worker creates its own shards
        model = GPT(CFG)
        model.to_global(placement, GPT.parallel_plan(placement, dp_axis=0, tp_axis=1))
    step = TrainStep(model, model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3))
    batches = fs.data.ByteDataset.from_stdlib().batches(batch_size=8, block_size=CFG.block_size)
    batch = (fs.sbp.split(0), fs.sbp.broadcast)
    for i in range(args.steps):
        start = time.perf_counter()
        loss = step(*batches.at(i, placement, batch))  # each rank reads its rows of step i's batch
        print(f"step {i}  loss {float(loss):.4f}  {1e3 * (time.perf_counter() - start):.0f} ms  "
              f"(backend {args.backend}, mesh {dp}x{tp}; {max(sum(t) for t in step.traffic.values())} bytes "
              f"to and from a worker)")
    fs.shutdown()


if __name__ == "__main__":
    main()

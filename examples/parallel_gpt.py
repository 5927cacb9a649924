"""The same GPT, trained on one device and on a simulated 2x2 mesh (data x tensor parallel).

    python examples/parallel_gpt.py [--steps 5]

The driver holds every rank's shard (single-node simulation); the losses match step for step,
and the boxing trace shows the collectives the layouts needed.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

import flowsys as fs
from flowsys import boxing, optim
from flowsys.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64)


def train(steps: int, placement=None, dp_axis=None, tp_axis=None):
    fs.manual_seed(0)
    model = GPT(CFG)
    if placement is not None:  # parameters laid out by the plan, in place
        model.to_global(placement, GPT.parallel_plan(placement, dp_axis=dp_axis, tp_axis=tp_axis))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
    data = fs.data.ByteDataset.from_stdlib()
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        idx, tgt = data.get_batch("train", 8, CFG.block_size, rng=rng)
        if placement is not None:  # the batch is split along the data-parallel mesh axis
            sbp = tuple(fs.sbp.split(0) if k == dp_axis else fs.sbp.broadcast for k in range(placement.ndim))
            idx, tgt = idx.to_global(placement, sbp), tgt.to_global(placement, sbp)
        _, loss = model(idx, tgt)
        opt.zero_grad()
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    single = train(args.steps)
    mesh = fs.placement("cpu", [[0, 1], [2, 3]])
    with boxing.trace() as events:
        parallel = train(args.steps, mesh, dp_axis=0, tp_axis=1)
    for step, (a, b) in enumerate(zip(single, parallel)):
        print(f"step {step}: one device {a:.5f}   2x2 mesh (dp x tp) {b:.5f}")
    moved = Counter()
    for e in events:
        moved[e.kind] += e.nbytes
    print("bytes moved by boxing:", {k: v for k, v in moved.items() if v})
    np.testing.assert_allclose(parallel, single, rtol=1e-4)


if __name__ == "__main__":
    main()

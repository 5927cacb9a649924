"""Pipeline idle fraction: measured per stage from the actor timelines against GPipe/1F1B's
bubble (p - 1) / (m + p - 1), for p = 2 and 4 stages and m = 4 and 8 micro-batches.

    python benchmarks/bench_pipeline.py [--backend ray|local] [--steps 4] [--width 2048]
                                        [--out benchmarks/results/bench_pipeline.json]

The model is p identical stages (Linear-GELU-Linear, width ``--width``, 256 rows per
micro-batch; the first stage also scales its input by a learnt vector, so that it computes its
input's gradient like the others), stage s on rank s via ``set_stage``, trained with SGD in
graph mode on the chosen backend (``ray``: one worker process per stage, so stages really run
at once; ``local``: threads of one process, where the GIL serialises the Python between
kernels).

How idle is measured: for each step, the span is from the first to the last firing of the
micro-batch phase on any rank (per-step and optimizer-phase firings excluded); a stage's busy
time is the union of its compute firings' intervals; idle = 1 - busy / span. The median over the
timed steps (after one warm-up) is reported, with the largest in-flight micro-batch count per
stage. Stages run concurrently only as far as the machine has cores: with p above the core count
the stages share cores, an op's duration depends on how many stages run beside it, and the
measured idle departs from the model's by that unevenness (the JSON records the core count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import flowsys as fs
from actors.runtime import PER_STEP_PIECE
from flowsys import nn, optim

B = fs.sbp.broadcast


class Scale(nn.Module):
    """``x * scale``, a learnt per-feature scale: in front of the first stage it makes that stage
    compute its input's gradient too, so all stages do the same work (the bubble formula's
    premise; without it the first stage skips a quarter of its backward and idles longer)."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(fs.ones(width))

    def forward(self, x):
        return x * self.scale


class Pipeline(fs.Graph):
    def __init__(self, stages: int, micro: int, width: int, rows: int = 256):
        super().__init__()
        fs.manual_seed(0)
        self.placements = [fs.placement("cpu", [s]) for s in range(stages)]
        self.blocks = nn.ModuleList([nn.Sequential(*([Scale(width)] if s == 0 else []), nn.Linear(width, width),
                                                   nn.GELU(), nn.Linear(width, width))
                                     for s in range(stages)])
        for s, block in enumerate(self.blocks):
            block.set_stage(s, self.placements[s])
        self.add_optimizer(optim.SGD(self.blocks.parameters(), lr=1e-3))
        self.config.gradient_accumulation_steps = micro
        self.config.executor = "plans"
        self.config.record_timeline = True
        self.x = fs.randn(micro * rows, width).to_global(self.placements[0], B)
        self.y = fs.randn(micro * rows, width).to_global(self.placements[-1], B)

    def build(self, x, y):
        for block in self.blocks:
            x = block(x)
        loss = ((x - y) ** 2).mean()
        loss.backward()
        return loss


def idle_per_stage(timeline, stages: int) -> list[float]:
    fired = [f for f in timeline if f.phase != "optimizer" and f.piece != PER_STEP_PIECE]
    t0, t1 = min(f.start for f in fired), max(f.end for f in fired)
    out = []
    for s in range(stages):
        busy, lo, hi = 0.0, None, None
        for f in sorted((f for f in fired if f.rank == s and f.kind == "compute"), key=lambda f: f.start):
            if hi is None or f.start > hi:
                busy += (hi - lo) if hi is not None else 0.0
                lo, hi = f.start, f.end
            else:
                hi = max(hi, f.end)
        busy += (hi - lo) if hi is not None else 0.0
        out.append(1.0 - busy / (t1 - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["ray", "local"], default="ray")
    ap.add_argument("--steps", type=int, default=4)
    # Wide enough that a stage's work per micro-batch (about 100 ms here at 2048) dwarfs the
    # hand-off of its activations (a few ms), as in the pipelines the formula describes.
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--out", default="benchmarks/results/bench_pipeline.json")
    args = ap.parse_args()
    if args.backend == "ray":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        fs.init(backend="ray", num_cpus=os.cpu_count(), object_store_memory=100 * 2**20)
    else:
        fs.init(backend="local")
    rows = []
    for stages in (2, 4):
        for micro in (4, 8):
            step = Pipeline(stages, micro, args.width)
            step(step.x, step.y)  # warm-up: compile, start workers
            idles, in_flight = [], {}
            for _ in range(args.steps):
                step(step.x, step.y)
                idles.append(idle_per_stage(step.timeline, stages))
                for r, n in step.in_flight.items():
                    in_flight[r] = max(in_flight.get(r, 0), n)
            measured = [statistics.median(i[s] for i in idles) for s in range(stages)]
            model = (stages - 1) / (micro + stages - 1)
            row = dict(stages=stages, micro_batches=micro, bubble_model=round(model, 3),
                       idle_measured=[round(x, 3) for x in measured],
                       max_error_pp=round(100 * max(abs(x - model) for x in measured), 1),
                       in_flight=[in_flight[s] for s in range(stages)], in_flight_bound=list(range(stages, 0, -1)))
            rows.append(row)
            print(f"p={stages} m={micro}: model {model:.3f}  measured {row['idle_measured']}  "
                  f"error {row['max_error_pp']} pp  in flight {row['in_flight']} (bound {row['in_flight_bound']})")
    fs.shutdown()
    result = dict(benchmark="pipeline_idle_fraction", backend=args.backend, width=args.width, steps=args.steps,
                  machine=dict(cpus=os.cpu_count(), platform=platform.platform()), results=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()

"""The cost model against the clock: predicted and measured step times of the tiny GPT in six
layouts, on the local and Ray backends of this machine.

    python benchmarks/bench_costmodel.py [--backends local ray] [--steps 10]
                                         [--out benchmarks/results/bench_costmodel.json]

For each backend, ``flowsys.calibrate.calibrate`` first measures the runtime's terms on small
probe graphs (a chain of trivial ops, a one-layer GPT, a matmul/GELU/layer-norm mix on 1, 2 and
4 ranks, all-gathers between two ranks); none of them is a model judged here. Then, per layout,
the tiny GPT (2 layers, width 64, 4 heads, vocab 256, 64 tokens, batch 16, AdamW) is compiled,
``flowsys.plan.predict`` (the actor runtime on a simulated clock) predicts its step from the plan, and the median of ``--steps`` timed
steps (after 3 warm-up steps) is measured. The ratio is predicted / measured; the target is
within 25 % (0.75 to 1.25) for every layout.

Layouts: single device; dp2; tp2; pp2 with 4 micro-batches; dp2 x tp2; dp2 with ZeRO 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import flowsys as fs
from flowsys.calibrate import as_yaml, calibrate
from flowsys.placement import placement
from flowsys.plan import build
from flowsys.train import job_from_dict
from flowsys.plan import predict

MODEL = dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=True)
LAYOUTS = {"single": {}, "dp2": dict(dp=2), "tp2": dict(tp=2), "pp2 x 4 micro-batches": dict(pp=2, micro_batches=4),
           "dp2 x tp2": dict(dp=2, tp=2), "dp2 ZeRO 2": dict(dp=2, zero_stage=2)}


def measure(layout: dict, hw, steps: int) -> dict:
    job = job_from_dict({"model": MODEL, "data": {"batch_size": 16}, "parallel": layout})
    p = job.parallel
    ranks = np.arange(p.devices).reshape(p.pp, p.dp, p.tp)
    placements = [placement("cpu", ranks[s].tolist()) for s in range(p.pp)]
    fs.manual_seed(0)
    _, _, step = build(job, placements)
    step.config.executor = "plans"
    rng = np.random.default_rng(0)
    batch = (fs.sbp.split(0), fs.sbp.broadcast)
    x = fs.tensor(rng.integers(0, 256, (16, 64))).to_global(placements[0], batch)
    y = fs.tensor(rng.integers(0, 256, (16, 64))).to_global(placements[-1], batch)
    for _ in range(3):
        step(x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    measured = statistics.median(times)
    pred = predict(step.plan(), hw)
    return {"devices": p.devices, "measured_ms": measured * 1e3, "predicted_ms": pred.step_s * 1e3,
            "ratio": pred.step_s / measured, "within_25pct": abs(pred.step_s / measured - 1) <= 0.25,
            "bound": pred.bound, "predicted_driver_ms": pred.overhead_s * 1e3,
            "measured_times_ms": [t * 1e3 for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", choices=["local", "ray"], default=["local", "ray"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/bench_costmodel.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    results, specs = [], {}
    for backend in args.backends:
        if backend == "ray":
            fs.init(backend="ray", num_cpus=os.cpu_count(), object_store_memory=100 << 20)
        else:
            fs.init(backend="local")
        t0 = time.perf_counter()
        hw = calibrate(backend)
        specs[backend] = as_yaml(hw, backend)
        print(f"{backend}: calibrated in {time.perf_counter() - t0:.1f} s", flush=True)
        for name, layout in LAYOUTS.items():
            row = {"backend": backend, "layout": name, **measure(layout, hw, args.steps)}
            print(f"  {name:22} measured {row['measured_ms']:7.1f} ms  predicted {row['predicted_ms']:7.1f} ms  "
                  f"ratio {row['ratio']:.2f}  bound by {row['bound']}", flush=True)
            results.append(row)
        fs.shutdown()
    ratios = [r["ratio"] for r in results]
    out = {"benchmark": "cost_model_calibration", "model": MODEL, "batch": 16,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "calibrated_specs": specs, "results": results,
           "worst_error_pct": 100 * max(abs(r - 1) for r in ratios), "all_within_25pct": all(r["within_25pct"] for r in results)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"worst error {out['worst_error_pct']:.1f} %; wrote {args.out}")


if __name__ == "__main__":
    main()

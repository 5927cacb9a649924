"""The actor runtime's own cost: per actor firing, per step, and the cost of recording traces.

    python benchmarks/bench_overhead.py [--backends local ray] [--repeats 15]
                                        [--out benchmarks/results/bench_overhead.json]

Per firing: a plan of trivial ops (a chain of ``x + 1.0`` on a 4-element tensor, one rank) at
50 and 1,000 ops; the difference of the two steps' median times over the 950 extra firings is
the runtime's cost per firing (the kernel itself is well under a microsecond). The intercept is
the cost of a step with nothing in it (the driver's dispatch, the backend's call to each rank).
Target: under 50 µs per firing.

Recording: the tiny GPT (2 layers, width 64, batch 16 x 64 tokens) on a 2 x 2 data x tensor mesh,
steps run alternately with and without ``fs.profile()``; the cost of recording is the median
difference over the median plain step. Target: under 5 %.
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
from flowsys.calibrate import _Chain, _median_time
from flowsys.plan import build, layout
from flowsys.train import job_from_dict

TINY = dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)


def per_firing(repeats: int) -> dict:
    x = fs.zeros((4,)).to_global(fs.placement("cpu", [0]), fs.sbp.broadcast)
    short, long_ = _Chain(50), _Chain(1000)
    t_short, t_long = _median_time(short, (x,), repeats), _median_time(long_, (x,), repeats)
    firings = len(long_.plan().ranks[0].ops) - len(short.plan().ranks[0].ops)
    per = (t_long - t_short) / firings
    return {"firing_us": per * 1e6, "empty_step_ms": (t_short - 50 * per) * 1e3,
            "step_50_ops_ms": t_short * 1e3, "step_1000_ops_ms": t_long * 1e3, "target_us": 50.0,
            "meets_target": per * 1e6 < 50.0}


def recording(repeats: int) -> dict:
    job = job_from_dict({"model": TINY, "data": {"batch_size": 16}, "parallel": {"dp": 2, "tp": 2}})
    fs.manual_seed(0)
    placements = layout(job, 4)
    _, _, step = build(job, placements)
    step.config.executor = "plans"
    idx = fs.tensor(np.random.default_rng(0).integers(0, 256, (16, 64))).to_global(
        placements[0], (fs.sbp.split(0), fs.sbp.broadcast))
    for _ in range(3):
        step(idx, idx)
    plain, recorded = [], []
    for _ in range(repeats):  # alternate, so drift in the machine's speed hits both alike
        t0 = time.perf_counter()
        step(idx, idx)
        plain.append(time.perf_counter() - t0)
        with fs.profile():
            t0 = time.perf_counter()
            step(idx, idx)
            recorded.append(time.perf_counter() - t0)
    base, rec = statistics.median(plain), statistics.median(recorded)
    return {"plain_step_ms": base * 1e3, "recorded_step_ms": rec * 1e3, "cost_pct": 100 * (rec - base) / base,
            "firings_per_step": sum(len(rp.ops) for rp in step.plan().ranks), "target_pct": 5.0,
            "meets_target": 100 * (rec - base) / base < 5.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", choices=["local", "ray"], default=["local", "ray"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/bench_overhead.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    results = []
    for backend in args.backends:
        if backend == "ray":
            fs.init(backend="ray", num_cpus=os.cpu_count(), object_store_memory=100 << 20)
        else:
            fs.init(backend="local")
        row = {"backend": backend, **{f"per_firing_{k}": v for k, v in per_firing(args.repeats).items()},
               **{f"recording_{k}": v for k, v in recording(args.repeats).items()}}
        fs.shutdown()
        print(f"{backend:5}: {row['per_firing_firing_us']:.1f} µs per firing, empty step "
              f"{row['per_firing_empty_step_ms']:.2f} ms; recording a trace costs {row['recording_cost_pct']:+.1f} % "
              f"of a {row['recording_plain_step_ms']:.1f} ms dp2 x tp2 GPT step", flush=True)
        results.append(row)
    out = {"benchmark": "runtime_overhead", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                        "python": platform.python_version()},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Compile time of a GPT training step on many simulated devices, without running it.

    python benchmarks/bench_compile.py [--devices 8 64 512] [--out benchmarks/results/bench_compile.json]

GPT n_layer=24, n_head=16, n_embd=1024, block 1024, vocab 50304 (GPT-2 medium), AdamW, on a
dp x tp mesh (tp = min(8, devices)). Parameters are built under ``nn.meta_init()`` (shapes and
layouts, no values). Timed: tracing plus the passes (``Graph.compile``), and lowering to
per-rank plans (``scheduler.lower``; one rank's plan, and all ranks' up to 64 devices).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

import flowsys as fs
import scheduler
from flowsys import nn
from flowsys.global_tensor import GlobalValue
from flowsys.models import GPT, GPTConfig

CONFIG = dict(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024)


class TrainStep(fs.Graph):
    def __init__(self, model, opt):
        super().__init__()
        self.model = model
        self.add_optimizer(opt)

    def build(self, idx, targets):
        _, loss = self.model(idx, targets)
        loss.backward()
        return loss


def measure(devices: int) -> dict:
    tp = min(8, devices)
    dp = devices // tp
    placement = fs.placement("cpu", np.arange(devices).reshape(dp, tp).tolist())
    t0 = time.perf_counter()
    with nn.meta_init():
        model = GPT(GPTConfig(**CONFIG))
        model.to_global(placement, GPT.parallel_plan(placement, dp_axis=0, tp_axis=1))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-4)
    t_model = time.perf_counter() - t0
    batch = (fs.sbp.split(0), fs.sbp.broadcast)
    idx = fs.Tensor(GlobalValue(placement, batch, (dp, CONFIG["block_size"]), np.int64, None))
    step = TrainStep(model, opt)
    t0 = time.perf_counter()
    ir = step.compile(idx, idx)
    t_compile = time.perf_counter() - t0
    lowering = scheduler.lower  # one rank's plan: plans are compiled rank by rank
    t0 = time.perf_counter()
    plan_all = lowering(ir) if devices <= 64 else None
    t_lower_all = time.perf_counter() - t0 if plan_all is not None else None
    rank_ops = len(plan_all.ranks[0].ops) if plan_all is not None else None
    return {
        "devices": devices, "mesh": [dp, tp], "params": sum(p.size for p in model.parameters()),
        "graph_nodes": len(ir.nodes), "boxing_nodes": sum(n.kind == "boxing" for n in ir.nodes),
        "build_model_s": t_model, "compile_s": t_compile, "lower_all_ranks_s": t_lower_all,
        "ops_per_rank": rank_ops,
        "plan_bytes": len(plan_all.SerializeToString()) if plan_all is not None else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--out", default="benchmarks/results/bench_compile.json")
    args = ap.parse_args()
    rows = [measure(d) for d in args.devices]
    for r in rows:
        lower = f"{r['lower_all_ranks_s']:.2f} s" if r["lower_all_ranks_s"] is not None else "skipped"
        print(f"{r['devices']:4d} devices (dp {r['mesh'][0]} x tp {r['mesh'][1]}): compile {r['compile_s']:.2f} s, "
              f"{r['graph_nodes']} nodes ({r['boxing_nodes']} boxing); lowering all ranks {lower}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "gpt_compile", "config": CONFIG, "python": platform.python_version(),
                               "results": rows, "target_compile_s_at_64": 5.0}, indent=2))


if __name__ == "__main__":
    main()

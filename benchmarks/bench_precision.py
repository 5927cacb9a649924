"""Mixed precision: the tiny GPT job trained in fp32, bf16 and fp16 for the same steps, on one
device (eager, under ``fs.autocast``) and on dp2 x tp2 (compiled, ``Graph.config.precision``),
and the validation loss each reaches against fp32's (target: within 3%).

    python benchmarks/bench_precision.py [--steps 150] [--layouts one dp2xtp2]
                                         [--out benchmarks/results/bench_precision.json]

Every run is ``flowsys.train.run`` on ``examples/configs/tiny.yaml`` with ``train.precision``
set (dp2 x tp2 with ZeRO 1 and 2 micro-batches on worker threads, as the file says; "one": the
same model on one device). fp16 scales the loss dynamically, so the JSON also records how many
steps it skipped and its final scale. NumPy has no bfloat16/float16 GEMM: a low-precision matmul
computes in float32 and rounds, so the tokens/s recorded here measure correctness's cost on a
CPU, not the speed a GPU gets from the low dtype. The plan's memory per rank for each precision
(parameters, gradients, optimizer state, peak activations) is recorded beside the losses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "examples" / "configs" / "tiny.yaml"
PRECISIONS = ("fp32", "bf16", "fp16")
LAYOUTS = {"one": {"parallel.dp": 1, "parallel.tp": 1, "parallel.zero_stage": 0, "parallel.micro_batches": 1},
           "dp2xtp2": {}}


def run(layout: str, precision: str, steps: int) -> dict:
    from flowsys.train import load_job, run as train  # noqa: PLC0415

    job = load_job(JOB, {**LAYOUTS[layout], "train.steps": steps, "train.log_every": steps,
                         "train.precision": precision})
    t0 = time.perf_counter()
    summary = train(job, log=lambda *_: None)
    return {"val_loss": summary["val_loss"], "final_train_loss": summary["final_train_loss"],
            "tokens_per_s": summary["tokens_per_s"], "seconds": time.perf_counter() - t0,
            **{k: summary[k] for k in ("skipped_steps", "loss_scale") if k in summary}}


def memory(precision: str) -> dict:
    from flowsys.plan import plan_job  # noqa: PLC0415
    from flowsys.train import load_job  # noqa: PLC0415

    rank0 = plan_job(load_job(JOB, {"train.precision": precision}), 4)["ranks"][0]
    return {k: rank0[k] for k in ("parameters", "gradients", "optimizer_state", "peak_activations")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--out", default="benchmarks/results/bench_precision.json")
    args = ap.parse_args()
    results = []
    for layout in args.layouts:
        runs = {}
        for precision in PRECISIONS:
            runs[precision] = run(layout, precision, args.steps)
            print(f"{layout:8} {precision}: val loss {runs[precision]['val_loss']:.4f} "
                  f"({runs[precision]['seconds']:.0f} s)", flush=True)
        base = runs["fp32"]["val_loss"]
        for precision in ("bf16", "fp16"):
            r = runs[precision]
            r["val_loss_over_fp32"] = r["val_loss"] / base
            r["within_3_percent"] = abs(r["val_loss"] / base - 1.0) <= 0.03
        results.append({"layout": layout, "steps": args.steps, "runs": runs})
    out = {"job": str(JOB.relative_to(ROOT)), "results": results,
           "memory_dp2xtp2_rank0_bytes": {p: memory(p) for p in PRECISIONS},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({r["layout"]: {p: round(v["val_loss"], 4) for p, v in r["runs"].items()} for r in results}))


if __name__ == "__main__":
    main()

"""`flowsys plan` against published training runs: Megatron-LM's Table 1 (Narayanan et al. 2021,
arXiv 2104.04473), the configs in ``examples/configs/published/``, on the ``a100-80g`` spec.

    python benchmarks/bench_published.py [--rows 1.7b 18.4b ...] [--out benchmarks/results/bench_published.json]

For each row: the prediction (the actor runtime on a simulated clock), TFLOP/s per GPU counted
as the paper counts them (Eq. 3, full recompute) against the paper's, their ratio, flowsys's own
FLOP count beside it, and how long compiling and simulating took on this machine. The configs
state the paper's precision (fp16 mixed precision: ``train.precision: fp16``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "examples" / "configs" / "published"
# row: (config, GPUs, the paper's TFLOP/s per GPU), Table 1 of arXiv 2104.04473
ROWS = {
    "1.7b": ("megatron_1.7b.yaml", 32, 137.0),
    "3.6b": ("megatron_3.6b.yaml", 64, 138.0),
    "7.5b": ("megatron_7.5b.yaml", 128, 142.0),
    "18.4b": ("megatron_18.4b.yaml", 256, 135.0),
    "39.1b": ("megatron_39.1b.yaml", 512, 138.0),
    "76.1b": ("megatron_76.1b.yaml", 1024, 140.0),
    "145.6b": ("megatron_145.6b.yaml", 1536, 148.0),
    "310.1b": ("megatron_310.1b.yaml", 1920, 155.0),
    "529.6b": ("megatron_529.6b.yaml", 2520, 163.0),
    "1t": ("megatron_1t.yaml", 3072, 163.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--hardware", default="a100-80g")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_published.json"))
    args = ap.parse_args()

    from flowsys.job import load_job  # noqa: PLC0415
    from flowsys.plan import plan_job  # noqa: PLC0415

    rows = []
    for name in args.rows:
        config, gpus, paper = ROWS[name]
        job = load_job(PUBLISHED / config)
        t0 = time.perf_counter()
        summary = plan_job(job, gpus, hardware=args.hardware)
        wall = time.perf_counter() - t0
        pred = summary["prediction"]
        p = job.parallel
        row = dict(row=name, gpus=gpus, layout=dict(dp=p.dp, tp=p.tp, pp=p.pp, micro_batches=p.micro_batches),
                   step_s=pred["step_s"], tflops_per_gpu_eq3=pred["tflops_per_gpu_eq3"],
                   tflops_per_gpu_flowsys=pred["tflops_per_gpu"], paper_tflops_per_gpu=paper,
                   ratio=pred["tflops_per_gpu_eq3"] / paper, bound=pred["bound"], compile_s=summary["compile_s"],
                   lower_s=summary["lower_s"], simulate_s=pred["predict_s"], wall_s=round(wall, 2),
                   simulated_micro_batches=pred["simulated_micro_batches"])
        rows.append(row)
        print(f"{name:>7} on {gpus:>5} GPUs: predicted {row['tflops_per_gpu_eq3']:6.1f} TFLOP/s per GPU (Eq. 3), "
              f"paper {paper:6.1f}: ratio {row['ratio']:.3f}; flowsys's count {row['tflops_per_gpu_flowsys']:6.1f}; "
              f"step {row['step_s']:.2f} s, bound by {row['bound']}; simulated in {row['simulate_s']:.1f} s "
              f"({wall:.1f} s with compiling)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(benchmark="published", hardware=args.hardware, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Every benchmark in one run, one report: ``benchmarks/results.json`` and a markdown table.

    python benchmarks/run_all.py [--quick] [--only step allreduce ...] [--update-readme]

Runs, each in a process of its own (so a crash or a hang in one is reported and the rest go on):

- ``step``: a GPT training step, flowsys against PyTorch (bench_step.py);
- ``ddp``: that GPT on 2 ranks, flowsys dp / ZeRO 3 / tp against torch DDP / FSDP2 / TP (bench_ddp.py);
- ``allreduce``: all-reduce bus bandwidth, flowsys's gRPC transport against gloo (bench_allreduce.py);
- ``compile``: compiling and lowering a GPT-2-medium step for 8 and 64 devices, and the GPT-3
  175B job for 1,024 (bench_compile.py);
- ``overhead``: the runtime's cost per actor firing and of recording traces (bench_overhead.py);
- ``pipeline``: pipeline idle fraction against the bubble formula (bench_pipeline.py);
- ``costmodel``: predicted against measured step times, six layouts, two backends (bench_costmodel.py);
- ``precision``: the tiny GPT job's validation loss in bf16 and fp16 against fp32, one device and
  dp2 x tp2 (bench_precision.py);
- ``published``: ``flowsys plan`` against Megatron-LM's Table 1 rows on a100-80g (bench_published.py).

Each script writes its own JSON under ``benchmarks/results/``; this one gathers them into
``benchmarks/results.json`` (with the machine it ran on) and ``benchmarks/results.md``, and with
``--update-readme`` puts the table into README.md between the ``benchmarks`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"

BENCHMARKS = {  # name: (script, full arguments, --quick arguments)
    "step": ("bench_step.py", ["--steps", "10"], ["--steps", "5"]),
    "ddp": ("bench_ddp.py", ["--rounds", "6"], ["--quick"]),
    "allreduce": ("bench_allreduce.py", ["--procs", "2", "4", "--sizes-mib", "1", "16", "64"],
                  ["--procs", "2", "4", "--sizes-mib", "16", "64", "--iters", "5"]),
    "compile": ("bench_compile.py", ["--devices", "8", "64"], ["--devices", "8", "64"]),
    "overhead": ("bench_overhead.py", [], ["--repeats", "9"]),
    "pipeline": ("bench_pipeline.py", ["--backend", "ray", "--steps", "4"], ["--backend", "ray", "--steps", "3"]),
    "costmodel": ("bench_costmodel.py", [], ["--steps", "7"]),
    "precision": ("bench_precision.py", ["--steps", "150"], ["--steps", "40"]),
    "published": ("bench_published.py", [], ["--rows", "1.7b", "18.4b"]),
}


def run_one(name: str, quick: bool, timeout: float) -> dict:
    script, full, fast = BENCHMARKS[name]
    out = RESULTS / f"{Path(script).stem}.json"
    if out.exists():
        out.unlink()
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *(fast if quick else full), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        ok, tail = done.returncode == 0 and out.exists(), (done.stdout + done.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - t0
    print(f"{name:10} {'ok' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
    if not ok:
        print(tail, flush=True)
        return {"ok": False, "seconds": seconds, "error": tail}
    return {"ok": True, "seconds": seconds, "data": json.loads(out.read_text())}


def rows_for(name: str, data: dict) -> list[tuple[str, str, str, str, str]]:
    """(benchmark, what, flowsys, peer or model, ratio / verdict) rows of the table."""
    if name == "step":
        c = data["config"]
        what = f"GPT {c['n_layer']}x{c['n_embd']}, batch {c['batch']}x{c['block_size']}, AdamW, graph mode"
        blas = {"mkl": ", MKL", "numpy": ""}.get(data.get("flowsys_blas"), "")
        rows = [("step vs PyTorch eager", what + blas, f"{data['flowsys_median_s'] * 1e3:.0f} ms",
                 f"torch {data['torch_median_s'] * 1e3:.0f} ms",
                 f"{data['ratio_flowsys_over_torch']:.2f}x (target <= 1.0x)")]
        if data.get("flowsys_openblas_median_s"):
            rows.append(("step vs PyTorch eager", what + ", NumPy's OpenBLAS",
                         f"{data['flowsys_openblas_median_s'] * 1e3:.0f} ms", f"torch {data['torch_median_s'] * 1e3:.0f} ms",
                         f"{data['ratio_flowsys_openblas_over_torch']:.2f}x"))
        what += blas
        if data.get("torch_compile_median_s"):
            rows.append(("step vs torch.compile", what, f"{data['flowsys_median_s'] * 1e3:.0f} ms",
                         f"torch.compile {data['torch_compile_median_s'] * 1e3:.0f} ms",
                         f"{data['ratio_flowsys_over_torch_compile']:.2f}x"))
        return rows
    if name == "ddp":
        c, r, cfg = data["configs"], data["ratios"], data["config"]
        model = f"GPT {cfg['n_layer']}x{cfg['n_embd']}, batch {cfg['global_batch']}x{cfg['block_size']}"
        rows = []
        for key, what, peer in (("flowsys_dp_ray_over_ddp", "dp2, ray backend", "DDP"),
                                ("flowsys_dp_local_over_ddp", "dp2, local backend", "DDP"),
                                ("flowsys_zero3_ray_over_fsdp2", "ZeRO 3 dp2, ray backend", "FSDP2"),
                                ("flowsys_tp_ray_over_torch_tp", "tp2, ray backend", "torch TP")):
            num, den = r[key]["numerator"], r[key]["denominator"]
            target = f" (target <= {r[key]['target']}x)" if r[key]["target"] is not None else ""
            rows.append((f"2 ranks vs {peer}", f"{model}, {what}",
                         f"{c[num]['median_ms']:.0f} ms (IQR {c[num]['iqr_ms']:.0f})",
                         f"{peer} {c[den]['median_ms']:.0f} ms (IQR {c[den]['iqr_ms']:.0f})",
                         f"{r[key]['value']:.2f}x{target}"))
        return rows
    if name == "allreduce":
        return [("all-reduce vs gloo", f"{r['processes']} processes, {r['size_mib']} MiB",
                 f"{r['flowsys_gibps']:.2f} GiB/s", f"gloo {r['gloo_gibps']:.2f} GiB/s",
                 f"{r['ratio_flowsys_over_gloo']:.2f}x" + (" (target >= 1x)" if r["size_mib"] >= 16 else ""))
                for r in data["results"]]
    if name == "compile":
        rows = [("compile", f"GPT-2 medium on {r['devices']} devices", f"{r['compile_s']:.2f} s",
                 f"lower all ranks {r['lower_all_ranks_s']:.1f} s", "target < 5 s at 64" if r["devices"] == 64 else "")
                for r in data["results"]]
        g = data.get("gpt3")
        if g:
            rows.append(("compile + lower", f"GPT-3 175B on {g['devices']} devices, {g['templates']} distinct plans",
                         f"{g['compile_and_lower_distinct_s']:.1f} s", f"every rank's plan +{g['lower_all_ranks_s']:.1f} s",
                         "target < 30 s"))
        return rows
    if name == "overhead":
        out = []
        for r in data["results"]:
            out.append(("runtime overhead", f"per actor firing, {r['backend']} backend",
                        f"{r['per_firing_firing_us']:.1f} us", f"empty step {r['per_firing_empty_step_ms']:.2f} ms",
                        "target < 50 us"))
            out.append(("trace recording", f"dp2 x tp2 tiny GPT step, {r['backend']} backend",
                        f"{r['recording_cost_pct']:+.1f} %", f"step {r['recording_plain_step_ms']:.0f} ms",
                        "target < 5 %"))
        return out
    if name == "pipeline":
        return [("pipeline idle", f"{r['stages']} stages, {r['micro_batches']} micro-batches, {data['backend']}",
                 "idle " + ", ".join(f"{x:.2f}" for x in r["idle_measured"]), f"bubble {r['bubble_model']:.3f}",
                 f"worst {r['max_error_pp']} pp (target 10 pp)") for r in data["results"]]
    if name == "precision":
        return [("mixed precision", f"tiny GPT job, {r['layout']}, {r['steps']} steps, {p}",
                 f"val loss {v['val_loss']:.4f}", f"fp32 {r['runs']['fp32']['val_loss']:.4f}",
                 f"{v['val_loss_over_fp32']:.3f} (target within 3%)")
                for r in data["results"] for p, v in r["runs"].items() if p != "fp32"]
    if name == "published":
        return [("plan vs published", f"Megatron-LM {r['row']} on {r['gpus']} GPUs (Table 1), {data['hardware']}",
                 f"{r['tflops_per_gpu_eq3']:.1f} TFLOP/s per GPU (Eq. 3), simulated in {r['simulate_s']:.1f} s",
                 f"paper {r['paper_tflops_per_gpu']:.0f}", f"{r['ratio']:.2f} (target 0.75-1.25)")
                for r in data["rows"]]
    if name == "costmodel":
        return [("cost model", f"{r['layout']}, {r['backend']} backend", f"measured {r['measured_ms']:.1f} ms",
                 f"predicted {r['predicted_ms']:.1f} ms", f"{r['ratio']:.2f} (target 0.75-1.25)")
                for r in data["results"]]
    return []


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"Measured {report['date']} on {m['platform']}, {m['cpus']} CPU cores, Python {m['python']} "
             f"(`python benchmarks/run_all.py{' --quick' if report['quick'] else ''}`, {report['seconds']:.0f} s).",
             "", "| benchmark | case | flowsys | peer / model | ratio |", "| --- | --- | --- | --- | --- |"]
    for name, entry in report["benchmarks"].items():
        if not entry["ok"]:
            lines.append(f"| {name} | failed: see benchmarks/results.json | | | |")
            continue
        lines.extend("| " + " | ".join(row) + " |" for row in rows_for(name, entry["data"]))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a few minutes)")
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds per benchmark")
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "processor": platform.processor() or platform.machine()},
              "benchmarks": {name: run_one(name, args.quick, args.timeout) for name in args.only}}
    report["seconds"] = time.perf_counter() - t0
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(report, indent=2))
    md = table(report)
    (ROOT / "benchmarks" / "results.md").write_text(md)
    print(md)
    if args.update_readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if START not in text or END not in text:
            print(f"README.md has no {START} ... {END} markers: table not inserted", file=sys.stderr)
            return 1
        head, rest = text.split(START, 1)
        readme.write_text(head + START + "\n" + md + END + rest.split(END, 1)[1])
        print("README.md updated")
    return 0 if all(e["ok"] for e in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

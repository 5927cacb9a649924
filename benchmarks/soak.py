"""Soak: a checkpointing dp2 x tp2 job on a local Ray cluster for a long time, one worker process
killed every few minutes; it must lose no step and leak nothing.

    python benchmarks/soak.py [--minutes 30] [--kill-every 300] [--sample-every 20]
                              [--out benchmarks/results/soak.json]

The job is ``examples/configs/tiny.yaml`` (dp2 x tp2, ZeRO 1, 2 micro-batches) with enough steps to
outlast the run, a checkpoint every 5 steps and ``flowsys launch --nodes 4 --max-restarts`` high
enough for every kill. Every ``--kill-every`` seconds one of the job's own Ray worker processes
(a descendant of the launcher, found by its command line) gets SIGKILL; at the end the driver
gets SIGTERM, which saves a checkpoint after the current step and exits (preemption).

Sampled every ``--sample-every`` seconds: the resident memory and open files of the driver and of
the live workers (summed), and the ``fsys_`` segments in ``/dev/shm``. Reported: the samples, the
drift of each (the last fifth's median against the second fifth's, so that start-up is left
out), the kills and restarts, and whether the steps in the metrics log are complete (after each
restart the job goes on from its last checkpoint, so each step from 1 to the last appears, some
twice, none missing).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowsys.launch import cmdline, descendants  # noqa: E402


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def segments() -> int:
    return sum(n.startswith("fsys_") for n in os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else 0


def drift(values: list[float]) -> float | None:
    """The last fifth's median over the second fifth's (1.0: flat)."""
    n = len(values)
    if n < 10:
        return None
    second, last = values[n // 5: 2 * n // 5], values[4 * n // 5:]
    base = statistics.median(second)
    return statistics.median(last) / base if base else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--kill-every", type=float, default=300.0)
    ap.add_argument("--sample-every", type=float, default=20.0)
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flowsys-soak-"))
    metrics = work / "metrics.jsonl"
    kills_planned = int(args.minutes * 60 // args.kill_every) + 1
    cmd = [sys.executable, "-m", "flowsys.cli", "launch", "--nodes", "4", "--max-restarts", str(kills_planned + 2),
           str(ROOT / "flowsys" / "cli.py"), "train", str(ROOT / "examples" / "configs" / "tiny.yaml"),
           "train.steps=1000000", "train.log_every=50", "train.eval_batches=1", f"train.metrics={metrics}",
           f"checkpoint.dir={work / 'ckpt'}", "checkpoint.every=5", "checkpoint.keep=3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    log = open(work / "job.log", "w")  # noqa: SIM115
    job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    t0 = time.monotonic()
    samples, kills = [], []
    next_kill, next_sample = t0 + args.kill_every, t0
    try:
        while time.monotonic() - t0 < args.minutes * 60 and job.poll() is None:
            now = time.monotonic()
            procs = descendants(job.pid)
            driver = [p for p in procs if "flowsys/cli.py" in cmdline(p) and "RayWorker" not in cmdline(p)]
            workers = [p for p in procs if "RayWorker" in cmdline(p)]
            if now >= next_sample:
                steps = metrics.read_text().count("\n") if metrics.exists() else 0
                samples.append({"t_s": round(now - t0, 1), "steps_logged": steps,
                                "driver_rss_mib": sum(rss_bytes(p) for p in driver) / 2**20,
                                "workers_rss_mib": sum(rss_bytes(p) for p in workers) / 2**20,
                                "workers": len(workers),
                                "open_files": sum(open_files(p) for p in driver + workers),
                                "shm_segments": segments()})
                next_sample = now + args.sample_every
            if now >= next_kill and workers:
                victim = workers[len(kills) % len(workers)]
                os.kill(victim, signal.SIGKILL)
                kills.append({"t_s": round(now - t0, 1), "pid": victim})
                next_kill = now + args.kill_every
            time.sleep(1.0)
        for p in descendants(job.pid):
            if "flowsys/cli.py" in cmdline(p):
                os.kill(p, signal.SIGTERM)  # preemption: save after this step, exit
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    seen = sorted({r["step"] for r in rows})
    text = (work / "job.log").read_text()
    result = {
        "minutes": args.minutes, "kill_every_s": args.kill_every, "kills": kills,
        "restarts_logged": text.count(" restart "), "exit_code": job.returncode,
        "last_step": seen[-1] if seen else 0, "steps_complete": seen == list(range(1, len(seen) + 1)),
        "saved_on_sigterm": "SIGTERM: stopped after step" in text,
        "drift": {k: drift([s[k] for s in samples]) for k in ("driver_rss_mib", "workers_rss_mib", "open_files")},
        "shm_segments_max": max((s["shm_segments"] for s in samples), default=0),
        "samples": samples, "log_tail": text[-3000:], "work_dir": str(work)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "log_tail")}, indent=2))


if __name__ == "__main__":
    main()

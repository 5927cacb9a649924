"""All-reduce bus bandwidth: flowsys's gRPC transport against torch.distributed's gloo backend.

    python benchmarks/bench_allreduce.py [--procs 2 4] [--sizes-mib 1 16 64] [--warmup 3] [--iters 10]
                                         [--out benchmarks/results/bench_allreduce.json]

For each process count, one set of processes (multiprocessing "spawn", all on this host) runs,
size by size, the same float32 sum three ways: flowsys's ring all-reduce over a
``comm.GrpcCommunicator`` (the default same-host path, through shared memory), the same over the
gRPC stream only (``shared_memory=False``, the path ranks on different hosts take), and
``torch.distributed.all_reduce`` with gloo. Every timed iteration starts after a barrier; an
iteration's time is the slowest rank's, and the median over iterations is reported as bus
bandwidth, NCCL-tests' definition: busbw = 2(n-1)/n * bytes / time. The inputs are small
integers, so the sums are exact and the first result of every path is compared with NumPy's.
The JSON holds per (processes, size) each bandwidth in GiB/s and the ratio flowsys / gloo
(higher is better).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import secrets
import socket
import statistics
import time
from pathlib import Path

import numpy as np

PATHS = {"flowsys": True, "flowsys_stream": False}  # name -> GrpcCommunicator(shared_memory=...)


def make_input(rank: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng([rank, nbytes]).integers(-64, 64, nbytes // 4).astype(np.float32)


def timed(op, barrier, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        op()
    times = []
    for _ in range(iters):
        barrier()
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return times


def worker(rank: int, n: int, args: argparse.Namespace, secret: str, store_port: int,
           addresses_out: mp.Queue, addresses_in: mp.Queue, results: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    from comm import GrpcCommunicator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{store_port}", rank=rank, world_size=n)
    comms = {name: GrpcCommunicator(rank, n, secret, shared_memory=shm) for name, shm in PATHS.items()}
    addresses_out.put((rank, {name: c.address for name, c in comms.items()}))
    addresses = addresses_in.get()
    for name, c in comms.items():
        c.connect(addresses[name])
    try:
        for mib in args.sizes_mib:
            nbytes = mib << 20
            x = make_input(rank, nbytes)
            expected = np.sum([make_input(r, nbytes) for r in range(n)], axis=0, dtype=np.float32)
            for name, c in comms.items():
                correct = bool(np.array_equal(c.all_reduce(x), expected))
                times = timed(lambda: c.all_reduce(x), c.barrier, args.warmup, args.iters)
                results.put((rank, mib, name, correct, times))
            t = torch.from_numpy(x.copy())
            dist.all_reduce(t)
            correct = bool(np.array_equal(t.numpy(), expected))
            times = timed(lambda: dist.all_reduce(t), dist.barrier, args.warmup, args.iters)
            results.put((rank, mib, "gloo", correct, times))
    finally:
        for c in comms.values():
            c.close()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")
    addresses_out, results = ctx.Queue(), ctx.Queue()
    addresses_in = [ctx.Queue() for _ in range(n)]
    secret, port = secrets.token_hex(16), free_port()
    procs = [ctx.Process(target=worker, args=(r, n, args, secret, port, addresses_out, addresses_in[r], results))
             for r in range(n)]
    for p in procs:
        p.start()
    gathered = dict(addresses_out.get(timeout=120) for _ in range(n))
    for q in addresses_in:
        q.put({name: [gathered[r][name] for r in range(n)] for name in PATHS})
    names = [*PATHS, "gloo"]
    per_rank: dict[tuple[int, str], list] = {}
    for _ in range(n * len(args.sizes_mib) * len(names)):
        rank, mib, name, correct, times = results.get(timeout=600)
        per_rank.setdefault((mib, name), []).append((correct, times))
    for p in procs:
        p.join(60)
    rows = []
    for mib in args.sizes_mib:
        row = {"processes": n, "size_mib": mib}
        for name in names:
            ranks = per_rank[(mib, name)]
            slowest = [max(ts) for ts in zip(*(times for _, times in ranks))]
            median = statistics.median(slowest)
            row[f"{name}_median_s"] = median
            row[f"{name}_gibps"] = 2 * (n - 1) / n * (mib << 20) / median / 2**30
            row[f"{name}_correct"] = all(correct for correct, _ in ranks)
        row["ratio_flowsys_over_gloo"] = row["flowsys_gibps"] / row["gloo_gibps"]
        row["ratio_flowsys_stream_over_gloo"] = row["flowsys_stream_gibps"] / row["gloo_gibps"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/bench_allreduce.json")
    args = ap.parse_args()

    import grpc
    import torch

    rows = [row for n in args.procs for row in run(n, args)]
    result = {
        "benchmark": "allreduce_busbw",
        "definition": "busbw = 2(n-1)/n * bytes / median over iterations of the slowest rank's time; GiB/s",
        "dtype": "float32", "warmup": args.warmup, "iters": args.iters,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "grpc": grpc.__version__, "numpy": np.__version__},
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'procs':>5} {'MiB':>5} {'flowsys':>9} {'stream':>9} {'gloo':>9} {'ratio':>7} {'stream':>7}  correct")
    for r in rows:
        correct = all(r[f"{name}_correct"] for name in (*PATHS, "gloo"))
        print(f"{r['processes']:>5} {r['size_mib']:>5} {r['flowsys_gibps']:>9.2f} {r['flowsys_stream_gibps']:>9.2f} "
              f"{r['gloo_gibps']:>9.2f} {r['ratio_flowsys_over_gloo']:>6.2f}x "
              f"{r['ratio_flowsys_stream_over_gloo']:>6.2f}x  {correct}")
    print(f"(GiB/s of bus bandwidth; flowsys = same-host shared memory, stream = gRPC only; written to {out})")


if __name__ == "__main__":
    main()

"""End-to-end check of the NCCL transport on this machine's GPUs, in well under three minutes.

    python benchmarks/gpu_smoke.py [--size-mib 64] [--warmup 5] [--iters 20] [--timeout 150]
                                   [--out benchmarks/results/gpu_smoke.json]

Reports the GPUs (``cupy.cuda.runtime.getDeviceProperties``) and the CuPy / NCCL / CUDA
versions, then runs ``comm.NcclCommunicator`` in one spawned process per visible GPU (world
size = the number of GPUs). Every rank checks all_reduce, all_gather (uneven pieces),
reduce_scatter (uneven split), all_to_all, broadcast and, with two GPUs or more, send/recv
around a ring against NumPy (small integers, so every sum is exact), then times a float32
all-reduce of ``--size-mib`` MiB. An iteration's time is the slowest rank's wall time of one
``all_reduce`` call (which returns once the GPU is done); the median over ``--iters`` is
reported as NCCL-tests do: algbw = bytes / time, busbw = 2(n-1)/n * algbw (0 on one GPU, where
algbw is the figure to read), in GiB/s.

Exits 1 if a check fails or a rank errs. Without CuPy or a GPU it prints why, writes
``{"skipped": reason}`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: python benchmarks/...

from comm import CommError  # noqa: E402
from comm import nccl  # noqa: E402


def _values(rank: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng([2024, rank]).integers(-8, 8, size=shape).astype(np.float32)


def _smoke_rank(comm, size_mib: int, warmup: int, iters: int) -> dict:
    """One rank: every collective against NumPy, then the timed all-reduce (module level: spawnable)."""
    xp, n, r = comm.xp, comm.world_size, comm.rank
    xs = [_values(j, (2 * n + 1, 6)) for j in range(n)]  # 2n+1 rows: an uneven split over n ranks
    pieces = [_values(100 + j, (3, j + 1)) for j in range(n)]
    errors: dict[str, float] = {}

    def check(name, got, want):
        got = got.get() if hasattr(got, "get") else got  # CuPy to NumPy
        same = got.shape == want.shape and got.dtype == want.dtype
        errors[name] = float(np.max(np.abs(got - want), initial=0.0)) if same else float("inf")

    x = xp.asarray(xs[r])
    check("all_reduce", comm.all_reduce(x), sum(xs))
    check("all_gather", comm.all_gather(xp.asarray(pieces[r]), axis=1), np.concatenate(pieces, axis=1))
    check("reduce_scatter", comm.reduce_scatter(x, axis=0), np.array_split(sum(xs), n, axis=0)[r])
    check("all_to_all", comm.all_to_all(x, split_axis=0, concat_axis=1),
          np.concatenate([np.array_split(xs[j], n, axis=0)[r] for j in range(n)], axis=1))
    check("broadcast", comm.broadcast(x if r == 0 else None, root=0), xs[0])
    if n >= 2:  # a ring that rank 0 opens by sending: NCCL sends complete only when received
        if r == 0:
            comm.send(x, 1)
            got = comm.recv(n - 1)
        else:
            got = comm.recv(r - 1)
            comm.send(x, (r + 1) % n)
        check("send_recv", got, xs[(r - 1) % n])
    comm.barrier()

    buf = xp.ones(size_mib * 2**20 // 4, xp.float32)
    check("all_reduce_big", comm.all_reduce(buf)[:1024], np.full(1024, n, np.float32))
    for _ in range(warmup):
        comm.all_reduce(buf)
    times = []
    for _ in range(iters):
        comm.barrier()
        start = time.perf_counter()
        comm.all_reduce(buf)
        times.append(time.perf_counter() - start)
    return {"errors": errors, "times": times}


def _gpus() -> tuple[list[dict], dict]:
    import cupy
    from cupy.cuda import nccl as cupy_nccl
    from cupy.cuda import runtime
    gpus = []
    for i in range(runtime.getDeviceCount()):
        props = runtime.getDeviceProperties(i)
        name = props.get("name", b"?")
        gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                     "memory_gib": round(props.get("totalGlobalMem", 0) / 2**30, 1),
                     "compute_capability": f"{props.get('major')}.{props.get('minor')}",
                     "multiprocessors": props.get("multiProcessorCount")})
    versions = {"cupy": cupy.__version__, "nccl": cupy_nccl.get_version(),
                "cuda_runtime": runtime.runtimeGetVersion(), "cuda_driver": runtime.driverGetVersion()}
    return gpus, versions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds the ranks may take in all")
    ap.add_argument("--out", default="benchmarks/results/gpu_smoke.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    reason = nccl.why_unavailable()
    if reason:
        print(f"gpu_smoke skipped: {reason}")
        out.write_text(json.dumps({"skipped": reason}, indent=2))
        return 0

    began = time.perf_counter()
    gpus, versions = _gpus()
    n = len(gpus)
    for g in gpus:
        print(f"GPU {g['index']}: {g['name']}, {g['memory_gib']} GiB, sm_{g['compute_capability']}, "
              f"{g['multiprocessors']} SMs")
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))
    result: dict = {"host": platform.node(), "gpus": gpus, "versions": versions, "world_size": n}
    try:
        ranks = nccl.run_ranks(_smoke_rank, n, args.size_mib, args.warmup, args.iters, timeout=args.timeout)
    except CommError as e:
        print(f"FAILED: {e}")
        result.update(error=str(e), seconds=round(time.perf_counter() - began, 1))
        out.write_text(json.dumps(result, indent=2))
        return 1

    checks = {name: max(rank["errors"][name] for rank in ranks) for name in ranks[0]["errors"]}
    slowest = [max(per_iter) for per_iter in zip(*(rank["times"] for rank in ranks))]
    median = statistics.median(slowest)
    nbytes = args.size_mib * 2**20
    algbw = nbytes / median / 2**30
    result.update(
        checks={name: {"ok": err == 0.0, "max_abs_error": err} for name, err in checks.items()},
        all_reduce={"mib": args.size_mib, "dtype": "float32", "iters": args.iters, "median_s": median,
                    "algbw_gib_s": round(algbw, 2), "busbw_gib_s": round(algbw * 2 * (n - 1) / n, 2)},
        seconds=round(time.perf_counter() - began, 1))
    out.write_text(json.dumps(result, indent=2))
    failed = [name for name, err in checks.items() if err != 0.0]
    for name, err in checks.items():
        print(f"{name:16s} {'ok' if err == 0.0 else f'WRONG (max abs error {err})'}")
    print(f"all_reduce {args.size_mib} MiB over {n} GPU(s): {median * 1e3:.3f} ms, "
          f"algbw {result['all_reduce']['algbw_gib_s']} GiB/s, busbw {result['all_reduce']['busbw_gib_s']} GiB/s "
          f"({result['seconds']} s in all; written to {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

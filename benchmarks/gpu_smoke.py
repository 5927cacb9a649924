"""End-to-end check of flowsys on this machine's GPUs, in under five minutes: the NCCL transport,
then the tiny GPT trained on one GPU against PyTorch.

    python benchmarks/gpu_smoke.py [--size-mib 64] [--warmup 5] [--iters 20] [--timeout 150]
                                   [--gpt-steps 20] [--out benchmarks/results/gpu_smoke.json]

Runs from a source tree (``PYTHONPATH=.`` or ``python benchmarks/gpu_smoke.py`` in the checkout)
on the local backend: no Ray is needed.

Reports the GPUs (``cupy.cuda.runtime.getDeviceProperties``) and the CuPy / NCCL / CUDA
versions, then runs ``comm.NcclCommunicator`` in one spawned process per visible GPU (world
size = the number of GPUs). Every rank checks all_reduce, all_gather (uneven pieces),
reduce_scatter (uneven split), all_to_all, broadcast and, with two GPUs or more, send/recv
around a ring against NumPy (small integers, so every sum is exact), then times a float32
all-reduce of ``--size-mib`` MiB. An iteration's time is the slowest rank's wall time of one
``all_reduce`` call (which returns once the GPU is done); the median over ``--iters`` is
reported as NCCL-tests do: algbw = bytes / time, busbw = 2(n-1)/n * algbw (0 on one GPU, where
algbw is the figure to read), in GiB/s.

The GPT (``GPT_CONFIG``, batch 8) is compiled for ``fs.placement("cuda", [0])`` with
``step.config.precision = "fp16"``: its kernels run on CuPy, its parameters stay on the GPU in
the worker, a one-rank NCCL communicator is built for the plan (the local backend's NCCL mode),
and the loss is scaled dynamically. PyTorch trains the same weights on the same batches with
``torch.autocast(float16)`` and ``GradScaler``; the losses must agree within ``--rtol`` (1e-2) at
every one of ``--gpt-steps`` steps, and the JSON records both median step times and their ratio.
Where PyTorch has no CUDA here, the reference is the same flowsys step on ``cpu`` (itself checked
against PyTorch by the test suite), and the JSON says so.

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


GPT_CONFIG = dict(vocab_size=1024, block_size=128, n_layer=4, n_head=4, n_embd=256, dropout=0.0, bias=True)
GPT_BATCH = 8
LR, BETAS, WEIGHT_DECAY = 3e-4, (0.9, 0.95), 0.1


def _batches(steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    shape = (GPT_BATCH, GPT_CONFIG["block_size"])
    return [(rng.integers(0, GPT_CONFIG["vocab_size"], shape), rng.integers(0, GPT_CONFIG["vocab_size"], shape))
            for _ in range(steps)]


def _flowsys_gpt(device: str, weights: dict | None, steps: int) -> tuple[list[float], list[float], dict]:
    """The tiny GPT trained ``steps`` steps in fp16 on ``device`` (rank 0): losses, seconds per
    step (the loss read back each step, so a step's time includes its GPU work) and the weights
    it started from."""
    import flowsys as fs
    from flowsys.models import GPT, GPTConfig

    fs.manual_seed(0)
    model = GPT(GPTConfig(**GPT_CONFIG))
    if weights is None:
        weights = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    else:
        model.load_state_dict(weights)
    place = fs.placement(device, [0])
    model.to_global(place, fs.sbp.broadcast)
    opt = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS)

    class TrainStep(fs.Graph):
        def __init__(self):
            super().__init__()
            self.model = model
            self.add_optimizer(opt)
            self.config.precision = "fp16"

        def build(self, idx, targets):
            _, loss = self.model(idx, targets)
            loss.backward()
            return loss

    step = TrainStep()
    losses, times = [], []
    for idx, tgt in _batches(steps):
        i = fs.tensor(idx).to_global(place, fs.sbp.broadcast)
        t = fs.tensor(tgt).to_global(place, fs.sbp.broadcast)
        start = time.perf_counter()
        losses.append(float(step(i, t).item()))
        times.append(time.perf_counter() - start)
    return losses, times, weights


def _torch_gpt(weights: dict, steps: int) -> tuple[list[float], list[float]]:
    """PyTorch on CUDA from the same weights: autocast float16 and GradScaler, AdamW with the
    same groups (decay on the matrices, none on biases and norms)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_step import torch_gpt

    ref = torch_gpt(GPT_CONFIG)
    ref.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    ref = ref.cuda()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=LR, betas=BETAS)
    scaler = torch.amp.GradScaler("cuda")
    losses, times = [], []
    for idx, tgt in _batches(steps):
        i, t = torch.from_numpy(idx).cuda(), torch.from_numpy(tgt).cuda()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            _, loss = ref(i, t)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.item()))
        times.append(time.perf_counter() - start)
    return losses, times


def _gpt_check(steps: int, rtol: float) -> dict:
    """flowsys on one GPU against PyTorch CUDA (or, without it, flowsys on the CPU)."""
    losses, times, weights = _flowsys_gpt("cuda", None, steps)
    try:
        import torch
        reference = "torch cuda" if torch.cuda.is_available() else ""
    except ImportError:
        reference = ""
    if reference:
        ref_losses, ref_times = _torch_gpt(weights, steps)
    else:
        reference = "flowsys cpu (PyTorch has no CUDA here)"
        ref_losses, ref_times, _ = _flowsys_gpt("cpu", weights, steps)
    rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
    steady = slice(min(5, steps - 1), None)  # the first steps compile and warm the allocator
    fs_ms, ref_ms = (statistics.median(t[steady]) * 1e3 for t in (times, ref_times))
    return {"config": {**GPT_CONFIG, "batch": GPT_BATCH, "precision": "fp16", "optimizer": "AdamW"},
            "steps": steps, "reference": reference, "rtol": rtol, "ok": max(rel) <= rtol,
            "max_rel_diff": max(rel), "losses": losses, "reference_losses": ref_losses,
            "step_ms": round(fs_ms, 3), "reference_step_ms": round(ref_ms, 3), "ratio": round(fs_ms / ref_ms, 3)}


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
    ap.add_argument("--gpt-steps", type=int, default=20, help="GPT training steps on one GPU (0: skip)")
    ap.add_argument("--rtol", type=float, default=1e-2, help="the losses' tolerance against the reference")
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
          f"algbw {result['all_reduce']['algbw_gib_s']} GiB/s, busbw {result['all_reduce']['busbw_gib_s']} GiB/s",
          flush=True)
    if args.gpt_steps > 0:
        try:
            gpt = _gpt_check(args.gpt_steps, args.rtol)
        except Exception as e:  # noqa: BLE001 - reported, with where it came from
            import traceback
            gpt = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(gpt["traceback"])
        result["gpt"] = gpt
        if not gpt["ok"]:
            failed.append("gpt")
        if "error" in gpt:
            print(f"gpt: FAILED: {gpt['error']}")
        else:
            print(f"gpt fp16, {gpt['steps']} steps on one GPU against {gpt['reference']}: losses "
                  f"{'agree' if gpt['ok'] else 'DIFFER'} (max relative difference {gpt['max_rel_diff']:.2e}, "
                  f"rtol {gpt['rtol']:g}); step {gpt['step_ms']:.2f} ms vs {gpt['reference_step_ms']:.2f} ms "
                  f"(ratio {gpt['ratio']:.2f})")
    result["seconds"] = round(time.perf_counter() - began, 1)
    out.write_text(json.dumps(result, indent=2))
    print(f"{result['seconds']} s in all; written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

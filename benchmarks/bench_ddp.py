"""Two-rank training of the bench_step GPT: flowsys's data parallel, ZeRO 3 and tensor parallel
against torch's DistributedDataParallel, FSDP2 and tensor parallelism, in one run.

    python benchmarks/bench_ddp.py [--rounds 6] [--block 4] [--quick]
                                   [--out benchmarks/results/bench_ddp.json]

The model is ``bench_step``'s GPT (n_layer=4, n_head=4, n_embd=256, block_size=128, vocab 4096,
no dropout, biases) at global batch 8, one training step being forward, backward and AdamW
(lr 3e-4, betas (0.9, 0.95), weight decay 0.1 on every parameter). Every configuration starts
from the same weights (flowsys's seed-0 GPT, loaded into torch as bench_step does) and trains
on the same batch, so their losses agree step by step:

- ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` over gloo, batch 4 per process;
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on each block, then the model, over gloo;
- ``torch_tp``: ``parallelize_module`` with ``ColwiseParallel`` on ``mlp.c_fc`` and
  ``attn.c_attn`` and ``RowwiseParallel`` on both ``c_proj`` (Megatron's plan; the fused
  ``c_attn`` rows are reordered so each rank's column shard holds the query, key and value rows
  of its own heads, and attention runs on its local heads), batch replicated;
- ``flowsys_dp_local``: data parallel, dp=2, on ``fs.init(backend="local")`` (worker threads);
- ``flowsys_dp_ray``, ``flowsys_zero3_ray`` (dp=2, ``step.config.zero_stage = 3``) and
  ``flowsys_tp_ray`` (tp=2, ``GPT.parallel_plan``'s Megatron plan) on ``fs.init(backend="ray")``.

Every torch rank runs one thread (``torch.set_num_threads(1)``); flowsys's ranks take their
share of the cores (``flowsys.device.share_cores``), one each on two cores.

How it is timed. The three torch configurations live in one persistent group of two processes
(a gloo process group; one model per configuration); the local-backend flowsys step lives in a
process of its own (``fs.init`` holds one backend per process); the Ray steps run in this
process, the driver. The children step on command: this process writes one JSON line per block
to their stdin and reads one JSON line back (per-step times and losses); no pickle anywhere.
Configurations take turns in blocks of ``--block`` timed steps, each block after one untimed
step, for ``--rounds`` rounds, so a change in the machine's speed (shared cores) weighs on all
alike. A torch step's time is the slower rank's. The JSON holds per configuration the median,
min/max and quartiles of the step time, the ratios issue #15 targets (flowsys dp on Ray / DDP
<= 1.1, ZeRO 3 on Ray / FSDP2 <= 0.9, tp on Ray / torch TP <= 0.9; and dp local / DDP), and
the first losses of every configuration with whether they agree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import CONFIG, torch_gpt  # noqa: E402

GLOBAL_BATCH = 8
RANKS = 2
ADAMW = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
TORCH_CONFIGS = ("ddp", "fsdp2", "torch_tp")
FLOWSYS_CONFIGS = {  # name: (layout, backend)
    "flowsys_dp_local": ("dp", "local"),
    "flowsys_dp_ray": ("dp", "ray"),
    "flowsys_zero3_ray": ("zero3", "ray"),
    "flowsys_tp_ray": ("tp", "ray"),
}
RATIOS = {  # name: (numerator, denominator, target or None)
    "flowsys_dp_ray_over_ddp": ("flowsys_dp_ray", "ddp", 1.1),
    "flowsys_dp_local_over_ddp": ("flowsys_dp_local", "ddp", None),
    "flowsys_zero3_ray_over_fsdp2": ("flowsys_zero3_ray", "fsdp2", 0.9),
    "flowsys_tp_ray_over_torch_tp": ("flowsys_tp_ray", "torch_tp", 0.9),
}
TORCH_TP_MODULES = {"mlp.c_fc": "colwise", "mlp.c_proj": "rowwise", "attn.c_attn": "colwise", "attn.c_proj": "rowwise"}
RAY_OPTIONS = dict(num_cpus=os.cpu_count(), object_store_memory=100 << 20)
FIRST_LOSSES = 3


def windows():
    """The data: windows of the standard library's bytes, batches addressed by step
    (``flowsys.datasource``: a vocabulary module, so the torch processes read the same samples
    without the flowsys user API)."""
    from flowsys.datasource import Windows

    return Windows(max_bytes=1 << 20, batch_size=GLOBAL_BATCH, block_size=CONFIG["block_size"])


def batch() -> tuple[np.ndarray, np.ndarray]:
    """The global batch every configuration trains on, every step (step 0's windows): (idx,
    targets), each (8, 128) int64."""
    spec, box = windows(), ((0, GLOBAL_BATCH), (0, CONFIG["block_size"]))
    return spec.read("x", 0, box), spec.read("y", 0, box)


def flowsys_model(meta: bool = False):
    """The seed-0 GPT; with ``meta``, built without values on the driver (its workers create
    their shards: the same values)."""
    import flowsys as fs

    fs.manual_seed(0)
    if not meta:
        return fs.models.GPT(fs.models.GPTConfig(**CONFIG))
    with fs.nn.meta_init():
        return fs.models.GPT(fs.models.GPTConfig(**CONFIG))


# ----------------------------------------------------------------------------------- flowsys
def flowsys_step(layout: str, backend: str):
    """A compiled flowsys training step of the GPT on 2 ranks laid out as ``layout`` ("dp",
    "zero3" or "tp") on ``backend`` ("local" or "ray", started here unless it is the current
    one); returns ``step(i) -> loss`` running training step ``i``. The driver holds no values:
    the workers create the parameters and read their rows of the batch themselves (the same
    batch every step, as the torch configurations train on); a step's request is its number."""
    import flowsys as fs
    from flowsys import runtime

    current = runtime.current()
    if current is None or current.name != backend:
        fs.init(backend=backend, **(RAY_OPTIONS if backend == "ray" else {}))
    place = fs.placement("cpu", list(range(RANKS)))
    data_parallel = layout in ("dp", "zero3")
    model = flowsys_model(meta=True)
    model.to_global(place, fs.models.GPT.parallel_plan(place, dp_axis=0 if data_parallel else None,
                                                       tp_axis=None if data_parallel else 0))
    opt = fs.optim.AdamW(model.parameters(), **ADAMW)

    class TrainStep(fs.Graph):
        def __init__(self):
            super().__init__()
            self.model = model
            self.add_optimizer(opt)
            self.config.zero_stage = 3 if layout == "zero3" else 0

        def build(self, idx, targets):
            _, loss = self.model(idx, targets)
            loss.backward()
            return loss

    train_step = TrainStep()
    sbp = (fs.sbp.split(0),) if data_parallel else (fs.sbp.broadcast,)
    from flowsys.data import Batches

    batches = Batches(windows())

    def step(i: int) -> float:
        return float(train_step(*batches.at(0, place, sbp)))

    return step


# ------------------------------------------------------------------------------------- torch
def torch_steps(rank: int, weights: dict) -> dict:
    """The three torch configurations on this rank of the gloo group: name -> ``step(i) ->
    this rank's loss``."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    idx_np, tgt_np = batch()
    per_rank = GLOBAL_BATCH // RANKS
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    full = (torch.from_numpy(idx_np), torch.from_numpy(tgt_np))
    local = (full[0][mine].contiguous(), full[1][mine].contiguous())
    mesh = init_device_mesh("cpu", (RANKS,))

    def model():
        m = torch_gpt(CONFIG)
        m.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
        return m

    def trainer(m, inputs, foreach=None):
        opt = torch.optim.AdamW(m.parameters(), foreach=foreach, **ADAMW)

        def step(i: int) -> float:
            _, loss = m(*inputs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss)

        return step

    ddp = DistributedDataParallel(model())

    fsdp = model()
    for block in fsdp.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)

    tp = model()
    for block in tp.transformer.h:
        _megatron_attention(block.attn, RANKS)
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        parallelize_module(block, mesh, {name: styles[s]() for name, s in TORCH_TP_MODULES.items()})
        for name in TORCH_TP_MODULES:
            w = block.get_submodule(name).weight
            if not isinstance(w, DTensor) or w.to_local().numel() * RANKS != w.numel():
                raise RuntimeError(f"bench_ddp: torch_tp left block.{name}.weight unsharded ({type(w).__name__})")
    # replicated (plain) and sharded (DTensor) parameters in one optimizer: no multi-tensor path
    return {"ddp": trainer(ddp, local), "fsdp2": trainer(fsdp, local), "torch_tp": trainer(tp, full, foreach=False)}


def _megatron_attention(attn, tp: int) -> None:
    """Prepare a torch ``Attn`` of ``torch_gpt`` for a column split of ``c_attn`` over ``tp``
    ranks: reorder its (3C, C) rows from [q | k | v] to [q0 k0 v0 | q1 k1 v1 | ...] (rank r's
    heads), so rank r's shard is its heads' queries, keys and values, and run attention on
    the heads the local shard holds. The function computed is unchanged."""
    import types

    import torch
    from torch.nn import functional as F

    c = attn.c_attn.in_features
    hs = c // CONFIG["n_head"]
    order = torch.arange(3 * c).view(3, tp, c // tp).transpose(0, 1).reshape(-1)
    with torch.no_grad():
        attn.c_attn.weight.copy_(attn.c_attn.weight[order])
        if attn.c_attn.bias is not None:
            attn.c_attn.bias.copy_(attn.c_attn.bias[order])

    def forward(self, x):
        b, t, _ = x.shape
        qkv = self.c_attn(x)  # this rank's columns: (b, t, 3 * local width)
        width = qkv.shape[-1] // 3
        q, k, v = (z.view(b, t, width // hs, hs).transpose(1, 2) for z in qkv.split(width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, width))

    attn.forward = types.MethodType(forward, attn)


# ------------------------------------------------------------------------------ child processes
def run_block(step, first: int, steps: int) -> tuple[list[float], list[float]]:
    """One untimed step, then ``steps`` timed ones, numbered from ``first``: the timed steps'
    seconds and the losses of all ``steps + 1``."""
    times, losses = [], []
    for j in range(steps + 1):
        t0 = time.perf_counter()
        losses.append(step(first + j))
        if j:
            times.append(time.perf_counter() - t0)
    return times, losses


def serve(steps: dict) -> None:
    """Answer block commands on stdin (one JSON line each) with one JSON line on stdout, until
    stdin closes: ``{"config": name, "steps": n}`` runs one untimed step, then ``n`` timed
    ones, and answers ``{"times": [...], "losses": [...]}`` (losses of all ``n + 1`` steps)."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to the log, not into the replies
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    done = dict.fromkeys(steps, 0)
    for line in sys.stdin:
        cmd = json.loads(line)
        name = cmd["config"]
        times, losses = run_block(steps[name], done[name], cmd["steps"])
        done[name] += len(losses)
        reply.write(json.dumps({"times": times, "losses": losses}) + "\n")
        reply.flush()


def torch_worker(rank: int, port: int, weights_path: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    with np.load(weights_path, allow_pickle=False) as f:
        weights = {k: f[k] for k in f.files}
    try:
        serve(torch_steps(rank, weights))
    finally:
        dist.destroy_process_group()


class Group:
    """Child processes that step on command (see ``serve``); a block's per-step time is the
    slowest process's, its losses are combined by ``combine`` (mean over ranks for data
    parallel, rank 0's where every rank computes the whole loss)."""

    def __init__(self, name: str, argvs: list[list[str]], log_dir: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                        os.environ.get("PYTHONPATH")]))}
        self.name, self.logs, self.procs = name, [], []
        for i, argv in enumerate(argvs):
            log = open(log_dir / f"{name}-{i}.log", "w+")  # noqa: SIM115 - closed in close()
            self.logs.append(log)
            self.procs.append(subprocess.Popen([sys.executable, __file__, *argv], stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, stderr=log, text=True, env=env))

    def _read(self, i: int) -> dict:
        line = self.procs[i].stdout.readline()
        if not line:
            self.logs[i].seek(0)
            tail = self.logs[i].read()[-3000:]
            raise RuntimeError(f"bench_ddp: {self.name} process {i} exited (code {self.procs[i].wait()}):\n{tail}")
        return json.loads(line)

    def ready(self) -> None:
        for i in range(len(self.procs)):
            self._read(i)

    def block(self, config: str, steps: int) -> list[dict]:
        for p in self.procs:
            p.stdin.write(json.dumps({"config": config, "steps": steps}) + "\n")
            p.stdin.flush()
        return [self._read(i) for i in range(len(self.procs))]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in self.logs:
            log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------- driver
def spread(times: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times)
    q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], ms[0], ms[0])
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "q1_ms": q1, "q3_ms": q3,
            "iqr_ms": q3 - q1, "steps": len(ms)}


def run(args: argparse.Namespace) -> dict:
    import torch

    import flowsys as fs

    weights = {k: np.ascontiguousarray(v.numpy()) for k, v in flowsys_model().state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="bench_ddp-") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "weights.npz", **weights)
        port = free_port()
        torch_group = Group("torch", [["--torch-worker", str(r), str(port), str(tmp / "weights.npz")]
                                      for r in range(RANKS)], tmp)
        local_group = Group("flowsys_local", [["--flowsys-local-worker"]], tmp)
        groups = {**dict.fromkeys(TORCH_CONFIGS, torch_group), "flowsys_dp_local": local_group}
        try:
            ray_steps = {name: flowsys_step(layout, backend) for name, (layout, backend) in FLOWSYS_CONFIGS.items()
                         if backend == "ray"}
            torch_group.ready()
            local_group.ready()
            names = [*TORCH_CONFIGS, *FLOWSYS_CONFIGS]
            done = dict.fromkeys(ray_steps, 0)

            def block(name: str, steps: int) -> tuple[list[float], list[float]]:
                if name in ray_steps:
                    times, losses = run_block(ray_steps[name], done[name], steps)
                    done[name] += len(losses)
                    return times, losses
                replies = groups[name].block(name, steps)
                times = [max(ts) for ts in zip(*(r["times"] for r in replies))]
                if name == "torch_tp":  # every rank computes the whole loss
                    return times, replies[0]["losses"]
                return times, [sum(ls) / len(ls) for ls in zip(*(r["losses"] for r in replies))]

            losses = {name: [] for name in names}
            for name in names:  # untimed warm-up: compiles, plans loaded, workers started
                _, ls = block(name, args.warmup - 1)
                losses[name] = ls
                print(f"  {name:18} warmed up, first loss {ls[0]:.4f}", flush=True)
            times = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names:
                    ts, ls = block(name, args.block)
                    times[name].extend(ts)
                    losses[name].extend(ls)  # every step's, in order: the first few are compared
                print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{n} {statistics.median(times[n]) * 1e3:.0f}" for n in names) + " ms", flush=True)
        finally:
            torch_group.close()
            local_group.close()
            fs.shutdown()

    configs = {name: {**spread(times[name]), "first_losses": losses[name][:FIRST_LOSSES],
                      "times_ms": [t * 1e3 for t in times[name]]} for name in names}
    ratios = {}
    for key, (num, den, target) in RATIOS.items():
        value = configs[num]["median_ms"] / configs[den]["median_ms"]
        ratios[key] = {"value": value, "numerator": num, "denominator": den, "target": target,
                       "met": None if target is None else value <= target}
    ref = losses["ddp"][:FIRST_LOSSES]
    return {
        "benchmark": "two_rank_training_step",
        "config": {**CONFIG, "global_batch": GLOBAL_BATCH, "ranks": RANKS, "optimizer": "AdamW", **ADAMW},
        "rounds": args.rounds, "block": args.block, "warmup_steps": args.warmup,
        "torch_tp_modules": TORCH_TP_MODULES,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "numpy": np.__version__},
        "configs": configs,
        "ratios": ratios,
        "first_losses": {"flowsys": losses["flowsys_dp_ray"][:FIRST_LOSSES], "torch": ref},
        "first_losses_max_rel_diff": max(abs(a - b) / abs(b) for name in names
                                         for a, b in zip(losses[name][:FIRST_LOSSES], ref)),
        "first_losses_match": all(math.isclose(a, b, rel_tol=1e-3) for name in names
                                  for a, b in zip(losses[name][:FIRST_LOSSES], ref)),
    }


def main() -> None:
    if sys.argv[1:2] == ["--torch-worker"]:
        torch_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    if sys.argv[1:2] == ["--flowsys-local-worker"]:
        serve({"flowsys_dp_local": flowsys_step(*FLOWSYS_CONFIGS["flowsys_dp_local"])})
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds of one block per configuration")
    ap.add_argument("--block", type=int, default=4, help="timed steps per block (after one untimed step)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration before the rounds")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 3 steps: a smoke run")
    ap.add_argument("--out", default="benchmarks/results/bench_ddp.json")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.block, args.warmup = 2, 3, 2
    if args.warmup < 1:
        ap.error("--warmup must be at least 1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    c = result["configs"]
    print(f"{'config':20} {'median ms':>10} {'min':>8} {'max':>8} {'IQR':>7}  first losses")
    for name, r in c.items():
        print(f"{name:20} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {r['max_ms']:8.1f} {r['iqr_ms']:7.1f}  "
              + " ".join(f"{x:.4f}" for x in r["first_losses"]))
    for key, r in result["ratios"].items():
        target = f" (target <= {r['target']})" if r["target"] is not None else ""
        print(f"{key:30} {r['value']:.2f}x{target}")
    print(f"first losses agree: {result['first_losses_match']}   (written to {out})")


if __name__ == "__main__":
    main()

"""One GPT training step (forward, backward, AdamW) in flowsys and in PyTorch, side by side.

    python benchmarks/bench_step.py [--steps 10] [--no-compile] [--out benchmarks/results/bench_step.json]

Four steps run the same nanoGPT architecture and config (n_layer=4, n_head=4, n_embd=256,
block_size=128, batch 8, vocab 4096) from the same weights on the same batch, with the same
number of threads, in alternating blocks of steps: flowsys in graph mode (a compiled ``fs.Graph``
on one device, the figure that counts), flowsys eager, PyTorch eager and ``torch.compile``
(inductor). The JSON holds every median and the ratios flowsys (graph) / PyTorch eager and /
``torch.compile`` (lower is better).

It also splits a step's time into GEMMs, other kernels and what lies outside kernels, for
flowsys (graph mode: the actor timeline of recorded steps; GEMMs are the ``linear`` ops and
``matmul``) and PyTorch eager (``torch.profiler``'s self CPU time of the ``aten::`` ops; GEMMs are
``mm``/``addmm``/``bmm``/``baddbmm``); each side's attention kernel is counted apart, since it holds
a GEMM and a softmax (flowsys's ``sdpa_probs``: q k^T, mask and softmax; PyTorch's flash
attention, forward and backward). "Outside" is the step's wall time less its kernels: the framework's own work (dispatch,
autograd, the runtime and the driver's request/response). The profiled steps are not the
timed ones (profiling costs time of its own).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

CONFIG = dict(vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=256, dropout=0.0, bias=True)
BATCH = 8


def torch_gpt(cfg):
    """nanoGPT's GPT, written out for the comparison (exact GELU, tied lm_head, fused attention)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(cfg["n_embd"], 3 * cfg["n_embd"], bias=cfg["bias"])
            self.c_proj = nn.Linear(cfg["n_embd"], cfg["n_embd"], bias=cfg["bias"])

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.c_attn(x).split(c, dim=2)
            q, k, v = (z.view(b, t, cfg["n_head"], c // cfg["n_head"]).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(cfg["n_embd"], 4 * cfg["n_embd"], bias=cfg["bias"])
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * cfg["n_embd"], cfg["n_embd"], bias=cfg["bias"])

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(cfg["n_embd"], bias=cfg["bias"])
            self.attn = Attn()
            self.ln_2 = nn.LayerNorm(cfg["n_embd"], bias=cfg["bias"])
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg["vocab_size"], cfg["n_embd"]),
                wpe=nn.Embedding(cfg["block_size"], cfg["n_embd"]),
                drop=nn.Dropout(cfg["dropout"]),
                h=nn.ModuleList([Block() for _ in range(cfg["n_layer"])]),
                ln_f=nn.LayerNorm(cfg["n_embd"], bias=cfg["bias"])))
            self.lm_head = nn.Linear(cfg["n_embd"], cfg["vocab_size"], bias=False)
            self.transformer.wte.weight = self.lm_head.weight

        def forward(self, idx, targets):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    return GPT()


FS_GEMMS = frozenset({"linear", "linear_grads", "linear_grad_input", "linear_grad_weight", "matmul"})
FS_ATTENTION = frozenset({"sdpa_probs"})  # q k^T, scale, causal mask and softmax in one op
TORCH_GEMMS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def split_flowsys(graph_step, run, steps: int = 3) -> dict:
    """flowsys graph mode's step split from the actor timeline of ``steps`` recorded steps."""
    graph_step.config.record_timeline = True
    walls, gemm, other, attention, ops = [], 0.0, 0.0, 0.0, {}
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            run()
            walls.append(time.perf_counter() - t0)
            for f in graph_step.timeline:
                if f.kind not in ("compute", "update", "local"):
                    continue
                t = f.end - f.start
                ops[f.name] = ops.get(f.name, 0.0) + t
                if f.name in FS_GEMMS:
                    gemm += t
                elif f.name in FS_ATTENTION:
                    attention += t
                else:
                    other += t
    finally:
        graph_step.config.record_timeline = False
    return _split(sum(walls) / steps, gemm / steps, other / steps, attention / steps,
                  {k: v / steps for k, v in ops.items()})


def split_torch(run, steps: int = 3) -> dict:
    """PyTorch eager's step split from ``torch.profiler``'s self CPU times."""
    from torch.profiler import ProfilerActivity, profile

    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            run()
            walls.append(time.perf_counter() - t0)
    gemm = other = attention = 0.0
    ops = {}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        t = e.self_cpu_time_total / 1e6
        ops[e.key] = t / steps
        if e.key in TORCH_GEMMS:
            gemm += t
        elif "scaled_dot_product" in e.key or "flash_attention" in e.key:
            attention += t
        else:
            other += t
    return _split(sum(walls) / steps, gemm / steps, other / steps, attention / steps, ops)


def _split(wall: float, gemm: float, other: float, attention: float, ops: dict) -> dict:
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {"step_s": wall, "gemm_s": gemm, "other_kernels_s": other, "attention_kernel_s": attention,
            "outside_kernels_s": max(wall - gemm - other - attention, 0.0),
            "top_ops_s": {k: round(v, 6) for k, v in top}}


def time_steps(steps: dict, n_steps: int, warmup: int = 2, block: int = 5) -> dict[str, list[float]]:
    """Seconds per step of each of ``steps`` (name -> step function), measured in alternating
    blocks of ``block`` steps so that a change in the machine's speed during the run (shared
    or throttled cores) weighs on both alike. Each block starts with an untimed step, so every
    timed step runs in its own steady state (caches and allocator warm)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    while min(len(t) for t in times.values()) < n_steps:
        for name, step in steps.items():
            step()
            for _ in range(block):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles for a minute)")
    ap.add_argument("--out", default="benchmarks/results/bench_step.json")
    ap.add_argument("--profile", action="store_true", help="cProfile the flowsys step and print the top entries")
    args = ap.parse_args()

    import torch

    import flowsys as fs

    torch.set_num_threads(args.threads)
    fs.manual_seed(0)
    model = fs.models.GPT(fs.models.GPTConfig(**CONFIG))
    weights = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    opt = fs.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    eager = fs.models.GPT(fs.models.GPTConfig(**CONFIG))
    eager.load_state_dict(weights)
    eager_opt = fs.optim.AdamW(eager.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    class TrainStep(fs.Graph):
        def __init__(self):
            super().__init__()
            self.model = model
            self.add_optimizer(opt)

        def build(self, idx, targets):
            _, loss = self.model(idx, targets)
            loss.backward()
            return loss

    graph = TrainStep()

    def torch_model():
        ref = torch_gpt(CONFIG)
        ref.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
        return ref, torch.optim.AdamW(ref.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    ref, ref_opt = torch_model()
    rng = np.random.default_rng(0)
    idx_np = rng.integers(0, CONFIG["vocab_size"], (BATCH, CONFIG["block_size"]))
    tgt_np = rng.integers(0, CONFIG["vocab_size"], (BATCH, CONFIG["block_size"]))
    idx, tgt = fs.tensor(idx_np), fs.tensor(tgt_np)
    idx_t, tgt_t = torch.from_numpy(idx_np), torch.from_numpy(tgt_np)
    losses: dict[str, list[float]] = {}

    def fs_graph():
        losses.setdefault("flowsys", []).append(graph(idx, tgt).item())

    def fs_eager():
        _, loss = eager(idx, tgt)
        eager_opt.zero_grad()
        loss.backward()
        eager_opt.step()
        losses.setdefault("flowsys_eager", []).append(loss.item())

    def torch_steps(name, net, optimizer):
        def step():
            _, loss = net(idx_t, tgt_t)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.setdefault(name, []).append(loss.item())
        return step

    steps = {"flowsys": fs_graph, "flowsys_eager": fs_eager, "torch": torch_steps("torch", ref, ref_opt)}
    from flowsys.ops import blas

    if blas.backend() == "mkl":
        # the same graph step with NumPy's BLAS (OpenBLAS), for what the library alone is worth
        def fs_graph_openblas():
            before = blas.use("numpy")
            try:
                losses.setdefault("flowsys_openblas", []).append(graph(idx, tgt).item())
            finally:
                blas.use(before)

        steps["flowsys_openblas"] = fs_graph_openblas
    if not args.no_compile:
        net, optimizer = torch_model()
        steps["torch_compile"] = torch_steps("torch_compile", torch.compile(net), optimizer)

    if args.profile:
        import cProfile
        import pstats

        fs_graph()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            fs_graph()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return

    times = time_steps(steps, args.steps)
    med = {name: statistics.median(t) for name, t in times.items()}
    split = {"flowsys": split_flowsys(graph, fs_graph), "torch": split_torch(steps["torch"])}
    first = {name: ls[0] for name, ls in losses.items()}
    result = {
        "benchmark": "gpt_train_step",
        "config": {**CONFIG, "batch": BATCH, "optimizer": "AdamW"},
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "numpy": np.__version__},
        "flowsys_mode": "graph (fs.Graph on one device)",
        "flowsys_blas": blas.backend(),
        "flowsys_median_s": med["flowsys"],
        "flowsys_eager_median_s": med["flowsys_eager"],
        "torch_median_s": med["torch"],
        "torch_compile_median_s": med.get("torch_compile"),
        "ratio_flowsys_over_torch": med["flowsys"] / med["torch"],
        "ratio_flowsys_eager_over_torch": med["flowsys_eager"] / med["torch"],
        "flowsys_openblas_median_s": med.get("flowsys_openblas"),
        "ratio_flowsys_openblas_over_torch": med["flowsys_openblas"] / med["torch"] if "flowsys_openblas" in med else None,
        "ratio_flowsys_over_torch_compile": med["flowsys"] / med["torch_compile"] if "torch_compile" in med else None,
        "times_s": times,
        "flowsys_times_s": times["flowsys"],
        "torch_times_s": times["torch"],
        "first_losses": first,
        # (the OpenBLAS run trains the same graph after it, so its first loss is a later step's)
        "first_losses_match": bool(all(math.isclose(v, first["torch"], rel_tol=1e-3)
                                       for name, v in first.items() if name != "flowsys_openblas")),
        "split": split,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    line = "   ".join(f"{name} {m * 1e3:.1f} ms" for name, m in med.items())
    print(f"{line}   flowsys/torch {result['ratio_flowsys_over_torch']:.2f}x" +
          (f"   flowsys/torch.compile {result['ratio_flowsys_over_torch_compile']:.2f}x"
           if result["ratio_flowsys_over_torch_compile"] else ""))
    for name, sp in split.items():
        print(f"{name:8s} step {sp['step_s'] * 1e3:7.1f} ms: GEMMs {sp['gemm_s'] * 1e3:6.1f}, other kernels "
              f"{sp['other_kernels_s'] * 1e3:6.1f}, attention kernel {sp['attention_kernel_s'] * 1e3:5.1f}, outside "
              f"kernels {sp['outside_kernels_s'] * 1e3:6.1f} ms")
    print(f"(written to {out})")


if __name__ == "__main__":
    main()

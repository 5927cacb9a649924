"""One GPT training step (forward, backward, AdamW) in flowsys and in PyTorch, side by side.

    python benchmarks/bench_step.py [--steps 10] [--out benchmarks/results/bench_step.json]

Both run the same nanoGPT architecture and config (n_layer=4, n_head=4, n_embd=256,
block_size=128, batch 8, vocab 4096) on the same weights and batch, with the same number of
threads, in alternating blocks of steps. The JSON holds both medians and the ratio flowsys /
PyTorch (lower is better).
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
    ap.add_argument("--out", default="benchmarks/results/bench_step.json")
    ap.add_argument("--profile", action="store_true", help="cProfile the flowsys step and print the top entries")
    args = ap.parse_args()

    import torch

    import flowsys as fs

    torch.set_num_threads(args.threads)
    fs.manual_seed(0)
    model = fs.models.GPT(fs.models.GPTConfig(**CONFIG))
    opt = fs.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch_gpt(CONFIG)
    ref.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in model.state_dict().items()})
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    rng = np.random.default_rng(0)
    idx_np = rng.integers(0, CONFIG["vocab_size"], (BATCH, CONFIG["block_size"]))
    tgt_np = rng.integers(0, CONFIG["vocab_size"], (BATCH, CONFIG["block_size"]))
    idx, tgt = fs.tensor(idx_np), fs.tensor(tgt_np)
    idx_t, tgt_t = torch.from_numpy(idx_np), torch.from_numpy(tgt_np)

    losses = {"flowsys": [], "torch": []}

    def fs_step():
        _, loss = model(idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses["flowsys"].append(loss.item())

    def torch_step():
        _, loss = ref(idx_t, tgt_t)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        losses["torch"].append(loss.item())

    if args.profile:
        import cProfile
        import pstats

        fs_step()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            fs_step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return

    times = time_steps({"flowsys": fs_step, "torch": torch_step}, args.steps)
    fs_times, torch_times = times["flowsys"], times["torch"]
    fs_med, torch_med = statistics.median(fs_times), statistics.median(torch_times)
    n_first = min(len(losses["flowsys"]), len(losses["torch"]))
    result = {
        "benchmark": "gpt_train_step",
        "config": {**CONFIG, "batch": BATCH, "optimizer": "AdamW"},
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "numpy": np.__version__},
        "flowsys_median_s": fs_med,
        "torch_median_s": torch_med,
        "ratio_flowsys_over_torch": fs_med / torch_med,
        "flowsys_times_s": fs_times,
        "torch_times_s": torch_times,
        "first_losses_match": bool(all(math.isclose(a, b, rel_tol=1e-3) for a, b in
                                       zip(losses["flowsys"][:n_first], losses["torch"][:n_first]))),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"flowsys {fs_med * 1e3:.1f} ms/step   torch {torch_med * 1e3:.1f} ms/step   "
          f"ratio {fs_med / torch_med:.2f}x   (written to {out})")


if __name__ == "__main__":
    main()

"""Train a small byte-level GPT on the Python standard library's own sources, on one device.

    python examples/train_gpt.py [--steps 300] [--n-layer 2] [--n-embd 128] ...

Prints a progress line (step, loss, learning rate, tokens/s) and ends with the validation loss
next to the byte unigram entropy of the data: a model that learned anything beyond byte
frequencies ends well below it.
"""

from __future__ import annotations

import argparse
import sys
import time

import flowsys as fs
from flowsys import optim
from flowsys.data import ByteDataset
from flowsys.models import GPT, GPTConfig
from flowsys.train import evaluate


def progress(step: int, total: int, loss: float, lr: float, tok_per_s: float, width: int = 24) -> None:
    done = int(width * step / total)
    bar = "#" * done + "." * (width - done)
    end = "\n" if step == total or not sys.stdout.isatty() else ""
    if sys.stdout.isatty() or step == total or step % 25 == 0:
        print(f"\r[{bar}] step {step:>5}/{total}  loss {loss:.4f}  lr {lr:.2e}  {tok_per_s:,.0f} tok/s", end=end, flush=True)


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--data-bytes", type=int, default=4 << 20, help="how much of the stdlib corpus to use")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    fs.manual_seed(args.seed)
    data = ByteDataset.from_stdlib(max_bytes=args.data_bytes)
    config = GPTConfig(vocab_size=data.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=0.0)
    model = GPT(config)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=args.lr, betas=(0.9, 0.95))
    sched = optim.WarmupCosine(opt, warmup_steps=args.warmup, total_steps=args.steps, min_lr=args.lr / 10)
    print(f"data: {data}")
    print(f"model: GPT {model.num_parameters():,} parameters, {config}")

    batches = data.batches(args.batch_size, args.block_size, seed=args.seed)  # the samples of step i, as flowsys train draws them
    tokens_per_step = args.batch_size * args.block_size
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batches.at(step)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr = opt.param_groups[0]["lr"]
        sched.step()
        progress(step, args.steps, loss.item(), lr, step * tokens_per_step / (time.perf_counter() - t0))

    val = evaluate(model, data, args.batch_size, args.block_size, batches=8)
    entropy = data.unigram_entropy("val")
    print(f"validation loss {val:.4f} nats  (byte unigram entropy {entropy:.4f} nats, "
          f"{'below' if val < entropy else 'NOT below'} it by {entropy - val:.4f})")
    sample = model.generate(fs.tensor(ByteDataset.encode("def ")[None, :]), max_new_tokens=60, top_k=5)
    print("sample:", repr(ByteDataset.decode(sample.numpy()[0])))
    return val


if __name__ == "__main__":
    main()

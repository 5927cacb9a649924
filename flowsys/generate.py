"""Sample text from a trained checkpoint, as nanoGPT's ``sample.py``.

    flowsys generate ckpt --prompt "def main(" --max-new-tokens 200 [--temperature 0.8] [--top-k 200] [--seed 0]

>>> text = generate("ckpt", "def main(", max_new_tokens=50)   # doctest: +SKIP

The checkpoint says what to build: its ``meta.json``'s ``extra["job"]`` (what ``flowsys train``
saves: the job's sections) gives the model config and the data source, whose tokenizer turns
the prompt into tokens and the samples back into text. The model is built on one device and the
checkpoint loaded into it, whatever layout it was saved from (a vocabulary padded for tensor
parallelism loads its real rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from flowsys.checkpoint import CheckpointCorrupt, latest, load
from flowsys.data import ByteDataset
from flowsys.errors import ConfigError
from flowsys.functions import manual_seed, rng_state, set_rng_state
from flowsys.models.gpt import GPT, GPTConfig

try:  # the data sources beyond the standard library's bytes (their tokenizers)
    from flowsys.data import open_source
except ImportError:  # an older flowsys.data: byte-level "stdlib" only
    open_source = None

__all__ = ["add_arguments", "generate", "load_model", "main", "resolve", "tokenizer"]


def resolve(path: str | Path) -> Path:
    """The step directory ``path`` names: itself, or a checkpoint root's latest complete one."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    found = latest(path)
    if found is None:
        what = ("does not exist" if not path.exists()
                else "holds no complete checkpoint (step_<N>/ with a MANIFEST.json)")
        raise ConfigError(f"checkpoint {path} {what}: give a checkpoint root that `flowsys train` wrote "
                          f"(checkpoint.dir=...) or one of its step directories")
    return found


def saved_job(step_dir: Path) -> dict:
    """The job a checkpoint was trained by (``meta.json``'s ``extra["job"]``)."""
    try:
        meta = json.loads((step_dir / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointCorrupt(f"checkpoint {step_dir}: cannot read meta.json ({e}); use another "
                                f"checkpoint (fs.checkpoint.latest_verified)") from e
    job = (meta.get("extra") or {}).get("job")
    if not isinstance(job, dict) or not isinstance(job.get("model"), dict):
        raise ConfigError(f"checkpoint {step_dir} does not say which model it holds: its meta.json has no "
                          f"extra['job'] with a 'model' section (it was saved by an older `flowsys train`, or by "
                          f"fs.checkpoint.save without it); save it with extra={{'job': {{'model': {{...GPTConfig "
                          f"fields}}, 'data': {{'source': ...}}}}}}")
    return job


def load_model(path: str | Path) -> tuple[GPT, dict, Path]:
    """The checkpoint's GPT on one device in eval mode, the job it was trained by, and the step
    directory it came from. The global RNG is left as it was."""
    step_dir = resolve(path)
    job = saved_job(step_dir)
    # One device needs no padding: loading reads the real rows of a padded (vocab-parallel) table.
    config = dataclasses.replace(GPTConfig.from_dict(job["model"]), padded_vocab_size=None)
    state = rng_state()
    try:
        model = GPT(config)
        load(step_dir, model)  # (restores the checkpoint's RNG state too)
    finally:
        set_rng_state(state)
    model.eval()
    return model, job, step_dir


def tokenizer(job: dict, log=print):
    """What turns text into the job's tokens and back (``encode(text) -> np.ndarray``,
    ``decode(tokens) -> str``): the job's data source."""
    data = job.get("data") or {}
    source = data.get("source", "stdlib")
    if source == "stdlib":
        return ByteDataset  # bytes are tokens: encoding needs no corpus (open_source would read it)
    if open_source is not None:  # a token directory's own tokenizer
        options = {k: data[k] for k in ("max_bytes", "val_fraction") if k in data}
        return open_source(source, **options, log=log)
    raise ConfigError(f"data.source {source!r}: this flowsys reads only the byte-level 'stdlib' source "
                      f"(flowsys.data.open_source, which knows the others' tokenizers, is missing)")


def generate(checkpoint: str | Path, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: int | None = 200, seed: int = 0, log=print) -> str:
    """The prompt and ``max_new_tokens`` tokens sampled after it from the checkpoint's model,
    as text: nanoGPT's sampling (the context cropped to the last ``block_size`` tokens, logits
    divided by ``temperature``, only the ``top_k`` most likely kept, then a multinomial draw).
    The same seed gives the same text; the global RNG is left as it was.

        >>> generate("ckpt", "def main(", max_new_tokens=50, seed=1)   # doctest: +SKIP
        'def main(self, ...'
    """
    if max_new_tokens < 0:
        raise ConfigError(f"generate: max_new_tokens must be at least 0, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"generate: temperature must be at least 0 (0: always the most likely token), "
                          f"got {temperature}")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"generate: top_k must be positive (0 or None: no top-k), got {top_k}")
    model, job, _ = load_model(checkpoint)
    tok = tokenizer(job, log)
    ids = np.asarray(tok.encode(prompt), dtype=np.int64)
    if ids.size == 0:
        raise ConfigError("generate: the prompt is empty; give at least one character to start from (e.g. '\\n')")
    vocab = model.config.vocab_size
    if int(ids.max()) >= vocab:
        raise ConfigError(f"generate: the prompt encodes to token {int(ids.max())}, beyond the model's vocabulary of "
                          f"{vocab}: the checkpoint's data source tokenizes differently from how it was trained")
    state = rng_state()
    try:
        manual_seed(seed)
        tokens = model.generate(ids[None, :], max_new_tokens, temperature=temperature, top_k=top_k or None)
    finally:
        set_rng_state(state)
    return tok.decode(tokens.numpy()[0])


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``flowsys generate``'s arguments."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                        help="a checkpoint root (its latest complete checkpoint) or a step_<N> directory")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to sample (default 100)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="below 1 sharper, above 1 more random, 0 the most likely token (default 0.8)")
    parser.add_argument("--top-k", type=int, default=200,
                        help="sample among the k most likely tokens (0: all; default 200)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same text (default 0)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Print the prompt and its continuation (progress notes go to stderr)."""
    text = generate(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                    log=lambda message: print(message, file=sys.stderr))
    print(text)
    return 0

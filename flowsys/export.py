"""Export a trained checkpoint for other tools.

    flowsys export ckpt --to hf-gpt2 gpt2-out

>>> export_hf_gpt2("ckpt", "gpt2-out")   # doctest: +SKIP
PosixPath('gpt2-out')

``hf-gpt2`` writes a Hugging Face GPT-2 model directory (``model.safetensors`` and
``config.json``) that ``transformers.GPT2LMHeadModel.from_pretrained`` loads and that computes
the same logits. flowsys's GPT keeps nanoGPT's parameter names, which are GPT-2's; what differs
is the layout: GPT-2's ``Conv1D`` holds its weight as (in, out), the transpose of
``nn.Linear``'s (out, in), as nanoGPT's ``from_pretrained`` transposes it the other way. Token
ids are the ones the model was trained on (bytes, for the ``stdlib`` source).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from flowsys.errors import ConfigError
from flowsys.generate import load_model
from flowsys.models.gpt import GPTConfig

__all__ = ["add_arguments", "export_hf_gpt2", "hf_gpt2_config", "hf_gpt2_tensors", "main"]

# nn.Linear (out, in) -> Conv1D (in, out); c_attn is nanoGPT's fused (3C, C): its rows q, k, v
# become GPT-2's columns q, k, v, the order GPT-2 splits them in.
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_LAYER_NORMS = ("ln_1", "ln_2")


def hf_gpt2_tensors(state: dict[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """GPT-2's tensors from a flowsys GPT's state dict (nanoGPT names and shapes, the real
    vocabulary rows only): Linear weights transposed, biases a model without them lacks as
    zeros, ``lm_head.weight`` left out (GPT-2 ties it to ``wte``). A parameter with no place in
    GPT-2 is a ``ConfigError`` naming it."""
    c = config.n_embd
    width = {"attn.c_attn": 3 * c, "attn.c_proj": c, "mlp.c_fc": 4 * c, "mlp.c_proj": c}
    left = dict(state)
    out: dict[str, np.ndarray] = {}

    def take(name: str, shape: tuple[int, ...], transpose: bool = False) -> None:
        if name in left:
            a = np.asarray(left.pop(name), dtype=np.float32)
            a = a.T if transpose else a
        elif name.endswith(".bias"):  # bias: false: GPT-2 adds its biases, zeros leave the function alone
            a = np.zeros(shape, dtype=np.float32)
        else:
            raise ConfigError(f"export hf-gpt2: the model has no {name}, which GPT-2 needs")
        if a.shape != shape:
            raise ConfigError(f"export hf-gpt2: {name} has shape {a.shape}, GPT-2 needs {shape}")
        out[name] = np.ascontiguousarray(a)

    take("transformer.wte.weight", (config.vocab_size, c))
    take("transformer.wpe.weight", (config.block_size, c))
    for i in range(config.n_layer):
        h = f"transformer.h.{i}"
        for ln in _LAYER_NORMS:
            take(f"{h}.{ln}.weight", (c,))
            take(f"{h}.{ln}.bias", (c,))
        for layer in _CONV1D:
            n_in = 4 * c if layer == "mlp.c_proj" else c
            take(f"{h}.{layer}.weight", (n_in, width[layer]), transpose=True)
            take(f"{h}.{layer}.bias", (width[layer],))
    take("transformer.ln_f.weight", (c,))
    take("transformer.ln_f.bias", (c,))
    head = left.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(np.asarray(head), out["transformer.wte.weight"]):
        raise ConfigError("export hf-gpt2: lm_head.weight differs from transformer.wte.weight; GPT-2 ties them")
    if left:
        raise ConfigError(f"export hf-gpt2: parameter(s) {sorted(left)} have no place in GPT-2; this model is not "
                          f"a GPT-2 and cannot be exported as one")
    return out


def hf_gpt2_config(config: GPTConfig) -> dict:
    """``config.json`` of the matching ``transformers.GPT2Config``: flowsys's GELU is the exact
    (erf) one, Hugging Face's ``gelu`` (GPT-2's own ``gelu_new`` is the tanh approximation)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": None, "eos_token_id": None,  # GPT-2's 50256 is no token of a byte vocabulary
        "torch_dtype": "float32",
    }


def export_hf_gpt2(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the checkpoint's model (a root's latest complete checkpoint, or a step directory)
    as a Hugging Face GPT-2 directory ``out`` (created; its ``model.safetensors`` and
    ``config.json`` replaced); returns ``out``.

        >>> from transformers import GPT2LMHeadModel                       # doctest: +SKIP
        >>> GPT2LMHeadModel.from_pretrained(export_hf_gpt2("ckpt", "gpt2-out"))   # doctest: +SKIP
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: {out} is a file; give a directory to write the model into")
    model, _, _ = load_model(checkpoint)
    state = {name: t.numpy() for name, t in model.state_dict().items()}  # (the padded vocabulary rows left out)
    tensors = hf_gpt2_tensors(state, model.config)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_gpt2_config(model.config), indent=2) + "\n")
    return out


FORMATS = {"hf-gpt2": export_hf_gpt2}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``flowsys export``'s arguments."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                        help="a checkpoint root (its latest complete checkpoint) or a step_<N> directory")
    parser.add_argument("--to", required=True, choices=sorted(FORMATS),
                        help="hf-gpt2: a Hugging Face GPT-2 directory (model.safetensors, config.json)")
    parser.add_argument("out", metavar="OUT", help="the directory to write")
    return parser


def main(args: argparse.Namespace) -> int:
    path = FORMATS[args.to](args.checkpoint, args.out)
    print(f"wrote {path} ({args.to})")
    return 0

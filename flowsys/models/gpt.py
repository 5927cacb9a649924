"""GPT-2 in the shape of nanoGPT: same modules, parameter names, initialisation and forward.

A state dict of nanoGPT's ``GPT`` (or of GPT-2 converted to nanoGPT names) loads as is.

>>> import flowsys as fs
>>> cfg = fs.models.GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=8)
>>> model = fs.models.GPT(cfg)
>>> logits, loss = model(fs.zeros((2, 16), dtype=fs.int64), fs.zeros((2, 16), dtype=fs.int64))
>>> logits.shape, loss.shape
((2, 16, 64), ())
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from flowsys import functions as fsf
from flowsys import nn
from flowsys.autograd import no_grad
from flowsys.errors import ConfigError
from flowsys.nn import functional as F
from flowsys.optim import AdamW
from flowsys.sbp import Split, broadcast, split
from flowsys.tensor import Tensor, apply


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    # The embedding's rows (None: vocab_size): a vocabulary split over tensor parallelism pads to
    # a multiple of 128 x tp (:meth:`padded_for`); the padded logits are -inf, state dicts keep
    # vocab_size rows.
    padded_vocab_size: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"GPTConfig: {name} must be positive, got {getattr(self, name)}")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ConfigError(f"GPTConfig: padded_vocab_size ({self.padded_vocab_size}) must be at least "
                              f"vocab_size ({self.vocab_size})")
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")

    @property
    def table_size(self) -> int:
        """Rows of the embedding table and columns of the logits (the padded vocabulary)."""
        return self.padded_vocab_size or self.vocab_size

    def padded_for(self, tp: int, multiple: int = 128) -> GPTConfig:
        """This config with the vocabulary padded to a multiple of ``multiple`` x ``tp`` (Megatron-LM's
        ``make_vocab_size_divisible_by``): even vocabulary shards on ``tp`` ranks."""
        step = multiple * int(tp)
        return dataclasses.replace(self, padded_vocab_size=-(-self.vocab_size // step) * step)

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        """Build from a flat dict; unknown keys are an error naming the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"GPTConfig: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**values)


class QKVProjection(nn.Module):
    """nanoGPT's fused ``c_attn`` (its state dict holds weight (3C, C) and bias (3C,)), stored
    as weight (3, C, C) and bias (3, C) so that splitting axis 1 gives every rank the query,
    key and value rows of its own heads: Megatron's column-parallel attention, with no
    communication, under ``S(1)`` (a plain ``S(0)`` of the (3C, C) matrix would hand one rank
    all the queries and another the values)."""

    def __init__(self, n_embd: int, bias: bool = True):
        super().__init__()
        c = n_embd
        bound = 1.0 / math.sqrt(c)  # nn.Linear(C, 3C)'s default, which GPT's own init replaces
        self.weight = nn.init.uniform_(nn.Parameter(np.empty((3, c, c), dtype=np.float32), state_shape=(3 * c, c)),
                                       -bound, bound)
        self.bias = nn.init.uniform_(nn.Parameter(np.empty((3, c), dtype=np.float32), state_shape=(3 * c,)),
                                     -bound, bound) if bias else None
        self.n_embd = c

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.n_embd
        if self.bias is not None:  # one GEMM into (..., 3, C), then q, k, v are views of it
            qkv = F.linear(x, self.weight, self.bias)
            return tuple(z.reshape(tuple(x.shape[:-1]) + (c,)) for z in fsf.split(qkv, 3, axis=-2))
        ws = [w.reshape(c, c) for w in fsf.split(self.weight, 3, axis=0)]
        bs = [b.reshape(c) for b in fsf.split(self.bias, 3, axis=0)] if self.bias is not None else [None] * 3
        return tuple(F.linear(x, w, b) for w, b in zip(ws, bs))

    def extra_repr(self) -> str:
        return f"in_features={self.n_embd}, out_features={3 * self.n_embd}, bias={self.bias is not None}"


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = QKVProjection(config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        hs = c // self.n_head
        q, k, v = self.c_attn(x)
        q, k, v = (z.reshape(b, t, self.n_head, hs).transpose(0, 2, 1, 3) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=True, training=self.training)
        y = y.transpose(0, 2, 1, 3).reshape(b, t, c)
        return self.resid_dropout(self.c_proj(y))


def _plain(m: nn.Module) -> bool:
    """Whether calling ``m`` is calling its ``forward``: no pipeline stage, input layout or
    activation checkpointing of its own (MLP then may compute c_fc and GELU its own way)."""
    return m._stage is None and m._input_sbp is None and not m.activation_checkpointing


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        fc = self.c_fc
        if fc.bias is not None and type(self.gelu) is nn.GELU and _plain(fc) and _plain(self.gelu):
            # the bias added in GELU's pass (bias_gelu), and its gradient summed in GELU's
            # backward pass: the product is not filled with the bias and read back
            h = apply("bias_gelu", F.linear(x, fc.weight), fc.bias, approximate=self.gelu.approximate)
        else:
            h = self.gelu(fc(x))
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # Specs first, values once: every initialiser draws its key in the same order as an
        # eager build, and each parameter is filled only from its final spec.
        with nn.meta_init():
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.table_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            ))
            self.lm_head = nn.Linear(config.n_embd, config.table_size, bias=False)
            self.transformer["wte"].weight = self.lm_head.weight  # weight tying, as GPT-2
            self.lm_head.weight.valid_rows = config.vocab_size  # the rest of the table is padding
            self.apply(self._init_weights)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))
        if not nn.init.is_meta():
            nn.init.materialize_(self)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, QKVProjection)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) and the mean cross entropy against ``targets`` (ignore_index -1).

        Without targets only the last position's logits are computed (B, 1, vocab), as nanoGPT.
        """
        if not isinstance(idx, Tensor):
            idx = fsf.tensor(np.asarray(idx, dtype=np.int64))
        b, t = idx.shape
        if t > self.config.block_size:
            raise ConfigError(f"GPT: cannot forward a sequence of length {t}, block size is only {self.config.block_size}")
        tr = self.transformer
        pos = fsf.arange(t)
        vocab_split = self._vocab_split()
        if vocab_split:  # Megatron's vocab-parallel embedding: a partial sum over the vocabulary shards
            tok = apply("vocab_embedding", tr["wte"].weight, idx, vocab_size=self.config.vocab_size)
        else:
            tok = tr["wte"](idx)
        x = tr["drop"](tok + tr["wpe"](pos))
        for block in tr["h"]:
            x = block(x)
        x = tr["ln_f"](x)
        if targets is None:
            return self._mask_padding(self.lm_head(x[:, -1:, :])), None
        if not isinstance(targets, Tensor):
            targets = fsf.tensor(np.asarray(targets, dtype=np.int64))
        logits = self._mask_padding(self.lm_head(x))
        if logits.is_global and targets.is_global and targets.placement != logits.placement:  # a pipeline's last stage
            same = targets.placement.mesh == logits.placement.mesh
            targets = targets.to_global(placement=logits.placement, sbp=targets.sbp if same else broadcast)
        if vocab_split:
            return logits, vocab_parallel_cross_entropy(logits, targets, self.config.vocab_size, ignore_index=-1)
        return logits, F.cross_entropy(logits, targets, ignore_index=-1)

    def _vocab_split(self) -> bool:
        """Whether the (tied) embedding is split along the vocabulary (``parallel_plan``'s tp)."""
        w = self.lm_head.weight
        if not w.is_global:
            return False
        sbp = w.sbp if w.sbp is not None else getattr(getattr(w._data, "value", None), "sbp", None)  # traced: a Symbol
        return any(isinstance(v, Split) and v.axis == 0 for v in sbp or ())

    def _mask_padding(self, logits: Tensor) -> Tensor:
        """The padded vocabulary's logits set to -inf: they take no probability and no gradient."""
        cfg = self.config
        if cfg.table_size == cfg.vocab_size:
            return logits
        mask = np.zeros(cfg.table_size, dtype=np.float32)
        mask[cfg.vocab_size:] = -np.inf
        return logits + fsf.tensor(mask.astype(logits.dtype))

    _TABLE_KEYS = ("transformer.wte.weight", "lm_head.weight")

    def state_dict(self):
        """nanoGPT's names and shapes: the padded vocabulary rows are left out."""
        out = super().state_dict()
        v = self.config.vocab_size
        if self.config.table_size != v:
            for k in self._TABLE_KEYS:
                if k in out:
                    out[k] = fsf.tensor(out[k].numpy()[:v])
        return out

    def load_state_dict(self, state_dict, strict: bool = True):
        """Loads nanoGPT's shapes; the padded vocabulary rows are zeros."""
        cfg = self.config
        if cfg.table_size != cfg.vocab_size:
            state_dict = dict(state_dict)
            for k in self._TABLE_KEYS:
                if k in state_dict:
                    a = nn.module._to_numpy(state_dict[k])
                    if a.shape[0] == cfg.vocab_size:
                        pad = np.zeros((cfg.table_size - cfg.vocab_size,) + a.shape[1:], dtype=a.dtype)
                        state_dict[k] = np.concatenate([a, pad])
        return super().load_state_dict(state_dict, strict)

    def pipeline(self, placements) -> GPT:
        """Split the model into ``len(placements)`` pipeline stages, stage ``s`` on
        ``placements[s]``: the embeddings with the first stage, the blocks in equal runs, the
        final layer norm and the head with the last. With two stages or more the head's weight is
        a copy of the token embedding tied by value, as Megatron-LM keeps it
        (:meth:`nn.Module.set_stage` ``copy_tied``): no forward move of the embedding, and the two
        copies' gradients summed once per step. Lay each stage out first (e.g.
        ``to_global`` with :meth:`parallel_plan` on a mesh of the stages' shape): parameters keep
        their SBP on a stage whose mesh has the same shape.

        >>> import flowsys as fs
        >>> gpt = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8))
        >>> sorted(gpt.pipeline([fs.placement("cpu", [0]), fs.placement("cpu", [1])]).stages())
        [0, 1]
        """
        n, layers = len(placements), len(self.transformer["h"])
        if not 1 <= n <= layers:
            raise ConfigError(f"GPT.pipeline: {n} stages for {layers} blocks; use 1 to {layers} stages")
        tr = self.transformer
        tr["wte"].set_stage(0, placements[0])
        tr["wpe"].set_stage(0, placements[0])
        for i, block in enumerate(tr["h"]):
            block.set_stage(i * n // layers, placements[i * n // layers])
        tr["ln_f"].set_stage(n - 1, placements[-1])
        self.lm_head.set_stage(n - 1, placements[-1], copy_tied=True)  # Megatron's copy of the tied embedding
        return self

    @staticmethod
    def parallel_plan(placement, *, dp_axis: int | None = None, tp_axis: int | None = None,
                      vocab_parallel: bool = False, sequence_parallel: bool = False) -> dict:
        """A plan for :meth:`nn.Module.to_global`: data parallel along mesh axis ``dp_axis``
        (the batch is split there, parameters replicated) and Megatron-style tensor parallel
        along ``tp_axis`` (attention projections and ``c_fc`` column-split, both ``c_proj``
        row-split, layer-norm inputs replicated: one all-reduce after attention and one after
        the MLP, forward and backward). Works for a block or a whole GPT. With ``vocab_parallel``
        the tied embedding and head split along the vocabulary on ``tp_axis``
        (Megatron's vocab-parallel embedding: a partial sum, one all-reduce; the cross entropy
        from an all-reduce of op max and two of op sum over the rows; pad the vocabulary with
        :meth:`GPTConfig.padded_for` for even shards); without it they are replicated. With
        ``sequence_parallel`` the layer norms' inputs split along the sequence on ``tp_axis``
        (Megatron-LM's sequence parallelism, as per-op signatures: the layer norms, dropout and
        residual adds run on a 1/tp slice of the tokens, each all-reduce becomes a
        reduce-scatter into that slice and an all-gather before the next column-split layer,
        and the layer norms' gradients are summed over tp).

        >>> import flowsys as fs
        >>> plan = GPT.parallel_plan(fs.placement("cpu", [[0, 1], [2, 3]]), dp_axis=0, tp_axis=1)
        >>> plan["*.mlp.c_fc.weight"], plan["*.ln_1"]
        ((B, S(0)), (S(0), B))
        """
        n = placement.ndim
        for name, axis in (("dp_axis", dp_axis), ("tp_axis", tp_axis)):
            if axis is not None and not 0 <= axis < n:
                raise ConfigError(f"GPT.parallel_plan: {name}={axis} is not an axis of the mesh {placement.mesh}")

        def nd(dp, tp):
            return tuple(dp if k == dp_axis else tp if k == tp_axis else broadcast for k in range(n))

        b = broadcast
        plan = {}
        if tp_axis is not None:
            plan.update({"*.attn.c_attn.weight": nd(b, split(1)), "*.attn.c_attn.bias": nd(b, split(1)),
                         "*.mlp.c_fc.weight": nd(b, split(0)), "*.mlp.c_fc.bias": nd(b, split(0)),
                         "*.c_proj.weight": nd(b, split(1))})
            if vocab_parallel:
                plan.update({"transformer.wte.weight": nd(b, split(0)), "lm_head.weight": nd(b, split(0))})
        tokens = split(1) if sequence_parallel and tp_axis is not None else b
        plan.update({"*.ln_1": nd(split(0), tokens), "*.ln_2": nd(split(0), tokens), "*.ln_f": nd(split(0), b)})
        if tokens is not b:  # the column-split layers take every token: an all-gather of the activations
            plan.update({"*.attn.c_attn": nd(split(0), b), "*.mlp.c_fc": nd(split(0), b)})
        return plan

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95)):
        """AdamW with weight decay on matrices and embeddings only (nanoGPT's grouping: by the
        parameter's shape in state dicts, so the attention's bias, stored (3, C) for its
        (3C,), is not decayed)."""
        params = [p for _, p in self.named_parameters()]
        decay = [p for p in params if len(p.state_shape or p.shape) >= 2]
        no_decay = [p for p in params if len(p.state_shape or p.shape) < 2]
        return AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                     lr=learning_rate, betas=betas)

    @no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T), feeding each one back in."""
        tokens = np.asarray(idx.numpy() if isinstance(idx, Tensor) else idx, dtype=np.int64)
        rng = fsf.generator()
        for _ in range(max_new_tokens):
            context = tokens[:, -self.config.block_size:]
            logits, _ = self(fsf.tensor(context))
            logits = logits.numpy()[:, -1, :].astype(np.float64) / max(temperature, 1e-8)
            if top_k is not None:
                kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
                logits = np.where(logits < kth, -np.inf, logits)
            probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            nxt = np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)[:, None]
            tokens = np.concatenate([tokens, nxt], axis=1)
        return fsf.tensor(tokens)


def vocab_parallel_cross_entropy(logits: Tensor, targets: Tensor, vocab_size: int, ignore_index: int = -100) -> Tensor:
    """Mean cross entropy of logits split along the vocabulary (Megatron-LM's): the row maximum
    is an all-reduce of op max (``vocab_max``'s ``P(max)``), the sum of exp(logit - max) and the
    target's logit are partial sums over the vocabulary shards (``vocab_ce_parts``, then one
    all-reduce each); the gradient is softmax minus one-hot on each shard, with no communication.
    Equal to ``F.cross_entropy(logits[..., :vocab_size], targets)`` on any layout."""
    m = apply("vocab_max", logits).detach()  # a constant shift: no gradient, no extra pass over the logits
    total, picked = apply("vocab_ce_parts", logits, targets, m, vocab_size=vocab_size, ignore_index=ignore_index)
    valid = (targets != ignore_index).astype(logits.dtype)
    losses = (total.log() + m - picked) * valid
    return losses.sum() / valid.sum()

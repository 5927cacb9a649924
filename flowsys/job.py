"""The job a ``flowsys train`` or ``flowsys plan`` runs: its typed sections, how a YAML file and
``section.key=value`` overrides become one, and the checks a layout must pass.

A job is a YAML mapping of flat, typed sections; unknown sections or keys are errors::

    model: {vocab_size: 256, block_size: 64, n_layer: 2, n_head: 4, n_embd: 128}
    optim: {lr: 3e-3, weight_decay: 0.1, betas: [0.9, 0.95], warmup_steps: 30, grad_clip: 1.0}
    data:  {source: stdlib, max_bytes: 4194304, batch_size: 16, val_fraction: 0.1}
    train: {steps: 300, seed: 0, eval_batches: 8, log_every: 25}

>>> job = job_from_dict({"train": {"steps": 50}}, {"optim.lr": parse_value("3e-4")})
>>> job.train.steps, job.optim.lr
(50, 0.0003)
>>> job_from_dict(job_to_dict(job)) == job
True

The sections are frozen dataclasses, as the model's ``GPTConfig`` is (nanoGPT's habit): the
schema is the classes themselves, which ``flowsys train --help`` prints, and a value of the
wrong type is refused by :func:`_coerce` with no silent conversion (bools are not ints). Pydantic
would add a dependency and a second way of saying what ``GPTConfig`` already says.

Scalars follow YAML 1.2's core schema in files and overrides alike: ``3e-4`` is a float (YAML
1.1, which PyYAML implements, reads it as a string), ``yes``/``no``/``on``/``off`` stay strings,
``010`` is ten and a date stays a string. A SafeLoader subclass with 1.2 resolvers does it
rather than ruamel.yaml: one dependency fewer, and PyYAML stays the parser everywhere else.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowsys.errors import ConfigError
from flowsys.models import GPTConfig


def _key(default: Any, help: str) -> Any:  # noqa: A002 - argparse's word
    """A section's key: its default and the line ``flowsys train --help`` shows for it."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a warmup and cosine learning-rate schedule."""

    lr: float = _key(3e-3, "peak learning rate")
    weight_decay: float = _key(0.1, "AdamW weight decay (matrices only)")
    betas: tuple[float, float] = _key((0.9, 0.95), "AdamW betas")
    warmup_steps: int = _key(30, "linear warmup steps, then cosine decay")
    min_lr_ratio: float = _key(0.1, "the final learning rate, as a fraction of lr")
    grad_clip: float = _key(1.0, "clip gradients to this global norm (0: no clipping)")


@dataclass(frozen=True)
class DataConfig:
    source: str = _key("stdlib", "stdlib (Python's own sources, as bytes), a prepared directory, or A:0.7,B:0.3")
    max_bytes: int = _key(4 << 20, "bytes of the stdlib corpus used")
    batch_size: int = _key(16, "samples per step (all micro-batches and data-parallel ranks together)")
    val_fraction: float = _key(0.1, "the held-out tail used for validation")


@dataclass(frozen=True)
class RunConfig:
    steps: int = _key(300, "training steps")
    seed: int = _key(0, "parameters and sample order")
    eval_batches: int = _key(8, "validation batches at the end")
    log_every: int = _key(25, "a progress line every N steps")
    metrics: str = _key("", "a JSONL file, one line per step; config.yaml is written beside it")
    tensorboard: str = _key("", "a TensorBoard log directory (when torch's SummaryWriter imports)")
    hardware: str = _key("", "the spec MFU is measured against (cpu, a100-80g, h100-80g, a YAML file); "
                             "default: this machine's GEMM peak, cached")
    precision: str = _key("fp32", "fp32 | bf16 | fp16 compute (fp32 master weights; fp16 scales the loss)")
    on_nonfinite: str = _key("stop", "a NaN/inf loss or gradient: stop (naming the step) | skip (that update)")
    grad_reduce_dtype: str = _key("fp32", "fp32 | the compute dtype: gradients reduced across ranks in it")


@dataclass(frozen=True)
class ParallelConfig:
    """The layout: data x tensor parallel inside each of ``pp`` pipeline stages."""

    dp: int = _key(1, "data-parallel ranks")
    tp: int = _key(1, "tensor-parallel ranks (divides n_head and n_embd)")
    pp: int = _key(1, "pipeline stages (at most n_layer)")
    zero_stage: int = _key(0, "ZeRO 0-3: optimizer state, gradients, parameters sharded over dp")
    micro_batches: int = _key(1, "micro-batches per step (gradient accumulation, pipeline)")
    activation_checkpointing: bool = _key(False, "recompute each block's activations in backward")
    vocab_parallel: bool = _key(True, "with tp > 1: embedding and tied head split along the vocabulary")
    sequence_parallel: bool = _key(False, "with tp > 1: layer norms, dropout and the residual stream split "
                                          "along the sequence over tp (a reduce-scatter and an all-gather "
                                          "in place of each all-reduce)")

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp


@dataclass(frozen=True)
class ClusterConfig:
    """Where a parallel job runs: ``local`` (worker threads here) or ``ray`` (one Ray actor per
    device on ``nodes`` simulated nodes, or on the cluster at ``address``)."""

    backend: str = _key("local", "local (worker threads here) | ray (one actor per device)")
    nodes: int = _key(1, "simulated Ray nodes (without address)")
    devices_per_node: int = _key(1, "devices per Ray node")
    address: str = _key("", "join this Ray cluster (host:port) instead of simulating one")
    # it protects the data plane when Ray's own channel, which carries the key, is protected too
    tls: bool = _key(False, "TLS between the workers' gRPC transport, a certificate per job")


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints every ``every`` steps under ``dir``; after a lost worker the job resumes from
    the latest complete one, at most ``max_restarts`` times."""

    dir: str = _key("", "checkpoint directory (its latest verified checkpoint is resumed from)")
    every: int = _key(0, "save every N steps (0: never)")
    max_restarts: int = _key(0, "restarts from the latest checkpoint after a lost worker")
    resume: str = _key("auto", "auto (latest verified, corrupt ones skipped) | must | never")
    keep: int = _key(0, "the newest checkpoints kept (0: all)")


_MODEL_HELP = {  # GPTConfig lives with the model; what its keys mean, for --help
    "vocab_size": "tokens (at least the data's vocabulary: 256 for bytes)", "block_size": "context length",
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_embd": "width",
    "dropout": "dropout probability", "bias": "biases in Linear and LayerNorm, as GPT-2",
    "padded_vocab_size": "embedding rows (derived: leave it unset)",
}


@dataclass(frozen=True)
class JobConfig:
    model: GPTConfig = field(default_factory=lambda: GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4,
                                                               n_embd=128))
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


SECTIONS = {"model": GPTConfig, "optim": OptimConfig, "data": DataConfig, "train": RunConfig,
            "parallel": ParallelConfig, "cluster": ClusterConfig, "checkpoint": CheckpointConfig}


# ------------------------------------------------------------------------------------ YAML 1.2
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars."""


class _Dumper(yaml.SafeDumper):
    """Quotes a string whenever :class:`_Loader` would read it as something else."""


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_RESOLVERS = [  # YAML 1.2 core schema: https://yaml.org/spec/1.2.2/#1032-tag-resolution
    (_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    (_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")),
    (_FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789.")),
]
_REPLACED = (_BOOL, _INT, _FLOAT, _TIMESTAMP)  # YAML 1.1's, which PyYAML resolves by default
for _cls in (_Loader, _Dumper):
    _cls.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in rows if tag not in _REPLACED]
                                    for first, rows in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for _tag, _rx, _first in _RESOLVERS:  # ints before floats: "10" is an int
        _cls.add_implicit_resolver(_tag, _rx, _first)


def _construct_int(loader: _Loader, node) -> int:
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    return int(text[2:] if base != 10 else text, base)


_Loader.add_constructor(_INT, _construct_int)


def parse_yaml(text) -> Any:
    """``text`` (a string or an open file) read as YAML with 1.2 scalars (``3e-4`` a float,
    ``yes`` a string)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_value(text: str) -> Any:
    """The value of a ``section.key=value`` override (an empty value is the empty string)."""
    return parse_yaml(text) if text.strip() else ""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=50", "optim.lr=3e-4"]`` as ``{"train.steps": 50, "optim.lr": 0.0003}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not section.key=value (e.g. train.steps=50)")
        try:
            out[key.strip()] = parse_value(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not YAML ({str(e).splitlines()[0]})") from None
    return out


# ------------------------------------------------------------------------------------- building
def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    """``value`` as field ``f``'s type (its annotation); a ConfigError naming the key if it is not one."""
    kind = str(f.type).replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")

    def bad() -> ConfigError:
        want = "tuple of 2 numbers" if kind.startswith("tuple") else kind
        return ConfigError(f"job key {section}.{f.name}: expected {want}{' or null' if optional else ''}, "
                           f"got {value!r} ({type(value).__name__})")

    if value is None and optional:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind.startswith("tuple"):
        size = kind.count(",") + 1
        if not isinstance(value, (list, tuple)) or len(value) != size or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad()
        return tuple(float(v) for v in value)
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not number or isinstance(value, float):
            raise bad()
        return value
    if kind == "float":
        if not number:
            raise bad()
        return float(value)
    if kind == "str" and not isinstance(value, str):
        raise bad()
    return value


def job_from_dict(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> JobConfig:
    """Build a :class:`JobConfig` from sections and dotted overrides; unknown sections and keys,
    a section that is not a mapping, and values of the wrong type are a :class:`ConfigError`."""
    if not isinstance(values, dict):
        raise ConfigError(f"a job is a mapping of sections {sorted(SECTIONS)}, got {type(values).__name__}")
    merged: dict[str, dict[str, Any]] = {}
    for section, given in values.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown job section {section!r}; known sections are {sorted(SECTIONS)}")
        if given is not None and not isinstance(given, dict):
            raise ConfigError(f"job section {section!r} must be a mapping of keys (e.g. {section}: "
                              f"{{key: value}}), got {given!r} ({type(given).__name__})")
        merged[section] = dict(given or {})
    for dotted, v in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted}={v!r}: use section.key=value, e.g. train.steps=50")
        if section not in SECTIONS:
            raise ConfigError(f"override {dotted}: unknown job section {section!r}; known sections are "
                              f"{sorted(SECTIONS)}")
        merged.setdefault(section, {})[key] = v
    built = {}
    defaults = JobConfig()
    for section, cls in SECTIONS.items():
        given = merged.get(section, {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise ConfigError(f"job section {section!r}: unknown key(s) {unknown}; known keys are {sorted(fields)}")
        base = {f: getattr(getattr(defaults, section), f) for f in fields}
        base.update({k: _coerce(section, fields[k], v) for k, v in given.items()})
        built[section] = cls(**base)
    job = JobConfig(**built)
    check_layout(job)
    return job


def load_job(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """The job in YAML file ``path`` with ``overrides`` (``{"train.steps": 50}``) applied.

    >>> load_job("examples/gpt_stdlib.yaml", {"train.steps": 50}).train.steps  # doctest: +SKIP
    50
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {path} does not exist" if not path.exists() else f"job file {path} is not a file")
    try:
        with path.open() as f:  # (errors then name the file)
            values = parse_yaml(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"job file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if values is None:
        raise ConfigError(f"job file {path} is empty; a job is a mapping of sections {sorted(SECTIONS)} "
                          f"(see examples/gpt_stdlib.yaml)")
    if not isinstance(values, dict):
        raise ConfigError(f"job file {path}: expected a mapping of sections {sorted(SECTIONS)}, got "
                          f"{type(values).__name__} {values!r:.60}")
    return job_from_dict(values, overrides)


def job_to_dict(job: JobConfig) -> dict[str, dict[str, Any]]:
    """The job as plain YAML/JSON values (tuples as lists): what :func:`job_from_dict` reads back,
    what ``config.yaml`` and every checkpoint's ``extra["job"]`` hold."""
    return {name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(job, name)).items()}
            for name in SECTIONS}


def dump_job(job: JobConfig) -> str:
    """The job as YAML text that :func:`load_job` reads back to the same job."""
    return yaml.dump(job_to_dict(job), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def describe_schema() -> str:
    """Every section and key with its type, default and meaning: ``flowsys train --help``."""
    defaults = JobConfig()
    lines = ["job sections and keys (type, default):"]
    for section, cls in SECTIONS.items():
        lines.append(f"  {section}:")
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            shown = yaml.dump(list(default) if isinstance(default, tuple) else default, Dumper=_Dumper,
                              default_flow_style=True).strip().removesuffix("...").strip()
            meaning = f.metadata.get("help") or _MODEL_HELP.get(f.name, "")
            lines.append(f"    {section}.{f.name} ({f.type}, default {shown or repr('')})" + (f": {meaning}" * bool(meaning)))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- checks
def check_layout(job: JobConfig, devices: int | None = None) -> None:
    """The parallel layout fits the model, the batch and (when given) the device count, or a
    ConfigError names the key and what would fit."""
    p, m = job.parallel, job.model
    for key in ("dp", "tp", "pp", "micro_batches"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key} must be at least 1, got {getattr(p, key)}")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    if p.zero_stage and p.dp == 1 and p.tp == 1:  # (beside tensor parallelism: a data-parallel group of one)
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} shards over the data-parallel axis, but parallel.dp is 1")
    if devices is not None and p.devices != devices:
        raise ConfigError(f"parallel layout dp {p.dp} x tp {p.tp} x pp {p.pp} = {p.devices} devices does not fit "
                          f"{devices} devices; choose dp, tp and pp whose product is {devices}")
    if p.pp > m.n_layer:
        raise ConfigError(f"parallel.pp={p.pp} stages for model.n_layer={m.n_layer} blocks; use at most {m.n_layer}")
    if m.n_head % p.tp or m.n_embd % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide model.n_head={m.n_head} and model.n_embd={m.n_embd}")
    if p.sequence_parallel and p.tp > 1 and m.block_size % p.tp:
        raise ConfigError(f"parallel.sequence_parallel splits the sequence over parallel.tp={p.tp}, which must divide "
                          f"model.block_size={m.block_size}; choose a tp that divides it or sequence_parallel=false")
    t = job.train
    for key in ("steps", "log_every", "eval_batches"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {getattr(t, key)}")
    if t.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {t.precision!r}")
    if t.grad_reduce_dtype not in ("fp32", t.precision):
        raise ConfigError(f"train.grad_reduce_dtype must be fp32 or the compute dtype train.precision="
                          f"{t.precision!r}, got {t.grad_reduce_dtype!r}")
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite must be stop or skip, got {t.on_nonfinite!r}")
    k = job.checkpoint
    if k.every < 0 or k.max_restarts < 0:
        raise ConfigError(f"checkpoint.every and checkpoint.max_restarts must be >= 0, got {k.every} and {k.max_restarts}")
    if (k.every or k.max_restarts) and not k.dir:
        raise ConfigError("checkpoint.dir must name a directory when checkpoint.every or checkpoint.max_restarts is set")
    if k.max_restarts and not k.every:
        raise ConfigError("checkpoint.max_restarts needs checkpoints to resume from: set checkpoint.every")
    if k.resume not in ("auto", "never", "must"):
        raise ConfigError(f"checkpoint.resume must be auto, never or must, got {k.resume!r}")
    if k.keep < 0:
        raise ConfigError(f"checkpoint.keep must be >= 0 (0 keeps every checkpoint), got {k.keep}")
    c = job.cluster
    if c.backend not in ("local", "ray"):
        raise ConfigError(f"cluster.backend must be 'local' or 'ray', got {c.backend!r}")
    if c.nodes < 1 or c.devices_per_node < 1:
        raise ConfigError(f"cluster.nodes and cluster.devices_per_node must be at least 1, got {c.nodes} and "
                          f"{c.devices_per_node}")
    if c.backend == "ray" and c.nodes * c.devices_per_node < p.devices:
        raise ConfigError(f"cluster: {c.nodes} node(s) x {c.devices_per_node} device(s) cannot hold the layout's "
                          f"{p.devices} devices (parallel dp x tp x pp); raise cluster.nodes")
    d = job.data
    if d.batch_size < 1:
        raise ConfigError(f"data.batch_size must be at least 1, got {d.batch_size}")
    if d.batch_size % p.micro_batches or (d.batch_size // p.micro_batches) % p.dp:
        raise ConfigError(f"data.batch_size={d.batch_size} must split into parallel.micro_batches={p.micro_batches} "
                          f"micro-batches of a multiple of parallel.dp={p.dp} samples")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be between 0 and 1, got {d.val_fraction}")

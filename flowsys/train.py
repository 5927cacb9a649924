"""Config-driven GPT training: what ``flowsys train JOB.yaml`` runs.

A job is a YAML mapping of flat, typed sections; unknown sections or keys are errors::

    model: {vocab_size: 256, block_size: 64, n_layer: 2, n_head: 4, n_embd: 128}
    optim: {lr: 3.0e-3, weight_decay: 0.1, betas: [0.9, 0.95], warmup_steps: 30, grad_clip: 1.0}
    data:  {source: stdlib, max_bytes: 4194304, batch_size: 16, val_fraction: 0.1}
    train: {steps: 300, seed: 0, eval_batches: 8, log_every: 25}

Overrides on the command line use dotted keys: ``flowsys train job.yaml train.steps=50``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowsys.autograd import no_grad
from flowsys.data import ByteDataset
from flowsys.errors import ConfigError
from flowsys.functions import manual_seed
from flowsys.models import GPT, GPTConfig
from flowsys.optim import WarmupCosine, clip_grad_norm_
from flowsys.precision import LossScaler, autocast, low_dtype


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"
    max_bytes: int = 4 << 20
    batch_size: int = 16
    val_fraction: float = 0.1


@dataclass(frozen=True)
class RunConfig:
    steps: int = 300
    seed: int = 0
    eval_batches: int = 8
    log_every: int = 25
    metrics: str = ""  # a JSONL file: one line per step (step, loss, lr, tokens/s, FLOP/s, MFU, elapsed)
    tensorboard: str = ""  # a TensorBoard log directory (when torch's SummaryWriter can be imported)
    hardware: str = ""  # the spec whose peak MFU is measured against (scheduler/hardware/); default: a GEMM probe here
    precision: str = "fp32"  # fp32 | bf16 | fp16: the compute dtype (fp32 master weights; fp16 scales the loss)
    grad_reduce_dtype: str = "fp32"  # fp32 (main grads) | the compute dtype: gradients reduced across ranks in it


@dataclass(frozen=True)
class ParallelConfig:
    """The layout: data x tensor parallel inside each of ``pp`` pipeline stages."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    micro_batches: int = 1
    activation_checkpointing: bool = False
    # with tp > 1: the embedding and tied head split along the (padded) vocabulary (Megatron-LM)
    vocab_parallel: bool = True

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp


@dataclass(frozen=True)
class ClusterConfig:
    """Where a parallel job runs: ``local`` (worker threads here) or ``ray`` (one Ray actor per
    device on ``nodes`` simulated nodes, or on the cluster at ``address``)."""

    backend: str = "local"
    nodes: int = 1
    devices_per_node: int = 1
    address: str = ""


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints of a parallel job every ``every`` steps under ``dir`` (0: none); after a lost
    worker the job resumes from the latest complete one, at most ``max_restarts`` times."""

    dir: str = ""
    every: int = 0
    max_restarts: int = 0


@dataclass(frozen=True)
class JobConfig:
    model: GPTConfig = field(default_factory=lambda: GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128))
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


_SECTIONS = {"model": GPTConfig, "optim": OptimConfig, "data": DataConfig, "train": RunConfig,
             "parallel": ParallelConfig, "cluster": ClusterConfig, "checkpoint": CheckpointConfig}
_LATER: dict[str, str] = {}


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
    t = job.train
    if t.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {t.precision!r}")
    if t.grad_reduce_dtype not in ("fp32", t.precision):
        raise ConfigError(f"train.grad_reduce_dtype must be fp32 or the compute dtype train.precision="
                          f"{t.precision!r}, got {t.grad_reduce_dtype!r}")
    k = job.checkpoint
    if k.every < 0 or k.max_restarts < 0:
        raise ConfigError(f"checkpoint.every and checkpoint.max_restarts must be >= 0, got {k.every} and {k.max_restarts}")
    if (k.every or k.max_restarts) and not k.dir:
        raise ConfigError("checkpoint.dir must name a directory when checkpoint.every or checkpoint.max_restarts is set")
    if k.max_restarts and not k.every:
        raise ConfigError("checkpoint.max_restarts needs checkpoints to resume from: set checkpoint.every")
    c = job.cluster
    if c.backend not in ("local", "ray"):
        raise ConfigError(f"cluster.backend must be 'local' or 'ray', got {c.backend!r}")
    if c.nodes < 1 or c.devices_per_node < 1:
        raise ConfigError(f"cluster.nodes and cluster.devices_per_node must be at least 1, got {c.nodes} and "
                          f"{c.devices_per_node}")
    if c.backend == "ray" and c.nodes * c.devices_per_node < p.devices:
        raise ConfigError(f"cluster: {c.nodes} node(s) x {c.devices_per_node} device(s) cannot hold the layout's "
                          f"{p.devices} devices (parallel dp x tp x pp); raise cluster.nodes")
    bs = job.data.batch_size
    if bs % p.micro_batches or (bs // p.micro_batches) % p.dp:
        raise ConfigError(f"data.batch_size={bs} must split into parallel.micro_batches={p.micro_batches} "
                          f"micro-batches of a multiple of parallel.dp={p.dp} samples")


def _coerce(section: str, cls, key: str, value: Any) -> Any:
    """``value`` as the type of ``cls.key``'s default; a ConfigError naming the key if it is not one."""
    f = {f.name: f for f in dataclasses.fields(cls)}[key]
    default = f.default
    if default is dataclasses.MISSING:  # a required field: its annotation gives the type
        default = {"int": 0, "float": 0.0, "bool": False, "str": ""}.get(str(f.type), None)
    want = type(default).__name__

    def bad() -> ConfigError:
        return ConfigError(f"job key {section}.{key}: expected {want}, got {value!r} ({type(value).__name__})")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad()
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default) or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad()
        return tuple(float(v) for v in value)
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad()
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad()
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise bad()
    return value


def job_from_dict(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> JobConfig:
    """Build a :class:`JobConfig`; unknown sections and keys are a :class:`ConfigError`."""
    merged: dict[str, dict[str, Any]] = {k: dict(v or {}) for k, v in (values or {}).items()}
    for dotted, v in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted}={v!r}: use section.key=value, e.g. train.steps=50")
        merged.setdefault(section, {})[key] = v
    for section in merged:
        if section in _LATER:
            raise ConfigError(f"job section {section!r} needs {_LATER[section]}, which this version does not have yet")
        if section not in _SECTIONS:
            raise ConfigError(f"unknown job section {section!r}; known sections are {sorted(_SECTIONS)}")
    built = {}
    defaults = JobConfig()
    for section, cls in _SECTIONS.items():
        given = merged.get(section, {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ConfigError(f"job section {section!r}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        base = dataclasses.asdict(getattr(defaults, section))
        base.update({k: _coerce(section, cls, k, v) for k, v in given.items()})
        built[section] = cls(**base)
    if built["data"].source != "stdlib":
        raise ConfigError(f"data.source {built['data'].source!r} is not known; the built-in corpus is 'stdlib'")
    job = JobConfig(**built)
    check_layout(job)
    return job


def load_job(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    import yaml  # noqa: PLC0415 - only the CLI needs it

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"job file {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"job file {path}: expected a mapping of sections, got {type(values).__name__}")
    return job_from_dict(values, overrides)


class Progress:
    """The live progress of a training run: a line every ``log_every`` steps (step, loss,
    tokens/s, model FLOP/s and MFU, ETA; redrawn in place on a terminal), and the metrics of
    every step as JSONL and, when asked and installed, to TensorBoard.

    MFU is the model's FLOPs per step (from the compiled graph, ``flowsys.plan.model_flops``)
    per second of step, over the peak FLOP/s of what it runs on: the machine's GEMM peak for
    CPU devices (simulated devices share it), or the hardware spec's per-device peak times the
    devices."""

    def __init__(self, job: JobConfig, log=print, flops_per_step: int = 0, peak_flops: float = 0.0):
        self.steps, self.every, self.log = job.train.steps, job.train.log_every, log
        self.tokens = job.data.batch_size * job.model.block_size
        self.flops, self.peak = flops_per_step, peak_flops
        self.t0 = self.last = time.perf_counter()
        self.window: list[float] = []  # step times since the last line
        self.metrics = open(job.train.metrics, "a") if job.train.metrics else None  # noqa: SIM115
        self.board = None
        if job.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

                self.board = SummaryWriter(job.train.tensorboard)
            except Exception as e:  # noqa: BLE001 - optional: say why and go on
                log(f"train.tensorboard: not writing TensorBoard logs ({type(e).__name__}: {e})")

    def step(self, i: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        elapsed, step_s = now - self.t0, now - self.last
        self.last = now
        self.window.append(step_s)
        rate = i * self.tokens / elapsed
        flops_per_s = self.flops / step_s if step_s > 0 else 0.0
        mfu = flops_per_s / self.peak if self.peak else 0.0
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": i, "loss": loss, "lr": lr, "tokens_per_s": rate, "step_s": step_s,
                                           "flops_per_step": self.flops, "flops_per_s": flops_per_s, "mfu": mfu,
                                           "elapsed_s": elapsed}) + "\n")
            self.metrics.flush()
        if self.board is not None:
            self.board.add_scalar("loss", loss, i)
            self.board.add_scalar("tokens_per_s", rate, i)
            self.board.add_scalar("mfu", mfu, i)
        if i % self.every == 0 or i == self.steps:
            eta = elapsed / i * (self.steps - i)
            steps, seconds = len(self.window), sum(self.window)
            self.window = []
            throughput = ""
            if self.flops and seconds > 0:  # over the steps since the last line
                achieved = self.flops * steps / seconds
                throughput = f"  {achieved / 1e9:,.2f} GFLOP/s" + (f"  MFU {achieved / self.peak:.1%}" if self.peak else "")
            self.log(f"step {i:>5}/{self.steps}  loss {loss:.4f}  {rate:,.0f} tok/s{throughput}  ETA {_clock(eta)}")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.board is not None:
            self.board.close()


def throughput_model(job: JobConfig, log=print) -> tuple[int, float]:
    """The model FLOPs of one training step of ``job`` (from its compiled graph) and the peak
    FLOP/s its MFU is measured against (see :class:`Progress`)."""
    from flowsys.plan import model_flops  # noqa: PLC0415
    from scheduler.cost import load_hardware, probe_gemm  # noqa: PLC0415

    flops = model_flops(job)
    if job.train.hardware:
        hw = load_hardware(job.train.hardware)
        peak = hw.peak("float32") * (1 if hw.device == "cpu" else job.parallel.devices)
        source = f"{hw.name} spec"
    else:  # CPU devices simulated on this machine share its cores: the machine's GEMM peak
        peak, source = probe_gemm(), "a float32 GEMM on this machine"
    log(f"model FLOPs per step: {flops / 1e9:,.3f} GFLOP; peak {peak / 1e9:,.1f} GFLOP/s ({source})")
    return flops, peak


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


EVAL_SEED = 1234  # the same validation windows every time, in every layout


def evaluate(model: GPT, data: ByteDataset, batch_size: int, block_size: int, batches: int,
             precision: str = "fp32") -> float:
    """The mean validation loss over ``batches`` batches, eagerly on the driver."""
    model.eval()
    val = data.batches(batch_size, block_size, seed=EVAL_SEED, split="val")
    with no_grad(), autocast(low_dtype(precision), enabled=precision != "fp32"):
        losses = [model(*val.at(j))[1].item() for j in range(batches)]
    model.train()
    return float(np.mean(losses))


def evaluate_compiled(model: GPT, data: ByteDataset, batch_size: int, block_size: int, batches: int,
                      placement, sbp, precision: str = "fp32") -> float:
    """The same mean validation loss as :func:`evaluate`, as a compiled forward-only step: the
    workers read the validation windows and run the model where its parameters are."""
    from flowsys.graph.api import Graph  # noqa: PLC0415

    class EvalStep(Graph):
        def __init__(self):
            super().__init__()
            self.model = model
            self.config.precision = precision

        def build(self, idx, targets):
            return self.model(idx, targets)[1]

    model.eval()
    step, val = EvalStep(), data.batches(batch_size, block_size, seed=EVAL_SEED, split="val")
    try:
        losses = [float(step(*val.at(j, placement, sbp))) for j in range(batches)]
    finally:
        model.train()
    return float(np.mean(losses))


def run(job: JobConfig, log=print) -> dict[str, Any]:
    """Train, evaluate, and return a summary (losses, validation loss, entropy, throughput)."""
    if job.parallel.devices > 1:
        return run_parallel(job, log)
    manual_seed(job.train.seed)
    data = ByteDataset.from_stdlib(job.data.max_bytes, job.data.val_fraction)
    if job.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size {job.model.vocab_size} is smaller than the data's {data.vocab_size} byte tokens")
    model = GPT(job.model)
    o = job.optim
    opt = model.configure_optimizers(o.weight_decay, o.lr, o.betas)
    sched = WarmupCosine(opt, o.warmup_steps, job.train.steps, min_lr=o.lr * o.min_lr_ratio)
    log(f"model: GPT, {model.num_parameters():,} parameters; data: {data}")
    bs, t = job.data.batch_size, job.model.block_size
    batches = data.batches(bs, t, seed=job.train.seed)  # the samples every layout sees at each step
    progress = Progress(job, log, *throughput_model(job, log))
    precision = job.train.precision
    scaler = LossScaler() if precision == "fp16" else None
    losses, t0 = [], time.perf_counter()
    for step in range(1, job.train.steps + 1):
        x, y = batches.at(step)
        with autocast(low_dtype(precision), enabled=precision != "fp32"):
            _, loss = model(x, y)
        opt.zero_grad()
        lr = opt.param_groups[0]["lr"]
        if scaler is None:
            loss.backward()
        else:  # fp16: backward from the scaled loss, unscale, and skip a step that overflowed
            (loss * scaler.scale).backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            for g in grads:
                g._data *= np.float32(1.0 / scaler.scale)
            finite = all(bool(np.isfinite(g.numpy()).all()) for g in grads)
            scaler.update(finite)
        if scaler is None or not scaler.last_skipped:
            if o.grad_clip > 0:
                clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
        sched.step()
        losses.append(loss.item())
        progress.step(step, losses[-1], lr)
    progress.close()
    val = evaluate(model, data, bs, t, job.train.eval_batches, precision)
    summary = {"steps": job.train.steps, "final_train_loss": losses[-1], "val_loss": val,
               "unigram_entropy": data.unigram_entropy("val"),
               "tokens_per_s": job.train.steps * bs * t / (time.perf_counter() - t0), **_precision_summary(job, scaler)}
    log(json.dumps(summary))
    return summary


def _precision_summary(job: JobConfig, scaler) -> dict[str, Any]:
    """The summary's precision keys: fp16 adds its steps skipped for an overflow and its last scale."""
    if job.train.precision == "fp32":
        return {}
    out: dict[str, Any] = {"precision": job.train.precision}
    if scaler is not None:
        out.update(skipped_steps=scaler.skipped_steps, loss_scale=scaler.scale)
    return out


def run_parallel(job: JobConfig, log=print) -> dict[str, Any]:
    """The job's layout compiled as one graph (``flowsys.plan.build``) and run on the backend
    ``fs.init`` chose (Ray under ``flowsys launch``, else worker threads here)."""
    from flowsys import runtime  # noqa: PLC0415
    from flowsys.errors import RankFailed  # noqa: PLC0415
    from flowsys.plan import build, layout  # noqa: PLC0415
    from flowsys.sbp import broadcast, split  # noqa: PLC0415

    o, p = job.optim, job.parallel  # optim.grad_clip: clipped in the compiled step (plan.build)
    manual_seed(job.train.seed)
    data = ByteDataset.from_stdlib(job.data.max_bytes, job.data.val_fraction)
    if job.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size {job.model.vocab_size} is smaller than the data's {data.vocab_size} byte tokens")
    placements = layout(job)
    model, opt, step = build(job, placements, meta=True)  # the workers create their own shards
    backend = runtime.current() or runtime.init()
    if job.checkpoint.dir and job.checkpoint.every:  # the workers write and read their own checkpoint files
        from flowsys import checkpoint  # noqa: PLC0415

        checkpoint.check_visible(backend, job.checkpoint.dir, world=p.devices)
    sched = WarmupCosine(opt, o.warmup_steps, job.train.steps, min_lr=o.lr * o.min_lr_ratio)
    log(f"model: GPT, {model.num_parameters():,} parameters on {p.devices} devices (dp {p.dp} x tp {p.tp} x pp {p.pp}, "
        f"ZeRO {p.zero_stage}, {p.micro_batches} micro-batch(es)) on the {backend.name} backend; data: {data}")
    bs, t = job.data.batch_size, job.model.block_size
    batches = data.batches(bs, t, seed=job.train.seed)  # step i's samples, read by the workers
    first, batch = placements[0], (split(0), broadcast)
    ck = job.checkpoint
    max_restarts = max(ck.max_restarts, int(os.environ.get("FLOWSYS_MAX_RESTARTS", "0")) if ck.every else 0)
    progress = Progress(job, log, *throughput_model(job, log))
    losses, seen, t0 = [], [], time.perf_counter()
    restarts, i = 0, 1
    while i <= job.train.steps:
        lr = opt.param_groups[0]["lr"]
        try:
            loss = step(*batches.at(i, first, batch))
        except RankFailed as e:
            if restarts >= max_restarts:
                raise
            restarts += 1
            from flowsys import checkpoint  # noqa: PLC0415

            found = checkpoint.latest(ck.dir)
            log(f"step {i}: {e}; restart {restarts}/{max_restarts} from "
                f"{found.name if found is not None else 'the start'}")
            if found is None:  # nothing saved yet: the first step again, from the same start
                raise ConfigError(f"no checkpoint under {ck.dir} to resume from after: {e}") from e
            info = checkpoint.load(found, model, opt, loss_scaler=step.loss_scaler)
            i = info["step"] + 1  # the data is addressed by step: nothing else to restore
            losses, seen = losses[:info["step"]], seen[:info["step"]]
            sched.last_step = info["step"]
            sched._apply()
            continue
        sched.step()
        losses.append(float(loss))
        seen.append(step.samples_digest[0])  # a fingerprint of the samples this step saw, made where they are
        progress.step(i, losses[-1], lr)
        if ck.every and i % ck.every == 0:
            from flowsys import checkpoint  # noqa: PLC0415

            checkpoint.save(ck.dir, model, opt, step=i, extra={"data_step": i}, loss_scaler=step.loss_scaler)
        i += 1
    progress.close()
    elapsed = time.perf_counter() - t0
    val = evaluate_compiled(model, data, bs, t, job.train.eval_batches, first, batch, job.train.precision)
    summary = {"steps": job.train.steps, "final_train_loss": losses[-1], "val_loss": val,
               "unigram_entropy": data.unigram_entropy("val"), "tokens_per_s": job.train.steps * bs * t / elapsed,
               "devices": p.devices, "backend": backend.name, "losses": losses, "restarts": restarts,
               "samples": seen, "samples_digest": hashlib.sha1(json.dumps(seen).encode()).hexdigest()[:16],
               **_precision_summary(job, step.loss_scaler)}
    log(json.dumps({k: v for k, v in summary.items() if k not in ("losses", "samples")}))
    return summary


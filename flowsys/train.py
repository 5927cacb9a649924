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
import math
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
    # a NaN/inf loss or gradient: "stop" ends the job naming the step, the loss and the last good
    # checkpoint; "skip" leaves that step's update out and goes on (fp16 overflows are the loss
    # scaler's business either way)
    on_nonfinite: str = "stop"
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
    # TLS between the workers (gRPC): the driver makes a certificate for the job and every rank
    # pins it. It protects the data plane when Ray's own channel, which carries the key, is
    # protected too (Ray's TLS or token authentication)
    tls: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints of a parallel job every ``every`` steps under ``dir`` (0: none); after a lost
    worker the job resumes from the latest complete one, at most ``max_restarts`` times."""

    dir: str = ""
    every: int = 0
    max_restarts: int = 0
    # run again, a job goes on from the latest complete, verified checkpoint in dir ("auto"; a
    # corrupt one is skipped with a warning), must ("must": none, or a corrupt latest, is an
    # error) or refuses a dir that holds checkpoints ("never")
    resume: str = "auto"
    keep: int = 0  # the newest checkpoints kept (0: all)


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
    if k.resume not in ("auto", "never", "must"):
        raise ConfigError(f"checkpoint.resume must be auto, never or must, got {k.resume!r}")
    if k.keep < 0:
        raise ConfigError(f"checkpoint.keep must be >= 0 (0 keeps every checkpoint), got {k.keep}")
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite must be stop or skip, got {t.on_nonfinite!r}")
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
        self.first: int | None = None  # the first step this process runs (a resumed job starts later)
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
        if self.first is None:
            self.first = i
        done = i - self.first + 1
        rate = done * self.tokens / elapsed
        flops_per_s = self.flops / step_s if step_s > 0 else 0.0
        mfu = flops_per_s / self.peak if self.peak else 0.0
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": i, "loss": _json_float(loss), "lr": lr, "tokens_per_s": rate, "step_s": step_s,
                                           "flops_per_step": self.flops, "flops_per_s": flops_per_s, "mfu": mfu,
                                           "elapsed_s": elapsed}) + "\n")
            self.metrics.flush()
        if self.board is not None:
            self.board.add_scalar("loss", loss, i)
            self.board.add_scalar("tokens_per_s", rate, i)
            self.board.add_scalar("mfu", mfu, i)
        if i % self.every == 0 or i == self.steps:
            eta = elapsed / done * (self.steps - i)
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
        bad = not math.isfinite(loss.item())
        if bad and job.train.on_nonfinite == "stop":
            raise NonFiniteLoss(f"step {step}: the loss is {loss.item()} (train.on_nonfinite: stop); lower the learning "
                                f"rate, clip gradients (optim.grad_clip) or set train.on_nonfinite: skip")
        if (scaler is None or not scaler.last_skipped) and not bad:
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
    ``fs.init`` chose (Ray under ``flowsys launch``, else worker threads here).

    With a checkpoint directory it never loses work: run again, it goes on from the latest
    complete, verified checkpoint (``checkpoint.resume``); a worker lost in any phase (a step,
    a checkpoint's pull or write, a load) restarts the job from there, at most
    ``checkpoint.max_restarts`` times; SIGTERM (preemption) saves a checkpoint at the end of the
    current step and exits."""
    from flowsys import runtime  # noqa: PLC0415
    from flowsys.errors import RankFailed  # noqa: PLC0415
    from flowsys.plan import build, layout  # noqa: PLC0415
    from flowsys.sbp import broadcast, split  # noqa: PLC0415

    o, p, ck = job.optim, job.parallel, job.checkpoint  # optim.grad_clip: clipped in the compiled step (plan.build)
    manual_seed(job.train.seed)
    data = ByteDataset.from_stdlib(job.data.max_bytes, job.data.val_fraction)
    if job.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size {job.model.vocab_size} is smaller than the data's {data.vocab_size} byte tokens")
    placements = layout(job)
    model, opt, step = build(job, placements, meta=True)  # the workers create their own shards
    step.config.skip_nonfinite = job.train.on_nonfinite == "skip"
    if job.cluster.tls:
        if job.cluster.backend != "ray" and os.environ.get("FLOWSYS_BACKEND") != "ray":
            raise ConfigError("cluster.tls: true encrypts the gRPC transport between Ray workers; set "
                              "cluster.backend: ray (the local backend's workers are threads of this process)")
        backend = runtime.init("ray", tls=True)
    else:
        backend = runtime.current() or runtime.init()
    saving = bool(ck.dir and ck.every)
    lock = None
    if saving:  # the workers write and read their own checkpoint files
        from flowsys import checkpoint  # noqa: PLC0415

        checkpoint.check_writable(ck.dir)
        lock = checkpoint.lock(ck.dir, _job_id(), warn=log)  # (says so when it takes a dead job's lock over)
        checkpoint.check_visible(backend, ck.dir, world=p.devices)
    sched = WarmupCosine(opt, o.warmup_steps, job.train.steps, min_lr=o.lr * o.min_lr_ratio)
    log(f"model: GPT, {model.num_parameters():,} parameters on {p.devices} devices (dp {p.dp} x tp {p.tp} x pp {p.pp}, "
        f"ZeRO {p.zero_stage}, {p.micro_batches} micro-batch(es)) on the {backend.name} backend; data: {data}")
    bs, t = job.data.batch_size, job.model.block_size
    batches = data.batches(bs, t, seed=job.train.seed)  # step i's samples, read by the workers
    first, batch = placements[0], (split(0), broadcast)
    max_restarts = max(ck.max_restarts, int(os.environ.get("FLOWSYS_MAX_RESTARTS", "0")) if ck.every else 0)
    progress = Progress(job, log, *throughput_model(job, log))
    run = _Run(job, model, opt, step, sched, log)
    preempted = _Preemption()
    restarts, t0, failed = 0, time.perf_counter(), None
    try:
        while True:
            try:
                if failed is not None:  # a worker was lost: back to the latest verified checkpoint
                    run.recover(failed, restarts, max_restarts)
                elif saving and run.resumed_from is None and run.trained == 0:
                    run.resume_at_start()
                while run.i <= job.train.steps:
                    i, lr = run.i, opt.param_groups[0]["lr"]
                    _driver_fault(i)
                    loss = float(step(*batches.at(i, first, batch)))
                    sched.step()
                    run.losses.append(loss)
                    run.seen.append(step.samples_digest[0])  # a fingerprint of the samples, made where they are
                    progress.step(i, loss, lr)
                    if not math.isfinite(loss) or step.last_step_skipped:
                        run.nonfinite(i, loss)
                    if saving and (i % ck.every == 0 or preempted.now):
                        run.save(i)
                    run.i += 1
                    run.trained += 1
                    if preempted.now:
                        log(f"SIGTERM: stopped after step {i}" + (f", saved {run.last_saved}; run the job again to "
                                                                  f"go on from there" if saving else ""))
                        raise SystemExit(143)
                val = evaluate_compiled(model, data, bs, t, job.train.eval_batches, first, batch, job.train.precision)
                break
            except RankFailed as e:
                if restarts >= max_restarts:
                    raise
                restarts += 1
                failed = e
    finally:
        preempted.restore()
        progress.close()
        if lock is not None:
            lock.release()
    elapsed = time.perf_counter() - t0
    losses, seen = run.losses, run.seen
    summary = {"steps": job.train.steps, "final_train_loss": losses[-1] if losses else float("nan"), "val_loss": val,
               "unigram_entropy": data.unigram_entropy("val"), "tokens_per_s": run.trained * bs * t / elapsed,
               "devices": p.devices, "backend": backend.name, "losses": losses, "restarts": restarts,
               "resumed_from": run.resumed_from, "skipped_steps": step.skipped_steps,
               "transport_id": _transport_id(backend),
               "samples": seen, "samples_digest": hashlib.sha1(json.dumps(seen).encode()).hexdigest()[:16],
               **_precision_summary(job, step.loss_scaler)}
    log(json.dumps({k: _json_float(v) if isinstance(v, float) else v for k, v in summary.items()
                    if k not in ("losses", "samples")}))
    return summary


class NonFiniteLoss(ConfigError):
    """``train.on_nonfinite: stop`` met a NaN or infinite loss or gradient."""


def _driver_fault(i: int) -> None:
    """Tests: FLOWSYS_FAULT=driver:0:<step> kills this driver as step ``i`` starts (once per job
    with FLOWSYS_FAULT_MARK), as a lost node or a kill -9 would."""
    from actors.worker import FAULT_ENV, fault_due, parse_fault  # noqa: PLC0415

    fault = parse_fault(os.environ.get(FAULT_ENV, ""))
    if fault is not None and fault[0] == "driver" and fault[2] in (None, i) and fault_due():
        os._exit(70)


def _transport_id(backend) -> str | None:
    """The id the gRPC transport puts in this job's shared-memory names (None: no gRPC)."""
    secret = getattr(backend, "secret", None)
    if secret is None:
        return None
    from comm.grpc_transport import job_id  # noqa: PLC0415

    return job_id(secret)


def _job_id() -> str:
    return f"{os.uname().nodename}-{os.getpid()}-{time.time_ns():x}"


class _Run:
    """A parallel job's progress and how it is saved and got back: the next step, the losses and
    sample digests so far (saved in every checkpoint, so a resumed run reports the whole run)."""

    def __init__(self, job: JobConfig, model, opt, step, sched, log):
        self.job, self.model, self.opt, self.step, self.sched, self.log = job, model, opt, step, sched, log
        self.i, self.losses, self.seen = 1, [], []
        self.last_saved: str | None = None
        self.resumed_from: str | None = None
        self.trained = 0  # steps run by this process (tokens/s)

    def resume_at_start(self) -> None:
        """``checkpoint.resume``: go on from the directory's latest verified checkpoint (auto),
        insist on one (must), or refuse a directory that holds some (never)."""
        from flowsys import checkpoint  # noqa: PLC0415

        ck = self.job.checkpoint
        if ck.resume == "never":
            found = checkpoint.latest(ck.dir)
            if found is not None:
                raise ConfigError(f"checkpoint.dir {ck.dir} holds checkpoints already (latest {found.name}) and "
                                  f"checkpoint.resume is never; use another directory, or resume: auto to go on")
            return
        if ck.resume == "must":
            found = checkpoint.latest(ck.dir)
            if found is None:
                raise ConfigError(f"checkpoint.resume is must, but {ck.dir} holds no complete checkpoint")
            checkpoint.verify(found)  # a corrupt latest one is refused, naming the file and tensor
        else:
            found = self.latest_verified()
            if found is None:
                return
        self.load(found)
        self.resumed_from = found.name
        self.log(f"resuming from {found} (step {self.i - 1} of {self.job.train.steps})")

    def latest_verified(self):
        """The latest checkpoint that verifies; newer ones that do not (corrupt, incomplete) are
        moved aside (``.step_<N>.corrupt-<time>``, kept for a look), so that the job can save
        those steps again."""
        from flowsys import checkpoint  # noqa: PLC0415

        root = Path(self.job.checkpoint.dir)
        found = checkpoint.latest_verified(root, warn=lambda m: self.log(f"warning: {m}"))
        for d in sorted(root.glob("step_*")):
            if d.is_dir() and (found is None or d.name > found.name):
                aside = root / f".{d.name}.corrupt-{time.time_ns():x}"
                d.rename(aside)
                self.log(f"warning: moved {d.name} aside to {aside.name}: it does not verify")
        return found

    def load(self, found) -> None:
        from flowsys import checkpoint  # noqa: PLC0415

        info = checkpoint.load(found, self.model, self.opt, loss_scaler=self.step.loss_scaler)
        done = info["step"]
        extra = info["extra"]
        self.i = done + 1  # the data is addressed by step: nothing else to restore
        self.losses = [_float(v) for v in extra.get("losses", [])][:done]
        self.seen = list(extra.get("samples", []))[:done]
        self.step.skipped_steps = int(extra.get("skipped_steps", 0))
        self.sched.last_step = done
        self.sched._apply()

    def save(self, i: int) -> None:
        from flowsys import checkpoint  # noqa: PLC0415

        ck = self.job.checkpoint
        path = checkpoint.save(ck.dir, self.model, self.opt, step=i, loss_scaler=self.step.loss_scaler,
                               extra={"data_step": i, "losses": [_json_float(v) for v in self.losses],
                                      "samples": self.seen, "skipped_steps": self.step.skipped_steps})
        self.last_saved = str(path)
        if ck.keep:
            checkpoint.prune(ck.dir, ck.keep)

    def recover(self, error, restarts: int, max_restarts: int) -> None:
        """After a lost worker: the latest verified checkpoint again (a worker lost while it is
        loaded is one more restart), or, with none saved yet, the start."""
        ck = self.job.checkpoint
        found = self.latest_verified() if ck.dir else None
        self.log(f"step {self.i}: {error}; restart {restarts}/{max_restarts} from "
                 f"{found.name if found is not None else 'the start'}")
        if found is not None:
            self.load(found)
            return
        from flowsys.tensor import stored  # noqa: PLC0415

        if any(getattr(stored(p), "_shards", None) is not None for p in self.model.parameters()):
            raise ConfigError(f"no checkpoint under {ck.dir or '(no checkpoint.dir)'} to resume from after: {error}") \
                from error
        # nothing saved yet, and the driver holds no values: fresh workers make the parameters
        # from their initialisers again; the optimizer and the schedule start over
        self.opt.state.clear()
        self.opt._state_in_workers = None
        self.i, self.losses, self.seen, self.step.skipped_steps = 1, [], [], 0
        if self.step.loss_scaler is not None:
            self.step.loss_scaler = type(self.step.loss_scaler)()
        self.sched.last_step = 0
        self.sched._apply()

    def nonfinite(self, i: int, loss: float) -> None:
        """``train.on_nonfinite``: stop, naming the step, the loss and the last good checkpoint;
        or go on (skip: the step's update was left out)."""
        if self.job.train.on_nonfinite == "skip":
            self.log(f"step {i}: loss {loss}, a non-finite gradient: update skipped (train.on_nonfinite: skip)")
            return
        where = self.last_saved or self.resumed_from
        raise NonFiniteLoss(f"step {i}: the loss is {loss} (a NaN or infinite loss or gradient); stopping "
                            f"(train.on_nonfinite: stop). Last good checkpoint: {where or 'none saved'}; lower the "
                            f"learning rate, clip gradients (optim.grad_clip) or set train.on_nonfinite: skip")


def _float(v) -> float:
    return float("nan") if v is None else float(v)


def _json_float(v: float):
    return v if math.isfinite(v) else None  # JSON has no NaN: null


class _Preemption:
    """SIGTERM (a preempted node, a cluster manager's stop) asks the job to stop after the
    current step, saving first; the previous handler comes back afterwards."""

    def __init__(self):
        import signal  # noqa: PLC0415
        import threading  # noqa: PLC0415

        self.now = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.now = True

    def restore(self) -> None:
        import signal  # noqa: PLC0415

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

"""Config-driven GPT training: what ``flowsys train JOB.yaml`` runs.

The job itself (its typed sections, YAML 1.2 files, ``section.key=value`` overrides, layout
checks) is :mod:`flowsys.job`; its names are re-exported here. This module runs a job: one loop
for one device and every layout. The job's step is compiled (``flowsys.plan.build``) and run on
the backend ``fs.init`` chose (Ray under ``flowsys launch``, else worker threads here), so
checkpoints, resume, ``train.on_nonfinite``, precision and metrics work the same on one device
as on many.

>>> from flowsys.train import job_from_dict, run
>>> summary = run(job_from_dict({}, {"train.steps": 2, "train.eval_batches": 1}))  # doctest: +SKIP
>>> sorted(summary)[:3]  # doctest: +SKIP
['backend', 'devices', 'final_train_loss']
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from flowsys import checkpoint, data as datasets, runtime
from flowsys.autograd import no_grad
from flowsys.data import ByteDataset
from flowsys.errors import ConfigError, RankFailed
from flowsys.functions import manual_seed
from flowsys.graph.api import Graph
from flowsys.job import (  # noqa: F401 - re-exported: `from flowsys.train import load_job` keeps working
    CheckpointConfig, ClusterConfig, DataConfig, JobConfig, OptimConfig, ParallelConfig, RunConfig, check_layout,
    dump_job, job_from_dict, job_to_dict, load_job, parse_overrides,
)
from flowsys.models import GPT
from flowsys.optim import WarmupCosine
from flowsys.plan import build, layout, model_flops
from flowsys.precision import autocast, compute_dtype, low_dtype
from flowsys.sbp import broadcast, split
from flowsys.tensor import stored


class Progress:
    """The live progress of a training run: a line every ``log_every`` steps (step, loss,
    tokens/s, model FLOP/s and MFU, ETA) or, when printing to a terminal, a progress bar (tqdm)
    that writes those lines above it; and the metrics of every step as JSONL and, when asked and
    installed, to TensorBoard.

    Tokens/s and FLOP/s come from the same window: the steps since the last line (per step in
    the metrics), the process's first step left out when there are others (it compiles). MFU is
    the model's FLOPs per step (from the compiled graph, ``flowsys.plan.model_flops``) per
    second, over the peak of :func:`throughput_model`; it is never clamped."""

    def __init__(self, job: JobConfig, log=print, flops_per_step: int = 0, peak_flops: float = 0.0,
                 bar: bool | None = None):
        self.steps, self.every, self.log = job.train.steps, job.train.log_every, log
        self.tokens = job.data.batch_size * job.model.block_size
        self.flops, self.peak = flops_per_step, peak_flops
        self.t0 = self.last = time.perf_counter()
        self.first: int | None = None  # the first step this process runs (a resumed job starts later)
        self.window: list[float] = []  # step times since the last line
        self.use_bar = (log is print and sys.stdout.isatty()) if bar is None else bar
        self.bar = None
        self.metrics = None
        if job.train.metrics:
            Path(job.train.metrics).parent.mkdir(parents=True, exist_ok=True)
            self.metrics = open(job.train.metrics, "a")  # noqa: SIM115 - closed by close()
        self.board = None
        if job.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional, and slow to import

                self.board = SummaryWriter(job.train.tensorboard)
            except Exception as e:  # noqa: BLE001 - optional: say why and go on
                log(f"train.tensorboard: not writing TensorBoard logs ({type(e).__name__}: {e})")

    def write(self, message: str) -> None:
        """A line of the job's log (above the bar, when there is one)."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            self.log(message)

    def rates(self, seconds: list[float]) -> tuple[float, float, float]:
        """Tokens/s, FLOP/s and MFU over steps that took ``seconds``."""
        total = sum(seconds)
        if total <= 0:
            return 0.0, 0.0, 0.0
        tokens, flops = self.tokens * len(seconds) / total, self.flops * len(seconds) / total
        return tokens, flops, flops / self.peak if self.peak else 0.0

    def step(self, i: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        step_s = now - self.last
        self.last = now
        if self.first is None:
            self.first = i  # (its time includes compiling: not in the window)
            if self.use_bar:
                from tqdm import tqdm  # noqa: PLC0415 - only on a terminal

                size = shutil.get_terminal_size()  # (80 x 24 where the terminal reports none: tqdm would draw nothing)
                self.bar = tqdm(total=self.steps, initial=i - 1, unit="step", ncols=size.columns, nrows=size.lines,
                                file=sys.stdout)
        else:
            self.window.append(step_s)
        tokens_per_s, flops_per_s, mfu = self.rates([step_s])
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": i, "loss": _json_float(loss), "lr": lr, "tokens_per_s": tokens_per_s,
                                           "step_s": step_s, "flops_per_step": self.flops, "flops_per_s": flops_per_s,
                                           "mfu": mfu, "elapsed_s": now - self.t0}) + "\n")
            self.metrics.flush()
        if self.board is not None:
            self.board.add_scalar("loss", loss, i)
            self.board.add_scalar("tokens_per_s", tokens_per_s, i)
            self.board.add_scalar("mfu", mfu, i)
        window = self.window or [step_s]  # (empty: this is the process's first step)
        tokens_per_s, flops_per_s, mfu = self.rates(window)
        throughput = f"{tokens_per_s:,.0f} tok/s"
        if self.flops:
            throughput += f"  {flops_per_s / 1e9:,.2f} GFLOP/s" + (f"  MFU {mfu:.1%}" if self.peak else "")
        if self.bar is not None:
            short = f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s" + (f", MFU {mfu:.1%}" if self.flops and self.peak else "")
            self.bar.set_postfix_str(short, refresh=False)
            self.bar.update(1)
        if i % self.every == 0 or i == self.steps:
            eta = sum(window) / len(window) * (self.steps - i)
            self.window = []
            self.write(f"step {i:>5}/{self.steps}  loss {loss:.4f}  {throughput}  ETA {_clock(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.board is not None:
            self.board.close()
            self.board = None


def throughput_model(job: JobConfig, log=print) -> tuple[int, float]:
    """The model FLOPs of one training step of ``job`` (from its compiled graph) and the peak
    FLOP/s its MFU is measured against: ``train.hardware``'s peak for the compute dtype (per
    device, times the devices; simulated CPU devices share one), else this machine's
    :func:`machine_peak` (simulated devices share its cores)."""
    from scheduler.cost import load_hardware  # noqa: PLC0415 - the cost model loads only here

    flops = model_flops(job)
    if job.train.hardware:
        hw = load_hardware(job.train.hardware)
        dtype = compute_dtype(job.train.precision).name
        devices = 1 if hw.device == "cpu" else job.parallel.devices
        peak = hw.peak(dtype) * devices
        source = f"the {hw.name} spec's {dtype} peak" + (f" x {devices} devices" if devices > 1 else "")
    else:
        peak, source = machine_peak(log), "this machine's float32 GEMM peak, best of several probes, cached"
    log(f"model FLOPs per step: {flops / 1e9:,.3f} GFLOP; peak {peak / 1e9:,.1f} GFLOP/s ({source})")
    return flops, peak


PEAK_SIZES = (512, 768, 1024, 1536)  # square float32 GEMMs; the best of them is the peak


def peak_cache() -> Path:
    """Where :func:`machine_peak` keeps its measurement: ``$XDG_CACHE_HOME/flowsys/peak.json``
    (default ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowsys" / "peak.json"


def machine_peak(log=print) -> float:
    """This machine's float32 GEMM peak FLOP/s: the best of several probes
    (``scheduler.cost.probe_gemm``, each the best of five), measured once per machine and then
    read from :func:`peak_cache`. One probe on a busy machine can be off by a factor of several;
    the best of several, kept, is a stable yardstick (delete the file to measure again)."""
    from scheduler.cost import probe_gemm  # noqa: PLC0415 - the cost model loads only here

    path, key = peak_cache(), _machine_key()
    try:
        table = json.loads(path.read_text())
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    entry = table.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("float32_flops"), (int, float)) and entry["float32_flops"] > 0:
        return float(entry["float32_flops"])
    probes = [probe_gemm(np.float32, n) for n in PEAK_SIZES]
    table[key] = {"float32_flops": max(probes), "probes": probes, "sizes": list(PEAK_SIZES),
                  "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log(f"warning: could not cache the GEMM peak in {path} ({e}); it is measured again next time")
    return max(probes)


def _machine_key() -> str:
    """What the peak depends on: the host, its CPU, its cores, and the BLAS NumPy uses."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.node()} | {cpu} | {os.cpu_count()} cores | numpy {np.__version__}"


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



def open_data(job: JobConfig, log=print):
    """The job's dataset (``data.source``: the stdlib bytes, a prepared directory, a mixture),
    checked against the model's vocabulary."""
    d = job.data
    data = datasets.open_source(d.source, max_bytes=d.max_bytes, val_fraction=d.val_fraction, log=log)
    if job.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size {job.model.vocab_size} is smaller than the data's {data.vocab_size} "
                          f"tokens; set model.vocab_size: {data.vocab_size} or more")
    return data


def check_data(backend, data, world: int) -> None:
    """Every worker reads the job's data itself: each must see the same files as the driver
    (a prepared directory on every node), or a ConfigError names the rank, its node and why."""
    if not hasattr(data, "windows"):  # the stdlib corpus: every node has Python's own library
        return
    backend.ensure(world)
    bad = {r: why for r, why in backend.check_data(data.windows().as_json()).items() if why}
    if bad:
        r, why = min(bad.items())
        node = getattr(backend, "nodes", dict)().get(r, "this machine") if hasattr(backend, "nodes") else "this machine"
        raise ConfigError(f"data.source {data.source!r}: rank {r} (node {node}) cannot read the data as the driver "
                          f"does: {why}. Every node needs the prepared directory at the same path")


def save_config(job: JobConfig) -> Path | None:
    """The resolved job as ``config.yaml`` beside ``train.metrics`` (None without metrics)."""
    if not job.train.metrics:
        return None
    path = Path(job.train.metrics).parent / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_job(job))
    return path


def run(job: JobConfig, log=print) -> dict[str, Any]:
    """Train ``job`` on one device or any layout, evaluate, and return a summary (losses,
    validation loss, unigram entropy, throughput, devices, backend, restarts, samples).

    The layout is compiled as one graph (``flowsys.plan.build``; the workers create their
    shards) and run on the backend ``fs.init`` chose. With a checkpoint directory it never loses
    work: run again, it goes on from the latest complete, verified checkpoint
    (``checkpoint.resume``); a worker lost in any phase (a step, a checkpoint's pull or write, a
    load) restarts the job from there, at most ``checkpoint.max_restarts`` times; SIGTERM
    (preemption) saves a checkpoint at the end of the current step and exits."""
    o, p, ck = job.optim, job.parallel, job.checkpoint  # optim.grad_clip: clipped in the compiled step (plan.build)
    _check_launched_cluster(job)
    manual_seed(job.train.seed)
    data = open_data(job, log)
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
    check_data(backend, data, p.devices)
    saving = bool(ck.dir and ck.every)
    lock = None
    if saving:  # the workers write and read their own checkpoint files
        checkpoint.check_writable(ck.dir)
        lock = checkpoint.lock(ck.dir, _job_id(), warn=log)  # (says so when it takes a dead job's lock over)
        checkpoint.check_visible(backend, ck.dir, world=p.devices)
    sched = WarmupCosine(opt, o.warmup_steps, job.train.steps, min_lr=o.lr * o.min_lr_ratio)
    log(f"model: GPT, {model.num_parameters():,} parameters on {p.devices} device(s) (dp {p.dp} x tp {p.tp} x pp "
        f"{p.pp}, ZeRO {p.zero_stage}, {p.micro_batches} micro-batch(es)) on the {backend.name} backend; data: {data}")
    saved_config = save_config(job)
    if saved_config is not None:
        log(f"config: {saved_config}")
    bs, t = job.data.batch_size, job.model.block_size
    batches = data.batches(bs, t, seed=job.train.seed)  # step i's samples, read by the workers
    first, batch = placements[0], (split(0), broadcast)
    max_restarts = max(ck.max_restarts, int(os.environ.get("FLOWSYS_MAX_RESTARTS", "0")) if ck.every else 0)
    progress = Progress(job, log, *throughput_model(job, log))
    state = _Run(job, model, opt, step, sched, progress.write)
    preempted = _Preemption()
    restarts, t0, failed = 0, time.perf_counter(), None
    try:
        while True:
            try:
                if failed is not None:  # a worker was lost: back to the latest verified checkpoint
                    state.recover(failed, restarts, max_restarts)
                elif saving and state.resumed_from is None and state.trained == 0:
                    state.resume_at_start()
                while state.i <= job.train.steps:
                    i, lr = state.i, opt.param_groups[0]["lr"]
                    _driver_fault(i)
                    loss = float(step(*batches.at(i, first, batch)))
                    sched.step()
                    state.losses.append(loss)
                    state.seen.append(step.samples_digest[0])  # a fingerprint of the samples, made where they are
                    progress.step(i, loss, lr)
                    if not math.isfinite(loss) or step.last_step_skipped:
                        state.nonfinite(i, loss)
                    if saving and (i % ck.every == 0 or preempted.now):
                        state.save(i)
                    state.i += 1
                    state.trained += 1
                    if preempted.now:
                        progress.write(f"SIGTERM: stopped after step {i}" + (
                            f", saved {state.last_saved}; run the job again to go on from there" if saving else ""))
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
    losses, seen = state.losses, state.seen
    summary = {"steps": job.train.steps, "final_train_loss": losses[-1] if losses else float("nan"), "val_loss": val,
               "unigram_entropy": data.unigram_entropy("val"), "tokens_per_s": state.trained * bs * t / elapsed,
               "devices": p.devices, "backend": backend.name, "losses": losses, "restarts": restarts,
               "resumed_from": state.resumed_from, "skipped_steps": step.skipped_steps,
               "transport_id": _transport_id(backend),
               "samples": seen, "samples_digest": hashlib.sha1(json.dumps(seen).encode()).hexdigest()[:16],
               **_precision_summary(job, step.loss_scaler)}
    log(json.dumps({k: _json_float(v) if isinstance(v, float) else v for k, v in summary.items()
                    if k not in ("losses", "samples")}))
    return summary


def _check_launched_cluster(job: JobConfig) -> None:
    """Under ``flowsys launch``: the launched cluster holds the layout's devices (else Ray would
    wait for workers it cannot place)."""
    nodes, per_node = os.environ.get("FLOWSYS_NODES"), os.environ.get("FLOWSYS_DEVICES_PER_NODE")
    if os.environ.get("FLOWSYS_BACKEND") != "ray" or not (nodes and per_node):
        return
    have, need = int(nodes) * int(per_node), job.parallel.devices
    if have < need:
        raise ConfigError(f"the launched cluster has {nodes} node(s) x {per_node} device(s) = {have}, fewer than the "
                          f"{need} devices of the layout (parallel dp x tp x pp); launch with --nodes "
                          f"{-(-need // int(per_node))} or a smaller layout")


def _precision_summary(job: JobConfig, scaler) -> dict[str, Any]:
    """The summary's precision keys: fp16 adds its last loss scale (its skipped steps are the
    summary's ``skipped_steps``)."""
    if job.train.precision == "fp32":
        return {}
    return {"precision": job.train.precision, **({"loss_scale": scaler.scale} if scaler is not None else {})}

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
        root = Path(self.job.checkpoint.dir)
        found = checkpoint.latest_verified(root, warn=lambda m: self.log(f"warning: {m}"))
        for d in sorted(root.glob("step_*")):
            if d.is_dir() and (found is None or d.name > found.name):
                aside = root / f".{d.name}.corrupt-{time.time_ns():x}"
                d.rename(aside)
                self.log(f"warning: moved {d.name} aside to {aside.name}: it does not verify")
        return found

    def load(self, found) -> None:
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
        ck = self.job.checkpoint
        path = checkpoint.save(ck.dir, self.model, self.opt, step=i, loss_scaler=self.step.loss_scaler,
                               extra={"data_step": i, "losses": [_json_float(v) for v in self.losses],
                                      "samples": self.seen, "skipped_steps": self.step.skipped_steps,
                                      "job": job_to_dict(self.job)})  # what the checkpoint is of (generate, export)
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
        self.now = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.now = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

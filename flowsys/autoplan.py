"""``flowsys plan JOB.yaml --devices N --auto``: search the layout of a job for ``N`` devices.

Every layout of the ``parallel`` section is a candidate: ``dp x tp x pp = N``, ZeRO stage 0-3,
the micro-batches (divisors of each data-parallel rank's batch; at least ``pp`` with a pipeline)
and activation checkpointing on or off. Pipeline stages need not divide the layers evenly
(``GPT.pipeline`` gives stage ``i * pp // n_layer`` to block ``i``: 30 blocks over 4 stages run
as 8, 7, 8, 7), so the biggest stage holds ``ceil(n_layer / pp)`` blocks.

1. An analytic pre-filter prunes what cannot run (tp not dividing the heads and the width, tp
   across nodes, more stages than blocks, a batch that does not split, ZeRO with nothing to shard
   over, memory per device over the spec's) and ranks the rest by a roofline estimate of the step.
2. The best few by that estimate are compiled and simulated by :func:`flowsys.plan.plan_job`
   (the cost model); the answer ranks those by predicted step time, fitting layouts first.

ZeRO stage and checkpointing only trade speed for memory, so of each ``dp, tp, pp,
micro-batches`` family only its best-estimated member is simulated, unless it turns out not to
fit (then the next one is). Per-op SBP choices: every candidate passes through
:func:`sbp_variants`, which gives the greedy rule (Megatron's tensor-parallel layout of
``GPT.parallel_plan``, with the job's ``vocab_parallel``) and, with tensor parallelism, the
same layout with the layer norms' inputs split along the sequence (the compiler derives
sequence parallelism's reduce-scatters and all-gathers from those signatures); the simulator
judges each. A search over every op's signature (OneFlow's, Alpa's) is not done: the greedy
per-op inference picks the rest.

>>> from flowsys.job import job_from_dict
>>> job = job_from_dict({"model": {"n_layer": 2, "n_head": 4, "n_embd": 64}})
>>> result = search(job, 4, "a100-80g", simulate=2)  # doctest: +SKIP
>>> result.best.layout.devices  # doctest: +SKIP
4
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from flowsys.errors import ConfigError, FlowsysError
from flowsys.job import JobConfig, ParallelConfig, check_layout
from flowsys.plan import model_flops, plan_job
from flowsys.precision import compute_dtype
from scheduler.hardware import Hardware, load_hardware

# Actor firings of one micro-batch on a rank, counted on flowsys's compiled GPT (a block's
# forward and backward ops with their boxing; recompute and precision casts add theirs): the
# runtime's per-firing overhead is what makes tiny micro-batches slow.
FIRINGS_PER_BLOCK, FIRINGS_RECOMPUTE, FIRINGS_CASTS, FIRINGS_FIXED = 136, 18, 27, 50

# Why a candidate is pruned, in the order the checks run (the counts are reported per reason)
REASONS = {
    "tp": "tp does not divide n_head and n_embd",
    "node": "tp spans nodes (tp > devices per node)",
    "pp": "more pipeline stages than blocks",
    "batch": "the batch does not split into dp x micro-batches",
    "bubble": "fewer micro-batches than pipeline stages",
    "zero": "ZeRO with dp 1 (nothing to shard over)",
    "memory": "memory estimate over the device's",
    "refused": "refused by check_layout",
}


@dataclass(frozen=True)
class Layout:
    """One point of the search: the ``parallel`` section's knobs."""

    dp: int
    tp: int
    pp: int
    zero_stage: int
    micro_batches: int
    activation_checkpointing: bool
    sequence_parallel: bool = False  # a per-op SBP choice (sbp_variants): layer norms split along the sequence

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def family(self) -> tuple[int, int, int, int]:
        """What the memory knobs (ZeRO stage, checkpointing) leave alone."""
        return self.dp, self.tp, self.pp, self.micro_batches

    def apply(self, job: JobConfig) -> JobConfig:
        """``job`` with this layout as its ``parallel`` section (its other keys kept)."""
        p = dataclasses.replace(job.parallel, **dataclasses.asdict(self))
        return dataclasses.replace(job, parallel=p)

    def overrides(self) -> list[str]:
        """The ``section.key=value`` overrides that give a job this layout."""
        return [f"parallel.{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in dataclasses.asdict(self).items()]

    def __str__(self) -> str:
        return (f"dp {self.dp} x tp {self.tp} x pp {self.pp}, ZeRO {self.zero_stage}, {self.micro_batches} "
                f"micro-batch(es), checkpointing {'on' if self.activation_checkpointing else 'off'}"
                + (", sequence parallel" if self.sequence_parallel else ""))


@dataclass(frozen=True)
class Candidate:
    """A layout that passed the pre-filter: its analytic memory per device (the biggest stage,
    bytes) and roofline step estimate (seconds)."""

    layout: Layout
    memory: float
    estimate_s: float


@dataclass(frozen=True)
class Ranked:
    """A simulated candidate: the estimate beside the cost model's prediction (``plan_job``'s
    ``summary["prediction"]``), its worst rank's memory and whether every rank fits."""

    layout: Layout
    estimate_s: float
    memory_estimate: float
    step_s: float
    tflops_per_device: float
    memory: float
    fits: bool
    prediction: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(layout=dataclasses.asdict(self.layout), estimate_s=self.estimate_s,
                    memory_estimate=self.memory_estimate, step_s=self.step_s,
                    tflops_per_device=self.tflops_per_device, memory=self.memory, fits=self.fits,
                    prediction=self.prediction)


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search` found: ``top`` by predicted step time (fitting layouts first), the
    job's ``own`` layout when it is valid for the devices (simulated for comparison), and the
    counts: candidates ``considered``, ``pruned`` per reason, ``simulated``, ``failed`` (the
    compiler refused: message per layout) and the seconds it took."""

    devices: int
    hardware: str
    top: tuple[Ranked, ...]
    own: Ranked | None
    considered: int
    pruned: dict[str, int]
    simulated: int
    failed: dict[str, str]
    seconds: float

    @property
    def best(self) -> Ranked:
        return self.top[0]

    def to_dict(self) -> dict[str, Any]:
        return dict(devices=self.devices, hardware=self.hardware, top=[r.to_dict() for r in self.top],
                    own=self.own.to_dict() if self.own else None, considered=self.considered,
                    pruned=dict(self.pruned), simulated=self.simulated, failed=dict(self.failed),
                    seconds=round(self.seconds, 3))


# --------------------------------------------------------------------------------- enumeration
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(job: JobConfig, devices: int):
    """Every layout of ``devices`` devices: each ``dp x tp x pp`` factorisation, ZeRO 0-3,
    checkpointing off/on, and each divisor of the batch as micro-batches (the pre-filter drops
    those that do not split each data-parallel rank's share)."""
    for tp in _divisors(devices):
        for pp in _divisors(devices // tp):
            dp = devices // (tp * pp)
            for m in _divisors(job.data.batch_size):
                for zero in (0, 1, 2, 3):
                    for ckpt in (False, True):
                        yield Layout(dp, tp, pp, zero, m, ckpt)


def sbp_variants(job: JobConfig, layout: Layout) -> tuple[Layout, ...]:
    """The layouts a point of the grid stands for, one per choice of per-op SBP signatures that
    the simulator then judges: the greedy rule (``GPT.parallel_plan``'s Megatron layout, the
    job's ``vocab_parallel``: every layer norm, dropout and residual add on all tokens, one
    all-reduce after each row-split layer) and, with ``tp > 1`` and a sequence that splits over
    it, the layer norms' inputs split along the sequence (``sequence_parallel``: those ops on
    1/tp of the tokens, each all-reduce a reduce-scatter and an all-gather; Megatron-LM's
    sequence parallelism, which the SBP compiler derives from those signatures alone)."""
    greedy = dataclasses.replace(layout, sequence_parallel=False)
    if layout.tp > 1 and job.model.block_size % layout.tp == 0:
        return greedy, dataclasses.replace(layout, sequence_parallel=True)
    return (greedy,)


def _pruned_by(job: JobConfig, lay: Layout, hw: Hardware) -> str | None:
    """The first divisibility rule ``lay`` breaks (a :data:`REASONS` key), or None."""
    m, b = job.model, job.data.batch_size
    if m.n_head % lay.tp or m.n_embd % lay.tp:
        return "tp"
    if lay.tp > hw.devices_per_node:
        return "node"
    if lay.pp > m.n_layer:
        return "pp"
    if b % lay.micro_batches or (b // lay.micro_batches) % lay.dp:
        return "batch"
    if lay.pp > 1 and lay.micro_batches < lay.pp:
        return "bubble"
    if lay.zero_stage and lay.dp == 1:
        return "zero"
    return None


# ------------------------------------------------------------------------------------ analytic
@dataclass(frozen=True)
class ModelFigures:
    """What the estimates need of the job, computed once per search."""

    flops: float        # model FLOPs of a step without recompute (flowsys's count)
    block_share: float  # of the forward FLOPs, the share of the blocks (the rest: the head)
    compute: str        # the compute dtype's name
    itemsize: int       # bytes of an activation and of a compute copy of a weight
    lowp: bool          # a low precision: float32 masters beside the compute copies


def analyse(job: JobConfig) -> ModelFigures:
    m, t = job.model, job.train
    # counted on the graph of the job on one device, no recompute: the same for every layout
    one = dataclasses.replace(job, parallel=ParallelConfig(vocab_parallel=job.parallel.vocab_parallel))
    flops = model_flops(one)
    # forward FLOPs per token: a block's GEMMs (24 h^2) and attention (4 s h); the head's 2 h V
    blocks = m.n_layer * (24 * m.n_embd ** 2 + 4 * m.block_size * m.n_embd)
    head = 2 * m.n_embd * m.vocab_size
    dtype = compute_dtype(t.precision)
    return ModelFigures(float(flops), blocks / (blocks + head), dtype.name, dtype.itemsize, t.precision != "fp32")


def _vocab(job: JobConfig, tp: int) -> tuple[int, int]:
    """(embedding rows, the tensor-parallel ranks they are split over)."""
    vocab = job.parallel.vocab_parallel and tp > 1
    return (job.model.padded_for(tp) if vocab else job.model).table_size, tp if vocab else 1


def _stage_parameters(job: JobConfig, lay: Layout) -> float:
    """Parameters on one device of the biggest stage (``ceil(n_layer / pp)`` blocks with the
    embeddings of the first stage or the head's copy of the last, whichever is bigger)."""
    m = job.model
    h = m.n_embd
    block = 12 * h * h / lay.tp + (13 if m.bias else 2) * h  # matrices split over tp; biases, norms counted whole
    rows, split = _vocab(job, lay.tp)
    embed = rows * h / split + m.block_size * h
    blocks = math.ceil(m.n_layer / lay.pp) * block
    return blocks + embed + 2 * h  # (pp 1: one tied table; pp > 1: the first stage's or the last's copy)


def memory_estimate(job: JobConfig, lay: Layout, model: ModelFigures) -> float:
    """Bytes per device of the biggest stage: parameters, gradients and optimizer state (AdamW,
    float32 masters under a low precision) as the ZeRO stage shards them over dp, and the
    activations of the micro-batches in flight, all of them or each block's input under
    checkpointing. The activation figures were counted on flowsys's compiled GPT (peak per
    block: (4 + 12/tp) x batch x seq x width values; a block's input under checkpointing)."""
    m, t = job.model, job.train
    params = _stage_parameters(job, lay)
    grad_bytes = 4 if t.grad_reduce_dtype == "fp32" else model.itemsize
    weights = params * model.itemsize / (lay.dp if lay.zero_stage >= 3 else 1)
    grads = params * grad_bytes / (lay.dp if lay.zero_stage >= 2 else 1)
    state = params * (8 + 4 * model.lowp) / (lay.dp if lay.zero_stage >= 1 else 1)
    b = job.data.batch_size // (lay.dp * lay.micro_batches)
    bsh = b * m.block_size * m.n_embd
    block = 4 + 12 / lay.tp  # values of one block's forward kept for its backward, in units of bsh
    per_block = 2 if lay.activation_checkpointing else block
    rows, split = _vocab(job, lay.tp)
    head = 3 * rows / (split * m.n_embd) + 2  # logits, probabilities and their gradient; the final norm
    units = math.ceil(m.n_layer / lay.pp) * per_block + block * lay.activation_checkpointing + head
    in_flight = min(lay.pp, lay.micro_batches)  # stage 0 of a 1F1B pipeline holds pp micro-batches
    gathered = 2 * 12 * m.n_embd ** 2 / lay.tp * model.itemsize if lay.zero_stage >= 3 else 0  # a block's weights
    return weights + grads + state + in_flight * units * bsh * model.itemsize + gathered


def _ring(nbytes: float, n: int, link) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``n`` ranks on ``link``."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.bandwidth + 2 * (n - 1) * link.latency


def step_estimate(job: JobConfig, lay: Layout, hw: Hardware, model: ModelFigures) -> float:
    """A roofline estimate of the step in seconds: the biggest stage's FLOPs (with recompute) at
    the device's peak, plus the runtime's work per firing, the tensor-parallel all-reduces (four
    per block and micro-batch, six with recompute) and the pipeline's sends, stretched by the
    1F1B bubble ``(m + pp - 1) / m``; then the data-parallel gradient all-reduce beyond what the
    last backward hides (under ZeRO its reduce-scatter half; ZeRO 1/2's all-gather of the
    updated weights comes after the update, exposed), ZeRO 3's per-micro-batch weight gathers,
    and the optimizer's update at memory bandwidth (over dp under ZeRO)."""
    m, dpn = job.model, hw.devices_per_node
    ckpt, k = lay.activation_checkpointing, lay.micro_batches
    blocks = math.ceil(m.n_layer / lay.pp)
    share = blocks / m.n_layer * model.block_share * (1 + ckpt / 3) + (1 - model.block_share)
    peak = hw.gemm_peak(model.compute) / (lay.devices if hw.cores_per_node else 1)  # simulated devices share cores
    compute = model.flops * share / (lay.dp * lay.tp) / peak / k  # one micro-batch on the biggest stage
    firings = blocks * (FIRINGS_PER_BLOCK + FIRINGS_RECOMPUTE * ckpt + FIRINGS_CASTS * model.lowp) + FIRINGS_FIXED
    b = job.data.batch_size // (lay.dp * k)
    activation = b * m.block_size * m.n_embd * model.itemsize
    tp_link = hw.intra_node if lay.tp <= dpn else hw.inter_node
    tensor = (blocks * (4 + 2 * ckpt) + 3) * _ring(activation, lay.tp, tp_link)
    stage_link = hw.intra_node if lay.dp * lay.tp < dpn else hw.inter_node
    send = 2 * (activation / stage_link.bandwidth + stage_link.latency) if lay.pp > 1 else 0.0
    dp_link = hw.intra_node if lay.dp * lay.tp <= dpn else hw.inter_node  # the group's slowest link
    params = _stage_parameters(job, lay)
    gather = (2 + ckpt) * _ring(params * model.itemsize, lay.dp, dp_link) / 2 if lay.zero_stage >= 3 else 0.0
    slot = compute + hw.op_overhead * firings + tensor + send + gather
    pipeline = slot * (k + lay.pp - 1)
    grad_bytes = 4 if job.train.grad_reduce_dtype == "fp32" else model.itemsize
    reduce = _ring(params * grad_bytes, lay.dp, dp_link)
    if lay.zero_stage:  # a reduce-scatter (hidden like the all-reduce), then ZeRO 1/2's all-gather after the update
        exposed = max(0.0, reduce / 2 - 2 / 3 * compute) + (reduce / 2 if lay.zero_stage < 3 else 0.0)
    else:
        exposed = max(0.0, reduce - 2 / 3 * compute)
    update = params * (28 + 4 * model.lowp) / (lay.dp if lay.zero_stage else 1) / hw.achieved_bandwidth()
    return pipeline + exposed + update + hw.step_overhead


def candidates(job: JobConfig, devices: int, hw: Hardware,
               model: ModelFigures | None = None) -> tuple[list[Candidate], int, Counter]:
    """The pre-filter: every layout of ``devices`` (see :func:`layouts`) is pruned with a reason
    or kept with its memory and step estimate. Returns the kept candidates fastest first (ties:
    the lower ZeRO stage, checkpointing off), how many layouts were considered, and the prune
    counts per reason (a :data:`REASONS` description)."""
    model = model or analyse(job)
    kept, pruned, considered = [], Counter(), 0
    for lay in layouts(job, devices):
        considered += 1
        reason = _pruned_by(job, lay, hw)
        if reason is None and memory_estimate(job, lay, model) > hw.memory:
            reason = "memory"
        if reason is None:
            try:
                check_layout(lay.apply(job), devices)
            except ConfigError:
                reason = "refused"
        if reason is not None:
            pruned[REASONS[reason]] += 1
            continue
        kept.append(Candidate(lay, memory_estimate(job, lay, model), step_estimate(job, lay, hw, model)))
    kept.sort(key=lambda c: (c.estimate_s, c.layout.zero_stage, c.layout.activation_checkpointing,
                             dataclasses.astuple(c.layout)))
    return kept, considered, pruned


# -------------------------------------------------------------------------------------- search
def _simulate(job: JobConfig, cand: Candidate, devices: int, hardware: str, hw: Hardware) -> Ranked:
    summary = plan_job(job, devices, hardware=hardware)
    pred = summary["prediction"]
    totals = [r["parameters"] + r["gradients"] + r["optimizer_state"] + r["peak_activations"]
              for r in summary["ranks"]]
    gpus = 1 if hw.device == "cpu" else devices  # simulated CPU devices share one machine's peak, as plan's MFU
    return Ranked(cand.layout, cand.estimate_s, cand.memory, pred["step_s"],
                  pred["model_flops"] / pred["step_s"] / gpus / 1e12, float(max(totals)),
                  all(r["predicted"]["fits"] for r in summary["ranks"]), pred)


def _own_layout(job: JobConfig) -> Layout:
    p = job.parallel
    return Layout(p.dp, p.tp, p.pp, p.zero_stage, p.micro_batches, p.activation_checkpointing,
                  p.sequence_parallel and p.tp > 1)


def default_hardware(job: JobConfig) -> str:
    """The spec a search predicts on without ``--hardware``: the job's ``train.hardware``, else
    ``cpu`` (this machine, the device every flowsys backend runs on today)."""
    return job.train.hardware or "cpu"


def search(job: JobConfig, devices: int, hardware: str | None = None, *, top: int = 5, simulate: int = 8,
           time_budget: float | None = None) -> SearchResult:
    """Search ``job``'s layout for ``devices`` devices on ``hardware`` (a spec name or YAML
    path; None: :func:`default_hardware`): the pre-filter ranks every layout, the best
    ``simulate`` (one per ``dp, tp, pp, micro-batches`` family that fits) are predicted by
    :func:`flowsys.plan.plan_job`, and the ``top`` of those by predicted step time come back,
    fitting layouts first. ``time_budget`` (seconds) stops simulating early, after at least one, when the
    next simulation and the job's own might not fit in it (each may take as long as the longest so far).
    The job's own layout, when valid for ``devices``, is simulated too (``result.own``).

    >>> from flowsys.job import job_from_dict
    >>> job = job_from_dict({"model": {"n_layer": 2, "n_head": 4, "n_embd": 64}})
    >>> search(job, 4, "a100-80g", simulate=2).best.layout.devices  # doctest: +SKIP
    4
    """
    if devices < 1:
        raise ConfigError(f"flowsys plan --auto: --devices must be at least 1, got {devices}")
    if top < 1 or simulate < 1:
        raise ConfigError(f"flowsys plan --auto: top and simulate must be at least 1, got {top} and {simulate}")
    t0 = time.perf_counter()
    hardware = hardware or default_hardware(job)
    hw = load_hardware(hardware)
    model = analyse(job)
    kept, considered, pruned = candidates(job, devices, hw, model)
    if not kept:
        why = ", ".join(f"{reason}: {n}" for reason, n in pruned.most_common())
        raise ConfigError(f"flowsys plan --auto: none of the {considered} layouts of {devices} devices passes the "
                          f"pre-filter on {hw.name} ({why}); try more devices, a spec with more memory, "
                          f"bf16 (train.precision=bf16) or a batch with more divisors")
    ranked: list[Ranked] = []
    failed: dict[str, str] = {}
    fitting: set[tuple[int, int, int, int]] = set()  # families with a simulated layout that fits
    runs, longest = 0, 0.0  # the longest simulation so far: the next one (and the job's own) may take as long
    mine = _own_layout(job)

    def out_of_time() -> bool:  # the next simulation (and the job's own, still to come) might end past the budget
        more = 1 if any(r.layout == mine for r in ranked) or mine.devices != devices else 2
        return time_budget is not None and runs > 0 and time.perf_counter() - t0 + more * longest > time_budget

    for cand in kept:
        if runs >= simulate or out_of_time():
            break
        if cand.layout.family in fitting:
            continue
        for variant in sbp_variants(job, cand.layout):
            if runs >= simulate or out_of_time():
                break
            runs += 1
            t1 = time.perf_counter()
            try:
                r = _simulate(variant.apply(job), dataclasses.replace(cand, layout=variant), devices, hardware, hw)
            except FlowsysError as e:
                failed[str(variant)] = " ".join(str(e).split())
                continue
            longest = max(longest, time.perf_counter() - t1)
            ranked.append(r)
            if r.fits:
                fitting.add(cand.layout.family)
    own = None
    if mine.devices == devices:
        own = next((r for r in ranked if r.layout == mine), None)
        if own is None:
            try:
                check_layout(job, devices)
                cand = Candidate(mine, memory_estimate(job, mine, model), step_estimate(job, mine, hw, model))
                own = _simulate(mine.apply(job), cand, devices, hardware, hw)
                runs += 1
                ranked.append(own)
            except FlowsysError as e:
                failed[f"{mine} (the job's own)"] = " ".join(str(e).split())
    if not ranked:
        raise ConfigError(f"flowsys plan --auto: every simulated layout failed to compile: {failed}")
    ranked.sort(key=lambda r: (not r.fits, r.step_s))
    return SearchResult(devices, hw.name, tuple(ranked[:top]), own, considered, dict(pruned.most_common()),
                        runs, failed, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------ printing
def format_search(result: SearchResult) -> str:
    """The table ``flowsys plan --auto`` prints."""
    lines = [f"auto layout for {result.devices} devices on {result.hardware}: considered {result.considered}, "
             f"pruned {sum(result.pruned.values())}, simulated {result.simulated} in {result.seconds:.1f} s"]
    if result.pruned:
        lines.append("pruned: " + "; ".join(f"{reason}: {n}" for reason, n in result.pruned.items()))
    shown = [*result.top, *([result.own] if result.own else [])]
    unit, scale = ("GiB", 2**30) if max(r.memory for r in shown) >= 2**30 else ("MiB", 2**20)
    header = (f"{'#':>3} {'dp':>5} {'tp':>3} {'pp':>3} {'zero':>4} {'micro-batches':>13} {'ckpt':>4} {'seq':>3} "
              f"{'step ms':>12} {'TFLOP/s/GPU':>11} {'memory ' + unit:>10} {'estimate ms':>12}  fits")

    def row(label: str, r: Ranked) -> str:
        lay = r.layout
        return (f"{label:>3} {lay.dp:>5} {lay.tp:>3} {lay.pp:>3} {lay.zero_stage:>4} {lay.micro_batches:>13} "
                f"{'on' if lay.activation_checkpointing else 'off':>4} {'on' if lay.sequence_parallel else 'off':>3} "
                f"{r.step_s * 1e3:>12,.2f} "
                f"{r.tflops_per_device:>11.2f} {r.memory / scale:>10.3f} {r.estimate_s * 1e3:>12,.2f}  "
                f"{'yes' if r.fits else 'NO'}")

    lines.append(header)
    lines.extend(row(str(i), r) for i, r in enumerate(result.top, 1))
    if result.own is not None:
        lines.append(row("own", result.own) + "   (the job's own layout)")
    for lay, why in result.failed.items():
        lines.append(f"failed to compile: {lay}: {why}")
    best = result.best
    lines.append(f"best: {best.layout}; run it with: {' '.join(best.layout.overrides())}")
    lines.append("(per-op SBP: each tp layout is simulated with GPT.parallel_plan's greedy signatures and with "
                 "the layer norms split along the sequence, seq on)")
    return "\n".join(lines)

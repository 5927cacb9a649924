"""``flowsys plan JOB.yaml --devices N``: compile a job's training step for ``N`` devices without
running it, and report per-device memory, communication per step by kind, and the plan's shape.

The model is built with ``nn.meta_init()`` (shapes and layouts, no values), so a GPT-3-sized
model on 1,024 devices compiles in seconds. Ranks are laid out stage-major: stage ``s`` of
``pp`` holds ranks ``s*dp*tp ... (s+1)*dp*tp - 1`` as a ``dp x tp`` mesh. Lowering is done for
one rank per pipeline stage (the ranks of a stage have the same plan up to their coordinates)
unless ``every_rank`` is asked for: then once per distinct plan (``scheduler.lower``'s templates:
ranks alike up to their coordinates share one), and every rank's plan is instantiated from its
template only where the cost model needs them all.
"""

from __future__ import annotations

import os

import time
from collections import defaultdict
from typing import Any

import numpy as np

from flowsys.errors import ConfigError
from flowsys.job import JobConfig, check_layout
from flowsys.placement import placement
from flowsys.precision import compute_dtype


def layout(job: JobConfig, devices: int | None = None, device: str | None = None):
    """The stage placements of ``job.parallel``: a list of ``dp x tp`` placements, on ``device``
    (default: ``FLOWSYS_DEVICE``, which ``flowsys launch --device`` sets, else ``cpu``)."""
    check_layout(job, devices)
    p = job.parallel
    ranks = np.arange(p.devices).reshape(p.pp, p.dp, p.tp)
    device = device or os.environ.get("FLOWSYS_DEVICE") or "cpu"
    return [placement(device, ranks[s].tolist()) for s in range(p.pp)]


def build(job, placements, meta: bool = False):
    """The job's GPT laid out on ``placements`` (data x tensor parallel per stage, pipeline over
    them, checkpointing as asked), its optimizer and its compiled-on-first-call step."""
    from flowsys import nn  # noqa: PLC0415
    from flowsys.graph.api import Graph  # noqa: PLC0415
    from flowsys.models import GPT  # noqa: PLC0415

    p = job.parallel
    first = placements[0]
    ctx = nn.meta_init() if meta else _Null()
    with ctx:
        vocab = p.vocab_parallel and p.tp > 1  # the vocabulary padded for even shards, its padding masked
        model = GPT(job.model.padded_for(p.tp) if vocab else job.model)
        model.to_global(first, GPT.parallel_plan(first, dp_axis=0, tp_axis=1, vocab_parallel=vocab,
                                                 sequence_parallel=p.sequence_parallel and p.tp > 1))
        if p.pp > 1:
            model.pipeline(placements)
    if p.activation_checkpointing:
        for block in model.transformer["h"]:
            block.activation_checkpointing = True
    o = job.optim
    opt = model.configure_optimizers(o.weight_decay, o.lr, o.betas)

    class TrainStep(Graph):
        def __init__(self):
            super().__init__()
            self.model = model
            self.add_optimizer(opt)
            self.config.gradient_accumulation_steps = p.micro_batches
            self.config.zero_stage = p.zero_stage
            self.config.grad_clip = o.grad_clip  # clipping by the global norm, in the optimizer phase
            self.config.precision = job.train.precision
            self.config.grad_reduce_dtype = job.train.grad_reduce_dtype

        def build(self, idx, targets):
            _, loss = self.model(idx, targets)
            loss.backward()
            return loss

    return model, opt, TrainStep()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _compile(job, devices: int):
    """The job's training step compiled for ``devices`` on meta tensors (no values): the
    placements, the model and the IR."""
    from flowsys.global_tensor import GlobalValue  # noqa: PLC0415
    from flowsys.sbp import broadcast, split  # noqa: PLC0415
    from flowsys.tensor import Tensor  # noqa: PLC0415

    placements = layout(job, devices)
    model, _, step = build(job, placements, meta=True)
    shape = (job.data.batch_size, job.model.block_size)
    idx = Tensor(GlobalValue(placements[0], (split(0), broadcast), shape, np.dtype(np.int64), None))
    return placements, model, step.compile(idx, idx)


def model_flops(job) -> int:
    """Model FLOPs of one training step (forward and backward, every micro-batch) of ``job``,
    counted on the compiled graph's logical shapes: the same for every layout."""
    from scheduler.cost import graph_flops  # noqa: PLC0415

    return graph_flops(_compile(job, job.parallel.devices)[2])


def predict(plan, hw, **options):
    """The cost model's prediction of one step of ``plan`` on ``hw``: the actor runtime run on a
    simulated clock (``actors.sim.predict``), with each distinct kernel timed on this machine
    where the spec says ``kernels: measure``."""
    from actors.sim import predict as simulate  # noqa: PLC0415
    from scheduler.cost import measure_collective, measure_kernel  # noqa: PLC0415

    if hw.kernels == "measure":
        options.setdefault("kernel_time", measure_kernel)
        options.setdefault("collective_time", measure_collective)
    return simulate(plan, hw, **options)


def write_trace(pred, path, plan, ir=None) -> str:
    """The simulated step as a Chrome / Perfetto trace in ``fs.profile``'s format (a process per
    rank, a track per actor, times from the step's start on the simulated clock)."""
    from flowsys.profiler import Profile  # noqa: PLC0415

    prof = Profile(path)
    boxing = {n.id: n.op for n in ir.nodes if n.kind == "boxing"} if ir is not None else {}
    prof.add("predicted", pred.timeline, boxing)
    return prof.save(path)


def plan_job(job, devices: int, every_rank: bool = False, hardware: str | None = None,
             backend: str | None = None, trace: str | None = None) -> dict[str, Any]:
    """Compile without running; the summary ``flowsys plan`` prints. With ``hardware`` (a spec
    name or YAML path, see ``scheduler/hardware/``), also the cost model's prediction: step
    time, tokens/s, MFU, what bounds the step, and whether each rank's memory fits."""
    from flowsys.planformat import plan_pb2  # noqa: PLC0415
    from scheduler.cost import graph_flops, load_hardware, megatron_flops  # noqa: PLC0415
    from scheduler.lower import _Lowering  # noqa: PLC0415

    if devices < 1:
        raise ConfigError(f"flowsys plan: --devices must be at least 1, got {devices}")
    t0 = time.perf_counter()
    placements, model, ir = _compile(job, devices)
    t_compile = time.perf_counter() - t0
    hw = load_hardware(hardware, backend) if hardware else None
    # on a spec's nodes, collectives spanning nodes run the hierarchical schedules (node, then rail)
    lowering = _Lowering(ir, devices_per_node=hw.devices_per_node if hw is not None and hw.device != "cpu" else 1)
    # devices simulated on shared cores slow each other down: predict with every rank there
    every_rank = every_rank or (hw is not None and hw.cores_per_node is not None and devices <= 64)
    t0 = time.perf_counter()
    templates = None
    if not every_rank:
        ranks = {r: lowering.rank_plan(r) for r in sorted({int(pl.ranks[0]) for pl in placements})}
        stands_for = {r: [r] for r in ranks}
    elif hw is None:  # every distinct plan, once
        templates = lowering.templates()
        ranks = {t.rank: t.plan for t in templates}
        stands_for = {t.rank: t.ranks for t in templates}
    else:  # the cost model simulates every rank's plan
        ranks = {rp.rank: rp for rp in lowering.lower().ranks}
        stands_for = {r: [r] for r in ranks}
    t_lower = time.perf_counter() - t0
    k = ir.micro_batches
    per_rank = []
    for r, rp in ranks.items():
        sent: dict[str, int] = defaultdict(int)
        for op in rp.ops:
            if op.nbytes:
                times = 1 if op.phase == "optimizer" or op.per_step else k
                sent[op.op] += op.nbytes * times
        m = rp.memory
        for q in stands_for[r]:  # the ranks a template stands for: the same figures
            per_rank.append(dict(rank=q, stage=next(s for s, pl in enumerate(placements) if q in pl.ranks),
                                 ops=len(rp.ops), parameters=m.parameters, gradients=m.gradients,
                                 optimizer_state=m.optimizer_state, peak_activations=m.peak_activations,
                                 bytes_sent_per_step=dict(sorted(sent.items()))))
    per_rank.sort(key=lambda row: row["rank"])
    p = job.parallel
    summary = dict(devices=devices, layout=dict(dp=p.dp, tp=p.tp, pp=p.pp, zero_stage=p.zero_stage,
                                                micro_batches=p.micro_batches,
                                                activation_checkpointing=p.activation_checkpointing),
                   parameters=int(model.num_parameters()), graph_nodes=len(ir.nodes),
                   boxing_nodes=sum(n.kind == "boxing" for n in ir.nodes), compile_s=round(t_compile, 3),
                   lower_s=round(t_lower, 3), ranks=per_rank)
    if templates is not None:
        summary["templates"] = [dict(rank=t.rank, ranks=len(t.ranks)) for t in templates]
    if hw is not None:
        t0 = time.perf_counter()
        plan = plan_pb2.Plan(ranks=list(ranks.values()), micro_batches=k)
        # a stage's first rank stands for the stage's other ranks, unless every rank is simulated
        reps = None if every_rank else {int(pl.ranks[0]): [int(q) for q in pl.ranks] for pl in placements}
        pred = predict(plan, hw, world=devices, stands_for=reps, record=trace is not None)
        if trace is not None:
            summary["trace"] = write_trace(pred, trace, plan, ir)
        flops = graph_flops(ir)
        gpus = 1 if hw.device == "cpu" else devices  # simulated CPU devices share one peak
        peak = hw.peak(compute_dtype(job.train.precision).name) * gpus
        tokens = job.data.batch_size * job.model.block_size
        for r, cost in zip(per_rank, pred.ranks):
            total = r["parameters"] + r["gradients"] + r["optimizer_state"] + r["peak_activations"]
            r["predicted"] = dict(finish_s=cost.finish_s, compute_s=cost.compute_s, comm_wait_s=cost.comm_s,
                                  shared_cores_s=cost.shared_s, idle_s=cost.idle_s, flops=cost.flops,
                                  fits=total <= hw.memory)
        m = job.model  # Megatron-LM's count (Eq. 3, full recompute): the figure its papers report per GPU
        eq3 = megatron_flops(job.data.batch_size, m.block_size, m.n_layer, m.n_embd, m.vocab_size)
        summary["prediction"] = dict(hardware=hw.name, step_s=pred.step_s, tokens_per_s=tokens / pred.step_s,
                                     model_flops=flops, mfu=flops / (pred.step_s * peak), bound=pred.bound,
                                     megatron_flops=eq3, tflops_per_gpu=flops / pred.step_s / gpus / 1e12,
                                     tflops_per_gpu_eq3=eq3 / pred.step_s / gpus / 1e12,
                                     simulated_micro_batches=pred.micro_batches,
                                     driver_s=pred.overhead_s, device_memory=hw.memory,
                                     predict_s=round(time.perf_counter() - t0, 3))
    return summary


def format_plan(summary: dict[str, Any]) -> str:
    biggest = max((r["parameters"] + r["gradients"] + r["optimizer_state"] + r["peak_activations"]
                   for r in summary["ranks"]), default=0)
    unit, scale = ("GiB", 2**30) if biggest >= 2**30 else ("MiB", 2**20)

    def gib(n: int) -> str:
        return f"{n / scale:9.3f}"

    lay = summary["layout"]
    lines = [f"plan: {summary['parameters']:,} parameters on {summary['devices']} devices "
             f"(dp {lay['dp']} x tp {lay['tp']} x pp {lay['pp']}, ZeRO {lay['zero_stage']}, "
             f"{lay['micro_batches']} micro-batch(es), checkpointing {'on' if lay['activation_checkpointing'] else 'off'})",
             f"graph: {summary['graph_nodes']} nodes, {summary['boxing_nodes']} boxing; compiled in "
             f"{summary['compile_s']:.2f} s, lowered in {summary['lower_s']:.2f} s",
             f"{'rank':>6} {'stage':>5} {'ops':>6} {'params':>9} {'grads':>9} {'optim':>9} {'activ':>9} "
             f"{'total ' + unit:>9}  communication per step"]
    for r in summary["ranks"]:
        total = r["parameters"] + r["gradients"] + r["optimizer_state"] + r["peak_activations"]
        comm = ", ".join(f"{kind} {n / 2**20:.1f} MiB" for kind, n in r["bytes_sent_per_step"].items()) or "none"
        lines.append(f"{r['rank']:>6} {r['stage']:>5} {r['ops']:>6} {gib(r['parameters'])} {gib(r['gradients'])} "
                     f"{gib(r['optimizer_state'])} {gib(r['peak_activations'])} {gib(total)}  {comm}")
    if summary.get("templates"):
        lines.append(f"({len(summary['templates'])} distinct plans lowered for the {summary['devices']} ranks: "
                     f"the ranks alike up to their coordinates share one)")
    if len(summary["ranks"]) < summary["devices"]:
        lines.append(f"(one rank per pipeline stage shown; the {summary['devices'] // lay['pp']} ranks of a stage "
                     f"have the same plan up to their coordinates)")
    pred = summary.get("prediction")
    if pred:
        lines.append(f"predicted on {pred['hardware']}: {pred['step_s'] * 1e3:,.2f} ms per step, "
                     f"{pred['tokens_per_s']:,.0f} tokens/s, MFU {pred['mfu']:.1%} "
                     f"({pred['model_flops'] / 1e12:,.3f} TFLOP per step); bound by {pred['bound']}")
        lines.append(f"TFLOP/s per device: {pred['tflops_per_gpu_eq3']:,.1f} counted as Megatron-LM does (Eq. 3, "
                     f"{pred['megatron_flops'] / 1e12:,.0f} TFLOP per step), {pred['tflops_per_gpu']:,.1f} by "
                     f"flowsys's own count; simulated in {pred['predict_s']:.1f} s")
        lines.append(f"{'rank':>6} {'finish ms':>10} {'compute ms':>11} {'comm wait ms':>13} {'shared ms':>10} "
                     f"{'idle ms':>9}  memory")
        for r in summary["ranks"]:
            q = r["predicted"]
            fits = "fits" if q["fits"] else f"does NOT fit in {pred['device_memory'] / 2**30:.0f} GiB"
            lines.append(f"{r['rank']:>6} {q['finish_s'] * 1e3:10.2f} {q['compute_s'] * 1e3:11.2f} "
                         f"{q['comm_wait_s'] * 1e3:13.2f} {q['shared_cores_s'] * 1e3:10.2f} {q['idle_s'] * 1e3:9.2f}  {fits}")
    return "\n".join(lines)

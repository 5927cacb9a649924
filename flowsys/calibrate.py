"""Measure what the cost model needs to know about the runtime on this machine, per backend.

``calibrate(backend)`` runs a few small probe graphs on ``backend`` and fits the runtime terms
of a hardware spec (``scheduler/cost.py``) so that the model, run on the probes' own plans,
reproduces their measured times:

- ``op_overhead`` and ``step_overhead``: a chain of trivial ops on one rank at two lengths (the
  slope is the runtime's cost per actor firing beyond its kernel; the driver's share of a step
  is its time outside the ranks' firings);
- ``kernel_scale`` and ``op_overhead`` again: a one-layer GPT of a small transformer's shapes
  on one rank at two batch sizes (kernels run slower inside a step than timed alone and warm:
  cold caches, fresh outputs; a real op's firing costs more than a trivial one's);
- ``wire_bandwidth``: a step whose 4 MiB input the driver sends;
- ``rank_overhead``: a matmul/GELU/layer-norm mix on 1, 2 and 4 ranks at once (how the
  driver's share grows per rank; the mix's throughput is the first guess of ``parallel_ranks``);
- the ``intra_node`` link: many small all-gathers between 2 ranks in flight at once (the
  transport's CPU work per message), the same one after another (latency), and 4 MiB ones
  (bandwidth);
- ``parallel_ranks``: the one-layer GPT data parallel over 2 ranks and over 2 x 2 with its
  layers split in pairs (what n busy ranks of one machine achieve together while they also
  wait on each other: below 1 under one interpreter lock, up to the cores for processes).

Probes whose fits trade off or decide much (the two GPT sizes, the rank counts, the link's
message probes) are measured in interleaved rounds and their medians used: on a shared machine
one disturbed measurement would otherwise set a term for every prediction.

None of the probes is a model the calibration is then judged on (``benchmarks/bench_costmodel.py``
compares predictions with two-layer GPT steps). ``as_yaml`` writes the result as a hardware spec.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from flowsys.graph.api import Graph
from flowsys.placement import placement
from flowsys.sbp import broadcast, split
from flowsys.plan import predict
from scheduler.cost import Hardware, Link, clear_kernel_times, feed_bytes, load_hardware


class _Probe(Graph):
    """A probe: ``n`` links of a chain (``build`` says of what), run as per-rank plans; with a
    module, trained by ``opt``."""

    def __init__(self, n: int = 0, module=None, opt=None):
        super().__init__()
        self.n = n
        if module is not None:
            self.module = module
            self.add_optimizer(opt)
        self.config.executor = "plans"
        self.config.fuse = False  # a probe times the runtime per op: each of its ops stays one


class _Chain(_Probe):
    """``n`` dependent trivial ops."""

    def build(self, x):
        for _ in range(self.n):
            x = x + 1.0
        return x


class _Ring(_Probe):
    """``n`` all-gathers between the ranks of ``x``'s placement (each followed by a local slice)."""

    def build(self, x):
        for _ in range(self.n):
            x = x.to_global(sbp=broadcast).to_global(sbp=split(0))
        return x


class _Train(_Probe):
    """One training step of ``module`` on ``x``."""

    def build(self, x):
        loss = self.module(x).sum()
        loss.backward()
        return loss


def _measure(graph, args, repeats: int) -> tuple[float, float]:
    """Median step time and median span of the ranks' firings (first start to last end)."""
    from flowsys.profiler import profile  # noqa: PLC0415

    t = _median_time(graph, args, repeats)
    with profile() as prof:
        for _ in range(repeats):
            graph(*args)
    spans = [max(f.end for f in fired) - min(f.start for f in fired) for fired in prof.steps]
    return t, statistics.median(spans)


def _interleaved(probes: list, repeats: int, rounds: int = 3) -> list[tuple[float, float]]:
    """Each ``(graph, args)`` of ``probes`` measured ``rounds`` times in turn (a disturbance of
    the machine then spoils one round of every probe, not every round of one): per probe, the
    medians over the rounds of its time outside the ranks' firings and of its span."""
    runs = [[_measure(g, a, repeats) for g, a in probes] for _ in range(rounds)]
    return [(statistics.median(r[i][0] - r[i][1] for r in runs), statistics.median(r[i][1] for r in runs))
            for i in range(len(probes))]


def _span(plan, hw) -> float:
    return max((c.finish_s for c in predict(plan, hw).ranks), default=0.0)


def _linear_terms(plan, hw) -> tuple[float, float, float]:
    """A one-rank plan's simulated span as ``z + kernel_scale * k + op_overhead * f`` (exact on
    one rank, where firings run one after another): (z, k, f), from three simulations."""
    z = _span(plan, hw.replace(kernel_scale=0.0, op_overhead=0.0))
    k = _span(plan, hw.replace(kernel_scale=1.0, op_overhead=0.0)) - z
    f = _span(plan, hw.replace(kernel_scale=0.0, op_overhead=1e-3)) - z
    return z, k, f / 1e-3


def _median_time(fn, args, repeats: int) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(backend: str = "local", *, repeats: int = 7, base: str = "cpu") -> Hardware:
    """The ``base`` spec with its runtime terms measured on ``backend`` (which must be the one
    ``fs.init`` chose; it is started if none was)."""
    import flowsys as fs  # noqa: PLC0415
    from flowsys import nn, optim, runtime  # noqa: PLC0415

    if runtime.current() is None or runtime.current().name != backend:
        raise ValueError(f"calibrate({backend!r}): call fs.init(backend={backend!r}) first")
    hw = load_hardware(base, backend)
    one = placement("cpu", [0])
    # the backend's workers up and settled before anything is timed (a Ray cluster's processes
    # keep the cores busy for a while after it starts), and kernels timed afresh, now
    warm, (idx,) = _probe_gpt()
    for _ in range(5):
        warm(idx, idx)
    clear_kernel_times()

    # the runtime's cost per firing beyond its kernel: a chain of trivial ops at two lengths;
    # the driver's share of a step: its time outside the ranks' firings
    x = fs.zeros((4,)).to_global(one, broadcast)
    short, long_ = _Chain(50), _Chain(400)
    (t_short, span_short), (_, span_long) = _measure(short, (x,), repeats), _measure(long_, (x,), repeats)
    free = hw.replace(op_overhead=0.0)
    firings = len(long_.plan().ranks[0].ops) - len(short.plan().ranks[0].ops)
    op_overhead = ((span_long - _span(long_.plan(), free)) - (span_short - _span(short.plan(), free))) / firings
    hw = hw.replace(op_overhead=max(0.0, op_overhead), step_overhead=max(0.0, t_short - span_short))

    # kernels inside a step against kernels timed alone (warm), and the runtime's work per firing
    # of a real op (its inputs, outputs and attributes: more than the chain's trivial ops): a
    # one-layer GPT (not a model the calibration is judged on) at two batch sizes, the same
    # firings with kernels 4x apart; its span is linear in both terms, so the two spans fix both
    small, (i_small,) = _probe_gpt(rows=8)
    large, (i_large,) = _probe_gpt(rows=32)
    terms, fits = None, []
    for _ in range(3):  # three fits, their median: one measurement disturbed by the machine (the
        # first after the warm-up often is) would otherwise set the terms for every kernel; a fit
        # out of bounds is such a measurement: the kernels are timed again
        spans = [_measure(small, (i_small, i_small), repeats)[1], _measure(large, (i_large, i_large), repeats)[1]]
        terms = terms or [_linear_terms(small.plan(), hw), _linear_terms(large.plan(), hw)]
        (z0, k0, f0), (z1, k1, f1) = terms
        det = k1 * f0 - k0 * f1
        scale = ((spans[1] - z1) * f0 - (spans[0] - z0) * f1) / det if det else 0.0
        firing = ((spans[0] - z0) - scale * k0) / f0 if f0 else 0.0
        if 0.5 < scale < 5.0:
            fits.append((scale, max(firing, hw.op_overhead)))
        else:
            clear_kernel_times()
            terms = None
    if fits:
        hw = hw.replace(kernel_scale=statistics.median(f[0] for f in fits),
                        op_overhead=statistics.median(f[1] for f in fits))
    else:  # no clean pair: one factor from the large probe alone
        span = _measure(large, (i_large, i_large), repeats)[1]
        hw = hw.replace(kernel_scale=_fit(lambda k: _span(large.plan(), hw.replace(kernel_scale=k)), span, 0.5, 5.0))
    step_overhead = hw.step_overhead

    # ranks at once: the same mix on 1, 2 and 4 ranks, in interleaved rounds
    steady, counts = max(repeats, 11), (1, 2, 4)
    meshes = [placement("cpu", list(range(n))) for n in counts]
    mixes = _interleaved([(_Mix(60), (fs.randn(512 * n, 64).to_global(mesh, split(0)),
                                      fs.randn(64, 64).to_global(mesh, broadcast)))
                          for n, mesh in zip(counts, meshes)], steady)
    outside = {n: m[0] for n, m in zip(counts, mixes)}
    span_mix = {n: m[1] for n, m in zip(counts, mixes)}

    # the driver's feed: a step whose 4 MiB input the driver sends (a user's own tensor; a
    # worker reads a job's batches itself and parameters stay in the workers)
    layer = nn.Linear(1024, 1, bias=False)
    train = _Train(0, layer, optim.SGD(layer.parameters(), lr=1e-6))
    t_train, span_train = _measure(train, (fs.ones((1024, 1024)),), repeats)
    extra = max(1e-6, (t_train - span_train) - step_overhead)
    hw = hw.replace(wire_bandwidth=sum(feed_bytes(rp, fed_inputs=True) for rp in train.plan().ranks) / extra)

    # the throughput of n ranks together, in ranks at full speed; the driver's cost per rank: how
    # its share of a step grows with the ranks (the least-squares slope over 1, 2 and 4)
    parallel = {n: float(np.clip(n * span_mix[1] / span_mix[n], 0.25, hw.cores_per_node or 1)) if n > 1 else 1.0
                for n in counts}
    slope = float(np.polyfit(list(outside), list(outside.values()), 1)[0])
    hw = hw.replace(parallel_ranks=parallel, rank_overhead=max(0.0, slope))

    # the link between two ranks: the transport's CPU work per message from many small
    # all-gathers in flight at once, the latency from the same number one after another, the
    # bandwidth from 4 MiB all-gathers
    two = placement("cpu", [0, 1])
    small = fs.zeros((2,)).to_global(two, split(0))
    fan, ring = _Fan(20), _Ring(20)
    (_, span_fan), (_, span_ring) = _interleaved([(fan, (small,)), (ring, (small,))], repeats)

    def with_link(bandwidth=float("inf"), latency=0.0, overhead=0.0):
        lk = Link(bandwidth, latency, overhead)
        return hw.replace(intra_node=lk, inter_node=lk)

    latency = overhead = 0.0
    for _ in range(3):  # the two fits depend a little on each other
        overhead = _fit(lambda g: _span(fan.plan(), with_link(latency=latency, overhead=g)), span_fan, 0.0, 0.05)
        latency = _fit(lambda a: _span(ring.plan(), with_link(latency=a, overhead=overhead)), span_ring, 0.0, 0.05)
    big = fs.zeros((1 << 20,)).to_global(two, split(0))
    _, span_big = _measure(ring, (big,), repeats)
    inverse = _fit(lambda inv: _span(ring.plan(), with_link(1.0 / inv if inv else float("inf"), latency, overhead)),
                   span_big, 0.0, 1e-6)
    link = Link(1.0 / inverse if inverse else 1e12, latency, overhead)
    hw = hw.replace(intra_node=link, inter_node=link)

    # ranks at once while they also communicate: the one-layer GPT data parallel over 2 ranks,
    # and over 2 x 2 (its layers split in pairs: messages within the layers, as well as the
    # gradients' at the end); the throughput of n busy ranks fitted to it (the mix above has no
    # messages, and ranks that wait on each other within a layer share the cores less well)
    for n, (dp, tp) in ((2, (2, 1)), (4, (2, 2))):
        step, (idx,) = _probe_gpt(dp=dp, tp=tp)
        _, span = _measure(step, (idx, idx), steady)
        fitted = _fit(lambda q: _span(step.plan(), hw.replace(parallel_ranks={**hw.parallel_ranks, n: q})),
                      span, 0.25, float(hw.cores_per_node or 1), increasing=False)
        hw = hw.replace(parallel_ranks={**hw.parallel_ranks, n: fitted})
    return hw.replace(name=f"{hw.name} ({backend} backend, calibrated)")


def _probe_gpt(rows: int = 8, block: int = 64, width: int = 64, dp: int = 1, tp: int = 1):
    """A one-layer GPT with vocabulary 128, data parallel over ``dp`` devices (each group of
    ``tp`` splitting its layers), and its input: kernels of a small transformer's shapes (by
    default 8 sequences of 64 tokens per data-parallel rank, width 64)."""
    import flowsys as fs  # noqa: PLC0415
    from flowsys.plan import build, layout  # noqa: PLC0415
    from flowsys.train import job_from_dict  # noqa: PLC0415

    job = job_from_dict({"model": dict(vocab_size=128, block_size=block, n_layer=1, n_head=4, n_embd=width),
                         "data": {"batch_size": rows * dp}, "parallel": {"dp": dp, "tp": tp}})
    fs.manual_seed(0)
    placements = layout(job, dp * tp)
    _, _, step = build(job, placements)
    step.config.executor = "plans"
    idx = fs.tensor(np.random.default_rng(0).integers(0, 128, (rows * dp, block)))
    return step, (idx.to_global(placements[0], (split(0), broadcast)),)


def _fit(predicted, measured: float, lo: float, hi: float, steps: int = 40, increasing: bool = True) -> float:
    """The value in [lo, hi] at which ``predicted`` (monotonic) meets ``measured``, by bisection."""
    sign = 1.0 if increasing else -1.0

    def below(x: float) -> bool:
        return sign * predicted(x) < sign * measured

    if not below(lo):
        return lo
    if below(hi):
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        if below(mid):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class _Fan(_Probe):
    """``n`` all-gathers between the ranks of ``x``'s placement, all in flight at once."""

    def build(self, x):
        gathered = [(x + float(i)).to_global(sbp=broadcast) for i in range(self.n)]
        total = gathered[0]
        for g in gathered[1:]:
            total = total + g
        return total


class _Mix(_Probe):
    """A transformer's mix per link of the chain: a matmul, GELU, view ops, a residual add and
    a layer norm, on 512 rows of 64 per rank (a tiny GPT's shapes)."""

    def build(self, x, w):
        from flowsys.nn import functional as F  # noqa: PLC0415

        rows, width = x.shape
        for _ in range(self.n):
            y = F.gelu(x @ w).reshape(rows, 4, width // 4).transpose((1, 0, 2))
            x = F.layer_norm(x + y.transpose((1, 0, 2)).reshape(rows, width), (width,))
        return x


def as_yaml(hw: Hardware, backend: str) -> dict[str, Any]:
    """A hardware spec file's content for ``hw`` (runtime terms under ``backend``)."""

    def link(lk: Link) -> dict[str, float]:
        return {"bandwidth": lk.bandwidth, "latency": lk.latency, "overhead": lk.overhead}

    return {
        "name": hw.name,
        "device": {"kind": hw.device, "peak_flops": dict(hw.peak_flops), "memory_bandwidth": hw.memory_bandwidth,
                   "memory": hw.memory, "kernels": hw.kernels},
        "node": {"devices": hw.devices_per_node, "cores": hw.cores_per_node},
        "links": {"intra_node": link(hw.intra_node), "inter_node": link(hw.inter_node)},
        "runtime": {backend: {"op_overhead": hw.op_overhead, "step_overhead": hw.step_overhead,
                              "rank_overhead": hw.rank_overhead, "wire_bandwidth": hw.wire_bandwidth,
                              "shared_interpreter": hw.shared_interpreter, "kernel_scale": hw.kernel_scale,
                              "parallel_ranks": hw.parallel_ranks}},
    }

"""The cost model is the actor runtime on a simulated clock (actors/sim.py): on plans whose
firing order is fixed, the simulation fires what the real runtime fires, in the same order; its
trace has the real trace's tracks; and a 2-D layout's collectives run as comm's schedules on
shape-only arrays."""

import json
from collections import Counter

import numpy as np
import pytest

import flowsys as fs
from actors.runtime import OPTIMIZER_PIECE, PER_STEP_PIECE
from actors.sim import NullArray, Simulator, predict
from comm import algorithms as alg
from comm.inprocess import run_group
from flowsys import nn
from helpers import SumStep
from test_cost import Stages
from scheduler.cost import Hardware, Link
from scheduler.lower import _Lowering

B, S = fs.sbp.broadcast, fs.sbp.split


def _ideal(**changes) -> Hardware:
    base = Hardware(name="ideal", device="cuda", peak_flops={"float32": 1e9}, memory_bandwidth=1e9, memory=2**30,
                    devices_per_node=8, intra_node=Link(1e9, 1e-6), inter_node=Link(1e8, 1e-5), op_overhead=1e-6,
                    step_overhead=0.0, wire_bandwidth=float("inf"))
    return base.replace(**changes)


class Chain(fs.Graph):
    def __init__(self, n):
        super().__init__()
        self.n = n
        self.config.executor = "plans"
        self.config.record_timeline = True

    def build(self, x, w):
        for _ in range(self.n):
            x = x @ w
        return x


def Pipeline(stages, micro):
    """``stages`` linear stages on ranks 0..stages-1 (test_cost's), its firings recorded."""
    g = Stages(stages, micro, width=32, rows=16)
    g.config.record_timeline = True
    return g


def _order(timeline, rank):
    """A rank's firings in the order they started, as (op, piece); per-step and optimizer-phase
    firings in their phase (their relative order may differ with message timing)."""
    fired = sorted((f for f in timeline if f.rank == rank), key=lambda f: (f.start, f.end))
    pieces = [(f.op, f.piece) for f in fired if f.piece not in (PER_STEP_PIECE, OPTIMIZER_PIECE)]
    return pieces, sorted((f.op, f.piece) for f in fired if f.piece in (PER_STEP_PIECE, OPTIMIZER_PIECE))


def test_a_chain_fires_in_the_runtimes_order_and_takes_its_flops_over_the_peak():
    g = Chain(6)
    P = fs.placement("cpu", [0])
    x, w = fs.randn(64, 32).to_global(P, B), fs.randn(32, 32).to_global(P, B)
    g(x, w)
    pred = predict(g.plan(), _ideal(op_overhead=0.0, memory_bandwidth=float("inf")), record=True)
    assert _order(pred.timeline, 0) == _order(g.timeline, 0)
    assert pred.step_s == pytest.approx(6 * 2 * 64 * 32 * 32 / 1e9)


@pytest.mark.parametrize("stages,micro", [(2, 4), (3, 5)])
def test_a_pipeline_fires_in_the_runtimes_order(stages, micro, monkeypatch):
    # one register per edge on every stage (not 1F1B's stages - s): a rank takes one micro-batch
    # at a time, so what fires next never depends on when a message happens to arrive
    monkeypatch.setattr(_Lowering, "registers_on", lambda self, rank: 1)
    g = Pipeline(stages, micro)
    g(g.x)
    sim = Simulator(g.plan(), _ideal(), record=True)  # every micro-batch (predict may extend a few)
    sim.run()
    for rank in range(stages):
        assert _order(sim.timeline(), rank) == _order(g.timeline, rank), f"rank {rank}"
    # and the simulated trace has the measured trace's tracks: a process per rank, a thread per actor
    real = {(f.rank, f.op) for f in g.timeline}
    assert {(f.rank, f.op) for f in sim.timeline()} == real
    assert len(sim.timeline()) == len(g.timeline)


def test_the_simulated_trace_is_a_profile_trace(tmp_path):
    from flowsys.plan import write_trace

    g = Pipeline(2, 4)
    g(g.x)
    pred = predict(g.plan(), _ideal(), record=True)
    path = write_trace(pred, tmp_path / "step.json", g.plan(), g.ir)
    with fs.profile(tmp_path / "measured.json"):
        g(g.x)
    sim, real = (json.loads(p.read_text()) for p in (tmp_path / "step.json", tmp_path / "measured.json"))
    tracks = lambda t: {(e["pid"], e["args"]["name"]) for e in t["traceEvents"] if e["name"] == "thread_name"}
    assert tracks(sim) == tracks(real)
    assert sum(e["ph"] == "X" for e in sim["traceEvents"]) == sum(e["ph"] == "X" for e in real["traceEvents"])
    # the same firings on the same tracks: each event's rank, actor and name, with multiplicity
    def firings(trace):
        names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
        return Counter((e["pid"], names[e["pid"], e["tid"]], e["name"]) for e in trace["traceEvents"] if e["ph"] == "X")

    assert firings(sim) == firings(real)
    assert path.endswith("step.json")


def test_data_parallel_all_reduce_costs_the_ring_schedule():
    """Two ranks, one gradient all-reduced: the simulation sends what the ring sends."""
    P = fs.placement("cpu", [0, 1])
    fs.manual_seed(0)
    model = nn.Linear(256, 256, bias=False).to_global(P, B)

    step = SumStep(model, lr=0.1)
    step.compile(fs.randn(64, 256).to_global(P, S(0)))
    pred = predict(step.plan(), _ideal())
    _, sent = run_group(alg.ring_all_reduce, [np.zeros(256 * 256, np.float32)] * 2)
    assert pred.ranks[0].bytes_sent == pytest.approx(sent / 2, rel=0.01)
    # one rank simulated, standing for both: the same step, the peer's messages by symmetry
    half = type(step.plan())()
    half.CopyFrom(step.plan())
    del half.ranks[1]
    alone = predict(half, _ideal(), world=2, stands_for={0: [0, 1]})
    assert alone.step_s == pytest.approx(pred.step_s, rel=1e-9)


def test_null_arrays_run_the_collective_schedules_without_data():
    outs, sent = run_group(alg.ring_all_reduce, [NullArray((1000,), np.float32)] * 4)
    assert all(o.shape == (1000,) for o in outs) and sent == 4 * 2 * 3 * 250 * 4
    outs, _ = run_group(alg.ring_all_gather, [NullArray((3, 5), np.float16)] * 3)
    assert outs[0].shape == (9, 5) and outs[0].dtype == np.float16
    with pytest.raises(TypeError, match="no data"):
        np.asarray(NullArray((2,), np.float32))


def test_a_deadlocked_plan_is_reported_not_hung():
    g = Pipeline(2, 2)
    g.compile(g.x)
    plan = type(g.plan())()
    plan.CopyFrom(g.plan())
    for op in plan.ranks[1].ops:  # rank 1 never sends back what rank 0 waits for
        if op.kind == "send":
            op.kind, op.op = "fill_zeros", "fill_zeros"
            del op.inputs[:]
    with pytest.raises(Exception, match="deadlock"):
        Simulator(plan, _ideal()).run()


def test_the_smallest_published_row_is_predicted_within_a_quarter():
    """Megatron-LM's Table 1, 1.7B parameters on 32 A100s: 137 TFLOP/s per GPU by its Eq. 3
    (benchmarks/bench_published.py runs every row)."""
    from flowsys.job import load_job
    from flowsys.plan import plan_job

    job = load_job("examples/configs/published/megatron_1.7b.yaml")
    pred = plan_job(job, 32, hardware="a100-80g")["prediction"]
    assert 0.75 <= pred["tflops_per_gpu_eq3"] / 137.0 <= 1.25, pred
    assert pred["megatron_flops"] > pred["model_flops"]  # Eq. 3 recomputes the whole forward; flowsys less

"""``fs.profile()``: one Chrome trace of every actor firing on every rank, whose communication
events are exactly the boxing nodes ``explain()`` lists, by count and by bytes."""

import json
import re
from collections import Counter, defaultdict

import numpy as np
import pytest

import flowsys as fs
from flowsys.models import GPT, GPTConfig
from helpers import TrainStep

COMM = ("collective", "send", "recv")


def _dp_tp_step():
    fs.manual_seed(0)
    mesh = fs.placement("cpu", [[0, 1], [2, 3]])
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    model.to_global(mesh, GPT.parallel_plan(mesh, dp_axis=0, tp_axis=1))
    step = TrainStep(model, model.configure_optimizers(0.0, 1e-3, (0.9, 0.95)), accumulation=2)
    rng = np.random.default_rng(0)
    idx = fs.tensor(rng.integers(0, 64, (8, 16))).to_global(mesh, (fs.sbp.split(0), fs.sbp.broadcast))
    return step, idx


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    step, idx = _dp_tp_step()
    path = tmp_path_factory.mktemp("trace") / "trace.json"
    with fs.profile(path) as prof:
        losses = [float(step(idx, idx)) for _ in range(2)]
    return step, prof, json.loads(path.read_text()), losses


def test_the_trace_is_chrome_trace_json_with_a_track_per_rank_and_actor(profiled):
    step, prof, trace, _ = profiled
    events = trace["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(prof.firings) > 0
    for e in complete:
        assert set(e) >= {"name", "cat", "ph", "ts", "dur", "pid", "tid", "args"}
        assert e["ts"] >= 0 and e["dur"] >= 0
    ranks = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert ranks == {r: f"rank {r}" for r in range(4)}
    tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    # one track per (rank, actor): every plan op that fired, named after its op and id
    plan = step.plan()
    for rp in plan.ranks:
        ops = {op.id: op for op in rp.ops}
        fired = {e["tid"] for e in complete if e["pid"] == rp.rank}
        assert fired == set(ops)  # every actor of the rank's plan fired and has its own track
        for op_id in fired:
            assert tracks[(rp.rank, op_id)].startswith(ops[op_id].op)
    # each actor fires once per micro-batch, or once per step for per-step and optimizer ops
    per_actor = Counter((e["pid"], e["tid"]) for e in complete)
    for rp in plan.ranks:
        for op in rp.ops:
            times = 1 if op.phase == "optimizer" or op.per_step else 2
            assert per_actor[(rp.rank, op.id)] == 2 * times, op
    for e in complete:  # per-step and optimizer firings carry no micro-batch
        op = plan_op(plan, e)
        assert (e["args"]["micro_batch"] is None) == (op.phase == "optimizer" or op.per_step)


def plan_op(plan, e):
    rp = next(r for r in plan.ranks if r.rank == e["pid"])
    return next(op for op in rp.ops if op.id == e["tid"])


def test_communication_events_match_explain_by_count_and_bytes(profiled):
    step, _, trace, _ = profiled
    explained = {}
    for line in step.explain().splitlines():
        m = re.match(r"\s*(\d+)\s+\w+\s+BOXING\s+(\S+).*\s(\d+) bytes/step$", line)
        if m:
            explained[int(m.group(1))] = (m.group(2), int(m.group(3)))
    assert explained and any(nbytes for _, nbytes in explained.values())
    comm = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] in COMM]
    assert all(e["args"]["boxing"] for e in comm)
    sent, fired = defaultdict(int), Counter()
    for e in comm:
        sent[e["args"]["node"]] += e["args"]["bytes"]
        fired[e["args"]["node"]] += 1
    moving = {node for node, (_, nbytes) in explained.items() if nbytes}
    assert set(sent) >= moving  # every boxing node that moves bytes shows on the trace ...
    assert set(sent) <= set(explained)  # ... and nothing else communicates
    for node, (op, nbytes) in explained.items():
        assert sent.get(node, 0) == 2 * nbytes, (node, op)  # two steps recorded
    # by count: the firings the plan's communication ops imply, per boxing node
    expected = Counter()
    for rp in step.plan().ranks:
        for op in rp.ops:
            if op.kind in COMM:
                expected[op.node] += 2 * (1 if op.phase == "optimizer" or op.per_step else 2)
    assert fired == expected
    names = {e["name"] for e in comm}
    assert all("(boxing " in name for name in names)


def test_profiling_leaves_the_losses_unchanged(profiled):
    _, _, _, losses = profiled
    step, idx = _dp_tp_step()
    step.config.executor = "global"
    assert np.allclose([float(step(idx, idx)) for _ in range(2)], losses, rtol=1e-5)


def test_summary_and_nothing_recorded_outside_the_context(profiled, tmp_path):
    _, prof, _, _ = profiled
    text = prof.summary()
    assert text.startswith("2 step(s) recorded") and "collective" in text and "compute" in text
    step, idx = _dp_tp_step()
    with fs.profile() as inner:
        step(idx, idx)
    step(idx, idx)
    assert len(inner.steps) == 1 and inner.path is None
    assert inner.save(tmp_path / "x" / "t.json").endswith("t.json")


def test_the_optimizer_phase_keeps_its_gradient_collectives_in_flight_together(profiled):
    _, prof, _, _ = profiled
    for rank in range(4):
        spans = sorted((f.start, f.end) for f in prof.steps[1]
                       if f.rank == rank and f.phase == "optimizer" and f.kind == "collective")
        assert len(spans) > 1
        # a later all-reduce starts before an earlier one has finished: they overlap
        assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), rank

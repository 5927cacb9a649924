"""The cost model (scheduler/cost.py): FLOPs per op and per model, hardware specs, and the
simulated step, checked on plans whose answer is known in closed form; `flowsys plan
--hardware`; MFU on the progress line and in metrics."""

import json
import math

import numpy as np
import pytest

import flowsys as fs
from flowsys import nn, optim
from flowsys.errors import ConfigError
from flowsys.models import GPT, GPTConfig
from flowsys.plan import model_flops, plan_job
from flowsys.train import job_from_dict, run
from helpers import SumStep, TrainStep
from actors.sim import Simulator
from flowsys.plan import predict
from scheduler.cost import Hardware, Link, available, graph_flops, load_hardware, op_flops

B, S = fs.sbp.broadcast, fs.sbp.split


def _ideal(**changes) -> Hardware:
    """A device whose every cost is a round number: 1 GFLOP/s, 1 GB/s, no overheads."""
    base = Hardware(name="ideal", device="cuda", peak_flops={"float32": 1e9}, memory_bandwidth=1e9, memory=2**30,
                    devices_per_node=8, intra_node=Link(1e9, 0.0), inter_node=Link(1e8, 0.0), op_overhead=0.0,
                    step_overhead=0.0, wire_bandwidth=float("inf"))
    return base.replace(**changes)


class Chain(fs.Graph):
    def __init__(self, n, width):
        super().__init__()
        self.n, self.width = n, width
        self.config.executor = "plans"

    def build(self, x, w):
        for _ in range(self.n):
            x = x @ w
        return x


class Gathers(fs.Graph):
    def __init__(self, n, chained):
        super().__init__()
        self.n, self.chained = n, chained
        self.config.executor = "plans"

    def build(self, x):
        outs = []
        for i in range(self.n):
            src = x if not self.chained or not outs else outs[-1].to_global(sbp=S(0))
            outs.append((src + float(i)).to_global(sbp=B))
        return outs[-1]


def tiny_job(**parallel):
    return job_from_dict({"model": dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64),
                          "data": {"batch_size": 16}, "parallel": parallel})


def analytic_gpt_flops(cfg, batch: int) -> int:
    """Forward FLOPs x 3 (backward twice the forward): the 12 d^2 weights of each block, the
    attention scores and their use (full T x T), the LM head."""
    L, d, V, T = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size
    forward = batch * T * (2 * 12 * L * d * d + 2 * d * V + 4 * T * d * L)
    return 3 * forward


# ------------------------------------------------------------------------------------ FLOPs
def test_op_flops_count_products_and_attention_exactly():
    assert op_flops("matmul", [(8, 16), (16, 32)], [(8, 32)]) == 2 * 8 * 16 * 32
    assert op_flops("matmul", [(4, 8, 16), (16, 32)], [(4, 8, 32)]) == 2 * 4 * 8 * 16 * 32
    q = (2, 4, 64, 16)
    scores = 2 * 4 * 64 * 64
    assert op_flops("scaled_dot_product_attention", [q, q, q], [q]) == 2 * scores * 16 * 2 + 5 * scores
    assert op_flops("reshape", [(8, 8)], [(64,)]) == 0
    assert op_flops("add", [(8, 8), (8,)], [(8, 8)]) == 64


@pytest.mark.parametrize("parallel", [{}, dict(dp=2), dict(dp=2, tp=2), dict(pp=2, micro_batches=4)])
def test_model_flops_match_the_analytic_count_in_every_layout(parallel):
    job = tiny_job(**parallel)
    counted = model_flops(job)
    assert counted == pytest.approx(model_flops(tiny_job()), rel=1e-3)  # the model's work, not the layout's
    expected = analytic_gpt_flops(job.model, job.data.batch_size)
    # the plan also counts elementwise ops and the attention recomputed in backward: a few % more
    assert expected <= counted <= 1.12 * expected


# ------------------------------------------------------------------------------------ specs
def test_shipped_specs_load_and_a_bad_spec_is_named(tmp_path):
    assert {"cpu", "a100-80g", "h100-80g"} <= set(available())
    h100 = load_hardware("h100-80g")
    assert h100.device == "cuda" and h100.peak("bfloat16") > h100.peak("float32") > 0
    assert h100.intra_node.bandwidth > h100.inter_node.bandwidth
    assert h100.link(0, 7) == h100.intra_node and h100.link(0, 8) == h100.inter_node
    cpu = load_hardware("cpu", "local")
    assert cpu.peak("float32") > 1e8 and cpu.memory_bandwidth > 1e8 and cpu.cores_per_node >= 1
    assert cpu.shared_interpreter and not load_hardware("cpu", "ray").shared_interpreter
    with pytest.raises(ConfigError, match="not found.*a100-80g"):
        load_hardware("tpu-v9")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndevice: {kind: cuda}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*missing or malformed"):
        load_hardware(bad)
    with pytest.raises(ConfigError, match="not for backend 'nccl'"):
        load_hardware("cpu", "nccl")


# ------------------------------------------------------------------------------ simulation
def test_a_chain_of_matmuls_takes_its_flops_over_the_peak():
    chain = Chain(10, 64)
    P = fs.placement("cpu", [0])
    chain.compile(fs.randn(256, 64).to_global(P, B), fs.randn(64, 64).to_global(P, B))
    pred = predict(chain.plan(), _ideal(memory_bandwidth=float("inf")))
    assert pred.step_s == pytest.approx(10 * 2 * 256 * 64 * 64 / 1e9, rel=1e-9)
    assert pred.bound == "compute" and pred.ranks[0].flops == 10 * 2 * 256 * 64 * 64
    # memory bound when the bandwidth is what limits each op: bytes read and written
    slow = predict(chain.plan(), _ideal(memory_bandwidth=1e6))
    per_op = (256 * 64 + 64 * 64 + 256 * 64) * 4 / 1e6
    assert slow.step_s == pytest.approx(10 * per_op, rel=1e-9) and slow.bound == "memory bandwidth"
    # a fixed cost per firing and per step add up
    fixed = predict(chain.plan(), _ideal(memory_bandwidth=float("inf"), op_overhead=1e-3, step_overhead=0.5))
    assert fixed.step_s == pytest.approx(pred.step_s + 10e-3 + 0.5, rel=1e-9)


def test_collectives_in_flight_overlap_and_chained_ones_add_up():
    P = fs.placement("cpu", [0, 1])
    x = fs.zeros((1024,)).to_global(P, S(0))
    latency = 1e-3
    hw = _ideal(intra_node=Link(float("inf"), latency), memory_bandwidth=float("inf"), peak_flops={"float32": 1e30})
    together, chained = Gathers(10, chained=False), Gathers(10, chained=True)
    together.compile(x)
    chained.compile(x)
    # an all-gather over 2 ranks is one message per rank: in flight at once, they cost one latency
    assert predict(together.plan(), hw).step_s == pytest.approx(latency, rel=1e-6)
    assert predict(chained.plan(), hw).step_s == pytest.approx(10 * latency, rel=1e-6)
    # bandwidth: each rank sends its half (2 KiB) per gather
    wide = _ideal(intra_node=Link(2048 / latency, 0.0), memory_bandwidth=float("inf"), peak_flops={"float32": 1e30})
    assert predict(chained.plan(), wide).step_s == pytest.approx(10 * latency, rel=1e-6)
    # the transport's own work per message is spent by both ranks
    busy = _ideal(intra_node=Link(float("inf"), 0.0, overhead=1e-4), memory_bandwidth=float("inf"),
                  peak_flops={"float32": 1e30})
    assert predict(together.plan(), busy).step_s == pytest.approx(10 * 2 * 1e-4, rel=1e-6)


def test_ranks_sharing_cores_slow_each_other_down():
    P = fs.placement("cpu", [0, 1])
    chain = Chain(10, 64)
    chain.compile(fs.randn(512, 64).to_global(P, S(0)), fs.randn(64, 64).to_global(P, B))
    alone = _ideal(memory_bandwidth=float("inf"))
    on_two_cores = alone.replace(cores_per_node=2)
    on_one_core = alone.replace(cores_per_node=1)
    under_a_lock = alone.replace(cores_per_node=2, shared_interpreter=True)
    t = predict(chain.plan(), alone).step_s
    assert predict(chain.plan(), on_two_cores).step_s == pytest.approx(t)
    assert predict(chain.plan(), on_one_core).step_s == pytest.approx(2 * t)
    assert predict(chain.plan(), under_a_lock).step_s == pytest.approx(2 * t)
    measured = alone.replace(cores_per_node=2, parallel_ranks={1: 1.0, 2: 1.5})
    pred = predict(chain.plan(), measured)
    assert pred.step_s == pytest.approx(t * 2 / 1.5)
    # time spent waiting for a core (a firing runs at the speed for the ranks busy as it starts,
    # so the rank whose first firing started alone waited a little less)
    assert max(r.shared_s for r in pred.ranks) == pytest.approx(t * (2 / 1.5 - 1))


class Stages(fs.Graph):
    def __init__(self, stages, micro, width=256, rows=64):
        super().__init__()
        fs.manual_seed(0)
        self.placements = [fs.placement("cpu", [s]) for s in range(stages)]
        self.blocks = nn.ModuleList([nn.Linear(width, width, bias=False) for _ in range(stages)])
        for s, block in enumerate(self.blocks):
            block.set_stage(s, self.placements[s])
        self.add_optimizer(optim.SGD(self.blocks.parameters(), lr=0.0))
        self.config.gradient_accumulation_steps = micro
        self.config.executor = "plans"
        self.x = fs.randn(micro * rows, width).to_global(self.placements[0], B)

    def build(self, x):
        for block in self.blocks:
            x = block(x)
        loss = x.sum()
        loss.backward()
        return loss


def test_a_pipelines_linears_send_the_input_gradient_before_the_weight_gradient():
    """A linear's two gradients are one op (linear_grads, run side by side) except in a pipeline,
    where the input gradient, which the previous stage waits for, comes first on its own."""
    piped = Stages(2, 2).compile(fs.randn(128, 256).to_global(fs.placement("cpu", [0]), B))
    ops = [n.op for n in piped.nodes if n.kind == "op"]
    assert "linear_grads" not in ops and ops.index("linear_grad_input") < ops.index("linear_grad_weight")

    class Two(fs.Graph):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)

        def build(self, x):
            loss = self.b(self.a(x)).sum()
            loss.backward()
            return loss

    ops = [n.op for n in Two().compile(fs.randn(4, 8)).nodes if n.kind == "op"]
    assert "linear_grads" in ops and "linear_grad_weight" in ops  # the first linear's input needs none


@pytest.mark.parametrize("stages,micro", [(2, 4), (2, 8), (4, 8)])
def test_a_pipeline_pays_its_bubble(stages, micro):
    g = Stages(stages, micro)
    g.compile(g.x)
    hw = _ideal(memory_bandwidth=float("inf"), intra_node=Link(float("inf"), 0.0), inter_node=Link(float("inf"), 0.0))
    pred = predict(g.plan(), hw)
    busy = max(r.compute_s for r in pred.ranks)
    forward = 2 * 64 * 256 * 256 / 1e9  # one stage's forward of one micro-batch on the ideal device
    # the busiest stage's work plus the pipeline's filling and draining: at least p - 1 forward
    # slots, at most p - 1 slots of a forward and a backward (twice the forward)
    assert busy + (stages - 1) * forward * 0.999 <= pred.step_s <= busy + (stages - 1) * 3 * forward * 1.001
    idle = [r.idle_s for r in pred.ranks]
    assert all(a <= b + 1e-9 for a, b in zip(idle, idle[1:])) and idle[-1] > 0  # later stages wait longer


@pytest.mark.parametrize("stages,micro", [(2, 40), (4, 24), (8, 20)])
def test_long_pipelines_are_extended_exactly(stages, micro):
    g = Stages(stages, micro)
    g.compile(g.x)
    hw = _ideal(memory_bandwidth=float("inf"))
    full = Simulator(g.plan(), hw, stages)
    full.run()
    extended = predict(g.plan(), hw)  # simulated at W/2 + 2 and one more, extended linearly
    assert extended.step_s == pytest.approx(max(c.finish_s for c in full.costs()), rel=1e-6)


def test_optimizer_phase_collectives_are_in_flight_together():
    P = fs.placement("cpu", [0, 1])
    layers = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(6)])
    layers.to_global(P, B)

    g = SumStep(layers)
    g.compile(fs.randn(4, 8).to_global(P, S(0)))
    latency = 1e-2
    hw = _ideal(intra_node=Link(float("inf"), latency), memory_bandwidth=float("inf"), peak_flops={"float32": 1e30})
    grads = sum(op.kind == "collective" and op.phase == "optimizer" for op in g.plan().ranks[0].ops)
    assert grads >= 6
    # each gradient all-reduce over 2 ranks is one exchange of messages; the gradients'
    # all-reduces overlap (the runtime starts each as soon as its gradient is summed): one latency
    assert predict(g.plan(), hw).step_s == pytest.approx(latency, rel=1e-6)


# ---------------------------------------------------------------------------- flowsys plan
def test_plan_predicts_step_time_tokens_mfu_and_memory_fit():
    summary = plan_job(tiny_job(dp=2, tp=2), 4, hardware="a100-80g")
    pred = summary["prediction"]
    assert pred["hardware"] == "a100-80g" and pred["step_s"] > 0
    assert pred["tokens_per_s"] == pytest.approx(16 * 64 / pred["step_s"])
    assert pred["mfu"] == pytest.approx(pred["model_flops"] / (pred["step_s"] * 19.5e12 * 4))
    assert 0 < pred["mfu"] < 1 and pred["bound"]
    assert all(r["predicted"]["fits"] for r in summary["ranks"])
    from flowsys.plan import format_plan

    text = format_plan(summary)
    assert "predicted on a100-80g" in text and "tokens/s" in text and "MFU" in text and "bound by" in text


def test_plan_says_when_a_layout_does_not_fit_the_device():
    job = job_from_dict({"model": dict(vocab_size=50304, block_size=2048, n_layer=32, n_head=48, n_embd=6144),
                         "data": {"batch_size": 8}, "parallel": dict(dp=1, tp=2, pp=1)})
    summary = plan_job(job, 2, hardware="a100-80g")
    assert not any(r["predicted"]["fits"] for r in summary["ranks"])
    from flowsys.plan import format_plan

    assert "does NOT fit in 80 GiB" in format_plan(summary)


# ------------------------------------------------------------------------------------- MFU
def test_mfu_on_the_progress_line_matches_flops_over_time(tmp_path):
    metrics = tmp_path / "m.jsonl"
    job = job_from_dict({"model": dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64),
                         "data": {"batch_size": 16, "max_bytes": 200_000},
                         "train": {"steps": 6, "log_every": 3, "eval_batches": 1, "metrics": str(metrics)}})
    lines = []
    run(job, log=lines.append)
    assert any("MFU" in line and "GFLOP/s" in line for line in lines if line.startswith("step"))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    peak = next(float(line.split("peak ")[1].split(" GFLOP/s")[0].replace(",", "")) * 1e9
                for line in lines if line.startswith("model FLOPs"))
    independent = analytic_gpt_flops(job.model, 16)
    for r in records[1:]:  # the first step includes warm-up
        assert r["flops_per_step"] > 0 and math.isfinite(r["mfu"]) and 0 < r["mfu"] < 1
        mine = independent / r["step_s"] / peak  # FLOPs / time computed here
        assert r["mfu"] == pytest.approx(mine, rel=0.2)


def test_graph_flops_of_a_compiled_step():
    fs.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    step = TrainStep(model, optim.AdamW(model.parameters(), lr=1e-3))
    idx = fs.tensor(np.random.default_rng(0).integers(0, 64, (4, 16)))
    step(idx, idx)
    expected = analytic_gpt_flops(model.config, 4)
    assert expected <= graph_flops(step.ir) <= 1.2 * expected


# ------------------------------------------------------------------------------ calibration
@pytest.mark.timeout(120)
def test_calibration_fits_the_runtime_terms_and_writes_a_loadable_spec(tmp_path):
    import yaml

    from flowsys.calibrate import as_yaml, calibrate

    fs.init(backend="local")
    try:
        hw = calibrate("local", repeats=3)
    finally:
        fs.shutdown()
    assert hw.step_overhead > 0 and hw.wire_bandwidth > 0 and math.isfinite(hw.op_overhead)
    assert set(hw.parallel_ranks) == {1, 2, 4} and all(0 < v <= hw.cores_per_node for v in hw.parallel_ranks.values())
    assert hw.intra_node.latency >= 0 and hw.intra_node.overhead >= 0 and hw.intra_node.bandwidth > 0
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(as_yaml(hw, "local")))
    again = load_hardware(path, "local")
    assert again.parallel_ranks == hw.parallel_ranks and again.intra_node == hw.intra_node
    assert again.op_overhead == hw.op_overhead and again.shared_interpreter


def test_calibrate_refuses_a_backend_that_is_not_running():
    from flowsys.calibrate import calibrate

    with pytest.raises(ValueError, match="fs.init"):
        calibrate("ray")


def test_plan_cli_with_hardware():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "flowsys.cli", "plan", "examples/configs/tiny.yaml", "--devices", "4",
                           "--hardware", "h100-80g"], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "predicted on h100-80g:" in done.stdout and "bound by" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "flowsys.cli", "plan", "examples/configs/tiny.yaml", "--devices", "4",
                          "--hardware", "tpu"], capture_output=True, text=True, timeout=120, cwd=root)
    assert bad.returncode == 2 and "hardware spec 'tpu' not found" in bad.stderr

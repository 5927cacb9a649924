"""``flowsys plan`` compiles job configs without running them; job configs are typed: unknown
keys, wrong types and layouts that do not fit are errors naming the key."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowsys.errors import ConfigError
from flowsys.plan import plan_job
from flowsys.train import job_from_dict, load_job

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "flowsys.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_plan_of_the_tiny_job_on_8_devices():
    summary = plan_job(load_job(ROOT / "examples/configs/tiny_3d.yaml"), 8, every_rank=True)
    assert summary["layout"] == dict(dp=2, tp=2, pp=2, zero_stage=1, micro_batches=4, activation_checkpointing=True)
    assert [r["rank"] for r in summary["ranks"]] == list(range(8))
    assert [r["stage"] for r in summary["ranks"]] == [0] * 4 + [1] * 4
    for r in summary["ranks"]:
        assert r["parameters"] > 0 and r["optimizer_state"] > 0 and r["peak_activations"] > 0
        assert r["stage"] == 1 or r["bytes_sent_per_step"]["send"] > 0  # activations to the next stage
        assert r["bytes_sent_per_step"]["all_reduce"] > 0  # tensor parallelism
        assert r["bytes_sent_per_step"]["reduce_scatter"] > 0  # ZeRO 1's gradients
    assert sum(r["bytes_sent_per_step"].get("send", 0) for r in summary["ranks"][4:]) > 0  # gradients back


@pytest.mark.timeout(120)
def test_plan_cli_compiles_gpt3_for_1024_devices():
    done = _cli("plan", "examples/configs/gpt3_175b.yaml", "--devices", "1024", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["devices"] == 1024 and 170e9 < summary["parameters"] < 180e9
    assert len(summary["ranks"]) == 8  # one per pipeline stage
    # ZeRO 1 over dp 16 and tp 8: the optimizer state is an eighth of the parameters' bytes / 16 x 2
    r = summary["ranks"][1]
    assert r["optimizer_state"] == pytest.approx(2 * r["parameters"] / 16, rel=0.01)


def test_plan_text_output_and_a_layout_that_does_not_fit():
    done = _cli("plan", "examples/configs/tiny_3d.yaml", "--devices", "8")
    assert done.returncode == 0 and "dp 2 x tp 2 x pp 2" in done.stdout and "communication per step" in done.stdout
    bad = _cli("plan", "examples/configs/tiny_3d.yaml", "--devices", "6")
    assert bad.returncode == 2
    assert "dp 2 x tp 2 x pp 2 = 8 devices does not fit 6 devices" in bad.stderr


@pytest.mark.parametrize("values, message", [
    ({"parallel": {"dpp": 2}}, "job section 'parallel': unknown key(s) ['dpp']"),
    ({"model": {"n_layer": "two"}}, "job key model.n_layer: expected int, got 'two'"),
    ({"parallel": {"activation_checkpointing": "yes"}}, "job key parallel.activation_checkpointing: expected bool"),
    ({"optim": {"betas": [0.9]}}, "job key optim.betas: expected tuple"),
    ({"parallel": {"tp": 3}}, "parallel.tp=3 must divide model.n_head=4"),
    ({"parallel": {"pp": 3}}, "parallel.pp=3 stages for model.n_layer=2 blocks"),
    ({"parallel": {"zero_stage": 2}}, "parallel.zero_stage=2 shards over the data-parallel axis, but parallel.dp is 1"),
    ({"parallel": {"dp": 3}}, "data.batch_size=16 must split into parallel.micro_batches=1 micro-batches of a multiple of parallel.dp=3"),
    ({"parallel": {"micro_batches": 0}}, "parallel.micro_batches must be at least 1"),
    ({"checkpoint": {"every": 2}}, "checkpoint.dir must name a directory"),
    ({"checkpoint": {"dir": "/tmp/x", "max_restarts": 1}}, "checkpoint.max_restarts needs checkpoints to resume from"),
])
def test_bad_job_configs_name_the_key(values, message):
    with pytest.raises(ConfigError) as info:
        job_from_dict(values)
    assert message in str(info.value)


def test_progress_lines_and_jsonl_metrics(tmp_path):
    from flowsys.train import run

    lines = []
    metrics = tmp_path / "metrics.jsonl"
    job = job_from_dict({"model": {"vocab_size": 256, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16},
                         "data": {"max_bytes": 200_000, "batch_size": 4},
                         "train": {"steps": 4, "log_every": 2, "eval_batches": 1, "metrics": str(metrics)}})
    summary = run(job, log=lines.append)
    progress = [line for line in lines if line.startswith("step")]
    assert len(progress) == 2 and all("tok/s" in line and "ETA" in line for line in progress)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] == pytest.approx(summary["final_train_loss"])
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows)


@pytest.mark.parametrize("name, billions", [("megatron_1.7b", 1.7), ("megatron_3.6b", 3.6), ("megatron_7.5b", 7.5),
                                            ("megatron_18.4b", 18.4), ("megatron_39.1b", 39.1),
                                            ("megatron_76.1b", 76.1), ("megatron_145.6b", 145.6),
                                            ("megatron_310.1b", 310.1), ("megatron_529.6b", 529.6),
                                            ("megatron_1t", 1008.0)])
def test_published_configs_have_their_papers_layout_and_size(name, billions):
    """Megatron-LM's Table 1 rows: the layout the table gives, and the parameter count it states
    (in billions, to its one decimal)."""
    from flowsys.models import GPT
    from flowsys.nn import meta_init
    from flowsys.train import check_layout, load_job

    job = load_job(f"examples/configs/published/{name}.yaml")
    check_layout(job)
    with meta_init():
        model = GPT(job.model)
    assert round(model.num_parameters() / 1e9, 1) == billions

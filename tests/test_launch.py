"""``flowsys launch``: a script runs as the driver of a simulated multi-node Ray cluster, with
graphs on the Ray backend by default; the exit code is the script's; a cluster that lacks the
nodes asked for is a clear error."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flowsys.launch import cmdline, descendants

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import ray
    import flowsys as fs
    from flowsys.models import GPT, GPTConfig

    class Step(fs.Graph):
        def __init__(self, model, opt):
            super().__init__()
            self.model = model
            self.add_optimizer(opt)
        def build(self, x, y):
            _, loss = self.model(x, y)
            loss.backward()
            return loss

    fs.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    P = fs.placement("cpu", [0, 1, 2, 3])
    model.to_global(P, fs.sbp.broadcast)
    step = Step(model, fs.optim.AdamW(model.parameters(), lr=1e-3))
    rng = np.random.default_rng(0)
    x = fs.tensor(rng.integers(0, 32, (8, 8))).to_global(P, fs.sbp.split(0))
    y = fs.tensor(rng.integers(0, 32, (8, 8))).to_global(P, fs.sbp.split(0))
    losses = [round(float(step(x, y)), 5) for _ in range(2)]
    backend = fs.runtime.current()
    if backend is None:  # not launched: the driver ran the graph itself
        print("backend driver losses", losses, "nodes used 0")
    else:
        print("nodes", sum(n["Alive"] for n in ray.nodes()))
        print("backend", backend.name, "losses", losses, "nodes used", len(set(backend.nodes().values())))
    sys.exit(int(sys.argv[1]))
""")


def _flowsys(*args, timeout=240):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flowsys.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.timeout(300)
def test_launch_runs_the_script_on_four_simulated_nodes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    trace = tmp_path / "trace.json"
    done = _flowsys("launch", "--nodes", "4", "--profile", str(trace), str(script), "7")
    assert done.returncode == 7, done.stderr[-3000:]  # the script's exit code
    lines = done.stdout.splitlines()
    # --profile: one trace of both steps, a track per rank
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["pid"] for e in events if e["ph"] == "X"} == {0, 1, 2, 3}
    assert {e["args"]["step"] for e in events if e["ph"] == "X"} == {0, 1}
    assert f"wrote a trace of 2 step(s) to {trace}" in done.stdout
    assert "nodes 4" in lines
    result = next(line for line in lines if line.startswith("backend"))
    assert result.startswith("backend ray") and result.endswith("nodes used 4")
    # the same losses as the driver's own executor
    local = subprocess.run([sys.executable, str(script), "0"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "FLOWSYS_BACKEND": "local"})
    assert local.returncode == 0, local.stderr[-2000:]
    expected = next(line for line in local.stdout.splitlines() if line.startswith("backend"))
    assert result.split("losses")[1].split("nodes")[0] == expected.split("losses")[1].split("nodes")[0]


@pytest.mark.timeout(120)
def test_launch_refuses_a_cluster_without_the_nodes_asked_for(ray_cluster, tmp_path):
    script = tmp_path / "noop.py"
    script.write_text("print('should not run')\n")
    done = _flowsys("launch", "--nodes", "4", "--address", ray_cluster.address, str(script))
    assert done.returncode == 2
    assert "has 2 node(s)" in done.stderr and "asked for 4 node(s)" in done.stderr
    assert "should not run" not in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "x.py"], "--nodes must be at least 1"),
    (["--nodes", "2", "--devices-per-node", "0", "x.py"], "--devices-per-node must be at least 1"),
    (["--nodes", "2", "missing_script.py"], "no script 'missing_script.py'"),
    (["--nodes", "2", "--max-restarts", "-1", "x.py"], "--max-restarts must be >= 0"),
])
def test_launch_rejects_bad_arguments_before_starting_anything(args, message):
    done = _flowsys("launch", *args, timeout=60)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.timeout(300)
def test_flowsys_train_runs_a_parallel_job_locally_and_on_a_launched_cluster():
    common = ["train", "examples/configs/tiny.yaml", "train.steps=3", "train.log_every=1", "train.eval_batches=1"]
    local = _flowsys(*common)
    assert local.returncode == 0, local.stderr[-3000:]
    ray_run = _flowsys(*common, "cluster.backend=ray", "cluster.nodes=4")
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]

    def summary(out):
        import json

        return json.loads(out.stdout.strip().splitlines()[-1])

    a, b = summary(local), summary(ray_run)
    assert (a["backend"], b["backend"]) == ("local", "ray") and a["devices"] == b["devices"] == 4
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-5)
    assert "cluster up" in ray_run.stderr


@pytest.mark.timeout(300)
def test_a_killed_worker_restarts_from_the_latest_checkpoint_and_loses_nothing(tmp_path):
    """`flowsys launch --max-restarts 1` a checkpointing job and kill one worker process mid-job:
    it finishes with the uninterrupted run's final loss and the same sequence of samples."""
    import json
    import signal
    import time

    train = ["train", "examples/configs/tiny.yaml", "train.steps=10", "train.log_every=1", "train.eval_batches=1",
             "checkpoint.every=3"]  # the tiny job: dp2 x tp2 with ZeRO 1
    clean = _flowsys(*train, "cluster.backend=ray", "cluster.nodes=4", f"checkpoint.dir={tmp_path / 'clean'}")
    assert clean.returncode == 0, clean.stderr[-3000:]
    metrics = tmp_path / "metrics.jsonl"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([sys.executable, "-m", "flowsys.cli", "launch", "--nodes", "4", "--max-restarts", "1",
                            str(ROOT / "flowsys" / "cli.py"), *train, f"checkpoint.dir={tmp_path / 'killed'}",
                            f"train.metrics={metrics}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and not (metrics.exists() and '"step": 4' in metrics.read_text()):
            time.sleep(0.1)
        victims = [pid for pid in descendants(job.pid) if "RayWorker" in cmdline(pid)]  # ours only
        assert victims, "no worker process to kill"
        os.kill(victims[-1], signal.SIGKILL)
        out, err = job.communicate(timeout=240)
    finally:
        job.kill()
    assert job.returncode == 0, err[-3000:]
    assert "restart 1/1 from step_00000" in out

    def summary(text):
        return json.loads(text.strip().splitlines()[-1])

    a, b = summary(clean.stdout), summary(out)
    assert b["restarts"] == 1 and a["restarts"] == 0
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-5)
    assert b["samples_digest"] == a["samples_digest"]  # no sample skipped or repeated


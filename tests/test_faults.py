"""Jobs never lose work (issue #18): a fault matrix through ``flowsys launch --max-restarts 1
--address`` on one Ray cluster (the session's), dp2, a few steps per case. A worker dies (by the
fault-injection hook, ``FLOWSYS_FAULT``) in forward, backward, the optimizer, a checkpoint's pull
or write, or while a checkpoint loads; the driver is killed and the job run again; one byte of a
shard is flipped; two jobs share a directory. Each case ends with the uninterrupted run's final
loss and sample digest, or with a clear refusal naming what is wrong, and leaves no shared-memory
segment behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
JOB = {"model": {"vocab_size": 256, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": 0.0},
       "optim": {"lr": 3.0e-3, "warmup_steps": 1},
       "data": {"max_bytes": 65536, "batch_size": 4},
       "train": {"steps": STEPS, "eval_batches": 1, "log_every": 1},
       "parallel": {"dp": 2},
       "checkpoint": {"every": 1, "max_restarts": 1}}

pytestmark = pytest.mark.timeout(240)


def _job(tmp_path: Path, name: str) -> tuple[Path, Path]:
    import yaml

    directory = tmp_path / name
    path = tmp_path / f"{name}.yaml"
    job = json.loads(json.dumps(JOB))
    job["checkpoint"]["dir"] = str(directory)
    path.write_text(yaml.safe_dump(job))
    return path, directory


def _launch(ray_cluster, job: Path, *extra: str, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "flowsys.cli", "launch", "--nodes", "2", "--address", ray_cluster.address,
           "--max-restarts", "1", str(ROOT / "flowsys" / "cli.py"), "train", str(job), *extra]
    full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=200)


def _summary(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("fsys_")} if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def clean(ray_cluster, tmp_path_factory):
    """The uninterrupted run: its final loss and sample digest are what every case must end with."""
    job, _ = _job(tmp_path_factory.mktemp("clean"), "clean")
    done = _launch(ray_cluster, job)
    assert done.returncode == 0, done.stderr[-3000:]
    return _summary(done.stdout)


def _same_as(clean: dict, done: subprocess.CompletedProcess, restarts: int) -> dict:
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    got = _summary(done.stdout)
    assert got["final_train_loss"] == pytest.approx(clean["final_train_loss"], rel=1e-5)
    assert got["samples_digest"] == clean["samples_digest"]  # no sample skipped or repeated
    assert got["restarts"] == restarts
    return got


@pytest.mark.parametrize("phase", ["forward", "backward", "optimizer", "checkpoint_pull", "checkpoint_write"])
def test_a_worker_lost_in_each_phase_is_a_restart(ray_cluster, clean, tmp_path, phase):
    job, _ = _job(tmp_path, phase)
    done = _launch(ray_cluster, job, env={"FLOWSYS_FAULT": f"{phase}:1:3", "FLOWSYS_FAULT_MARK": str(tmp_path / "fired")})
    got = _same_as(clean, done, restarts=1)
    assert (tmp_path / "fired").exists()
    assert "rank 1 failed" in done.stdout  # the rank that died is named
    time.sleep(0.5)
    left = {n for n in _segments() if n.startswith(f"fsys_{got['transport_id']}_")}
    assert not left, f"shared-memory segments of the job left behind: {sorted(left)}"


def test_a_killed_driver_resumes_when_run_again_and_a_worker_lost_while_loading_is_a_restart(
        ray_cluster, clean, tmp_path):
    job, directory = _job(tmp_path, "driver")
    first = _launch(ray_cluster, job, env={"FLOWSYS_FAULT": "driver:0:3"})  # the driver exits as step 3 starts
    assert first.returncode == 70 and (directory / "step_000002").exists() and not (directory / "step_000003").exists()
    assert (directory / "LOCK").exists()  # left behind by the dead driver
    again = _launch(ray_cluster, job, env={"FLOWSYS_FAULT": "load:1", "FLOWSYS_FAULT_MARK": str(tmp_path / "fired")})
    got = _same_as(clean, again, restarts=1)
    assert got["resumed_from"] is not None
    assert "resuming from" in again.stdout and "took over" in (again.stdout + again.stderr).lower()


def test_a_flipped_byte_is_refused_or_skipped(ray_cluster, clean, tmp_path):
    job, directory = _job(tmp_path, "flip")
    done = _launch(ray_cluster, job, f"train.steps={STEPS - 1}")
    assert done.returncode == 0, done.stderr[-3000:]
    latest = sorted(directory.glob("step_*"))[-1]
    shard = sorted(latest.glob("rank_*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes; the size is unchanged
    shard.write_bytes(bytes(data))
    must = _launch(ray_cluster, job, "checkpoint.resume=must")
    assert must.returncode != 0 and shard.name in must.stderr and "corrupt" in must.stderr.lower()
    auto = _launch(ray_cluster, job)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "warning" in auto.stdout and shard.name in auto.stdout  # fell back to the previous checkpoint
    assert _summary(auto.stdout)["final_train_loss"] == pytest.approx(clean["final_train_loss"], rel=1e-5)


def test_two_jobs_on_one_directory(ray_cluster, tmp_path):
    job, directory = _job(tmp_path, "two")
    first = _launch(ray_cluster, job, "train.steps=40", wait=False)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not (directory / "LOCK").exists():
            time.sleep(0.1)
        second = _launch(ray_cluster, job)
        assert second.returncode == 2 and "is being written by" in second.stderr
        assert "one job writes a checkpoint directory" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)  # preemption: the launcher passes it on, the driver saves and exits
        try:
            out, _ = first.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            first.kill()
            raise
    assert first.returncode == 143 and "SIGTERM: stopped after step" in out
    assert (directory / "LOCK").exists() is False  # released on the way out
    resumed = _launch(ray_cluster, job, "train.steps=40")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout


def test_never_refuses_a_directory_with_checkpoints(ray_cluster, tmp_path):
    job, directory = _job(tmp_path, "never")
    (directory / "step_000001").mkdir(parents=True)
    (directory / "step_000001" / "MANIFEST.json").write_text(json.dumps({"step": 1, "files": {}}))
    done = _launch(ray_cluster, job, "checkpoint.resume=never")
    assert done.returncode == 2 and "checkpoint.resume is never" in done.stderr


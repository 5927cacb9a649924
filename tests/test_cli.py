"""The job config and the ``flowsys`` command line as a new user meets them: YAML 1.2 numbers, one-
line errors for bad files, ``--version`` and a ``train --help`` that lists every key, the resolved
config saved beside the metrics and in every checkpoint, one training loop on one device (the
same numbers as the eager reference), honest throughput, Ctrl-C, and ``flowsys launch`` with a
``flowsys`` command or an address that does not answer."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import flowsys as fs
from flowsys.cli import main
from flowsys.errors import ConfigError
from flowsys.job import SECTIONS, JobConfig, dump_job, job_from_dict, job_to_dict, load_job, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": {"vocab_size": 256, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16},
        "data": {"max_bytes": 65536, "batch_size": 4},
        "train": {"steps": 3, "log_every": 1, "eval_batches": 1}}


def _flowsys(*args, timeout=120, cwd=ROOT):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flowsys.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def _one_line_error(done, *needles):
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def local_backend():
    yield
    fs.shutdown()


# ----------------------------------------------------------------------------- the job file
def test_yaml_floats_are_yaml_1_2_in_files_and_overrides(tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text("optim: {lr: 3e-3, weight_decay: 1E-1}\ndata: {source: yes}\ntrain: {steps: 010}\n")
    job = load_job(job_file, parse_overrides(["optim.grad_clip=5e-1", "train.seed=1e3"]))
    assert (job.optim.lr, job.optim.weight_decay, job.optim.grad_clip) == (0.003, 0.1, 0.5)
    assert job.data.source == "yes"  # not True: YAML 1.2 has no yes/no booleans
    assert (job.train.steps, job.train.seed) == (10, 1000)  # 010 is ten; a whole float is an int
    assert parse_overrides(["optim.lr=3e-4", "a.b=no", "a.c=2024-01-01", "a.d=", "a.e=[0.9, 0.95]"]) == \
        {"optim.lr": 3e-4, "a.b": "no", "a.c": "2024-01-01", "a.d": "", "a.e": [0.9, 0.95]}


@pytest.mark.parametrize("text, message", [
    ("", "job.yaml is empty"),
    ("# only a comment\n", "job.yaml is empty"),
    ("- model\n- optim\n", "expected a mapping of sections"),
    ("bogus_key: 1\n", "unknown job section 'bogus_key'"),
    ("bogus_key: {a: 1}\n", "unknown job section 'bogus_key'"),
    ("train: 5\n", "job section 'train' must be a mapping"),
    ("train: [1, 2]\n", "job section 'train' must be a mapping"),
    ("model: {n_layer: [\n", "job.yaml is not valid YAML"),
    ("train: {steps: 0}\n", "train.steps must be at least 1"),
])
def test_bad_job_files_are_one_line_config_errors(tmp_path, text, message):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_job(job_file)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_inputs_on_the_command_line_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("")
    _one_line_error(_flowsys("train", tmp_path / "empty.yaml"), "flowsys train: error:", "is empty")
    for args, needle in [
        (["train", "examples/gpt_stdlib.yaml", "nosuchsection.key=1"], "unknown job section 'nosuchsection'"),
        (["plan", "examples/gpt_stdlib.yaml", "--devices", "1", "train.steps=x"], "train.steps: expected int, got 'x'"),
        (["launch", "--profile", "trace.json", "no_such_script.py"], "no script 'no_such_script.py'"),  # no --nodes
        (["launch", "--nodes", "2", "--", "flowsys"], "-- flowsys` needs a command"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"flowsys {args[0]}: error:") and needle in err, err


def test_the_job_round_trips_through_yaml_and_json():
    job = job_from_dict({**TINY, "optim": {"lr": 3e-4, "betas": [0.8, 0.9]}, "parallel": {"dp": 2},
                         "checkpoint": {"dir": "yes", "every": 2}})
    assert load_job_text(dump_job(job)) == job
    assert job_from_dict(json.loads(json.dumps(job_to_dict(job)))) == job
    assert set(job_to_dict(job)) == set(SECTIONS) and job_from_dict(job_to_dict(JobConfig())) == JobConfig()


def load_job_text(text: str):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.yaml").write_text(text)
        return load_job(Path(d) / "config.yaml")


# ------------------------------------------------------------------------------------- CLI
def _exits(capsys, *args) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 0
    return capsys.readouterr().out


def test_version_and_train_help_list_every_key_with_its_default(capsys):
    assert _exits(capsys, "--version").strip() == f"flowsys {fs.__version__}"
    text = _exits(capsys, "train", "--help")
    assert "checkpoint.resume (str, default auto)" in text
    assert "parallel.dp (int, default 1)" in text
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name} (" in text
    text = _exits(capsys, "--help")
    assert all(name in text for name in ("train", "plan", "launch", "prepare", "generate", "export"))
    # the subcommands other modules give, wired with their own arguments
    assert "--out" in _exits(capsys, "prepare", "--help") and "--prompt" in _exits(capsys, "generate", "--help")
    assert "--to" in _exits(capsys, "export", "--help")


@pytest.mark.timeout(60)
def test_an_address_that_does_not_answer_fails_at_once_naming_it():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = _flowsys("launch", "--address", f"127.0.0.1:{port}", "--", "flowsys", "train", "examples/gpt_stdlib.yaml",
                    timeout=30)
    _one_line_error(done, f"127.0.0.1:{port}", "no Ray cluster answers")


@pytest.mark.timeout(120)
def test_ctrl_c_ends_a_training_job_with_one_line_and_exit_130(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([sys.executable, "-m", "flowsys.cli", "train", "examples/gpt_stdlib.yaml", "train.steps=100000",
                            "data.max_bytes=65536", "model.n_layer=1", "model.n_embd=32", "model.block_size=16",
                            f"train.metrics={metrics}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and job.poll() is None and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.1)
        assert job.poll() is None, job.communicate()[1][-2000:]
        job.send_signal(signal.SIGINT)
        out, err = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "flowsys train: interrupted" and "Traceback" not in err
    assert (tmp_path / "config.yaml").exists()


# ------------------------------------------------------------------------ one training loop
def _reference(job) -> tuple[list[float], float]:
    """The job trained eagerly on one device, written out (what `run` did for one device before
    it shared the compiled loop): losses and validation loss."""
    from flowsys.data import ByteDataset
    from flowsys.models import GPT
    from flowsys.optim import WarmupCosine, clip_grad_norm_
    from flowsys.train import evaluate

    o, bs, t = job.optim, job.data.batch_size, job.model.block_size
    fs.manual_seed(job.train.seed)
    data = ByteDataset.from_stdlib(job.data.max_bytes, job.data.val_fraction)
    model = GPT(job.model)
    opt = model.configure_optimizers(o.weight_decay, o.lr, o.betas)
    sched = WarmupCosine(opt, o.warmup_steps, job.train.steps, min_lr=o.lr * o.min_lr_ratio)
    batches, losses = data.batches(bs, t, seed=job.train.seed), []
    for step in range(1, job.train.steps + 1):
        _, loss = model(*batches.at(step))
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, evaluate(model, data, bs, t, job.train.eval_batches)


def test_one_device_runs_the_shared_loop_with_the_eager_numbers_config_and_checkpoints(tmp_path, local_backend):
    from flowsys import checkpoint
    from flowsys.train import run

    job = job_from_dict(TINY, {"train.steps": 4, "train.metrics": str(tmp_path / "run" / "metrics.jsonl"),
                               "optim.warmup_steps": 1})
    lines = []
    full = run(job, log=lines.append)
    losses, val = _reference(job)
    np.testing.assert_allclose(full["losses"], losses, rtol=1e-5)
    np.testing.assert_allclose(full["val_loss"], val, rtol=1e-5)
    assert full["devices"] == 1 and full["backend"] == "local"
    assert load_job(tmp_path / "run" / "config.yaml") == job  # the resolved config beside the metrics
    assert sum(line.startswith("step") for line in lines) == 4

    # SIGTERM, checkpoints and resume, as on many devices; every checkpoint knows its job
    saving = job_from_dict(TINY, {"train.steps": 4, "optim.warmup_steps": 1, "checkpoint.dir": str(tmp_path / "ck"),
                                  "checkpoint.every": 3})

    def preempt_at_step_2(line: str) -> None:
        lines.append(line)
        if line.startswith("step     2/4"):
            os.kill(os.getpid(), signal.SIGTERM)  # a preempted node: save after this step and stop

    with pytest.raises(SystemExit) as info:
        run(saving, log=preempt_at_step_2)
    assert info.value.code == 143
    meta = json.loads((checkpoint.latest(tmp_path / "ck") / "meta.json").read_text())
    assert meta["step"] == 2 and meta["extra"]["job"] == job_to_dict(saving)
    rest = run(saving, log=lines.append)
    assert rest["resumed_from"] == "step_000002"
    np.testing.assert_allclose(rest["losses"], full["losses"], rtol=1e-5)
    # what `flowsys generate` needs it finds in the checkpoint the job wrote
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "def ", "--max-new-tokens", "4"]) == 0


# ------------------------------------------------------------------------------- throughput
class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("peak, mfu", [(2e9, "MFU 50.0%"), (0.5e9, "MFU 200.0%")])  # never clamped
def test_tokens_and_flops_per_second_come_from_the_same_window(monkeypatch, peak, mfu):
    from flowsys import train

    clock = _Clock()
    monkeypatch.setattr(train.time, "perf_counter", clock)
    job = job_from_dict(TINY, {"train.steps": 5, "train.log_every": 3})
    lines = []
    progress = train.Progress(job, lines.append, flops_per_step=10**9, peak_flops=peak)
    for i, seconds in zip(range(1, 6), [30.0, 1.0, 1.0, 2.0, 2.0]):  # step 1 compiles: not in the window
        clock.now += seconds
        progress.step(i, 5.0, 1e-3)
    progress.close()
    tokens = job.data.batch_size * job.model.block_size
    assert lines[0] == f"step     3/5  loss 5.0000  {tokens:,.0f} tok/s  1.00 GFLOP/s  {mfu}  ETA 0:02"
    assert lines[1].startswith(f"step     5/5  loss 5.0000  {tokens / 2:,.0f} tok/s  0.50 GFLOP/s")


def test_the_machine_peak_is_probed_once_and_cached(tmp_path, monkeypatch):
    import scheduler.cost
    from flowsys import train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    sizes = []
    monkeypatch.setattr(scheduler.cost, "probe_gemm", lambda dtype, n: sizes.append(n) or float(n) * 1e8)
    assert train.machine_peak() == max(train.PEAK_SIZES) * 1e8  # the best of the probes
    assert sizes == list(train.PEAK_SIZES)
    cached = json.loads((tmp_path / "flowsys" / "peak.json").read_text())
    assert list(cached.values())[0]["float32_flops"] == max(train.PEAK_SIZES) * 1e8
    monkeypatch.setattr(scheduler.cost, "probe_gemm", lambda dtype, n: pytest.fail("probed again"))
    assert train.machine_peak() == max(train.PEAK_SIZES) * 1e8


# ------------------------------------------------------------------------------ with Ray
@pytest.mark.timeout(240)
def test_launch_runs_a_flowsys_train_command_on_a_cluster(tmp_path, ray_cluster):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(dump_job(job_from_dict(TINY, {"parallel.dp": 2})))
    trace = tmp_path / "trace.json"
    done = _flowsys("launch", "--nodes", "2", "--address", ray_cluster.address, "--profile", trace, "--", "flowsys",
                    "train", job_file, "train.steps=2", timeout=220)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert (summary["backend"], summary["devices"], summary["steps"]) == ("ray", 2, 2)
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["pid"] for e in events if e["ph"] == "X"} == {0, 1}  # a track per rank
    assert f"wrote a trace of 3 step(s) to {trace}" in done.stdout  # two steps and the validation

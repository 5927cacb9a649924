"""Non-finite steps (issue #18): ``Graph.config.skip_nonfinite`` leaves out the update of a step
whose gradients hold a NaN or inf (the in-plan "all finite" test of the global norm, on every
rank), and ``train.on_nonfinite`` stops a job naming the step or skips on."""

import json
import math

import numpy as np
import pytest

import flowsys as fs
from flowsys import optim
from flowsys.models.gpt import GPT
from test_graph import CFG, TrainStep, _batches

B, S = fs.sbp.broadcast, fs.sbp.split


def _model(layout):
    fs.manual_seed(0)
    model = GPT(CFG)
    if layout == "dp2":
        placement = fs.placement("cpu", [0, 1])
        model.to_global(placement, B)
        return model, placement
    return model, None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("layout, zero", [(None, 0), ("dp2", 0), ("dp2", 2)])
def test_a_step_with_a_nan_gradient_is_left_out(layout, zero):
    model, placement = _model(layout)
    good = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    poisoned = dict(good)
    poisoned["lm_head.bias"] = good["lm_head.bias"].copy() if "lm_head.bias" in good else None
    key = "transformer.ln_f.bias"
    poisoned[key] = good[key].copy()
    poisoned[key][0] = np.nan
    model.load_state_dict({k: fs.tensor(v) for k, v in poisoned.items() if v is not None})
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    step = TrainStep(model, opt)
    step.config.skip_nonfinite = True
    step.config.zero_stage = zero
    (x1, y1), (x2, y2) = _batches("gpt", n=2)
    if placement is not None:
        x1, y1, x2, y2 = (t.to_global(placement, S(0)) for t in (x1, y1, x2, y2))
    assert np.isnan(float(step(x1, y1)))
    assert step.last_step_skipped and step.skipped_steps == 1 and step.last_grad_norm == float("inf")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), poisoned[k], err_msg=k)
    model.load_state_dict({k: fs.tensor(v) for k, v in good.items()})
    step(x2, y2)
    assert not step.last_step_skipped and step.skipped_steps == 1
    after = {k: v.numpy() for k, v in model.state_dict().items()}

    fresh, placement = _model(layout)  # one step from the good values on the second batch
    step2 = TrainStep(fresh, optim.AdamW(fresh.parameters(), lr=1e-2))
    step2.config.zero_stage = zero
    step2(x2, y2)
    for k, v in fresh.state_dict().items():
        np.testing.assert_allclose(after[k], v.numpy(), rtol=1e-6, atol=1e-7, err_msg=k)


def test_skipping_alone_does_not_change_a_finite_step():
    model, _ = _model(None)
    step = TrainStep(model, optim.SGD(model.parameters(), lr=0.1))
    step.config.skip_nonfinite = True
    ref, _ = _model(None)
    step_ref = TrainStep(ref, optim.SGD(ref.parameters(), lr=0.1))
    for x, y in _batches("gpt", n=2):
        assert float(step(x, y)) == float(step_ref(x, y))
    assert step.skipped_steps == 0
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_the_job_stops_naming_the_step_or_skips(tmp_path, policy):
    from flowsys.train import NonFiniteLoss, job_from_dict, run

    metrics = tmp_path / "metrics.jsonl"
    job = job_from_dict({"model": {"vocab_size": 256, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16},
                         "data": {"max_bytes": 65536, "batch_size": 4},
                         "optim": {"lr": 1.0e+6, "warmup_steps": 0, "grad_clip": 0.0},  # diverges at once
                         "train": {"steps": 6, "eval_batches": 1, "log_every": 100, "metrics": str(metrics),
                                   "on_nonfinite": policy},
                         "parallel": {"dp": 2}})
    lines = []
    if policy == "stop":
        with pytest.raises(NonFiniteLoss, match=r"step \d+: the loss is nan.*Last good checkpoint: none saved"):
            run(job, log=lines.append)
    else:
        summary = run(job, log=lines.append)
        assert summary["skipped_steps"] >= 1
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]  # valid JSON: NaN written as null
    assert rows and all(r["loss"] is None or math.isfinite(r["loss"]) for r in rows)
    if policy == "stop":
        assert any(r["loss"] is None for r in rows)
    # (skipping, the loss may stay finite: once the gradients overflow, the update is left out and
    # the parameters stay where the loss was finite; whether the forward or the backward overflows
    # first depends on the kernels' formulas)

"""Mixed precision (issue #17): ``fs.autocast``, ``Graph.config.precision`` (bf16 / fp16 with
float32 master weights), fp16 dynamic loss scaling with the in-plan "all finite" flag, and the
float32 main gradients (or ``grad_reduce_dtype``)."""

import numpy as np
import pytest

import flowsys as fs
from flowsys import checkpoint, nn, optim
from flowsys.errors import ArgumentError, ConfigError
from flowsys.graph.ir import GraphError
from flowsys.models.gpt import GPT
from test_graph import CFG, TrainStep, _batches

B, S = fs.sbp.broadcast, fs.sbp.split
STEPS = 2
LOW = {"bf16": fs.bfloat16, "fp16": fs.float16}


def _laid_out(layout):
    """The test GPT (seed 0) laid out as ``layout`` and its batch SBP."""
    fs.manual_seed(0)
    model = GPT(CFG)
    if layout is None:
        return model, None, None
    if layout == "dp2":
        placement = fs.placement("cpu", [0, 1])
        model.to_global(placement, B)
        return model, placement, S(0)
    placement = fs.placement("cpu", [[0, 1], [2, 3]])
    model.to_global(placement, GPT.parallel_plan(placement, dp_axis=0, tp_axis=1))
    return model, placement, (S(0), B)


def _eager(precision, steps=STEPS):
    """One device, eager, under ``fs.autocast``: the reference (SGD, so differences stay linear)."""
    model, _, _ = _laid_out(None)
    opt = optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, y in _batches("gpt", n=steps):
        with fs.autocast(LOW[precision]):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses, {k: v.numpy() for k, v in model.state_dict().items()}


def _compiled(precision, layout=None, zero=0, micro=1, reduce_in=None, scaler=None, steps=STEPS, opt="sgd",
              executor="plans", clip=0.0):
    model, placement, batch = _laid_out(layout)
    o = optim.SGD(model.parameters(), lr=0.1) if opt == "sgd" else optim.AdamW(model.parameters(), lr=1e-2)
    step = TrainStep(model, o, micro, executor)
    step.config.precision = precision
    step.config.zero_stage = zero
    step.config.grad_reduce_dtype = reduce_in
    step.config.grad_clip = clip
    step.loss_scaler = scaler
    losses = []
    for x, y in _batches("gpt", n=steps):
        if placement is not None:
            x, y = x.to_global(placement, batch), y.to_global(placement, batch)
        losses.append(float(step(x, y)))
    return losses, {k: v.numpy() for k, v in model.state_dict().items()}, step, o


@pytest.fixture(scope="module", params=["bf16", "fp16"])
def reference(request):
    return request.param, _eager(request.param)


# --------------------------------------------------------------------------------- autocast


def test_autocast_casts_parameters_once_and_keeps_float32_masters():
    lin = nn.Linear(4, 3)
    x = fs.ones(2, 4)
    with fs.autocast(fs.bfloat16):
        a, b = lin(x), lin(x)
        loss = fs.nn.functional.cross_entropy(a + b, fs.tensor(np.array([0, 1])))
    assert a.dtype == fs.bfloat16 and loss.dtype == fs.float32
    assert lin.weight.dtype == fs.float32
    assert a._node.inputs[1] is b._node.inputs[1]  # one cached cast of the weight
    loss.backward()
    assert lin.weight.grad.dtype == fs.float32 and lin.bias.grad.dtype == fs.float32
    with fs.autocast(fs.bfloat16), fs.autocast(fs.float32):  # float32 (or enabled=False) turns it off inside
        assert lin(x).dtype == fs.float32
    assert lin(x).dtype == fs.float32


def test_autocast_rejects_a_non_float_dtype():
    with pytest.raises(ArgumentError, match="precision must be one of"):
        fs.autocast(fs.int32)
    with pytest.raises(ArgumentError, match="precision must be one of"):
        fs.autocast("fp8")


def test_graph_rejects_a_bad_precision_or_reduce_dtype():
    with pytest.raises(ArgumentError, match="precision must be one of"):
        _compiled("fp8", steps=1)
    with pytest.raises(GraphError, match="grad_reduce_dtype"):
        _compiled("bf16", reduce_in="fp16", steps=1)


# ------------------------------------------------------------------------- compiled == eager


@pytest.mark.parametrize("layout, zero, micro", [(None, 0, 1), ("dp2", 0, 2), ("dp2xtp2", 1, 1), ("dp2", 3, 1)])
def test_compiled_low_precision_equals_eager(reference, layout, zero, micro):
    precision, (want_losses, want) = reference
    losses, got, step, _ = _compiled(precision, layout, zero, micro)
    assert step.ir.precision == precision
    np.testing.assert_allclose(losses, want_losses, rtol=1e-2)
    for k, v in got.items():
        assert v.dtype == np.float32, k  # the masters stay float32
        np.testing.assert_allclose(v, want[k], rtol=1e-2, atol=1e-3, err_msg=k)


def test_bf16_on_one_device_is_eager_bit_for_bit():
    want_losses, want = _eager("bf16")
    losses, got, _, _ = _compiled("bf16")
    assert losses == want_losses
    for k, v in got.items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_the_reference_interpreter_runs_the_policy_alike():
    a = _compiled("fp16", "dp2", executor="global")
    b = _compiled("fp16", "dp2")
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    for k in a[1]:
        np.testing.assert_allclose(a[1][k], b[1][k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_explain_shows_low_precision_matmuls_and_float32_masters():
    *_, step, _ = _compiled("bf16", "dp2", steps=1)
    text = step.explain()
    assert "precision bf16" in text
    matmuls = [line for line in text.splitlines() if " linear " in line and "forward" in line]
    assert matmuls and all("bfloat16[" in line and "-> bfloat16" in line for line in matmuls)
    updates = [line for line in text.splitlines() if "update sgd_update" in line]
    assert updates and all("master float32" in line and "grad float32" in line for line in updates)


# ----------------------------------------------------------------- where casts and reductions go


def _boxings(ir, phase):
    return [(n, ir.values[n.outputs[0]]) for n in ir.nodes if n.kind == "boxing" and n.phase == phase]


def test_casts_run_once_per_step_and_zero3_gathers_move_the_low_dtype():
    *_, step, _ = _compiled("bf16", "dp2", zero=3, micro=2, steps=1)
    ir = step.ir
    variables = set(ir.variables.values())
    casts = {n.id for n in ir.nodes if n.op == "astype" and n.inputs[0] in variables}
    assert len(casts) == len(variables)  # one cast per parameter, not one per use or micro-batch
    ops = [op for rp in step.plan().ranks for op in rp.ops if op.node in casts]
    assert ops and all(op.per_step for op in ops)  # once per step, not once per micro-batch
    gathers = [v for n, v in _boxings(ir, "forward") + _boxings(ir, "backward") if "all_gather" in n.op]
    assert gathers and all(v.dtype == fs.bfloat16 for v in gathers)


def test_gradients_reduce_in_float32_unless_asked():
    *_, step, _ = _compiled("bf16", "dp2", steps=1)
    reduces = [v for n, v in _boxings(step.ir, "optimizer") + _boxings(step.ir, "backward") if "all_reduce" in n.op]
    assert reduces and all(v.dtype == np.float32 for v in reduces)
    want_losses, want = _eager("bf16")
    losses, got, step, _ = _compiled("bf16", "dp2", reduce_in="bf16")
    reduces = [v for n, v in _boxings(step.ir, "backward") if "all_reduce" in n.op]
    assert reduces and all(v.dtype == fs.bfloat16 for v in reduces)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-2)
    for k, v in got.items():
        np.testing.assert_allclose(v, want[k], rtol=1e-2, atol=1e-3, err_msg=k)


# -------------------------------------------------------------------------- fp16 loss scaling


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("layout", [None, "dp2"])
def test_fp16_overflow_skips_the_step_and_recovers(layout):
    """A scale of 2**40 overflows float16: the first step is skipped everywhere (no parameter or
    optimizer state changes) and the scale backs off to 2**10; the second step is then exactly
    the first step of a run that starts at 2**10 from the second batch."""
    scaler = fs.LossScaler(init_scale=2.0**40, backoff_factor=2.0**-30)
    model, placement, batch = _laid_out(layout)
    start = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    step = TrainStep(model, opt)
    step.config.precision = "fp16"
    step.loss_scaler = scaler
    (x1, y1), (x2, y2) = _batches("gpt", n=2)
    if placement is not None:
        x1, y1, x2, y2 = (t.to_global(placement, batch) for t in (x1, y1, x2, y2))
    step(x1, y1)
    assert scaler.skipped_steps == 1 and scaler.scale == 2.0**10 and step.last_grad_norm == float("inf")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), start[k], err_msg=k)
    step(x2, y2)
    assert scaler.skipped_steps == 1 and scaler.good_steps == 1 and np.isfinite(step.last_grad_norm)
    after = {k: v.numpy() for k, v in model.state_dict().items()}

    model2, placement, batch = _laid_out(layout)
    step2 = TrainStep(model2, optim.AdamW(model2.parameters(), lr=1e-2))
    step2.config.precision = "fp16"
    step2.loss_scaler = fs.LossScaler(init_scale=2.0**10)
    step2(x2, y2)
    for k, v in model2.state_dict().items():
        np.testing.assert_array_equal(after[k], v.numpy(), err_msg=k)
    assert _adam_steps(opt) == {1}  # the skipped step did not count


def _adam_steps(opt) -> set:
    from flowsys.optim.state import pull_state

    pull_state(opt)
    states = [opt.state[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in opt.state]
    per_rank = [s for state in states for s in (state.values() if 0 in state else (state,))]  # a global one: by rank
    return {int(s["step"]) for s in per_rank}


def test_fp16_clips_the_unscaled_norm():
    """Loss scaling and clipping together: the norm reported and clipped is the unscaled one."""
    _, _, plain, _ = _compiled("bf16", steps=1, clip=0.1)
    _, _, scaled, _ = _compiled("fp16", steps=1, clip=0.1)
    assert scaled.loss_scaler.scale == 2.0**16
    np.testing.assert_allclose(scaled.last_grad_norm, plain.last_grad_norm, rtol=2e-2)


def test_loss_scaler_rules_match_torch_grad_scaler():
    torch = pytest.importorskip("torch")
    ours = fs.LossScaler(init_scale=8.0, growth_interval=3)
    theirs = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3)
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    for finite in [True, True, True, False, True, True, True, True]:
        opt.zero_grad()
        theirs.scale(w.sum() * (float("inf") if not finite else 1.0)).backward()
        theirs.step(opt)
        theirs.update()
        ours.update(finite)
        assert ours.scale == theirs.get_scale()


def test_a_checkpoint_round_trips_the_loss_scale(tmp_path):
    *_, step, opt = _compiled("fp16", steps=1)
    step.loss_scaler.update(False)
    step.loss_scaler.update(True)
    saved = step.loss_scaler.state_dict()
    checkpoint.save(tmp_path, step.model, opt, step=1, loss_scaler=step.loss_scaler)
    fresh = fs.LossScaler()
    checkpoint.load(tmp_path, step.model, opt, loss_scaler=fresh)
    assert fresh.state_dict() == saved and fresh.scale == 2.0**15 and fresh.skipped_steps == 1
    plain = tmp_path / "plain"
    checkpoint.save(plain, step.model, opt, step=1)
    with pytest.raises(fs.StateDictError, match="holds no loss scale"):
        checkpoint.load(plain, step.model, opt, loss_scaler=fs.LossScaler())


# ------------------------------------------------------------------------------------ jobs


def test_job_keys_name_the_precision():
    from flowsys.train import check_layout, job_from_dict

    job = job_from_dict({}, {"train.precision": "bf16", "train.grad_reduce_dtype": "bf16"})
    check_layout(job)
    with pytest.raises(ConfigError, match="train.precision"):
        check_layout(job_from_dict({}, {"train.precision": "fp8"}))
    with pytest.raises(ConfigError, match="train.grad_reduce_dtype"):
        check_layout(job_from_dict({}, {"train.precision": "bf16", "train.grad_reduce_dtype": "fp16"}))


# ------------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("zero, params, grads, optimizer", [
    (0, 2.0, 4.0, 12.0), (1, 2.0, 4.0, 6.0), (2, 2.0, 2.0, 6.0), (3, 1.0, 2.0, 6.0)])
def test_plan_memory_is_2_4_12_bytes_per_parameter_split_by_zero(zero, params, grads, optimizer):
    """The ZeRO paper's 2 + 4 + 12 bytes per parameter (a float32 gradient), on dp2: ZeRO 1
    splits the 12 (the float32 master and both moments), 2 also the gradient, 3 the weights."""
    *_, step, _ = _compiled("bf16", "dp2", zero=zero, steps=1, opt="adamw")
    n = sum(int(np.prod(p.shape)) for p in step.model.parameters())
    for rp in step.plan().ranks:
        m = rp.memory
        assert (m.parameters / n, m.gradients / n, m.optimizer_state / n) == (params, grads, optimizer)


def test_activations_take_half_the_bytes_in_a_pipeline_plan():
    from flowsys.plan import plan_job
    from flowsys.train import load_job

    def plan(precision):
        job = load_job("examples/configs/tiny_3d.yaml", {"train.precision": precision})
        return {r["rank"]: r for r in plan_job(job, 8)["ranks"]}

    full, half = plan("fp32"), plan("bf16")
    for rank, r in half.items():
        f = full[rank]
        assert r["parameters"] * 2 == f["parameters"] and r["gradients"] == f["gradients"]
        assert r["optimizer_state"] * 2 == f["optimizer_state"] * 3  # ZeRO 1 on dp 2: 12/2 against 8/2 bytes
        # the last stage's peak holds the loss's float32 logits as well (cross entropy computes in
        # float32): less than its float32 peak, but not half of it
        assert 0.4 < r["peak_activations"] / f["peak_activations"] < (0.6 if rank < 4 else 0.7)

"""The fusion pass and its generated kernels (flowsys/graph/fuse.py, flowsys/ops/fusion.py,
flowsys/ops/scalar.py): every fused op equals its unfused chain (float64 rtol 1e-10, float32
1e-5, float16/bfloat16 1e-2; bfloat16 through the generated kernel, against the chain in float64), graphs train the same with and without fusion on one device, on
global tensors in plans and under the global executor, a fused node never spans a boxing node,
and explain() and the plan's memory show what fusion did."""

from __future__ import annotations

import numpy as np
import pytest

import flowsys as fs
from flowsys import nn
from flowsys.ops import OPS, fused
from flowsys.ops import fusion
from flowsys.precision import bfloat16

T = lambda j: ("t", j)  # noqa: E731 - a part's result
IN = lambda k: ("in", k)  # noqa: E731 - a fused op's input

PROGRAMS = {
    "add-gelu-mul": ((("add", (IN(0), IN(1)), ()), ("gelu", (T(0),), (("approximate", "none"),)),
                      ("mul", (T(1), IN(2)), ()))),
    "gelu-tanh-sub": ((("gelu", (IN(0),), (("approximate", "tanh"),)), ("sub", (T(0), IN(1)), ()))),
    "gelu-grad-chain": ((("mul", (IN(0), IN(2)), ()),
                         ("gelu_grad", (IN(0), IN(1), T(0)), (("approximate", "none"),)),
                         ("add", (T(1), IN(1)), ()))),
    "gelu-grad-tanh": ((("gelu_grad", (IN(0), IN(1), IN(1)), (("approximate", "tanh"),)), ("neg", (T(0),), ()))),
    "exp-log-sqrt-tanh": ((("exp", (IN(0),), ()), ("add", (T(0), IN(1)), ()), ("log", (T(1),), ()),
                           ("sqrt", (T(2),), ()), ("tanh", (T(3),), ()))),
    "relu-maximum-div": ((("relu", (IN(0),), ()), ("maximum", (T(0), IN(1)), ()), ("div", (T(1), IN(2)), ()))),
}
N_INPUTS = {"add-gelu-mul": 3, "gelu-tanh-sub": 2, "gelu-grad-chain": 3, "gelu-grad-tanh": 2,
            "exp-log-sqrt-tanh": 2, "relu-maximum-div": 3}
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5, np.float16: 1e-2, bfloat16: 1e-2}


def _inputs(name: str, dtype, n: int = 3000) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    ins = [rng.standard_normal((3, n)) * 3 for _ in range(N_INPUTS[name])]
    if name == "exp-log-sqrt-tanh":
        ins[0], ins[1] = ins[0] / 3, np.abs(ins[1]) + 1.5  # exp within float16's range; log and sqrt of positives
    ins[-1] = np.asarray(1.5) if name in ("add-gelu-mul", "relu-maximum-div") else ins[-1]  # a 0-d scalar
    ins = [np.asarray(a).astype(dtype) for a in ins]
    if name.startswith("gelu-grad"):  # gelu_grad's second input is the forward output gelu(x), as in a graph
        ins[1] = OPS["gelu"].kernel(np, ins[0], approximate="tanh" if name.endswith("tanh") else "none")
    return ins


def _chain(program, ins):
    """The unfused chain: each part's own op, one after another."""
    temps = []
    for op, args, attrs in program:
        temps.append(OPS[op].kernel(np, *[ins[k] if kind == "in" else temps[k] for kind, k in args], **dict(attrs)))
    return temps[-1]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_every_fused_op_equals_its_unfused_chain(name, dtype, monkeypatch):
    program, ins = PROGRAMS[name], _inputs(name, dtype)
    got = OPS["fused_elementwise"].kernel(np, *ins, program=program)
    exact = None
    if name.startswith("gelu-grad"):  # the rule recomputes cdf(x) where the xp expression divides y by x:
        def exact(ins64):  # in float64 both need the y = gelu(x) that is not rounded to bfloat16
            approximate = "tanh" if name.endswith("tanh") else "none"
            return [ins64[0], OPS["gelu"].kernel(np, ins64[0], approximate=approximate)] + ins64[2:]
    want = _reference(monkeypatch, program, ins, dtype, _chain, exact)
    assert got.dtype == want.dtype and got.shape == want.shape
    want64 = want.astype(np.float64)  # near a cancellation to zero, the error is the operands' rounding
    # (a bfloat16 operand's rounding is 2**-9 of it: 1e-3 of the largest value, not 1e-4)
    np.testing.assert_allclose(got.astype(np.float64), want64, rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype] * np.abs(want64).max() * (1e-1 if dtype == bfloat16 else 1e-2))
    if dtype != np.float16 and fused.ENABLED:
        assert fusion.generated_usable(fusion.program_of(program), ins), "the generated kernel ran"


def _reference(monkeypatch, program, ins, dtype, chain, exact=None):
    """The parts' xp expressions in turn, generated kernels off. bfloat16 is computed in float32
    by its generated kernel and rounded once, so its reference is the chain in float64 (rounding
    after each part would lose more than the kernel near a cancellation); float16 runs the parts
    itself, rounding after each, and is compared with that chain."""
    if dtype == np.float16:
        return chain(program, ins)
    monkeypatch.setattr(fused, "ENABLED", False)
    try:
        if dtype == bfloat16:
            ins64 = [a.astype(np.float64) for a in ins]
            want = chain(program, exact(ins64) if exact else ins64)
            return tuple(w.astype(bfloat16) for w in want) if isinstance(want, tuple) else want.astype(bfloat16)
        return chain(program, ins)
    finally:
        monkeypatch.undo()


def test_nan_and_inf_propagate_as_in_numpy():
    program = PROGRAMS["relu-maximum-div"]
    x = np.array([np.nan, -np.inf, np.inf, -1.0, 2.0] * 20000, np.float32)
    y = np.array([0.0, np.nan, -1.0, 5.0, 1.0] * 20000, np.float32)
    got = OPS["fused_elementwise"].kernel(np, x, y, np.asarray(2.0, np.float32), program=program)
    np.testing.assert_array_equal(got, _chain(program, [x, y, np.asarray(2.0, np.float32)]))


def test_the_generated_source_is_a_file_numba_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSYS_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(fusion, "_compiled", {})  # as in a fresh process
    monkeypatch.setattr(fusion, "_loaded", {})
    program = fusion.program_of(PROGRAMS["add-gelu-mul"])
    src = fusion.numba_source(program, (False, False, True), np.float32)
    assert "cache=True" in src and "_erf32(" in src and "f32(0.5)" in src
    if fused.ENABLED:
        fusion.numba_kernel(program, (False, False, True), np.float32)
        files = list(tmp_path.glob("fused_*.py"))
        assert len(files) == 1 and files[0].read_text() == src
    # the same rules rendered for CUDA (CuPy's ElementwiseKernel): float32 maths functions
    in_params, out_params, op = fusion.cuda_source(program, 3, np.float32)
    assert in_params == "T x0, T x1, T x2" and out_params == "T out" and "erff(" in op and op.endswith("out = t2;")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x)
        z = nn.functional.gelu(h * 0.5 + x) * h - x
        return (z * z).mean()


def _train(fuse: bool, placement=None, executor: str = "auto", steps: int = 3):
    fs.manual_seed(0)
    net = Net()
    opt = fs.optim.SGD(net.parameters(), lr=0.05)
    x = fs.tensor(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    if placement is not None:
        net.to_global(placement, fs.sbp.broadcast)
        x = x.to_global(placement, fs.sbp.split(0))

    class Step(fs.Graph):
        def __init__(self):
            super().__init__()
            self.net = net
            self.add_optimizer(opt)
            self.config.fuse = fuse
            self.config.executor = executor

        def build(self, x):
            loss = self.net(x)
            loss.backward()
            return loss

    step = Step()
    losses = [float(step(x).numpy()) for _ in range(steps)]
    return losses, {k: v.numpy() for k, v in net.state_dict().items()}, step


@pytest.mark.parametrize("where", ["one device", "dp2 plans", "dp2 global executor"])
def test_a_fused_graph_trains_as_the_unfused_one(where):
    placement = None if where == "one device" else fs.placement("cpu", [0, 1])
    executor = "global" if "global" in where else "auto"
    ref_losses, ref_state, plain = _train(False, placement, executor)
    losses, state, step = _train(True, placement, executor)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for k in ref_state:
        np.testing.assert_allclose(state[k], ref_state[k], rtol=1e-5, atol=1e-6, err_msg=k)
    fused_nodes = [n for n in step.ir.nodes if n.op == "fused_elementwise"]
    assert fused_nodes and not any(n.op == "fused_elementwise" for n in plain.ir.nodes)
    assert {n.phase for n in fused_nodes} == {"forward", "backward"}  # the gradient's chains too
    ops = sum(len(n.attr["program"]) for n in fused_nodes)
    assert len(plain.ir.nodes) - len(step.ir.nodes) == ops - len(fused_nodes)


def test_a_fused_node_never_spans_a_boxing_node_and_keeps_its_parts_layout():
    _, _, step = _train(True, fs.placement("cpu", [0, 1]))
    g = step.ir
    producer = {o: n for n in g.nodes for o in n.outputs}
    for n in g.nodes:
        if n.op != "fused_elementwise":
            continue
        out = g.values[n.outputs[0]]
        assert n.sig.outs == (out.sbp,)
        for i in n.inputs:  # a boxed input comes in as an input, never as a part
            assert g.values[i].sbp == n.sig.ins[n.inputs.index(i)]
            assert producer.get(i) is None or producer[i].kind != "boxing" or i in n.inputs
    plan = step.plan()
    assert any(op.op == "fused_elementwise" for op in plan.ranks[0].ops)


def test_explain_reports_the_fused_kernels_and_the_memory_they_free():
    _, _, plain = _train(False, steps=1)
    _, _, step = _train(True, steps=1)
    text = step.explain()
    assert "FUSED " in text and "fused kernels: " in text and "one generated kernel" in text
    assert "fused kernels" not in plain.explain()
    mem = step.plan().ranks[0].memory.peak_activations
    assert mem <= plain.plan().ranks[0].memory.peak_activations


def test_the_gpt_step_compiles_with_fusion_on():
    """A GPT's ops are compound already (linear with its bias, layer norm with its affine, the
    attention probabilities): the pass finds no elementwise chain in its plain step (its residual
    adds fuse into the layer norms instead: below), and it still trains."""
    losses, _, step = _gpt_step(True, steps=1)
    assert np.isfinite(losses[0])
    assert not any(n.op == "fused_elementwise" for n in step.ir.nodes)


# ------------------------------------------------------------------ row reductions (fused_rows)
LN = (("eps", 1e-5), ("n_axes", 1))
ROW_PROGRAMS = {  # (program, outputs, input shapes)
    "layer_norm_affine": (((("layer_norm_affine", (IN(0), IN(1), IN(2)), LN),), (0,)), [(6, 40), (40,), (40,)]),
    "add-layer_norm_affine, both kept": (((("add", (IN(0), IN(1)), ()), ("layer_norm_affine", (T(0), IN(2), IN(3)), LN)),
                                          (0, 1)), [(3, 5, 40), (3, 5, 40), (40,), (40,)]),
    "layer_norm over two axes, then * scale": (((("layer_norm", (IN(0),), (("eps", 1e-5), ("n_axes", 2))),
                                                 ("mul", (T(0), IN(1)), ())), (1,)), [(4, 6, 7), ()]),
    "exp-softmax-sub": (((("mul", (IN(0), IN(1)), ()), ("softmax", (T(0),), (("axis", -1),)),
                          ("sub", (T(1), IN(0)), ())), (2,)), [(5, 33), (5, 33)]),
    "softmax_grad, scaled": (((("softmax", (IN(0),), (("axis", -1),)),
                               ("softmax_grad", (T(0), IN(1)), (("axis", -1), ("scale", 0.125)))), (0, 1)),
                             [(4, 3, 17), (4, 3, 17)]),
}


def _row_inputs(shapes, dtype):
    rng = np.random.default_rng(3)
    return [np.asarray(rng.standard_normal(s) * 2 + 0.5).astype(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(ROW_PROGRAMS))
def test_every_fused_row_op_equals_its_unfused_chain(name, dtype, monkeypatch):
    (program, outputs), shapes = ROW_PROGRAMS[name]
    ins = _row_inputs(shapes, dtype)
    got = OPS["fused_rows"].kernel(np, *ins, program=program, outputs=outputs)

    def chain(program, ins):
        temps = []
        for op, args, attrs in program:
            temps.append(OPS[op].kernel(np, *[ins[k] if kind == "in" else temps[k] for kind, k in args], **dict(attrs)))
        return tuple(temps[j] for j in outputs)

    wants = _reference(monkeypatch, program, ins, dtype, chain)
    assert len(got) == len(outputs)
    for g, want in zip(got, wants):
        assert g.dtype == want.dtype and g.shape == want.shape
        np.testing.assert_allclose(g.astype(np.float64), want.astype(np.float64), rtol=TOLERANCE[dtype],
                                   atol=TOLERANCE[dtype] * np.abs(want.astype(np.float64)).max() * 1e-2)
    if dtype != np.float16 and fused.ENABLED:
        assert fusion._row_plan(fusion.program_of(program), tuple(outputs), ins) is not None, "generated kernel ran"


def test_row_ops_alone_run_their_generated_kernels_and_match_torch():
    import torch

    x = np.random.default_rng(1).standard_normal((4, 9, 64)).astype(np.float32)
    w, b = (np.random.default_rng(2).standard_normal(64).astype(np.float32) for _ in range(2))
    tx = torch.from_numpy(x)
    ln = OPS["layer_norm_affine"].kernel(np, x, w, b, n_axes=1, eps=1e-5)
    ref = torch.nn.functional.layer_norm(tx, (64,), torch.from_numpy(w), torch.from_numpy(b), 1e-5)
    np.testing.assert_allclose(ln, ref.numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(OPS["softmax"].kernel(np, x, axis=-1), torch.softmax(tx, -1).numpy(), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(OPS["layer_norm"].kernel(np, x, n_axes=2, eps=1e-5),
                               torch.nn.functional.layer_norm(tx, (9, 64), eps=1e-5).numpy(), rtol=1e-5, atol=2e-6)
    # float64 exactly as NumPy's expression (no polynomial exp, no fast-math)
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    np.testing.assert_allclose(OPS["softmax"].kernel(np, x64, axis=-1), e / e.sum(-1, keepdims=True), rtol=1e-12)
    # cross entropy and its gradient: a target class per row (integers), ignored rows give 0
    logits, t = x.reshape(-1, 64), np.random.default_rng(3).integers(0, 64, 36)
    t[4] = -100
    g = np.random.default_rng(4).random(36).astype(np.float32)
    tl = torch.from_numpy(logits.astype(np.float64)).requires_grad_()
    ref = torch.nn.functional.cross_entropy(tl, torch.from_numpy(t), reduction="none", ignore_index=-100)
    ref.backward(torch.from_numpy(g.astype(np.float64)))
    for dtype, rtol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        ce = OPS["cross_entropy"].kernel(np, logits.astype(dtype), t, ignore_index=-100)
        grad = OPS["cross_entropy_grad"].kernel(np, logits.astype(dtype), t, g.astype(dtype), ignore_index=-100)
        assert ce.dtype == dtype and grad.dtype == dtype
        np.testing.assert_allclose(ce, ref.detach().numpy(), rtol=rtol, atol=rtol)
        np.testing.assert_allclose(grad, tl.grad.numpy(), rtol=rtol, atol=rtol)
    assert fusion._row_plan(fusion.program_of((("cross_entropy", (IN(0), IN(1)), (("ignore_index", -100),)),)), (0,),
                            (logits, t)) is not None  # the generated kernel ran
    # NaN in a row gives a NaN row, as NumPy
    x[0, 0, 3] = np.nan
    assert np.isnan(OPS["softmax"].kernel(np, x, axis=-1)[0, 0]).all()
    assert np.isnan(OPS["layer_norm_affine"].kernel(np, x, w, b, n_axes=1, eps=1e-5)[0, 0]).all()


def _gpt_step(fuse: bool, placement=None, steps: int = 3, layout: str = "dp"):
    cfg = fs.models.GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)
    fs.manual_seed(0)
    model = fs.models.GPT(cfg)
    idx = fs.tensor(np.random.default_rng(0).integers(0, 64, (4, 8)))
    if layout == "pp2":
        model.pipeline([fs.placement("cpu", [0]), fs.placement("cpu", [1])])
        idx = idx.to_global(fs.placement("cpu", [0]), fs.sbp.broadcast)
    elif layout == "tp2":
        model.to_global(placement, fs.models.GPT.parallel_plan(placement, tp_axis=0))
        idx = idx.to_global(placement, fs.sbp.broadcast)
    elif placement is not None:
        model.to_global(placement, fs.sbp.broadcast)
        idx = idx.to_global(placement, fs.sbp.split(0))
    opt = fs.optim.AdamW(model.parameters(), lr=1e-2)

    class Step(fs.Graph):
        def __init__(self):
            super().__init__()
            self.model = model
            self.add_optimizer(opt)
            self.config.fuse = fuse

        def build(self, idx, targets):
            _, loss = self.model(idx, targets)
            loss.backward()
            return loss

    step = Step()
    losses = [float(step(idx, idx).numpy()) for _ in range(steps)]
    return losses, {k: v.numpy() for k, v in model.state_dict().items()}, step


@pytest.mark.parametrize("where", ["one device", "dp2 plans", "tp2 plans", "pp2 plans"])
def test_the_gpt_step_fuses_each_residual_add_into_its_layer_norm(where):
    """x + f(x) then layer_norm: one generated kernel writes the residual sum (read again by the
    next residual add) and its layer norm; the step trains as the unfused one, data-, tensor- or
    pipeline-parallel."""
    placement = None if where == "one device" else fs.placement("cpu", [0, 1])
    layout = where.split()[0]
    ref_losses, ref_state, plain = _gpt_step(False, placement, layout=layout)
    losses, state, step = _gpt_step(True, placement, layout=layout)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for k in ref_state:
        # atol: the key bias has no gradient but rounding noise, which AdamW turns into ~1e-5 steps
        np.testing.assert_allclose(state[k], ref_state[k], rtol=1e-4, atol=1e-4, err_msg=k)
    rows = [n for n in step.ir.nodes if n.op == "fused_rows"]
    # per block: the attention's residual before ln_2, the MLP's before the next ln_1 (or ln_f);
    # across the pipeline's stage boundary the add and the norm live on different placements, and
    # under tensor parallelism the residual sum is a partial sum boxed to broadcast before its
    # norm: a fused node spans neither
    assert len(rows) == {"one": 4, "dp2": 4, "pp2": 3, "tp2": 0}[layout]
    assert not any(n.op == "fused_rows" for n in plain.ir.nodes)
    for n in rows:
        assert fusion.describe(n.attr["program"]) == "add -> layer_norm_affine" and len(n.outputs) == 2
        if placement is not None:  # global tensors: the signature holds both outputs' SBPs
            assert n.sig.outs == tuple(step.ir.values[o].sbp for o in n.outputs)
    text = step.explain()
    assert not rows or ("FUSED add -> layer_norm_affine" in text and f"fused kernels: {len(rows)}" in text)
    if placement is not None and rows:
        assert any(op.op == "fused_rows" for rp in step.plan().ranks for op in rp.ops)

"""Every registered op against its own rules: SBP rows, shape/dtype inference, gradient.

``CASES`` holds representative inputs and attributes for every op in ``flowsys.ops.OPS``; a new op
must add its row here (``test_every_registered_op_has_cases`` fails until it does). Each case is
run through the op's kernel and compared with its ``infer``, its SBP rows are checked for form,
and every op with a gradient rule gets its rule checked against finite differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

import flowsys as fs
from flowsys.ops import OPS, SbpRow, Spec
from flowsys.ops.math import BINARY, UNARY
from flowsys.ops.spectral import TRANSFORMS
from flowsys.sbp import Broadcast, PartialMax, PartialSum, Split
from flowsys.global_tensor import make_global, run_signature, signatures
from flowsys.tensor import Tensor, apply
from helpers import Arg, check_grad_fd, laid_out, make_inputs


@dataclass(frozen=True)
class Case:
    """Inputs (as ``check_op`` takes them) and attributes for one application of an op."""

    inputs: tuple
    attrs: dict = field(default_factory=dict)
    grad: bool = True  # check the gradient rule on this case (for ops that have one)


IDS = np.array([[0, 4], [-1, 0]])  # repeated and negative indices
TARGETS = np.array([0, 4, -100, 2])
BOOL = Arg((2, 3), dtype=bool)
DISTINCT = Arg((2, 3, 4), distinct=True)
POS = Arg((2, 3), low=0.5, high=2.0)
INT = Arg((2, 3), dtype=np.int32, low=-3, high=3)
TRIL = np.tril(np.random.default_rng(7).uniform(-1, 1, (2, 5, 4)))  # matmul's tri: causal probabilities' shape
_CAUSAL_SCORES = np.random.default_rng(9).uniform(-2, 2, (2, 5, 4)) + np.triu(np.full((5, 4), -np.inf), 1)
CAUSAL_PROBS = np.exp(_CAUSAL_SCORES - _CAUSAL_SCORES.max(-1, keepdims=True))
CAUSAL_PROBS /= CAUSAL_PROBS.sum(-1, keepdims=True)  # 0 past each query, as a causal softmax gives
TRIU = np.triu(np.random.default_rng(8).uniform(-1, 1, (2, 3, 4)))

CASES: dict[str, list[Case]] = {
    # elementwise
    "add": [Case(((2, 3), (3,))), Case((INT, Arg((3,), dtype=np.int64)), grad=False)],
    "sub": [Case(((2, 1), (1, 3)))],
    "mul": [Case(((2, 3), (2, 1))), Case((INT, INT), grad=False)],
    "div": [Case(((2, 3), Arg((3,), low=0.5, high=2.0)))],
    "pow": [Case((POS, (3,)))],
    "neg": [Case(((2, 3),)), Case((INT,), grad=False)],
    "exp": [Case(((2, 3),))],
    "log": [Case((POS,))],
    "sqrt": [Case((POS,))],
    "tanh": [Case(((2, 3),))],
    "maximum": [Case((Arg((2, 3), distinct=True), Arg((3,), distinct=True, low=-1.9, high=1.7)))],
    "where": [Case((BOOL, (2, 3), (3,))), Case((BOOL, INT, Arg((3,), dtype=np.int64)), grad=False)],
    "astype": [Case(((2, 3),), {"dtype": np.dtype(np.float64)}), Case(((2, 3),), {"dtype": np.dtype(np.int32)}, grad=False),
               Case((INT,), {"dtype": np.dtype(np.float32)}, grad=False)],
    **{name: [Case(((2, 3), (3,))), Case((INT, Arg((3,), dtype=np.int32)))]
       for name in ("eq", "ne", "lt", "le", "gt", "ge")},
    "logical_not": [Case((BOOL,))],
    "relu": [Case((Arg((3, 4), distinct=True),))],
    "gelu": [Case(((3, 4),)), Case(((3, 4),), {"approximate": "tanh"})],
    "gelu_grad": [Case(((3, 4), (3, 4), (3, 4))), Case(((3, 4), (3, 4), (3, 4)), {"approximate": "tanh"})],
    # reductions
    "sum": [Case(((2, 3, 4),)), Case(((2, 3, 4),), {"axis": (0, 2), "keepdims": True}),
            Case(((2, 3, 4),), {"axis": -1}), Case((INT,), {"axis": 1}, grad=False)],
    "max": [Case((DISTINCT,), {"axis": 1}), Case((DISTINCT,), {"axis": None, "keepdims": True}),
            Case((INT,), {"axis": 0}, grad=False)],
    "min": [Case((DISTINCT,), {"axis": (0, 2)}), Case((DISTINCT,))],
    "argmax": [Case((DISTINCT,), {"axis": 1}), Case((DISTINCT,), {"axis": None, "keepdims": True}), Case((DISTINCT,))],
    "broadcast_to": [Case(((3, 1),), {"shape": (2, 3, 4)}), Case(((),), {"shape": (2,)})],
    # shape
    "reshape": [Case(((2, 3, 4),), {"shape": (6, -1)}), Case(((1,),), {"shape": ()}),
                Case(((2, 6, 5),), {"shape": (2, 2, 3, 5)}), Case(((2, 4, 3, 5),), {"shape": (2, 12, 5)})],
    "transpose": [Case(((2, 3, 4),), {"axes": (2, 0, 1)}), Case(((2, 3, 4),), {"axes": None})],
    "getitem": [Case(((4, 5),), {"index": (slice(1, 3), np.array([0, 2, 2]))}),
                Case(((4, 5),), {"index": (slice(None, None, -1), None, 1)}),
                Case(((4, 5),), {"index": np.arange(20).reshape(4, 5) % 3 == 0})],
    "getitem_grad": [Case(((2, 3),), {"index": (slice(1, 3), np.array([0, 2, 2])), "shape": (4, 5)}),
                     Case(((4, 1),), {"index": (slice(None, None, -1), None, 1), "shape": (4, 5)})],
    "concatenate": [Case(((2, 3), (4, 3)), {"axis": 0}), Case(((2, 3), (2, 1), (2, 2)), {"axis": -1}),
                    Case((INT, (2, 3)), grad=False)],
    "split": [Case(((6, 4),), {"indices_or_sections": 3}), Case(((4, 5),), {"indices_or_sections": (1, 4), "axis": 1}),
              Case(((5, 2),), {"indices_or_sections": (-2,)}), Case(((6, 2),), {"indices_or_sections": (4, 2)})],
    "zeros_like": [Case(((2, 3),))],
    "take": [Case(((5, 3), IDS)), Case(((2, 5, 3), IDS), {"axis": 1}), Case(((4,), np.array(2)))],
    "take_grad": [Case(((2, 2, 3), IDS), {"shape": (5, 3)}), Case(((2, 2, 2, 3), IDS), {"axis": 1, "shape": (2, 5, 3)})],
    # linalg
    "matmul": [Case(((2, 3, 4), (4, 5))), Case(((4,), (3, 4, 2))), Case(((2, 1, 2, 3), (3, 3, 2))),
               Case(((3, 4), (4,))), Case((TRIL, (2, 4, 3)), {"tri": "lower"}), Case((TRIU, (4, 2)), {"tri": "upper"})],
    "linear": [Case(((2, 3, 4), (5, 4), (5,))), Case(((4,), (6, 4), (6,))), Case(((6, 4), (2, 4), (2,))),
               Case(((2, 3, 4), (3, 2, 4), (3, 2))), Case(((2, 3, 4), (5, 4))), Case(((6, 4), (3, 2, 4)))],
    "linear_grad_input": [Case(((2, 3, 5), (5, 4))), Case(((2, 3, 3, 2), (3, 2, 4))), Case(((6,), (6, 4)))],
    "linear_grad_weight": [Case(((2, 3, 5), (2, 3, 4))), Case(((2, 3, 3, 2), (2, 3, 4))), Case(((6,), (4,)))],
    "linear_grads": [Case(((2, 3, 5), (5, 4), (2, 3, 4))), Case(((2, 3, 3, 2), (3, 2, 4), (2, 3, 4))),
                     Case(((6,), (6, 4), (4,)))],
    # nn
    "softmax": [Case(((3, 4),)), Case(((3, 4),), {"axis": 0})],
    "bias_gelu": [Case(((2, 3, 4), (4,))), Case(((5, 3), (3,)), {"approximate": "tanh"})],
    "bias_gelu_grad": [Case(((2, 3, 4), (4,), (2, 3, 4))), Case(((5, 3), (3,), (5, 3)), {"approximate": "tanh"})],
    "softmax_grad": [Case(((3, 4), (3, 4)), {"axis": 0}), Case(((3, 4), (3, 4)), {"scale": 0.5}),
                     Case((CAUSAL_PROBS, (2, 5, 4)), {"scale": 0.5, "causal": True})],
    "scaled_softmax": [Case(((2, 3, 4),), {"scale": 0.5}), Case(((2, 4, 3),), {"scale": 0.25, "causal": True})],
    "log_softmax": [Case(((3, 4),), {"axis": -1})],
    "log_softmax_grad": [Case(((3, 4), (3, 4)))],
    "cross_entropy": [Case(((4, 5), TARGETS)), Case(((2, 3, 5), np.array([[0, 1, 2], [4, 4, -1]])), {"ignore_index": -1})],
    "cross_entropy_grad": [Case(((4, 5), TARGETS, (4,)))],
    # vocabulary-parallel (tests/test_vocab_parallel.py checks their composition against cross_entropy):
    "vocab_embedding": [Case(((5, 3), np.array([[0, 4], [2, 0]])), {"vocab_size": 5})],
    "vocab_embedding_grad": [Case(((2, 2, 3), np.array([[0, 4], [2, 0]])), {"vocab_size": 5, "shape": (5, 3)})],
    "vocab_max": [Case(((3, 4),)), Case(((2, 3, 5),))],
    "vocab_ce_parts": [Case(((4, 5), TARGETS, (4,)), {"vocab_size": 5}),
                       Case(((2, 3, 5), np.array([[0, 1, 2], [4, 4, -1]]), (2, 3)), {"vocab_size": 5, "ignore_index": -1})],
    "vocab_ce_parts_grad": [Case(((4, 5), TARGETS, (4,), (4,), (4,)))],
    "vocab_max_grad": [Case((DISTINCT, (2, 3), (2, 3)))],
    "layer_norm": [Case(((2, 3, 4),)), Case(((2, 3, 4),), {"n_axes": 2, "eps": 1e-3})],
    "layer_norm_grad": [Case(((2, 3, 4), (2, 3, 4)), {"n_axes": 2})],
    "layer_norm_affine": [Case(((2, 3, 4), (4,), (4,))), Case(((2, 3, 4), (3, 4), (3, 4)), {"n_axes": 2, "eps": 1e-3}),
                          Case(((4,), (4,), (4,)))],
    "layer_norm_affine_grad": [Case(((2, 3, 4), (4,), (2, 3, 4))), Case(((2, 3, 4), (3, 4), (2, 3, 4)), {"n_axes": 2})],
    "dropout": [Case(((3, 4),), {"p": 0.3, "seed": 7}), Case(((3, 4),), {"p": 1.0, "seed": 1}, grad=False)],
    "sdpa_probs": [Case(((2, 3, 4), (2, 5, 4)), {"is_causal": True}), Case(((2, 1, 3, 4), (2, 4, 4)))],
    "scaled_dot_product_attention": [Case(((2, 3, 4), (2, 5, 4), (2, 5, 3)), {"is_causal": True, "scale": 0.3}),
                                     Case(((2, 1, 3, 4), (2, 4, 4), (4, 2))),
                                     Case(((2, 3, 4), (2, 5, 4), (2, 5, 3)))],
    # optimizer updates (param, grad, state...): elementwise, not differentiated
    "sgd_update": [Case(((2, 3), (2, 3)), {"lr": 0.1}),
                   Case(((4,), (4,)), {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "maximize": True}),
                   Case(((2, 3, 4), (2, 3, 4), (2, 3, 4)), {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01,
                                                            "nesterov": True})],
    "adamw_update": [Case(((2, 3), (2, 3), (2, 3), Arg((2, 3), low=0.0, high=1.0)), {"lr": 0.1, "step": 1}),
                     Case(((3, 4, 2), (3, 4, 2), (3, 4, 2), Arg((3, 4, 2), low=0.0, high=1.0)),
                          {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1, "step": 5,
                           "maximize": True})],
    "sum_squares": [Case(((2, 3, 4),)), Case(((5,),))],
    "clip_scale": [Case((Arg((), low=0.5, high=4.0, dtype=np.float64),), {"max_norm": 1.0}),
                   Case((Arg((), low=0.0, high=0.1, dtype=np.float64),), {"max_norm": 1.0, "dtype": "float64"})],
}

# The Array API elementwise families (flowsys/ops/math.py): one case per op from its table entry,
# in the domain where the function is smooth; integer and bool ops on integer and bool inputs.
UNIT = Arg((2, 3), low=-0.9, high=0.9)
_DOMAIN = {"acos": UNIT, "asin": UNIT, "atanh": UNIT, "acosh": Arg((2, 3), low=1.1, high=3.0),
           "log1p": POS, "log2": POS, "log10": POS, "reciprocal": POS, "abs": DISTINCT, "sign": DISTINCT,
           "floor": DISTINCT, "ceil": DISTINCT, "trunc": DISTINCT, "round": DISTINCT}
_BY_CATEGORY = {"integer or boolean": INT, "integer": Arg((2, 3), dtype=np.int32, low=0, high=3), "boolean": BOOL,
                "complex floating-point": Arg((2, 3), dtype=np.complex64)}
# Ops whose gradient is zero (piecewise constant): finite
# differences cannot tell that from any other rule; test_zero_gradients checks them instead.
ZERO_GRADIENT = ("ceil", "floor", "trunc", "round", "sign", "floor_divide")
for _name, (_fn, _cat, *_rest) in UNARY.items():
    CASES[_name] = [Case((_BY_CATEGORY.get(_cat, _DOMAIN.get(_name, (2, 3))),), grad=_name not in ZERO_GRADIENT)]
_SECOND = {"floor_divide": Arg((3,), low=0.5, high=2.0), "remainder": Arg((3,), low=0.5, high=2.0),
           "minimum": Arg((3,), distinct=True, low=-1.9, high=1.7), "copysign": Arg((3,), distinct=True)}
for _name, (_fn, _cat, *_rest) in BINARY.items():
    _arg = _BY_CATEGORY.get(_cat)
    CASES[_name] = [Case((_arg, _arg) if _arg is not None else (Arg((2, 3), distinct=True), _SECOND.get(_name, (3,))),
                         grad=_name not in ZERO_GRADIENT)]

# Along-an-axis ops (flowsys/ops/arrays.py).
ALONG = np.array([[0, 2, 2], [1, 0, 1]])
CASES.update({
    "prod": [Case(((2, 3),), {"axis": 1}), Case((INT,), {"axis": None, "keepdims": True})],
    "argmin": [Case((DISTINCT,), {"axis": 1}), Case((DISTINCT,), {"axis": None})],
    "cumulative_sum": [Case(((2, 3),), {"axis": 1}), Case(((2, 3),), {"axis": 0, "include_initial": True})],
    "cumulative_prod": [Case(((2, 3),), {"axis": 1}), Case((INT,), {"axis": 0, "include_initial": True})],
    "flip": [Case(((2, 3, 4),), {"axis": (1,)}), Case(((2, 3),), {"axis": None})],
    "roll": [Case(((2, 3),), {"shift": 1, "axis": 1}), Case(((2, 3),), {"shift": 2})],
    "argsort": [Case((DISTINCT,), {"axis": 1}), Case((INT,), {"axis": 1, "descending": True})],
    "take_along_axis": [Case(((2, 3), ALONG), {"axis": 1}), Case(((1, 3), ALONG), {"axis": 1})],
    "take_along_axis_grad": [Case(((2, 3), ALONG), {"axis": 1, "shape": (2, 3)})],
    "searchsorted": [Case((np.array([-1.0, 0.0, 0.5, 1.0]), (2, 3)), {"side": "right"})],
    "tril": [Case(((3, 4),), {"k": 0}), Case(((2, 3, 4),), {"k": 1})],
    "triu": [Case(((3, 4),), {"k": -1}), Case(((2, 3, 4),), {"k": 0})],
    "repeat": [Case(((2, 3),), {"repeats": 2, "axis": 1}), Case(((2, 3),), {"repeats": (1, 0, 2), "axis": 1}),
               Case(((2, 3),), {"repeats": 2})],
    "repeat_grad": [Case(((2, 6),), {"repeats": 2, "axis": 1, "shape": (2, 3)})],
})

# The linalg extension's matrix ops (flowsys/ops/decomp.py), on well-conditioned matrices.
WELL = np.array([[2.0, 0.3, -0.4], [0.1, 1.5, 0.2], [-0.3, 0.6, 1.8]])
STACK = np.stack([WELL, WELL.T + np.eye(3)])
SPD = np.array([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]])
# cholesky and eigvalsh read one triangle: finite differences of a lone element are not the
# symmetric gradient; tests/test_array_api.py checks them through a symmetric input.
SYMMETRIC_GRADIENT = ("cholesky", "eigvalsh")
CASES.update({
    "inv": [Case((WELL,)), Case((STACK,))],
    "det": [Case((STACK,))],
    "slogdet": [Case((STACK,))],
    "solve": [Case((STACK, (2, 3, 2))), Case((WELL, (3,)))],
    "cholesky": [Case((SPD,), grad=False), Case((np.stack([SPD, SPD + np.eye(3)]),), {"upper": True}, grad=False)],
    "eigh": [Case((np.stack([SPD, SPD + np.diag([0.0, 1.0, 3.0])]),))],
    "eigvalsh": [Case((SPD,), grad=False)],
    "qr": [Case(((3, 2),)), Case(((2, 2, 3),), {"mode": "complete"})],
    "svd": [Case(((2, 3, 2),), {"full_matrices": False}), Case(((3, 2),))],
    "svdvals": [Case((WELL,)), Case(((2, 3, 2),))],
    "pinv": [Case(((3, 2), np.array(1e-10)))],
})

# The fft extension's transforms (flowsys/ops/spectral.py): complex or real input by the table.
_COMPLEX = Arg((2, 4), dtype=np.complex128)
CASES.update({op: [Case((_COMPLEX if cat == "floating-point" else (2, 4),), {"axes": (1,)}),
                   Case((_COMPLEX if cat == "floating-point" else (2, 4),),
                        {"s": (3, 6) if op.endswith("n") else (6,), "axes": (0, 1) if op.endswith("n") else (0,),
                         "norm": "ortho"})]
              for op, (cat, _out, _rule) in TRANSFORMS.items()})

# the fusion pass's op: a chain (add, gelu, mul by a 0-d scale) and one with a partial-sum row (add, neg)
_CHAIN = ((("add", (("in", 0), ("in", 1)), ()), ("gelu", (("t", 0),), (("approximate", "none"),)),
           ("mul", (("t", 1), ("in", 2)), ())))
CASES["fused_elementwise"] = [Case(((3, 4), (3, 4), ()), {"program": _CHAIN}, grad=False),
                              Case(((3, 4), (3, 4)), {"program": (("add", (("in", 0), ("in", 1)), ()),
                                                                  ("neg", (("t", 0),), ()))}, grad=False)]

# a residual add kept as an output beside the layer norm that reads it; a softmax with an epilogue
_LN = (("eps", 1e-5), ("n_axes", 1))
CASES["fused_rows"] = [
    Case(((2, 3, 4), (2, 3, 4), (4,), (4,)), {"outputs": (0, 1), "program": (
        ("add", (("in", 0), ("in", 1)), ()), ("layer_norm_affine", (("t", 0), ("in", 2), ("in", 3)), _LN))}, grad=False),
    Case(((3, 5), ()), {"outputs": (1,), "program": (("softmax", (("in", 0),), (("axis", -1),)),
                                                      ("mul", (("t", 0), ("in", 1)), ()))}, grad=False)]

# Known bugs: (test, case id) -> reason. Each becomes a strict xfail, so a fix must remove its entry.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _cases(test: str) -> list:
    params = []
    for name, cases in CASES.items():
        if name not in OPS:
            continue
        for i, case in enumerate(cases):
            case_id = f"{name}-{i}"
            bug = KNOWN_BUGS.get((test, case_id))
            marks = [pytest.mark.xfail(reason=bug, strict=True)] if bug else []
            params.append(pytest.param(name, case, id=case_id, marks=marks))
    return params


GRAD_OPS = sorted(name for name, op in OPS.items() if op.grad is not None)


def _arrays(case: Case, dtype=None) -> list[np.ndarray]:
    arrays, _ = make_inputs(case.inputs, np.random.default_rng(0), dtype=dtype)
    return arrays


def test_every_registered_op_has_cases():
    missing = sorted(set(OPS) - set(CASES))
    assert not missing, f"add representative inputs for {missing} to CASES in tests/test_registry.py"
    stale = sorted(set(CASES) - set(OPS))
    assert not stale, f"CASES lists ops that are not registered: {stale}"


@pytest.mark.parametrize("name,case", _cases("infer"))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_infer_matches_the_kernel(name, case, dtype):
    op = OPS[name]
    arrays = _arrays(case, dtype)
    copies = [a.copy() for a in arrays]
    specs = tuple(Spec(a.shape, a.dtype) for a in arrays)
    inferred = op.infer(*specs, **case.attrs)
    out = op.kernel(np, *arrays, **case.attrs)
    if op.multi_output:
        assert isinstance(inferred, tuple) and len(out) == len(inferred)
    else:
        inferred, out = (inferred,), (out,)
    for i, (spec, o) in enumerate(zip(inferred, out)):
        o = np.asarray(o)
        assert (o.shape, o.dtype) == (spec.shape, spec.dtype), f"{name} output {i}: kernel gives {o.dtype}{list(o.shape)}, infer says {spec}"
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c, err_msg=f"{name}'s kernel wrote into its input")


@pytest.mark.parametrize("name,case", _cases("sbp"))
def test_sbp_rows_are_well_formed(name, case):
    op = OPS[name]
    specs = tuple(Spec(a.shape, a.dtype) for a in _arrays(case))
    out_specs = op.infer(*specs, **case.attrs)
    out_specs = out_specs if op.multi_output else (out_specs,)
    rows = op.sbp(specs, case.attrs)
    assert rows, f"{name} has no SBP rows for {specs}"
    for row in rows:
        assert isinstance(row, SbpRow)
        assert isinstance(row.reason, str) and row.reason.strip(), f"{name}: row {row!r} gives no reason"
        assert len(row.ins) == len(specs) and len(row.outs) == len(out_specs), f"{name}: row {row!r} has the wrong arity"
        for value, spec in zip(row.ins + row.outs, specs + out_specs):
            assert isinstance(value, (Split, Broadcast, PartialSum, PartialMax))
            if isinstance(value, Split):
                assert 0 <= value.axis < spec.ndim, f"{name}: row {row!r} splits axis {value.axis} of {spec}"
    replicated = [r for r in rows if all(isinstance(v, Broadcast) for v in r.ins + r.outs)]
    assert replicated, f"{name}: no all-broadcast row (every op can run replicated)"
    signatures = [(r.ins, r.outs) for r in rows]
    assert len(signatures) == len(set(signatures)), f"{name}: repeated rows {rows}"


MESHES = {"2": [0, 1], "3": [0, 1, 2], "2x2": [[0, 1], [2, 3]]}


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("name,case", _cases("sweep"))
def test_every_signature_holds_shard_by_shard(name, case, mesh):
    """Lay the inputs out as each signature says (rows read across the mesh axes) on simulated
    ranks, run the kernel on every rank's shards and gather: the result must be the op's
    single-device result, and every non-partial output shard exactly the layout's shard."""
    op = OPS[name]
    placement = fs.placement("cpu", MESHES[mesh])
    arrays = _arrays(case, np.float64)
    specs = tuple(Spec(a.shape, a.dtype) for a in arrays)
    full = op.kernel(np, *arrays, **case.attrs)
    full = tuple(full) if op.multi_output else (full,)
    out_specs = op.infer(*specs, **case.attrs)
    out_specs = tuple(out_specs) if op.multi_output else (out_specs,)
    sigs = signatures(op, specs, case.attrs, placement)
    assert any(all(isinstance(v, Broadcast) for nd in s.ins for v in nd) for s in sigs), f"{name}: no replicated signature"
    rng = np.random.default_rng(1)
    for sig in sigs:
        values = [laid_out(a, nd, placement, rng) for a, nd in zip(arrays, sig.ins)]
        outs = run_signature(op, values, case.attrs, sig, out_specs)
        for i, (want, got) in enumerate(zip(full, outs)):
            want = np.asarray(want)
            msg = f"{name} on mesh {mesh}: signature {sig!r}, output {i}"
            np.testing.assert_allclose(got.logical(), want, rtol=1e-9, atol=1e-9, err_msg=msg)
            if not any(isinstance(v, (PartialSum, PartialMax)) for v in got.sbp):
                for shard, expect in zip(got.shards, make_global(want, placement, got.sbp).shards):
                    np.testing.assert_allclose(shard, expect, rtol=1e-9, atol=1e-9, err_msg=msg + " (a shard)")


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("name,case", [p for p in _cases("sweep-grad") if OPS[p.values[0]].grad is not None
                                       and p.values[1].grad])
def test_gradients_through_global_tensors(name, case, mesh):
    """Autograd through global inputs laid out as each signature's inputs gives the
    single-device gradients (the gradients' own layouts are whatever the rules produce)."""
    op = OPS[name]
    placement = fs.placement("cpu", MESHES[mesh])
    arrays = _arrays(case, np.float64)
    specs = tuple(Spec(a.shape, a.dtype) for a in arrays)
    rng = np.random.default_rng(2)

    def loss_of(tensors):
        out = apply(name, *tensors, **case.attrs)
        outs = out if op.multi_output else (out,)
        total = None
        for j, o in enumerate(outs):
            w = fs.tensor(np.random.default_rng(10 + j).standard_normal(o.shape))
            term = (o * w).sum()
            total = term if total is None else total + term
        return total

    local = [fs.tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
    loss_of(local).backward()
    layouts = {sig.ins for sig in signatures(op, specs, case.attrs, placement)}
    for ins in sorted(layouts, key=repr):
        leaves = [Tensor(laid_out(a, nd, placement, rng), requires_grad=a.dtype.kind == "f")
                  for a, nd in zip(arrays, ins)]
        loss = loss_of(leaves)
        np.testing.assert_allclose(loss.numpy(), loss_of(local).numpy(), rtol=1e-9, atol=1e-9)
        loss.backward()
        for i, (lt, gt) in enumerate(zip(local, leaves)):
            if lt.grad is not None:
                assert gt.grad.sbp == gt.sbp, "a leaf gradient takes its tensor's layout"
                np.testing.assert_allclose(gt.grad.numpy(), lt.grad.numpy(), rtol=1e-8, atol=1e-9,
                                           err_msg=f"{name} on mesh {mesh}, inputs {ins}: gradient {i}")


def test_every_gradient_rule_has_a_gradient_case():
    assert GRAD_OPS, "no op registers a gradient rule"
    without = [name for name in GRAD_OPS if not any(c.grad for c in CASES.get(name, []))
               and name not in ZERO_GRADIENT + SYMMETRIC_GRADIENT]
    assert not without, f"ops with a gradient rule but no gradient case in CASES: {without}"


@pytest.mark.parametrize("name", ZERO_GRADIENT)
def test_zero_gradients(name):
    """floor, round, sign, ...: a zero gradient of each input's shape (as PyTorch gives), not a
    cut tape."""
    arrays = _arrays(CASES[name][0], np.float64)
    xs = [fs.tensor(a, requires_grad=True) for a in arrays]
    apply(name, *xs).sum().backward()
    for x, a in zip(xs, arrays):
        assert x.grad is not None and x.grad.shape == a.shape
        np.testing.assert_array_equal(x.grad.numpy(), 0.0)


@pytest.mark.parametrize("name", GRAD_OPS)
def test_gradient_rule_matches_finite_differences(name):
    for case in (c for c in CASES[name] if c.grad):
        def run(*xs, case=case):
            out = apply(name, *xs, **case.attrs)
            for o in out if OPS[name].multi_output else (out,):
                # when recording, the output's node is this op's, so backward runs this op's rule
                assert not fs.is_grad_enabled() or (o._node is not None and o._node.op.name == name)
            return out

        check_grad_fd(run, case.inputs)

"""flowsys as an Array API (2024.12) namespace: values against NumPy and type promotion against
``array_api_strict`` (property-based, every standard dtype), plus what the standard's own suite
(benchmarks/array_api_conformance.py) does not see: global tensors, graphs, gradients, errors.
"""

from __future__ import annotations

import os

import array_api_compat
import array_api_strict as xps
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import flowsys as fs
import flowsys.array_api as A
from flowsys.sbp import broadcast, split
from helpers import check_grad_fd

# FLOWSYS_HYPOTHESIS_EXAMPLES=400 for a longer search than CI's
PROPERTY = settings(max_examples=int(os.environ.get("FLOWSYS_HYPOTHESIS_EXAMPLES", 25)), deadline=None)
xps.set_array_api_strict_flags(api_version="2024.12")

DTYPES = {k: fs.__array_namespace_info__().dtypes()[k] for k in fs.__array_namespace_info__().dtypes()}
KIND = {"b": "bool", "i": "int", "u": "uint", "f": "float", "c": "complex"}


def _arrays(dtype, shape):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        elements = st.floats(-100, 100, width=dtype.itemsize * 8, allow_subnormal=False)
    elif dtype.kind == "c":
        elements = st.complex_numbers(max_magnitude=100, width=dtype.itemsize * 8, allow_subnormal=False)
    else:
        elements = None
    return hnp.arrays(dtype, shape, elements=elements)


def _standard(dtype) -> np.dtype:
    """The NumPy dtype of an array_api_strict dtype (printed ``array_api_strict.int8``)."""
    return np.dtype(str(dtype).rsplit(".", 1)[-1])


def _check(got: fs.Tensor, want: np.ndarray, what: str):
    assert isinstance(got, fs.Tensor), what
    assert got.shape == want.shape, f"{what}: shape {got.shape}, NumPy {want.shape}"
    g = got.numpy()
    if want.dtype.kind in "fc":
        np.testing.assert_allclose(g, want, rtol=1e-5 if g.dtype.itemsize <= 8 else 1e-12, atol=1e-6, equal_nan=True,
                                   err_msg=what)
    else:
        np.testing.assert_array_equal(g, want, err_msg=what)


# -------------------------------------------------------------------------- the namespace itself


def test_the_namespace_is_flowsys():
    t = fs.asarray([1.0, 2.0])
    assert t.__array_namespace__() is fs and fs.__array_api_version__ == "2024.12"
    assert array_api_compat.array_namespace(t) is fs
    assert array_api_compat.is_array_api_obj(t)
    with pytest.raises(ValueError, match="2024.12"):
        t.__array_namespace__(api_version="1999.01")


def test_the_package_lists_every_name_array_api_defines():
    assert sorted(A.__all__) == sorted(fs._ARRAY_API)
    assert all(hasattr(fs, n) for n in fs._ARRAY_API)
    # both extensions, whole (flowsys adds no partial extension)
    assert sorted(fs.linalg.__all__) == sorted(n for n in dir(fs.linalg) if n in fs.linalg.__all__)
    assert len(fs.linalg.__all__) == 23 and len(fs.fft.__all__) == 14


def test_inspection_and_dtype_kinds():
    info = fs.__array_namespace_info__()
    assert info.default_dtypes() == {"real floating": fs.float32, "complex floating": fs.complex64,
                                     "integral": fs.int64, "indexing": fs.int64}
    assert info.default_device() == "cpu" and "cpu" in info.devices()
    assert set(info.dtypes(kind="complex floating")) == {"complex64", "complex128"}
    assert fs.isdtype(fs.bfloat16, "real floating") and fs.isdtype(fs.float16, ("integral", "real floating"))
    assert not fs.isdtype(fs.complex64, "real floating") and fs.isdtype(fs.uint8, "unsigned integer")
    assert fs.finfo(fs.bfloat16).bits == 16 and fs.finfo(fs.complex128).dtype == fs.float64
    assert fs.iinfo(fs.int8).min == -128 and isinstance(fs.finfo(fs.float32).eps, float)
    assert fs.asarray([1.5]).dtype == fs.float32 and fs.asarray([1j]).dtype == fs.complex64
    assert fs.asarray([1]).dtype == fs.int64 and fs.asarray(True).dtype == fs.bool


# --------------------------------------------------------------- property-based against NumPy

BINARY = {  # the standard's name -> NumPy's, and the kinds it takes
    "add": ("add", "iuf"), "subtract": ("subtract", "iuf"), "multiply": ("multiply", "iufc"),
    "maximum": ("maximum", "iuf"), "minimum": ("minimum", "iufb"), "equal": ("equal", "biufc"),
    "less": ("less", "iuf"), "bitwise_and": ("bitwise_and", "biu"), "bitwise_xor": ("bitwise_xor", "biu"),
    "logical_or": ("logical_or", "b"), "atan2": ("arctan2", "f"), "hypot": ("hypot", "f"),
    "logaddexp": ("logaddexp", "f"), "copysign": ("copysign", "f"), "nextafter": ("nextafter", "f"),
    "remainder": ("remainder", "f"),
}


def _same_kind_dtypes(kinds):
    names = [n for n, d in DTYPES.items() if d.kind in kinds]
    return st.sampled_from(names).flatmap(
        lambda a: st.tuples(st.just(a), st.sampled_from([n for n in names if DTYPES[n].kind == DTYPES[a].kind])))


@PROPERTY
@given(data=st.data())
def test_binary_functions_broadcast_and_promote_as_the_standard(data):
    name = data.draw(st.sampled_from(sorted(BINARY)), label="function")
    np_name, kinds = BINARY[name]
    d1, d2 = data.draw(_same_kind_dtypes(kinds), label="dtypes")
    s1, s2 = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=4), label="shapes").input_shapes
    a, b = data.draw(_arrays(DTYPES[d1], s1), label="x1"), data.draw(_arrays(DTYPES[d2], s2), label="x2")
    out = getattr(fs, name)(fs.asarray(a), fs.asarray(b))
    # the standard's promotion table (minimum on bools is flowsys' extension: NumPy takes them)
    want_dtype = np.dtype(bool) if name in ("equal", "less", "logical_or") else \
        _standard(xps.result_type(getattr(xps, d1), getattr(xps, d2)))
    assert out.dtype == want_dtype, f"{name}({d1}, {d2}): {out.dtype}, the standard {want_dtype}"
    with np.errstate(all="ignore"):
        want = getattr(np, np_name)(a, b)
    _check(out, np.asarray(want).astype(out.dtype), f"{name}({d1}{list(s1)}, {d2}{list(s2)})")


UNARY = {"abs": "absolute", "negative": "negative", "square": "square", "sign": "sign", "round": "round",
         "floor": "floor", "sin": "sin", "exp": "exp", "expm1": "expm1", "log1p": "log1p", "sqrt": "sqrt",
         "isnan": "isnan", "isfinite": "isfinite", "signbit": "signbit", "bitwise_invert": "invert",
         "logical_not": "logical_not", "real": "real", "imag": "imag", "conj": "conjugate", "trunc": "trunc"}


@PROPERTY
@given(data=st.data())
def test_unary_functions_on_every_dtype_they_take(data):
    name = data.draw(st.sampled_from(sorted(UNARY)), label="function")
    dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")
    a = data.draw(_arrays(DTYPES[dtype], hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)), label="x")
    try:
        strict = getattr(xps, name)(xps.asarray(a))
    except TypeError:  # the standard does not define it for this dtype: flowsys says so clearly
        with pytest.raises(fs.DTypeError, match=name):
            getattr(fs, name)(fs.asarray(a))
        return
    out = getattr(fs, name)(fs.asarray(a))
    assert out.dtype == _standard(strict.dtype), f"{name}({dtype}): {out.dtype}, the standard {strict.dtype}"
    with np.errstate(all="ignore"):
        want = np.asarray(getattr(np, UNARY[name])(a))
    _check(out, want.astype(out.dtype), f"{name}({dtype}{list(a.shape)})")


REDUCTIONS = ["sum", "prod", "max", "min", "mean", "var", "std", "any", "all", "count_nonzero"]


@PROPERTY
@given(data=st.data())
def test_reductions_over_any_axes(data):
    name = data.draw(st.sampled_from(REDUCTIONS), label="function")
    kinds = "f" if name in ("mean", "var", "std") else "iuf" if name in ("sum", "prod", "max", "min") else "biuf"
    dtype = data.draw(st.sampled_from([n for n, d in DTYPES.items() if d.kind in kinds]), label="dtype")
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4), label="shape")
    a = data.draw(_arrays(DTYPES[dtype], shape), label="x")
    axis = data.draw(st.none() | st.integers(-len(shape), len(shape) - 1) |
                     st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True).map(tuple), label="axis")
    keepdims = data.draw(st.booleans(), label="keepdims")
    out = getattr(fs, name)(fs.asarray(a), axis=axis, keepdims=keepdims)
    strict = getattr(xps, name)(xps.asarray(a), axis=axis, keepdims=keepdims)
    assert out.dtype == _standard(strict.dtype), f"{name}({dtype}): {out.dtype}, the standard {strict.dtype}"
    _check(out, np.from_dlpack(strict), f"{name}({dtype}{list(shape)}, axis={axis}, keepdims={keepdims})")


@PROPERTY
@given(data=st.data())
def test_indexing_reads_and_writes_as_numpy(data):
    dtype = data.draw(st.sampled_from(sorted(DTYPES)), label="dtype")
    a = data.draw(_arrays(DTYPES[dtype], hnp.array_shapes(min_dims=1, max_dims=3, max_side=5)), label="x")
    index = data.draw(hnp.basic_indices(a.shape, allow_newaxis=True), label="index")
    t = fs.asarray(a.copy())
    _check(t[index], a[index], f"x[{index!r}]")
    value = data.draw(_arrays(DTYPES[dtype], a[index].shape), label="value")
    t[index] = fs.asarray(value)
    expect = a.copy()
    expect[index] = value
    _check(t, expect, f"x[{index!r}] = value")
    mask = data.draw(hnp.arrays(np.bool_, a.shape), label="mask")
    _check(t[fs.asarray(mask)], expect[mask], "x[mask]")


@PROPERTY
@given(data=st.data())
def test_manipulation_and_sorting_as_numpy(data):
    a = data.draw(_arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=4)), label="x")
    axis = data.draw(st.integers(-a.ndim, a.ndim - 1), label="axis")
    t = fs.asarray(a)
    _check(fs.flip(t, axis=axis), np.flip(a, axis), "flip")
    _check(fs.roll(t, 2, axis=axis), np.roll(a, 2, axis), "roll")
    _check(fs.sort(t, axis=axis), np.sort(a, axis), "sort")
    _check(fs.sort(t, axis=axis, descending=True), -np.sort(-a, axis), "sort descending")
    _check(fs.argsort(t, axis=axis), np.argsort(a, axis, kind="stable"), "argsort")
    _check(fs.cumulative_sum(t, axis=axis), np.cumsum(a, axis), "cumulative_sum")
    _check(fs.moveaxis(t, axis, 0), np.moveaxis(a, axis, 0), "moveaxis")
    _check(fs.repeat(t, 2, axis=axis), np.repeat(a, 2, axis), "repeat")
    _check(fs.tile(t, (2,) * a.ndim), np.tile(a, (2,) * a.ndim), "tile")
    _check(fs.diff(t, axis=axis), np.diff(a, axis=axis), "diff")
    _check(fs.concat([t, t], axis=axis), np.concatenate([a, a], axis), "concat")
    _check(fs.stack([t, t], axis=axis), np.stack([a, a], axis), "stack")


# --------------------------------------------------------------------- beyond the standard's suite


def test_operators_on_integers_and_bools():
    i, j = fs.asarray([6, -3, 5], dtype=fs.int32), fs.asarray([3, 2, 4], dtype=fs.int32)
    assert (i & j).tolist() == [2, 0, 4] and (i | j).tolist() == [7, -1, 5] and (i ^ j).tolist() == [5, -1, 1]
    assert (~i).tolist() == [-7, 2, -6] and (i << 1).tolist() == [12, -6, 10] and (i >> 1).tolist() == [3, -2, 2]
    assert (i // j).tolist() == [2, -2, 1] and (i % j).tolist() == [0, 1, 1] and abs(i).tolist() == [6, 3, 5]
    b = fs.asarray([True, False, True])
    assert (~b).tolist() == [False, True, False] and (b & fs.asarray([True, True, False])).tolist() == [True, False, False]
    assert fs.minimum(b, fs.asarray([False, True, True])).tolist() == [False, False, True]
    assert fs.maximum(b, False).dtype == fs.bool
    x = fs.asarray([[1.0, 2.0], [3.0, 4.0]])
    assert x.mT.tolist() == [[1.0, 3.0], [2.0, 4.0]] and (+x).tolist() == x.tolist()
    assert complex(fs.asarray(1 + 2j)) == 1 + 2j and (x * 1j).dtype == fs.complex64


def test_errors_name_the_op_the_shape_and_the_axis():
    zero_d = fs.tensor(3.0)
    for f in (fs.mean, fs.var, fs.max, fs.min, fs.argmax, fs.sum):
        with pytest.raises(fs.AxisError, match=r"axis 0 .*0 dimensions"):
            f(zero_d, axis=0)
    with pytest.raises(IndexError, match="expand_dims"):
        fs.expand_dims(fs.ones((2, 3)), axis=5)
    with pytest.raises(fs.ShapeError, match=r"squeeze: axis 1 of shape \(2, 3\)"):
        fs.squeeze(fs.ones((2, 3)), axis=1)
    with pytest.raises(fs.DTypeError, match="bitwise_and: takes tensors of a integer or boolean dtype, got float32"):
        fs.ones(2) & fs.ones(2)
    with pytest.raises(fs.DTypeError, match=r"sin: .*floating-point dtype, got int64\[3\]"):
        fs.sin(fs.arange(3))
    with pytest.raises(IndexError, match="getitem"):
        fs.ones((2, 3))[fs.asarray([True, False, True])]


def test_setitem_outside_autograd_and_on_global_tensors():
    x = fs.zeros((2, 3))
    x[0, 1:] = 5.0
    x[fs.asarray([False, True])] = fs.asarray([1.0, 2.0, 3.0])
    assert x.tolist() == [[0.0, 5.0, 5.0], [1.0, 2.0, 3.0]]
    w = fs.zeros(3, requires_grad=True)
    with pytest.raises(fs.GradError, match="__setitem__"):
        w[0] = 1.0
    g = fs.zeros((4, 2)).to_global(fs.placement("cpu", [0, 1]), split(0))
    g[1:3, 0] = 7.0
    assert g.sbp == (split(0),) and g.numpy()[:, 0].tolist() == [0.0, 7.0, 7.0, 0.0]
    assert g.to_local(0).numpy()[1, 0] == 7.0 and g.to_local(1).numpy()[0, 0] == 7.0


def test_dlpack_shares_memory_with_numpy_and_torch():
    x = fs.arange(6, dtype=fs.float32)
    n = np.from_dlpack(x)
    assert n.ctypes.data == fs.array_api.asarray(x).numpy().ctypes.data
    t = torch.from_dlpack(x)
    x[0] = 9.0
    assert t[0].item() == 9.0 and n[0] == 9.0
    back = fs.from_dlpack(torch.arange(3))
    assert back.dtype == fs.int64 and back.tolist() == [0, 1, 2]
    assert x.__dlpack_device__() == (1, 0) and x.to_device("cpu") is x


MESH = fs.placement("cpu", [0, 1])

GLOBAL_CASES = {
    "sort": lambda x: fs.sort(x, axis=1),
    "cumulative_sum": lambda x: fs.cumulative_sum(x, axis=1),
    "flip": lambda x: fs.flip(x, axis=1),
    "roll": lambda x: fs.roll(x, 1, axis=1),
    "tril": lambda x: fs.tril(x),
    "tile": lambda x: fs.tile(x, (1, 2)),
    "clip": lambda x: fs.clip(x, -0.5, 0.5),
    "sin+logaddexp": lambda x: fs.logaddexp(fs.sin(x), fs.atan(x)),
    "std": lambda x: fs.std(x, axis=0, correction=1),
    "take_along_axis": lambda x: fs.take_along_axis(x, fs.argsort(x, axis=1), axis=1),
    "tensordot": lambda x: fs.tensordot(x, x, axes=([0], [0])),
    "vecdot": lambda x: fs.vecdot(x, x, axis=1),
    "repeat": lambda x: fs.repeat(x, 2, axis=1),
    "vector_norm": lambda x: fs.linalg.vector_norm(x, axis=1, ord=3),
    "inv+det of Gram matrices": lambda x: fs.linalg.inv(_gram(x)) * fs.linalg.det(_gram(x))[..., None, None],
    "cholesky+svdvals": lambda x: fs.linalg.cholesky(_gram(x)) + fs.linalg.svdvals(x.reshape((2, 2, 6)))[..., None],
    "solve": lambda x: fs.linalg.solve(_gram(x), x.reshape((2, 2, 6))),
}


def _gram(x):
    """Symmetric positive-definite 2x2 matrices, a batch of two, from ``x`` (4, 6)."""
    m = x.reshape((2, 2, 6))
    return fs.matmul(m, fs.matrix_transpose(m)) + fs.eye(2, dtype=x.dtype)


@pytest.mark.parametrize("layout", [broadcast, split(0), split(1)], ids=["B", "S0", "S1"])
@pytest.mark.parametrize("name", sorted(GLOBAL_CASES))
def test_functions_on_global_tensors_and_their_gradients(name, layout):
    """Each function on a global input laid out as ``layout`` gives the local value and the
    local gradient."""
    a = np.random.default_rng(0).standard_normal((4, 6))
    f = GLOBAL_CASES[name]
    x = fs.tensor(a, requires_grad=True)
    want = f(x)
    (want * want).sum().backward()
    g = fs.tensor(a).to_global(MESH, layout).detach()
    g.requires_grad_(True)
    got = f(g)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)
    (got * got).sum().backward()
    np.testing.assert_allclose(g.grad.numpy(), x.grad.numpy(), rtol=1e-9, atol=1e-12)


class _Step(fs.Graph):
    def __init__(self, model, body):
        super().__init__()
        self.model, self.body = model, body
        self.add_optimizer(fs.optim.SGD(model.parameters(), lr=0.1))

    def build(self, x):
        loss = self.body(self.model(x)).sum()
        loss.backward()
        return loss


def _graph_body(y):
    s = fs.sort(fs.sin(y), axis=1, descending=True)
    c = fs.cumulative_sum(fs.clip(s, -0.8, None), axis=1)
    return fs.square(fs.flip(c, axis=1)) + fs.hypot(y, fs.tril(fs.ones((4, 4))))


def test_functions_inside_a_graph_train_as_eager():
    rng = np.random.default_rng(1)
    fs.manual_seed(0)
    eager = fs.nn.Linear(3, 4)
    fs.manual_seed(0)
    graphed = fs.nn.Linear(3, 4)
    x = fs.tensor(rng.standard_normal((4, 3)), dtype=fs.float32)
    opt = fs.optim.SGD(eager.parameters(), lr=0.1)
    step = _Step(graphed, _graph_body)
    for _ in range(2):
        loss = _graph_body(eager(x)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        np.testing.assert_allclose(step(x).numpy(), loss.numpy(), rtol=1e-5)
    np.testing.assert_allclose(graphed.weight.numpy(), eager.weight.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [fs.unique_values, fs.nonzero, lambda y: fs.unique_counts(y).counts,
                                lambda y: fs.repeat(y, fs.astype(y[0] > 0, fs.int64), axis=1), lambda y: y[y > 0]],
                         ids=["unique_values", "nonzero", "unique_counts", "repeat-by-traced-counts", "boolean-mask"])
def test_value_dependent_shapes_are_a_graph_error(fn):
    model = fs.nn.Linear(3, 4)
    step = _Step(model, lambda y: fs.sum(fn(y)[0] if isinstance(fn(y), tuple) else fn(y)) * y)
    with pytest.raises(fs.GraphError, match="depends on the (tensor's|mask's) values"):
        step(fs.randn(4, 3))


def test_value_dependent_functions_run_eagerly_on_global_tensors():
    a = np.array([3.0, 1.0, 3.0, np.nan, 1.0, 2.0])
    g = fs.tensor(a).to_global(MESH, split(0))
    r = fs.unique_all(g)
    np.testing.assert_array_equal(r.values.numpy(), np.unique_all(a).values)
    assert r.values.placement == MESH and r.values.sbp == (broadcast,)
    assert r.inverse_indices.shape == a.shape and r.counts.dtype == fs.int64
    assert [i.tolist() for i in fs.nonzero(fs.asarray([[0, 2], [3, 0]]))] == [[0, 1], [1, 0]]


@pytest.mark.parametrize("name", ["cholesky", "eigvalsh"])
def test_symmetric_matrix_gradients_match_finite_differences(name):
    """cholesky and eigvalsh read one triangle of their (symmetric) input, so their gradient is
    checked through a symmetric positive-definite function of the input."""
    fn = getattr(fs.linalg, name)
    check_grad_fd(lambda a: fn(fs.matmul(a, fs.matrix_transpose(a)) + fs.eye(3, dtype=a.dtype)), [(3, 3)])
    check_grad_fd(lambda a: fn(fs.matmul(a, fs.matrix_transpose(a)) + fs.eye(3, dtype=a.dtype)), [(2, 3, 3)])


def test_linalg_functions_against_numpy():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 4, 4))
    t = fs.asarray(a)
    _check(fs.linalg.inv(t), np.linalg.inv(a), "inv")
    _check(fs.linalg.slogdet(t).logabsdet, np.linalg.slogdet(a).logabsdet, "slogdet")
    _check(fs.linalg.matrix_power(t, 3), np.linalg.matrix_power(a, 3), "matrix_power")
    _check(fs.linalg.matrix_power(t, -2), np.linalg.matrix_power(a, -2), "matrix_power(-2)")
    _check(fs.linalg.pinv(t[0, :, :3]), np.linalg.pinv(a[0, :, :3]), "pinv")
    _check(fs.linalg.matrix_rank(t), np.linalg.matrix_rank(a), "matrix_rank")
    _check(fs.linalg.trace(t, offset=1), np.trace(a, offset=1, axis1=-2, axis2=-1), "trace")
    _check(fs.linalg.diagonal(t, offset=-1), np.diagonal(a, offset=-1, axis1=-2, axis2=-1), "diagonal")
    for order in ("fro", "nuc", 1, -1, 2, -2, np.inf, -np.inf):
        _check(fs.linalg.matrix_norm(t, ord=order), np.linalg.norm(a, ord=order, axis=(-2, -1)), f"matrix_norm {order}")
    for order in (1, 2, 3, 0, np.inf, -np.inf):
        _check(fs.linalg.vector_norm(t, axis=-1, ord=order), np.linalg.norm(a, ord=order, axis=-1), f"vector_norm {order}")
    _check(fs.linalg.cross(t[..., :3], t[..., 1:]), np.cross(a[..., :3], a[..., 1:]), "cross")
    _check(fs.linalg.outer(t[0, 0], t[0, 1]), np.outer(a[0, 0], a[0, 1]), "outer")


def test_fft_functions_against_numpy_and_on_a_split_batch():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((4, 6)) + 1j * rng.standard_normal((4, 6))
    r = a.real.copy()
    t = fs.asarray(a)
    for name in ("fft", "ifft", "hfft"):
        _check(getattr(fs.fft, name)(t, n=5, axis=0, norm="ortho"), getattr(np.fft, name)(a, n=5, axis=0, norm="ortho"),
               name)
    for name in ("rfft", "ihfft"):
        _check(getattr(fs.fft, name)(fs.asarray(r)), getattr(np.fft, name)(r), name)
    _check(fs.fft.irfft(t, n=8), np.fft.irfft(a, n=8), "irfft")
    for name in ("fftn", "ifftn", "irfftn"):
        _check(getattr(fs.fft, name)(t, s=(3, 4)), getattr(np.fft, name)(a, s=(3, 4)), name)
    _check(fs.fft.rfftn(fs.asarray(r), axes=(1,)), np.fft.rfftn(r, axes=(1,)), "rfftn")
    _check(fs.fft.fftfreq(5, d=0.5), np.fft.fftfreq(5, d=0.5), "fftfreq")
    _check(fs.fft.fftshift(t, axes=(1,)), np.fft.fftshift(a, axes=(1,)), "fftshift")
    assert fs.fft.fft(fs.asarray(r, dtype=fs.float32)).dtype == fs.complex64
    g = fs.asarray(a).to_global(MESH, split(0))
    out = fs.fft.fft(g, axis=1)
    assert out.sbp == (split(0),), "the batch axis stays split: each rank transforms its rows"
    np.testing.assert_allclose(out.numpy(), np.fft.fft(a, axis=1), rtol=1e-12, atol=1e-12)


class _PlanStep(fs.Graph):
    """A data-parallel step lowered to per-rank plans (attributes through the plan format)."""

    def __init__(self, model, body):
        super().__init__()
        self.model, self.body = model, body
        self.add_optimizer(fs.optim.SGD(model.parameters(), lr=0.1))
        self.config.executor = "plans"

    def build(self, x):
        loss = self.body(self.model(x)).sum()
        loss.backward()
        return loss


def _plan_body(y):
    m = y.reshape((y.shape[0], 2, 2))
    d = fs.linalg.diagonal(m) + fs.linalg.trace(fs.linalg.inv(fs.matmul(m, fs.matrix_transpose(m)) + fs.eye(2)))[..., None]
    return fs.cumulative_sum(fs.sort(d, axis=-1, descending=True), axis=-1) + fs.linalg.vector_norm(y, axis=-1)[..., None]


def test_a_split_batch_step_on_per_rank_plans_matches_eager():
    rng = np.random.default_rng(5)
    fs.manual_seed(0)
    eager = fs.nn.Linear(3, 4)
    fs.manual_seed(0)
    planned = fs.nn.Linear(3, 4).to_global(MESH, broadcast)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    loss = _plan_body(eager(fs.tensor(x))).sum()
    loss.backward()
    got = _PlanStep(planned, _plan_body)(fs.tensor(x).to_global(MESH, split(0)))
    np.testing.assert_allclose(got.numpy(), loss.numpy(), rtol=1e-5)
    np.testing.assert_allclose(planned.weight.numpy(), eager.weight.numpy() - 0.1 * eager.weight.grad.numpy(),
                               rtol=1e-5, atol=1e-6)

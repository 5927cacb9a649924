"""The tape: which tensors record, how gradients flow, accumulate and reduce, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowsys as fs
from helpers import check_op

A = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], np.float32)


def test_requires_grad_propagates_through_float_ops_only():
    x = fs.tensor(A, requires_grad=True)
    c = fs.tensor(A)
    assert x.requires_grad and x.is_leaf and not c.requires_grad
    y = x * c + 1.0
    assert y.requires_grad and not y.is_leaf
    assert not (c * 2.0).requires_grad
    assert not (x > 0).requires_grad  # bool outputs carry no gradient
    assert not x.argmax(axis=1).requires_grad
    assert fs.tensor([1.0]).requires_grad_().requires_grad


def test_requires_grad_false_on_a_non_leaf_is_an_error():
    y = fs.tensor(A, requires_grad=True) * 2.0
    with pytest.raises(fs.GradError, match="detach"):
        y.requires_grad_(False)


@pytest.mark.parametrize("make", [lambda: fs.tensor([1, 2], requires_grad=True),
                                  lambda: fs.arange(3).requires_grad_(),
                                  lambda: fs.tensor([True, False], requires_grad=True),
                                  lambda: fs.zeros(2, dtype=fs.int32, requires_grad=True)],
                         ids=["int64 tensor()", "arange().requires_grad_()", "bool", "int32 zeros"])
def test_integer_and_bool_tensors_cannot_require_grad(make):
    with pytest.raises(fs.GradError, match="floating-point"):
        make()


def test_no_grad_context_records_nothing_and_restores():
    x = fs.tensor(A, requires_grad=True)
    with fs.no_grad():
        assert not fs.is_grad_enabled()
        y = x * 2.0
        with fs.enable_grad():
            z = x * 3.0
    assert fs.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    assert z.requires_grad
    np.testing.assert_array_equal(y.numpy(), A * 2)
    with pytest.raises(fs.GradError, match="does not require grad"):
        y.sum().backward()
    (x * 4.0).sum().backward()  # recording is back on after the block
    np.testing.assert_array_equal(x.grad.numpy(), np.full_like(A, 4.0))


def test_no_grad_decorator_and_exceptions_restore_the_mode():
    @fs.no_grad()
    def double(t):
        assert not fs.is_grad_enabled()
        return t * 2.0

    @fs.no_grad()
    def boom():
        raise KeyError("x")

    x = fs.tensor(A, requires_grad=True)
    assert not double(x).requires_grad
    assert double.__name__ == "double"
    with pytest.raises(KeyError):
        boom()
    assert fs.is_grad_enabled()
    assert (x * 2.0).requires_grad
    fs.set_grad_enabled(False)
    try:
        assert not (x * 2.0).requires_grad
    finally:
        fs.set_grad_enabled(True)


def test_detach_cuts_the_tape_and_shares_the_value():
    x = fs.tensor(A, requires_grad=True)
    d = x.detach()
    assert not d.requires_grad and d.is_leaf
    np.testing.assert_array_equal(d.numpy(), A)
    assert not x.data.requires_grad
    (d * x).sum().backward()  # only the x path counts: d(x_const * x)/dx = x
    np.testing.assert_array_equal(x.grad.numpy(), A)


def test_gradients_accumulate_across_backward_calls():
    x = fs.tensor(A, requires_grad=True)
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * A)
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * A + 3)
    loss = (x * x * x).sum()
    x.grad = None
    loss.backward()
    loss.backward()  # the tape is kept: a second pass over the same graph adds again
    np.testing.assert_allclose(x.grad.numpy(), 2 * 3 * A * A, rtol=1e-6)
    x.grad.zero_()
    assert not x.grad.numpy().any()


def test_a_tensor_used_twice_sums_both_paths():
    def f(x, w):
        y = x * w
        return (y + y * y + x.exp()).sum(0) + x.sum(0)

    check_op(f, [(2, 3), (3,)], None, f)


def test_leaves_sharing_one_upstream_gradient_array_get_their_own_grads():
    a = fs.tensor(A, requires_grad=True)
    b = fs.tensor(A, requires_grad=True)
    c = fs.tensor([[1.0, 2.0, 3.0]])
    (((a + a) + b) * c).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), np.broadcast_to(2 * c.numpy(), A.shape))
    np.testing.assert_array_equal(b.grad.numpy(), np.broadcast_to(c.numpy(), A.shape))


def test_backward_does_not_modify_the_gradient_argument():
    x = fs.tensor(A, requires_grad=True)
    w = fs.tensor(np.ones_like(A))
    (x + 1.0).backward(gradient=w)
    (x + 1.0).backward(gradient=w)
    np.testing.assert_array_equal(w.numpy(), np.ones_like(A))
    np.testing.assert_array_equal(x.grad.numpy(), np.full_like(A, 2.0))


def test_broadcasting_gradients_reduce_to_each_input_shape():
    def f(x, y, b, s):
        return x * y + b - s

    outs = check_op(f, [(3, 1), (1, 4), (4,), ()], None, f)
    assert outs[0].shape == (3, 4)
    x, y, b, s = (fs.tensor(np.ones(shape, np.float32), requires_grad=True) for shape in [(3, 1), (1, 4), (4,), ()])
    f(x, y, b, s).sum().backward()
    assert [t.grad.shape for t in (x, y, b, s)] == [(3, 1), (1, 4), (4,), ()]
    np.testing.assert_array_equal(b.grad.numpy(), np.full(4, 3.0))
    assert s.grad.item() == -12.0


def test_backward_with_gradient_for_non_scalars():
    x = fs.tensor(A, requires_grad=True)
    y = x * x
    w = np.array([[1.0, 0.0, -2.0], [0.5, 3.0, 1.0]], np.float32)
    y.backward(gradient=fs.tensor(w))
    np.testing.assert_allclose(x.grad.numpy(), 2 * A * w)
    x.grad = None
    y.backward(gradient=w)  # an array works as well
    np.testing.assert_allclose(x.grad.numpy(), 2 * A * w)
    leaf = fs.tensor(A, requires_grad=True)
    leaf.backward(gradient=fs.tensor(w))
    np.testing.assert_array_equal(leaf.grad.numpy(), w)


def test_backward_errors():
    x = fs.tensor(A, requires_grad=True)
    with pytest.raises(fs.GradError, match="not a single element"):
        (x * 2.0).backward()
    with pytest.raises(fs.GradError, match="gradient has shape"):
        (x * 2.0).backward(gradient=fs.ones(3))
    with pytest.raises(fs.GradError, match="does not require grad"):
        fs.tensor(A).sum().backward()


def test_gradients_skip_inputs_that_do_not_require_grad():
    x = fs.tensor(A, requires_grad=True)
    c = fs.tensor(A)
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_array_equal(x.grad.numpy(), A)


def test_gradient_dtype_matches_the_leaf():
    x32 = fs.tensor(A, requires_grad=True)
    x64 = fs.tensor(A.astype(np.float64), requires_grad=True)
    (x32.astype(fs.float64) * x64).sum().backward()
    assert x32.grad.dtype == fs.float32 and x64.grad.dtype == fs.float64
    np.testing.assert_allclose(x32.grad.numpy(), A)


def test_split_with_only_some_outputs_used():
    a = np.arange(12, dtype=np.float32).reshape(6, 2)
    x = fs.tensor(a, requires_grad=True)
    first, middle, last = fs.split(x, 3)
    (middle * 2.0).sum().backward()
    want = np.zeros_like(a)
    want[2:4] = 2.0
    np.testing.assert_array_equal(x.grad.numpy(), want)

    t = torch.tensor(a, requires_grad=True)
    tp = torch.tensor_split(t, [1, 4])
    (tp[0] * tp[0]).sum().add(tp[2].sum() * 3).backward()
    x.grad = None
    p = fs.split(x, [1, 4])
    ((p[0] * p[0]).sum() + p[2].sum() * 3.0).backward()
    np.testing.assert_array_equal(x.grad.numpy(), t.grad.numpy())


def test_split_pieces_used_together_in_one_expression():
    def f(x):
        a, b = fs.split(x, 2, axis=1) if isinstance(x, fs.Tensor) else torch.tensor_split(x, 2, dim=1)
        return a * b + a

    check_op(f, [(3, 4)], None, f)

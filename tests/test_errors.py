"""Bad input raises a FlowsysError subclass whose message names the op, the shapes and the fix."""

from __future__ import annotations

import numpy as np
import pytest

import flowsys as fs
import flowsys.nn.functional as F
from flowsys import nn
from flowsys.models import GPT, GPTConfig


def raises(cls, fn, *fragments):
    """Call ``fn``; it must raise ``cls`` (a FlowsysError) whose message contains every fragment."""
    with pytest.raises(cls) as info:
        fn()
    err = info.value
    assert isinstance(err, fs.FlowsysError), type(err)
    msg = str(err)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return err


# ----------------------------------------------------------------------------------- shapes


def test_matmul_shape_mismatch():
    a, b = fs.ones(2, 3), fs.ones(4, 5)
    err = raises(fs.ShapeError, lambda: a @ b, "matmul", "(2, 3)", "(4, 5)")
    assert isinstance(err, ValueError)  # catchable as NumPy's error type
    raises(fs.ShapeError, lambda: fs.matmul(a, b), "matmul", "(2, 3)", "(4, 5)")


def test_matmul_batch_axes_that_do_not_broadcast():
    raises(fs.ShapeError, lambda: fs.ones(2, 3, 4) @ fs.ones(5, 4, 6), "matmul", "(2, 3, 4)", "(5, 4, 6)")


def test_linear_with_wrong_in_features_names_both_shapes():
    raises(fs.ShapeError, lambda: nn.Linear(3, 2)(fs.ones(4, 5)), "linear", "(4, 5)", "(2, 3)")
    raises(fs.ShapeError, lambda: nn.Linear(3, 2, bias=False)(fs.ones(4, 5)), "linear", "(4, 5)", "(2, 3)")


@pytest.mark.parametrize("op,fn", [
    ("add", lambda a, b: a + b),
    ("mul", lambda a, b: a * b),
    ("sub", lambda a, b: a - b),
    ("div", lambda a, b: a / b),
], ids=["add", "mul", "sub", "div"])
def test_broadcast_mismatch_in_arithmetic(op, fn):
    raises(fs.ShapeError, lambda: fn(fs.ones(2, 3), fs.ones(4, 5)), op, "(2, 3)", "(4, 5)", "broadcast")


def test_broadcast_mismatch_keeps_operands_untouched():
    a = fs.ones(2, 3, requires_grad=True)
    with pytest.raises(fs.ShapeError):
        a * fs.ones(3, 2)
    assert a.grad is None and a.shape == (2, 3)


def test_broadcast_mismatch_in_where():
    cond = fs.ones(2, 3) > 0
    raises(fs.ShapeError, lambda: fs.where(cond, fs.ones(2, 3), fs.ones(4)), "where", "(2, 3)", "(4,)")
    raises(fs.ShapeError, lambda: fs.where(fs.ones(5) > 0, fs.ones(2, 3), 0.0), "where", "(5,)", "(2, 3)")


def test_reshape_to_an_incompatible_size():
    x = fs.ones(2, 3)
    raises(fs.ShapeError, lambda: x.reshape(4, 2), "reshape", "(2, 3)", "(4, 2)")
    raises(fs.ShapeError, lambda: fs.reshape(x, (5,)), "reshape", "(2, 3)", "(5,)")
    raises(fs.ShapeError, lambda: x.reshape(-1, 4), "reshape", "(2, 3)")


def test_reductions_and_transposes_name_the_axis():
    raises(fs.ShapeError, lambda: fs.ones(4, 3).sum(axis=2), "sum", "axis 2")
    raises(fs.ShapeError, lambda: F.softmax(fs.ones(4, 3), axis=-3), "softmax")
    raises(fs.ShapeError, lambda: fs.ones(4, 3).transpose(0, 0), "transpose", "(4, 3)")


def test_concatenate_and_split_shape_errors():
    raises(fs.ShapeError, lambda: fs.concatenate([fs.ones(4, 3), fs.ones(4, 2)], axis=0), "concatenate", "(4, 3)", "(4, 2)")
    raises(fs.ShapeError, lambda: fs.split(fs.ones(4, 3), 3, axis=0), "split", "(4, 3)")


# ------------------------------------------------------------------------------------ dtypes


def test_take_with_float_indices():
    raises(fs.DTypeError, lambda: fs.take(fs.ones(4, 3), fs.tensor([0.0, 1.0])), "take", "float32")
    raises(fs.DTypeError, lambda: nn.Embedding(4, 3)(fs.tensor([0.0, 1.0])), "take")


def test_take_with_an_index_out_of_range():
    raises(fs.FlowsysError, lambda: fs.take(fs.ones(4, 3), fs.tensor([0, 7])), "take", "7", "(4, 3)")


def test_requires_grad_on_an_int_tensor():
    raises(fs.GradError, lambda: fs.tensor([1, 2], requires_grad=True), "int64")
    raises(fs.GradError, lambda: fs.arange(3).requires_grad_(), "int64")
    raises(fs.GradError, lambda: fs.zeros(3, dtype=fs.int32, requires_grad=True), "int32")


def test_float_only_ops_reject_ints():
    raises(fs.DTypeError, lambda: fs.exp(fs.arange(3)), "exp", "int64")
    raises(fs.DTypeError, lambda: fs.where(fs.ones(3), fs.ones(3), fs.ones(3)), "where", "bool")


# ----------------------------------------------------------------------------- cross entropy


def test_cross_entropy_with_float_targets():
    err = raises(fs.DTypeError, lambda: F.cross_entropy(fs.randn(3, 4), fs.tensor([0.0, 1.0, 2.0])),
                 "cross_entropy", "float32")
    assert isinstance(err, TypeError)


@pytest.mark.parametrize("bad", [4, -2])
def test_cross_entropy_with_a_target_out_of_range(bad):
    raises(fs.FlowsysError, lambda: F.cross_entropy(fs.randn(3, 4), fs.tensor([0, bad, 1])),
           "cross_entropy", str(bad), "4 classes")


def test_cross_entropy_ignore_index_is_not_out_of_range():
    loss = F.cross_entropy(fs.randn(3, 4), fs.tensor([0, -1, 1]), ignore_index=-1)
    assert np.isfinite(loss.item())


def test_cross_entropy_out_of_range_is_a_specific_subclass():
    with pytest.raises(fs.FlowsysError) as info:
        F.cross_entropy(fs.randn(3, 4), fs.tensor([0, 9, 1]))
    assert type(info.value) is not fs.FlowsysError and isinstance(info.value, (ValueError, IndexError))


def test_cross_entropy_shape_mismatch():
    raises(fs.ShapeError, lambda: F.cross_entropy(fs.ones(2, 3), fs.tensor([0, 1, 2])), "cross_entropy", "(2, 3)", "(3,)")


# ---------------------------------------------------------------------------------- autograd


def test_backward_on_a_non_scalar_without_gradient():
    y = fs.ones(2, 3, requires_grad=True) * 2
    err = raises(fs.GradError, lambda: y.backward(), "backward", "(2, 3)")
    assert isinstance(err, RuntimeError)


def test_backward_with_a_gradient_of_the_wrong_shape():
    y = fs.ones(2, 3, requires_grad=True) * 2
    raises(fs.GradError, lambda: y.backward(fs.ones(3, 2)), "backward", "(3, 2)", "(2, 3)")


def test_backward_on_a_tensor_that_does_not_require_grad():
    raises(fs.GradError, lambda: (fs.ones(2, 3) * 2).sum().backward(), "backward", "requires_grad")
    x = fs.ones(3, requires_grad=True)
    with fs.no_grad():
        y = (x * 2).sum()
    raises(fs.GradError, lambda: y.backward(), "does not require grad")
    assert x.grad is None


# -------------------------------------------------------------------------------- state dict


def test_load_state_dict_reports_every_problem_at_once_and_changes_nothing():
    fs.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    bad = {k: np.zeros(v.shape, np.float32) for k, v in before.items()}
    del bad["1.bias"]                                   # missing
    bad["3.weight"] = np.zeros((2, 4), np.float32)      # unexpected
    bad["0.weight"] = np.zeros((4, 5), np.float32)      # wrongly shaped
    err = raises(fs.StateDictError, lambda: model.load_state_dict(bad),
                 "1.bias", "3.weight", "0.weight", "(4, 5)", "(4, 3)", "missing", "unexpected")
    assert isinstance(err, RuntimeError)
    for k, v in model.state_dict().items():  # nothing was copied, not even the good keys
        np.testing.assert_array_equal(v.numpy(), before[k], err_msg=k)


def test_wrong_shape_raises_even_when_not_strict():
    model = nn.Linear(3, 4)
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    sd = {"weight": np.zeros((4, 5), np.float32), "bias": np.full(4, 7.0, np.float32)}
    raises(fs.StateDictError, lambda: model.load_state_dict(sd, strict=False), "weight", "(4, 5)", "(4, 3)")
    np.testing.assert_array_equal(model.weight.numpy(), before["weight"])
    np.testing.assert_array_equal(model.bias.numpy(), before["bias"])  # the good key was not copied either


def test_gpt_state_dict_from_another_config():
    small = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8))
    other = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8))
    raises(fs.StateDictError, lambda: small.load_state_dict(other.state_dict()), "transformer.h.1.ln_1.weight")


# ---------------------------------------------------------------------------------- config


def test_gpt_sequence_longer_than_block_size():
    model = GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4))
    raises(fs.ConfigError, lambda: model(fs.zeros((1, 5), dtype=fs.int64)), "5", "4", "block size")


def test_gpt_config_from_dict_with_an_unknown_key():
    err = raises(fs.ConfigError, lambda: GPTConfig.from_dict({"vocab_size": 10, "n_layers": 2}), "n_layers", "n_layer")
    assert isinstance(err, ValueError)
    assert GPTConfig.from_dict({"vocab_size": 10, "n_layer": 2}).n_layer == 2


@pytest.mark.parametrize("kw,fragment", [
    (dict(n_embd=10, n_head=3), "divisible"),
    (dict(n_layer=0), "n_layer"),
    (dict(dropout=1.0), "dropout"),
])
def test_gpt_config_values_are_checked(kw, fragment):
    raises(fs.ConfigError, lambda: GPTConfig(**kw), "GPTConfig", fragment)


def test_dropout_probability_is_checked():
    err = raises(fs.ConfigError, lambda: nn.Dropout(1.5), "Dropout", "1.5")
    assert isinstance(err, ValueError)


# ------------------------------------- errors of the right FlowsysError subclass


def test_layer_norm_shape_mismatch_is_a_shape_error():
    raises(fs.ShapeError, lambda: nn.LayerNorm(5)(fs.ones(2, 3)), "layer_norm", "(2, 3)", "(5,)")


def test_copy_shape_mismatch_is_a_shape_error():
    raises(fs.ShapeError, lambda: fs.ones(2, 3).copy_(np.ones((3, 2))), "copy_", "(3, 2)", "(2, 3)")


def test_squeeze_of_a_long_axis_is_a_shape_error():
    raises(fs.ShapeError, lambda: fs.ones(2, 3).squeeze(0), "squeeze", "(2, 3)")


def test_functional_dropout_probability_is_a_flowsys_error():
    raises(fs.FlowsysError, lambda: F.dropout(fs.ones(3), 2.0), "dropout", "2.0")


def test_gelu_unknown_approximation_is_a_flowsys_error():
    raises(fs.FlowsysError, lambda: F.gelu(fs.ones(3), "fast"), "gelu", "fast")

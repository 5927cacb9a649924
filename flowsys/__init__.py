"""flowsys: a distributed-first dataflow training system.

The public API is listed here explicitly; everything else is internal.

>>> import flowsys as fs
>>> x = fs.tensor([[1., 2.], [3., 4.]], requires_grad=True)
>>> loss = (x @ x.T).sum()
>>> loss.backward()
>>> x.grad.shape
(2, 2)

Importing ``flowsys`` loads only the light vocabulary (errors, SBP values, placements,
autograd switches); every other name is imported on first use (PEP 562), so a worker that
imports the op registry or the plan format does not load ``nn``, ``optim`` or ``Graph``.
"""

import importlib as _importlib
import sys as _sys
import types as _types

from flowsys import sbp
from flowsys.autograd import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from flowsys.errors import (
    ArgumentError, AxisError, CommunicationError, ConfigError, DTypeError, FlowsysError, GradError, GraphError,
    IndexOutOfRange, PlacementError, RankFailed, SbpError, ShapeError, StateDictError,
)
from flowsys.placement import Placement, placement

__version__ = "0.1.0"

# Import-time settings, before any thread of ours runs BLAS (every ``import flowsys.x`` runs
# this file first, so a worker gets them too).
from flowsys.device import settle_blas_threads as _settle_blas_threads  # noqa: E402
from flowsys.device import tune_malloc as _tune_malloc  # noqa: E402
from flowsys.profiler import _from_environment  # noqa: E402  (imports nothing else of ours)

_settle_blas_threads()
_tune_malloc()  # a step's large arrays keep their memory between steps (glibc)
del _settle_blas_threads, _tune_malloc

_from_environment()  # flowsys launch --profile
del _from_environment

__array_api_version__ = "2024.12"


# The Array API standard's names, each defined by flowsys.array_api (its __all__ is this list;
# tests/test_array_api.py checks they agree): listed here so that importing flowsys stays light.
_ARRAY_API = (
    "__array_namespace_info__", "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float32", "float64", "complex64", "complex128", "e", "inf", "nan", "pi", "newaxis",
    # elementwise
    "abs", "acos", "acosh", "add", "asin", "asinh", "atan", "atan2", "atanh", "bitwise_and", "bitwise_invert",
    "bitwise_left_shift", "bitwise_or", "bitwise_right_shift", "bitwise_xor", "ceil", "clip", "conj", "copysign",
    "cos", "cosh", "divide", "equal", "exp", "expm1", "floor", "floor_divide", "greater", "greater_equal", "hypot",
    "imag", "isfinite", "isinf", "isnan", "less", "less_equal", "log", "log1p", "log2", "log10", "logaddexp",
    "logical_and", "logical_not", "logical_or", "logical_xor", "maximum", "minimum", "multiply", "negative",
    "nextafter", "not_equal", "positive", "pow", "real", "reciprocal", "remainder", "round", "sign", "signbit", "sin",
    "sinh", "square", "sqrt", "subtract", "tan", "tanh", "trunc",
    # statistics, searching, sets, sorting
    "sum", "prod", "mean", "var", "std", "max", "min", "cumulative_sum", "cumulative_prod", "argmax", "argmin",
    "count_nonzero", "any", "all", "where", "searchsorted", "nonzero", "unique_all", "unique_counts",
    "unique_inverse", "unique_values", "argsort", "sort", "diff",
    # manipulation, linear algebra, indexing
    "broadcast_to", "broadcast_shapes", "broadcast_arrays", "concat", "expand_dims", "flip", "moveaxis",
    "permute_dims", "repeat", "reshape", "roll", "squeeze", "stack", "tile", "unstack", "matmul", "matrix_transpose",
    "tensordot", "vecdot", "take", "take_along_axis",
    # data types and creation
    "astype", "can_cast", "result_type", "isdtype", "finfo", "iinfo", "empty", "empty_like", "full_like", "eye",
    "linspace", "meshgrid", "tril", "triu", "from_dlpack",
)


# name -> the module it comes from; a subpackage maps to itself.
_LAZY = {
    **dict.fromkeys(["Tensor", "float16", "bfloat16", "bool_"], "flowsys.tensor"),
    **dict.fromkeys([
        "arange", "asarray", "full", "manual_seed", "ones", "ones_like", "rand", "randint", "randn", "tensor", "zeros",
        "zeros_like", "split", "swapaxes", "transpose", "allclose"], "flowsys.functions"),
    **dict.fromkeys((*_ARRAY_API, "concatenate"), "flowsys.array_api"),
    **{name: f"flowsys.{name}" for name in ("nn", "optim", "models", "data", "checkpoint", "linalg", "fft")},
    "Graph": "flowsys.graph.api", "GraphConfig": "flowsys.graph.api",
    "init": "flowsys.runtime", "shutdown": "flowsys.runtime",
    "profile": "flowsys.profiler", "Profile": "flowsys.profiler",
    "autocast": "flowsys.precision", "LossScaler": "flowsys.precision",
}


def __getattr__(name: str):
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'flowsys' has no attribute {name!r}")
    module = _importlib.import_module(where)
    value = module if where == f"flowsys.{name}" else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(_types.ModuleType):
    """Loading the submodule ``flowsys.tensor`` binds it as the package's attribute ``tensor``,
    which would hide the public function ``fs.tensor``; with eager imports the order of the
    import lines hid this, with lazy ones the function keeps the name."""

    def __setattr__(self, name: str, value) -> None:
        if name == "tensor" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

__all__ = [
    # tensors and dtypes
    "Tensor", "tensor", "asarray", "zeros", "ones", "full", "zeros_like", "ones_like", "arange", "randn", "rand",
    "randint", "manual_seed", "float16", "bfloat16", "bool_",
    # the Array API standard, and NumPy names beyond it
    "__array_api_version__", *_ARRAY_API, "transpose", "swapaxes", "concatenate", "split", "allclose",
    # autograd
    "no_grad", "enable_grad", "is_grad_enabled", "set_grad_enabled",
    # mixed precision
    "autocast", "LossScaler",
    # errors
    "FlowsysError", "ShapeError", "AxisError", "DTypeError", "ArgumentError", "IndexOutOfRange", "GradError", "StateDictError",
    "ConfigError", "PlacementError", "SbpError", "CommunicationError", "RankFailed",
    # global tensors
    "placement", "Placement",
    # graph mode and where it runs
    "Graph", "GraphConfig", "GraphError", "init", "shutdown", "profile", "Profile",
    # subpackages
    "nn", "optim", "models", "data", "sbp", "checkpoint", "linalg", "fft",
]

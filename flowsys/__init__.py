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
    ArgumentError, CommunicationError, ConfigError, DTypeError, FlowsysError, GradError, IndexOutOfRange, PlacementError,
    RankFailed, SbpError, ShapeError, StateDictError,
)
from flowsys.placement import Placement, placement

__version__ = "0.1.0"

# Import-time settings, before any thread of ours runs BLAS (every ``import flowsys.x`` runs
# this file first, so a worker gets them too).
from flowsys.device import settle_blas_threads as _settle_blas_threads  # noqa: E402
from flowsys.profiler import _from_environment  # noqa: E402  (imports nothing else of ours)

_settle_blas_threads()
del _settle_blas_threads

_from_environment()  # flowsys launch --profile
del _from_environment

# name -> the module it comes from; a subpackage maps to itself.
_LAZY = {
    **dict.fromkeys(["Tensor", "float32", "float64", "float16", "bfloat16", "int32", "int64", "bool_"], "flowsys.tensor"),
    **dict.fromkeys([
        "allclose", "arange", "argmax", "asarray", "astype", "broadcast_to", "concatenate", "exp", "expand_dims", "full",
        "log", "manual_seed", "matmul", "max", "maximum", "mean", "min", "minimum", "ones", "ones_like", "rand",
        "randint", "randn", "reshape", "split", "sqrt", "squeeze", "stack", "sum", "swapaxes", "take", "tanh",
        "tensor", "transpose", "var", "where", "zeros", "zeros_like"], "flowsys.functions"),
    **{name: f"flowsys.{name}" for name in ("nn", "optim", "models", "data", "checkpoint")},
    "Graph": "flowsys.graph.api", "GraphConfig": "flowsys.graph.api", "GraphError": "flowsys.graph.ir",
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
    "randint", "manual_seed", "float32", "float64", "float16", "bfloat16", "int32", "int64", "bool_",
    # array API
    "matmul", "exp", "log", "sqrt", "tanh", "maximum", "minimum", "where", "sum", "mean", "var", "max", "min",
    "argmax", "reshape", "transpose", "swapaxes", "expand_dims", "squeeze", "broadcast_to", "concatenate",
    "stack", "split", "take", "astype", "allclose",
    # autograd
    "no_grad", "enable_grad", "is_grad_enabled", "set_grad_enabled",
    # mixed precision
    "autocast", "LossScaler",
    # errors
    "FlowsysError", "ShapeError", "DTypeError", "ArgumentError", "IndexOutOfRange", "GradError", "StateDictError",
    "ConfigError", "PlacementError", "SbpError", "CommunicationError", "RankFailed",
    # global tensors
    "placement", "Placement",
    # graph mode and where it runs
    "Graph", "GraphConfig", "GraphError", "init", "shutdown", "profile", "Profile",
    # subpackages
    "nn", "optim", "models", "data", "sbp", "checkpoint",
]

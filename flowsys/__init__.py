"""flowsys: a distributed-first dataflow training system.

The public API is listed here explicitly; everything else is internal.

>>> import flowsys as fs
>>> x = fs.tensor([[1., 2.], [3., 4.]], requires_grad=True)
>>> loss = (x @ x.T).sum()
>>> loss.backward()
>>> x.grad.shape
(2, 2)
"""

from flowsys import ops as _ops  # noqa: F401  (registers every op)
from flowsys import sbp
from flowsys.placement import Placement, placement
from flowsys.autograd import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from flowsys.errors import (
    ArgumentError, CommunicationError, ConfigError, DTypeError, FlowsysError, GradError, IndexOutOfRange, PlacementError,
    RankFailed, SbpError, ShapeError, StateDictError,
)
from flowsys.functions import (
    allclose, arange, argmax, asarray, astype, broadcast_to, concatenate, exp, expand_dims, full, log,
    manual_seed, matmul, max, maximum, mean, min, minimum, ones, ones_like, rand, randint, randn, reshape,
    split, sqrt, squeeze, stack, sum, swapaxes, take, tanh, tensor, transpose, var, where, zeros, zeros_like,
)
from flowsys.tensor import Tensor, bool_, float32, float64, int32, int64

from flowsys import nn, optim, models, data, checkpoint  # noqa: E402  (they build on the names above)
from flowsys.graph.api import Graph, GraphConfig  # noqa: E402
from flowsys.graph.ir import GraphError  # noqa: E402
from flowsys.runtime import init, shutdown  # noqa: E402
from flowsys.profiler import Profile, profile  # noqa: E402

__version__ = "0.1.0"

from flowsys.device import settle_blas_threads as _settle_blas_threads  # noqa: E402
from flowsys.profiler import _from_environment  # noqa: E402

_settle_blas_threads()  # before any thread of ours runs BLAS
del _settle_blas_threads

_from_environment()  # flowsys launch --profile
del _from_environment

__all__ = [
    # tensors and dtypes
    "Tensor", "tensor", "asarray", "zeros", "ones", "full", "zeros_like", "ones_like", "arange", "randn", "rand",
    "randint", "manual_seed", "float32", "float64", "int32", "int64", "bool_",
    # array API
    "matmul", "exp", "log", "sqrt", "tanh", "maximum", "minimum", "where", "sum", "mean", "var", "max", "min",
    "argmax", "reshape", "transpose", "swapaxes", "expand_dims", "squeeze", "broadcast_to", "concatenate",
    "stack", "split", "take", "astype", "allclose",
    # autograd
    "no_grad", "enable_grad", "is_grad_enabled", "set_grad_enabled",
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

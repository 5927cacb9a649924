"""The errors flowsys raises. Each message names the op, the shapes (and SBPs) and the fix.

Every class also derives from the matching builtin, so ``except ValueError`` keeps working for
users who expect NumPy's or PyTorch's exception types.
"""

from __future__ import annotations


class FlowsysError(Exception):
    """Base class of every error flowsys raises on purpose."""


class ShapeError(FlowsysError, ValueError):
    """Operand shapes that do not fit the op (matmul inner sizes, broadcasting, axes)."""


class AxisError(ShapeError, IndexError):
    """An axis, or an index, outside the shape it addresses. Both a ``ValueError`` and an
    ``IndexError``, as NumPy's ``AxisError`` (the Array API standard asks for ``IndexError``)."""


class DTypeError(FlowsysError, TypeError):
    """An operand of a dtype the op does not take (e.g. float class targets)."""


class ArgumentError(FlowsysError, ValueError):
    """An argument value the op does not take (dropout p outside [0, 1], an unknown mode)."""


class IndexOutOfRange(FlowsysError, IndexError):
    """An index (gather index, class target) outside the axis it indexes."""


class GradError(FlowsysError, RuntimeError):
    """Autograd misuse: backward() on a non-scalar without a gradient, on a tensor without grad."""


class GraphError(FlowsysError, RuntimeError):
    """A graph that cannot be built or compiled: untraceable code, a bad build() result, a pass bug."""


class StateDictError(FlowsysError, RuntimeError):
    """A state dict that does not match the module: missing, unexpected or wrongly shaped keys."""


class ConfigError(FlowsysError, ValueError):
    """A configuration that cannot run (unknown keys, sequence longer than block_size, ...)."""


class PlacementError(FlowsysError, ValueError):
    """A placement that cannot be: bad ranks, a rank outside it, tensors on different placements."""


class SbpError(FlowsysError, ValueError):
    """An SBP that does not fit the tensor or mesh: a split axis out of range, a wrong tuple length."""


class CommunicationError(FlowsysError, RuntimeError):
    """A transfer or collective that failed: a dead or missing peer (named by rank), a timeout."""


class RankFailed(FlowsysError, RuntimeError):
    """A rank of a distributed step failed: ``rank`` is the root cause (the rank that raised,
    died, or never joined a collective, not the peers that stopped waiting for it), ``op`` what
    it was running."""

    def __init__(self, rank: int, error: BaseException | str, op: str = ""):
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        op = "" if op == "idle" else op
        super().__init__(f"rank {rank} failed" + (f" while running {op}" if op else "") + f": {text}")
        self.rank, self.error, self.op = rank, error, op


__all__ = ["FlowsysError", "ShapeError", "DTypeError", "ArgumentError", "IndexOutOfRange", "GradError", "StateDictError", "ConfigError", "RankFailed",
           "PlacementError", "SbpError", "CommunicationError"]

"""What an op costs: its registered rule asked on shapes and dtypes, and the FLOPs of a graph.

Each op's cost rule sits beside its kernel, gradient and SBP rows (``register(..., cost=...)``);
this module answers for any op by name, on plain shapes or ``(shape, dtype)`` pairs, for the
cost model and the MFU count. Shared vocabulary: it imports the registry and nothing else.

>>> op_flops("matmul", [(8, 16), (16, 32)], [(8, 32)])
8192
>>> c = op_cost("matmul", [((8, 16), "bfloat16"), ((16, 32), "bfloat16")], [((8, 32), "bfloat16")])
>>> c.bytes, c.gemm
(1792, True)
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from flowsys.ops.registry import Cost, Spec, copy_cost, float32, get_op


def _spec(x) -> Spec:
    """A :class:`Spec` from a Spec (or any value with a shape and a dtype), a ``(shape, dtype)``
    pair or a shape (float32)."""
    if isinstance(x, Spec):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return Spec(tuple(int(d) for d in x.shape), np.dtype(x.dtype))
    if len(x) == 2 and isinstance(x[0], (tuple, list)):
        return Spec(tuple(int(d) for d in x[0]), np.dtype(x[1]))
    return Spec(tuple(int(d) for d in x), float32)


def op_cost(name: str, ins: Iterable[Any], outs: Iterable[Any], attrs: dict | None = None) -> Cost:
    """FLOPs, bytes read plus written, and whether it is a GEMM, of one application of op
    ``name`` to inputs ``ins`` giving ``outs``: each a shape (float32) or a ``(shape, dtype)``
    pair, logical or one rank's shard. An op registered without a rule reads its inputs and
    writes its outputs once, with no FLOPs.

    >>> op_cost("gelu", [(4, 8)], [(4, 8)])
    Cost(flops=320, bytes=256, gemm=False)
    """
    op = get_op(name)
    return (op.cost or copy_cost)([_spec(x) for x in ins], [_spec(x) for x in outs], dict(attrs or {}))


def op_flops(name: str, ins: list[tuple[int, ...]], outs: list[tuple[int, ...]], attrs: dict | None = None) -> int:
    """Floating-point operations of one op on these shapes (multiply and add count as two).
    Matrix products and attention count exactly; other ops count a few per element.

    >>> op_flops("add", [(8, 8), (8,)], [(8, 8)])
    64
    """
    return op_cost(name, ins, outs, attrs).flops


def graph_flops(ir) -> int:
    """Model FLOPs of one step of a compiled graph: every op node on logical shapes, once per
    micro-batch (the optimizer's once). Independent of the layout: the work the model asks for,
    not the work a layout repeats."""
    total = 0
    for n in ir.nodes:
        if n.kind != "op":
            continue
        f = op_flops(n.op, [ir.values[i].shape for i in n.inputs], [ir.values[o].shape for o in n.outputs], n.attr)
        total += f * (1 if n.phase == "optimizer" else ir.micro_batches)
    return total

"""The eager tape's record: one :class:`Node` per op application autograd records (a value
kind's ``record``, ``flowsys.value``), which ``flowsys.tensor.run_backward`` walks."""

from __future__ import annotations


class Node:
    """One op application on the eager tape: what backward needs to run the op's gradient rule."""

    __slots__ = ("op", "inputs", "attrs", "out_data")

    def __init__(self, op, inputs: tuple, attrs: dict, out_data: tuple):
        self.op, self.inputs, self.attrs, self.out_data = op, inputs, attrs, out_data

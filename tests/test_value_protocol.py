"""The value protocol (``flowsys.value``): ``tensor.py`` asks its value's kind instead of testing
types, imports nothing of the tracer, and the three kinds (eager array, global value, traced
symbol) behave alike where they should."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import flowsys as fs

ROOT = Path(__file__).resolve().parents[1]
TENSOR = ROOT / "flowsys" / "tensor.py"


def _reads_data(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "_data"


def test_tensor_py_asks_the_kind_instead_of_testing_types():
    tree = ast.parse(TENSOR.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot, ast.In, ast.NotIn)) for op in node.ops):
            for side in [node.left, *node.comparators]:
                if isinstance(side, ast.Call) and getattr(side.func, "id", None) == "type" and side.args \
                        and _reads_data(side.args[0]):
                    found.append(f"line {node.lineno}: type(...._data) comparison")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and node.args \
                and _reads_data(node.args[0]):
            found.append(f"line {node.lineno}: isinstance(...._data, ...)")
        if isinstance(node, ast.Name) and node.id in ("GlobalValue", "Symbol"):
            found.append(f"line {node.lineno}: names {node.id}")
    assert not found, found


def test_tensor_py_does_not_import_the_tracer():
    for node in ast.walk(ast.parse(TENSOR.read_text())):  # function bodies included
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        assert not any(n.startswith("flowsys.graph") for n in names), f"line {node.lineno} imports {names}"


def test_importing_tensor_loads_no_tracer():
    code = "import flowsys.tensor, sys; assert 'flowsys.graph.trace' not in sys.modules, 'trace loaded'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr


A = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5) / 4
PLACEMENT = fs.placement("cpu", [0, 1])


def _ops(x):
    """A few ops, written once for every kind of value."""
    return (x * x + 1.0).sum(axis=1) @ fs.ones(4), fs.tanh(x) - x.T.T / 2, x.to_global(PLACEMENT, fs.sbp.broadcast)


class _Traced(fs.Graph):
    def __init__(self, seen: dict):
        super().__init__()
        self.seen = seen

    def build(self, x):
        outs = _ops(x)
        self.seen.update(x=x, outs=outs, attrs=[(t.device, t.placement, t.sbp, t.is_global) for t in (x, *outs)])
        return outs


def test_eager_global_and_traced_values_compute_the_same():
    eager = _ops(fs.tensor(A))
    x = fs.tensor(A).to_global(PLACEMENT, fs.sbp.split(0))
    glob = _ops(x)
    seen = {}
    traced = _Traced(seen)(fs.tensor(A))
    for e, g, t in zip(eager, glob, traced):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-6)
        np.testing.assert_allclose(t.numpy(), e.numpy(), rtol=1e-6)

    assert (eager[0].device, eager[0].placement, eager[0].sbp, eager[0].is_global) == ("cpu", None, None, False)
    assert (x.device, x.placement, x.sbp, x.is_global) == ("cpu", PLACEMENT, (fs.sbp.split(0),), True)
    assert glob[1].is_global and glob[1].sbp == (fs.sbp.split(0),)
    assert eager[2].sbp == (fs.sbp.broadcast,) and "placement=" in repr(eager[2])
    # traced: a local input is local, a layout change global (its SBP is the compiler's to choose)
    assert seen["attrs"][0] == ("cpu", None, None, False)
    assert seen["attrs"][3] == ("cpu", PLACEMENT, None, True)
    assert repr(seen["x"]).startswith("tensor(<traced value ")


def test_an_op_runs_as_its_highest_kind_and_gradients_come_back_as_each_input_is():
    w = fs.tensor(A, requires_grad=True)
    x = fs.tensor(A).to_global(PLACEMENT, fs.sbp.split(0))
    y = w * x  # eager beside global: a global op
    assert y.is_global and y.sbp == (fs.sbp.split(0),)
    y.sum().backward()
    assert not w.grad.is_global  # a local tensor gets the logical gradient
    np.testing.assert_allclose(w.grad.numpy(), A)

    wg = fs.tensor(A).to_global(PLACEMENT, fs.sbp.broadcast).requires_grad_()
    (wg * x).sum().backward()
    assert wg.grad.sbp == (fs.sbp.broadcast,)  # a global leaf's gradient takes its layout
    np.testing.assert_allclose(wg.grad.numpy(), A)


class _Reads(fs.Graph):
    def __init__(self, read):
        super().__init__()
        self.read = read

    def build(self, x):
        self.read(x * 2)
        return x


@pytest.mark.parametrize("read", [lambda t: t.numpy(), lambda t: t.sum().item(), lambda t: t.copy_(t),
                                  lambda t: fs.ones(4, 3).copy_(t)])
def test_a_traced_value_cannot_be_read(read):
    with pytest.raises(fs.GraphError, match="inside Graph.build"):
        _Reads(read)(fs.tensor(A))

"""The one table of boxing steps (``flowsys.boxing.STEPS``): each step, run rank by rank from the
attributes a plan op carries, gives the destination layout's shards (numpy reference: the
global value laid out directly), and the actor runtime dispatches every op kind it is handed."""

from __future__ import annotations

import numpy as np
import pytest

import flowsys as fs
from actors.runtime import RankRuntime
from comm import CommError, drive
from comm.inprocess import InProcessHub
from flowsys import boxing
from flowsys.errors import ArgumentError
from flowsys.sbp import PartialSum, broadcast, partial_sum, split
from helpers import laid_out

B, P, S = broadcast, partial_sum, split
PAIRS = [(a, b) for a in (S(0), S(1), B, P) for b in (S(0), S(1), B, P) if type(a) is not type(b) or
         (a != b and not isinstance(a, PartialSum))]


@pytest.mark.parametrize("src,dst", PAIRS, ids=lambda v: repr(v))
@pytest.mark.parametrize("n", [2, 3])
def test_each_step_from_plan_attributes_gives_the_destination_shards(src, dst, n):
    a = np.random.default_rng(0).standard_normal((7, 5))  # uneven over 3 ranks
    placement = fs.placement("cpu", list(range(n)))
    (step,) = boxing.plan(a.shape, a.dtype, placement, (src,), placement, (dst,)).steps
    shards = laid_out(a, (src,), placement).shards
    attrs = {"src": repr(src), "dst": repr(dst), "mesh_axis": 0, "parts": n, "group_shape": a.shape}
    outs = [boxing.run_step(step.kind, {**attrs, "index": me}, me, n, x) for me, x in enumerate(shards)]
    if boxing.STEPS[step.kind][0] == "collective":
        outs, _ = drive(outs)
    if isinstance(dst, PartialSum):
        np.testing.assert_allclose(sum(outs), a, atol=1e-12)
        assert all(o.shape == a.shape for o in outs)
    else:
        for got, want in zip(outs, laid_out(a, (dst,), placement).shards):
            np.testing.assert_allclose(got, want, atol=1e-12)


def test_take_shard_and_identity():
    a = np.arange(12.0).reshape(3, 4)
    box = ((1, 3), (0, 2))
    held = boxing.run_step("take_shard", {"box": box, "holds": True}, 0, 1, a)
    np.testing.assert_array_equal(held, a[1:3, 0:2])
    held[...] = -1  # a copy, not a view of the driver's array
    assert a[1, 0] == 4.0
    np.testing.assert_array_equal(boxing.run_step("take_shard", {"box": box, "holds": False}, 0, 1, a),
                                  np.zeros((2, 2)))
    assert boxing.run_step("identity", {}, 0, 1, a) is a


def test_unknown_steps_are_named():
    with pytest.raises(ArgumentError, match="'gather_all'"):
        boxing.run_step("gather_all", {}, 0, 2, np.zeros(2))
    with pytest.raises(CommError, match="unknown collective 'slice'"):
        boxing.plan_collective("slice", {"src": "B", "dst": "S(0)"}, 0, 2, np.zeros(2))


class _DataParallel(fs.Graph):
    def __init__(self):
        super().__init__()
        fs.manual_seed(0)
        self.p = fs.placement("cpu", [0, 1])
        self.lin = fs.nn.Linear(4, 3).to_global(self.p, B)
        self.add_optimizer(fs.optim.SGD(self.lin.parameters(), lr=0.1))
        self.config.executor = "plans"

    def build(self, x):
        loss = (self.lin(x) ** 2).mean()
        loss.backward()
        return loss


def test_the_runtime_has_a_handler_for_every_op_of_a_lowered_plan():
    step = _DataParallel()
    x = fs.asarray(np.ones((8, 4), dtype=np.float32)).to_global(step.p, S(0))
    step(x)
    hub = InProcessHub(2)
    for rp in step.plan().ranks:
        rt = RankRuntime(rp, hub.communicator(rp.rank))
        assert {op.kind for op in rp.ops} >= {"compute", "collective", "update"}
        for op in rp.ops:
            assert callable(rt._handler(op)), (op.kind, op.op)

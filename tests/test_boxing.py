"""The boxing planner: every conversion of the boxing cost table (flowsys/boxing.py) on 1-D and 2-D meshes and between
placements gives the right logical value, and moves exactly the bytes the table says."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import flowsys as fs
from flowsys import boxing
from flowsys.global_tensor import GlobalValue, make_global
from flowsys.layout import local_shape
from helpers import laid_out
from flowsys.sbp import PartialSum, Split, broadcast, partial_sum, split

B, P, S = broadcast, partial_sum, split
VALUES = [S(0), S(1), B, P]


def table_key(src, dst) -> tuple[str, str]:
    """The table's row for a conversion: splits by whether the axis changes."""
    if isinstance(src, Split) and isinstance(dst, Split):
        return ("S(0)", "S(0)") if src == dst else ("S(0)", "S(1)")
    name = lambda v: "S(0)" if isinstance(v, Split) else repr(v)  # noqa: E731
    return name(src), name(dst)


def convert(a, src_placement, src, dst_placement, dst):
    value = laid_out(a, src, src_placement)
    plan = boxing.plan(a.shape, a.dtype, src_placement, src, dst_placement, dst)
    with boxing.trace() as events:
        out = value.with_layout(dst_placement, dst)
    return out, plan, events


def check_layout(out: GlobalValue, a: np.ndarray):
    np.testing.assert_allclose(out.logical(), a, rtol=1e-12, atol=1e-12)
    for rank, shard in zip(out.placement.ranks, out.shards):
        assert shard.shape == local_shape(a.shape, out.sbp, out.placement.mesh, out.placement.coords(rank))
    if not any(isinstance(v, PartialSum) for v in out.sbp):  # every non-partial shard exactly its block
        for shard, want in zip(out.shards, make_global(a, out.placement, out.sbp).shards):
            np.testing.assert_allclose(shard, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- the cost function

TABLE_SAME = {  # (from, to) -> bytes as a function of (T, p), the table's "same devices" column
    ("S(0)", "S(0)"): lambda t, p: 0, ("S(0)", "S(1)"): lambda t, p: (p - 1) / p * t,
    ("S(0)", "B"): lambda t, p: (p - 1) * t, ("S(0)", "P"): lambda t, p: 0,
    ("B", "S(0)"): lambda t, p: 0, ("B", "B"): lambda t, p: 0, ("B", "P"): lambda t, p: 0,
    ("P", "S(0)"): lambda t, p: (p - 1) * t, ("P", "B"): lambda t, p: 2 * (p - 1) * t, ("P", "P"): lambda t, p: 0,
}
TABLE_DISJOINT = {  # (from, to) -> bytes as a function of (T, p1, p2)
    ("S(0)", "S(0)"): lambda t, a, b: t, ("S(0)", "S(1)"): lambda t, a, b: t, ("S(0)", "B"): lambda t, a, b: b * t,
    ("S(0)", "P"): lambda t, a, b: t, ("B", "S(0)"): lambda t, a, b: t, ("B", "B"): lambda t, a, b: b * t,
    ("B", "P"): lambda t, a, b: t, ("P", "S(0)"): lambda t, a, b: a * t, ("P", "B"): lambda t, a, b: (a + b - 1) * t,
    ("P", "P"): lambda t, a, b: a * t,
}


@pytest.mark.parametrize("pair", list(TABLE_SAME))
def test_cost_function_is_the_table(pair):
    src, dst = (fs.sbp.parse(v) for v in pair)
    for p in (2, 3, 4, 8):
        assert boxing.cost(src, dst, 1200.0, p) == pytest.approx(TABLE_SAME[pair](1200.0, p))
        for p2 in (1, 2, 5):
            assert boxing.cost(src, dst, 1200.0, p, p2, same_devices=False) == pytest.approx(
                TABLE_DISJOINT[pair](1200.0, p, p2))


# --------------------------------------------------------------------- same placement, 1-D


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("src,dst", list(itertools.product(VALUES, VALUES)))
def test_1d_conversion_gives_the_value_and_the_table_bytes(src, dst, p):
    placement = fs.placement("cpu", list(range(p)))
    a = np.random.default_rng(1).standard_normal((12, 24))  # divisible by 2, 3 and 4
    out, plan, events = convert(a, placement, (src,), placement, (dst,))
    check_layout(out, a)
    want = TABLE_SAME[table_key(src, dst)](a.nbytes, p)
    assert plan.nbytes == pytest.approx(want), str(plan)
    assert sum(e.nbytes for e in events) == plan.nbytes, "the messages carry exactly what the plan reports"


@pytest.mark.parametrize("src,dst", list(itertools.product(VALUES, VALUES)))
def test_1d_conversion_with_uneven_pieces(src, dst):
    placement = fs.placement("cpu", [0, 1, 2, 3])
    a = np.random.default_rng(2).standard_normal((5, 7))  # 5 and 7 over 4 ranks: uneven, one piece empty-ish
    out, plan, events = convert(a, placement, (src,), placement, (dst,))
    check_layout(out, a)
    assert sum(e.nbytes for e in events) == plan.nbytes


def test_collective_kinds_are_the_tables():
    placement = fs.placement("cpu", [0, 1, 2])
    kinds = {}
    for src, dst in itertools.product(VALUES, VALUES):
        plan = boxing.plan((6, 6), np.dtype(np.float32), placement, (src,), placement, (dst,))
        kinds[(repr(src), repr(dst))] = [s.kind for s in plan.steps]
    assert kinds[("S(0)", "S(1)")] == ["all_to_all"]
    assert kinds[("S(0)", "B")] == ["all_gather"]
    assert kinds[("P", "S(1)")] == ["reduce_scatter"]
    assert kinds[("P", "B")] == ["all_reduce"]
    assert kinds[("B", "S(0)")] == ["slice"]
    assert kinds[("S(0)", "P")] == kinds[("B", "P")] == ["zeros"]
    assert kinds[("S(0)", "S(0)")] == kinds[("B", "B")] == kinds[("P", "P")] == []


# --------------------------------------------------------------------- same placement, 2-D

MESH = [[0, 1], [2, 3]]


@pytest.mark.parametrize("src", list(itertools.product(VALUES, VALUES)), ids=repr)
def test_2d_every_pair_of_layouts(src):
    placement = fs.placement("cpu", MESH)
    a = np.random.default_rng(3).standard_normal((8, 12))
    for dst in itertools.product(VALUES, VALUES):
        out, plan, events = convert(a, placement, src, placement, dst)
        check_layout(out, a)
        assert sum(e.nbytes for e in events) == plan.nbytes, f"{src} -> {dst}: {plan}"


def test_2d_uneven_nested_splits():
    placement = fs.placement("cpu", [[0, 1, 2], [3, 4, 5]])
    a = np.random.default_rng(4).standard_normal((7, 5))
    for src, dst in itertools.product(itertools.product(VALUES, VALUES), repeat=2):
        out, _, _ = convert(a, placement, src, placement, dst)
        check_layout(out, a)


def test_2d_conversion_only_touches_the_mesh_axis_that_changes():
    """(S(0), P) -> (S(0), B): an all-reduce along the second mesh axis only, within each row,
    over the row's half of the tensor: 2 rows x 2(p-1) x T/2 bytes."""
    placement = fs.placement("cpu", MESH)
    a = np.random.default_rng(5).standard_normal((8, 12))
    out, plan, events = convert(a, placement, (S(0), P), placement, (S(0), B))
    check_layout(out, a)
    assert [(s.kind, s.mesh_axis) for s in plan.steps] == [("all_reduce", 1)]
    assert plan.nbytes == 2 * boxing.cost(P, B, a.nbytes / 2, 2) == 2 * a.nbytes
    assert sum(e.nbytes for e in events) == plan.nbytes


def test_2d_bytes_per_mesh_axis_follow_the_table():
    placement = fs.placement("cpu", MESH)
    t = 8 * 12 * 8
    cases = {
        ((B, P), (B, B)): 2 * boxing.cost(P, B, t, 2),  # two groups, each the whole tensor
        ((P, B), (B, B)): 2 * boxing.cost(P, B, t, 2),
        ((S(0), B), (B, B)): 2 * boxing.cost(S(0), B, t, 2),
        ((S(0), S(1)), (S(0), B)): 2 * boxing.cost(S(1), B, t / 2, 2),
        # the outer conversion touches the tensor axis the inner mesh axis splits: the inner
        # axis is gathered first (two rows x T/2), then the outer all-to-all runs on whole rows
        ((S(0), S(1)), (S(1), S(0))): 2 * boxing.cost(S(1), B, t / 2, 2) + 2 * boxing.cost(S(0), S(1), t, 2),
        ((P, P), (B, B)): 2 * boxing.cost(P, B, t, 2) * 2,
        ((B, B), (S(0), S(1))): 0,
    }
    for (src, dst), want in cases.items():
        plan = boxing.plan((8, 12), np.dtype(np.float64), placement, src, placement, dst)
        assert plan.nbytes == pytest.approx(want), f"{src} -> {dst}: {plan}"


def test_nested_split_of_one_axis_is_gathered_inside_out():
    """(S(0), S(0)) nests the column split inside the row's half: changing the outer axis first
    gathers the inner one, so the pieces stay in order."""
    placement = fs.placement("cpu", MESH)
    a = np.arange(8 * 3, dtype=np.float64).reshape(8, 3)
    out, plan, _ = convert(a, placement, (S(0), S(0)), placement, (B, S(0)))
    check_layout(out, a)
    assert [s.kind for s in plan.steps] == ["all_gather", "all_gather", "slice"]


# -------------------------------------------------------------------------- between placements


@pytest.mark.parametrize("p1,p2", [(2, 3), (3, 2), (4, 1), (1, 4)])
@pytest.mark.parametrize("src,dst", list(itertools.product(VALUES, VALUES)))
def test_move_to_disjoint_devices_costs_the_tables_last_column(src, dst, p1, p2):
    sp = fs.placement("cpu", list(range(p1)))
    dp = fs.placement("cpu", list(range(10, 10 + p2)))
    a = np.random.default_rng(6).standard_normal((12, 24))
    out, plan, events = convert(a, sp, (src,), dp, (dst,))
    check_layout(out, a)
    assert plan.nbytes == pytest.approx(TABLE_DISJOINT[table_key(src, dst)](a.nbytes, p1, p2)), str(plan)
    assert plan.nbytes == pytest.approx(boxing.cost(src, dst, a.nbytes, p1, p2, same_devices=False))
    assert [e.nbytes for e in events] == [plan.nbytes]


def test_move_between_meshes_and_overlapping_placements():
    a = np.random.default_rng(7).standard_normal((6, 10))
    pairs = [(fs.placement("cpu", MESH), fs.placement("cpu", [4, 5, 6])),
             (fs.placement("cpu", [0, 1, 2]), fs.placement("cpu", [[2, 3], [4, 5]])),
             (fs.placement("cpu", [0, 1]), fs.placement("cpu", [1, 2]))]
    for sp, dp in pairs:
        for src in itertools.product(VALUES, repeat=sp.ndim):
            for dst in itertools.product(VALUES, repeat=dp.ndim):
                out, plan, events = convert(a, sp, src, dp, dst)
                check_layout(out, a)
                assert [e.nbytes for e in events] == [plan.nbytes]


def test_plans_print_their_steps_and_bytes():
    placement = fs.placement("cpu", [0, 1])
    plan = boxing.plan((4, 4), np.dtype(np.float32), placement, (P,), placement, (B,))
    text = str(plan)
    assert "(P) -> (B)" in text and "all_reduce" in text and "128 bytes" in text

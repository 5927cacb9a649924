"""The hierarchical collectives of :mod:`comm.algorithms` (node ring, then rail ring).

- ``hierarchical_all_reduce`` / ``_all_gather`` / ``_reduce_scatter`` against NumPy and against
  the flat rings, driven by ``comm.run_group``, for 4..16 ranks in nodes of 2, 4, 8, float64 and
  int64, uneven pieces, axis 0 and 1;
- the fallbacks (``node_size`` <= 1, >= n, not dividing n) are the flat rings, message for message;
- the bytes each rank sends inside its node and across nodes: intra 2(L-1)/L · T, inter
  2(N-1)/N · T/L for an all-reduce; every inter-node message travels along the sender's rail;
- the same schedules over ``comm.InProcessHub`` with one thread per rank (only pairwise order);
- ``flowsys.boxing.plan_collective`` picks them when a step's attrs carry ``node_size``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import comm
from comm import algorithms as alg
from flowsys import boxing

LAYOUTS = [(n, L) for n in (4, 6, 8, 16) for L in (2, 4, 8) if n % L == 0 and L < n]  # (ranks, node_size)
DTYPES = [np.float64, np.int64]


def _layout_id(nl) -> str:
    return f"n={nl[0]}-node={nl[1]}"


def _inputs(n: int, shape, dtype, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, n, *shape])
    if np.dtype(dtype).kind == "i":
        return [rng.integers(-50, 50, shape).astype(dtype) for _ in range(n)]
    return [rng.standard_normal(shape).astype(dtype) for _ in range(n)]


def _check(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype.kind == "i":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _traffic(schedules: list, node_size: int) -> tuple[list, list[int], list[int], list[list[tuple[int, int]]]]:
    """Drive ``schedules`` and count, per rank, the bytes sent inside its node and across nodes,
    and the (peer, nbytes) of every message: (results, intra, inter, messages)."""
    n = len(schedules)
    intra, inter = [0] * n, [0] * n
    log: list[list[tuple[int, int]]] = [[] for _ in range(n)]

    def counted(me: int, gen):
        value = None
        try:
            while True:
                step = gen.send(value)
                if isinstance(step, alg.Send):
                    nbytes = np.asarray(step.array).nbytes
                    log[me].append((step.peer, nbytes))
                    if step.peer // node_size == me // node_size:
                        intra[me] += nbytes
                    else:
                        inter[me] += nbytes
                value = yield step
        except StopIteration as stop:
            return stop.value

    results, _ = comm.drive([counted(me, g) for me, g in enumerate(schedules)])
    return results, intra, inter, log


# ---------------------------------------------------------------------------------- all-reduce
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("nl", LAYOUTS, ids=_layout_id)
def test_all_reduce_matches_numpy_and_ring(nl, dtype):
    n, node_size = nl
    for shape in [(n * 3, 2), (n * 2 + 3,), ()]:  # even, uneven (not divisible by n), a scalar
        xs = _inputs(n, shape, dtype)
        outs, _ = comm.run_group(alg.hierarchical_all_reduce, xs, node_size)
        flat, _ = comm.run_group(alg.ring_all_reduce, xs)
        want = np.sum(xs, axis=0, dtype=dtype)
        for got, ring in zip(outs, flat):
            _check(got, want)
            _check(got, ring)


@pytest.mark.parametrize("nl", [(8, 2), (6, 3)], ids=_layout_id)
def test_all_reduce_max_and_fewer_elements_than_ranks(nl):
    n, node_size = nl
    xs = _inputs(n, (5,), np.float64)  # 5 elements over 8 ranks: some pieces are empty
    outs, _ = comm.run_group(alg.hierarchical_all_reduce, xs, node_size, op="max")
    for got in outs:
        np.testing.assert_array_equal(got, np.max(xs, axis=0))
    with pytest.raises(ValueError, match="unknown reduce op 'min'"):
        comm.run_group(alg.hierarchical_all_reduce, xs, node_size, op="min")


def test_all_reduce_inputs_untouched_and_results_distinct():
    xs = _inputs(8, (16,), np.float64)
    before = [x.copy() for x in xs]
    outs, _ = comm.run_group(alg.hierarchical_all_reduce, xs, 4)
    for x, b in zip(xs, before):
        np.testing.assert_array_equal(x, b)
    assert not any(np.shares_memory(a, b) for i, a in enumerate(outs) for b in outs[i + 1:] + xs)


# ------------------------------------------------------------------- all-gather, reduce-scatter
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("nl", LAYOUTS, ids=_layout_id)
def test_all_gather_identical_to_ring(nl, dtype, axis):
    n, node_size = nl
    rng = np.random.default_rng(n)
    lengths = rng.integers(0, 4, n)  # uneven pieces, some empty
    xs = [_inputs(1, (int(k), 3) if axis == 0 else (3, int(k)), dtype, seed=r)[0] for r, k in enumerate(lengths)]
    outs, _ = comm.run_group(alg.hierarchical_all_gather, xs, node_size, axis=axis)
    flat, _ = comm.run_group(alg.ring_all_gather, xs, axis=axis)
    want = np.concatenate(xs, axis=axis)
    for got, ring in zip(outs, flat):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, ring)
        assert got.dtype == want.dtype


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("nl", LAYOUTS, ids=_layout_id)
def test_reduce_scatter_identical_chunks_to_ring(nl, dtype, axis):
    n, node_size = nl
    shape = (2 * n + 3, 2) if axis == 0 else (2, 2 * n + 3)  # uneven: the first 3 pieces are longer
    xs = _inputs(n, shape, dtype)
    outs, _ = comm.run_group(alg.hierarchical_reduce_scatter, xs, node_size, axis=axis)
    flat, _ = comm.run_group(alg.ring_reduce_scatter, xs, axis=axis)
    want = np.array_split(np.sum(xs, axis=0, dtype=dtype), n, axis=axis)
    for got, ring, piece in zip(outs, flat, want):
        _check(got, piece)
        _check(got, ring)


def test_reduce_scatter_max():
    xs = _inputs(8, (11, 3), np.float64)
    outs, _ = comm.run_group(alg.hierarchical_reduce_scatter, xs, 4, axis=0, op="max")
    for got, piece in zip(outs, np.array_split(np.max(xs, axis=0), 8)):
        np.testing.assert_array_equal(got, piece)


# ------------------------------------------------------------------------------- the fallbacks
@pytest.mark.parametrize("n, node_size", [(8, 1), (8, 0), (8, 3), (8, 8), (8, 16), (6, 4), (2, 2)])
def test_fallbacks_are_the_flat_ring(n, node_size):
    xs = _inputs(n, (2 * n + 1, 2), np.float64)
    cases = [
        (alg.hierarchical_all_reduce, alg.ring_all_reduce, {}),
        (alg.hierarchical_all_gather, alg.ring_all_gather, {"axis": 1}),
        (alg.hierarchical_reduce_scatter, alg.ring_reduce_scatter, {"axis": 0}),
    ]
    for hier, ring, kw in cases:
        got, _, _, got_log = _traffic([hier(me, n, x, node_size, **kw) for me, x in enumerate(xs)], 1)
        want, _, _, want_log = _traffic([ring(me, n, x, **kw) for me, x in enumerate(xs)], 1)
        assert got_log == want_log  # the same messages to the same peers
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)  # bit for bit: the same schedule


# ------------------------------------------------------------------------ bytes: node vs rail
@pytest.mark.parametrize("nl", LAYOUTS, ids=_layout_id)
def test_all_reduce_bytes_intra_vs_inter_node(nl):
    n, node_size = nl
    nodes = n // node_size
    T = 8 * n * 4  # float64 elements, divisible by n: the per-rank counts are exact
    xs = _inputs(n, (n * 4,), np.float64)
    _, intra, inter, log = _traffic([alg.hierarchical_all_reduce(me, n, x, node_size) for me, x in enumerate(xs)],
                                    node_size)
    for me in range(n):
        assert intra[me] == 2 * (node_size - 1) * T // node_size
        assert inter[me] == 2 * (nodes - 1) * T // (nodes * node_size)
        assert intra[me] + inter[me] == 2 * (n - 1) * T // n  # the flat ring's total, redistributed
        assert intra[me] >= inter[me]
        for peer, _ in log[me]:  # across nodes only along my rail
            assert peer // node_size == me // node_size or peer % node_size == me % node_size
    _, flat_intra, flat_inter, _ = _traffic([alg.ring_all_reduce(me, n, x) for me, x in enumerate(xs)], node_size)
    assert max(inter) * node_size <= max(flat_inter)  # the flat ring's boundary rank sends L times more


def test_all_reduce_bytes_uneven_within_one_element_per_message():
    n, node_size, size = 16, 4, 101
    xs = _inputs(n, (size,), np.float64)
    _, intra, inter, log = _traffic([alg.hierarchical_all_reduce(me, n, x, node_size) for me, x in enumerate(xs)],
                                    node_size)
    T, nodes = 8 * size, n // node_size
    for me in range(n):
        slack = 8 * len(log[me])
        assert abs(intra[me] - 2 * (node_size - 1) / node_size * T) <= slack
        assert abs(inter[me] - 2 * (nodes - 1) / nodes * T / node_size) <= slack
        assert intra[me] > inter[me]


@pytest.mark.parametrize("name, alg_fn", [("all_gather", alg.hierarchical_all_gather),
                                          ("reduce_scatter", alg.hierarchical_reduce_scatter)])
def test_gather_scatter_bytes_intra_vs_inter_node(name, alg_fn):
    n, node_size = 8, 4
    t = 8 * 3 * 2  # one rank's piece: 3 rows of 2 float64
    xs = _inputs(n, (3, 2) if name == "all_gather" else (3 * n, 2), np.float64)
    _, intra, inter, _ = _traffic([alg_fn(me, n, x, node_size) for me, x in enumerate(xs)], node_size)
    nodes = n // node_size
    assert intra == [(node_size - 1) * nodes * t] * n
    assert inter == [(nodes - 1) * t] * n


# -------------------------------------------------------------------- over threads, real waits
def test_over_inprocess_hub_threads():
    n, node_size = 8, 4
    hub = comm.InProcessHub(n, timeout=10.0)
    xs = _inputs(n, (n * 2 + 5, 3), np.int64)
    outs: list = [None] * n
    errors: list = []

    def rank(me: int) -> None:
        c = hub.communicator(me)
        try:  # all three in a row: the phases and collectives are kept apart by pairwise order only
            gens = [alg.hierarchical_all_reduce(me, n, xs[me], node_size),
                    alg.hierarchical_reduce_scatter(me, n, xs[me], node_size, axis=1),
                    alg.hierarchical_all_gather(me, n, xs[me], node_size, axis=0)]
            res = []
            for gen in gens:
                value = None
                try:
                    while True:
                        step = gen.send(value)
                        value = c.send(step.array, step.peer) if isinstance(step, alg.Send) else c.recv(step.peer)
                except StopIteration as stop:
                    res.append(stop.value)
            outs[me] = res
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(me,)) for me in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    total = np.sum(xs, axis=0)
    for me in range(n):
        np.testing.assert_array_equal(outs[me][0], total)
        np.testing.assert_array_equal(outs[me][1], np.array_split(total, n, axis=1)[me])
        np.testing.assert_array_equal(outs[me][2], np.concatenate(xs, axis=0))


# ---------------------------------------------------------------------------- through boxing
@pytest.mark.parametrize("name, src, dst", [("all_reduce", "P", "B"), ("all_gather", "S(1)", "B"),
                                            ("reduce_scatter", "P", "S(1)")])
def test_boxing_step_with_node_size(name, src, dst):
    n, node_size = 8, 2
    xs = _inputs(n, (4, 2 * n + 3) if name != "all_gather" else (4, 3), np.float64)
    total = np.sum(xs, axis=0)
    want = {"all_reduce": [total] * n, "all_gather": [np.concatenate(xs, axis=1)] * n,
            "reduce_scatter": np.array_split(total, n, axis=1)}[name]
    for attrs, hierarchical in [({"src": src, "dst": dst, "node_size": node_size}, True),
                                ({"src": src, "dst": dst}, False)]:
        scheds = [boxing.plan_collective(name, attrs, me, n, x) for me, x in enumerate(xs)]
        outs, _, inter, log = _traffic(scheds, node_size)
        for got, w in zip(outs, want):
            np.testing.assert_allclose(got, w, rtol=1e-12, atol=1e-12)
        peers = {peer for peer, _ in log[0]}
        # the flat ring: rank 0 sends to rank 1 only; hierarchical: in its node to 1, on its rail (0 2 4 6) to 2
        assert peers == ({1, 2} if hierarchical else {1})
    via_run_step, _ = comm.drive([boxing.run_step(name, {"src": src, "dst": dst, "node_size": 4}, me, n, x)
                                  for me, x in enumerate(xs)])
    for got, w in zip(via_run_step, want):
        np.testing.assert_allclose(got, w, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- from lowering
def _gpt_step(dp: int, tp: int, devices_per_node: int):
    import flowsys as fs
    from flowsys.plan import build, layout
    from flowsys.train import job_from_dict

    job = job_from_dict({"model": dict(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16),
                         "data": {"batch_size": 8}, "parallel": {"dp": dp, "tp": tp}})
    placements = layout(job, dp * tp)
    fs.manual_seed(0)
    _, _, step = build(job, placements)
    step.config.devices_per_node = devices_per_node
    idx = np.random.default_rng(0).integers(0, 64, (8, 8))
    x = fs.tensor(idx).to_global(placements[0], (fs.sbp.split(0), fs.sbp.broadcast))
    return step, x


def test_lowering_marks_collectives_that_span_nodes_and_the_runtime_runs_them():
    """dp4 x tp2 on nodes of 4 ranks (rank = 2 d + t): a data-parallel group (0 2 4 6) has two
    members per node, so its collectives carry node_size 2; a tensor-parallel pair lives in one
    node and stays a flat ring. The runtime runs the hierarchical plan to the flat plan's losses."""
    from flowsys.planformat.attrs import decode_attrs

    losses = {}
    for per_node in (1, 4):
        step, x = _gpt_step(4, 2, per_node)
        losses[per_node] = [step(x, x).item() for _ in range(3)]
        sizes = {}
        for rp in step.plan().ranks:
            for op in rp.ops:
                if op.kind == "collective":
                    sizes.setdefault(len(op.group), set()).add(decode_attrs(op.attrs).get("node_size", 1))
        assert sizes[2] == {1}  # the tp pairs
        assert sizes[4] == ({1} if per_node == 1 else {2})  # the dp groups
    np.testing.assert_allclose(losses[4], losses[1], rtol=1e-6)
    # one member per node, or the whole group in one node: flat
    assert {decode_attrs(op.attrs).get("node_size", 1) for rp in _lowered(4, 2, 2) for op in rp.ops
            if op.kind == "collective" and len(op.group) == 4} == {1}
    assert {decode_attrs(op.attrs).get("node_size", 1) for rp in _lowered(4, 2, 8) for op in rp.ops
            if op.kind == "collective"} == {1}


def _lowered(dp, tp, per_node):
    step, x = _gpt_step(dp, tp, per_node)
    step(x, x)
    return step.plan().ranks

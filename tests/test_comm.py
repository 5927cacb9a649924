"""The collectives of :mod:`comm` against plain NumPy references.

- every algorithm of :mod:`comm.algorithms`, driven in lock step by ``comm.run_group`` for groups
  of 1..5 ranks (uneven splits included), checked for values on every rank and for the bytes it
  moves (the textbook totals of the ring / pairwise / tree schedules);
- messages are copies: no result aliases an input or another rank's result;
- ``comm.drive`` reports a deadlock naming the ranks that wait;
- ``comm.InProcessHub``: one thread per rank, whole-world and sub-group collectives, timeouts
  and bad peers raise ``comm.CommError`` naming the rank.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import comm
from comm import algorithms as alg

SIZES = [1, 2, 3, 4, 5]
SHAPE = (7, 5)  # 7 rows and 5 columns split unevenly over 2..5 ranks (except 5 columns over 5)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([1234, *key])


def _randn(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float64)


def _n_id(n: int) -> str:
    return f"n={n}"


# --------------------------------------------------------------------------------- all-reduce
@pytest.mark.parametrize("shape", [SHAPE, (3,), ()], ids=lambda s: "shape=" + "x".join(map(str, s)) if s else "scalar")
@pytest.mark.parametrize("n", SIZES, ids=_n_id)
def test_all_reduce_float64(n, shape):
    rng = _rng(n, len(shape))
    inputs = [_randn(rng, shape) for _ in range(n)]
    expected = np.sum(inputs, axis=0)
    outs, sent = comm.run_group(alg.ring_all_reduce, inputs)
    assert len(outs) == n
    for out in outs:
        assert out.shape == shape and out.dtype == np.float64
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(out, outs[0])  # every rank holds the same bits
    assert sent == 2 * (n - 1) * inputs[0].nbytes


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", SIZES, ids=_n_id)
def test_all_reduce_integers_exact(n, dtype):
    rng = _rng(n, np.dtype(dtype).itemsize)
    info = np.iinfo(dtype)
    if dtype is np.uint8:  # let the sums wrap around, as NumPy's do
        inputs = [rng.integers(0, 256, SHAPE, dtype=dtype) for _ in range(n)]
    else:  # large values, no overflow
        bound = info.max // 8
        inputs = [rng.integers(-bound, bound, SHAPE, dtype=dtype) for _ in range(n)]
    expected = np.sum(np.stack(inputs), axis=0, dtype=dtype)
    outs, sent = comm.run_group(alg.ring_all_reduce, inputs)
    for out in outs:
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out, expected)
    assert sent == 2 * (n - 1) * inputs[0].nbytes


# --------------------------------------------------------------------------------- all-gather
@pytest.mark.parametrize("axis", [0, 1], ids=lambda a: f"axis={a}")
@pytest.mark.parametrize("n", SIZES, ids=_n_id)
def test_all_gather_uneven(n, axis):
    full = _randn(_rng(n, axis), SHAPE)
    pieces = np.array_split(full, n, axis=axis)
    outs, sent = comm.run_group(alg.ring_all_gather, pieces, axis=axis)
    for out in outs:
        np.testing.assert_array_equal(out, full)
    assert sent == (n - 1) * full.nbytes


def test_all_gather_empty_pieces():
    full = _randn(_rng(99), (3, 2))
    pieces = np.array_split(full, 5, axis=0)  # two ranks hold zero rows
    outs, sent = comm.run_group(alg.ring_all_gather, pieces, axis=0)
    for out in outs:
        np.testing.assert_array_equal(out, full)
    assert sent == 4 * full.nbytes


# ----------------------------------------------------------------------------- reduce-scatter
@pytest.mark.parametrize("axis", [0, 1], ids=lambda a: f"axis={a}")
@pytest.mark.parametrize("n", SIZES, ids=_n_id)
def test_reduce_scatter_uneven(n, axis):
    rng = _rng(n, axis, 7)
    inputs = [_randn(rng, SHAPE) for _ in range(n)]
    expected = np.array_split(np.sum(inputs, axis=0), n, axis=axis)
    outs, sent = comm.run_group(alg.ring_reduce_scatter, inputs, axis=axis)
    for rank, out in enumerate(outs):
        assert out.shape == expected[rank].shape
        np.testing.assert_allclose(out, expected[rank], rtol=1e-12, atol=1e-12)
    assert sent == (n - 1) * inputs[0].nbytes


@pytest.mark.parametrize("n", SIZES, ids=_n_id)
def test_reduce_scatter_integers_exact(n):
    rng = _rng(n, 8)
    inputs = [rng.integers(-1000, 1000, SHAPE, dtype=np.int64) for _ in range(n)]
    expected = np.array_split(np.sum(inputs, axis=0), n, axis=0)
    outs, _ = comm.run_group(alg.ring_reduce_scatter, inputs, axis=0)
    for rank, out in enumerate(outs):
        np.testing.assert_array_equal(out, expected[rank])


# -------------------------------------------------------------------------------- all-to-all
def _all_to_all_reference(inputs, split_axis, concat_axis):
    n = len(inputs)
    blocks = [np.array_split(x, n, axis=split_axis) for x in inputs]  # blocks[src][dst]
    outs = [np.concatenate([blocks[src][dst] for src in range(n)], axis=concat_axis) for dst in range(n)]
    off_diagonal = sum(blocks[src][dst].nbytes for src in range(n) for dst in range(n) if src != dst)
    return outs, off_diagonal


@pytest.mark.parametrize("split_axis,concat_axis",
                         [pytest.param(s, c, id=f"split={s}-concat={c}") for s in (0, 1) for c in (0, 1)])
@pytest.mark.parametrize("n", SIZES, ids=_n_id)
def test_all_to_all_uneven(n, split_axis, concat_axis):
    rng = _rng(n, split_axis, concat_axis)
    inputs = [_randn(rng, SHAPE) for _ in range(n)]
    expected, off_diagonal = _all_to_all_reference(inputs, split_axis, concat_axis)
    outs, sent = comm.run_group(alg.pairwise_all_to_all, inputs,
                                split_axis=split_axis, concat_axis=concat_axis)
    for rank, out in enumerate(outs):
        np.testing.assert_array_equal(out, expected[rank])
    assert sent == off_diagonal


# --------------------------------------------------------------------------------- broadcast
BROADCAST_CASES = [pytest.param(n, root, id=f"n={n}-root={root}") for n in SIZES for root in range(n)]


@pytest.mark.parametrize("n,root", BROADCAST_CASES)
def test_broadcast_every_root(n, root):
    x = _randn(_rng(n, root), SHAPE)
    inputs = [x if rank == root else None for rank in range(n)]
    outs, sent = comm.run_group(alg.tree_broadcast, inputs, root=root)
    for out in outs:
        np.testing.assert_array_equal(out, x)
    assert sent == (n - 1) * x.nbytes


# --------------------------------------------------------------------------- barrier, p2p
@pytest.mark.parametrize("n", SIZES, ids=_n_id)
def test_barrier_sends_no_bytes(n):
    # barrier(me, n) takes no input, so wrap it to fit run_group's algorithm(me, n, input)
    outs, sent = comm.run_group(lambda me, size, _: alg.barrier(me, size), [None] * n)
    assert outs == [None] * n
    assert sent == 0


@pytest.mark.parametrize("n", [4, 5, 6, 8])
def test_barrier_nobody_leaves_before_everybody_arrives(n):
    # rank 3 reaches the barrier only after a message that rank 0 sends once it has left the
    # barrier, on the pair 0 -> 3, which the dissemination barrier does not use (3 is not a
    # power of two): a true barrier must deadlock
    def leaver():
        yield from alg.barrier(0, n)
        yield alg.Send(3, np.ones(1))

    def late():
        yield alg.Recv(0)
        yield from alg.barrier(3, n)

    schedules = [leaver() if me == 0 else late() if me == 3 else alg.barrier(me, n) for me in range(n)]
    with pytest.raises(comm.CommError, match="deadlock"):
        comm.drive(schedules)


def test_point_to_point_send_recv():
    x = _randn(_rng(5), SHAPE)
    outs, sent = comm.drive([alg.send(0, 2, x, 1), alg.recv(1, 2, 0)])
    assert outs[0] is None
    np.testing.assert_array_equal(outs[1], x)
    assert not np.shares_memory(outs[1], x)
    assert sent == x.nbytes


def test_point_to_point_messages_arrive_in_order():
    msgs = [np.full(3, float(i)) for i in range(4)]

    def sender():
        for m in msgs:
            yield alg.Send(1, m)

    def receiver():
        got = []
        for _ in msgs:
            got.append((yield alg.Recv(0)))
        return got

    outs, _ = comm.drive([sender(), receiver()])
    for got, m in zip(outs[1], msgs):
        np.testing.assert_array_equal(got, m)


# -------------------------------------------------------------------------- messages are copies
def _copy_cases(n):
    rng = _rng(n, 42)
    same = [_randn(rng, SHAPE) for _ in range(n)]
    root = n - 1
    return [
        ("all_reduce", alg.ring_all_reduce, same, {}),
        ("all_gather", alg.ring_all_gather, [_randn(rng, (2, 5)) for _ in range(n)], {"axis": 0}),
        ("reduce_scatter", alg.ring_reduce_scatter, same, {"axis": 0}),
        ("all_to_all", alg.pairwise_all_to_all, same, {"split_axis": 0, "concat_axis": 1}),
        ("broadcast", alg.tree_broadcast, [same[0] if r == root else None for r in range(n)], {"root": root}),
    ]


COPY_CASES = [pytest.param(n, i, id=f"{name}-n={n}")
              for n in SIZES for i, (name, *_rest) in enumerate(_copy_cases(n))]


@pytest.mark.parametrize("n,case", COPY_CASES)
def test_results_are_copies(n, case):
    _name, algorithm, inputs, kwargs = _copy_cases(n)[case]
    outs, _ = comm.run_group(algorithm, inputs, **kwargs)
    snapshot = [out.copy() for out in outs]
    arrays = [x for x in inputs if x is not None]
    for i, out in enumerate(outs):
        for x in arrays:
            assert not np.shares_memory(out, x)
        for j in range(i + 1, n):
            assert not np.shares_memory(out, outs[j]), f"ranks {i} and {j} share a result buffer"
    for x in arrays:  # mutating the inputs afterwards leaves every result alone
        x[...] = np.nan
    for out, before in zip(outs, snapshot):
        np.testing.assert_array_equal(out, before)
    outs[0][...] = -1.0  # and so does mutating one rank's result
    for out, before in zip(outs[1:], snapshot[1:]):
        np.testing.assert_array_equal(out, before)


def test_send_copies_at_send_time():
    x = np.arange(4.0)

    def sender():
        yield alg.Send(1, x)
        x[...] = -1.0  # the message already left
        yield alg.Send(1, x)

    def receiver():
        return (yield alg.Recv(0)), (yield alg.Recv(0))

    outs, _ = comm.drive([sender(), receiver()])
    np.testing.assert_array_equal(outs[1][0], np.arange(4.0))
    np.testing.assert_array_equal(outs[1][1], -np.ones(4))


# ---------------------------------------------------------------------------------- deadlock
def test_drive_deadlock_names_both_ranks():
    def recv_first(me, peer):
        got = yield alg.Recv(peer)
        yield alg.Send(peer, np.zeros(1))
        return got

    with pytest.raises(comm.CommError) as info:
        comm.drive([recv_first(0, 1), recv_first(1, 0)])
    message = str(info.value)
    assert "deadlock" in message
    assert "rank 0" in message and "rank 1" in message


def test_drive_deadlock_names_only_waiting_ranks():
    # rank 2 finishes; ranks 0 and 1 wait for each other
    def recv_from(peer):
        yield alg.Recv(peer)

    def done():
        if False:  # makes this a generator that returns at once
            yield
        return "ok"

    with pytest.raises(comm.CommError) as info:
        comm.drive([recv_from(1), recv_from(0), done()])
    message = str(info.value)
    assert "rank 0 waits for rank 1" in message and "rank 1 waits for rank 0" in message
    assert "rank 2 waits" not in message


def test_drive_rejects_steps_that_are_not_send_or_recv():
    def bad():
        yield "hello"

    with pytest.raises(comm.CommError, match="rank 0"):
        comm.drive([bad()])


# ------------------------------------------------------------------------ threaded communicators
WORLD = 4
JOIN_TIMEOUT = 5.0


def _run_threads(hub, body, ranks=range(WORLD)):
    """Run ``body(communicator)`` on one thread per rank; return {rank: result}, re-raise errors."""
    results, errors = {}, {}

    def target(rank):
        try:
            results[rank] = body(hub.communicator(rank))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[rank] = e

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        rank, error = sorted(errors.items())[0]
        raise AssertionError(f"rank {rank} failed: {error!r}") from error
    return results


def test_threaded_collectives_match_references():
    rng = _rng(2024)
    xs = [_randn(rng, SHAPE) for _ in range(WORLD)]
    pieces = np.array_split(_randn(rng, SHAPE), WORLD, axis=1)
    bcast = _randn(rng, (3, 2))
    sub = [1, 3]
    sub_rev = [3, 0, 2]  # a group in non-ascending order: group order decides positions
    hub = comm.InProcessHub(WORLD, timeout=2.0)

    def body(c):
        r = c.rank
        out = {
            "all_reduce": c.all_reduce(xs[r]),
            "all_gather": c.all_gather(pieces[r], axis=1),
            "reduce_scatter": c.reduce_scatter(xs[r], axis=0),
            "all_to_all": c.all_to_all(xs[r], split_axis=0, concat_axis=1),
            "broadcast": c.broadcast(bcast if r == 2 else None, root=2),
        }
        if r in sub:
            out["sub_all_reduce"] = c.all_reduce(xs[r], group=sub)
            out["sub_all_gather"] = c.all_gather(xs[r], axis=0, group=sub)
            out["sub_reduce_scatter"] = c.reduce_scatter(xs[r], axis=0, group=sub)
            out["sub_all_to_all"] = c.all_to_all(xs[r], split_axis=0, concat_axis=0, group=sub)
            out["sub_broadcast"] = c.broadcast(xs[r] if r == 3 else None, root=3, group=sub)
            c.barrier(group=sub)
        if r in sub_rev:
            out["rev_all_gather"] = c.all_gather(xs[r], axis=0, group=sub_rev)
            out["rev_broadcast"] = c.broadcast(xs[r] if r == 0 else None, root=0, group=sub_rev)
        c.barrier()
        return out

    results = _run_threads(hub, body)

    total = np.sum(xs, axis=0)
    rs = np.array_split(total, WORLD, axis=0)
    a2a, _ = _all_to_all_reference(xs, 0, 1)
    sub_total = xs[1] + xs[3]
    sub_rs = np.array_split(sub_total, 2, axis=0)
    sub_a2a, _ = _all_to_all_reference([xs[1], xs[3]], 0, 0)
    for r in range(WORLD):
        out = results[r]
        np.testing.assert_allclose(out["all_reduce"], total, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(out["all_gather"], np.concatenate(pieces, axis=1))
        np.testing.assert_allclose(out["reduce_scatter"], rs[r], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(out["all_to_all"], a2a[r])
        np.testing.assert_array_equal(out["broadcast"], bcast)
    for pos, r in enumerate(sub):
        out = results[r]
        np.testing.assert_allclose(out["sub_all_reduce"], sub_total, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(out["sub_all_gather"], np.concatenate([xs[1], xs[3]], axis=0))
        np.testing.assert_allclose(out["sub_reduce_scatter"], sub_rs[pos], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(out["sub_all_to_all"], sub_a2a[pos])
        np.testing.assert_array_equal(out["sub_broadcast"], xs[3])
    for r in (0, 2):
        assert not any(k.startswith("sub_") for k in results[r])
    for r in sub_rev:
        np.testing.assert_array_equal(results[r]["rev_all_gather"],
                                      np.concatenate([xs[g] for g in sub_rev], axis=0))
        np.testing.assert_array_equal(results[r]["rev_broadcast"], xs[0])
    assert not any(hub.communicator(r).mailbox.pending() for r in range(WORLD)), "messages left untaken"


def test_threaded_point_to_point_and_bytes():
    hub = comm.InProcessHub(2, timeout=2.0)
    x = np.arange(12, dtype=np.int32).reshape(3, 4)

    def body(c):
        if c.rank == 0:
            c.send(x, 1)
            return None
        return c.recv(0)

    results = _run_threads(hub, body, ranks=range(2))
    np.testing.assert_array_equal(results[1], x)
    assert not np.shares_memory(results[1], x)
    assert hub.bytes_sent == x.nbytes


def test_threaded_barrier_waits_for_the_slowest_rank():
    hub = comm.InProcessHub(WORLD, timeout=2.0)
    delay = 0.2
    arrived, left = {}, {}

    def body(c):
        if c.rank == 1:
            time.sleep(delay)
        arrived[c.rank] = time.monotonic()
        c.barrier()
        left[c.rank] = time.monotonic()

    _run_threads(hub, body)
    last_arrival = max(arrived.values())
    early = sorted(r for r, t in left.items() if t < last_arrival)
    assert not early, f"ranks {early} left the barrier before rank 1 arrived"


# --------------------------------------------------------------------------- errors, timeouts
def test_recv_from_silent_rank_times_out_naming_it():
    hub = comm.InProcessHub(3, timeout=0.2)
    c = hub.communicator(0)
    start = time.monotonic()
    with pytest.raises(comm.CommError) as info:
        c.recv(2)
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 1.0
    assert "rank 2" in str(info.value)


def test_collective_with_missing_rank_times_out_naming_it():
    hub = comm.InProcessHub(2, timeout=0.2)
    c = hub.communicator(0)  # rank 1 never joins
    start = time.monotonic()
    with pytest.raises(comm.CommError, match="rank 1"):
        c.all_reduce(np.ones(4))
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("peer", [0, 4, -1], ids=["self", "out_of_range", "negative"])
def test_send_and_recv_reject_bad_peers(peer):
    c = comm.InProcessHub(WORLD, timeout=0.2).communicator(0)
    with pytest.raises(comm.CommError):
        c.send(np.ones(2), peer)
    with pytest.raises(comm.CommError):
        c.recv(peer)
    assert c.hub.bytes_sent == 0


@pytest.mark.parametrize("call", [
    pytest.param(lambda c, g: c.all_reduce(np.ones(2), group=g), id="all_reduce"),
    pytest.param(lambda c, g: c.all_gather(np.ones(2), group=g), id="all_gather"),
    pytest.param(lambda c, g: c.reduce_scatter(np.ones(2), group=g), id="reduce_scatter"),
    pytest.param(lambda c, g: c.all_to_all(np.ones(2), 0, 0, group=g), id="all_to_all"),
    pytest.param(lambda c, g: c.broadcast(None, root=1, group=g), id="broadcast"),
    pytest.param(lambda c, g: c.barrier(group=g), id="barrier"),
])
def test_rank_not_in_group_raises(call):
    hub = comm.InProcessHub(WORLD, timeout=0.2)
    c = hub.communicator(0)
    start = time.monotonic()
    with pytest.raises(comm.CommError, match="rank 0"):
        call(c, [1, 3])
    assert time.monotonic() - start < 0.1  # refused up front, not after a timeout
    assert hub.bytes_sent == 0

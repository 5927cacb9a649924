"""The NCCL transport (:mod:`comm.nccl`) against the base class's collectives.

- everywhere: ``import comm.nccl`` needs no CuPy, ``available()`` agrees with
  ``why_unavailable()``, and without CuPy every entry point raises a ``CommError`` saying what
  to install; the message header and the NCCL id's forms (bytes, signed or unsigned chars);
- everywhere: ``NcclCommunicator``'s own logic (headers, tags, padding of uneven pieces, shape
  gathering, sub-group bootstrap, timeouts) run over ``FakeNccl``, a stand-in for CuPy's NCCL
  calls on NumPy and threads that keeps NCCL's rules (collectives wait for every rank;
  point-to-point only in groups, and a send completes only when the peer receives it);
  results are compared with ``comm.run_group`` over the schedules of :mod:`comm.algorithms`
  for 1..4 ranks;
- on a machine with CuPy and CUDA GPUs: the same cases for real, one spawned process per GPU
  (world size 1, and 2 when there are two GPUs: NCCL wants a distinct device per rank).
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from comm import CommError, run_group
from comm import algorithms as alg
from comm import nccl

ROOT = Path(__file__).resolve().parents[1]
FAKE_TIMEOUT = 20.0  # seconds a fake rank waits on another before calling it a deadlock

needs_gpu = pytest.mark.skipif(not nccl.available(), reason=f"no NCCL transport here: {nccl.why_unavailable()}")


# ------------------------------------------------------------------- the shared cases
def _inputs(rank: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([77, rank])
    return {
        "x": rng.standard_normal((4, 7, 3)).astype(np.float32),
        "piece": rng.standard_normal((2, rank + 1, 3)).astype(np.float32),  # uneven along axis 1
        "rows": rng.standard_normal((rank + 1, 5)),  # float64; 5 columns split over the ranks
        "z": (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(np.complex64),
        "i": rng.integers(-1000, 1000, size=(3, 3), dtype=np.int32),
    }


def _cases(comm) -> dict[str, np.ndarray]:
    """Every call of the interface on one rank; the results as NumPy (module level: spawnable)."""
    xp, n, r = comm.xp, comm.world_size, comm.rank
    host = _inputs(r)
    a = {k: xp.asarray(v) for k, v in host.items()}
    out = {
        "all_reduce": comm.all_reduce(a["x"]),
        "all_reduce_complex": comm.all_reduce(a["z"]),
        "all_reduce_int": comm.all_reduce(a["i"]),
        "all_reduce_numpy": comm.all_reduce(host["x"]),  # NumPy in: moved to the device
        "all_gather": comm.all_gather(a["piece"], axis=1),
        "all_gather_rows": comm.all_gather(a["x"], axis=0),
        "reduce_scatter": comm.reduce_scatter(a["x"], axis=1),
        "reduce_scatter_rows": comm.reduce_scatter(a["x"], axis=0),
        "all_to_all": comm.all_to_all(a["rows"], split_axis=1, concat_axis=0),
        "all_to_all_uneven": comm.all_to_all(a["piece"], split_axis=1, concat_axis=1),  # split lengths differ
        "broadcast": comm.broadcast(a["x"] if r == n - 1 else None, root=n - 1),
    }
    if n >= 2:
        if r == 0:  # two tags, taken in the other order by rank 1
            comm.send(a["x"], 1, tag=1)
            comm.send(a["piece"], 1, tag=2)
        if r == 1:
            out["recv_tag2"] = comm.recv(0, tag=2)
            out["recv_tag1"] = comm.recv(0, tag=1)
        if r in (0, n - 1):  # a sub-group listed out of order: its own NCCL communicator
            out["all_gather_reversed"] = comm.all_gather(a["piece"], axis=1, group=[n - 1, 0])
        pair = [r - r % 2, r - r % 2 + 1]
        if pair[1] < n:  # disjoint pairs at once (for n = 2 the pair is the world)
            out["pair_all_reduce"] = comm.all_reduce(a["x"], group=pair)
        if r in (0, 1):  # both send first: one group (1F1B's two-way exchange) cannot deadlock
            [out["exchange"]] = comm.exchange([(a["piece"], 1 - r, 9)], [(1 - r, 9)])
    comm.barrier()
    return {k: (v.get() if hasattr(v, "get") else v) for k, v in out.items()}


def _expected(n: int) -> list[dict[str, np.ndarray]]:
    """What :func:`_cases` must return on each rank, from the base class's schedules."""
    ins = [_inputs(r) for r in range(n)]

    def each(algorithm, key, **kwargs):
        return run_group(algorithm, [d[key] for d in ins], **kwargs)[0]

    per_name = {
        "all_reduce": each(alg.ring_all_reduce, "x"),
        "all_reduce_complex": each(alg.ring_all_reduce, "z"),
        "all_reduce_int": each(alg.ring_all_reduce, "i"),
        "all_reduce_numpy": each(alg.ring_all_reduce, "x"),
        "all_gather": each(alg.ring_all_gather, "piece", axis=1),
        "all_gather_rows": each(alg.ring_all_gather, "x", axis=0),
        "reduce_scatter": each(alg.ring_reduce_scatter, "x", axis=1),
        "reduce_scatter_rows": each(alg.ring_reduce_scatter, "x", axis=0),
        "all_to_all": each(alg.pairwise_all_to_all, "rows", split_axis=1, concat_axis=0),
        "all_to_all_uneven": each(alg.pairwise_all_to_all, "piece", split_axis=1, concat_axis=1),
        "broadcast": run_group(alg.tree_broadcast, [ins[r]["x"] if r == n - 1 else None for r in range(n)],
                               root=n - 1)[0],
    }
    expected = [{name: values[r] for name, values in per_name.items()} for r in range(n)]
    if n >= 2:
        expected[1]["recv_tag2"], expected[1]["recv_tag1"] = ins[0]["piece"], ins[0]["x"]
        expected[0]["exchange"], expected[1]["exchange"] = ins[1]["piece"], ins[0]["piece"]
        group = [n - 1, 0]
        for i, value in enumerate(run_group(alg.ring_all_gather, [ins[g]["piece"] for g in group], axis=1)[0]):
            expected[group[i]]["all_gather_reversed"] = value
        for first in range(0, n - 1, 2):
            for i, value in enumerate(run_group(alg.ring_all_reduce, [ins[first]["x"], ins[first + 1]["x"]])[0]):
                expected[first + i]["pair_all_reduce"] = value
    return expected


def _check(results: list[dict], expected: list[dict]) -> None:
    for rank, (got, want) in enumerate(zip(results, expected)):
        assert sorted(got) == sorted(want), f"rank {rank}"
        for name in want:
            assert got[name].dtype == want[name].dtype, f"rank {rank} {name}: {got[name].dtype} != {want[name].dtype}"
            assert got[name].shape == want[name].shape, f"rank {rank} {name}: {got[name].shape} != {want[name].shape}"
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=f"rank {rank} {name}")


# ------------------------------------------------------- a stand-in for CuPy's NCCL calls
class _FakeWorld:
    """What the ranks of one fake NCCL communicator share."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n, timeout=FAKE_TIMEOUT)
        self.slots: list = [None] * n
        self.wires = {(a, b): queue.Queue() for a in range(n) for b in range(n)}  # (src, dst) -> payloads
        self.acks = {(a, b): queue.Queue() for a in range(n) for b in range(n)}  # (src, dst) -> receipts


_WORLDS: dict[bytes, _FakeWorld] = {}
_WORLDS_LOCK = threading.Lock()


def _get(q: queue.Queue, timeout: float):
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError from None


class FakeNccl:
    """One rank's end of a fake NCCL communicator: the calls ``NcclCommunicator`` makes of
    ``comm.nccl._CupyNccl``, on NumPy. Like a CUDA stream, work runs in order: a group's sends
    are handed over at its end, and its receives and the receipts for its sends are awaited by
    ``wait`` or by the next call (so a send completes only once the peer receives it)."""

    def __init__(self, world: _FakeWorld, rank: int):
        self.world, self.rank = world, rank
        self._ops: list | None = None  # inside a group
        self._pending: list = []  # a launched group's unfinished receives and sends

    def _finish(self, timeout: float = FAKE_TIMEOUT) -> None:
        ops, self._pending = self._pending, []
        for kind, array, peer in ops:
            if kind == "recv":
                got = _get(self.world.wires[peer, self.rank], timeout)
                assert got.nbytes == array.nbytes, \
                    f"rank {self.rank} receives {array.nbytes} bytes from rank {peer}, which sent {got.nbytes}"
                array.reshape(-1).view(np.uint8)[...] = got.reshape(-1).view(np.uint8)
                self.world.acks[peer, self.rank].put(None)
        for kind, _, peer in ops:
            if kind == "send":
                _get(self.world.acks[self.rank, peer], timeout)

    def _everyone(self, mine: np.ndarray) -> list[np.ndarray]:
        self._finish()
        w = self.world
        w.slots[self.rank] = np.array(mine, copy=True)
        w.barrier.wait()
        everyone = list(w.slots)
        w.barrier.wait()
        assert all(a.nbytes == mine.nbytes and a.dtype == mine.dtype for a in everyone), \
            f"NCCL counts differ: {[(a.dtype, a.shape) for a in everyone]}"
        return everyone

    def all_reduce(self, send, recv, op="sum"):
        everyone = self._everyone(send)
        recv[...] = sum(everyone) if op == "sum" else np.maximum.reduce(everyone)

    def reduce_scatter(self, send, recv, op="sum"):
        everyone = self._everyone(send)
        total = (sum(everyone) if op == "sum" else np.maximum.reduce(everyone)).reshape(-1)
        k = recv.size
        assert total.size == k * len(self.world.slots)
        recv.reshape(-1)[...] = total[self.rank * k:(self.rank + 1) * k]

    def all_gather(self, send, recv):
        everyone = self._everyone(send)
        recv.reshape(-1).view(np.uint8)[...] = np.concatenate([a.reshape(-1).view(np.uint8) for a in everyone])

    def broadcast(self, buffer, root):
        buffer[...] = self._everyone(buffer)[root]

    def send(self, array, peer):
        assert self._ops is not None, "point-to-point outside a group"
        if array.nbytes:  # as _CupyNccl: empty arrays are not sent, nor received
            self._ops.append(("send", np.array(array, copy=True), peer))

    def recv(self, array, peer):
        assert self._ops is not None, "point-to-point outside a group"
        if array.nbytes:
            self._ops.append(("recv", array, peer))

    @contextlib.contextmanager
    def group(self):
        self._ops = []
        yield
        ops, self._ops = self._ops, None
        self._finish()  # in stream order: the previous group first
        for kind, array, peer in ops:
            if kind == "send":
                self.world.wires[self.rank, peer].put(array)
        self._pending = ops

    def wait(self, timeout):
        self._finish(timeout)

    def check_async_error(self):
        pass

    def abort(self):
        self._pending = []

    def destroy(self):
        pass


class FakeNcclError(RuntimeError):
    pass


class FakeNcclCommunicator(nccl.NcclCommunicator):
    """``NcclCommunicator`` over :class:`FakeNccl`: NumPy arrays, one thread per rank."""

    def _setup(self, device):
        self.device = device
        self.xp, self._host, self._nccl_error = np, np.asarray, FakeNcclError
        self._on_device = contextlib.nullcontext

    def _connect(self, world_size, unique_id, rank):
        with _WORLDS_LOCK:
            world = _WORLDS.setdefault(bytes(unique_id), _FakeWorld(world_size))
        return FakeNccl(world, rank)

    def _new_unique_id(self):
        return os.urandom(128)


def _run_fake(n: int, fn, timeout: float = 60.0) -> list:
    """``fn(communicator)`` on ``n`` fake ranks, one thread each; re-raises the first error."""
    unique_id = os.urandom(128)
    results: list = [None] * n
    errors: list = [None] * n

    def main(rank):
        try:
            results[rank] = fn(FakeNcclCommunicator(rank, n, unique_id, timeout=timeout))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[rank] = e

    threads = [threading.Thread(target=main, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * FAKE_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a fake rank hangs"
    for e in errors:
        if e is not None:
            raise e
    return results


# ------------------------------------------------------------------ tests without a GPU
def test_import_needs_no_cupy():
    code = ("import sys; sys.modules['cupy'] = None\n"  # makes `import cupy` fail, as if not installed
            "import comm, comm.nccl\n"
            "assert not comm.nccl.available(), comm.nccl.why_unavailable()\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    done = subprocess.run([sys.executable, "-c", "import sys, comm, comm.nccl; print('cupy' in sys.modules)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", "importing comm must not import CuPy\n" + done.stderr


def test_without_cupy_every_entry_point_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert not nccl.available()
    assert nccl.INSTALL_HINT in nccl.why_unavailable()
    for call in (lambda: nccl.NcclCommunicator(0, 1, bytes(128)), nccl.nccl_unique_id,
                 lambda: nccl.run_ranks(_cases, 1)):
        with pytest.raises(CommError, match=r"pip install flowsys\[cuda\]"):
            call()


def test_available_agrees_with_its_reason():
    assert nccl.available() == (nccl.why_unavailable() == "")


def test_header_round_trip_and_limits():
    for dtype, shape in [(np.float32, (4, 7, 3)), (np.bool_, ()), (np.complex128, (0, 5)), (np.int64, (1,) * 29)]:
        assert nccl.decode_header(nccl.encode_header(-3, dtype, shape)) == (-3, np.dtype(dtype), shape)
    with pytest.raises(CommError, match="not object"):
        nccl.encode_header(0, object, (1,))
    with pytest.raises(CommError, match="up to 29 dimensions, not 30"):
        nccl.encode_header(0, np.float32, (1,) * 30)


def test_the_unique_id_reaches_every_cupy_version():
    raw = bytes(range(100, 228))
    signed = tuple(b - 256 if b > 127 else b for b in raw)  # CuPy < 14 on x86 draws C chars
    assert nccl._id_bytes(raw) == raw and nccl._id_bytes(signed) == raw and nccl._id_bytes(list(raw)) == raw

    def fake_nccl(accepts):
        class NcclCommunicator:
            def __init__(self, n, unique_id, rank):
                if isinstance(unique_id, bytes) != (accepts == "bytes"):
                    raise TypeError("Argument 'commId' has incorrect type")
                if accepts != "bytes" and not all((-128 <= v < 128) if accepts == "signed" else (0 <= v < 256)
                                                  for v in unique_id):
                    raise OverflowError("value too large to convert to char")
                self.unique_id = unique_id
        return type("nccl", (), {"NcclCommunicator": NcclCommunicator})

    assert nccl._init_comm(fake_nccl("bytes"), 2, signed, 0).unique_id == raw  # CuPy >= 14
    assert nccl._init_comm(fake_nccl("signed"), 2, raw, 0).unique_id == signed  # CuPy 13, x86
    assert nccl._init_comm(fake_nccl("unsigned"), 2, raw, 0).unique_id == tuple(raw)  # CuPy 13, ARM


def test_cupy_calls_follow_cupys_signatures():
    """``_CupyNccl`` against a recording stand-in for ``cupy.cuda.nccl.NcclCommunicator``, with
    CuPy's argument orders: (sendbuf, recvbuf, count, datatype, [op | root,] stream) and
    (buf, count, datatype, peer, stream)."""
    calls = []

    class Comm:
        def __getattr__(self, name):
            return lambda *args: calls.append((name, *args))

    class DeviceArray:  # what _CupyNccl reads of a cupy.ndarray
        def __init__(self, dtype, shape, ptr):
            self.dtype, self.size = np.dtype(dtype), int(np.prod(shape))
            self.nbytes, self.data = self.size * self.dtype.itemsize, SimpleNamespace(ptr=ptr)

        def copy(self):
            return DeviceArray(self.dtype, (self.size,), 4096)  # fresh allocations are aligned

    consts = dict(NCCL_SUM=0, NCCL_INT8=0, NCCL_UINT8=1, NCCL_INT32=2, NCCL_UINT32=3, NCCL_INT64=4,
                  NCCL_UINT64=5, NCCL_FLOAT16=6, NCCL_FLOAT32=7, NCCL_FLOAT64=8)
    fake = SimpleNamespace(groupStart=lambda: calls.append("start"), groupEnd=lambda: calls.append("end"), **consts)
    cupy = SimpleNamespace(cuda=SimpleNamespace(get_current_stream=lambda: SimpleNamespace(ptr=99)))
    c = nccl._CupyNccl(cupy, fake, Comm())
    c.all_reduce(DeviceArray(np.complex64, (6,), 512), DeviceArray(np.complex64, (6,), 1024))
    c.reduce_scatter(DeviceArray(np.int32, (10,), 512), DeviceArray(np.int32, (5,), 1024))
    c.all_gather(DeviceArray(np.float32, (3,), 1004), DeviceArray(np.float32, (6,), 2048))  # 12 bytes: 4-byte words
    c.broadcast(DeviceArray(np.float64, (2,), 512), 1)
    c.all_reduce(DeviceArray(np.float32, (0,), 512), DeviceArray(np.float32, (0,), 512))  # empty: no call
    with c.group():
        c.send(DeviceArray(np.float32, (4,), 1004), 1)  # 16 bytes at a 4-aligned address: copied first
        assert len(c._held) == 1  # ... and kept until the group is launched
        c.recv(DeviceArray(np.uint8, (3,), 512), 1)
    assert c._held is None
    assert calls == [("allReduce", 512, 1024, 12, 7, 0, 99), ("reduceScatter", 512, 1024, 5, 2, 0, 99),
                     ("allGather", 1004, 2048, 3, 2, 99), ("broadcast", 512, 512, 2, 4, 1, 99), "start",
                     ("send", 4096, 2, 4, 1, 99), ("recv", 512, 3, 1, 1, 99), "end"]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_fake_nccl_matches_the_base_collectives(n):
    _check(_run_fake(n, _cases), _expected(n))


def test_fake_nccl_names_what_nccl_cannot_do():
    def bad_dtype_sum(comm):
        with pytest.raises(CommError, match="NCCL cannot sum bool arrays"):
            comm.all_reduce(np.ones(3, bool))
        with pytest.raises(CommError, match="NCCL cannot sum int16"):
            comm.reduce_scatter(np.ones(4, np.int16))

    def mixed_dtypes(comm):
        with pytest.raises(CommError, match="rank 1 holds float64 and rank 0 holds float32|"
                                            "rank 0 holds float32 and rank 1 holds float64"):
            comm.all_gather(np.ones(2, np.float32 if comm.rank == 0 else np.float64))

    def mixed_shapes(comm):
        with pytest.raises(CommError, match="only axis 0 may differ"):
            comm.all_gather(np.ones((2, 3 + comm.rank)), axis=0)
        with pytest.raises(CommError, match="axis 2 is out of range"):
            comm.all_gather(np.ones((2, 3)), axis=2)
        return comm.all_gather(np.ones((2, 3)), axis=1).shape  # the communicator still works

    _run_fake(2, bad_dtype_sum)
    _run_fake(2, mixed_dtypes)
    assert _run_fake(2, mixed_shapes) == [(2, 6), (2, 6)]


def test_fake_nccl_times_out_and_aborts():
    def lonely(comm):
        if comm.rank == 1:
            with pytest.raises(CommError, match=r"receive from rank\(s\) \[0\] did not finish within 0.3 s"):
                comm.recv(0)
            with pytest.raises(CommError, match="no longer usable"):
                comm.all_reduce(np.ones(2))

    _run_fake(2, lonely, timeout=0.3)


# -------------------------------------------------------------------- tests on real GPUs
@needs_gpu
@pytest.mark.parametrize("n", [1, 2])
def test_nccl_on_gpus_matches_the_base_collectives(n):
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    if count < n:
        pytest.skip(f"world size {n} needs {n} GPUs (NCCL wants a distinct device per rank); {count} visible")
    _check(nccl.run_ranks(_cases, n, timeout=240), _expected(n))


@needs_gpu
def test_nccl_on_a_gpu_rejects_what_it_cannot_sum():
    assert nccl.run_ranks(_sum_bool, 1, timeout=120) == [True]


def _sum_bool(comm) -> bool:
    try:
        comm.all_reduce(comm.xp.ones(3, bool))
    except CommError as e:
        return "NCCL cannot sum bool arrays" in str(e)
    return False

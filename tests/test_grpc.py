"""``comm.GrpcCommunicator`` with real gRPC servers, every rank a thread of this process.

- the collectives over 2..4 ranks against NumPy references, through shared memory (the same-host
  path) and over the gRPC stream only (the cross-host path), and sends of every supported kind of
  array (0-d, empty, non-contiguous, big-endian, bool, complex) arriving bit for bit;
- a 256 MiB tensor goes rank 0 -> rank 1 -> rank 0 intact on both paths;
- a raw gRPC client (speaking for rank 0 to a rank 1 that rank 0 has no stream to: a rank takes
  one stream per source): a call with a wrong or no secret is refused ``UNAUTHENTICATED``, a
  malformed message ``INVALID_ARGUMENT``, and nothing reaches the mailbox; the server keeps
  serving, and takes several messages on one stream; a message past the mailbox's bounds is
  refused ``RESOURCE_EXHAUSTED`` and fails the mailbox, naming rank 0;
- a closed peer makes the sender's ``send`` and ``recv`` raise a ``CommError`` naming it within a
  second or two, not after the timeout, and so does a killed one, even for a rank that only
  receives from it; tags keep conversations apart; order per (source, tag) holds;
- shared memory: a received array is never overwritten while it is alive, segments are reused
  once it is not, nothing is left in /dev/shm; a peer that cannot open them fails loudly.
"""

from __future__ import annotations

import contextlib
import doctest
import gc
import os
import secrets
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

import comm
from comm import grpc_transport as gt
from comm import wire_pb2
from comm.grpc_transport import DELIVER, SECRET_KEY, SRC_KEY, GrpcCommunicator

SECRET = f"test-secret-{secrets.token_hex(4)}"  # its own job id: concurrent runs share /dev/shm
AS_RANK_0 = ((SECRET_KEY, SECRET), (SRC_KEY, "0"))  # a raw client's metadata
PATHS = {"shm": dict(shared_memory=True), "stream": dict(shared_memory=False, chunk_bytes=16 << 10)}
needs_shm = pytest.mark.skipif(not gt.SHM_OK, reason="no /dev/shm here")


@contextlib.contextmanager
def world(n: int, **kwargs):
    comms = [GrpcCommunicator(r, n, SECRET, **kwargs) for r in range(n)]
    try:
        for c in comms:
            c.connect([c.address for c in comms])
        on_ranks(comms, lambda c: c.barrier())  # the streams to the ring's neighbours are up
        yield comms
    finally:
        for c in comms:
            c.close()


@contextlib.contextmanager
def receiver(**kwargs):
    """Rank 1 of 2, serving and connected to nobody: a raw client may speak for rank 0."""
    b = GrpcCommunicator(1, 2, SECRET, **kwargs)
    try:
        yield b
    finally:
        b.close()


@contextlib.contextmanager
def sender_to(b: GrpcCommunicator):
    """A real rank 0 with a stream to ``b`` (rank 1)."""
    a = GrpcCommunicator(0, 2, SECRET)
    try:
        a.connect([a.address, b.address])
        yield a
    finally:
        a.close()


def on_ranks(comms, fn, timeout: float = 30.0) -> list:
    """``fn(comm)`` on every rank, each in its own thread; the results in rank order."""
    results, errors = [None] * len(comms), [None] * len(comms)

    def body(r):
        try:
            results[r] = fn(comms[r])
        except BaseException as e:  # re-raised below, in the test's thread
            errors[r] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(len(comms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a rank is still running"
    for e in errors:
        if e is not None:
            raise e
    return results


def used_shm(c: GrpcCommunicator) -> bool:
    return any(p.segments for p in c._peers.values())


# ------------------------------------------------------------------------------- collectives
@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", [pytest.param("shm", marks=needs_shm), "stream"])
@pytest.mark.parametrize("n", [2, 3, 4], ids=lambda n: f"n={n}")
def test_collectives_match_numpy(n, path):
    rng = np.random.default_rng(n)
    xs = [rng.standard_normal((257, 129)) for _ in range(n)]  # every piece >= 64 KiB: the shm path
    pieces = np.array_split(np.concatenate(xs, axis=0), n, axis=0)

    def body(c):
        me = c.rank
        out = {"all_reduce": c.all_reduce(xs[me]),
               "all_gather": c.all_gather(pieces[me], axis=0),
               "reduce_scatter": c.reduce_scatter(xs[me], axis=1),
               "all_to_all": c.all_to_all(xs[me], split_axis=0, concat_axis=1),
               "broadcast": c.broadcast(xs[me] if me == n - 1 else None, root=n - 1)}
        c.barrier()
        return out

    with world(n, **PATHS[path]) as comms:
        outs = on_ranks(comms, body)
        assert all(used_shm(c) for c in comms) == (path == "shm")
    total = np.sum(xs, axis=0)
    for me, out in enumerate(outs):
        np.testing.assert_allclose(out["all_reduce"], total, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(out["all_gather"], np.concatenate(pieces, axis=0))
        np.testing.assert_allclose(out["reduce_scatter"], np.array_split(total, n, axis=1)[me], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(out["all_to_all"],
                                      np.concatenate([np.array_split(x, n, axis=0)[me] for x in xs], axis=1))
        np.testing.assert_array_equal(out["broadcast"], xs[n - 1])


ARRAYS = {
    "scalar": np.float64(2.5),
    "empty": np.zeros((0, 3), np.float32),
    "transposed": np.arange(120_000, dtype=np.int64).reshape(300, 400).T,  # non-contiguous, >= 64 KiB
    "big-endian": np.arange(50_000, dtype=">f4"),
    "bool": np.arange(100_000) % 3 == 0,
    "complex": (np.arange(9_000) * (1 + 2j)).astype(np.complex128),
    "int8": np.arange(-128, 128, dtype=np.int8),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", [pytest.param("shm", marks=needs_shm), "stream"])
def test_arrays_arrive_bit_for_bit(path):
    with world(2, **PATHS[path]) as (a, b):
        for tag, x in enumerate(ARRAYS.values()):
            a.send(x, 1, tag=tag)
        for tag, (name, x) in reversed(list(enumerate(ARRAYS.items()))):  # each by its own tag
            got = b.recv(0, tag=tag)
            assert (got.dtype, got.shape) == (np.asarray(x).dtype, np.shape(x)), name
            assert got.tobytes() == np.ascontiguousarray(x).tobytes(), name


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", [pytest.param("shm", marks=needs_shm), "stream"])
def test_256_mib_round_trip(path):
    x = np.frombuffer(np.random.default_rng(0).bytes(256 << 20), np.float32).reshape(8192, 8192)

    def there_and_back(c):
        if c.rank == 1:
            return c.send(c.recv(0), 0)
        c.send(x, 1)
        return c.recv(1)

    with world(2, shared_memory=path == "shm") as comms:
        back = on_ranks(comms, there_and_back)[0]
    assert back.shape == x.shape and back.dtype == x.dtype
    assert np.array_equal(back.view(np.uint8), x.view(np.uint8))  # bytes, so NaN patterns count too


# ------------------------------------------------------------------------- a raw gRPC client
def message(src=0, tag=0, dtype="<f4", shape=(4,), nbytes=None, data=None, **fields) -> list[bytes]:
    """One message as a raw client sends it: one chunk with header and bytes."""
    data = np.arange(np.prod(shape), dtype=dtype).tobytes() if data is None else data
    nbytes = len(data) if nbytes is None else nbytes
    return [wire_pb2.Chunk(has_header=True, src=src, tag=tag, dtype=dtype, shape=shape, nbytes=nbytes,
                           data=data, **fields).SerializeToString()]


@contextlib.contextmanager
def raw_client(address: str):
    with grpc.insecure_channel(address) as channel:
        yield channel.stream_unary(DELIVER)


def refused(call, chunks, metadata) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(iter(chunks), metadata=metadata, timeout=10)
    return err.value.code()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("metadata", [((SECRET_KEY, "not-the-secret"), (SRC_KEY, "0")), ((SRC_KEY, "0"),),
                                      (("other-key", SECRET), (SRC_KEY, "0"))],
                         ids=["wrong", "missing", "other-key"])
def test_call_without_the_secret_is_refused(metadata):
    with receiver() as b, raw_client(b.address) as call:
        arrived = b.mailbox.arrivals
        assert refused(call, message(), metadata) == grpc.StatusCode.UNAUTHENTICATED
        assert b.mailbox.arrivals == arrived and b.mailbox.pending() == []
        call(iter(message()), metadata=AS_RANK_0, timeout=10)  # the right one passes
        np.testing.assert_array_equal(b.recv(0), np.arange(4, dtype=np.float32))


MALFORMED = {
    "garbage": [b"\xff\xff\xff\xff"],
    "no header": [wire_pb2.Chunk(data=b"\0" * 16).SerializeToString()],
    "unknown dtype": message(dtype="q9", nbytes=16, data=b"\0" * 16),
    "object dtype": message(dtype="|O", shape=(2,), nbytes=16, data=b"\0" * 16),
    "structured dtype": message(dtype="f4,f4", shape=(2,), nbytes=16, data=b"\0" * 16),
    "string dtype": message(dtype="<U4", shape=(1,), nbytes=16, data=b"\0" * 16),
    "nbytes not shape x itemsize": message(nbytes=15, data=b"\0" * 15),
    "negative dimension": message(shape=(-1, 4), nbytes=16, data=b"\0" * 16),
    "too many bytes": message(nbytes=16, data=b"\0" * 20),
    "too few bytes": message(nbytes=16, data=b"\0" * 8),
    "too many bytes in a later chunk": message(nbytes=16, data=b"\0" * 8) + [
        wire_pb2.Chunk(data=b"\0" * 12).SerializeToString()],
    "second header": message(nbytes=16, data=b"\0" * 8) + message(nbytes=16, data=b"\0" * 8),
    "header src out of range": message(src=7),
    "header src not the stream's": message(src=1),
    "a bad message after a good one": message() + [b"\xff\xff\xff\xff"],
    "shm name not ours": message(nbytes=16, data=b"", shm_name="../../etc/passwd"),
    "shm and stream bytes": message(shm_name="fsys_" + "0" * 24),
    "shm name of no segment": message(nbytes=16, data=b"", shm_name="fsys_" + "0" * 24),  # see test_transport_limits
}


@pytest.mark.timeout(30)
def test_malformed_messages_are_rejected_and_the_server_keeps_serving():
    with receiver() as b, raw_client(b.address) as call:
        arrived = b.mailbox.arrivals
        for case, chunks in MALFORMED.items():
            assert refused(call, chunks, AS_RANK_0) == grpc.StatusCode.INVALID_ARGUMENT, case
        for src in ["7", "1", "-1", "zero"]:  # out of range, the receiver itself, not a number
            assert refused(call, message(), ((SECRET_KEY, SECRET), (SRC_KEY, src))) == grpc.StatusCode.INVALID_ARGUMENT
        assert refused(call, message(), ((SECRET_KEY, SECRET),)) == grpc.StatusCode.INVALID_ARGUMENT  # no src
        assert b.mailbox.arrivals == arrived + 1  # only the good message before a bad one
        assert b.mailbox.pending() == [(0, 0)]
        b.recv(0)
        # still serving: a stream of three messages (the last in two chunks), then the transport's own
        three = (message(tag=5) + message(tag=5, dtype="<i8", shape=(2, 0))
                 + message(tag=5, dtype="|u1", shape=(3,), nbytes=3, data=b"ab")
                 + [wire_pb2.Chunk(data=b"c").SerializeToString()]
                 + [wire_pb2.Chunk(has_header=True, src=0, goodbye=True).SerializeToString()])  # a sender closing
        call(iter(three), metadata=AS_RANK_0, timeout=10)
        with sender_to(b) as a:  # the real rank 0, once the raw client's stream is over
            a.send(np.full(3, 7.0), 1, tag=5)
            np.testing.assert_array_equal(b.recv(0, tag=5), np.arange(4, dtype=np.float32))
            assert b.recv(0, tag=5).shape == (2, 0)
            assert b.recv(0, tag=5).tobytes() == b"abc"
            np.testing.assert_array_equal(b.recv(0, tag=5), np.full(3, 7.0))
        # past the mailbox's bounds, before any memory is taken for it: refused, and the mailbox fails
        too_big = message(dtype="<f8", shape=(1 << 59,), nbytes=1 << 62, data=b"")  # 4 EiB
        assert refused(call, too_big, AS_RANK_0) == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(comm.CommError, match=r"rank 1: rank 0 sent more than \d+ unconsumed bytes"):
            b.recv(0, tag=6)


@pytest.mark.timeout(30)
def test_a_stream_that_ends_without_goodbye_means_its_sender_died():
    """A closing communicator ends each stream with a goodbye chunk; a stream cut off without
    one (the sender's process died) fails the receiver's mailbox, naming the sender."""
    with receiver() as b, raw_client(b.address) as call:
        call(iter(message(tag=3)), metadata=AS_RANK_0, timeout=10)  # a message, then the stream just ends
        np.testing.assert_array_equal(b.mailbox.try_take(0, 3), np.arange(4, dtype=np.float32))
        with pytest.raises(comm.CommError, match=r"from rank 0 ended without a goodbye"):
            b.recv(0, tag=4)


def test_data_chunks_are_protobuf_encoded():
    payload = memoryview(np.random.default_rng(1).bytes(300_000))
    for step in [1, 127, 128, 16_384, 300_000]:
        data = payload[:2 * step + 3]
        chunks = list(gt._data_chunks(data, step))
        pieces = [data[i:i + step] for i in range(0, len(data), step)]
        assert chunks == [wire_pb2.Chunk(data=bytes(p)).SerializeToString() for p in pieces]
        assert [bytes(gt._data_of(c)) for c in chunks] == [bytes(p) for p in pieces]
    header = wire_pb2.Chunk(has_header=True, src=1, tag=2, dtype="<f8", shape=[3, 4], nbytes=96)
    first = header.SerializeToString() + next(gt._data_chunks(payload[:96], 64))  # as post writes it
    assert wire_pb2.Chunk.FromString(first) == wire_pb2.Chunk(has_header=True, src=1, tag=2, dtype="<f8",
                                                              shape=[3, 4], nbytes=96, data=bytes(payload[:64]))


# ---------------------------------------------------------------------- failures, tags, order
@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", [pytest.param("shm", marks=needs_shm), "stream"])
def test_closed_peer_fails_send_and_recv_fast(path):
    with world(2, timeout=30.0, **PATHS[path]) as (a, b):
        b.close()
        b.close()  # idempotent
        start = time.monotonic()
        with pytest.raises(comm.CommError, match=r"rank 1\b"):
            a.send(np.ones(100_000), 1)
        with pytest.raises(comm.CommError, match=r"rank 1\b"):
            a.recv(1)
        assert time.monotonic() - start < 2.0


KILLED_RANK = textwrap.dedent("""
    import faulthandler, sys, time
    faulthandler.dump_traceback_later(20, exit=True)  # a hang here shows where, in the test's output
    from comm import GrpcCommunicator
    c = GrpcCommunicator(1, 2, sys.argv[1])
    print(c.address, flush=True)
    c.connect([sys.stdin.readline().strip(), c.address])
    print("connected", flush=True)
    faulthandler.cancel_dump_traceback_later()
    time.sleep(60)
""")


@pytest.mark.timeout(30)
def test_killed_peer_fails_a_waiting_recv_fast():
    """Rank 1 runs in a process of its own and is killed while rank 0 waits for it (and sends
    nothing): the broken streams fail rank 0's mailbox at once."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", KILLED_RANK, SECRET], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    a = GrpcCommunicator(0, 2, SECRET, timeout=30.0)
    try:
        b_address = child.stdout.readline().strip()
        a.connect([a.address, b_address])
        child.stdin.write(a.address + "\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "connected"
        threading.Timer(0.3, child.kill).start()
        start = time.monotonic()
        with pytest.raises(comm.CommError, match=r"rank 1\b"):
            a.recv(1)
        assert time.monotonic() - start < 2.5
    finally:
        child.kill()
        child.wait()
        a.close()


@pytest.mark.timeout(30)
def test_tags_keep_conversations_apart():
    with world(2) as (a, b):
        a.send(np.full(2, 1.0), 1, tag=1)
        a.send(np.full(2, 2.0), 1, tag=2)
        a.send(np.full(2, 3.0), 1, tag=1)
        assert b.recv(0, tag=2)[0] == 2.0  # taken out of arrival order, by tag
        assert [b.recv(0, tag=1)[0] for _ in range(2)] == [1.0, 3.0]
        # two conversations at once, each in its own thread, answered under its own tag
        def ask(tag):
            a.send(np.array([tag]), 1, tag=tag)
            return a.recv(1, tag=tag)[0]

        def answer(tag):
            b.send(b.recv(0, tag=tag) * 10, 0, tag=tag)

        threads = [threading.Thread(target=answer, args=(t,)) for t in (7, 8)]
        for t in threads:
            t.start()
        assert ask(8) == 80 and ask(7) == 70
        for t in threads:
            t.join(10)


@pytest.mark.timeout(30)
def test_order_per_source_and_tag_holds_for_many_messages():
    n_messages = 300
    with world(3) as comms:
        def body(c):
            if c.rank == 2:
                return {(src, tag): [int(c.recv(src, tag).flat[0]) for _ in range(n_messages // 2)]
                        for src in (0, 1) for tag in (0, 1)}
            for i in range(n_messages):  # every 25th message large enough for the shm path
                c.send(np.full(10_000 if i % 25 == 0 else 1, i), 2, tag=i % 2)

        got = on_ranks(comms, body)[2]
    for (src, tag), values in got.items():
        assert values == list(range(tag, n_messages, 2)), (src, tag)


# ------------------------------------------------------------------------------ shared memory
@needs_shm
@pytest.mark.timeout(30)
def test_received_arrays_are_never_overwritten_and_segments_are_reused():
    with world(2) as (a, b):
        a.send(np.full(100_000, 1.0), 1)
        kept = b.recv(0)
        for value in (2.0, 3.0, 4.0):
            a.send(np.full(100_000, value), 1)
            assert b.recv(0)[0] == value
        np.testing.assert_array_equal(kept, 1.0)  # its segment was not written again
        segments = a._peers[1].segments
        assert len(segments) == 2  # the one under `kept`, and one reused for 2, 3 and 4
        del kept
        gc.collect()
        for value in (5.0, 6.0):
            a.send(np.full(100_000, value), 1)
            assert b.recv(0)[0] == value
        assert len(segments) == 2
        names = [s.name for s in segments]
    assert not any(os.path.exists(os.path.join(gt.SHM_DIR, name)) for name in names)


@needs_shm
@pytest.mark.timeout(30)
def test_peer_that_cannot_open_the_segment_fails_loudly():
    """Ranks that name the same host but do not share /dev/shm (each stream's metadata names the
    sender's): the sender learns why, and what to do, and its segment is not left behind."""
    with world(2, timeout=30.0) as (a, b):
        b.shm_space = "another host's /dev/shm"
        a.send(np.arange(100_000, dtype=np.float64), 1)
        with pytest.raises(comm.CommError, match="rank 1 cannot open rank 0's shared memory.*shared_memory=False"):
            a.recv(1)
        assert not [n for n in os.listdir(gt.SHM_DIR) if a.job_id in n]


# ------------------------------------------------------------------------------------- usage
def test_usage_errors():
    with pytest.raises(comm.CommError, match="secret"):
        GrpcCommunicator(0, 2, secret="")
    c = GrpcCommunicator(0, 2, SECRET)
    try:
        with pytest.raises(comm.CommError, match="connect"):
            c.send(np.ones(2), 1)
        with pytest.raises(comm.CommError, match="1 addresses for a world of 2"):
            c.connect([c.address])
        c.connect([c.address, "127.0.0.1:1"])
        with pytest.raises(comm.CommError, match="dtype object"):
            c.send(np.array([None]), 1)
    finally:
        c.close()


@pytest.mark.timeout(30)
def test_module_docstring_example_runs():
    assert doctest.testmod(gt, optionflags=doctest.ELLIPSIS).failed == 0

"""The transport's bounds against a misbehaving peer, and TLS (no Ray; every rank is a thread of
this process or a child process this test starts).

- mailbox bounds per source rank (messages, bytes): in process, a send past them raises the
  receiver's ``CommError`` naming the sender; over gRPC the stream is refused
  ``RESOURCE_EXHAUSTED`` and both ranks' mailboxes fail, naming the peer;
- shared memory: a receiver that never takes holds at most ``SHM_MAX_SEGMENTS`` segments of a
  sender (the rest take the stream, all arrive), and no file of the job is left in /dev/shm after
  it, after a stopped receiver is killed, after a sender is killed between writing segments and
  announcing them, and after a sender exits without closing;
- segment names carry the job's id and the sender's rank: a peer naming another job's, another
  rank's or a missing segment, a wrong size, an unset flag, a link or a directory is refused
  ``INVALID_ARGUMENT`` (no exception escapes the server), another ``/dev/shm``
  ``FAILED_PRECONDITION``;
- one stream per source: many idle streams from one fake peer are refused and the real ranks
  still deliver;
- TLS: two ranks all-reduce over mutual TLS; a client without the job's certificate, or with
  another job's, cannot connect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from comm import CommError, InProcessHub, wire_pb2
from comm import grpc_transport as gt
from comm.grpc_transport import (DELIVER, INCARNATION_KEY, SECRET_KEY, SHM_SPACE_KEY, SRC_KEY, GrpcCommunicator,
                                 job_id, make_tls)

needs_shm = pytest.mark.skipif(not gt.SHM_OK, reason="no /dev/shm here")


@pytest.fixture
def secret():
    return f"limits-{secrets.token_hex(8)}"  # a job of its own: concurrent runs share /dev/shm


@contextlib.contextmanager
def world(n: int, secret: str, **kwargs):
    comms = [GrpcCommunicator(r, n, secret, **kwargs) for r in range(n)]
    try:
        for c in comms:
            c.connect([c.address for c in comms])
        threads = [threading.Thread(target=c.barrier) for c in comms]  # the streams are up
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        yield comms
    finally:
        for c in comms:
            c.close()


def until(condition, what: str, seconds: float = 15.0):
    """Wait for ``condition()`` (a state the transport reaches by itself, soon)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def _process_state(pid: int) -> str:
    """A process's state letter in /proc (``T``: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def job_files(secret: str) -> list[str]:
    return sorted(n for n in os.listdir(gt.SHM_DIR) if job_id(secret) in n)


# ---------------------------------------------------------------------------- mailbox bounds
def test_in_process_bounds_per_source_name_the_sender():
    hub = InProcessHub(3, timeout=5.0)
    a, b, c = (hub.communicator(r) for r in range(3))
    b.set_limits(max_messages=2)
    for tag in range(2):
        a.send(np.zeros(2), 1, tag=tag)
        c.send(np.zeros(2), 1, tag=tag)  # per source: rank 2 has room of its own
    b.recv(0, tag=0)  # taking one makes room for one
    a.send(np.zeros(2), 1, tag=2)
    with pytest.raises(CommError, match=r"rank 1: rank 0 sent more than 2 unconsumed messages.*set_limits"):
        a.send(np.zeros(2), 1, tag=3)
    with pytest.raises(CommError, match=r"rank 1: rank 0 sent more than 2"):  # the receiver's mailbox failed
        b.recv(0, tag=3)

    hub = InProcessHub(2, timeout=5.0)
    a, b = hub.communicator(0), hub.communicator(1)
    b.set_limits(max_bytes=1000)
    a.send(np.zeros(100), 1)  # 800 bytes
    with pytest.raises(CommError, match=r"rank 1: rank 0 sent more than 1000 unconsumed bytes \(800 waiting"):
        a.send(np.zeros(30), 1)
    assert hub.bytes_sent == 800  # refused before it was copied
    with pytest.raises(CommError, match="max_messages=0 must be a positive integer"):
        b.set_limits(max_messages=0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", [pytest.param("shm", marks=needs_shm), "stream"])
def test_grpc_refuses_a_stream_past_the_bounds(secret, path):
    with world(2, secret, shared_memory=path == "shm") as (a, b):
        b.set_limits(max_bytes=3 << 20)
        for tag in range(4):  # 1 MiB each, under tags nobody asks for: the fourth is one too many
            a.send(np.ones(1 << 17), 1, tag=100 + tag)
        with pytest.raises(CommError, match=r"rank 1: rank 0 sent more than 3145728 unconsumed bytes"):
            b.recv(0, tag=7)
        with pytest.raises(CommError, match=r"stream to rank 1 .*RESOURCE_EXHAUSTED.*rank 0 sent more than"):
            a.recv(1)
        assert len(b.mailbox.pending()) == 3  # what fitted stays takeable; nothing more was kept
        assert job_files(secret) == []


# ----------------------------------------------------------------------------- shared memory
@needs_shm
@pytest.mark.timeout(30)
def test_a_receiver_that_never_takes_holds_a_bounded_number_of_segments(secret):
    n = 50
    with world(2, secret) as (a, b):
        arrived = b.mailbox.arrivals
        for i in range(n):
            a.send(np.full(1 << 17, float(i)), 1, tag=i)  # 1 MiB each, the shared-memory path
        until(lambda: b.mailbox.arrivals >= arrived + n, "every message arrived")
        assert len(a._peers[1].segments) == gt.SHM_MAX_SEGMENTS  # the other 34 took the stream
        assert len(b._mapped[0]) == gt.SHM_MAX_SEGMENTS
        assert job_files(secret) == []  # the receiver unlinked each name it mapped
        got = [b.recv(0, tag=i) for i in range(n)]
        assert [float(x[0]) for x in got] == list(range(n))
        del got  # every segment is free again: the next messages reuse them, no new ones
        for i in range(n):
            a.send(np.full(1 << 17, -1.0), 1)
            assert b.recv(0)[0] == -1.0
        assert len(a._peers[1].segments) <= gt.SHM_FREE_SEGMENTS
        b.close()  # the peer closes while holding nothing: its sender lets every segment go
        until(lambda: not a._peers[1].segments, "the sender dropped its segments to a closed peer")
    assert job_files(secret) == []


CHILD = textwrap.dedent("""
    import faulthandler, sys, time
    import numpy as np
    faulthandler.dump_traceback_later(20, exit=True)  # a hang here shows where, in the test's output
    from comm import GrpcCommunicator
    c = GrpcCommunicator(1, 2, sys.argv[1])
    print(c.address, flush=True)
    c.connect([sys.stdin.readline().strip(), c.address])
    c.send(np.frombuffer(b"hello", np.uint8), 0)  # its stream to rank 0 is up
    if sys.argv[2] == "sender":  # segments written, headers not sent: what a sender killed mid-post leaves
        for _ in range(3):
            c._segment_for(c._peers[0], 1 << 20)
    print("ready", flush=True)
    faulthandler.cancel_dump_traceback_later()
    if sys.stdin.readline().strip() == "exit":
        sys.exit(0)  # without close(): the interpreter's exit closes it
    time.sleep(60)
""")


@contextlib.contextmanager
def child_rank(secret: str, role: str):
    """Rank 1 in a process of its own, connected to rank 0 (this process): (process, rank 0)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, secret, role], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    a = GrpcCommunicator(0, 2, secret, timeout=30.0)
    try:
        b_address = child.stdout.readline().strip()
        a.connect([a.address, b_address])
        child.stdin.write(a.address + "\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "ready"
        assert a.recv(1).tobytes() == b"hello"
        yield child, a
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
        a.close()


@needs_shm
@pytest.mark.timeout(30)
def test_nothing_is_left_in_dev_shm_when_a_stopped_receiver_is_killed(secret):
    with child_rank(secret, "receiver") as (child, a):
        os.kill(child.pid, signal.SIGSTOP)  # it maps nothing now
        # once it is stopped: a receiver still running would hand back the first segment, which the
        # next message would then reuse (4 segments for 5 messages)
        until(lambda: _process_state(child.pid) == "T", "the receiver stopped")
        for _ in range(5):
            a.send(np.ones(1 << 17), 1)
        # send returns once the message is queued: the sender thread writes the segments after
        until(lambda: len(job_files(secret)) == 5, "the sender wrote a segment per message")
        os.kill(child.pid, signal.SIGKILL)
        with pytest.raises(CommError, match=r"rank 1\b"):
            a.recv(1)
        until(lambda: job_files(secret) == [], "the sender unlinked its segments to the dead peer")


@needs_shm
@pytest.mark.timeout(30)
@pytest.mark.parametrize("end", ["killed", "exits"])
def test_nothing_is_left_in_dev_shm_when_a_sender_dies(secret, end):
    with child_rank(secret, "sender") as (child, a):
        assert len(job_files(secret)) == 3
        if end == "killed":  # it cleans nothing: the receiver unlinks its leftovers when the stream breaks
            os.kill(child.pid, signal.SIGKILL)
            with pytest.raises(CommError, match=r"rank 1\b"):
                a.recv(1)
        else:
            child.stdin.write("exit\n")
            child.stdin.flush()
            assert child.wait(20) == 0
        until(lambda: job_files(secret) == [], f"a {end} sender's segments are gone")


# ----------------------------------------------------------------------------- segment names
def raw_message(shm_name: str, nbytes: int = 16) -> list[bytes]:
    return [wire_pb2.Chunk(has_header=True, src=0, tag=0, dtype="|u1", shape=[nbytes], nbytes=nbytes,
                           shm_name=shm_name).SerializeToString()]


def make_segment(name: str, flag: int = 1, data: bytes = b"\x07" * 16) -> str:
    path = os.path.join(gt.SHM_DIR, name)
    with open(path, "wb") as f:
        f.write(bytes([flag]) + b"\0" * (gt.SHM_DATA_OFFSET - 1) + data)
    return path


@needs_shm
@pytest.mark.timeout(30)
def test_segment_names_carry_the_job_and_rank_and_others_are_refused(secret, caplog):
    job, other_job, incarnation = job_id(secret), job_id(secret + "-other"), "0badcafe"
    with world(2, secret) as (a, b):  # the transport's own names
        a.send(np.ones(1 << 16), 1)
        assert b.recv(0).sum() == 1 << 16
        names = [s.name for s in a._peers[1].segments]
        assert len(names) == 1 and re.fullmatch(rf"fsys_{job}_0_[0-9a-f]{{24}}", names[0]), names

    mine = f"fsys_{job}_0_{incarnation}"  # what the raw client below, speaking for rank 0, may name
    metadata = ((SECRET_KEY, secret), (SRC_KEY, "0"), (INCARNATION_KEY, incarnation))
    outsiders = {  # files that are not the sender's: refused, and left alone
        "another job's": make_segment(f"fsys_{other_job}_0_{incarnation}{'1' * 16}"),
        "another rank's": make_segment(f"fsys_{job}_2_{incarnation}{'2' * 16}"),
        "another incarnation's": make_segment(f"fsys_{job}_0_12345678{'3' * 16}"),
    }
    target = make_segment(f"fsys_{other_job}_target")
    cases = {
        "missing": None,
        "too small": lambda p: make_segment(p, data=b"\x07" * 8),
        "flag not set": lambda p: make_segment(p, flag=0),
        "empty": lambda p: open(p, "wb").close(),
        "a directory": os.mkdir,
        "a link": lambda p: os.symlink(target, p),
    }
    caplog.set_level(logging.ERROR, logger="grpc._server")
    try:
        with contextlib.closing(GrpcCommunicator(1, 3, secret)) as b, grpc.insecure_channel(b.address) as channel:
            call = channel.stream_unary(DELIVER)

            details = []

            def code(chunks, md=metadata):
                with pytest.raises(grpc.RpcError) as err:
                    call(iter(chunks), metadata=md, timeout=10)
                details.append(err.value.details())
                return err.value.code()

            for what, path in outsiders.items():
                assert code(raw_message(os.path.basename(path))) == grpc.StatusCode.INVALID_ARGUMENT, what
                assert os.path.exists(path), what
            for i, (what, make) in enumerate(cases.items()):
                name = f"{mine}{i:016x}"
                if make is not None:
                    make(os.path.join(gt.SHM_DIR, name))
                assert code(raw_message(name)) == grpc.StatusCode.INVALID_ARGUMENT, (what, details[-1])
                if what == "a directory":
                    os.rmdir(os.path.join(gt.SHM_DIR, name))
            with open(target, "rb") as f:
                assert f.read(1) == b"\x01"  # the link's target was never mapped nor written
            elsewhere = metadata + ((SHM_SPACE_KEY, "another host's /dev/shm"),)
            make_segment(f"{mine}{'f' * 16}")
            assert code(raw_message(f"{mine}{'f' * 16}"), elsewhere) == grpc.StatusCode.FAILED_PRECONDITION
            assert not b.mailbox.pending()
            # a well-formed one passes (and its name is unlinked once mapped); then the stream ends
            make_segment(f"{mine}{'e' * 16}")
            goodbye = wire_pb2.Chunk(has_header=True, src=0, goodbye=True).SerializeToString()
            call(iter(raw_message(f"{mine}{'e' * 16}") + [goodbye]), metadata=metadata, timeout=10)
            assert b.recv(0).tobytes() == b"\x07" * 16
            assert not os.path.exists(os.path.join(gt.SHM_DIR, f"{mine}{'e' * 16}"))
    finally:
        for path in [*outsiders.values(), target]:
            os.unlink(path)
    assert job_files(secret) == [] and job_files(secret + "-other") == []
    assert not [r for r in caplog.records if "Exception calling application" in r.getMessage()]


# --------------------------------------------------------------------------------- streams
@contextlib.contextmanager
def idle_streams(address: str, metadata, n: int):
    """``n`` Deliver calls that send nothing until the block ends: their futures."""
    release = threading.Event()

    def nothing():
        release.wait(20)
        return
        yield

    with grpc.insecure_channel(address) as channel:
        call = channel.stream_unary(DELIVER)
        futures = [call.future(nothing(), metadata=metadata) for _ in range(n)]
        try:
            yield futures
        finally:
            release.set()
            for f in futures:
                f.cancel()


@pytest.mark.timeout(30)
def test_idle_streams_from_a_fake_peer_cannot_starve_the_real_ones(secret):
    # a lone receiver: the fake gets one stream for the rank it claims, every other is refused
    b = GrpcCommunicator(1, 3, secret)
    try:
        as_rank_0 = ((SECRET_KEY, secret), (SRC_KEY, "0"))
        with idle_streams(b.address, as_rank_0, 16) as streams:
            until(lambda: sum(f.done() for f in streams) == 15, "15 of 16 streams refused")
            codes = {f.exception().code() for f in streams if f.done()}
            assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert "already has a stream open" in next(f for f in streams if f.done()).exception().details()
            d, c = GrpcCommunicator(0, 3, secret), GrpcCommunicator(2, 3, secret)  # real ranks still get threads
            try:
                c.connect([d.address, b.address, c.address])
                c.send(np.arange(3.0), 1)
                np.testing.assert_array_equal(b.recv(2), np.arange(3.0))
            finally:
                c.close()
                d.close()
    finally:
        b.close()

    # a full world: the fake, claiming each rank, is refused every time; the ranks still all-reduce
    with world(3, secret) as comms:
        claims = [((SECRET_KEY, secret), (SRC_KEY, str(r))) for r in (0, 2)]
        with idle_streams(comms[1].address, claims[0], 12) as s0, idle_streams(comms[1].address, claims[1], 12) as s2:
            until(lambda: all(f.done() for f in s0 + s2), "every fake stream refused")
            assert {f.exception().code() for f in s0 + s2} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            out = [None] * 3
            threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, comms[r].all_reduce(np.full(4, r + 1.0))))
                       for r in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            assert [o.tolist() for o in out] == [[6.0] * 4] * 3


# ------------------------------------------------------------------------------------- TLS
@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", [pytest.param("shm", marks=needs_shm), "stream"])
def test_tls_all_reduce_and_strangers_cannot_connect(secret, path):
    tls = make_tls()
    with world(2, secret, tls=tls, shared_memory=path == "shm") as (a, b):
        x = np.arange(40_000, dtype=np.float64)  # 320 KB: the shared-memory path when there is one
        out = [None, None]
        threads = [threading.Thread(target=lambda c=c: out.__setitem__(c.rank, c.all_reduce(x * (c.rank + 1))))
                   for c in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        np.testing.assert_array_equal(out[0], x * 3)
        np.testing.assert_array_equal(out[1], x * 3)

        as_rank_0 = ((SECRET_KEY, secret), (SRC_KEY, "0"))
        other, name = make_tls(), [("grpc.ssl_target_name_override", gt.TLS_SERVER_NAME)]
        strangers = {
            "plain text": grpc.insecure_channel(b.address),
            "trusts another job's": grpc.secure_channel(b.address, other.channel_credentials(), options=name),
            "trusts the job's certificate, has no key": grpc.secure_channel(
                b.address, grpc.ssl_channel_credentials(root_certificates=tls.cert_pem), options=name),
        }
        arrived = b.mailbox.arrivals
        for what, channel in strangers.items():
            with channel, pytest.raises(grpc.RpcError) as err:
                channel.stream_unary(DELIVER)(iter([]), metadata=as_rank_0, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what
        assert b.mailbox.arrivals == arrived

    # a rank with another job's certificate cannot reach one with this job's
    c, d = GrpcCommunicator(0, 2, secret, tls=tls), GrpcCommunicator(1, 2, secret, tls=make_tls())
    try:
        d.connect([c.address, d.address])
        with pytest.raises(CommError, match=r"stream to rank 0 .*UNAVAILABLE"):
            d.recv(0)
    finally:
        c.close()
        d.close()
    assert repr(tls).count("key_pem") == 0  # the key stays out of logs

"""The gRPC transport: one rank per process, on one host or many.

Every rank runs a gRPC server (service ``flowsys.comm.Transport``, one client-streaming method
``Deliver(stream Chunk) returns (Ack)``, see ``comm/wire.proto``). :meth:`~GrpcCommunicator.connect`
opens one channel to every peer and on it one ``Deliver`` call that lives as long as the
communicator: ``post`` copies the array into serialized chunks and queues them, gRPC's thread
streams them, so messages to a peer arrive in the order they were posted and cost no call set-up
(a call per message costs several times the CPU and the latency). A message travels one of two
ways:

- **over the stream** (the cross-host path): a header chunk (source, tag, dtype, shape, byte
  count), then the raw bytes in C order, ``chunk_bytes`` per chunk, well below gRPC's message
  limit, so tensors of any size pass. The receiver assembles them into one preallocated buffer.
- **through shared memory** (the same-host path, taken when the peer's address has our host):
  ``post`` copies the array into a file of the sender's in ``/dev/shm`` and the stream carries
  only a header naming it. The receiver maps the file (and unlinks its name: from then on the
  memory lives exactly as long as the two mappings) and hands out an array over it without
  copying; the file's first byte stays 1 until that array is garbage, and only then does the
  sender write the file again. Reusing mapped files matters as much as not copying: writing into
  fresh shared memory runs at a sixth of the speed of writing into mapped pages. A received
  array therefore lives in ``/dev/shm`` until it is dropped. A sender keeps at most
  :data:`SHM_MAX_SEGMENTS` segments per peer (in use and free together); when they are all in
  use (the peer holds on to what it received) or ``/dev/shm`` is full, a message takes the
  stream. A segment's name is ``fsys_<job>_<rank>_<random>``: the job's id (the first 12 hex
  digits of sha256 of the secret), the sending rank, then 8 hex digits fixed per communicator
  (its incarnation, sent in the stream's metadata) and 16 random ones. A receiver maps only names
  of its job, the stream's rank and incarnation, so a peer can name no segment but its own; a
  missing, foreign, wrongly sized or unflagged segment is refused ``INVALID_ARGUMENT``. A sender
  whose ``/dev/shm`` is another one (the stream's metadata names the boot id and device of the
  sender's: two "hosts" that only share a name) is refused ``FAILED_PRECONDITION``, and the
  sender's :class:`CommError` says what to change. Names are unlinked by the receiver when it
  maps them, by the sender when its stream to the peer ends (the peer left, died or refused it)
  and when it closes (also at interpreter exit), and by the receiver, for the sender's
  incarnation, when the sender's stream breaks (a killed sender runs no clean-up of its own;
  one killed before its stream reached the peer leaves what it wrote).

Every call carries the job's secret (``flowsys-secret``) and the sender's rank (``flowsys-src``)
in its metadata; the server refuses a call without the secret (``UNAUTHENTICATED``) and a
malformed message (``INVALID_ARGUMENT``) before anything reaches the mailbox, and keeps serving.
Each source rank has at most one stream open to a rank: a second one while the first is open is
refused ``RESOURCE_EXHAUSTED`` (the first stays: a live peer's stream cannot be taken over), so
idle streams hold at most one of the server's ``world_size + 4`` threads per source and the rest
serve refusals. What waits unconsumed in the mailbox is bounded per source
(:meth:`Communicator.set_limits`): a message beyond the bounds fails the mailbox with a
:class:`CommError` naming the sender and refuses its stream ``RESOURCE_EXHAUSTED``, before the
message's memory is allocated. A rank that closes ends its streams, so its peers know it left; a
stream that breaks otherwise (a peer died, the network failed), or a send to a peer that is gone,
fails this rank's mailbox with a :class:`CommError` naming the peer, so a waiting ``recv``
raises at once instead of after the timeout. Nothing is pickled: arrays travel as dtype, shape
and bytes.

**TLS** (``tls=``:class:`TlsConfig`, made once per job by :func:`make_tls`): every rank serves
with the job's self-signed certificate and key, requires the same certificate from its clients
(mutual TLS) and trusts it as the only root, so only holders of the job's key can connect or
listen, and the secret and the tensors are encrypted on the wire. The certificate names
:data:`TLS_SERVER_NAME`, which every channel checks in place of the address (IP addresses need no
certificate of their own). The threat model: the key reaches the workers the way the secret
does, as arguments of Ray calls, so TLS protects the data plane from the network exactly when
Ray's own channel is protected (Ray's TLS, or token authentication on a private network);
shared memory never leaves the host, and its files are readable by their owner only.

>>> import threading, numpy as np
>>> tls = make_tls()  # optional: the job's certificate, on every rank
>>> ranks = [GrpcCommunicator(r, 2, secret="s3cret", tls=tls) for r in range(2)]
>>> for c in ranks: c.connect([r.address for r in ranks])
>>> out = [None, None]
>>> def run(r): out[r] = ranks[r].all_reduce(np.full(3, r + 1.0))
>>> threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
>>> for t in threads: t.start()
>>> for t in threads: t.join()
>>> out[0].tolist(), out[1].tolist()
([3.0, 3.0, 3.0], [3.0, 3.0, 3.0])
>>> for c in ranks: c.close()
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import hmac
import math
import mmap
import os
import queue
import re
import secrets
import socket
import stat
import threading
import time
import weakref
from concurrent import futures

import grpc
import ml_dtypes
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from comm import wire_pb2
from comm.base import CommError, Communicator

SERVICE = "flowsys.comm.Transport"
DELIVER = f"/{SERVICE}/Deliver"
SECRET_KEY = "flowsys-secret"
SRC_KEY = "flowsys-src"
INCARNATION_KEY = "flowsys-incarnation"  # the 8 hex digits after the rank in the sender's segment names
SHM_SPACE_KEY = "flowsys-shm-space"  # which /dev/shm the sender writes its segments to
TLS_SERVER_NAME = "flowsys-transport"  # the name in a job's certificate, checked instead of the address
DTYPE_KINDS = "biufc"  # bool, signed, unsigned, float, complex: plain bytes, nothing to unpickle
# ml_dtypes' types are plain bytes too, but their kind is "V" and their code ("<V2") names raw
# bytes: they travel by name.
NAMED_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16)}

SHM_DIR = "/dev/shm"
SHM_OK = os.path.isdir(SHM_DIR) and hasattr(os, "posix_fallocate")  # Linux
SHM_MIN_BYTES = 64 << 10  # smaller messages ride inline in the header chunk even on one host
SHM_FREE_SEGMENTS = 4  # free segments a sender keeps per peer for reuse
SHM_MAX_SEGMENTS = 16  # segments (in use and free) a sender keeps per peer; beyond, messages take the stream
SHM_DATA_OFFSET = 64  # a segment: byte 0 = 1 while the receiver holds the message; the bytes from 64 on
_INCARNATION = re.compile(r"[0-9a-f]{8}")
_SHM_TAIL = re.compile(r"[0-9a-f]{16}")  # a segment name's random end, after the sender's prefix
_DATA_FIELD = 8  # ``Chunk.data``'s field number in wire.proto
# Keepalive pings notice a peer host that vanished while its stream was idle (no TCP reset).
_CLIENT_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 10_000),
                   ("grpc.http2.max_pings_without_data", 0)]
_SERVER_OPTIONS = [("grpc.http2.min_ping_interval_without_data_ms", 5_000), ("grpc.so_reuseport", 0)]
# how a server refuses a stream it read (see _serve_deliver); anything else means the peer is gone
_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.RESOURCE_EXHAUSTED)


class _Malformed(ValueError):
    """A message the server refuses with ``INVALID_ARGUMENT``."""


class _Elsewhere(Exception):
    """A shared-memory message from a sender whose ``/dev/shm`` is not ours: ``FAILED_PRECONDITION``."""


def job_id(secret: str) -> str:
    """The job's id in shared-memory names: the first 12 hex digits of sha256(secret).

    >>> job_id("s3cret")
    '1ec1c26b50d5'
    """
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def _shm_space() -> str:
    """Which ``/dev/shm`` this process writes to: the kernel's boot id and the file system's
    device, so two hosts, or two containers with a ``/dev/shm`` each, differ."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        device = os.stat(SHM_DIR).st_dev
    except OSError:
        device = 0
    return f"{boot}/{device}"


SHM_SPACE = _shm_space()


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """A job's TLS certificate and private key (PEM), made by :func:`make_tls`: every rank serves
    with them, presents them as a client and trusts nothing else."""

    cert_pem: bytes = dataclasses.field(repr=False)
    key_pem: bytes = dataclasses.field(repr=False)  # out of logs and error messages
    server_name: str = TLS_SERVER_NAME

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.cert_pem,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.cert_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)


def make_tls(server_name: str = TLS_SERVER_NAME, days: int = 3650) -> TlsConfig:
    """A new self-signed certificate and key for one job (ECDSA P-256), valid for ``server_name``,
    for server and client authentication. The driver makes one and hands it to every rank.

    >>> tls = make_tls()
    >>> tls.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----"), tls.server_name
    (True, 'flowsys-transport')
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))  # ranks whose clocks run a little behind
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return TlsConfig(cert.public_bytes(serialization.Encoding.PEM), key_pem, server_name)


class _Segment:
    """A file in ``/dev/shm`` that one rank writes its messages to one peer into, mapped."""

    __slots__ = ("name", "mm", "capacity")

    def __init__(self, capacity: int, prefix: str):
        self.name = prefix + secrets.token_hex(8)
        path = os.path.join(SHM_DIR, self.name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, SHM_DATA_OFFSET + capacity)  # a full /dev/shm: ENOSPC now, not SIGBUS later
            self.mm = mmap.mmap(fd, SHM_DATA_OFFSET + capacity)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.capacity = capacity

    def in_use(self) -> bool:
        return self.mm[0] != 0

    def unlink(self) -> None:
        """Remove the name if the receiver has not (a message that never reached it)."""
        _unlink(self.name)


class _Peer:
    """What this rank holds per peer: the channel and the stream on it, the send queue, the
    segments."""

    def __init__(self, rank: int, address: str, channel: grpc.Channel, use_shm: bool):
        self.rank = rank
        self.address = address
        self.channel = channel
        self.use_shm = use_shm
        self.queue: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()  # messages' chunks; None ends
        self.segments: list[_Segment] = []
        self.creating = 0  # segments being made outside the lock: they count against SHM_MAX_SEGMENTS
        self.dropped: list[str] = []  # segments let go since the last header: the peer unmaps them
        self.lock = threading.Lock()  # also orders the queue: a name is never announced before a drop
        self.stream: grpc.Future | None = None
        self.left = False  # the peer ended its stream to us: it is closing
        self.error: str | None = None  # why our stream to it is gone; a send then fails


class GrpcCommunicator(Communicator):
    """One rank's end of the gRPC transport. Start one per rank, gather every rank's
    :attr:`address` in rank order and hand the list to every rank's :meth:`connect`.

    ``secret`` is the job's shared secret; ``port=0`` picks a free port; ``timeout`` bounds a
    ``recv``; ``chunk_bytes`` is the stream path's chunk size; ``shared_memory=False`` sends
    everything over the stream, even to ranks on this host; ``tls`` (the job's
    :func:`make_tls`, the same for every rank) makes every channel mutual TLS.
    """

    def __init__(self, rank: int, world_size: int, secret: str, host: str = "127.0.0.1", port: int = 0,
                 timeout: float = 60.0, chunk_bytes: int = 1 << 20, shared_memory: bool = True,
                 tls: TlsConfig | None = None):
        super().__init__(rank, world_size, timeout)
        if not 0 <= rank < world_size:
            raise CommError(f"rank {rank} is not a rank of a world of {world_size}")
        if not secret:
            raise CommError("GrpcCommunicator needs a non-empty secret shared by the job's ranks")
        if not 1 <= chunk_bytes <= 3 << 20:
            raise CommError(f"chunk_bytes={chunk_bytes} must lie in 1..3 MiB (gRPC's message limit is 4 MiB)")
        self.host = host
        self.chunk_bytes = chunk_bytes
        self.shared_memory = shared_memory and SHM_OK
        self._secret = secret.encode()
        self.tls = tls
        self.job_id = job_id(secret)
        self.shm_space = SHM_SPACE
        self._incarnation = secrets.token_hex(4)
        self._shm_prefix = f"fsys_{self.job_id}_{rank}_{self._incarnation}"  # our segments' names start so
        self._limits = [("grpc.max_send_message_length", chunk_bytes + (64 << 10)),
                        ("grpc.max_receive_message_length", chunk_bytes + (64 << 10))]
        self._peers: dict[int, _Peer] = {}
        self._mapped: dict[int, dict[str, mmap.mmap]] = {}  # per peer, its segments this rank has mapped, by name
        self._mapped_lock = threading.Lock()
        self._closed = False
        self._close_lock = threading.Lock()
        self._incoming: set[int] = set()  # the ranks with a stream open to us: one each at most
        self._incoming_done = threading.Condition()

        # every peer's stream holds a worker for the communicator's life, one stream per source at
        # most; the spare ones serve the calls refused at once (wrong secret, a second stream)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=world_size + 4,
                                                              thread_name_prefix=f"comm-rank{rank}-recv"),
                                   options=self._limits + _SERVER_OPTIONS)
        handler = grpc.stream_unary_rpc_method_handler(self._serve_deliver, request_deserializer=None,
                                                       response_serializer=wire_pb2.Ack.SerializeToString)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Deliver": handler}),))
        try:
            if tls is None:
                self.port = self._server.add_insecure_port(_join_host_port(host, port))
            else:
                self.port = self._server.add_secure_port(_join_host_port(host, port), tls.server_credentials())
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise CommError(f"rank {rank}: cannot listen on {_join_host_port(host, port)} (port in use?)")
        self._server.start()
        # The server's pool threads serve the peers' long-lived streams and are joined when the
        # interpreter exits: close first, or a process that never called close() would hang there.
        _close_at_exit(self)
        self.address = _join_host_port(host, self.port)

    # ------------------------------------------------------------------------------ sending
    def connect(self, addresses: list[str]) -> None:
        """Open a channel and a stream to every other rank; ``addresses[r]`` is rank r's
        :attr:`address`."""
        if len(addresses) != self.world_size:
            raise CommError(f"rank {self.rank}: connect() got {len(addresses)} addresses for a world of "
                            f"{self.world_size}; pass every rank's address in rank order")
        if self._peers:
            raise CommError(f"rank {self.rank} is already connected")
        metadata = ((SECRET_KEY, self._secret.decode()), (SRC_KEY, str(self.rank)),
                    (INCARNATION_KEY, self._incarnation), (SHM_SPACE_KEY, self.shm_space))
        for r, address in enumerate(addresses):
            if r != self.rank:
                if self.tls is None:
                    channel = grpc.insecure_channel(address, options=self._limits + _CLIENT_OPTIONS)
                else:
                    channel = grpc.secure_channel(address, self.tls.channel_credentials(),
                                                  options=self._limits + _CLIENT_OPTIONS
                                                  + [("grpc.ssl_target_name_override", self.tls.server_name)])
                use_shm = self.shared_memory and _split_host(address) == self.host
                self._peers[r] = _Peer(r, address, channel, use_shm)
        for peer in self._peers.values():
            deliver = peer.channel.stream_unary(DELIVER, request_serializer=None,
                                                response_deserializer=wire_pb2.Ack.FromString)
            peer.stream = deliver.future(_outgoing(peer.queue), metadata=metadata)
            peer.stream.add_done_callback(functools.partial(self._stream_ended, peer))

    def post(self, array: np.ndarray, dst: int, tag: int = 0) -> None:
        peer = self._peers.get(dst)
        if peer is None:
            raise CommError(f"rank {self.rank}: no channel to rank {dst} (call connect() with every rank's "
                            f"address first; ranks are 0..{self.world_size - 1})")
        if self._closed:
            raise CommError(f"rank {self.rank}: the communicator is closed")
        array = np.asarray(array)
        if not _carried(array.dtype):
            raise CommError(f"rank {self.rank}: cannot send dtype {array.dtype} to rank {dst}; "
                            f"the transport carries bool, integer, float (bfloat16 too) and complex arrays")
        if peer.error is not None or peer.left:
            error = CommError(peer.error or f"rank {self.rank}: cannot send to rank {dst}, which has closed")
            self.mailbox.fail(error)
            raise error
        header = wire_pb2.Chunk(has_header=True, src=self.rank, tag=tag, dtype=_dtype_text(array.dtype),
                                shape=array.shape, nbytes=array.nbytes)
        segment = self._segment_for(peer, array.nbytes) if peer.use_shm and array.nbytes >= SHM_MIN_BYTES else None
        if segment is not None:
            np.ndarray(array.shape, array.dtype, buffer=segment.mm, offset=SHM_DATA_OFFSET)[...] = array
            header.shm_name = segment.name
            chunks = [b""]
        else:  # serializing the chunks is the copy post promises, and the only one made here
            flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            chunks = list(_data_chunks(memoryview(flat), self.chunk_bytes)) or [b""]
        with peer.lock:  # the drops go out before any header that could name a segment made after them
            header.shm_dropped.extend(peer.dropped)
            peer.dropped.clear()
            chunks[0] = header.SerializeToString() + chunks[0]  # two serialized Chunks concatenated parse as one
            peer.queue.put(chunks)

    def _segment_for(self, peer: _Peer, nbytes: int) -> _Segment | None:
        """The smallest free segment that holds ``nbytes``, or a new one; marked in use. None when
        the peer holds :data:`SHM_MAX_SEGMENTS` of them already or ``/dev/shm`` has no room (the
        message then takes the stream)."""
        with peer.lock:  # several threads may post to one peer
            free = [s for s in peer.segments if not s.in_use()]
            fits = [s for s in free if s.capacity >= nbytes]
            if fits:
                segment = min(fits, key=lambda s: s.capacity)
                segment.mm[0] = 1
                free.remove(segment)  # and keep at most SHM_FREE_SEGMENTS - 1 others free, the largest
                self._drop(peer, sorted(free, key=lambda s: s.capacity)[:max(0, len(free) + 1 - SHM_FREE_SEGMENTS)])
                return segment
            # about to add one: keep at most SHM_FREE_SEGMENTS free ones, the largest, and stay under the cap
            held = len(peer.segments) + peer.creating
            excess = max(0, len(free) + 1 - SHM_FREE_SEGMENTS, held + 1 - SHM_MAX_SEGMENTS)
            self._drop(peer, sorted(free, key=lambda s: s.capacity)[:excess])
            if len(peer.segments) + peer.creating >= SHM_MAX_SEGMENTS:
                return None  # the peer holds on to every one: this message takes the stream
            peer.creating += 1
        try:
            segment = _Segment(nbytes, self._shm_prefix)
        except OSError:
            segment = None
        with peer.lock:
            peer.creating -= 1
            if segment is not None:
                segment.mm[0] = 1
                peer.segments.append(segment)
        return segment

    @staticmethod
    def _drop(peer: _Peer, segments: list[_Segment]) -> None:
        """Let free ``segments`` go (``peer.lock`` held): the next header tells the peer to unmap them."""
        for s in segments:
            peer.segments.remove(s)
            peer.dropped.append(s.name)
            s.unlink()

    def _stream_ended(self, peer: _Peer, stream: grpc.Future) -> None:
        """Our stream to ``peer`` is over (called on a gRPC thread): the segments it has not
        mapped never will be. Unless we are closing or the peer said it was, that is a failure:
        messages may be lost."""
        peer.queue.put(None)  # lets gRPC's thread out of _outgoing
        with peer.lock:
            segments, peer.segments = peer.segments, []
        for segment in segments:
            segment.unlink()
        if self._closed:
            return
        error = None if stream.cancelled() else stream.exception()
        why = "cancelled" if stream.cancelled() else f"{error.code().name}: {error.details()}" if error else "it ended"
        peer.error = f"rank {self.rank}: the stream to rank {peer.rank} at {peer.address} is gone ({why})"
        if not peer.left:
            refused = error is not None and error.code() in _REFUSALS  # the peer said why: no need to guess
            self.mailbox.fail(CommError(peer.error if refused else f"{peer.error}; is rank {peer.rank} alive?"))

    # ---------------------------------------------------------------------------- receiving
    def _serve_deliver(self, chunks, context: grpc.ServicerContext) -> wire_pb2.Ack:
        metadata = dict(context.invocation_metadata())
        if not hmac.compare_digest(metadata.get(SECRET_KEY, "").encode(), self._secret):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"rank {self.rank}: wrong or missing {SECRET_KEY}")
        src = _parse_src(metadata.get(SRC_KEY, ""))
        if src is None or not 0 <= src < self.world_size or src == self.rank:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"rank {self.rank}: {SRC_KEY}={metadata.get(SRC_KEY)!r} is not another rank of a world "
                          f"of {self.world_size}")
        with self._incoming_done:
            taken = src in self._incoming
            self._incoming.add(src)
        if taken:  # the first stays: a second one would only hold a thread (or take over a live peer's)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"rank {self.rank}: rank {src} already has a stream open to this rank, and a rank opens "
                          f"one per peer; this one is refused")
        incarnation = metadata.get(INCARNATION_KEY)
        stream = _Incoming(src, f"fsys_{self.job_id}_{src}_{incarnation}"
                           if incarnation is not None and _INCARNATION.fullmatch(incarnation) else None,
                           metadata.get(SHM_SPACE_KEY, self.shm_space))
        chunks = iter(chunks)
        goodbye, said_goodbye = _goodbye(src), False
        try:
            while (first := next(chunks, None)) is not None:
                if first == goodbye:
                    said_goodbye = True
                    continue
                self.mailbox.put(src, *self._receive(stream, first, chunks))  # no reference kept here
        except _Malformed as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rank {self.rank}, from rank {src}: {e}")
        except _Elsewhere as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"rank {self.rank} cannot open rank {src}'s shared memory ({e}); ranks on different "
                          f"hosts need different host names, or pass shared_memory=False")
        except (MemoryError, CommError) as e:  # CommError: over the mailbox's bounds, which it now reports
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"rank {self.rank}, from rank {src}: {e}")
        except grpc.RpcError:  # the stream broke: the sender died, or this server is stopping
            if not self._closed:
                self.mailbox.fail(CommError(f"rank {self.rank}: the stream from rank {src} broke; "
                                            f"is rank {src} alive?"))
            return wire_pb2.Ack()
        finally:
            self._forget(stream)
            with self._incoming_done:
                self._incoming.discard(src)
                self._incoming_done.notify_all()
        if not said_goodbye:  # the stream ended without the sender closing: it died
            if not self._closed:
                self.mailbox.fail(CommError(f"rank {self.rank}: the stream from rank {src} ended without a "
                                            f"goodbye; is rank {src} alive?"))
            return wire_pb2.Ack()
        if (peer := self._peers.get(src)) is not None:  # the sender ended its stream: it is closing
            peer.left = True
            peer.queue.put(None)  # so end ours to it, after what is queued: its server can stop quietly
        return wire_pb2.Ack()

    def _forget(self, stream: _Incoming) -> None:
        """The stream from ``stream.src`` is over: drop our mappings of its segments (arrays keep
        theirs) and unlink what it left in ``/dev/shm`` unmapped (a killed sender cleans nothing)."""
        with self._mapped_lock:
            self._mapped.pop(stream.src, None)
        if stream.prefix is not None and stream.space == self.shm_space:
            for name in _shm_names(stream.prefix):
                _unlink(name)

    def _receive(self, stream: _Incoming, first: bytes, chunks) -> tuple[int, np.ndarray]:
        """The message that starts with chunk ``first``, checked and put together: (tag, array)."""
        src = stream.src
        head = _parse(first)
        if not head.has_header:
            raise _Malformed("a message starts without a header")
        if head.src != src:
            raise _Malformed(f"the header names source rank {head.src}")
        dtype = _parse_dtype(head.dtype)
        shape = tuple(head.shape)
        if any(d < 0 for d in shape):
            raise _Malformed(f"negative dimension in shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if head.nbytes != nbytes:
            raise _Malformed(f"header says {head.nbytes} bytes, but shape {shape} of {dtype} holds {nbytes}")
        if head.shm_dropped:  # the sender let these go: drop our mappings (arrays keep theirs)
            with self._mapped_lock:
                mapped = self._mapped.get(src, {})
                for gone in head.shm_dropped:
                    mapped.pop(gone, None)
        self.mailbox.admit(src, nbytes)  # before the memory is taken: a CommError past the bounds
        if head.shm_name:
            if head.data:
                raise _Malformed("a shared-memory message carries bytes in the stream too")
            out = self._from_segment(stream, head.shm_name, nbytes)
        else:
            try:
                out = np.empty(nbytes, np.uint8)
            except (MemoryError, ValueError):  # ValueError: more than numpy can index
                raise MemoryError(f"no room for a message of {nbytes} bytes") from None
            view, filled, piece = memoryview(out), 0, head.data
            while True:
                if filled + len(piece) > nbytes:
                    raise _Malformed(f"more than the {nbytes} bytes the header announced")
                view[filled:filled + len(piece)] = piece
                filled += len(piece)
                if filled == nbytes:
                    break
                raw = next(chunks, None)
                if raw is None:
                    raise _Malformed(f"the stream ended after {filled} of the {nbytes} bytes the header announced")
                piece = _data_of(raw)
        return head.tag, out.view(dtype).reshape(shape)

    def _from_segment(self, stream: _Incoming, name: str, nbytes: int) -> np.ndarray:
        """The message's bytes in the sender's segment, as an array over our mapping of it (no
        copy). The segment's flag goes back to 0, letting the sender reuse it, when that array and
        every view of it are garbage."""
        if stream.space != self.shm_space:
            raise _Elsewhere(f"its /dev/shm is {stream.space}, this rank's {self.shm_space}")
        prefix = stream.prefix
        if prefix is None or not (name.startswith(prefix) and _SHM_TAIL.fullmatch(name[len(prefix):])):
            raise _Malformed(f"{name!r} is not a shared-memory segment of rank {stream.src} in this job "
                             f"(fsys_{self.job_id}_{stream.src}_<the {INCARNATION_KEY} of its stream><16 hex>)")
        with self._mapped_lock:
            mapped = self._mapped.setdefault(stream.src, {})
            mm, held = mapped.get(name), len(mapped)
        if mm is None:
            if held >= SHM_MAX_SEGMENTS:
                raise _Malformed(f"a segment more than the {SHM_MAX_SEGMENTS} a sender keeps per peer")
            mm = _map_segment(name)
            with self._mapped_lock:
                mapped[name] = mm
        if len(mm) < SHM_DATA_OFFSET + nbytes or mm[0] != 1:
            raise _Malformed(f"segment {name} ({len(mm)} bytes, flag {mm[0]}) does not hold a message "
                             f"of {nbytes} bytes")
        out = np.frombuffer(mm, np.uint8, count=nbytes, offset=SHM_DATA_OFFSET)
        weakref.finalize(out, _let_go, mm).atexit = False
        return out

    # ------------------------------------------------------------------------------ closing
    def close(self) -> None:
        """End the streams after what is queued and wait (at most ``min(timeout, 10)`` s) until
        every peer has taken it all and, told so, ended its stream to us; then close the channels
        and the server and free the shared memory. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        for peer in self._peers.values():
            peer.queue.put([_goodbye(self.rank)])  # a stream that ends without this means its sender died
            peer.queue.put(None)
        deadline = time.monotonic() + min(self.timeout, 10.0)
        told = set()  # the peers that took everything and know we are leaving
        for r, peer in self._peers.items():
            try:
                peer.stream.result(timeout=max(0.0, deadline - time.monotonic()))
                told.add(r)
            except (grpc.RpcError, grpc.FutureTimeoutError, grpc.FutureCancelledError):
                pass  # the peer is gone or stuck: what it has not taken is lost
        with self._incoming_done:
            self._incoming_done.wait_for(lambda: not self._incoming & told, max(0.0, deadline - time.monotonic()))
        for peer in self._peers.values():
            peer.channel.close()
            with peer.lock:
                segments, peer.segments = peer.segments, []
            for segment in segments:
                segment.unlink()
        for name in _shm_names(self._shm_prefix):  # one a post made while we closed
            _unlink(name)
        self._server.stop(grace=1.0).wait()  # nothing left to cancel, normally: quick
        with self._mapped_lock:
            self._mapped.clear()  # arrays still alive keep their mapping


# ------------------------------------------------------------------------------------ helpers
@dataclasses.dataclass(frozen=True)
class _Incoming:
    """What the server knows of one stream from its metadata."""

    src: int
    prefix: str | None  # the names of the sender's segments start so; None: it declared no incarnation
    space: str  # the sender's /dev/shm (ours when it did not say)


def _map_segment(name: str) -> mmap.mmap:
    """Map a peer's segment ``name`` (already checked to be one of its names) and unlink it: both
    ends have it mapped, so nothing is left behind if either dies. A name that is missing, not a
    plain file or not mappable is the peer's error: :class:`_Malformed`."""
    path = os.path.join(SHM_DIR, name)
    try:  # O_NOFOLLOW: a link planted under the name cannot make us write elsewhere
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _Malformed(f"cannot open segment {name}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Malformed(f"segment {name} is not a plain file")
        mm = mmap.mmap(fd, 0)
    except (OSError, ValueError) as e:  # ValueError: an empty file
        raise _Malformed(f"cannot map segment {name}: {e}") from None
    finally:
        os.close(fd)
    _unlink(name)
    return mm


def _shm_names(prefix: str) -> list[str]:
    try:
        return [e.name for e in os.scandir(SHM_DIR) if e.name.startswith(prefix)]
    except OSError:
        return []


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except OSError:  # gone already; or not a file, which no flowsys rank made
        pass


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_host(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


@functools.lru_cache(maxsize=None)
def _goodbye(src: int) -> bytes:
    """The chunk rank ``src`` sends last on each stream when it closes."""
    return wire_pb2.Chunk(has_header=True, src=src, goodbye=True).SerializeToString()


def _outgoing(messages: queue.SimpleQueue):
    """A stream's requests: the chunks of each queued message, until a None."""
    while (chunks := messages.get()) is not None:
        yield from chunks


def _data_chunks(payload: memoryview, step: int):
    """``Chunk(data=piece).SerializeToString()`` for each ``step`` bytes of ``payload``, each piece
    copied once (through protobuf it would be copied three times): the field's key (number, wire
    type 2 = length-delimited), the length as a varint, the bytes. ``tests/test_grpc.py`` checks
    this against protobuf's encoding."""
    for start in range(0, len(payload), step):
        piece = payload[start:start + step]
        n, key = len(piece), bytearray([_DATA_FIELD << 3 | 2])
        while n >= 0x80:
            key.append(n & 0x7F | 0x80)
            n >>= 7
        key.append(n)
        yield b"".join((key, piece))


def _data_of(raw: bytes) -> memoryview | bytes:
    """The bytes of a chunk after a message's first. A chunk that holds the data field alone, as
    :func:`_data_chunks` writes it, is read in place; anything else goes through protobuf."""
    if raw[:1] == bytes([_DATA_FIELD << 3 | 2]):
        n = shift = 0
        for i in range(1, min(len(raw), 11)):
            n |= (raw[i] & 0x7F) << shift
            shift += 7
            if raw[i] < 0x80:
                if i + 1 + n == len(raw):
                    return memoryview(raw)[i + 1:]
                break
    chunk = _parse(raw)
    if chunk.has_header:
        raise _Malformed("a header inside a message's bytes")
    return chunk.data


def _parse(raw: bytes) -> wire_pb2.Chunk:
    try:
        return wire_pb2.Chunk.FromString(raw)
    except Exception as e:  # protobuf's DecodeError, whichever implementation raised it
        raise _Malformed(f"not a Chunk: {e}") from None


def _parse_src(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _carried(dtype: np.dtype) -> bool:
    return dtype.kind in DTYPE_KINDS or any(dtype == d for d in NAMED_DTYPES.values())


def _dtype_text(dtype: np.dtype) -> str:
    return dtype.name if dtype.name in NAMED_DTYPES else dtype.str


def _parse_dtype(text: str) -> np.dtype:
    try:
        dtype = NAMED_DTYPES[text] if text in NAMED_DTYPES else np.dtype(text)
    except (TypeError, ValueError, SyntaxError):
        raise _Malformed(f"unknown dtype {text!r}") from None
    if not _carried(dtype) or dtype.fields is not None or dtype.subdtype is not None:
        raise _Malformed(f"dtype {text!r} is not a plain bool, integer, float or complex type")
    return dtype


def _let_go(mm: mmap.mmap) -> None:
    mm[0] = 0  # the receiver's array is gone: the sender may write this segment again


def _close_at_exit(comm: GrpcCommunicator) -> None:
    ref = weakref.ref(comm)

    def close() -> None:
        alive = ref()
        if alive is not None:
            alive.close()

    try:  # runs before the interpreter joins the thread pools' threads (atexit would run after)
        threading._register_atexit(close)
    except (AttributeError, RuntimeError):  # no such hook, or the interpreter is already exiting
        pass

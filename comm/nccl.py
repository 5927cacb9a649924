"""The NCCL transport: one rank per CUDA device, through CuPy's ``cupy.cuda.nccl``.

CuPy is optional (``pip install flowsys[cuda]`` installs ``cupy-cuda12x``, ``flowsys[cuda13]``
``cupy-cuda13x``): this module imports it only when a communicator is built, so
``import comm.nccl`` works everywhere, and
:func:`available` / :func:`why_unavailable` say whether it can run here.

The driver draws one id with :func:`nccl_unique_id` (128 bytes, nothing to pickle) and hands it
to every rank; each rank builds ``NcclCommunicator(rank, world_size, unique_id)`` on its own
device (NCCL wants a distinct device per rank of a communicator). :func:`run_ranks` does all of
that with one spawned process per GPU:

>>> from comm.nccl import run_ranks
>>> def total(comm):
...     return comm.all_reduce(comm.xp.full(3, comm.rank + 1.0)).get()
>>> run_ranks(total, world_size=2)  # doctest: +SKIP
[array([3., 3., 3.]), array([3., 3., 3.])]

How the base class's interface maps onto NCCL:

- **Collectives** are NCCL's own (``allReduce``, ``allGather``, ``reduceScatter``, ``broadcast``;
  ``all_to_all`` is one group of ``send``/``recv``), with the axis semantics of
  :class:`comm.base.Communicator`: ``all_gather`` concatenates along ``axis``, ``reduce_scatter``
  hands rank i piece i of ``np.array_split`` along ``axis``. NCCL moves equal counts, so uneven
  pieces are zero-padded to the longest piece and cut back afterwards; ``all_gather`` and
  ``all_to_all`` first gather every rank's shape (one tiny all-gather). ``all_reduce`` and
  ``reduce_scatter`` sum (or, with ``op="max"``, take the maximum: NCCL_MAX); NCCL sums int8/uint8/(u)int32/(u)int64/float16/32/64 (complex as pairs
  of floats) and a :class:`CommError` names anything else (cast first). All ranks must pass the
  same shape and dtype to these two, as NCCL's counts must agree.
- **Sub-groups**: NCCL communicators are per group. The first call over a ``group`` creates one:
  the group's first rank draws a fresh id and sends it to the others over the world
  communicator, then the group's ranks run ``ncclCommInitRank``; it is cached by the group's
  ranks in order. (``ncclCommSplit``, CuPy >= 14 only, would need every rank of the world to
  call it at once; a sub-group collective is called by its members only.)
- **Point to point**: NCCL has no mailboxes or tags; a send is matched, in order, by the peer's
  next receive from this rank, and it completes only when that receive runs. So each message is
  a fixed-size header (tag, dtype, shape) then the payload; ``recv(src, tag)`` takes messages
  from ``src`` in order and files those of other tags in the mailbox for their own ``recv``.
  ``post`` enqueues the send on the current stream and returns at once, but the stream does not
  move on until the peer receives: two ranks that both send to each other and then receive
  deadlock (NCCL's rule, reported after ``timeout``). The collectives and the base class's
  schedules are safe: ``_drive`` issues each step's sends and its receive as one NCCL group.
- **Blocking and timeouts**: every call returns once its work on the device is done, like the
  base class's; it polls a CUDA event and NCCL's asynchronous error, and after ``timeout``
  seconds it aborts the communicators (``ncclCommAbort``) and raises :class:`CommError`; the
  communicator is then unusable (build a new one). ``ncclCommInitRank`` itself has no timeout:
  it waits until every rank of the group has joined.
- Arrays are CuPy arrays on this rank's device; NumPy arrays are accepted and copied there.
  Calls use the current CuPy stream. Use one thread per communicator (NCCL calls on one
  communicator must be issued in the same order on every rank).
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import queue
import time
import traceback
from typing import Any, Callable, Sequence

import numpy as np

from comm import algorithms as alg
from comm.base import CommError, Communicator

INSTALL_HINT = "pip install flowsys[cuda] (CUDA 12) or flowsys[cuda13] (CUDA 13)"

# The message header: tag, dtype (index into _DTYPES), ndim, shape (256 bytes in all).
_DTYPES = tuple(np.dtype(name) for name in (
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "complex64", "complex128"))
_MAX_NDIM = 29
_HEADER_LEN = 3 + _MAX_NDIM
# What NCCL can sum, and as which NCCL type (a complex number is two floats: a sum is linear).
_SUM_TYPES = {"int8": "NCCL_INT8", "uint8": "NCCL_UINT8", "int32": "NCCL_INT32", "uint32": "NCCL_UINT32",
              "int64": "NCCL_INT64", "uint64": "NCCL_UINT64", "float16": "NCCL_FLOAT16",
              "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
              "complex64": "NCCL_FLOAT32", "complex128": "NCCL_FLOAT64",
              "bfloat16": "NCCL_BFLOAT16"}  # where the installed CuPy holds bfloat16 arrays
_SUBGROUP_TAG = -1  # the tag that carries a new sub-group's NCCL id from its first rank


# ------------------------------------------------------------------------- availability
def _nccl_module():
    """``cupy.cuda.nccl``, or a CommError saying what to install."""
    try:
        import cupy
        from cupy.cuda import nccl
    except Exception as e:  # ImportError, or a CuPy whose CUDA libraries fail to load
        raise CommError(f"CuPy is not importable ({type(e).__name__}: {e}); {INSTALL_HINT}") from e
    if not getattr(nccl, "available", False):
        raise CommError(f"CuPy {cupy.__version__} cannot load the NCCL library "
                        f"(python -m cupyx.tools.install_library --library nccl --cuda 12.x)")
    return nccl


def why_unavailable() -> str:
    """Why the NCCL transport cannot run here ("" when it can): no CuPy, a CuPy without NCCL,
    or no CUDA device."""
    try:
        _nccl_module()
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except CommError as e:
        return str(e)
    except Exception as e:  # CUDARuntimeError: no driver, no device
        return f"CuPy finds no CUDA device ({type(e).__name__}: {e})"
    return "" if count > 0 else "CuPy finds no CUDA device"


def available() -> bool:
    """True when :class:`NcclCommunicator` can run here (see :func:`why_unavailable`)."""
    return why_unavailable() == ""


def _require() -> None:
    reason = why_unavailable()
    if reason:
        raise CommError(f"the NCCL transport needs CuPy with NCCL and a CUDA device: {reason}")


def nccl_unique_id() -> bytes:
    """A fresh NCCL id for one communicator (128 bytes): the driver draws it once and passes the
    same bytes to every rank. It needs CuPy with NCCL but no GPU; the process that draws it must
    outlive the ranks' start-up (NCCL's bootstrap listens there)."""
    return _id_bytes(_nccl_module().get_unique_id())


def _id_bytes(unique_id: bytes | Sequence[int]) -> bytes:
    """CuPy >= 14 gives the id as bytes, older CuPy as a tuple of C chars (signed on x86)."""
    return unique_id if isinstance(unique_id, bytes) else bytes(v & 0xFF for v in unique_id)


def _init_comm(nccl, world_size: int, unique_id: bytes | Sequence[int], rank: int):
    """``ncclCommInitRank`` through whichever id form this CuPy takes (bytes from 14 on, a tuple
    of chars before, whose signedness follows the platform): a wrong form fails on conversion,
    before NCCL is called."""
    raw = _id_bytes(unique_id)
    forms = (raw, tuple(b - 256 if b > 127 else b for b in raw), tuple(raw))
    for form in forms:
        try:
            return nccl.NcclCommunicator(world_size, form, rank)
        except (TypeError, OverflowError):
            continue
    raise CommError("this CuPy's NcclCommunicator takes the id neither as bytes nor as a tuple of chars")


# ------------------------------------------------------------------------ pure helpers
def encode_header(tag: int, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
    """A message's header as the int64 row NCCL carries ahead of its payload."""
    dtype = np.dtype(dtype)
    if dtype not in _DTYPES:
        raise CommError(f"the NCCL transport carries {', '.join(d.name for d in _DTYPES)} arrays, "
                        f"not {dtype}")
    if len(shape) > _MAX_NDIM:
        raise CommError(f"the NCCL transport carries arrays of up to {_MAX_NDIM} dimensions, not {len(shape)}")
    header = np.zeros(_HEADER_LEN, np.int64)
    header[:3] = tag, _DTYPES.index(dtype), len(shape)
    header[3:3 + len(shape)] = shape
    return header


def decode_header(header: np.ndarray) -> tuple[int, np.dtype, tuple[int, ...]]:
    tag, dtype, ndim = (int(v) for v in header[:3])
    return tag, _DTYPES[dtype], tuple(int(v) for v in header[3:3 + ndim])


def _axis(axis: int, x, op: str) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise CommError(f"{op}: axis {axis} is out of range for an array of shape {x.shape}")
    return axis % x.ndim


def _along(axis: int, start: int, stop: int) -> tuple:
    return (slice(None),) * axis + (slice(start, stop),)


def _pad_along(xp, x, axis: int, length: int):
    """``x`` zero-padded along ``axis`` to ``length`` (contiguous; ``x`` itself when it fits)."""
    if x.shape[axis] == length:
        return xp.ascontiguousarray(x)
    out = xp.zeros(x.shape[:axis] + (length,) + x.shape[axis + 1:], x.dtype)
    out[_along(axis, 0, x.shape[axis])] = x
    return out


_REDUCE_OPS = {"sum": "NCCL_SUM", "max": "NCCL_MAX"}  # comm.algorithms.REDUCE_OPS, as NCCL names them


def _check_summable(x, op: str, reduce_op: str = "sum") -> None:
    if reduce_op not in _REDUCE_OPS:
        raise CommError(f"{op}: unknown reduce op {reduce_op!r}; use one of {', '.join(map(repr, _REDUCE_OPS))}")
    if reduce_op == "max" and x.dtype.kind == "c":
        raise CommError(f"{op}: complex {x.dtype} arrays have no maximum; reduce their real parts instead")
    if x.dtype.name not in _SUM_TYPES:
        raise CommError(f"{op}: NCCL cannot sum {x.dtype} arrays (it sums {', '.join(_SUM_TYPES)}); "
                        f"cast the array first")


def _nccl_call(method):
    """Run a public method on this rank's device, turning NCCL's errors into CommError."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self._broken:
            raise CommError(f"rank {self.rank}: this NCCL communicator is no longer usable ({self._broken}); "
                            f"build a new one")
        with self._on_device():
            try:
                return method(self, *args, **kwargs)
            except self._nccl_error as e:
                raise CommError(f"rank {self.rank}: {method.__name__}: {e}") from e
    return call


# ------------------------------------------------------------------------ the transport
class NcclCommunicator(Communicator):
    """One rank's end of an NCCL communicator over ``world_size`` ranks, on CUDA device
    ``device`` (default ``rank`` modulo the visible devices). ``xp`` is its array module (CuPy).

    All ranks build theirs with the same ``unique_id`` (from :func:`nccl_unique_id`); the
    constructor returns once all have joined. Subclasses that replace ``_setup``, ``_connect``
    and ``_new_unique_id`` run the same logic over another library (tests/test_nccl.py runs it
    over NumPy and threads).
    """

    ordered = True  # calls are matched by their order: the actor runtime issues them in its plan's

    def __init__(self, rank: int, world_size: int, unique_id: bytes | Sequence[int],
                 device: int | None = None, timeout: float = 60.0):
        super().__init__(rank, world_size, timeout)
        if not 0 <= rank < world_size:
            raise CommError(f"rank {rank} is not a rank of a world of {world_size}")
        self._broken = ""  # why the communicator can no longer be used (aborted, closed)
        self._world = None
        self._subs: dict[tuple[int, ...], Any] = {}
        self._setup(device)
        with self._on_device():
            self._world = self._connect(world_size, unique_id, rank)

    # ----------------------------------------------------- the library (replaced in tests)
    def _setup(self, device: int | None) -> None:
        _require()
        import cupy
        from cupy.cuda import nccl
        count = cupy.cuda.runtime.getDeviceCount()
        self.device = self.rank % count if device is None else device
        if not 0 <= self.device < count:
            raise CommError(f"rank {self.rank}: device {self.device} is not one of the {count} visible CUDA devices")
        self.xp, self._host, self._nccl_error = cupy, cupy.asnumpy, nccl.NcclError
        self._on_device = functools.partial(cupy.cuda.Device, self.device)

    def _connect(self, world_size: int, unique_id, rank: int):
        from cupy.cuda import nccl
        try:
            return _CupyNccl(self.xp, nccl, _init_comm(nccl, world_size, unique_id, rank))
        except nccl.NcclError as e:
            raise CommError(f"rank {rank} of {world_size} on device {self.device}: ncclCommInitRank failed: {e} "
                            f"(do all ranks use the same id and distinct devices?)") from e

    def _new_unique_id(self) -> bytes:
        return nccl_unique_id()

    # ------------------------------------------------------------------ point to point
    @_nccl_call
    def post(self, array, dst: int, tag: int = 0) -> None:
        """Enqueue ``array`` for rank ``dst`` under ``tag`` on the current stream and return; the
        stream waits until ``dst`` receives it (see the module docstring)."""
        self._exchange([(dst, array, tag)], [])

    def send(self, array, dst: int, tag: int = 0) -> None:
        self._check_peer(dst)
        self.post(array, dst, tag)

    @_nccl_call
    def recv(self, src: int, tag: int = 0):
        self._check_peer(src)
        return self._take(src, tag, [])

    @_nccl_call
    def exchange(self, sends: Sequence[tuple], recvs: Sequence[tuple]) -> list:
        """Sends ``(array, dst, tag)`` and receives ``(src, tag)`` as one NCCL group (a pipeline
        stage's two-way exchange: they complete together, so it cannot deadlock). Returns the
        received arrays, in order."""
        for _, dst, _ in sends:
            self._check_peer(dst)
        for src, _ in recvs:
            self._check_peer(src)
        here = [self.mailbox.try_take(src, tag) for src, tag in recvs]  # filed by an earlier receive
        wanted = [(src, tag) for (src, tag), x in zip(recvs, here) if x is None]
        got = iter(self._exchange([(dst, array, tag) for array, dst, tag in sends], [src for src, _ in wanted]))
        out = []
        for (src, tag), x in zip(recvs, here):
            if x is None:
                their_tag, x = next(got)
                if their_tag != tag:  # another conversation's message came first: file it, then wait
                    self.mailbox.put(src, their_tag, x)
                    x = self._take(src, tag, [])
            out.append(x)
        return out

    # -------------------------------------------------------------------- collectives
    @_nccl_call
    def all_reduce(self, x, group: Sequence[int] | None = None, op: str = "sum"):
        comm, _, _ = self._sub(group)
        x = self._to_device(x)
        _check_summable(x, "all_reduce", op)
        out = self.xp.empty_like(x)
        comm.all_reduce(x, out, op)
        self._wait(comm, "all_reduce")
        return out

    @_nccl_call
    def all_gather(self, x, axis: int = 0, group: Sequence[int] | None = None):
        comm, _, group = self._sub(group)
        x = self._to_device(x)
        axis = _axis(axis, x, "all_gather")
        shapes = self._gather_shapes(comm, x, group, "all_gather")
        for r, shape in zip(group, shapes):
            if shape[:axis] + shape[axis + 1:] != x.shape[:axis] + x.shape[axis + 1:]:
                raise CommError(f"all_gather along axis {axis}: rank {r} holds shape {shape} and rank {self.rank} "
                                f"holds {x.shape}; only axis {axis} may differ")
        lengths = [shape[axis] for shape in shapes]
        padded = _pad_along(self.xp, x, axis, max(lengths))
        gathered = self.xp.empty((len(group),) + padded.shape, x.dtype)
        comm.all_gather(padded, gathered)
        self._wait(comm, "all_gather")
        return self.xp.concatenate([gathered[i][_along(axis, 0, n)] for i, n in enumerate(lengths)], axis=axis)

    @_nccl_call
    def reduce_scatter(self, x, axis: int = 0, group: Sequence[int] | None = None, op: str = "sum"):
        comm, me, group = self._sub(group)
        x = self._to_device(x)
        _check_summable(x, "reduce_scatter", op)
        axis = _axis(axis, x, "reduce_scatter")
        bounds = alg._bounds(x.shape[axis], len(group))
        longest = bounds[0][1] - bounds[0][0]  # array_split: the first pieces are the longest
        front = self.xp.moveaxis(x, axis, 0)  # NCCL hands rank i the i-th contiguous chunk
        if x.shape[axis] % len(group):
            front = self.xp.concatenate([_pad_along(self.xp, front[a:b], 0, longest) for a, b in bounds])
        packed = self.xp.ascontiguousarray(front)
        out = self.xp.empty((longest,) + packed.shape[1:], x.dtype)
        comm.reduce_scatter(packed, out, op)
        self._wait(comm, "reduce_scatter")
        a, b = bounds[me]
        return self.xp.ascontiguousarray(self.xp.moveaxis(out[:b - a], 0, axis))

    @_nccl_call
    def all_to_all(self, x, split_axis: int, concat_axis: int, group: Sequence[int] | None = None):
        comm, me, group = self._sub(group)
        x = self._to_device(x)
        split_axis, concat_axis = _axis(split_axis, x, "all_to_all"), _axis(concat_axis, x, "all_to_all")
        n = len(group)
        shapes = self._gather_shapes(comm, x, group, "all_to_all")
        pieces = [self.xp.ascontiguousarray(x[_along(split_axis, a, b)])
                  for a, b in alg._bounds(x.shape[split_axis], n)]
        received = []
        for j, shape in enumerate(shapes):  # rank j's piece for us: its shape cut like array_split cuts it
            a, b = alg._bounds(shape[split_axis], n)[me]
            cut = shape[:split_axis] + (b - a,) + shape[split_axis + 1:]
            received.append(pieces[me] if j == me else self.xp.empty(cut, x.dtype))
        with comm.group():
            for j in range(n):
                if j != me:
                    comm.send(pieces[j], j)
                    comm.recv(received[j], j)
        self._wait(comm, "all_to_all")
        return self.xp.concatenate(received, axis=concat_axis)

    @_nccl_call
    def broadcast(self, x, root: int, group: Sequence[int] | None = None):
        group = self._group(group)
        if root not in group:
            raise CommError(f"broadcast: root rank {root} is not in the group {group}")
        comm, _, _ = self._sub(group)
        x = self._to_device(x) if self.rank == root else None
        header = self.xp.asarray(encode_header(0, x.dtype, x.shape) if x is not None
                                 else np.zeros(_HEADER_LEN, np.int64))
        comm.broadcast(header, group.index(root))  # the shape first, so the others can allocate
        self._wait(comm, "broadcast")
        _, dtype, shape = decode_header(self._host(header))
        out = x.copy() if x is not None else self.xp.empty(shape, dtype)
        comm.broadcast(out, group.index(root))
        self._wait(comm, "broadcast")
        return out

    barrier = _nccl_call(Communicator.barrier)  # the base's dissemination schedule, through _drive

    # ---------------------------------------------------------------------- lifecycle
    @_nccl_call
    def check_async_error(self) -> None:
        """Raise :class:`CommError` if NCCL has reported an asynchronous error (a peer died, a
        network failure); the blocking calls check it while they wait."""
        for comm in self._comms():
            comm.check_async_error()

    def abort(self, reason: str = "aborted by the caller") -> None:
        """``ncclCommAbort`` every communicator of this rank, releasing work stuck on a hung
        peer; every later call raises :class:`CommError`."""
        if not self._broken:
            self._broken = reason
            for comm in self._comms():
                comm.abort()
            self.mailbox.fail(CommError(f"rank {self.rank}: NCCL communicator aborted ({reason})"))

    def close(self) -> None:
        if not self._broken:
            self._broken = "closed"
            for comm in self._comms():
                comm.destroy()

    # ----------------------------------------------------------------------- plumbing
    def _comms(self) -> list:
        return [c for c in (self._world, *self._subs.values()) if c is not None]

    def _to_device(self, array):
        return self.xp.ascontiguousarray(self.xp.asarray(array))

    def _wait(self, comm, what: str) -> None:
        try:
            comm.wait(self.timeout)
        except TimeoutError:
            reason = f"{what} did not finish within {self.timeout:g} s"
            self.abort(reason)
            raise CommError(f"rank {self.rank}: {reason} (is every rank of the group in the same call, "
                            f"in the same order?); the communicator was aborted") from None
        except self._nccl_error as e:  # a peer failed: NCCL wants the communicator aborted
            self.abort(f"{what}: {e}")
            raise CommError(f"rank {self.rank}: {what}: {e}; the communicator was aborted") from e

    def _sub(self, group: Sequence[int] | None):
        """(the NCCL communicator over ``group``, this rank's index in it, the group as a list)."""
        group = self._group(group)
        if group == list(range(self.world_size)):
            return self._world, self.rank, group
        key = tuple(group)
        if key not in self._subs:
            if len(set(group)) != len(group):
                raise CommError(f"the group {group} names a rank twice")
            leader, others = group[0], group[1:]
            if self.rank == leader:
                unique_id = self._new_unique_id()
                self._exchange([(r, np.frombuffer(unique_id, np.uint8), _SUBGROUP_TAG) for r in others], [])
                self._wait(self._world, f"sending group {group}'s NCCL id")  # before InitRank blocks the host
            else:
                unique_id = self._host(self._take(leader, _SUBGROUP_TAG, [])).tobytes()
            self._subs[key] = self._connect(len(group), unique_id, group.index(self.rank))
        return self._subs[key], group.index(self.rank), group

    def _gather_shapes(self, comm, x, group: list[int], op: str) -> list[tuple[int, ...]]:
        """Every group member's shape of ``x`` (one tiny all-gather); a dtype mismatch raises on
        every rank alike."""
        rows = self.xp.empty((len(group), _HEADER_LEN), np.int64)
        comm.all_gather(self.xp.asarray(encode_header(0, x.dtype, x.shape)), rows)
        self._wait(comm, op)
        shapes = []
        for r, row in zip(group, self._host(rows)):
            _, dtype, shape = decode_header(row)
            if dtype != x.dtype:
                raise CommError(f"{op}: rank {r} holds {dtype} and rank {self.rank} holds {x.dtype}; "
                                f"all ranks must pass the same dtype")
            shapes.append(shape)
        return shapes

    def _exchange(self, sends: list[tuple[int, Any, int]], sources: list[int]) -> list[tuple[int, Any]]:
        """Send each ``(dst, array, tag)`` and receive one message from each rank of ``sources``
        over the world communicator: the headers as one NCCL group, then the payloads as another,
        so ranks that send to each other in the same step do not deadlock. Returns (tag, array)
        per source; waits only when it receives."""
        comm, xp = self._world, self.xp
        # Every buffer lives in a list until the groups are launched: inside a group NCCL only
        # launches at the group's end, and a freed buffer could be reused before that.
        payloads = [self._to_device(array) for _, array, _ in sends]
        heads_out = [xp.asarray(encode_header(tag, p.dtype, p.shape)) for (_, _, tag), p in zip(sends, payloads)]
        heads_in = [xp.empty(_HEADER_LEN, np.int64) for _ in sources]
        with comm.group():
            for (dst, _, _), head in zip(sends, heads_out):
                comm.send(head, dst)
            for src, head in zip(sources, heads_in):
                comm.recv(head, src)
        if sources:
            self._wait(comm, f"receive from rank(s) {sources}")
        metas = [decode_header(self._host(head)) for head in heads_in]
        got = [xp.empty(shape, dtype) for _, dtype, shape in metas]
        with comm.group():
            for (dst, _, _), payload in zip(sends, payloads):
                comm.send(payload, dst)
            for src, array in zip(sources, got):
                comm.recv(array, src)
        if sources:
            self._wait(comm, f"receive from rank(s) {sources}")
        return [(tag, array) for (tag, _, _), array in zip(metas, got)]

    def _take(self, src: int, tag: int, sends: list):
        """The next message from ``src`` under ``tag``, sending ``sends`` in the same group;
        messages from ``src`` under other tags go to the mailbox for their own ``recv``."""
        got = self.mailbox.try_take(src, tag)
        while got is None:
            [(their_tag, array)] = self._exchange(sends, [src])
            sends = []
            if their_tag == tag:
                got = array
            else:
                self.mailbox.put(src, their_tag, array)
        if sends:
            self._exchange(sends, [])
        return got

    def _drive(self, gen, group: list[int], tag: int = 0):
        """The base class's schedules, with each step's sends grouped with its receive (NCCL
        deadlocks on a ring whose ranks all send before anyone receives)."""
        value, sends = None, []
        try:
            while True:
                step = gen.send(value)
                if isinstance(step, alg.Send):
                    sends.append((group[step.peer], step.array, tag))
                    value = None
                else:
                    value, sends = self._take(group[step.peer], tag, sends), []
        except StopIteration as stop:
            if sends:
                self._exchange(sends, [])
            return stop.value


class _CupyNccl:
    """One ``cupy.cuda.nccl.NcclCommunicator``, called with arrays instead of pointers, on the
    current stream. Transfers that do not reduce move raw bytes (as the widest word that divides
    them), so any dtype travels; empty arrays are not sent (both ends skip them alike)."""

    def __init__(self, cupy, nccl, comm):
        self.cupy, self.nccl, self.comm = cupy, nccl, comm
        self._held: list | None = None  # inside a group: copies to keep until the group is launched

    def _stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    def _raw(self, array) -> tuple[int, int, int]:
        """(pointer, count, NCCL type) of ``array``'s bytes; a misaligned view is copied first."""
        nbytes = array.nbytes
        for size, name in ((8, "NCCL_INT64"), (4, "NCCL_INT32"), (1, "NCCL_UINT8")):
            if nbytes % size == 0:
                if array.data.ptr % size:
                    array = array.copy()  # fresh allocations are aligned
                    if self._held is not None:
                        self._held.append(array)  # (outside a group the pool reuses it in stream order)
                return array.data.ptr, nbytes // size, getattr(self.nccl, name)
        raise AssertionError("unreachable: every byte count is a multiple of 1")

    def _summed(self, array) -> tuple[int, int]:
        """(count, NCCL type) for summing ``array``: a complex number is two floats."""
        return array.size * (2 if array.dtype.kind == "c" else 1), getattr(self.nccl, _SUM_TYPES[array.dtype.name])

    def all_reduce(self, send, recv, op: str = "sum") -> None:
        if send.size:
            count, kind = self._summed(send)
            self.comm.allReduce(send.data.ptr, recv.data.ptr, count, kind, getattr(self.nccl, _REDUCE_OPS[op]),
                                self._stream())

    def reduce_scatter(self, send, recv, op: str = "sum") -> None:
        if recv.size:
            count, kind = self._summed(recv)
            self.comm.reduceScatter(send.data.ptr, recv.data.ptr, count, kind, getattr(self.nccl, _REDUCE_OPS[op]),
                                    self._stream())

    def all_gather(self, send, recv) -> None:
        if send.nbytes:
            ptr, count, kind = self._raw(send)
            self.comm.allGather(ptr, recv.data.ptr, count, kind, self._stream())

    def broadcast(self, buffer, root: int) -> None:
        if buffer.nbytes:
            ptr, count, kind = self._raw(buffer)  # buffers here are fresh, so ptr is buffer's own
            self.comm.broadcast(ptr, ptr, count, kind, root, self._stream())

    def send(self, array, peer: int) -> None:
        if array.nbytes:
            ptr, count, kind = self._raw(array)
            self.comm.send(ptr, count, kind, peer, self._stream())

    def recv(self, array, peer: int) -> None:
        if array.nbytes:
            ptr, count, kind = self._raw(array)
            self.comm.recv(ptr, count, kind, peer, self._stream())

    @contextlib.contextmanager
    def group(self):
        self._held = []
        self.nccl.groupStart()
        try:
            yield
        finally:
            self.nccl.groupEnd()
            self._held = None

    def wait(self, timeout: float) -> None:
        """Return once the stream's work so far is done; TimeoutError after ``timeout`` s. Polls
        (rather than synchronizing) so a hung peer cannot block the host for ever, and checks
        NCCL's asynchronous error meanwhile."""
        done = self.cupy.cuda.Event(disable_timing=True)
        done.record()
        start = time.monotonic()
        while not done.done:
            self.comm.check_async_error()
            waited = time.monotonic() - start
            if waited > timeout:
                raise TimeoutError
            time.sleep(0 if waited < 2e-3 else min(waited / 10, 1e-3))  # spin briefly: most calls are short

    def check_async_error(self) -> None:
        self.comm.check_async_error()

    def abort(self) -> None:
        self.comm.abort()

    def destroy(self) -> None:
        self.comm.destroy()


# ------------------------------------------------------------------ one process per GPU
def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = 300.0) -> list[Any]:
    """Run ``fn(communicator, *args)`` in ``world_size`` spawned processes, rank r on CUDA device
    r, and return each rank's result (it must pickle: return NumPy, e.g. ``array.get()``). ``fn``
    must be importable (a module-level function). Raises :class:`CommError` with the failing
    rank's traceback, or naming the ranks that did not finish within ``timeout`` seconds."""
    _require()
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    if not 1 <= world_size <= count:
        raise CommError(f"NCCL needs one CUDA device per rank: world_size {world_size} with {count} visible devices")
    ctx = multiprocessing.get_context("spawn")  # CUDA does not survive fork
    unique_id = nccl_unique_id()
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world_size, unique_id, args, results), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    out: list[Any] = [None] * world_size
    failures: dict[int, str] = {}
    pending = set(range(world_size))
    deadline = time.monotonic() + timeout
    try:
        while pending:
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = {r: procs[r].exitcode for r in sorted(pending) if procs[r].exitcode is not None}
                if dead or time.monotonic() > deadline:
                    if failures:
                        break  # report the failure, which likely stopped the others
                    exits = [f"rank {r} exited with code {c} before reporting" for r, c in dead.items()]
                    raise CommError("; ".join(exits) or f"rank(s) {sorted(pending)} did not finish in {timeout:g} s")
                continue
            pending.discard(rank)
            if ok:
                out[rank] = value
            else:
                failures[rank] = value
                deadline = min(deadline, time.monotonic() + 10)  # the others may wait on it for ever
    finally:
        for p in procs:
            p.join(timeout=10 if not pending else 0.1)
            if p.is_alive():
                p.kill()
    if failures:
        raise CommError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(failures.items())))
    return out


def _rank_main(fn, rank: int, world_size: int, unique_id: bytes, args: tuple, results) -> None:
    comm = None
    try:
        comm = NcclCommunicator(rank, world_size, unique_id, device=rank)
        results.put((rank, True, fn(comm, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if comm is not None:
            comm.close()

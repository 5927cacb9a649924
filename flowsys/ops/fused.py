"""Numba's part of the CPU kernels: the helpers generated kernels call, their thread pool, and
the one kernel the rules cannot state.

Every op's semantics is its NumPy expression in the op module, which also runs on CuPy. On the
CPU those expressions are chains of full passes over memory (a softmax row is five, an AdamW
update nine), so the hot ops run kernels generated from their scalar and row rules instead
(``flowsys.ops.fusion``): GELU, layer norm, softmax (attention's scaled, causal one too), cross
entropy, their gradients and the AdamW update. They use this module's ``_exp`` and ``_erf``
(vectorisable polynomials), the bfloat16 conversions ``_bf16_load`` / ``_bf16_store``, the
fast-math flags ``_FLAGS`` and the thread pool (``_split``, ``set_threads``). The one kernel left
written by hand is the embedding gradient's scatter-add (``scatter_add_rows``): an indexed
accumulate has no rule. ``tests/test_fused.py`` checks the kernels against the NumPy twins in
float64 and against PyTorch.

A missing or broken Numba only costs speed: ``usable`` is then False everywhere and the NumPy
expressions run. Setting ``FLOWSYS_JIT=0`` turns the kernels off. They compile on first use and
are cached on disk.

Transcendentals are polynomials (libm's ``expf`` and ``erff`` do not vectorise): ``_exp`` is
accurate to a few ulp on [-87, 88] (below it gives 0, above it inf), ``_erf`` to 1.5e-7
absolute (Abramowitz and Stegun 7.1.26, as the NumPy twin).
"""

from __future__ import annotations

import math
import os
import platform
import threading
import time

import numpy as np

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
except Exception:  # noqa: BLE001 - any failure to import means: run the NumPy twins
    numba = None

ENABLED = numba is not None and os.environ.get("FLOWSYS_JIT", "1").lower() not in ("0", "false", "off", "no")

f32 = np.float32


def usable(xp, *arrays) -> bool:
    """Whether the fused kernels may compute on ``arrays``: NumPy float32 arrays and Numba present."""
    return ENABLED and xp is np and all(type(a) is np.ndarray and a.dtype == np.float32 for a in arrays)


# Kernels release the GIL, and large calls split over a pool of threads: activations are read
# cold from memory, where two cores keep twice the loads in flight. ``set_threads`` gives a
# process's share of the cores (``flowsys.device.share_cores``) when ranks share a machine.
_MIN_PER_THREAD = 1 << 16  # elements: below this a thread costs more than it saves
_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_pool: _SpinPool | None = None
_pool_lock = threading.Lock()
SPIN_SECONDS = 200e-6  # how long an idle pool thread watches for the next part before it sleeps


def _forget_pool() -> None:  # a forked child has none of its parent's threads
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def set_threads(n: int) -> None:
    """Threads a large fused kernel may use (1 keeps every kernel on the calling thread)."""
    global _threads
    _threads = max(1, int(n))


def _split(fn, n: int, per_item: int = 1, align: int = 1) -> None:
    """Run ``fn(lo, hi)`` over ``range(n)`` in up to ``_threads`` parts, bounds multiples of
    ``align``: the calling thread runs the first part, the pool's threads the others. While
    another thread has the pool (ranks of one process), the caller runs the whole range itself."""
    global _pool
    k = min(_threads, (n * per_item) // _MIN_PER_THREAD, max(1, n // align))
    if k <= 1 or numba is None or not _pool_lock.acquire(blocking=False):
        fn(0, n)
        return
    try:
        if _pool is None or _pool.size < k - 1:
            if _pool is not None:
                _pool.close()
            _pool = _SpinPool(k - 1)
        bounds = [0] + [min(n, round(n * i / k / align) * align) for i in range(1, k)] + [n]
        _pool.run(fn, bounds)
    finally:
        _pool_lock.release()


if numba is not None:
    # Neither nnan nor ninf: NaN and inf propagate as they do in NumPy. reassoc lets reductions vectorise.
    _FLAGS = {"contract", "arcp", "reassoc", "nsz", "afn"}

    def _kernel(fn):
        return numba.njit(fastmath=_FLAGS, nogil=True, error_model="numpy", cache=True)(fn)

    _scalar = _kernel

    @intrinsic
    def _bits_to_float(typingctx, bits):
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = args[0] if sig.args[0].bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
            return builder.bitcast(v, ir.FloatType())

        return types.float32(bits), codegen

    @intrinsic
    def _float_to_bits(typingctx, x):
        if x != types.float32:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(x), codegen

    # The pool's handshake: a part is posted by a store to its thread's ticket, and its end by a
    # store to the thread's done counter; both sides watch with atomic loads outside the GIL.
    @intrinsic
    def _load_acquire(typingctx, arr, i):
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
            return builder.load_atomic(ptr, "acquire", 8)

        return types.int64(arr, i), codegen

    @intrinsic
    def _store_release(typingctx, arr, i, v):
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
            builder.store_atomic(context.cast(builder, args[2], sig.args[2], types.int64), ptr, "release", 8)
            return context.get_dummy_value()

        return types.void(arr, i, v), codegen

    @intrinsic
    def _pause(typingctx):
        """x86's ``pause`` in a spin loop (it yields the core's pipeline to its sibling); nothing elsewhere."""
        def codegen(context, builder, sig, args):
            if _X86:
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                    "llvm.x86.sse2.pause")
                builder.call(fn, [])
            return context.get_dummy_value()

        return types.void(), codegen

    @numba.njit(nogil=True, cache=True)
    def _watch(ctl, i, old, spins):
        """``ctl[i]`` once it differs from ``old``, or ``old`` after ``spins`` pauses without a change."""
        for _ in range(spins):
            v = _load_acquire(ctl, i)
            if v != old:
                return v
            _pause()
        return old

    @numba.njit(nogil=True, cache=True)
    def _await(ctl, i, want):
        while _load_acquire(ctl, i) != want:
            _pause()

    @numba.njit(nogil=True, cache=True)
    def _post(ctl, i, v):
        _store_release(ctl, i, v)
else:  # pragma: no cover - exercised only without Numba
    def _kernel(fn):
        return fn

    _scalar = _kernel

    def _bits_to_float(bits):
        return np.array(bits, dtype=np.int32).view(np.float32)[()]

    def _float_to_bits(x):
        return np.array(x, dtype=np.float32).view(np.uint32)[()]


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


class _SpinPool:
    """``size`` threads that run the parts ``_split`` hands them, as OpenMP's runtimes do: a
    thread done with its part watches (outside the GIL, pausing) for the next one for
    ``SPIN_SECONDS``, then sleeps on a condition. A step's kernels come every few tens of
    microseconds, so a part is picked up at once, where waking a sleeping thread took 50-80 us
    on the benchmark's virtual machine (that of a ``ThreadPoolExecutor``: 84 us a call)."""

    def __init__(self, size: int):
        self.size = size
        self.ctl = np.zeros((size, 8), np.int64)  # per thread: [0] ticket, [1] done (a cache line each)
        self.tasks: list = [None] * size
        self.errors: list = [None] * size
        self.sleeping = [False] * size
        self.closed = False
        self.cond = threading.Condition()
        self.spins = _spins_for(SPIN_SECONDS)
        for w in range(size):
            threading.Thread(target=self._serve, args=(w,), daemon=True, name=f"flowsys-pool-{w}").start()

    def _serve(self, w: int) -> None:
        row, served = self.ctl[w], 0
        while True:
            ticket = _watch(row, 0, served, self.spins)
            if ticket == served:
                with self.cond:
                    self.sleeping[w] = True
                    while row[0] == served and not self.closed:
                        self.cond.wait()
                    self.sleeping[w] = False
                    if self.closed:
                        return
                ticket = int(row[0])
            fn, lo, hi = self.tasks[w]
            self.tasks[w] = None
            try:
                fn(lo, hi)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
                self.errors[w] = e
            served = ticket
            _post(row, 1, ticket)

    def run(self, fn, bounds: list[int]) -> None:
        """``fn`` over ``bounds``' parts: the first on the calling thread, part i + 1 on thread i."""
        posted = []
        for w in range(len(bounds) - 2):
            self.tasks[w] = (fn, bounds[w + 1], bounds[w + 2])
            ticket = int(self.ctl[w, 0]) + 1
            _post(self.ctl[w], 0, ticket)
            posted.append(ticket)
        with self.cond:  # the lock orders this read after a thread's last look at its ticket
            if any(self.sleeping):
                self.cond.notify_all()
        try:
            fn(bounds[0], bounds[1])
        finally:
            for w, ticket in enumerate(posted):
                _await(self.ctl[w], 1, ticket)
        for w in range(len(posted)):
            error, self.errors[w] = self.errors[w], None
            if error is not None:
                raise error

    def close(self) -> None:
        """Its threads end (once idle)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def _spins_for(seconds: float) -> int:
    """Pauses of ``_watch`` that take about ``seconds`` on this machine."""
    probe = np.zeros(1, np.int64)
    _watch(probe, 0, 0, 16)
    t0 = time.perf_counter()
    _watch(probe, 0, 0, 4096)
    return max(64, int(4096 * seconds / max(time.perf_counter() - t0, 1e-9)))


@_scalar
def _bf16_load(u):
    """A bfloat16's bits (uint16) as the float32 it is."""
    return _bits_to_float(np.uint32(u) << np.uint32(16))


@_scalar
def _bf16_store(x):
    """float32 -> bfloat16 bits, rounded to nearest even as ml_dtypes (and PyTorch) round; NaN
    stays a (quiet) NaN."""
    bits = _float_to_bits(x)
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((bits >> np.uint32(16)) | np.uint32(0x40))
    bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint16(bits >> np.uint32(16))


_LOG2E = math.log2(math.e)
_LN2_HI = 0.693145751953125  # ln 2 split so that n * _LN2_HI is exact for |n| < 2**10
_LN2_LO = 1.428606765330187e-06


@_scalar
def _exp(x):
    """e**x: 2**n * exp(r) with |r| <= ln(2)/2 and a degree-6 polynomial for exp(r)."""
    c = min(max(x, f32(-87.0)), f32(88.0))
    n = np.floor(c * f32(_LOG2E) + f32(0.5))
    r = c - n * f32(_LN2_HI) - n * f32(_LN2_LO)
    p = f32(1.0) + r * (f32(1.0) + r * (f32(0.5) + r * (f32(1.0 / 6) + r * (
        f32(1.0 / 24) + r * (f32(1.0 / 120) + r * f32(1.0 / 720))))))
    e = p * _bits_to_float((np.int32(n) + np.int32(127)) << np.int32(23))
    if x < f32(-87.0):
        e = f32(0.0)
    if x > f32(88.0):
        e = f32(np.inf)
    if x != x:
        e = x
    return e


@_scalar
def _erf(x):
    a = abs(x)
    t = f32(1.0) / (f32(1.0) + f32(0.3275911) * a)
    poly = t * (f32(0.254829592) + t * (f32(-0.284496736) + t * (f32(1.421413741) + t * (
        f32(-1.453152027) + t * f32(1.061405429)))))
    return math.copysign(f32(1.0) - poly * _exp(-a * a), x)


# ------------------------------------------------------------------------------ scatter-add


@_kernel
def _scatter_add_rows(z, idx, g):
    for i in range(idx.size):
        r = idx[i]
        for j in range(g.shape[1]):
            z[r, j] += g[i, j]


def scatter_add_rows(z, idx, g) -> bool:
    """``z[idx[i]] += g[i]`` for each i in turn (repeats accumulate, as ``np.add.at``) on a
    C-contiguous float32 table ``z`` (rows, n) and rows ``g`` (len(idx), n), indices in range;
    False (nothing done) otherwise. The embedding gradient: one pass over ``g``, where NumPy's
    sort and segmented sum take several."""
    if not (usable(np, z, g) and z.flags.c_contiguous and g.flags.c_contiguous and z.ndim == 2 and g.ndim == 2
            and g.shape == (idx.size, z.shape[1]) and idx.dtype.kind in "iu"):
        return False
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= z.shape[0]):
        return False
    _scatter_add_rows(z, np.ascontiguousarray(idx, dtype=np.int64), g)
    return True

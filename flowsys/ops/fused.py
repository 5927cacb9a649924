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
accurate to a few ulp on [-87, 88] (below it gives 0, above it inf), ``_erf`` to 4.3e-7
absolute (a rational fit with no exp; the NumPy twin keeps Abramowitz and Stegun 7.1.26, 1.5e-7).
"""

from __future__ import annotations

import contextlib
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
# How long an idle pool thread watches for the next part before it sleeps: 0.2 ms where another
# library's threads want the cores between our parts (NumPy's OpenBLAS runs the GEMMs), 1 ms where
# the pool runs the GEMMs too (flowsys.ops.blas on MKL sets it; the benchmark GPT's step: -5 ms)
SPIN_SECONDS = 200e-6
_spins = 0  # SPIN_SECONDS in pauses of ``_watch`` (measured when the first pool starts)
_HELD = 37  # the column of a pool thread's control row holding its next ticket back (_release)
_NO_GO = np.zeros((0, 40), np.int64)  # a generated kernel's ``go`` when no part waits on it


def _forget_pool() -> None:  # a forked child has none of its parent's threads
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def set_threads(n: int) -> None:
    """Threads a large fused kernel may use (1 keeps every kernel on the calling thread)."""
    global _threads
    _threads = max(1, int(n))


def _parts(n: int, per_item: int, align: int) -> list[int] | None:
    """Bounds of the parts ``range(n)`` splits into (multiples of ``align``), or None for one part."""
    k = min(_threads, (n * per_item) // _MIN_PER_THREAD, max(1, n // align))
    if k <= 1 or numba is None:
        return None
    return [0] + [min(n, round(n * i / k / align) * align) for i in range(1, k)] + [n]


def _take_pool(threads: int) -> _SpinPool | None:
    """The pool with ``threads`` threads at least, held by this thread; None while another holds it
    (ranks of one process), and the caller then runs everything itself."""
    global _pool
    if not _pool_lock.acquire(blocking=False):
        return None
    try:
        if _pool is None or _pool.size < threads:
            if _pool is not None:
                _pool.close()
            _pool = _SpinPool(threads)
    except BaseException:
        _pool_lock.release()
        raise
    return _pool


@contextlib.contextmanager
def _pool_for(n: int, per_item: int, align: int):
    """(the pool, held, and the parts' bounds) for ``range(n)``, or (None, None): one part, or the
    pool held by another thread."""
    bounds = _parts(n, per_item, align)
    pool = _take_pool(len(bounds) - 2) if bounds else None
    try:
        yield (pool, bounds) if pool is not None else (None, None)
    finally:
        if pool is not None:
            _pool_lock.release()


def _split(fn, n: int, per_item: int = 1, align: int = 1) -> None:
    """Run ``fn(lo, hi)`` over ``range(n)`` in up to ``_threads`` parts, bounds multiples of
    ``align``: the calling thread runs the first part, the pool's threads the others."""
    with _pool_for(n, per_item, align) as (pool, bounds):
        if pool is None:
            fn(0, n)
        else:
            pool.run(fn, bounds)


def _split_go(fn, n: int, per_item: int = 1, align: int = 1) -> None:
    """``_split`` for a generated kernel's call ``fn(lo, hi, go)``, which hands ``go`` on to the
    kernel: the kernel posts the other parts as it starts (``_release``), outside the GIL."""
    with _pool_for(n, per_item, align) as (pool, bounds):
        if pool is None:
            fn(0, n, _NO_GO)
        else:
            pool.run(fn, bounds, go=True)


def _split_native(fn, native, n: int, per_item: int = 1, align: int = 1) -> None:
    """``_split`` for parts a C function runs (a BLAS call): the pool's threads run
    ``native(lo, hi)`` = (kind, address, calls) without the GIL (``_call_native``), so a part is
    picked up in microseconds; the calling thread runs ``fn(lo, hi)`` for its own part, or for
    the whole range where there is no pool to take."""
    with _pool_for(n, per_item, align) as (pool, bounds):
        if pool is None:
            fn(0, n)
        else:
            pool.run_native(lambda: fn(bounds[0], bounds[1]),
                            [native(bounds[i], bounds[i + 1]) for i in range(1, len(bounds) - 1)])


def _beside(fn, native) -> bool:
    """Run ``fn()`` on the calling thread and the C call ``native`` = (kind, address, calls) on a
    pool thread at once, as two independent products (a linear's two gradients); False, with
    nothing run, where there is no second thread to take (one thread, or the pool held)."""
    if _threads < 2 or numba is None:
        return False
    pool = _take_pool(1)
    if pool is None:
        return False
    try:
        pool.run_native(fn, [native])
    finally:
        _pool_lock.release()
    return True


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

    @intrinsic
    def _wide(typingctx):
        """Let the calling kernel's loops use the widest vectors (LLVM prefers 256-bit ones on
        x86 cores with AVX-512, a guess against clock throttling that a whole-array pass loses):
        the generated kernels' first statement. A no-op where the core has no 512-bit vectors.
        (llvmlite lists the attributes it knows; this one is LLVM's own string attribute.)"""
        def codegen(context, builder, sig, args):
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
            return context.get_dummy_value()

        return types.void(), codegen

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

    _I32, _I64, _PTR = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()

    @intrinsic
    def _call_native(typingctx, kind, addr, words):
        """Call the C function at ``addr`` with arguments from int64 ``words``: kind 1 and 2 are
        ``cblas_sgemm`` / ``cblas_dgemm`` (6 ints, alpha, a, lda, b, ldb, beta, c, ldc; alpha and
        beta as the bits of a float32 / float64), kind 3 a ``cblas_?gemm_batch`` (an int, 13
        pointers, an int, a pointer)."""
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[2])(context, builder, args[2])

            def call(params):
                fnty = ir.FunctionType(ir.VoidType(), params)
                fn = builder.inttoptr(args[1], fnty.as_pointer())
                values = []
                for i, t in enumerate(params):
                    x = builder.load(cgutils.get_item_pointer(context, builder, sig.args[2], ary,
                                                              [context.get_constant(types.intp, i)]))
                    if t == _I32:
                        x = builder.trunc(x, _I32)
                    elif t == _PTR:
                        x = builder.inttoptr(x, _PTR)
                    elif isinstance(t, ir.FloatType):
                        x = builder.bitcast(builder.trunc(x, _I32), t)
                    elif isinstance(t, ir.DoubleType):
                        x = builder.bitcast(x, t)
                    values.append(x)
                builder.call(fn, values)

            gemm = [_I32] * 6 + [None, _PTR, _I32, _PTR, _I32, None, _PTR, _I32]
            cases = {1: [ir.FloatType() if t is None else t for t in gemm],
                     2: [ir.DoubleType() if t is None else t for t in gemm],
                     3: [_I32] + [_PTR] * 13 + [_I32, _PTR]}
            for k, params in cases.items():
                with builder.if_then(builder.icmp_signed("==", args[0], context.get_constant(types.int64, k))):
                    call(params)
            return context.get_dummy_value()

        return types.void(kind, addr, words), codegen

    @numba.njit(nogil=True, cache=True)
    def _serve_native(row, served, spins, finished):
        """A pool thread's watch, outside the GIL: it posts ``finished`` (a Python part it ran; 0:
        none) as done, runs each native part posted to ``row`` itself, and returns the ticket of a
        Python part, or ``served`` once ``spins`` pauses pass with nothing new."""
        if finished > 0:
            _store_release(row, 1, finished)
        idle = 0
        while idle < spins:
            ticket = _load_acquire(row, 0)
            if ticket == served:
                _pause()
                idle += 1
                continue
            if row[2] == 0:
                return ticket
            for c in range(row[4]):
                _call_native(row[2], row[3], row[5 + 16 * c:21 + 16 * c])
            served = ticket
            _store_release(row, 1, ticket)
            idle = 0
        return served

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
    def _await(ctl, i, want, spins):
        """Whether ``ctl[i]`` came to ``want`` within ``spins`` pauses."""
        for _ in range(spins):
            if _load_acquire(ctl, i) == want:
                return True
            _pause()
        return False

    @numba.njit(nogil=True, cache=True)
    def _release(go):
        """Post the tickets ``go`` holds back (column ``_HELD``): a generated kernel's first statement,
        so that a pool thread starts its part once this thread has left the GIL, and takes the GIL
        at once to start it (rather than sleeping on it until this thread's kernel starts)."""
        for w in range(go.shape[0]):
            # 37 is _HELD. Written as the module constant, the compiled read returned garbage in
            # tests/test_pool.py (a ticket made of text); why is not understood, the literal works
            held = go[w, 37]
            if held > go[w, 0]:
                _store_release(go[w], 0, held)

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
        # per thread: [0] ticket, [1] done, [2] kind of part (0: Python), [3] function, [4] calls,
        # [5:37] words of up to two native calls, [_HELD] a held ticket; 40 int64, whole cache lines
        self.ctl = np.zeros((size, 40), np.int64)
        self.tasks: list = [None] * size
        self.errors: list = [None] * size
        self.sleeping = [False] * size
        self.closed = False
        self.cond = threading.Condition()
        set_spin(SPIN_SECONDS, measure=True)
        for w in range(size):
            threading.Thread(target=self._serve, args=(w,), daemon=True, name=f"flowsys-pool-{w}").start()

    def _serve(self, w: int) -> None:
        row, served, finished = self.ctl[w], 0, 0
        while True:
            ticket = _serve_native(row, served, _spins, finished)
            finished = 0
            if ticket == int(row[1]):  # nothing for Python: the native parts ran, then it went quiet
                served = ticket
                with self.cond:
                    self.sleeping[w] = True
                    while row[0] == served and not self.closed:
                        self.cond.wait()
                    self.sleeping[w] = False
                    if self.closed:
                        return
                continue  # a native part is run by _serve_native, a Python one returned
            fn, lo, hi, go = self.tasks[w]
            self.tasks[w] = None
            try:
                fn(lo, hi, _NO_GO) if go else fn(lo, hi)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
                self.errors[w] = e
            served = finished = ticket  # posted done by _serve_native, once this thread is off the GIL

    def run_native(self, own, parts: list) -> None:
        """Part i + 1 of a product on thread i, without the GIL: ``parts[i]`` is (kind, address,
        calls), calls a list of up to two lists of int64 words (see ``_call_native``); the calling
        thread runs ``own()`` meanwhile."""
        posted = []
        for w, (kind, addr, calls) in enumerate(parts):
            row = self.ctl[w]
            row[2], row[3], row[4] = kind, addr, len(calls)
            for c, words in enumerate(calls):
                row[5 + 16 * c:5 + 16 * c + len(words)] = words
            ticket = int(row[0]) + 1
            _post(row, 0, ticket)
            posted.append(ticket)
        self._wake()
        try:
            own()
        finally:
            self._await_all(posted)

    def _await_all(self, posted: list[int]) -> None:
        """Until each thread is done with its ticket; a thread that went to sleep before its ticket
        came (its watch ended a moment too soon) is woken."""
        for w, ticket in enumerate(posted):
            while not _await(self.ctl[w], 1, ticket, _spins):
                self._wake()

    def _wake(self) -> None:
        with self.cond:  # the lock orders this read after a thread's last look at its ticket
            if any(self.sleeping):
                self.cond.notify_all()

    def run(self, fn, bounds: list[int], go: bool = False) -> None:
        """``fn`` over ``bounds``' parts: the first on the calling thread, part i + 1 on thread i.
        With ``go``, ``fn(lo, hi, go)`` is a generated kernel's call, which posts the other parts'
        tickets itself (``_release``) as it starts; a sleeping thread is woken first."""
        held = []
        for w in range(len(bounds) - 2):
            self.tasks[w] = (fn, bounds[w + 1], bounds[w + 2], go)
            self.ctl[w, 2] = 0
            held.append(int(self.ctl[w, 0]) + 1)
            self.ctl[w, _HELD] = held[-1]
        rows = self.ctl[:len(held)]
        if not go or any(self.sleeping):
            _release(rows)
            self._wake()
        try:
            fn(bounds[0], bounds[1], rows) if go else fn(bounds[0], bounds[1])
        finally:
            _release(rows)  # where the kernel did not start
            self._await_all(held)
            errors = [e for e in self.errors[:len(held)] if e is not None]
            self.errors[:len(held)] = [None] * len(held)
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Its threads end (once idle)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()


_pauses_per_second = 0.0


def set_spin(seconds: float, measure: bool = False) -> None:
    """How long the pool's idle threads watch for their next part before they sleep (the pause's
    speed is measured when the first pool starts, or with ``measure``)."""
    global SPIN_SECONDS, _spins, _pauses_per_second
    SPIN_SECONDS = float(seconds)
    if numba is None or not (_pauses_per_second or measure):
        return
    if not _pauses_per_second:
        probe = np.zeros(1, np.int64)
        _watch(probe, 0, 0, 16)
        t0 = time.perf_counter()
        _watch(probe, 0, 0, 4096)
        _pauses_per_second = 4096 / max(time.perf_counter() - t0, 1e-9)
    _spins = max(64, int(_pauses_per_second * SPIN_SECONDS))


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
    """erf as x P(x^2) / Q(x^2) on [-4, 4] (past 4 it is 1 in float32): one division and no exp,
    half the operations of Abramowitz and Stegun's 7.1.26 (a division and an exp). Our own fit:
    least squares on [0, 4], weighted by 1 / Q and refit; at worst 4.3e-7 off in float32."""
    c = min(max(x, f32(-4.0)), f32(4.0))
    z = c * c
    p = f32(1.1283791150937243) + z * (f32(0.20004892473920446) + z * (f32(0.050575811173143914) + z * (
        f32(0.0037000721317432365) + z * (f32(0.00014127097001125977) + z * (
            f32(-1.942209622839344e-06) + z * f32(1.9671802552346217e-08))))))
    q = f32(1.0) + z * (f32(0.5106205389255066) + z * (f32(0.11503683080097099) + z * (
        f32(0.014354533689388086) + z * f32(0.0009539790732973547))))
    r = min(max(c * p / q, f32(-1.0)), f32(1.0))
    if x != x:
        r = x
    return r


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

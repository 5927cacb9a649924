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
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    import numba
    from llvmlite import ir
    from numba import types
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
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:  # a forked child has none of its parent's threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def set_threads(n: int) -> None:
    """Threads a large fused kernel may use (1 keeps every kernel on the calling thread)."""
    global _threads
    _threads = max(1, int(n))


def _split(fn, n: int, per_item: int = 1, align: int = 1) -> None:
    """Run ``fn(lo, hi)`` over ``range(n)`` in up to ``_threads`` parts, bounds multiples of ``align``."""
    k = min(_threads, (n * per_item) // _MIN_PER_THREAD, max(1, n // align))
    if k <= 1:
        fn(0, n)
        return
    global _pool, _pool_size
    with _pool_lock:
        if _pool_size < k - 1:  # the calling thread does one part itself
            if _pool is not None:
                _pool.shutdown(wait=False)  # its threads finish their parts, then exit
            _pool, _pool_size = ThreadPoolExecutor(max_workers=k - 1, thread_name_prefix="flowsys-fused"), k - 1
        bounds = [0] + [min(n, round(n * i / k / align) * align) for i in range(1, k)] + [n]
        futures = [_pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, k)]
    fn(bounds[0], bounds[1])
    for f in futures:
        f.result()


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
else:  # pragma: no cover - exercised only without Numba
    def _kernel(fn):
        return fn

    _scalar = _kernel

    def _bits_to_float(bits):
        return np.array(bits, dtype=np.int32).view(np.float32)[()]

    def _float_to_bits(x):
        return np.array(x, dtype=np.float32).view(np.uint32)[()]


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

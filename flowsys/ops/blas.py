"""The CPU's matrix products: NumPy's own BLAS, or Intel's MKL where it is installed.

NumPy's wheels bring OpenBLAS; PyTorch's CPU wheels bring MKL, which runs the benchmark GPT's
GEMMs about 15 % faster on this project's machines (the gap between flowsys and PyTorch eager was
almost all there). ``pip install 'flowsys[mkl]'`` installs Intel's ``mkl`` wheel, and the
matrix products of ``linear``, its gradients, ``matmul`` and attention then call it directly:
``cblas_?gemm``, and for a stack of matrices one ``cblas_?gemm_batch`` (NumPy calls its BLAS
once per matrix of a stack, each call threaded on its own).

``FLOWSYS_BLAS`` picks: ``auto`` (the default: MKL where its runtime is found, else NumPy),
``numpy`` or ``mkl`` (a :class:`~flowsys.errors.ConfigError` where MKL is missing). :func:`use`
switches at run time.

MKL runs sequential, on the threads of the fused kernels' pool (``fused._split``): a GEMM splits
into blocks of rows (or columns), a stack into runs of matrices. So the process has no second
thread pool spinning against the first, and no OpenMP runtime of MKL's: Intel's would be a second
OpenMP in a process with PyTorch's or Numba's GNU one, and sharing GNU's with them throttles
their threads (a PyTorch step in the same process ran 15 % slower). ``share_cores`` gives the
pool, and so the GEMMs, a rank's share of the cores.

:func:`matmul` returns None for what it does not take (other dtypes, a layout BLAS cannot read
without a copy, empty or int32-overflowing sizes); the caller then runs NumPy's ``matmul``.

>>> a, b = np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)
>>> out = matmul(a, b)
>>> out is None or out.tolist() == (a @ b).tolist()
True
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
import threading

import numpy as np

from flowsys.errors import ConfigError
from flowsys.ops import fused

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SEQUENTIAL = 1  # MKL_THREADING_SEQUENTIAL
_INT_MAX = 2**31 - 1  # MKL's LP64 interface takes 32-bit ints
_MKL_NAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")

_SPIN_MKL, _SPIN_NUMPY = 1e-3, 200e-6  # fused.SPIN_SECONDS with each library
_lock = threading.Lock()
_mkl: ctypes.CDLL | None = None
_tried = False
_active = "numpy"


def _candidates() -> list[str]:
    """Where ``pip install mkl`` puts its runtime (the environment's ``lib``), then the loader's path."""
    dirs = []
    for prefix in (sys.prefix, sys.base_prefix, os.path.expanduser("~/.local")):
        d = os.path.join(prefix, "lib")
        if d not in dirs:
            dirs.append(d)
    paths = [os.path.join(d, name) for d in dirs for name in _MKL_NAMES if os.path.exists(os.path.join(d, name))]
    return paths + list(_MKL_NAMES)


def _numpy_has_mkl() -> bool:
    """NumPy built against MKL already (conda's): its own matmul is MKL's, and a second copy is not loaded."""
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415
    except ImportError:
        return False
    return any(lib.get("internal_api") == "mkl" for lib in threadpool_info())


def _load() -> ctypes.CDLL | None:
    """MKL's runtime, sequential, or None where it is missing (not Linux, no ``mkl`` wheel)."""
    global _mkl, _tried
    with _lock:
        if _tried:
            return _mkl
        _tried = True
        if not sys.platform.startswith("linux") or _numpy_has_mkl():
            return None
        for path in _candidates():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            if not all(hasattr(lib, f) for f in ("MKL_Set_Threading_Layer", "cblas_sgemm", "cblas_sgemm_batch")):
                continue
            lib.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
            if lib.MKL_Set_Threading_Layer(_SEQUENTIAL) != _SEQUENTIAL:
                continue
            _declare(lib)
            _mkl = lib
            return lib
        return None


def _declare(lib: ctypes.CDLL) -> None:
    i, p = ctypes.c_int, ctypes.c_void_p
    for name, real in (("sgemm", ctypes.c_float), ("dgemm", ctypes.c_double)):
        f = getattr(lib, f"cblas_{name}")
        f.restype = None
        f.argtypes = [i, i, i, i, i, i, real, p, i, p, i, real, p, i]
        fb = getattr(lib, f"cblas_{name}_batch")
        fb.restype = None
        fb.argtypes = [i, p, p, p, p, p, p, p, p, p, p, p, p, p, i, p]


def available() -> bool:
    """Whether MKL's runtime was found (``pip install 'flowsys[mkl]'``)."""
    return _load() is not None


def backend() -> str:
    """The library running the CPU's matrix products now: ``"mkl"`` or ``"numpy"``."""
    return _active


def use(name: str) -> str:
    """Run the CPU's matrix products with ``name`` (``"mkl"``, ``"numpy"`` or ``"auto"``); returns
    the one used before. ``"mkl"`` without MKL installed is a :class:`ConfigError`."""
    global _active
    name = str(name).lower()
    if name not in ("auto", "numpy", "mkl"):
        raise ConfigError(f"FLOWSYS_BLAS / blas.use: expected 'auto', 'numpy' or 'mkl', got {name!r}")
    before = _active
    if name == "numpy":
        _active = "numpy"
    elif available():
        _active = "mkl"
    elif name == "mkl":
        raise ConfigError("FLOWSYS_BLAS=mkl, but no MKL runtime (libmkl_rt) was found: "
                          "pip install 'flowsys[mkl]' (Linux), or set FLOWSYS_BLAS=numpy")
    else:
        _active = "numpy"
    # The pool's threads may watch longer for their next part where they run the GEMMs too:
    # no BLAS thread of another library then wants the cores between parts.
    fused.set_spin(_SPIN_MKL if _active == "mkl" else _SPIN_NUMPY)
    return before


def _layout(rows: int, cols: int, s0: int, s1: int, itemsize: int) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) of a row-major matrix with these byte strides, or None."""
    if s0 % itemsize or s1 % itemsize:
        return None
    s0, s1 = s0 // itemsize, s1 // itemsize
    if cols == 1:
        s1 = 1  # a stride never stepped is free
    if rows == 1:
        s0 = max(cols, 1)
    if s1 == 1 and s0 >= max(cols, 1):
        return _NO_TRANS, s0
    if s0 == 1 and s1 >= max(rows, 1):
        return _TRANS, s1
    return None


@functools.lru_cache(maxsize=512)
def _offsets(batch: tuple[int, ...], shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """The byte offset of each matrix of a stack with these batch ``shape`` and ``strides``
    (broadcast to ``batch``), in C order; kept per layout, so a call only adds its address."""
    strides = (0,) * (len(batch) - len(shape)) + tuple(0 if n == 1 else s for n, s in zip(shape, strides))
    offsets = np.zeros(1, np.uint64)
    for n, st in zip(batch, strides):
        offsets = (offsets[:, None] + (np.arange(n, dtype=np.int64) * st).astype(np.uint64)).reshape(-1)
    offsets.flags.writeable = False
    return offsets


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None,
           bias: np.ndarray | None = None, tri: str | None = None) -> np.ndarray | None:
    """``a @ b`` (both at least 2-D, batch axes broadcast as NumPy's) with MKL, into ``out`` (a
    C-contiguous array of the result's shape) or a new array; None where MKL is not in use or
    does not take these operands. ``bias`` (one value per column, of the operands' dtype; 2-D
    products only) is added as PyTorch's ``addmm`` adds it: each block of the output is filled
    with it, then the GEMM adds its product to the block (beta 1), so no pass of its own reads
    the output back. ``tri`` ("lower" or "upper") promises that every matrix of ``a`` is zero
    above (below) its diagonal, as a causal attention's probabilities are: the product skips
    those blocks (:func:`_tri_groups`)."""
    p = _product(a, b, out, bias, tri)
    if p is None:
        return None
    la, lb, m, n, k, batch, out = p
    if not batch and not tri:
        _gemm(la, lb, m, n, k, a, b, out, bias)
    else:
        fn, kind, addr = _fn(out.dtype, batch=True)
        args, count, per_item = _batch_call(la, lb, m, n, k, a, b, out, batch, tri)
        fused._split_native(lambda lo, hi: fn(*args(lo, hi)), lambda lo, hi: (kind, addr, [args(lo, hi)]), count,
                            per_item=per_item)
    return out


def _product(a, b, out=None, bias=None, tri=None):
    """(layout of a, layout of b, m, n, k, batch, out) of a product MKL takes, ``out`` made where
    None; or None."""
    if _active != "mkl" or not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return None
    dtype = a.dtype
    if dtype != b.dtype or dtype not in (np.float32, np.float64) or a.ndim < 2 or b.ndim < 2:
        return None
    m, k = a.shape[-2:]
    k2, n = b.shape[-2:]
    if k != k2 or 0 in (m, n, k) or max(m, n, k) > _INT_MAX:
        return None
    try:
        batch = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    except ValueError:
        return None
    if 0 in batch or math.prod(batch) > _INT_MAX:
        return None
    la = _layout(m, k, a.strides[-2], a.strides[-1], dtype.itemsize)
    lb = _layout(k, n, b.strides[-2], b.strides[-1], dtype.itemsize)
    if la is None or lb is None or max(la[1], lb[1]) > _INT_MAX:
        return None
    shape = batch + (m, n)
    if bias is not None and (batch or tri or not isinstance(bias, np.ndarray) or bias.shape != (n,)
                             or bias.dtype != dtype):
        return None
    if out is None:
        out = np.empty(shape, dtype)
    elif out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        return None
    return la, lb, m, n, k, batch, out


_fns: dict = {}


def _fn(dtype, batch: bool = False) -> tuple:
    """(the ctypes function, ``fused._call_native``'s kind, its address) of ``cblas_?gemm`` for
    ``dtype``, or with ``batch`` of ``cblas_?gemm_batch``."""
    key = (np.dtype(dtype), batch)
    got = _fns.get(key)
    if got is None:
        real = "s" if key[0] == np.float32 else "d"
        f = getattr(_mkl, f"cblas_{real}gemm_batch" if batch else f"cblas_{real}gemm")
        got = _fns[key] = (f, 3 if batch else 1 if real == "s" else 2, ctypes.cast(f, ctypes.c_void_p).value)
    return got


def _words(args: list, dtype) -> list[int]:
    """A ``cblas_?gemm`` call's arguments as the int64 words ``fused._call_native`` reads (alpha
    and beta as the bits of their floats)."""
    return [*args[:6], _bits(args[6], dtype), *args[7:11], _bits(args[11], dtype), *args[12:]]


# Products larger than this split over the threads instead: each is long enough that the split's
# cost is small, and two whole ones side by side both stream the shared operand from memory (the
# benchmark GPT's LM head, 2**30 multiply-adds each: 15.6 ms side by side, 14.5 split)
_PAIR_MACS = 1 << 29


def matmul_pair(first: tuple, second: tuple) -> bool:
    """Two independent 2-D products ``(a, b, out)`` at once, each whole on one thread: the first
    on the calling thread, the second on a pool thread (a linear's input and weight gradients,
    which read the same output gradient and take as many multiply-adds). Each thread packs its
    own operands once, where splitting each product over both threads packs the shared operand
    twice: the benchmark GPT's linear pairs took 3.2 ms less a step. False, with nothing computed,
    where MKL does not take both, either is too large (``_PAIR_MACS``) or there is no second
    thread. (Attention's pairs of gradients, stacks of 128 x 128 x 64 products, gained nothing:
    596 us side by side, 593 split.)"""
    calls = []
    for a, b, out in (first, second):
        p = _product(a, b, out)
        if p is None:
            return False
        la, lb, m, n, k, batch, out = p
        if batch or m * n * k > _PAIR_MACS:
            return False
        args = [_ROW_MAJOR, la[0], lb[0], m, n, k, 1.0, a.ctypes.data, la[1], b.ctypes.data, lb[1], 0.0,
                out.ctypes.data, n]
        calls.append((out.dtype, args))
    (mine, own), (theirs, other) = calls
    gemm = _fn(mine)[0]
    _, kind, addr = _fn(theirs)
    return fused._beside(lambda: gemm(*own), (kind, addr, [_words(other, theirs)]))


# A thread takes a part of a product of at least 2**23 multiply-adds (about 0.1 ms on a core):
# below that, handing it to the pool costs more than it saves.
_MACS_PER_PART = 1 << 23


def _bits(x: float, dtype) -> int:
    """A float as the int64 word ``fused._call_native`` passes as a float32 / float64 argument."""
    return int(np.array(x, dtype).view(np.int32 if dtype == np.float32 else np.int64))


_ones: dict = {}


def _ones_column(rows: int, dtype) -> np.ndarray:
    """``rows`` ones (kept, grown as needed): a block filled with a bias is the product of a
    column of ones with the bias as one row, which a pool thread computes without the GIL."""
    have = _ones.get(np.dtype(dtype))
    if have is None or have.size < rows:
        have = np.ones(max(rows, 1024), dtype)
        have.flags.writeable = False  # shared by every caller: nothing may write it
        _ones[np.dtype(dtype)] = have
    return have


def ones_row(n: int, dtype) -> np.ndarray:
    """A (1, n) row of ones (a read-only view of a kept array): its product with a matrix sums
    the matrix's rows."""
    return _ones_column(n, dtype)[:n].reshape(1, n)


def _gemm(la, lb, m: int, n: int, k: int, a: np.ndarray, b: np.ndarray, out: np.ndarray,
          bias: np.ndarray | None = None) -> None:
    """One GEMM, its rows (or, when it has more columns than rows, its columns) split over the pool:
    each part packs the operand it shares, fills its block of ``out`` with ``bias`` (if any: the
    product of a column of ones with the bias as one row) and adds its product there (beta 1).
    A part is a list of ``cblas_?gemm`` calls, made with ctypes on the calling thread and by the
    pool's threads without the GIL."""
    it, dtype = out.itemsize, out.dtype
    pa, pb, pc = a.ctypes.data, b.ctypes.data, out.ctypes.data
    beta = 0.0 if bias is None else 1.0
    gemm, kind, addr = _fn(dtype)
    ones = _ones_column(max(m, n), dtype) if bias is not None else None
    by_rows = m >= n
    row = (la[1] if la[0] == _NO_TRANS else 1) * it  # bytes from one row of op(a) to the next
    col = (1 if lb[0] == _NO_TRANS else lb[1]) * it  # from one column of op(b) to the next

    def calls(lo, hi):
        if by_rows:  # rows lo:hi of the product
            rows, cols, a_, b_, c_, first = hi - lo, n, pa + lo * row, pb, pc + lo * n * it, 0
        else:  # columns lo:hi
            rows, cols, a_, b_, c_, first = m, hi - lo, pa, pb + lo * col, pc + lo * it, lo
        product = [_ROW_MAJOR, la[0], lb[0], rows, cols, k, 1.0, a_, la[1], b_, lb[1], beta, c_, n]
        if bias is None:
            return [product]
        fill = [_ROW_MAJOR, _NO_TRANS, _NO_TRANS, rows, cols, 1, 1.0, ones.ctypes.data, 1,
                bias.ctypes.data + first * it, cols, 0.0, c_, n]
        return [fill, product]

    def own(lo, hi):
        for args in calls(lo, hi):
            gemm(*args)

    def native(lo, hi):
        return kind, addr, [_words(c, dtype) for c in calls(lo, hi)]

    per_item = max(1, fused._MIN_PER_THREAD * (n if by_rows else m) * k // _MACS_PER_PART)
    fused._split_native(own, native, m if by_rows else n, per_item=per_item, align=8 if by_rows else 16)


_WHOLE = ((0, 0, 0, 0),)  # one group: the whole matrices (no row offset, k from the product)


@functools.lru_cache(maxsize=256)
def _tri_groups(tri: str, m: int, k: int) -> tuple:
    """Groups of blocks of rows of a product whose left operand is triangular: (first row, rows,
    first column of ``a``, columns of ``a``), with the byte offsets they imply in ``_batch_call``.
    The rows split in blocks of at least 16 (8 blocks at most); a block of a lower ``a`` takes its
    columns up to its last row's diagonal, one of an upper ``a`` from its first row's. A causal
    attention's 128 x 128 probabilities times its values: 56 % of the multiply-adds, in MKL's
    products of 16 rows (measured: 306 against 467 us on one core, 32 heads)."""
    blocks = max(1, min(8, m // 16))
    size = -(-m // blocks)
    groups = []
    for r0 in range(0, m, size):
        r1 = min(m, r0 + size)
        c0, c1 = (0, min(k, r1)) if tri == "lower" else (min(k, r0), k)
        groups.append((r0, r1 - r0, c0, c1 - c0))  # no columns (an upper a's rows past k): zeros
    return tuple(groups)


def _batch_call(la, lb, m: int, n: int, k: int, a: np.ndarray, b: np.ndarray, out: np.ndarray,
                batch: tuple[int, ...], tri: str | None = None):
    """A stack of GEMMs as calls of ``cblas_?gemm_batch`` (MKL's group API: one group per block of
    rows, each over the stack's matrices): (``args(lo, hi)``, the matrices, a matrix's weight for
    ``fused._split_native``). ``args(lo, hi)`` are the words of
    the call for matrices lo:hi (its pointer arrays are kept alive with it). A group (r0, rows,
    c0, cols) multiplies rows r0:r0+rows and columns c0:c0+cols of ``a`` by rows c0:c0+cols of
    ``b`` into rows r0:r0+rows of ``out``; ``_WHOLE`` is the plain product."""
    groups = _tri_groups(tri, m, k) if tri else _WHOLE
    count, g = math.prod(batch), len(groups)
    plan = _batch_plan(la, lb, m, n, k, out.dtype.str, groups, a.strides[-2:], b.strides[-2], out.strides[-2])
    ints, scalars, (ga, gb, gc) = plan
    offsets = [_offsets(batch, x.shape[:-2], x.strides[:-2]) for x in (a, b, out)]
    bases = [np.uint64(x.ctypes.data) for x in (a, b, out)]
    at, w = ints.ctypes.data, ints.itemsize
    keep = []  # each call's pointer and size arrays, alive as long as the builder

    def args(lo, hi):
        pa, pb, pc = ((off[lo:hi][None, :] + grp[:, None]).reshape(-1) + base
                      for off, grp, base in zip(offsets, (ga, gb, gc), bases))
        size = np.full(g, hi - lo, np.int32)
        keep.append((pa, pb, pc, size, plan))
        return [_ROW_MAJOR, at, at + g * w, at + 2 * g * w, at + 3 * g * w, at + 4 * g * w, scalars.ctypes.data,
                pa.ctypes.data, at + 5 * g * w, pb.ctypes.data, at + 6 * g * w,
                scalars.ctypes.data + g * scalars.itemsize, pc.ctypes.data, at + 7 * g * w, g, size.ctypes.data]

    macs = m * n * k if groups == _WHOLE else sum(rows * cols for _, rows, _, cols in groups) * n
    return args, count, max(1, fused._MIN_PER_THREAD * macs // _MACS_PER_PART)


@functools.lru_cache(maxsize=256)
def _batch_plan(la, lb, m: int, n: int, k: int, dtype: str, groups: tuple, a_strides: tuple[int, int],
                b_row: int, c_row: int):
    """The per-group arrays of ``_batch_call`` (kept per shape and layout): the int32 arguments
    (transpositions, m, n, k, leading dimensions; one row each), alpha and beta, and each group's
    byte offsets into ``a``, ``b`` and ``out``."""
    whole = groups == _WHOLE
    rows = [m] if whole else [r for _, r, _, _ in groups]
    ks = [k] if whole else [c for _, _, _, c in groups]
    g = len(rows)
    ints = np.array([[la[0]] * g, [lb[0]] * g, rows, [n] * g, ks, [la[1]] * g, [lb[1]] * g, [n] * g], np.int32)
    alpha = [1.0] * g
    beta = [0.0] * g
    scalars = np.array(alpha + beta, np.dtype(dtype))
    ga = np.array([r0 * a_strides[0] + c0 * a_strides[1] for r0, _, c0, _ in groups], np.uint64)
    gb = np.array([c0 * b_row for _, _, c0, _ in groups], np.uint64)
    gc = np.array([r0 * c_row for r0, _, _, _ in groups], np.uint64)
    for x in (ints, scalars, ga, gb, gc):
        x.flags.writeable = False
    return ints, scalars, (ga, gb, gc)


def _from_environment() -> None:
    use(os.environ.get("FLOWSYS_BLAS", "auto"))


_from_environment()

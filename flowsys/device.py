"""Array modules per device: NumPy on ``cpu``, CuPy on ``cuda`` (imported only when asked for)."""

from __future__ import annotations

import ctypes
import os

import numpy as np

from flowsys.errors import DTypeError, FlowsysError

DEVICES = ("cpu", "cuda")


def array_module(device: str):
    """The ``xp`` kernels run against on ``device``."""
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy  # noqa: PLC0415 - optional dependency
        except ImportError:
            raise FlowsysError("device 'cuda' needs CuPy: pip install 'flowsys[cuda]' (CUDA 12) or 'flowsys[cuda13]' (CUDA 13) on a machine with a GPU") from None
        return cupy
    raise FlowsysError(f"unknown device {device!r}; expected one of {DEVICES}")


def to_device(array: np.ndarray, device: str):
    """The NumPy ``array`` on ``device``. CuPy computes float16; bfloat16 only where the
    installed CuPy can hold it."""
    if device == "cpu":
        return array
    xp = array_module(device)
    try:
        return xp.asarray(array)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise DTypeError(f"device {device!r}: the installed CuPy cannot hold {array.dtype.name} arrays ({e}); keep "
                         f"this tensor on 'cpu', or use fs.float16 on the GPU") from None


def module_of(array):
    if isinstance(array, (np.ndarray, np.generic)):
        return np
    xp = getattr(array, "xp", None)  # a global value knows its placement's module
    return xp if xp is not None else array_module("cuda")


def device_of(array) -> str:
    return "cpu" if isinstance(array, (np.ndarray, np.generic)) else "cuda"


def to_numpy(array) -> np.ndarray:
    """``array`` in host memory (a device array is copied; a NumPy one is returned as is)."""
    if isinstance(array, np.ndarray):
        return array
    return array.get() if hasattr(array, "get") and not isinstance(array, np.generic) else np.asarray(array)


def contiguous(a) -> np.ndarray:
    """``a`` as a C-contiguous NumPy array, copied only if it is not one already (unlike
    ``np.ascontiguousarray``, a 0-d array stays 0-d); a device array is copied to the host."""
    a = np.asarray(a) if isinstance(a, (np.ndarray, np.generic)) or not hasattr(a, "get") else a.get()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def share_cores(ranks: int) -> int:
    """Give each of ``ranks`` ranks sharing this machine its share of the cores for BLAS
    threads (as ``torchrun`` sets ``OMP_NUM_THREADS`` per process): ranks that each start a
    BLAS thread per core oversubscribe the machine and spin against each other, and a lone
    rank should use every core (Ray starts workers with one thread). Returns the threads per
    rank now, or 0 where the BLAS cannot be told. The fused kernels take the same share."""
    from flowsys.ops import fused  # noqa: PLC0415

    threads = max(1, cpu_cores() // max(1, ranks))
    fused.set_threads(threads)
    try:
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415
    except ImportError:  # an optional speed-up: without it BLAS keeps its own setting
        return 0
    ThreadpoolController().limit(limits=threads, user_api="blas")
    return threads


BLAS_THREAD_TIMEOUT = 18  # OpenBLAS's idle threads spin for 2**18 cycles (about 0.1 ms), then sleep


def settle_blas_threads() -> bool:
    """Let OpenBLAS's worker threads sleep soon after each call (2**18 cycles instead of its
    default 2**28, about 0.1 s), unless ``OPENBLAS_THREAD_TIMEOUT`` is set already.

    A training step alternates GEMMs with elementwise kernels on the same cores; a BLAS thread
    still spinning for its next GEMM takes a core from the fused kernels' threads (7 % of the
    benchmark GPT step on two cores). OpenBLAS reads the setting when its threads start, so
    they are restarted here, once, at import, before any other thread of ours runs BLAS.
    Returns whether it was applied (False for another BLAS or an OpenBLAS without the calls)."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return False
    try:
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415
    except ImportError:
        return False
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(BLAS_THREAD_TIMEOUT)
    done = False
    for lib in ThreadpoolController().lib_controllers:
        dl = getattr(lib, "dynlib", None)
        if lib.internal_api != "openblas" or dl is None or not all(
                hasattr(dl, f) for f in ("openblas_read_env", "blas_thread_shutdown_", "blas_thread_init")):
            continue
        dl.openblas_read_env()
        dl.blas_thread_shutdown_()
        dl.blas_thread_init()
        done = True
    return done


# glibc's malloc hands an array of 128 KiB or more its own mapping (or, once such arrays have
# been freed, raises that threshold up to 32 MiB) and returns the top of its heap to the system
# once 2x that much is free there. A training step allocates and frees the same large
# activations every step, so each step page-faults them in afresh: the GPT benchmark's LM-head
# product (a 16 MiB output) took 15 ms in the step against 8 ms with its memory kept.
MALLOC_MMAP_THRESHOLD = 32 << 20  # the largest glibc takes: arrays up to it come from the heap
MALLOC_TRIM_THRESHOLD = 512 << 20  # free memory the heap keeps before it gives any back


def tune_malloc() -> bool:
    """Keep large arrays' memory in the process between steps (glibc's ``mallopt``): arrays up to
    :data:`MALLOC_MMAP_THRESHOLD` come from the heap, which keeps up to
    :data:`MALLOC_TRIM_THRESHOLD` free, and every thread allocates from that one heap (one arena,
    unless ``MALLOC_ARENA_MAX`` is set). Not applied when ``FLOWSYS_MALLOC=0`` or the user set
    glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``; returns whether it was
    (False off glibc)."""
    if os.environ.get("FLOWSYS_MALLOC", "1").lower() in ("0", "false", "off", "no") or \
            "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's malloc.h
    done = bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold,
                                                                                     MALLOC_TRIM_THRESHOLD))
    if "MALLOC_ARENA_MAX" not in os.environ:
        # One arena for every thread: a step's kernels run on a worker thread, whose own arena
        # gives its heaps back between steps regardless of the trim threshold (the benchmark
        # GPT's graph step: 217 -> 204 ms when PyTorch steps run in between)
        mallopt(m_arena_max, 1)
    return done

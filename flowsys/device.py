"""Array modules per device: NumPy on ``cpu``, CuPy on ``cuda`` (imported only when asked for)."""

from __future__ import annotations

import os

import numpy as np

from flowsys.errors import FlowsysError

DEVICES = ("cpu", "cuda")


def array_module(device: str):
    """The ``xp`` kernels run against on ``device``."""
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy  # noqa: PLC0415 - optional dependency
        except ImportError:
            raise FlowsysError("device 'cuda' needs CuPy: pip install 'flowsys[cuda]' on a machine with a GPU") from None
        return cupy
    raise FlowsysError(f"unknown device {device!r}; expected one of {DEVICES}")


def module_of(array):
    if isinstance(array, (np.ndarray, np.generic)):
        return np
    xp = getattr(array, "xp", None)  # a global value knows its placement's module
    return xp if xp is not None else array_module("cuda")


def device_of(array) -> str:
    return "cpu" if isinstance(array, (np.ndarray, np.generic)) else "cuda"


def to_numpy(array) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.get()


def contiguous(a) -> np.ndarray:
    """``a`` as a C-contiguous NumPy array, copied only if it is not one already (unlike
    ``np.ascontiguousarray``, a 0-d array stays 0-d)."""
    a = np.asarray(a)
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

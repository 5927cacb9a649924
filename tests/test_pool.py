"""The fused kernels' thread pool (flowsys.ops.fused._SpinPool): parts split over its threads
give what one thread gives; a part's error reaches the caller; a pool another thread holds is
not waited for; a thread gone to sleep is woken for its next part; generated kernels start the
other parts themselves (``_release``); BLAS parts run on the pool's threads without the GIL."""

from __future__ import annotations

import ctypes
import threading
import time

import numpy as np
import pytest

from flowsys.ops import fused, fusion

pytestmark = pytest.mark.skipif(fused.numba is None, reason="the pool's handshake is compiled by Numba")


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setattr(fused, "_MIN_PER_THREAD", 1)
    monkeypatch.setattr(fused, "_threads", 3)


def _filler(out, record=None):
    def fn(lo, hi):
        if record is not None:
            record.append((threading.current_thread().name, lo, hi))
        out[lo:hi] = np.arange(lo, hi)
    return fn


def test_parts_cover_the_range_once_each_on_the_pool_threads(two_threads):
    out, record = np.zeros(1000), []
    fused._split(_filler(out, record), 1000)
    np.testing.assert_array_equal(out, np.arange(1000))
    assert sorted((lo, hi) for _, lo, hi in record) == [(0, 333), (333, 667), (667, 1000)]
    names = {name for name, lo, _ in record if lo > 0}
    assert all(name.startswith("flowsys-pool-") for name in names) and len(names) == 2
    out2 = np.zeros(1000)
    fused._split(_filler(out2), 1000, align=64)  # bounds multiples of align
    np.testing.assert_array_equal(out2, np.arange(1000))


def test_an_error_in_a_pool_part_reaches_the_caller_and_the_pool_goes_on(two_threads):
    def fail(lo, hi):
        if lo > 0:
            raise ValueError(f"part {lo}:{hi} failed")

    with pytest.raises(ValueError, match="part 333:667 failed"):
        fused._split(fail, 1000)
    out = np.zeros(1000)
    fused._split(_filler(out), 1000)
    np.testing.assert_array_equal(out, np.arange(1000))


def test_a_held_pool_is_not_waited_for(two_threads):
    """Ranks of one process share the pool: while one holds it, another runs its kernel alone."""
    fused._split(lambda lo, hi: None, 1000)  # the pool exists
    assert fused._pool_lock.acquire()
    try:
        record = []
        fused._split(_filler(np.zeros(10), record), 10)
        assert record == [(threading.current_thread().name, 0, 10)]
    finally:
        fused._pool_lock.release()


def test_callers_on_many_threads_all_get_their_results(two_threads):
    results, errors = {}, []

    def caller(k):
        try:
            for _ in range(50):
                out = np.zeros(500)
                fused._split(_filler(out), 500)
                assert (out == np.arange(500)).all()
            results[k] = True
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 4


def test_a_sleeping_thread_is_woken_for_its_next_part(two_threads):
    before = fused.SPIN_SECONDS
    try:
        fused.set_spin(1e-5)  # the threads sleep almost at once
        for _ in range(20):
            out = np.zeros(100)
            fused._split(_filler(out), 100)
            np.testing.assert_array_equal(out, np.arange(100))
            time.sleep(0.002)
        assert any(fused._pool.sleeping)
    finally:
        fused.set_spin(before)


def test_generated_kernels_start_the_other_parts_themselves(two_threads):
    """A fused elementwise kernel split three ways equals NumPy; its parts ran on the pool."""
    x = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
    program = (("exp", (("in", 0),), ()), ("mul", (("t", 0), ("in", 1)), ()))
    ticket_before = int(fused._pool.ctl[0, 0]) if fused._pool is not None else 0
    out = fusion._run_numba(program, [x, x])
    np.testing.assert_allclose(out, np.exp(x) * x, rtol=1e-5)
    assert fused._pool is not None and int(fused._pool.ctl[0, 0]) > ticket_before


def test_native_parts_run_a_c_function_without_the_gil(two_threads):
    """``_split_native``: the pool's threads call a C function from posted words (here
    ``cblas``-shaped calls to NumPy's own OpenBLAS are not assumed: MKL where installed)."""
    from flowsys.ops import blas

    if not blas.available():
        pytest.skip("MKL's runtime is not installed")
    lib = blas._mkl
    addr = ctypes.cast(lib.cblas_dgemm, ctypes.c_void_p).value
    a = np.random.default_rng(1).standard_normal((90, 7))
    b = np.random.default_rng(2).standard_normal((7, 5))
    out = np.zeros((90, 5))
    one, zero = blas._bits(1.0, np.float64), blas._bits(0.0, np.float64)

    def words(lo, hi):
        return [101, 111, 111, hi - lo, 5, 7, one, a.ctypes.data + lo * 7 * 8, 7, b.ctypes.data, 5, zero,
                out.ctypes.data + lo * 5 * 8, 5]

    def own(lo, hi):
        lib.cblas_dgemm(*words(lo, hi)[:6], 1.0, *words(lo, hi)[7:11], 0.0, *words(lo, hi)[12:])

    fused._split_native(own, lambda lo, hi: (2, addr, [words(lo, hi)]), 90)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12)

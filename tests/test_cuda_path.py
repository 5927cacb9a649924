"""The cuda placement's path through the driver, the plans and the workers, without a GPU.

``FakeCupy`` stands in for CuPy: NumPy's functions under another module (so the kernels take
their ``xp is not np`` branches, CuPy's), and ``asarray`` copies a host array into a separate
"device" array (an ``ndarray`` subclass with CuPy's ``get()``). A job laid out on ``cuda`` then
runs as on a GPU: its plans carry each value's device and the NCCL order, the worker places what
it is fed on the device and keeps the placed parameters, updates reach them in place, and the
NCCL code path (here the strict communicator) carries the communication. Losses must equal the
CPU run's step for step: a parameter updated in a copy the worker does not keep, or a value left
on the wrong side, would show. What a real GPU adds (CuPy's kernels, NCCL itself) is
``benchmarks/gpu_smoke.py``'s to check.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from actors.backends import LocalBackend
from flowsys import runtime
from flowsys.train import job_from_dict, run


class DeviceArray(np.ndarray):
    """An array in the fake device's memory."""

    def get(self) -> np.ndarray:
        return np.array(self, copy=True).view(np.ndarray)


class FakeCupy(types.ModuleType):
    def __init__(self):
        super().__init__("cupy")
        self.copies = 0  # host -> device copies

    def __getattr__(self, name):
        return getattr(np, name)

    def asarray(self, a, dtype=None):
        if isinstance(a, DeviceArray):
            return a if dtype is None or a.dtype == dtype else a.astype(dtype)
        self.copies += 1
        return np.array(a, dtype=dtype, copy=True).view(DeviceArray)


def _fake_cupyx(monkeypatch) -> None:
    """``cupyx.scipy.special.erf`` (GELU's on CuPy), as the NumPy path computes it."""
    from flowsys.ops.elementwise import erf

    names = ("cupyx", "cupyx.scipy", "cupyx.scipy.special")
    mods = {name: types.ModuleType(name) for name in names}
    mods["cupyx"].scipy = mods["cupyx.scipy"]
    mods["cupyx.scipy"].special = mods["cupyx.scipy.special"]
    mods["cupyx.scipy.special"].erf = lambda x: erf(np, x)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    _fake_cupyx(monkeypatch)
    yield fake
    runtime.shutdown()


def _losses(parallel: dict, device: str, monkeypatch) -> tuple[list[float], LocalBackend]:
    monkeypatch.setenv("FLOWSYS_DEVICE", device)  # what `flowsys launch --device` sets
    runtime.shutdown()
    backend = runtime._backend = LocalBackend(timeout=20, ordered="strict")
    job = job_from_dict({"model": dict(vocab_size=256, block_size=16, n_layer=2, n_head=4, n_embd=32),
                         "data": {"batch_size": 8, "max_bytes": 50_000},
                         "train": {"steps": 3, "log_every": 1, "eval_batches": 1}, "parallel": parallel})
    return run(job, log=lambda *a: None)["losses"], backend


@pytest.mark.parametrize("parallel", [dict(dp=2), dict(tp=2, pp=2, micro_batches=2, zero_stage=0)],
                         ids=["dp2", "tp2xpp2"])
def test_a_job_on_cuda_placements_trains_as_on_the_cpu(fake_cupy, monkeypatch, parallel):
    cpu, _ = _losses(parallel, "cpu", monkeypatch)
    copies = fake_cupy.copies
    cuda, backend = _losses(parallel, "cuda", monkeypatch)
    np.testing.assert_allclose(cuda, cpu, rtol=1e-6)
    assert fake_cupy.copies > copies
    w = backend.workers[0]
    plan = next(rp for rp in w.plans.values() if rp.comm_order)
    assert plan.values and all(v.device == "cuda" for v in plan.values if v.sbp)  # each value's device
    assert all(isinstance(a, DeviceArray) for a in w.resident.values())  # parameters stay on the device
    assert w.ordered.hub.log[0], "the communication went through the NCCL code path"

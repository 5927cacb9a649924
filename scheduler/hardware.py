"""Hardware specs for the cost model: what a device computes, moves and holds, and how ranks talk.

A spec is a YAML file (``scheduler/hardware/*.yaml``, or any path); :func:`load_hardware` reads it
into a :class:`Hardware`:

- ``device``: the kind (``cpu`` or ``cuda``), the dense peak FLOP/s per dtype (``peak_flops``),
  memory bandwidth and size; for GPUs also what a large GEMM reaches of the peak per dtype
  (``gemm_efficiency``, so :meth:`Hardware.gemm_peak` is ``peak(dtype) * efficiency``) and what
  a streaming copy reaches of the nominal bandwidth (``memory_efficiency``,
  :meth:`Hardware.achieved_bandwidth`); both default to 1.0;
- ``node``: devices per node, and cores per node when devices are simulated on shared cores;
- ``links``: the intra- and inter-node links (bandwidth per rank and direction, latency per
  message, CPU overhead per message at each end); :meth:`Hardware.link` picks one for two ranks;
- ``runtime``: the actor runtime's own costs (per firing, per step, per rank, the driver's feed
  bandwidth), optionally per backend (``local``, ``ray``).

``probe`` in a spec stands for a value measured on this machine when the spec is loaded (a GEMM
for peak FLOP/s, a copy for memory bandwidth, the OS for memory and cores). With ``kernels:
measure`` each distinct kernel of a plan is timed once here (:func:`measure_kernel`,
:func:`measure_collective`).

>>> hw = load_hardware("a100-80g")
>>> hw.peak("bfloat16") > hw.gemm_peak("bfloat16") > 0
True
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flowsys.errors import ConfigError

HARDWARE_DIR = Path(__file__).resolve().parent / "hardware"


@dataclass(frozen=True)
class Link:
    bandwidth: float       # bytes/s, one direction, per rank
    latency: float         # seconds a message is in flight
    overhead: float = 0.0  # CPU seconds each end spends per message (a transport's own work)


@dataclass(frozen=True)
class Hardware:
    """A hardware spec (see the module docstring and ``scheduler/hardware/``)."""

    name: str
    device: str                      # "cpu" or "cuda"
    peak_flops: dict[str, float]     # per dtype name, FLOP/s (dense: no structured sparsity)
    memory_bandwidth: float          # bytes/s, nominal
    memory: float                    # bytes per device
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    op_overhead: float = 2e-5        # seconds of runtime work per actor firing, beyond its kernel
    step_overhead: float = 1e-3      # the driver's fixed cost per step
    rank_overhead: float = 0.0       # ... and its cost per rank it drives
    wire_bandwidth: float = 1e9      # bytes/s at which the driver feeds and collects a step's tensors
    cores_per_node: int | None = None  # set when devices share a node's cores (simulated devices)
    shared_interpreter: bool = False   # devices are threads of one Python process (the local backend)
    kernels: str = "roofline"          # or "measure": time each distinct kernel once on this machine
    kernel_scale: float = 1.0          # measured kernels run this much slower inside a step's firings
    # what n ranks running at once on a node achieve together, in ranks at full speed: a number
    # (the same for every n) or {n: throughput} measured (default: the cores, or 1 under one interpreter)
    parallel_ranks: float | dict[int, float] | None = None
    gemm_efficiency: dict[str, float] = field(default_factory=dict)  # per dtype: large GEMM / peak
    memory_efficiency: float = 1.0   # achieved / nominal memory bandwidth (a streaming copy)
    source: str = ""

    def peak(self, dtype: str = "float32") -> float:
        """Dense peak FLOP/s for ``dtype`` (the float32 peak for a dtype the spec does not list)."""
        return self.peak_flops.get(dtype) or self.peak_flops["float32"]

    def gemm_peak(self, dtype: str = "float32") -> float:
        """FLOP/s a large matrix product reaches in ``dtype``: ``peak(dtype)`` times the spec's
        GEMM efficiency for that dtype (1.0 where the spec gives none)."""
        key = dtype if self.peak_flops.get(dtype) else "float32"  # the dtype whose peak applies
        return self.peak(dtype) * self.gemm_efficiency.get(key, 1.0)

    def achieved_bandwidth(self) -> float:
        """Bytes/s a streaming kernel reaches: ``memory_bandwidth * memory_efficiency``."""
        return self.memory_bandwidth * self.memory_efficiency

    def link(self, a: int, b: int) -> Link:
        return self.intra_node if a // self.devices_per_node == b // self.devices_per_node else self.inter_node

    def replace(self, **changes: Any) -> Hardware:
        return dataclasses.replace(self, **changes)


def available() -> list[str]:
    """The hardware specs that ship with flowsys, by name."""
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))


def load_hardware(spec: str | os.PathLike, backend: str | None = None) -> Hardware:
    """A hardware spec by name (``cpu``, ``a100-40g``, ``a100-80g``, ``h100-80g``, ``h200``: see
    :func:`available`) or by path to a YAML file. A spec's ``runtime`` section may give the
    runtime's costs per backend (``local``, ``ray``); ``backend`` picks one (default: ``ray``,
    else the first)."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = HARDWARE_DIR / f"{spec}.yaml"
    if not path.exists():
        raise ConfigError(f"hardware spec {os.fspath(spec)!r} not found: give a YAML file or one of {available()}")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        dev, node, links = raw["device"], raw["node"], raw["links"]
        peak = dev["peak_flops"]
        if peak == "probe":
            peak = {"float32": probe_gemm(np.float32), "float64": probe_gemm(np.float64)}
        peak = {k: float(v) for k, v in peak.items()}
        bandwidth = probe_memory_bandwidth() if dev["memory_bandwidth"] == "probe" else float(dev["memory_bandwidth"])
        memory = _physical_memory() if dev.get("memory") == "probe" else float(dev["memory"])
        cores = node.get("cores")
        cores = os.cpu_count() or 1 if cores == "probe" else cores
        runtime = raw.get("runtime", {}) or {}
        if runtime and all(isinstance(v, dict) for v in runtime.values()):  # per backend
            if backend is not None and backend not in runtime:
                raise ConfigError(f"hardware spec {os.fspath(path)} has runtime costs for {sorted(runtime)}, "
                                  f"not for backend {backend!r}")
            runtime = runtime[backend or ("ray" if "ray" in runtime else next(iter(runtime)))]
        hw = Hardware(
            name=str(raw.get("name", path.stem)), device=str(dev.get("kind", "cpu")),
            peak_flops=peak, memory_bandwidth=bandwidth, memory=memory,
            devices_per_node=int(node["devices"]), cores_per_node=int(cores) if cores else None,
            intra_node=_link(runtime.get("intra_node") or links["intra_node"]),
            inter_node=_link(runtime.get("inter_node") or links["inter_node"]),
            kernel_scale=float(runtime.get("kernel_scale", 1.0)),
            op_overhead=float(runtime.get("op_overhead", 2e-5)), step_overhead=float(runtime.get("step_overhead", 1e-3)),
            rank_overhead=float(runtime.get("rank_overhead", 0.0)),
            wire_bandwidth=float(runtime.get("wire_bandwidth", 1e9)),
            shared_interpreter=bool(runtime.get("shared_interpreter", False)),
            parallel_ranks=_parallel(runtime.get("parallel_ranks")),
            gemm_efficiency=_gemm_efficiency(path, dev.get("gemm_efficiency"), peak),
            memory_efficiency=_efficiency(path, "device.memory_efficiency", dev.get("memory_efficiency", 1.0)),
            kernels=str(dev.get("kernels", "roofline")), source=os.fspath(path))
        if hw.kernels not in ("roofline", "measure"):
            raise ValueError(f"device.kernels must be roofline or measure, not {hw.kernels!r}")
        return hw
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"hardware spec {os.fspath(path)}: missing or malformed entry ({type(e).__name__}: {e}); "
                          f"see {HARDWARE_DIR / 'a100-80g.yaml'} for the fields") from None


def _link(raw: dict) -> Link:
    return Link(float(raw["bandwidth"]), float(raw["latency"]), float(raw.get("overhead", 0.0)))


def _parallel(value) -> float | dict[int, float] | None:
    if not value:
        return None
    if isinstance(value, dict):
        return {int(k): float(v) for k, v in value.items()}
    return float(value)


def _efficiency(path: Path, key: str, value) -> float:
    """An achieved/peak ratio from a spec: a number in (0, 1]."""
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"hardware spec {os.fspath(path)}: {key} is {value}, but an efficiency is achieved / "
                          f"peak, a number in (0, 1]; give the measured fraction (e.g. 0.85), or leave it out for 1.0")
    return value


def _gemm_efficiency(path: Path, raw, peak: dict[str, float]) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"hardware spec {os.fspath(path)}: device.gemm_efficiency must map dtypes to "
                          f"efficiencies (e.g. {{bfloat16: 0.85}}), not {raw!r}")
    unknown = sorted(set(raw) - set(peak))
    if unknown:
        raise ConfigError(f"hardware spec {os.fspath(path)}: device.gemm_efficiency names {unknown}, which "
                          f"device.peak_flops does not list ({sorted(peak)}); give each dtype's peak too, or fix the name")
    return {str(k): _efficiency(path, f"device.gemm_efficiency.{k}", v) for k, v in raw.items()}


# ----------------------------------------------------------------------------------- probes
_probes: dict[str, float] = {}


def probe_gemm(dtype=np.float32, n: int = 1024, repeats: int = 5) -> float:
    """Peak FLOP/s of a square GEMM on this machine (best of ``repeats``), measured once per process."""
    key = f"gemm-{np.dtype(dtype).name}-{n}"
    if key not in _probes:
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
        a @ b  # warm up the BLAS threads
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        _probes[key] = 2 * n**3 / best
    return _probes[key]


def probe_memory_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Bytes/s read plus written by a large copy (best of ``repeats``), measured once per process."""
    if "memory" not in _probes:
        src = np.ones(nbytes // 8)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
        _probes["memory"] = 2 * nbytes / best
    return _probes["memory"]


# ---------------------------------------------------------------------------- kernel timers
_kernel_times: dict[tuple, float] = {}
_MEASURE_LIMIT = 256 << 20  # kernels touching more bytes than this are not timed: the roofline answers


def measure_kernel(name: str, inputs: list[tuple[tuple[int, ...], np.dtype]], attrs: dict) -> float:
    """Seconds one registered op's kernel takes on inputs of these shapes and dtypes on this
    machine (best of five, warm, after a warm-up), measured once per process per distinct call.
    Integer inputs are zeros (valid indices for every gather), floats are uniform in [0.5, 1.5)
    (in every op's domain: a log or a square root of a negative sample would time NaN paths). Inside
    a step kernels run slower (cold caches, fresh outputs): ``Hardware.kernel_scale`` says how
    much, as fitted by ``flowsys.calibrate``."""
    from flowsys.ops import OPS  # noqa: PLC0415
    from flowsys.ops.registry import is_floating  # noqa: PLC0415

    key = (name, tuple((s, d.name) for s, d in inputs), repr(sorted(attrs.items())))
    if key not in _kernel_times:
        rng = np.random.default_rng(0)
        arrays = []
        for shape, dtype in inputs:
            if is_floating(dtype):  # bfloat16 (ml_dtypes, kind "V") included
                arrays.append(rng.uniform(0.5, 1.5, shape).astype(dtype))
            elif dtype.kind == "b":
                arrays.append(rng.random(shape) < 0.5)
            else:
                arrays.append(np.zeros(shape, dtype=dtype))
        kernel = OPS[name].kernel
        try:
            kernel(np, *arrays, **attrs)
            _kernel_times[key] = min(_timed(lambda: kernel(np, *arrays, **attrs)) for _ in range(5))
        except Exception:  # noqa: BLE001 - inputs the kernel rejects (data-dependent ops): no time known
            _kernel_times[key] = 0.0
    return _kernel_times[key]


def clear_kernel_times() -> None:
    """Forget every kernel time measured so far (they are measured again when next needed)."""
    _kernel_times.clear()


def measure_collective(name: str, attrs: dict, x: tuple[tuple[int, ...], np.dtype], n: int) -> float:
    """Seconds of one rank's local work in a collective of ``n`` ranks on its input ``x`` (the
    algorithm's copies and reductions), from running every rank's schedule in this thread."""
    from comm.inprocess import drive  # noqa: PLC0415
    from flowsys.boxing import plan_collective  # noqa: PLC0415

    key = ("collective", name, x[0], x[1].str, n, repr(sorted(attrs.items())))
    if key not in _kernel_times:
        arrays = [np.random.default_rng(i).standard_normal(x[0]).astype(x[1]) for i in range(n)]
        try:
            drive([plan_collective(name, attrs, i, n, arrays[i]) for i in range(n)])
            _kernel_times[key] = min(_timed(lambda: drive([plan_collective(name, attrs, i, n, arrays[i])
                                                           for i in range(n)])) for _ in range(3)) / n
        except Exception:  # noqa: BLE001 - an algorithm this probe cannot drive: copies only
            _kernel_times[key] = 2 * math.prod(x[0]) * x[1].itemsize / probe_memory_bandwidth()
    return _kernel_times[key]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16.0 * 2**30

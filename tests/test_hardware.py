"""Hardware specs (scheduler/hardware.py, scheduler/hardware/*.yaml): every shipped spec loads, the
GPU specs carry NVIDIA's dense peaks and cite every figure, efficiencies only ever lower a peak,
and a bad spec is a ConfigError that names its file."""

import re

import pytest

import scheduler.cost
import scheduler.hardware
from flowsys.errors import ConfigError
from scheduler.hardware import HARDWARE_DIR, Hardware, Link, available, load_hardware

GPU_SPECS = ["a100-40g", "a100-80g", "h100-80g", "h200"]
GiB = 2**30


@pytest.fixture
def no_probes(monkeypatch):
    """``probe`` values without measuring (cpu.yaml): fixed numbers, instantly."""
    monkeypatch.setattr(scheduler.hardware, "probe_gemm", lambda dtype, n=1024, repeats=5: 1e11)
    monkeypatch.setattr(scheduler.hardware, "probe_memory_bandwidth", lambda nbytes=0, repeats=5: 2e10)
    monkeypatch.setattr(scheduler.hardware, "_physical_memory", lambda: 16.0 * GiB)


def test_every_shipped_spec_loads(no_probes):
    assert set(GPU_SPECS) | {"cpu"} <= set(available())
    for name in available():
        hw = load_hardware(name)
        assert hw.name == name and hw.source.endswith(f"{name}.yaml")
        assert hw.peak("float32") > 0 and hw.memory_bandwidth > 0 and hw.memory > 0 and hw.devices_per_node >= 1


def test_dense_peaks_are_the_datasheet_figures():
    a100, h100, h200 = load_hardware("a100-80g"), load_hardware("h100-80g"), load_hardware("h200")
    assert a100.peak("bfloat16") == 312e12 and a100.peak("tf32") == 156e12 and a100.peak("float32") == 19.5e12
    assert h100.peak("bfloat16") == 989.4e12 and h100.peak("float16") == 989.4e12  # not the sparse 1,979
    assert h100.peak("tf32") == 494.7e12 and h100.peak("float32") == 66.9e12
    assert h200.peak_flops == h100.peak_flops  # the same GH100 chip and clocks
    assert load_hardware("a100-40g").peak_flops == a100.peak_flops
    assert (load_hardware("a100-40g").memory_bandwidth, a100.memory_bandwidth) == (1.555e12, 2.039e12)
    assert (h100.memory_bandwidth, h200.memory_bandwidth) == (3.35e12, 4.8e12)


def test_memory_sizes():
    assert load_hardware("a100-40g").memory == 40 * GiB
    assert load_hardware("a100-80g").memory == 80 * GiB == load_hardware("h100-80g").memory
    assert load_hardware("h200").memory == 141 * GiB


@pytest.mark.parametrize("name", GPU_SPECS)
def test_efficiencies_only_lower_the_peaks(name):
    hw = load_hardware(name)
    for dtype in hw.peak_flops:
        assert 0 < hw.gemm_peak(dtype) <= hw.peak(dtype)
    assert 0.75 < hw.gemm_peak("bfloat16") / hw.peak("bfloat16") < 0.9  # a measured large GEMM, not the peak
    assert 0.8 < hw.achieved_bandwidth() / hw.memory_bandwidth < 0.95
    # nodes of 8 GPUs: NVLink inside is faster and quicker than the InfiniBand rail between
    assert hw.devices_per_node == 8 and hw.link(0, 7) == hw.intra_node and hw.link(7, 8) == hw.inter_node
    assert hw.intra_node.bandwidth > 4 * hw.inter_node.bandwidth and hw.intra_node.latency < hw.inter_node.latency


def test_gemm_peak_and_achieved_bandwidth_arithmetic():
    hw = Hardware(name="x", device="cuda", peak_flops={"float32": 10.0, "bfloat16": 100.0}, memory_bandwidth=8.0,
                  memory=GiB, devices_per_node=8, intra_node=Link(1.0, 0.0), inter_node=Link(1.0, 0.0),
                  gemm_efficiency={"bfloat16": 0.5, "float32": 0.9}, memory_efficiency=0.75)
    assert hw.gemm_peak("bfloat16") == pytest.approx(50.0)
    assert hw.gemm_peak("float16") == pytest.approx(9.0)  # no float16 peak: float32's peak and efficiency
    assert hw.achieved_bandwidth() == pytest.approx(6.0)
    plain = hw.replace(gemm_efficiency={}, memory_efficiency=1.0)  # the defaults: the spec's own figures
    assert plain.gemm_peak("bfloat16") == 100.0 and plain.achieved_bandwidth() == 8.0


def test_a_probed_cpu_spec_is_unchanged_by_efficiencies(no_probes):
    cpu = load_hardware("cpu", "local")
    assert cpu.gemm_efficiency == {} and cpu.memory_efficiency == 1.0
    assert cpu.gemm_peak("float32") == cpu.peak("float32") == 1e11 and cpu.achieved_bandwidth() == 2e10


def test_cost_still_exports_the_spec_names():
    for name in ("Hardware", "Link", "HARDWARE_DIR", "available", "load_hardware", "probe_gemm",
                 "probe_memory_bandwidth", "measure_kernel", "measure_collective", "clear_kernel_times"):
        assert getattr(scheduler.cost, name) is getattr(scheduler.hardware, name), name


@pytest.mark.parametrize("name", GPU_SPECS)
def test_every_figure_cites_a_listed_source(name):
    """Each number in a GPU spec's device, node and links sections carries a comment naming a
    source (``[key]``) that the file's header lists."""
    text = (HARDWARE_DIR / f"{name}.yaml").read_text()
    listed = set(re.findall(r"^#\s+\[([\w-]+)\]", text, re.M))
    section, figures = None, 0
    for line in text.splitlines():
        if re.match(r"^\w", line):
            section = line.split(":")[0]
        elif section in ("device", "node", "links") and re.match(r"^\s+[\w-]+:\s*[{\d]", line):
            figures += 1
            cited = set(re.findall(r"\[([\w-]+)\]", line.partition("#")[2]))
            assert cited and cited <= listed, f"{name}.yaml: {line.strip()!r} cites {sorted(cited)} of {sorted(listed)}"
    assert figures >= 8


def _rewrite(tmp_path, old: str, new: str):
    """a100-80g.yaml with one line changed, as ``bad.yaml``."""
    text = (HARDWARE_DIR / "a100-80g.yaml").read_text()
    assert old in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def test_a_bad_spec_is_a_config_error_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"bad\.yaml.*missing or malformed.*memory_bandwidth"):
        load_hardware(_rewrite(tmp_path, "  memory_bandwidth: 2.039e12", "  # memory_bandwidth left out"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: device\.gemm_efficiency\.bfloat16 is 1\.2.*\(0, 1\]"):
        load_hardware(_rewrite(tmp_path, "bfloat16: 0.869", "bfloat16: 1.2"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: device\.memory_efficiency is 0\.0"):
        load_hardware(_rewrite(tmp_path, "memory_efficiency: 0.88", "memory_efficiency: 0.0"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: device\.gemm_efficiency names \['bf16'\]"):
        load_hardware(_rewrite(tmp_path, "bfloat16: 0.869", "bf16: 0.869"))

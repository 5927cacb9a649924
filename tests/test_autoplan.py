"""``flowsys plan --auto``: the analytic pre-filter prunes layouts that do not divide or do not fit,
naming why; the search lays out jobs whose own layout cannot run on the devices (12 devices and 16
heads; 30 blocks over 4 stages) and what it returns compiles and is predicted."""

import json
import re
from pathlib import Path

import pytest

from flowsys.autoplan import REASONS, Layout, analyse, candidates, memory_estimate, search
from flowsys.cli import main
from flowsys.errors import ConfigError
from flowsys.job import check_layout, job_from_dict
from flowsys.plan import plan_job
from scheduler.hardware import load_hardware

ROOT = Path(__file__).resolve().parents[1]


def _job(n_layer=2, n_head=4, n_embd=64, batch=16, parallel=None, precision="fp32"):
    return job_from_dict({"model": {"vocab_size": 256, "block_size": 32, "n_layer": n_layer, "n_head": n_head,
                                    "n_embd": n_embd},
                          "data": {"batch_size": batch}, "train": {"precision": precision},
                          "parallel": parallel or {}})


def _spec(tmp_path, memory: int) -> str:
    """The A100 spec with ``memory`` bytes per device."""
    text = (ROOT / "scheduler/hardware/a100-80g.yaml").read_text()
    path = tmp_path / "small.yaml"
    path.write_text(re.sub(r"(?m)^(\s*memory:\s*)\d+", rf"\g<1>{memory}", text, count=1))
    return str(path)


def test_prefilter_drops_layouts_that_do_not_divide_with_reasons():
    job = _job()  # 4 heads, 2 blocks, a batch of 16
    hw = load_hardware("a100-80g")
    kept, considered, pruned = candidates(job, 8, hw)
    # 10 factorisations of 8 into dp x tp x pp, 5 divisors of the batch, ZeRO 0-3, checkpointing off/on
    assert considered == 10 * 5 * 4 * 2 and considered == len(kept) + sum(pruned.values())
    assert pruned[REASONS["tp"]] == 5 * 4 * 2  # tp 8 does not divide 4 heads (the one such factorisation)
    assert pruned[REASONS["pp"]] > 0 and pruned[REASONS["batch"]] > 0 and pruned[REASONS["zero"]] > 0
    for c in kept:
        lay = c.layout
        assert lay.devices == 8 and 4 % lay.tp == 0 and lay.pp <= 2
        assert (16 // lay.micro_batches) % lay.dp == 0 and (lay.pp == 1 or lay.micro_batches >= lay.pp)
        check_layout(lay.apply(job), 8)
    assert [c.estimate_s for c in kept] == sorted(c.estimate_s for c in kept)
    # tp across nodes: 16 heads on 16 devices with 8 per node
    _, _, pruned = candidates(_job(n_head=16), 16, hw)
    assert pruned[REASONS["node"]] > 0


def test_prefilter_drops_layouts_that_do_not_fit_and_keeps_the_sharded_ones():
    job = _job()
    hw = load_hardware("a100-80g")
    model = analyse(job)
    plain, sharded = Layout(8, 1, 1, 0, 1, False), Layout(8, 1, 1, 3, 1, False)
    small = hw.replace(memory=(memory_estimate(job, plain, model) + memory_estimate(job, sharded, model)) / 2)
    kept, _, pruned = candidates(job, 8, small, model)
    layouts = {c.layout for c in kept}
    assert sharded in layouts and plain not in layouts
    assert pruned[REASONS["memory"]] > 0
    assert all(c.memory <= small.memory for c in kept)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_estimate_against_the_lowered_plan(precision):
    """Parameters, gradients and optimizer state as flowsys lays them out; the activations of a
    compiled GPT's peak, erring on the large side."""
    job = _job(n_layer=4, precision=precision)
    model = analyse(job)
    for lay in [Layout(2, 2, 1, 0, 1, False), Layout(4, 1, 1, 3, 2, False), Layout(2, 1, 2, 1, 4, True)]:
        summary = plan_job(lay.apply(job), lay.devices)
        lowered = max(r["parameters"] + r["gradients"] + r["optimizer_state"] + r["peak_activations"]
                      for r in summary["ranks"])
        assert 0.85 <= memory_estimate(job, lay, model) / lowered <= 1.6, lay


def test_auto_lays_out_12_devices_with_16_heads():
    job = _job(n_head=16, batch=12, parallel={"tp": 16})  # its own layout needs 16 devices
    with pytest.raises(ConfigError):
        check_layout(job, 12)
    result = search(job, 12, "a100-80g", top=3, simulate=3)
    assert result.own is None and 1 <= len(result.top) <= 3 and result.simulated == 3
    best = result.best
    assert best.layout.devices == 12 and 16 % best.layout.tp == 0 and best.fits and best.step_s > 0
    assert [r.step_s for r in result.top] == sorted(r.step_s for r in result.top)
    # the layout it returns compiles and is predicted again alike
    summary = plan_job(best.layout.apply(job), 12, hardware="a100-80g")
    assert summary["layout"]["tp"] == best.layout.tp
    assert summary["prediction"]["step_s"] == pytest.approx(best.step_s, rel=1e-6)


def test_auto_on_30_blocks_over_4_stages(tmp_path):
    """Stages need not divide the blocks (8, 7, 8, 7); the job's own pipeline is simulated beside
    the search's best, and memory is the constraint: on a device too small for the whole model
    only layouts that split it are kept."""
    job = _job(n_layer=30, n_embd=32, parallel={"pp": 4, "micro_batches": 4})
    hw = load_hardware("a100-80g")
    model = analyse(job)
    kept, _, _ = candidates(job, 4, hw, model)
    assert Layout(1, 1, 4, 0, 4, False) in {c.layout for c in kept}  # not pruned: 30 % 4 != 0 is no reason
    whole = memory_estimate(job, Layout(4, 1, 1, 0, 1, False), model)
    spec = _spec(tmp_path, int(whole * 0.8))
    result = search(job, 4, spec, simulate=1)
    assert result.own is not None and result.own.layout == Layout(1, 1, 4, 0, 4, False) and result.own.step_s > 0
    assert result.simulated == 2 and result.pruned[REASONS["memory"]] > 0
    best = result.best.layout
    assert best.pp > 1 or best.zero_stage > 0 or best.activation_checkpointing or best.micro_batches > 1
    check_layout(best.apply(job), 4)


def test_auto_says_why_nothing_fits(tmp_path):
    with pytest.raises(ConfigError, match=r"none of the \d+ layouts of 4 devices .*memory estimate over the device's"):
        search(_job(), 4, _spec(tmp_path, 1000))


def test_plan_auto_cli_table_and_json(capsys):
    job = str(ROOT / "examples/configs/tiny_3d.yaml")
    auto = ["plan", job, "--devices", "4", "--auto", "--hardware", "a100-80g"]
    assert main([*auto, "--simulate", "2", "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"auto layout for 4 devices on a100-80g: considered \d+, pruned \d+, simulated 2 in [\d.]+ s",
                        out[0])
    header = next(i for i, line in enumerate(out) if "step ms" in line)
    assert out[header].split()[:7] == ["#", "dp", "tp", "pp", "zero", "micro-batches", "ckpt"]
    assert "TFLOP/s/GPU" in out[header] and re.search(r"memory (GiB|MiB)", out[header]) and out[header].endswith("fits")
    rows = out[header + 1:header + 3]
    assert [r.split()[0] for r in rows] == ["1", "2"] and all(r.split()[-1] in ("yes", "NO") for r in rows)
    assert any(line.startswith("best: ") and "parallel.dp=" in line for line in out)
    assert main([*auto, "--simulate", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["simulated"] == 1 and result["devices"] == 4 and result["top"][0]["prediction"]["step_s"] > 0
    assert sum(result["pruned"].values()) + 1 <= result["considered"]

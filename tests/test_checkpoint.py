"""Checkpoints: saved under one layout, loaded under another (tp4, a pipeline split, one
device), the next losses equal the uninterrupted run's; an interrupted write is never loaded."""

import json

import numpy as np
import pytest

import flowsys as fs
from flowsys import optim
from flowsys.models.gpt import GPT, GPTConfig

B, S = fs.sbp.broadcast, fs.sbp.split
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


def _batches(n=6, batch=8):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, CFG.vocab_size, (batch, CFG.block_size)),
             rng.integers(0, CFG.vocab_size, (batch, CFG.block_size))) for _ in range(n)]


def _layout(model, kind):
    """Lay ``model`` out; the placement and SBP its batches take."""
    if kind == "dp2xtp2":
        p = fs.placement("cpu", [[0, 1], [2, 3]])
        model.to_global(p, GPT.parallel_plan(p, dp_axis=0, tp_axis=1))
        return p, (S(0), B)
    if kind == "tp4":
        p = fs.placement("cpu", [0, 1, 2, 3])
        model.to_global(p, GPT.parallel_plan(p, tp_axis=0))
        return p, B
    if kind == "pp2":
        p0, p1 = fs.placement("cpu", [0]), fs.placement("cpu", [1])
        model.pipeline([p0, p1])
        return p0, B
    return None, None


def _steps(model, opt, batches, placement, sbp):
    losses = []
    for x, y in batches:
        x, y = fs.tensor(x), fs.tensor(y)
        if placement is not None:
            x, y = x.to_global(placement, sbp), y.to_global(placement, sbp)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    fs.manual_seed(0)
    model = GPT(CFG)
    placement, sbp = _layout(model, "dp2xtp2")
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batches = _batches()
    _steps(model, opt, batches[:3], placement, sbp)
    fs.checkpoint.save(root, model, opt, step=3, extra={"data_position": 3})
    after = _steps(model, opt, batches[3:], placement, sbp)  # the uninterrupted run
    return root, batches, after


@pytest.mark.parametrize("kind", ["tp4", "pp2", "one device", "dp2xtp2"])
def test_resume_under_another_layout_gives_the_same_losses(saved, kind):
    root, batches, after = saved
    fs.manual_seed(123)  # a different initialisation: everything comes from the checkpoint
    model = GPT(CFG)
    placement, sbp = _layout(model, kind)
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    info = fs.checkpoint.load(root, model, opt)
    assert info["step"] == 3 and info["extra"] == {"data_position": 3}
    resumed = _steps(model, opt, batches[info["extra"]["data_position"]:], placement, sbp)
    np.testing.assert_allclose(resumed, after, rtol=1e-5)


def test_every_rank_writes_its_own_shards_and_the_manifest_comes_last(saved):
    root, _, _ = saved
    step = root / "step_000003"
    names = sorted(p.name for p in step.iterdir())
    assert names == ["MANIFEST.json", "meta.json"] + [f"rank_{r}.safetensors" for r in range(4)]
    meta = json.loads((step / "meta.json").read_text())
    wte = meta["tensors"]["param/transformer.wte.weight"]
    assert wte["placement"] == [[0, 1], [2, 3]] and wte["shape"] == [CFG.vocab_size, CFG.n_embd]
    assert meta["tensors"]["state/transformer.wte.weight/exp_avg"]["sbp"] == wte["sbp"]
    assert "rng" in meta and not any(p.suffix == ".tmp" for p in step.iterdir())


def test_an_interrupted_write_is_never_loaded(saved, tmp_path):
    root, _, _ = saved
    import shutil

    shutil.copytree(root / "step_000003", tmp_path / "step_000003")
    broken = tmp_path / "step_000004"
    shutil.copytree(root / "step_000003", broken)
    (broken / "MANIFEST.json").unlink()  # the writer died before the manifest
    truncated = tmp_path / "step_000005"
    shutil.copytree(root / "step_000003", truncated)
    with open(truncated / "rank_2.safetensors", "r+b") as f:  # died mid-file after a manifest (a stale one)
        f.truncate(100)
    assert fs.checkpoint.latest(tmp_path).name == "step_000003"
    model = GPT(CFG)
    assert fs.checkpoint.load(tmp_path, model)["step"] == 3
    with pytest.raises(fs.ConfigError, match="incomplete"):
        fs.checkpoint.load(broken, model)


def test_a_checkpoint_of_another_model_is_refused(saved):
    root, _, _ = saved
    other = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=16))
    with pytest.raises(fs.StateDictError, match="has shape"):
        fs.checkpoint.load(root, other)


@pytest.mark.parametrize("executor, zero, zero_after", [("plans", 0, 0), ("global", 0, 0), ("plans", 1, 1),
                                                        ("global", 1, 1), ("plans", 1, 0), ("global", 0, 1)])
def test_optimizer_state_kept_by_workers_is_saved_and_restored(tmp_path, executor, zero, zero_after):
    """Compiled steps on worker threads: the workers keep AdamW's moments; a checkpoint pulls them,
    and loading pushes them back, so resumed losses equal the uninterrupted run's."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_graph import TrainStep

    batches = _batches()

    def make(stage):
        fs.manual_seed(0)
        model = GPT(CFG)
        placement, sbp = _layout(model, "dp2xtp2")
        opt = optim.AdamW(model.parameters(), lr=1e-2)
        step = TrainStep(model, opt, 1, "plans")
        step.config.zero_stage = stage  # ZeRO 1: the state is sharded along dp, unlike the parameter
        return model, opt, step, placement, sbp

    def steps(step, some, placement, sbp):
        return [float(step(fs.tensor(x).to_global(placement, sbp), fs.tensor(y).to_global(placement, sbp)))
                for x, y in some]

    model, opt, step, placement, sbp = make(zero)
    steps(step, batches[:3], placement, sbp)
    fs.checkpoint.save(tmp_path, model, opt, step=3)
    assert not opt.state and all(p._home is not None for p in model.parameters())  # written by the workers
    after = steps(step, batches[3:], placement, sbp)
    model, opt, step, placement, sbp = make(zero_after)
    step.config.executor = executor
    steps(step, batches[:1], placement, sbp)  # the workers (or the driver) now hold other state
    fs.checkpoint.load(tmp_path, model, opt)
    np.testing.assert_allclose(steps(step, batches[3:], placement, sbp), after, rtol=1e-5)

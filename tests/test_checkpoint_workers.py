"""Checkpoints written and read by the workers: after compiled steps on a backend every worker
writes its own rank file from what it holds (no parameter bytes through the driver), the files
equal what the driver's path writes, every worker reads back just its shards (in any layout),
and a worker that cannot see the directory is named."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import flowsys as fs
from flowsys import checkpoint, optim
from flowsys.models.gpt import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_graph import TrainStep  # noqa: E402

B, S = fs.sbp.broadcast, fs.sbp.split
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)
LAYOUTS = {"dp2": 0, "dp2xtp2": 0, "dp2xtp2 zero1": 1, "dp2xtp2 zero3": 3}


def _batches(n=5, batch=8):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, CFG.vocab_size, (batch, CFG.block_size)),
             rng.integers(0, CFG.vocab_size, (batch, CFG.block_size))) for _ in range(n)]


def _job(kind, seed=0):
    fs.manual_seed(seed)
    model = GPT(CFG)
    if kind.startswith("dp2xtp2"):
        p = fs.placement("cpu", [[0, 1], [2, 3]])
        model.to_global(p, GPT.parallel_plan(p, dp_axis=0, tp_axis=1))
        sbp = (S(0), B)
    else:
        p = fs.placement("cpu", [0, 1])
        model.to_global(p, B)
        sbp = S(0)
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    step = TrainStep(model, opt, 1, "plans")
    step.config.zero_stage = LAYOUTS[kind]

    def run(batches):
        return [float(step(fs.tensor(x).to_global(p, sbp), fs.tensor(y).to_global(p, sbp))) for x, y in batches]
    return model, opt, run


@pytest.fixture
def backend(monkeypatch):
    """The local backend, counting the driver's pulls of parameters and optimizer state."""
    b = fs.init(backend="local")
    pulls = {"params": 0, "state": 0}
    for what, method in (("params", b.get_params), ("state", b.get_state)):
        def counted(keys, what=what, method=method):
            pulls[what] += 1
            return method(keys)
        monkeypatch.setattr(b, f"get_{what}", counted)
    b.pulls = pulls
    yield b
    fs.shutdown()


def _tensors(step_dir):
    """Every tensor of a checkpoint, assembled, and its metadata."""
    meta = json.loads((step_dir / "meta.json").read_text())
    with checkpoint.RankFiles(step_dir) as files:
        values = {k: checkpoint.read_box(files, k, info, [[0, n] for n in info["shape"]])
                  for k, info in meta["tensors"].items()}
    return values, meta


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_workers_write_what_the_driver_would_and_read_it_back(tmp_path, backend, monkeypatch, kind):
    batches = _batches()
    model, opt, run = _job(kind)
    run(batches[:2])
    checkpoint.save(tmp_path / "workers", model, opt, step=2)
    assert backend.pulls == {"params": 0, "state": 0}  # no parameter or state bytes came to the driver
    assert all(p._home is not None for p in model.parameters())
    with monkeypatch.context() as m:  # the driver's path: pull everything, write every file itself
        m.setattr(checkpoint, "_workers_of", lambda model, optimizer: None)
        checkpoint.save(tmp_path / "driver", model, opt, step=2)
    ours, meta = _tensors(tmp_path / "workers" / "step_000002")
    theirs, meta_driver = _tensors(tmp_path / "driver" / "step_000002")
    assert meta["tensors"] == meta_driver["tensors"]
    assert sorted(p.name for p in (tmp_path / "workers" / "step_000002").iterdir()) == \
        sorted(p.name for p in (tmp_path / "driver" / "step_000002").iterdir())
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    after = run(batches[2:])  # the uninterrupted run

    model, opt, run = _job(kind, seed=7)
    run(batches[:1])  # the workers hold other values and state now
    backend.pulls.update(params=0, state=0)
    checkpoint.load(tmp_path / "workers", model, opt)
    assert backend.pulls == {"params": 0, "state": 0} and not opt.state  # read by the workers
    assert all(p._home is not None for p in model.parameters())
    np.testing.assert_allclose(run(batches[2:]), after, rtol=1e-5)


@pytest.mark.parametrize("saved_as, loaded_as", [("dp2xtp2 zero1", "dp2xtp2 zero3"), ("dp2", "dp2xtp2 zero1"),
                                                 ("dp2xtp2 zero3", "dp2")])
def test_workers_read_a_checkpoint_of_another_layout(tmp_path, backend, saved_as, loaded_as):
    batches = _batches()
    model, opt, run = _job(saved_as)
    run(batches[:2])
    checkpoint.save(tmp_path, model, opt, step=2)
    after = run(batches[2:])
    model, opt, run = _job(loaded_as, seed=7)
    run(batches[:1])
    backend.pulls.update(params=0, state=0)
    checkpoint.load(tmp_path, model, opt)
    assert backend.pulls["params"] == 0 and all(p._home is not None for p in model.parameters())
    np.testing.assert_allclose(run(batches[2:]), after, rtol=1e-5)


def test_a_worker_that_cannot_see_the_directory_is_named(tmp_path, backend, monkeypatch):
    from actors.worker import Worker

    model, opt, run = _job("dp2")
    run(_batches(1))
    sees = Worker.sees
    monkeypatch.setattr(Worker, "sees", lambda self, path, token: self.rank != 1 and sees(self, path, token))
    with pytest.raises(fs.ConfigError, match=r"not visible to rank 1 \(node .*shared filesystem"):
        checkpoint.save(tmp_path, model, opt, step=1)
    assert not list(tmp_path.glob("step_000001/.flowsys-probe-*"))  # the probe is gone
    monkeypatch.setattr(Worker, "sees", sees)
    checkpoint.save(tmp_path, model, opt, step=1)
    monkeypatch.setattr(Worker, "sees", lambda self, path, token: self.rank != 0 and sees(self, path, token))
    with pytest.raises(fs.ConfigError, match=r"not visible to rank 0"):
        checkpoint.load(tmp_path, model, opt)

"""Checkpoints that are checked, locked and durable: a flipped byte is named (directory, file,
tensor) and loads nothing, `verify` and `latest_verified` find the newest good checkpoint, an
interrupted write is never loaded, one job writes a directory, two writers of one step do not
mix, `prune` keeps the newest, and the workers record the checksums of what they write."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import flowsys as fs
from flowsys import checkpoint
from flowsys.checkpoint import CheckpointCorrupt
from flowsys.models.gpt import GPT

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint_workers import _batches as _worker_batches  # noqa: E402
from test_checkpoint_workers import _job  # noqa: E402
from test_graph import CFG  # noqa: E402

WTE = "param/transformer.wte.weight"


def _model(seed):
    fs.manual_seed(seed)
    return GPT(CFG)


def _params(model):
    return {n: p.numpy().copy() for n, p in model.named_parameters()}  # (eager models: nothing is pulled)


def _flip(file: Path, key: str, at: int = 3) -> None:
    """Flip one byte of tensor ``key``'s data in a safetensors file (its size unchanged): byte 3
    of a float32 is its sign and high exponent bits, the kind of flip that loads as 3e38."""
    with open(file, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        begin = json.loads(f.read(n))[key]["data_offsets"][0]
        f.seek(8 + n + begin + at)
        byte = f.read(1)[0]
        f.seek(8 + n + begin + at)
        f.write(bytes([byte ^ 0x40]))


@pytest.fixture
def saved(tmp_path):
    """Steps 1 and 2 of an eager model, saved by the driver."""
    for step in (1, 2):
        checkpoint.save(tmp_path, _model(step), step=step)
    return tmp_path


def test_a_flipped_byte_is_named_and_loads_nothing(saved):
    step2 = saved / "step_000002"
    manifest = json.loads((step2 / "MANIFEST.json").read_text())
    assert set(manifest["sha256"]) == {"rank_0.safetensors", "meta.json"}
    assert WTE in manifest["crc32"]["rank_0.safetensors"]
    checkpoint.verify(step2)
    size = (step2 / "rank_0.safetensors").stat().st_size
    _flip(step2 / "rank_0.safetensors", WTE)
    assert (step2 / "rank_0.safetensors").stat().st_size == size and checkpoint.latest(saved) == step2

    model = _model(7)
    before = _params(model)
    named = rf"{re.escape(str(step2))}: rank_0\.safetensors holds {re.escape(WTE)} with crc32"
    with pytest.raises(CheckpointCorrupt, match=named):
        checkpoint.load(saved, model)
    assert isinstance(CheckpointCorrupt("x"), fs.StateDictError)
    for n, v in _params(model).items():
        np.testing.assert_array_equal(v, before[n], err_msg=n)
    with pytest.raises(CheckpointCorrupt, match=named):
        checkpoint.verify(step2)

    warnings = []
    assert checkpoint.latest_verified(saved, warn=warnings.append) == saved / "step_000001"
    assert len(warnings) == 1 and "step_000002" in warnings[0] and WTE in warnings[0]
    assert checkpoint.load(checkpoint.latest_verified(saved, warn=warnings.append), model)["step"] == 1
    np.testing.assert_array_equal(model.transformer.wte.weight.numpy(), _model(1).transformer.wte.weight.numpy())


def test_a_corrupt_header_or_meta_is_caught(saved):
    step2 = saved / "step_000002"
    data = bytearray((step2 / "rank_0.safetensors").read_bytes())
    data[9] ^= 0x01  # inside the JSON header: the tensors check, the file's sha256 does not
    (step2 / "rank_0.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match=r"rank_0\.safetensors"):
        checkpoint.verify(step2)
    step1 = saved / "step_000001"
    meta = (step1 / "meta.json").read_text()
    (step1 / "meta.json").write_text(meta.replace('"step": 1', '"step": 7'))  # same size, other bytes
    with pytest.raises(CheckpointCorrupt, match=r"step_000001: meta\.json has sha256"):
        checkpoint.load(step1, _model(0))
    warnings = []
    assert checkpoint.latest_verified(saved, warn=warnings.append) is None and len(warnings) == 2


def test_an_interrupted_write_is_never_loaded(saved):
    import shutil

    shutil.copytree(saved / "step_000002", saved / ".step_000003.tmp-0a1b2c3d")  # died before its rename
    broken = saved / "step_000004"
    shutil.copytree(saved / "step_000002", broken)
    text = (broken / "MANIFEST.json").read_text()
    (broken / "MANIFEST.json").write_text(text[:len(text) // 2])  # a torn manifest (an old writer's)
    assert checkpoint.latest(saved) == saved / "step_000002"
    with pytest.raises(fs.ConfigError, match=r"step_000004 is incomplete: its MANIFEST\.json is unreadable"):
        checkpoint.load(broken, _model(0))
    with pytest.raises(fs.ConfigError, match="incomplete"):
        checkpoint.verify(broken)
    warnings = []
    assert checkpoint.latest_verified(saved, warn=warnings.append) == saved / "step_000002"
    assert len(warnings) == 1 and "step_000004" in warnings[0]
    assert checkpoint.load(saved, _model(0))["step"] == 2
    with pytest.raises(fs.ConfigError, match=r"step_000004 exists already"):
        checkpoint.save(saved, _model(0), step=4)
    (broken / "MANIFEST.json").unlink()
    with pytest.raises(fs.ConfigError, match=r"step_000004 exists without a manifest.*delete it"):
        checkpoint.save(saved, _model(0), step=4)
    assert not list(saved.glob(".step_000004.tmp-*"))  # the refused saves left nothing behind


def test_one_job_writes_a_directory(tmp_path):
    path, host = tmp_path / "LOCK", socket.gethostname()
    with checkpoint.lock(tmp_path, "job-a") as held:
        assert held.took_over is None
        assert json.loads(path.read_text())["job_id"] == "job-a"
        with checkpoint.lock(tmp_path, "job-a"):  # the same job again: fine, the outer one releases
            pass
        assert path.exists()
        with pytest.raises(fs.ConfigError, match=rf"'job-a' \(pid {os.getpid()} on host {re.escape(host)}.*"
                                                 r"running: one job writes a checkpoint directory"):
            checkpoint.lock(tmp_path, "job-b")
    assert not path.exists()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path.write_text(json.dumps({"job_id": "job-old", "host": host, "pid": gone.pid, "time": time.time()}))
    warnings = []
    held = checkpoint.lock(tmp_path, "job-b", warn=warnings.append)
    assert held.took_over and re.search(rf"took over .*'job-old' \(pid {gone.pid}.*no longer running", held.took_over)
    assert warnings == [held.took_over] and json.loads(path.read_text())["job_id"] == "job-b"
    held.release()
    assert not path.exists()

    path.write_text(json.dumps({"job_id": "job-far", "host": "another-host", "pid": 1, "time": time.time()}))
    with pytest.raises(fs.ConfigError, match=rf"'job-far'.*another-host.*delete {re.escape(str(path))}"):
        checkpoint.lock(tmp_path, "job-b")
    assert checkpoint.lock(tmp_path, "job-far").took_over is None  # the same job (restarted elsewhere): fine


def test_two_writers_of_one_step_do_not_mix(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, _model(1), step=1)
    with pytest.raises(fs.ConfigError, match="step_000001 exists already"):
        checkpoint.save(tmp_path, _model(2), step=1)

    other, write, raced = _model(3), checkpoint.write_shards, []

    def racing(directory, rank, arrays):  # another writer saves step 2 while this one writes its files
        if not raced:
            raced.append(directory)
            checkpoint.save(tmp_path, other, step=2)
        return write(directory, rank, arrays)
    monkeypatch.setattr(checkpoint, "write_shards", racing)
    with pytest.raises(fs.ConfigError, match=r"step_000002 was written by another writer.*discarded"):
        checkpoint.save(tmp_path, _model(4), step=2)
    assert not list(tmp_path.glob(".step_*"))
    checkpoint.verify(tmp_path / "step_000002")
    model = _model(0)
    checkpoint.load(tmp_path, model)
    for n, v in _params(model).items():
        np.testing.assert_array_equal(v, _params(other)[n], err_msg=n)  # the other writer's, whole


def test_prune_keeps_the_newest_and_the_newest_good_one(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, _model(step), step=step)
    assert checkpoint.prune(tmp_path, 0) == []
    _flip(tmp_path / "step_000004" / "rank_0.safetensors", WTE)
    dead = tmp_path / ".step_000002.tmp-00ff00ff"  # a write that died long ago
    dead.mkdir()
    (dead / "rank_0.tmp").write_bytes(b"x")
    for p in (dead / "rank_0.tmp", dead):
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    live = tmp_path / ".step_000005.tmp-0badcafe"  # a newer step being written
    live.mkdir()
    removed = checkpoint.prune(tmp_path, 1)
    assert sorted(p.name for p in removed) == [dead.name, "step_000001", "step_000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "step_000003", "step_000004"]
    assert checkpoint.prune(tmp_path, 1) == []
    with pytest.raises(fs.ConfigError, match=">= 0"):
        checkpoint.prune(tmp_path, -1)


def test_check_writable_names_the_directory(tmp_path):
    checkpoint.check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(fs.ConfigError, match=rf"{re.escape(str(tmp_path / 'file' / 'ckpt'))} is not writable"):
        checkpoint.check_writable(tmp_path / "file" / "ckpt")
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) writes into a read-only directory")
        with pytest.raises(fs.ConfigError, match=rf"{re.escape(str(locked))} is not writable: PermissionError"):
            checkpoint.check_writable(locked)
    finally:
        locked.chmod(0o700)


@pytest.fixture
def local():
    yield fs.init(backend="local")
    fs.shutdown()


def test_the_workers_record_checksums_and_check_what_they_read(tmp_path, local):
    batches = _worker_batches()
    model, opt, run = _job("dp2xtp2")
    run(batches[:2])
    step = checkpoint.save(tmp_path, model, opt, step=2)
    after = run(batches[2:])
    manifest = json.loads((step / "MANIFEST.json").read_text())
    meta = json.loads((step / "meta.json").read_text())
    placed = {f"rank_{r}.safetensors": sorted(k for k, info in meta["tensors"].items()
                                              for s in info["shards"] if s["rank"] == r) for r in range(4)}
    assert {f: sorted(c) for f, c in manifest["crc32"].items()} == placed  # every tensor each worker wrote
    checkpoint.verify(step)

    model, opt, run = _job("dp2xtp2", seed=7)
    run(batches[:1])
    checkpoint.load(tmp_path, model, opt)
    np.testing.assert_allclose(run(batches[2:]), after, rtol=1e-5)

    # a tensor split over tp: ranks 1 and 3 read rank 1's file, ranks 0 and 2 rank 0's
    key = next(k for k, info in meta["tensors"].items() if k.startswith("param/")
               and len({tuple(map(tuple, s["box"])) for s in info["shards"] if s["rank"] in (0, 1)}) == 2)
    _flip(step / "rank_1.safetensors", key)
    model, opt, run = _job("dp2xtp2", seed=7)
    run(batches[:1])
    with pytest.raises(CheckpointCorrupt, match=rf"rank_1\.safetensors holds {re.escape(key)} with crc32 .*"
                                                r"read by rank 1; nothing was loaded"):
        checkpoint.load(tmp_path, model, opt)
    untouched = run(batches[2:])
    model, opt, run = _job("dp2xtp2", seed=7)  # the same job without the load
    run(batches[:1])
    np.testing.assert_array_equal(untouched, run(batches[2:]))  # ranks 0 and 2 read theirs and took nothing either

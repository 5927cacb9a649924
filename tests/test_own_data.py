"""Train on your own data, end to end (issue #19): a directory of text prepared with a trained BPE
tokenizer, the tiny GPT trained on it on one device and on dp2 x tp2 (the same samples, a
validation loss below the unigram entropy of the validation tokens), then ``flowsys generate``
and ``flowsys export --to hf-gpt2`` on the checkpoint, the export loading into transformers with
the same logits."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60


def _flowsys(*args, cwd=None):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flowsys.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd or ROOT)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    src = tmp_path_factory.mktemp("text")
    for name in ("json", "email", "http"):  # a few hundred KB of the standard library's sources
        pkg = Path(__import__(name).__file__).parent
        for f in sorted(pkg.glob("*.py"))[:6]:
            shutil.copy(f, src / f"{name}_{f.name}")
    out = tmp_path_factory.mktemp("data") / "prepared"
    done = _flowsys("prepare", str(src), "--out", str(out), "--tokenizer", "bpe", "--vocab-size", "320")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _train(prepared: Path, tmp: Path, name: str, *layout: str) -> dict:
    ck = tmp / name
    done = _flowsys("train", "examples/configs/tiny.yaml", f"data.source={prepared}", "model.vocab_size=320",
                    f"train.steps={STEPS}", "train.log_every=20", "train.eval_batches=4", "optim.warmup_steps=5",
                    f"checkpoint.dir={ck}", f"checkpoint.every={STEPS}", *layout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"checkpoint": ck}


@pytest.mark.timeout(600)
def test_own_data_trains_generates_and_exports(prepared, tmp_path):
    one = _train(prepared, tmp_path, "one", "parallel.dp=1", "parallel.tp=1", "parallel.zero_stage=0",
                 "parallel.micro_batches=1")
    grid = _train(prepared, tmp_path, "grid")  # tiny.yaml: dp2 x tp2, ZeRO 1, 2 micro-batches
    assert one["devices"] == 1 and grid["devices"] == 4
    assert one["samples_digest"] == grid["samples_digest"]  # the same samples in both layouts
    for run in (one, grid):
        assert run["val_loss"] < run["unigram_entropy"], run  # learnt more than token frequencies

    text = _flowsys("generate", str(grid["checkpoint"]), "--prompt", "def ", "--max-new-tokens", "20")
    assert text.returncode == 0 and text.stdout.startswith("def ") and len(text.stdout) > 4, text.stderr[-2000:]

    out = tmp_path / "hf"
    done = _flowsys("export", str(grid["checkpoint"]), "--to", "hf-gpt2", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    from flowsys.generate import load_model

    model, _, _ = load_model(grid["checkpoint"])
    import flowsys as fs

    tokens = np.random.default_rng(0).integers(0, 320, (2, 16))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    with fs.no_grad():  # with targets the model gives every position's logits
        logits = model(fs.tensor(tokens), fs.tensor(tokens))[0].numpy()
    np.testing.assert_allclose(theirs, logits, atol=1e-4, rtol=1e-4)

"""Using a trained model: ``flowsys generate`` samples from a checkpoint, ``flowsys export --to
hf-gpt2`` writes a directory that Hugging Face's GPT2LMHeadModel loads with the same logits.

The checkpoints are what ``flowsys train`` writes: a tiny GPT trained two eager steps and saved
with the job in ``extra["job"]``; one of them bias-free with its vocabulary padded as tensor
parallelism pads it."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

import flowsys as fs
from flowsys import export, generate
from flowsys.data import ByteDataset
from flowsys.errors import ConfigError
from flowsys.functions import rng_state
from flowsys.models.gpt import GPT, GPTConfig

CFG = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
PADDED = dataclasses.replace(CFG, bias=False, padded_vocab_size=384)  # GPTConfig.padded_for(3)
DATA = {"source": "stdlib", "max_bytes": 1 << 16, "val_fraction": 0.1, "batch_size": 4}
PROMPT = "def main("


def _trained(root, config: GPTConfig, steps: int = 2):
    """``config``'s GPT trained ``steps`` eager steps on the stdlib bytes, saved under ``root``
    as ``flowsys train`` saves it; returns the model (eval mode) and its step directory."""
    fs.manual_seed(0)
    model = GPT(config)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-2)
    batches = ByteDataset.from_stdlib(DATA["max_bytes"]).batches(DATA["batch_size"], config.block_size)
    for i in range(1, steps + 1):
        _, loss = model(*batches.at(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    job = {"model": dataclasses.asdict(config), "data": dict(DATA), "train": {"steps": steps}}
    path = fs.checkpoint.save(root, model, opt, step=steps, extra={"job": job})
    return model.eval(), path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("ckpt"), CFG)


@pytest.fixture(scope="module")
def trained_padded(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("ckpt_padded"), PADDED)


def _greedy(model: GPT, prompt: str, n: int) -> str:
    """The most likely continuation, token by token, the context cropped to block_size."""
    tokens = list(ByteDataset.encode(prompt))
    for _ in range(n):
        context = np.asarray(tokens[-model.config.block_size:], dtype=np.int64)[None, :]
        logits, _ = model(context)
        tokens.append(int(np.argmax(logits.numpy()[0, -1, :model.config.vocab_size])))
    return ByteDataset.decode(tokens)


def test_generate_continues_the_prompt_the_same_way_for_a_seed(trained):
    _, path = trained
    state = rng_state()
    text = generate.generate(path.parent, PROMPT, max_new_tokens=24, seed=3)  # the root: its latest checkpoint
    assert rng_state() == state  # loading and sampling leave the caller's generator alone
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert generate.generate(path, PROMPT, max_new_tokens=24, seed=3) == text  # the step directory itself
    others = {generate.generate(path, PROMPT, max_new_tokens=24, seed=s) for s in (4, 5, 6)}
    assert others - {text}  # another seed, another sample


@pytest.mark.parametrize("which", ["trained", "trained_padded"])
def test_top_k_1_and_temperature_0_are_the_greedy_continuation_past_block_size(which, request):
    model, path = request.getfixturevalue(which)
    n = 2 * model.config.block_size  # the context is cropped to the last block_size tokens
    want = _greedy(model, PROMPT, n)
    assert generate.generate(path, PROMPT, max_new_tokens=n, top_k=1, seed=0) == want
    assert generate.generate(path, PROMPT, max_new_tokens=n, top_k=1, seed=9) == want
    assert generate.generate(path, PROMPT, max_new_tokens=n, temperature=0.0, top_k=0) == want


def _hf_logits(out, idx):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        return hf, hf(torch.tensor(idx)).logits.numpy()


@pytest.mark.parametrize("which", ["trained", "trained_padded"])
def test_export_hf_gpt2_gives_the_same_logits_in_transformers(which, request, tmp_path):
    model, path = request.getfixturevalue(which)
    cfg = model.config
    out = export.export_hf_gpt2(path.parent, tmp_path / "gpt2")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, cfg.block_size))
    hf, got = _hf_logits(out, idx)
    assert (hf.config.vocab_size, hf.config.n_positions) == (cfg.vocab_size, cfg.block_size)
    want, _ = model(idx, idx)  # (targets: every position's logits)
    want = want.numpy()[..., :cfg.vocab_size]  # a padded vocabulary's rows are not exported
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    if not cfg.bias:  # GPT-2 has biases everywhere: a bias-free model's are zeros
        assert not hf.transformer.h[0].attn.c_attn.bias.abs().sum()


def test_export_refuses_a_parameter_gpt2_has_no_place_for():
    state = {name: t.numpy() for name, t in GPT(CFG).state_dict().items()}
    state["transformer.h.0.attn.rotary.weight"] = np.zeros(4, np.float32)
    with pytest.raises(ConfigError, match=r"transformer\.h\.0\.attn\.rotary\.weight.*no place in GPT-2"):
        export.hf_gpt2_tensors(state, CFG)


def _cli(module, argv):
    parser = argparse.ArgumentParser(prog=f"flowsys {module.__name__.rsplit('.', 1)[-1]}")
    return module.main(module.add_arguments(parser).parse_args(argv))


def test_the_commands_main_functions(trained, tmp_path, capsys):
    _, path = trained
    assert _cli(generate, [str(path.parent), "--prompt", PROMPT, "--max-new-tokens", "10", "--seed", "3"]) == 0
    assert capsys.readouterr().out == generate.generate(path, PROMPT, max_new_tokens=10, seed=3) + "\n"
    assert _cli(export, [str(path.parent), "--to", "hf-gpt2", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "config.json").is_file()
    with pytest.raises(SystemExit):  # an unknown format is argparse's error
        _cli(export, [str(path.parent), "--to", "onnx", str(tmp_path / "x")])


def test_checkpoints_that_cannot_be_used_say_why(trained, tmp_path):
    model, path = trained
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        generate.generate(tmp_path, PROMPT)
    with pytest.raises(ConfigError, match="does not exist"):
        generate.generate(tmp_path / "nowhere", PROMPT)
    bare = fs.checkpoint.save(tmp_path / "bare", model, step=1)  # no extra["job"]
    with pytest.raises(ConfigError, match=r"no extra\['job'\]"):
        export.export_hf_gpt2(bare, tmp_path / "out")
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate.generate(path, "")
    with pytest.raises(ConfigError, match="temperature"):
        generate.generate(path, PROMPT, temperature=-1.0)

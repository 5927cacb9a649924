"""Training on your own text: ``flowsys prepare`` writes token shards (bytes, a BPE trained on the
corpus, or a given tokenizer.json), skips a re-run, and ``open_source`` opens them (or raw text,
or a weighted mixture) as a dataset whose batches the workers read themselves."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import flowsys as fs
from flowsys import optim
from flowsys.data import ByteDataset, TokenDataset, open_source
from flowsys.datasource import Windows
from flowsys.models import GPT, GPTConfig
from flowsys.prepare import add_arguments, load_tokenizer, main, prepare
from flowsys.sbp import split
from helpers import TrainStep

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["keyword.py", "this.py", "colorsys.py", "bisect.py", "fnmatch.py", "stat.py"]
TEXT = "def f(x):\n    return x ** 2  # héllo, 世界 ✓\r\n\tend\n"


def quiet(line: str) -> None:
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few KB of text: stdlib files (one in a subdirectory), a markdown note, a binary file,
    and what a walk leaves out (a hidden file, __pycache__)."""
    root = tmp_path_factory.mktemp("corpus")
    for name in FILES[:-1]:
        shutil.copy(STDLIB / name, root / name)
    (root / "sub").mkdir()
    shutil.copy(STDLIB / FILES[-1], root / "sub" / FILES[-1])
    (root / "notes.md").write_text("# Notes\n\nUnicode: héllo, 世界 ✓\n")
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (root / ".hidden.txt").write_text("never read\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.txt").write_text("never read\n")
    return root


def docs_of(root: Path) -> list[str]:
    """The documents prepare reads from ``root``, in its order (sorted relative paths)."""
    names = sorted(["notes.md", *FILES[:-1], "sub/" + FILES[-1]])
    return [(root / n).read_text() for n in names]


def expected_shards(docs: list[str], tok, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The documented split: document j's last floor(f*C_j) - floor(f*C_{j-1}) tokens go to val,
    each part followed by the end-of-text token."""
    train, val, seen = [], [], 0
    for doc in docs:
        ids = tok.encode(doc)
        n_val = int(val_fraction * (seen + len(ids))) - int(val_fraction * seen)
        seen += len(ids)
        for out, part in ((train, ids[: len(ids) - n_val]), (val, ids[len(ids) - n_val:])):
            if len(part):
                out += [*part, tok.eot]
    return np.array(train), np.array(val)


def shard(out: Path, split_name: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.fromfile(out / f"{split_name}.bin", dtype=meta["dtype"])


@pytest.fixture(scope="module")
def byte_dir(corpus, tmp_path_factory) -> Path:
    return prepare(corpus, tmp_path_factory.mktemp("bytes") / "out", log=quiet)


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory) -> Path:
    return prepare(corpus, tmp_path_factory.mktemp("bpe"), tokenizer="bpe", vocab_size=400, log=quiet)


@pytest.fixture(autouse=True)
def local_backend():
    fs.init(backend="local", timeout=30.0)
    yield
    fs.shutdown()


# ----------------------------------------------------------------------------------- prepare
def test_bytes_shards_meta_and_checksums(corpus, byte_dir):
    meta = json.loads((byte_dir / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot"], meta["dtype"]) == ("bytes", 257, 256, "uint16")
    docs = docs_of(corpus)
    assert meta["documents"] == len(docs) and meta["val_fraction"] == 0.1
    want_train, want_val = expected_shards(docs, load_tokenizer(byte_dir), 0.1)
    np.testing.assert_array_equal(shard(byte_dir, "train"), want_train)
    np.testing.assert_array_equal(shard(byte_dir, "val"), want_val)
    text_tokens = sum(len(d.encode()) for d in docs)
    assert meta["text_tokens"] == text_tokens and meta["tokens"]["val"] - (want_val == 256).sum() == int(0.1 * text_tokens)
    assert meta["tokens"] == {"train": len(want_train), "val": len(want_val)}
    for name in ("train.bin", "val.bin"):
        assert meta["sha256"][name] == hashlib.sha256((byte_dir / name).read_bytes()).hexdigest()
    listed = [Path(s["path"]).relative_to(corpus).as_posix() for s in meta["sources"]]
    assert listed == sorted(["blob.bin", "notes.md", *FILES[:-1], "sub/" + FILES[-1]])  # no hidden, no __pycache__
    assert all(s["size"] == (corpus / p).stat().st_size for s, p in zip(meta["sources"], listed))
    assert meta["skipped"] == [str(corpus / "blob.bin")] and not (byte_dir / "tokenizer.json").exists()


def test_a_rerun_with_the_same_sources_and_options_skips(corpus, tmp_path):
    lines = []
    out = prepare(corpus, tmp_path, log=lines.append)
    assert any("skipped" in line and "blob.bin" in line for line in lines)
    before = (out / "meta.json").stat().st_mtime_ns
    lines.clear()
    prepare(corpus, tmp_path, log=lines.append)
    assert len(lines) == 1 and "up to date" in lines[0] and (out / "meta.json").stat().st_mtime_ns == before
    prepare(corpus, tmp_path, val_fraction=0.2, log=lines.append)  # another option: prepared again
    assert "wrote" in lines[-1] and json.loads((out / "meta.json").read_text())["val_fraction"] == 0.2


def test_a_changed_source_is_prepared_again(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first version\n" * 20)
    prepare(src, tmp_path / "out", log=quiet)
    (src / "a.txt").write_text("second, longer version\n" * 20)
    lines = []
    prepare(src, tmp_path / "out", log=lines.append)
    assert "wrote" in lines[-1]
    assert ByteDataset.decode(shard(tmp_path / "out", "train")[:6]) == "second"


def test_bpe_shards_and_round_trip(corpus, bpe_dir):
    meta = json.loads((bpe_dir / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and 257 < meta["vocab_size"] <= 400 and meta["dtype"] == "uint16"
    assert meta["tokenizer_sha256"] == hashlib.sha256((bpe_dir / "tokenizer.json").read_bytes()).hexdigest()
    tok = load_tokenizer(bpe_dir)
    want_train, want_val = expected_shards(docs_of(corpus), tok, 0.1)
    np.testing.assert_array_equal(shard(bpe_dir, "train"), want_train)
    np.testing.assert_array_equal(shard(bpe_dir, "val"), want_val)
    assert shard(bpe_dir, "train").max() >= 257  # merges were learned and used
    ds = open_source(str(bpe_dir), log=quiet)
    assert isinstance(ds, TokenDataset) and ds.vocab_size == meta["vocab_size"] and ds.eot == meta["eot"]
    for text in (TEXT, *docs_of(corpus)):
        ids = ds.encode(text)
        assert ids.dtype == np.int64 and ds.decode(ids) == text
    assert len(ds.encode(docs_of(corpus)[0])) < len(docs_of(corpus)[0].encode())  # it compresses


def test_a_saved_tokenizer_json_tokenizes_the_same(corpus, bpe_dir, tmp_path):
    out = prepare(corpus, tmp_path, tokenizer=str(bpe_dir / "tokenizer.json"), log=quiet)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "tokenizer.json"
    assert (out / "tokenizer.json").read_bytes() == (bpe_dir / "tokenizer.json").read_bytes()
    for name in ("train", "val"):
        np.testing.assert_array_equal(shard(out, name), shard(bpe_dir, name))
    assert open_source(str(out), log=quiet).decode(open_source(str(out), log=quiet).encode(TEXT)) == TEXT


def test_bytes_round_trip_and_end_of_text(byte_dir):
    ds = open_source(str(byte_dir), log=quiet)
    assert ds.decode(ds.encode(TEXT)) == TEXT
    assert ds.decode([*ds.encode("a"), ds.eot, *ds.encode("b")]) == "a<|endoftext|>b"
    assert ds.decode(shard(byte_dir, "train")).count("<|endoftext|>") == json.loads(
        (byte_dir / "meta.json").read_text())["documents"]  # every document's head, then eot


def test_jsonl_documents_and_text_field(tmp_path):
    rows = [{"body": "first document\n" * 10, "id": 1}, {"body": "second: héllo " * 12}, {"body": ""},
            {"body": "third " * 30}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" +
                                         "\n".join(json.dumps(r) for r in rows[2:]) + "\n")
    out = prepare(tmp_path / "docs.jsonl", tmp_path / "out", text_field="body", log=quiet)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == 3  # the empty one and the blank line are no documents
    docs = [r["body"] for r in rows if r["body"]]
    want_train, want_val = expected_shards(docs, load_tokenizer(out), 0.1)
    np.testing.assert_array_equal(shard(out, "train"), want_train)
    np.testing.assert_array_equal(shard(out, "val"), want_val)
    with pytest.raises(fs.ConfigError, match=r"docs.jsonl:1: no 'text' field .*--text-field"):
        prepare(tmp_path / "docs.jsonl", tmp_path / "out2", log=quiet)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(fs.ConfigError, match=r"bad.jsonl:2: not a JSON object"):
        prepare(tmp_path / "bad.jsonl", tmp_path / "out3", log=quiet)


def errors(corpus: Path, tmp: Path) -> dict:
    """What each error says, and a call that makes it."""
    (tmp / "file").write_text("x")
    (tmp / "binary").mkdir()
    (tmp / "binary" / "a.bin").write_bytes(b"\0\1\2" * 10)
    return {
        "does not exist": lambda: prepare(tmp / "missing", tmp / "o1", log=quiet),
        "no text in": lambda: prepare(tmp / "binary", tmp / "o2", log=quiet),
        "too small": lambda: prepare(corpus, tmp / "o3", tokenizer="bpe", vocab_size=256, log=quiet),
        "cannot write to --out": lambda: prepare(corpus, tmp / "file" / "out", log=quiet),
        r"must be in \(0, 1\)": lambda: prepare(corpus, tmp / "o4", val_fraction=1.0, log=quiet),
        "does not apply": lambda: prepare(corpus, tmp / "o5", vocab_size=300, log=quiet),
        "is not 'bytes', 'bpe'": lambda: prepare(corpus, tmp / "o6", tokenizer="gpt9", log=quiet),
        "is not a directory": lambda: open_source(str(tmp / "missing"), log=quiet),
        "cannot be mixed": lambda: open_source(f"stdlib:0.5,{corpus}:0.5", log=quiet),
        "positive number": lambda: open_source(f"{corpus}:-1", log=quiet),
    }


ERRORS = ["does not exist", "no text in", "too small", "cannot write to --out", r"must be in \(0, 1\)",
          "does not apply", "is not 'bytes', 'bpe'", "is not a directory", "cannot be mixed", "positive number"]


@pytest.mark.parametrize("what", ERRORS)
def test_errors_are_one_line_config_errors(what, corpus, tmp_path):
    with pytest.raises(fs.ConfigError, match=what) as e:
        errors(corpus, tmp_path)[what]()
    assert "\n" not in str(e.value)


def test_the_cli_functions(corpus, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(corpus / "notes.md"), str(corpus / "sub"), "--out", str(tmp_path),
                              "--val-fraction", "0.25"])
    assert main(args) == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["documents"] == 2 and meta["val_fraction"] == 0.25 and meta["tokenizer"] == "bytes"


# --------------------------------------------------------------------------------- datasets
def test_open_source_prepares_a_raw_text_directory(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox\n" * 30)
    (tmp_path / "b.md").write_text("jumps over the lazy dog\n" * 30)
    lines = []
    ds = open_source(str(tmp_path), log=lines.append)
    assert "no meta.json" in lines[0] and ".flowsys-prepared" in lines[0]
    assert isinstance(ds, TokenDataset) and ds.source == str(tmp_path / ".flowsys-prepared")
    assert ds.vocab_size == 257 and ds.eot == 256 and ds.describe()["tokenizer"] == "bytes"
    lines.clear()
    again = open_source(str(tmp_path), log=lines.append)  # the hidden output is not read as text
    assert any("up to date" in line for line in lines) and again.digest == ds.digest
    for name in ("train", "val"):  # nats per token over the split's tokens, eot included
        counts = np.bincount(shard(tmp_path / ".flowsys-prepared", name))
        p = counts[counts > 0] / counts.sum()
        assert ds.unigram_entropy(name) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert "TokenDataset(" in repr(ds) and "vocab 257" in repr(ds)
    assert isinstance(open_source("stdlib", max_bytes=1 << 14, log=quiet), ByteDataset)


def test_driver_batches_equal_what_workers_read(bpe_dir):
    ds = open_source(str(bpe_dir), log=quiet)
    batches = ds.batches(6, 16, seed=3)
    x, y = batches.at(5)
    assert x.shape == y.shape == (6, 16)
    np.testing.assert_array_equal(x.numpy()[:, 1:], y.numpy()[:, :-1])
    worker = Windows.from_json(batches.spec.as_json())  # what a worker gets in its request
    assert worker == batches.spec and worker.digest == ds.digest
    worker.check()
    for box in (((0, 6), (0, 16)), ((2, 5), (3, 11)), ((5, 6), (15, 16))):
        (r0, r1), (c0, c1) = box
        np.testing.assert_array_equal(worker.read("x", 5, box), x.numpy()[r0:r1, c0:c1])
        np.testing.assert_array_equal(worker.read("y", 5, box), y.numpy()[r0:r1, c0:c1])
    train = shard(bpe_dir, "train")
    for row, start in zip(x.numpy(), worker.starts(5, range(6))):
        np.testing.assert_array_equal(row, train[start: start + 16])
    val = ds.batches(6, 16, split="val").at(0)[0].numpy()
    assert val.max() < ds.vocab_size and not np.array_equal(val, x.numpy())


@pytest.mark.parametrize("mixed", [False, True])
def test_a_dp2_compiled_step_reads_token_shards_and_matches_one_device(mixed, bpe_dir, corpus, tmp_path):
    source = str(bpe_dir)
    if mixed:  # the same tokenizer on another text: a mixture
        (tmp_path / "t.txt").write_text((STDLIB / "textwrap.py").read_text())
        other = prepare(tmp_path / "t.txt", tmp_path / "out", tokenizer=str(bpe_dir / "tokenizer.json"), log=quiet)
        source = f"{bpe_dir}:0.5,{other}:0.5"
    ds = open_source(source, log=quiet)
    cfg = GPTConfig(vocab_size=ds.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    batches = ds.batches(8, cfg.block_size)
    fs.manual_seed(0)
    eager = GPT(cfg)
    opt = optim.SGD(eager.parameters(), lr=0.1)
    want = []
    for i in range(2):
        _, loss = eager(*batches.at(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        want.append(loss.item())
    P = fs.placement("cpu", [0, 1])
    fs.manual_seed(0)
    with fs.nn.meta_init():
        model = GPT(cfg)
    model.to_global(P, GPT.parallel_plan(P, dp_axis=0))
    step = TrainStep(model, optim.SGD(model.parameters(), lr=0.1))
    got = [float(step(*batches.at(i, P, split(0)))) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_mixture_sampling_is_deterministic_and_weighted(tmp_path):
    for name, letters in (("a", "abc "), ("b", "xyz\n")):
        (tmp_path / name).mkdir()
        rng = np.random.default_rng(len(name))
        (tmp_path / name / "t.txt").write_text("".join(rng.choice(list(letters), 4000)))
    a, b = (str(prepare(tmp_path / n, tmp_path / f"{n}-tokens", log=quiet)) for n in ("a", "b"))
    ds = open_source(f"{a}:7,{b}:3", log=quiet)  # weights normalised
    spec = ds.batches(2000, 8, seed=1).spec
    assert spec.weights() == pytest.approx([0.7, 0.3])
    which = spec.sources(0, range(2000))
    assert 0.65 < (which == 0).mean() < 0.75
    x = spec.read("x", 0, ((0, 2000), (0, 8)))
    from_a = np.isin(x, list(b"abc ")).all(axis=1)
    from_b = np.isin(x, list(b"xyz\n")).all(axis=1)
    np.testing.assert_array_equal(from_a, which == 0)  # each sample comes from its source
    np.testing.assert_array_equal(from_b, which == 1)
    again = Windows.from_json(spec.as_json())
    np.testing.assert_array_equal(again.read("x", 0, ((500, 900), (2, 6))), x[500:900, 2:6])  # any block, same rows
    assert not np.array_equal(spec.sources(1, range(2000)), which)  # another step, other draws
    pa, pb = (np.bincount(shard(Path(d), "train"), minlength=257) for d in (a, b))
    p = 0.7 * pa / pa.sum() + 0.3 * pb / pb.sum()
    p = p[p > 0]
    assert ds.unigram_entropy() == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert ds.describe()["sources"][1]["weight"] == pytest.approx(0.3)
    with pytest.raises(fs.ConfigError, match="different tokenizers"):
        open_source(f"{a}:1,{prepare(tmp_path / 'a', tmp_path / 'bpe', tokenizer='bpe', vocab_size=270, log=quiet)}:1",
                    log=quiet)


def test_a_node_that_sees_other_data_or_none_says_which_file(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("some text to train on\n" * 20)
    out = prepare(tmp_path / "src", tmp_path / "out", log=quiet)
    spec = open_source(str(out), log=quiet).batches(2, 8).spec
    (tmp_path / "src" / "a.txt").write_text("other text, prepared again\n" * 20)
    prepare(tmp_path / "src", tmp_path / "out", log=quiet)
    with pytest.raises(fs.ConfigError, match="not what the driver opened"):
        Windows.from_json(spec.as_json()).check()
    fresh = open_source(str(out), log=quiet).batches(2, 8).spec
    fresh.check()
    (out / "val.bin").unlink()
    with pytest.raises(fs.ConfigError, match=r"val\.bin .*every node must see") as e:
        fresh.check()
    assert "\n" not in str(e.value)
    with pytest.raises(fs.ConfigError, match=r"meta\.json does not exist"):
        Windows(source=str(tmp_path / "src")).check()

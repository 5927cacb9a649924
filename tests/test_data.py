"""The byte-level standard-library corpus: deterministic, split, batched, and its entropy."""

from __future__ import annotations

import math
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import flowsys as fs
from flowsys.data import ByteDataset, stdlib_corpus, stdlib_sources

SMALL = 1 << 17


@pytest.fixture(scope="module")
def ds() -> ByteDataset:
    return ByteDataset.from_stdlib(max_bytes=SMALL)


def test_from_stdlib_is_deterministic(ds):
    again = ByteDataset.from_stdlib(max_bytes=SMALL)
    np.testing.assert_array_equal(ds.train, again.train)
    np.testing.assert_array_equal(ds.val, again.val)
    assert ds.train.dtype == np.uint8 and ds.vocab_size == 256


def test_corpus_is_the_stdlib_sources_in_sorted_order():
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = stdlib_sources()
    assert len(sources) > 100
    rel = [p.relative_to(root) for p in sources]
    assert [r.as_posix() for r in rel] == sorted(r.as_posix() for r in rel)
    assert all(r.suffix == ".py" for r in rel)
    skipped = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    assert not any(skipped.intersection(r.parts[:-1]) for r in rel)
    corpus = stdlib_corpus(max_bytes=SMALL)
    assert len(corpus) == SMALL
    head = b"".join(p.read_bytes() for p in sources[:3])
    assert corpus[: min(len(head), SMALL)] == head[:SMALL]  # files concatenated in order, none skipped


def test_a_larger_corpus_extends_the_smaller_one(ds):
    bigger = stdlib_corpus(max_bytes=2 * SMALL)
    assert bigger[:SMALL] == stdlib_corpus(max_bytes=SMALL)


@pytest.mark.parametrize("frac", [0.1, 0.25])
def test_train_val_split_sizes(frac):
    data = bytes(range(256)) * 40  # 10240 bytes
    d = ByteDataset.from_bytes(data, val_fraction=frac)
    n_val = int(len(data) * frac)
    assert len(d.val) == n_val and len(d.train) == len(data) - n_val
    assert bytes(d.train) + bytes(d.val) == data  # the validation part is the held-out tail


def test_stdlib_split_sizes(ds):
    assert len(ds.train) + len(ds.val) == SMALL
    assert len(ds.val) == int(SMALL * 0.1)


def test_bad_val_fraction_and_split_name():
    with pytest.raises(fs.ConfigError):
        ByteDataset.from_bytes(b"abcdef", val_fraction=0.0)
    with pytest.raises(fs.ConfigError):
        ByteDataset.from_bytes(b"abcdef", val_fraction=1.0)
    with pytest.raises(fs.ConfigError, match="test"):
        ByteDataset.from_bytes(b"abcdefgh" * 10).get_batch("test", 2, 4)


def test_block_size_too_large_for_the_split():
    d = ByteDataset.from_bytes(b"abcdefghij" * 10)  # val has 10 bytes
    with pytest.raises(fs.ConfigError, match="block_size"):
        d.get_batch("val", 2, 10)
    x, _ = d.get_batch("val", 2, 9)  # one window fits exactly
    assert x.shape == (2, 9)


@pytest.mark.parametrize("split", ["train", "val"])
def test_get_batch_shapes_dtypes_and_shift(ds, split):
    x, y = ds.get_batch(split, batch_size=5, block_size=16, seed=0)
    assert isinstance(x, fs.Tensor) and isinstance(y, fs.Tensor)
    assert x.shape == y.shape == (5, 16)
    assert x.dtype == y.dtype == fs.int64
    xn, yn = x.numpy(), y.numpy()
    np.testing.assert_array_equal(xn[:, 1:], yn[:, :-1])  # targets are the inputs shifted by one
    data = ds.train if split == "train" else ds.val
    for row_x, row_y in zip(xn, yn):  # and each row is a real window of the split
        starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(data, 17) ==
                                       np.concatenate([row_x, row_y[-1:]]), axis=1))
        assert len(starts) >= 1
    assert ((xn >= 0) & (xn < 256)).all()


def test_same_seed_same_batch(ds):
    a = ds.get_batch("train", 4, 32, seed=7)
    b = ds.get_batch("train", 4, 32, seed=7)
    c = ds.get_batch("train", 4, 32, seed=8)
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())


def test_a_shared_rng_advances_between_batches(ds):
    rng = np.random.default_rng(3)
    first, _ = ds.get_batch("train", 4, 32, rng=rng)
    second, _ = ds.get_batch("train", 4, 32, rng=rng)
    assert not np.array_equal(first.numpy(), second.numpy())
    replay = np.random.default_rng(3)
    np.testing.assert_array_equal(ds.get_batch("train", 4, 32, rng=replay)[0].numpy(), first.numpy())


def test_unigram_entropy_matches_a_hand_computation():
    data = b"aaaabbc" * 30 + b"zz"
    d = ByteDataset.from_bytes(data, val_fraction=0.5)
    for split, part in (("train", bytes(d.train)), ("val", bytes(d.val))):
        counts = Counter(part)
        n = len(part)
        want = -sum(c / n * math.log(c / n) for c in counts.values())
        assert d.unigram_entropy(split) == pytest.approx(want, rel=1e-12)
    uniform = ByteDataset.from_bytes(bytes(range(256)) * 20, val_fraction=0.5)
    assert uniform.unigram_entropy() == pytest.approx(math.log(256))
    assert ByteDataset.from_bytes(b"x" * 100).unigram_entropy() == 0.0


def test_stdlib_unigram_entropy_is_plausible(ds):
    h = ds.unigram_entropy()
    assert 2.0 < h < 6.0
    counts = np.bincount(ds.train, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    assert h == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)


def test_encode_decode_round_trip():
    text = "def f(x):\n    return x ** 2  # héllo, 世界 ✓\n"
    tokens = ByteDataset.encode(text)
    assert tokens.dtype == np.int64 and len(tokens) == len(text.encode("utf-8"))
    assert ((tokens >= 0) & (tokens < 256)).all()
    assert ByteDataset.decode(tokens) == text
    assert ByteDataset.decode(fs.tensor(tokens).numpy().tolist()) == text


def test_batch_rows_are_windows_of_the_corpus(ds):
    x, y = ds.get_batch("train", 3, 64, seed=0)
    corpus = stdlib_corpus(max_bytes=SMALL)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        window = bytes(row_x.astype(np.uint8).tolist()) + bytes([int(row_y[-1])])
        assert window in corpus

"""Datasets: the standard library's bytes, and the token shards of your own text.

:func:`open_source` opens a job's ``data.source``: ``"stdlib"`` (:class:`ByteDataset`, a real,
deterministic byte-level corpus that every Python ships: the standard library's own ``.py``
sources without its test suite and site-packages, in sorted path order, so the same Python gives
the same bytes everywhere), a directory that ``flowsys prepare`` wrote (:class:`TokenDataset`), a
directory of raw text (prepared first with the bytes tokenizer), or a weighted mixture of
directories, ``"DIR_A:0.7,DIR_B:0.3"``.

>>> from flowsys.data import ByteDataset
>>> ds = ByteDataset.from_stdlib(max_bytes=1 << 16)
>>> x, y = ds.get_batch("train", batch_size=2, block_size=8, seed=0)
>>> x.shape, y.shape, ds.vocab_size
((2, 8), (2, 8), 256)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowsys.datasource import (META, Read, Windows, digest, format_source, parse_source, read_meta,  # noqa: F401
                                split_tokens, stdlib_corpus, stdlib_sources)
from flowsys.errors import ConfigError
from flowsys.prepare import ByteTokenizer, HFTokenizer, load_tokenizer, prepare
from flowsys.functions import tensor
from flowsys.tensor import Tensor

@dataclass
class ByteDataset:
    """Bytes as tokens (vocab 256), split into a train part and a held-out tail for validation."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int = 256
    # what a worker needs to open the same data itself (None: bytes only this process has)
    origin: dict | None = None
    eot = None  # no end-of-text token: the corpus is one stream of bytes

    @classmethod
    def from_bytes(cls, data: bytes, val_fraction: float = 0.1) -> ByteDataset:
        return cls(*split_tokens(np.frombuffer(data, dtype=np.uint8), val_fraction))

    @classmethod
    def from_stdlib(cls, max_bytes: int | None = 4 << 20, val_fraction: float = 0.1) -> ByteDataset:
        """The standard library's sources, the first ``max_bytes`` bytes of them."""
        ds = cls.from_bytes(stdlib_corpus(max_bytes), val_fraction)
        ds.origin = {"source": "stdlib", "max_bytes": max_bytes, "val_fraction": val_fraction}
        return ds

    def batches(self, batch_size: int, block_size: int, seed: int = 0, split: str = "train") -> Batches:
        """Batches addressed by step number: sample ``i`` of step ``s`` is the same window in
        every layout, and a worker reads the rows its layout holds itself."""
        if self.origin is None:
            raise ConfigError("ByteDataset.batches: this dataset was made from bytes in this process, which "
                              "workers cannot open; use ByteDataset.from_stdlib (or get_batch)")
        return Batches(Windows(**self.origin, split=split, batch_size=batch_size, block_size=block_size, seed=seed))

    def _part(self, split: str) -> np.ndarray:
        if split not in ("train", "val"):
            raise ConfigError(f"ByteDataset: split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def get_batch(self, split: str, batch_size: int, block_size: int, seed: int | None = None,
                  rng: np.random.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Random windows: inputs (B, T) and the next-byte targets (B, T), int64."""
        data = self._part(split)
        if len(data) <= block_size:
            raise ConfigError(f"ByteDataset: the {split} split has {len(data)} bytes, too few for block_size {block_size}")
        rng = rng if rng is not None else np.random.default_rng(seed)
        starts = rng.integers(0, len(data) - block_size, size=batch_size)
        windows = np.stack([data[s: s + block_size + 1] for s in starts]).astype(np.int64)
        return tensor(windows[:, :-1]), tensor(windows[:, 1:])

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy of the byte frequencies in nats: the loss of the best context-free model."""
        counts = np.bincount(self._part(split), minlength=256).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    @staticmethod
    def decode(tokens) -> str:
        return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    @staticmethod
    def encode(text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def describe(self) -> dict:
        """What a job's metadata records of its data."""
        return {**(self.origin or {"source": "bytes"}), "tokenizer": "bytes", "vocab_size": self.vocab_size,
                "eot": None, "tokens": {"train": len(self.train), "val": len(self.val)}}

    def __repr__(self) -> str:
        return f"ByteDataset(train={len(self.train):,} bytes, val={len(self.val):,} bytes, entropy={self.unigram_entropy():.3f} nats)"


PREPARED = ".flowsys-prepared"  # where a raw text directory's shards go (hidden: not read as its text)


@dataclass
class TokenDataset:
    """The token shards that ``flowsys prepare`` wrote: one directory, or a mixture of directories
    prepared with the same tokenizer whose samples are drawn by weight (:class:`Windows`). Its
    validation split is val.bin. Open one with :func:`open_source`.

    >>> import tempfile
    >>> src = Path(tempfile.mkdtemp())
    >>> _ = (src / "a.txt").write_text("def f(x):\\n    return x\\n" * 40)
    >>> ds = open_source(str(src), log=lambda line: None)  # raw text: prepared with the bytes tokenizer
    >>> ds.vocab_size, ds.eot, ds.decode(ds.encode("héllo"))
    (257, 256, 'héllo')
    >>> x, y = ds.batches(batch_size=2, block_size=8).at(0)
    >>> x.shape
    (2, 8)
    """

    source: str  # a directory, or "DIR_A:0.7,DIR_B:0.3": absolute paths
    metas: list[dict]
    tokenizer: ByteTokenizer | HFTokenizer
    _counts: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, source: str) -> TokenDataset:
        """The token directories of ``source`` (each with a meta.json)."""
        dirs = [d for d, _ in parse_source(source)]
        metas = [read_meta(d) for d in dirs]
        key = ("vocab_size", "eot", "tokenizer_sha256")  # the same tokenizer, trained here or given
        for d, m in zip(dirs[1:], metas[1:]):
            if any(m.get(k) != metas[0].get(k) for k in key):
                raise ConfigError(f"data source {source!r} mixes directories of different tokenizers: {dirs[0]} has "
                                  f"{metas[0]['tokenizer']} (vocab {metas[0]['vocab_size']}), {d} has {m['tokenizer']} "
                                  f"(vocab {m['vocab_size']}); prepare them with the same --tokenizer")
        ds = cls(source, metas, load_tokenizer(dirs[0], metas[0]))
        ds.windows().check()  # every shard opens, whole
        return ds

    @property
    def vocab_size(self) -> int:
        return int(self.metas[0]["vocab_size"])

    @property
    def eot(self) -> int:
        return int(self.metas[0]["eot"])

    @property
    def digest(self) -> str:
        return digest(self.metas)

    def windows(self, split: str = "train", batch_size: int = 16, block_size: int = 64, seed: int = 0) -> Windows:
        """The spec a worker reads these shards by."""
        return Windows(source=self.source, digest=self.digest, split=split, batch_size=batch_size,
                       block_size=block_size, seed=seed)

    def batches(self, batch_size: int, block_size: int, seed: int = 0, split: str = "train") -> Batches:
        """Batches addressed by step number, as :meth:`ByteDataset.batches`."""
        return Batches(self.windows(split, batch_size, block_size, seed))

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy in nats per token of the split's token frequencies (a mixture's: the weighted
        mixture of its directories' frequencies): the loss of the best context-free model."""
        spec = self.windows(split)
        p = sum(w * c / c.sum() for w, c in zip(spec.weights(), self._token_counts(spec)))
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    def _token_counts(self, spec: Windows) -> list[np.ndarray]:
        if spec.split not in self._counts:
            chunk = 1 << 24  # tokens at a time: the shards are memory maps, perhaps larger than memory
            self._counts[spec.split] = [
                sum((np.bincount(t[i: i + chunk], minlength=self.vocab_size) for i in range(0, len(t), chunk)),
                    np.zeros(self.vocab_size, dtype=np.int64)).astype(np.float64)
                for t in spec.parts()]
        return self._counts[spec.split]

    def encode(self, text: str) -> np.ndarray:
        return self.tokenizer.encode(text)

    def decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def describe(self) -> dict:
        """What a job's metadata records of its data."""
        return {"source": self.source, "tokenizer": self.tokenizer.kind, "vocab_size": self.vocab_size,
                "eot": self.eot, "digest": self.digest,
                "tokens": {s: sum(m["tokens"][s] for m in self.metas) for s in ("train", "val")},
                "sources": [{"dir": d, "weight": w, "sha256": m["sha256"], "documents": m["documents"]}
                            for (d, w), m in zip(parse_source(self.source), self.metas)]}

    def __repr__(self) -> str:
        parts = ", ".join(f"{d} ({w:.0%})" for d, w in parse_source(self.source)) if len(self.metas) > 1 else self.source
        tokens = {s: sum(m["tokens"][s] for m in self.metas) for s in ("train", "val")}
        return (f"TokenDataset({parts}: {self.tokenizer.kind} tokenizer, vocab {self.vocab_size:,}, "
                f"train={tokens['train']:,} tokens, val={tokens['val']:,} tokens)")


def open_source(source: str, max_bytes: int | None = 4 << 20, val_fraction: float = 0.1,
                log=print) -> ByteDataset | TokenDataset:
    """A job's ``data.source``: ``"stdlib"`` (the first ``max_bytes`` of its bytes), a directory
    of token shards (``flowsys prepare``'s), a directory of raw text (prepared here into
    ``DIR/.flowsys-prepared`` with the bytes tokenizer, holding out ``val_fraction``), or a
    mixture ``"DIR_A:0.7,DIR_B:0.3"`` of such directories (weights normalised)."""
    if source == "stdlib":
        return ByteDataset.from_stdlib(max_bytes, val_fraction)
    parts = []
    for directory, weight in parse_source(source):
        path = Path(directory).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"data.source {directory!r} is not a directory; give 'stdlib', a directory of text or "
                              f"of `flowsys prepare` output, or a mixture 'DIR_A:0.7,DIR_B:0.3'")
        if not (path / META).exists():
            log(f"data: {path} has no {META}: preparing its text with the bytes tokenizer into {path / PREPARED} "
                f"(`flowsys prepare {path} --out DIR --tokenizer bpe` for a BPE)")
            path = prepare(path, path / PREPARED, "bytes", val_fraction=val_fraction, log=log)
        parts.append((str(path), weight))
    return TokenDataset.open(format_source(parts))


__all__ = ["ByteDataset", "TokenDataset", "open_source", "stdlib_corpus", "stdlib_sources"]


@dataclass(frozen=True)
class Batches:
    """A dataset's batches by step number (:meth:`ByteDataset.batches`)."""

    spec: Windows

    def at(self, step: int, placement=None, sbp=None) -> tuple[Tensor, Tensor]:
        """Inputs and targets of step ``step``: local tensors read here, or, with a placement,
        global tensors laid out as ``sbp`` that each rank reads its own block of (the driver
        reads nothing unless asked for the values)."""
        if placement is None:
            box = ((0, self.spec.batch_size), (0, self.spec.block_size))
            return tuple(tensor(self.spec.read(f, step, box)) for f in ("x", "y"))
        from flowsys.global_tensor import GlobalValue  # noqa: PLC0415
        from flowsys.layout import normalize_sbp  # noqa: PLC0415

        shape = (self.spec.batch_size, self.spec.block_size)
        nd = normalize_sbp(sbp, placement, shape)
        return tuple(Tensor(GlobalValue(placement, nd, shape, np.int64, None, Read(self.spec, f, step)))
                     for f in ("x", "y"))

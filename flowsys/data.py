"""A real, deterministic byte-level text corpus that every Python ships: its standard library.

The corpus is the standard library's own ``.py`` sources (without its test suite and
site-packages), read in sorted path order, so the same Python gives the same bytes everywhere.

>>> from flowsys.data import ByteDataset
>>> ds = ByteDataset.from_stdlib(max_bytes=1 << 16)
>>> x, y = ds.get_batch("train", batch_size=2, block_size=8, seed=0)
>>> x.shape, y.shape, ds.vocab_size
((2, 8), (2, 8), 256)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowsys.datasource import Read, Windows, split_tokens, stdlib_corpus, stdlib_sources  # noqa: F401
from flowsys.errors import ConfigError
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

    def __repr__(self) -> str:
        return f"ByteDataset(train={len(self.train):,} bytes, val={len(self.val):,} bytes, entropy={self.unigram_entropy():.3f} nats)"


__all__ = ["ByteDataset", "stdlib_corpus", "stdlib_sources"]


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

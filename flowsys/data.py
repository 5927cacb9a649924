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

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowsys.errors import ConfigError
from flowsys.functions import tensor
from flowsys.tensor import Tensor

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_sources(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in a deterministic order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(max_bytes: int | None = None, root: str | Path | None = None) -> bytes:
    chunks, total = [], 0
    for path in stdlib_sources(root):
        data = path.read_bytes()
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return b"".join(chunks)


@dataclass
class ByteDataset:
    """Bytes as tokens (vocab 256), split into a train part and a held-out tail for validation."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int = 256

    @classmethod
    def from_bytes(cls, data: bytes, val_fraction: float = 0.1) -> ByteDataset:
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"ByteDataset: val_fraction must be in (0, 1), got {val_fraction}")
        tokens = np.frombuffer(data, dtype=np.uint8)
        n_val = max(1, int(len(tokens) * val_fraction))
        return cls(tokens[:-n_val], tokens[-n_val:])

    @classmethod
    def from_stdlib(cls, max_bytes: int | None = 4 << 20, val_fraction: float = 0.1) -> ByteDataset:
        """The standard library's sources, the first ``max_bytes`` bytes of them."""
        return cls.from_bytes(stdlib_corpus(max_bytes), val_fraction)

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

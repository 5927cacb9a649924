"""Data a worker opens itself, addressed by global sample index.

A :class:`Windows` spec names a token corpus (the standard library's sources now) and how a
step's batch is drawn from it: sample ``i`` of step ``s`` is the window that starts at a
counter-based hash of ``(seed, s * batch_size + i)``, so it is the same sample in every layout
and any rank can read just its rows. The driver sends a worker the spec once and the step number
each step; the worker reads the block of the batch its layout holds (:meth:`Windows.read`).

This module is vocabulary: it imports nothing of flowsys but its errors and the counter-based
mix (`flowsys.rng`), so a worker reads data without loading the user API.

>>> spec = Windows(max_bytes=1 << 16, batch_size=4, block_size=8)
>>> x = spec.read("x", 3, ((0, 4), (0, 8)))
>>> y = spec.read("y", 3, ((2, 4), (0, 8)))
>>> x.shape, bool((spec.read("x", 3, ((2, 4), (1, 8)))[:, :-1] == y[:, :-2]).all())
((4, 8), True)
"""

from __future__ import annotations

import json
import sysconfig
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flowsys.errors import ConfigError
from flowsys.rng import mix

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
FIELDS = ("x", "y")  # a window's inputs, and its next-token targets


def stdlib_sources(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in a deterministic order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(max_bytes: int | None = None, root: str | Path | None = None) -> bytes:
    """The concatenated sources, cut at ``max_bytes`` (None: all of them)."""
    chunks, total = [], 0
    for path in stdlib_sources(root):
        data = path.read_bytes()
        if max_bytes is not None:
            data = data[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return b"".join(chunks)


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The training part and the held-out tail of ``tokens``."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"ByteDataset: val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:]


def mix64(seed: int, counters: np.ndarray) -> np.ndarray:
    """splitmix64 of ``seed`` and each counter: independent 64-bit words, one per counter."""
    return mix(counters.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64)))


_CORPORA: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_CORPORA_LOCK = threading.Lock()


@dataclass(frozen=True)
class Windows:
    """Batches of ``batch_size`` random windows of ``block_size + 1`` tokens of a corpus split:
    ``x`` the first ``block_size`` tokens, ``y`` the last (next-token targets)."""

    source: str = "stdlib"
    max_bytes: int | None = 4 << 20
    val_fraction: float = 0.1
    split: str = "train"
    batch_size: int = 16
    block_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.source != "stdlib":
            raise ConfigError(f"data source {self.source!r} is not known; known: 'stdlib'")
        if self.split not in ("train", "val"):
            raise ConfigError(f"data split must be 'train' or 'val', got {self.split!r}")

    # ------------------------------------------------------------------------ serialisation
    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Windows:
        return cls(**json.loads(text))

    # ------------------------------------------------------------------------------ reading
    def tokens(self) -> np.ndarray:
        """The split's tokens (the corpus is read once per process)."""
        key = (self.source, self.max_bytes, self.val_fraction)
        with _CORPORA_LOCK:
            if key not in _CORPORA:
                raw = np.frombuffer(stdlib_corpus(self.max_bytes), dtype=np.uint8)
                _CORPORA[key] = split_tokens(raw, self.val_fraction)
        train, val = _CORPORA[key]
        return train if self.split == "train" else val

    def starts(self, step: int, rows: range) -> np.ndarray:
        """Where the windows of samples ``rows`` of step ``step`` start."""
        n = len(self.tokens()) - self.block_size
        if n <= 0:
            raise ConfigError(f"the {self.split} split has {len(self.tokens())} tokens, too few for "
                              f"block_size {self.block_size}")
        index = np.arange(rows.start, rows.stop, dtype=np.uint64) + np.uint64(step * self.batch_size)
        return (mix64(self.seed, index) % np.uint64(n)).astype(np.int64)

    def read(self, field: str, step: int, box) -> np.ndarray:
        """The block ``box`` ((start, stop) per axis of the (batch_size, block_size) batch) of
        ``field`` at step ``step``, int64."""
        if field not in FIELDS:
            raise ConfigError(f"a window has fields {FIELDS}, not {field!r}")
        (r0, r1), (c0, c1) = box
        tokens = self.tokens()
        shift = 1 if field == "y" else 0
        cols = np.arange(c0, c1, dtype=np.int64) + shift
        return tokens[self.starts(step, range(r0, r1))[:, None] + cols[None, :]].astype(np.int64)


@dataclass(frozen=True)
class Read:
    """A global tensor's values as a worker reads them: ``field`` of ``spec``'s batch at ``step``
    (what :class:`flowsys.global_tensor.GlobalValue` keeps as its ``source``)."""

    spec: Windows
    field: str
    step: int

    def read(self, box) -> np.ndarray:
        return self.spec.read(self.field, self.step, box)

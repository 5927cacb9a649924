"""Data a worker opens itself, addressed by global sample index.

A :class:`Windows` spec names a token corpus (the standard library's sources, a directory of
token shards that ``flowsys prepare`` wrote, or a weighted mixture of such directories) and how
a step's batch is drawn from it: sample ``i`` of step ``s`` is the window that starts at a
counter-based hash of ``(seed, s * batch_size + i)`` (in a mixture, a second hash of the same
index picks the sample's directory first), so it is the same sample in every layout and any rank
can read just its rows. The driver sends a worker the spec once and the step number each step;
the worker reads the block of the batch its layout holds (:meth:`Windows.read`), each corpus
opened (memory-mapped) once per process.

This module is vocabulary: it imports nothing of flowsys but its errors and the counter-based
mix (`flowsys.rng`), so a worker reads data without loading the user API.

>>> spec = Windows(max_bytes=1 << 16, batch_size=4, block_size=8)
>>> x = spec.read("x", 3, ((0, 4), (0, 8)))
>>> y = spec.read("y", 3, ((2, 4), (0, 8)))
>>> x.shape, bool((spec.read("x", 3, ((2, 4), (1, 8)))[:, :-1] == y[:, :-2]).all())
((4, 8), True)
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sysconfig
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flowsys.errors import ConfigError
from flowsys.rng import mix

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
FIELDS = ("x", "y")  # a window's inputs, and its next-token targets

# A directory of token shards (``flowsys prepare``): train.bin and val.bin, flat arrays of token
# ids (meta.json's dtype), and meta.json, written last, so its presence means the shards are whole.
META = "meta.json"
FORMAT, FORMAT_VERSION = "flowsys-tokens", 1
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
_EVERY_NODE = "every node must see the data directory at this same path (a shared filesystem, or a copy on each node)"


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


def read_meta(directory: str | Path) -> dict:
    """A token directory's meta.json; ConfigError naming the file when it is missing or not ours."""
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: {directory} is not a directory of token shards; run "
                          f"`flowsys prepare SRC --out {directory}` (and {_EVERY_NODE})") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} ({e}); run `flowsys prepare` again into {directory}") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} meta.json (format {meta.get('format')!r}, "
                          f"version {meta.get('version')!r}); run `flowsys prepare` again into {directory}")
    return meta


def open_shards(directory: str | Path, meta: dict) -> dict[str, np.ndarray]:
    """The splits of a token directory as read-only memory maps, checked against ``meta``."""
    dtype, out = np.dtype(meta["dtype"]), {}
    for split, name in SPLIT_FILES.items():
        path, want = Path(directory) / name, int(meta["tokens"][split])
        try:
            size = path.stat().st_size
            out[split] = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        except OSError as e:
            raise ConfigError(f"cannot read {path} ({e.strerror}); {_EVERY_NODE}") from None
        if size != want * dtype.itemsize:
            raise ConfigError(f"{path} has {size:,} bytes but {META} says {want:,} {dtype} tokens "
                              f"({want * dtype.itemsize:,} bytes): the directory is incomplete or changed since; "
                              f"run `flowsys prepare` again")
    return out


def digest(metas: list[dict]) -> str:
    """A short fingerprint of token directories' contents (their shards' sha256s, from meta.json):
    what a worker checks that it opened the data the driver did."""
    text = "\n".join(f"{m['sha256']['train.bin']} {m['sha256']['val.bin']}" for m in metas)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def parse_source(source: str) -> tuple[tuple[str, float], ...]:
    """A token source as (directory, weight) pairs, the weights normalised: ``"DIR"``, or a mixture
    ``"DIR_A:0.7,DIR_B:0.3"`` (a part without ``:weight`` weighs 1).

    >>> parse_source("/data/a:3,/data/b:1")
    (('/data/a', 0.75), ('/data/b', 0.25))
    """
    parts = []
    for item in source.split(","):
        item = item.strip()
        path, sep, weight = item.rpartition(":")
        try:
            w = float(weight) if sep and path else None
        except ValueError:  # a ':' that is part of the path
            w = None
        if w is None:
            path, w = item, 1.0
        if not path:
            raise ConfigError(f"data source {source!r} has an empty part; write 'DIR' or 'DIR_A:0.7,DIR_B:0.3'")
        if path == "stdlib":
            raise ConfigError(f"data source {source!r}: 'stdlib' is a byte corpus and cannot be mixed; "
                              f"mix directories of text or of `flowsys prepare` output")
        if not (math.isfinite(w) and w > 0):
            raise ConfigError(f"data source {source!r}: the weight of {path!r} must be a positive number, got {weight!r}")
        parts.append((path, w))
    total = sum(w for _, w in parts)
    return tuple((path, w / total) for path, w in parts)


def format_source(parts: list[tuple[str, float]]) -> str:
    """The source string of (directory, weight) pairs: the directory alone for one."""
    if len(parts) == 1:
        return str(parts[0][0])
    return ",".join(f"{path}:{weight!r}" for path, weight in parts)


def mix64(seed: int, counters: np.ndarray) -> np.ndarray:
    """splitmix64 of ``seed`` and each counter: independent 64-bit words, one per counter."""
    return mix(counters.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64)))


_CORPORA: dict[tuple, list[dict[str, np.ndarray]]] = {}  # per process: each source's splits
_CORPORA_LOCK = threading.Lock()


@dataclass(frozen=True)
class Windows:
    """Batches of ``batch_size`` random windows of ``block_size + 1`` tokens of a corpus split:
    ``x`` the first ``block_size`` tokens, ``y`` the last (next-token targets).

    ``source`` is ``"stdlib"`` (the standard library's first ``max_bytes`` bytes, the last
    ``val_fraction`` of them the validation split), a directory of token shards (val.bin the
    validation split; ``max_bytes`` and ``val_fraction`` do not apply), or a mixture
    ``"DIR_A:0.7,DIR_B:0.3"``; absolute paths that every node sees. ``digest`` is what the driver's
    meta.json files said of the shards (:func:`digest`): a worker that finds other data raises."""

    source: str = "stdlib"
    max_bytes: int | None = 4 << 20
    val_fraction: float = 0.1
    split: str = "train"
    batch_size: int = 16
    block_size: int = 64
    seed: int = 0
    digest: str = ""

    def __post_init__(self):
        if self.source != "stdlib":
            parse_source(self.source)  # a malformed mixture fails where the spec is made
        if self.split not in ("train", "val"):
            raise ConfigError(f"data split must be 'train' or 'val', got {self.split!r}")

    # ------------------------------------------------------------------------ serialisation
    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Windows:
        return cls(**json.loads(text))

    # ------------------------------------------------------------------------------ opening
    def check(self) -> None:
        """Open every file this spec reads: a ConfigError names a file this node cannot read, or
        the directories whose contents differ from the driver's. Call it on every worker before
        the first step (it looks at the files now, whatever this process opened before)."""
        if self.source == "stdlib":
            self._corpus()
        else:
            self._open_dirs()

    def _open_dirs(self) -> list[dict[str, np.ndarray]]:
        dirs = [d for d, _ in parse_source(self.source)]
        metas = [read_meta(d) for d in dirs]
        if self.digest and digest(metas) != self.digest:
            raise ConfigError(f"the data in {', '.join(dirs)} on this node is not what the driver opened (digest "
                              f"{digest(metas)}, the driver's {self.digest}): it was prepared again since, or this "
                              f"node has another copy; {_EVERY_NODE}, the same files")
        return [open_shards(d, m) for d, m in zip(dirs, metas)]

    def _corpus(self) -> list[dict[str, np.ndarray]]:
        """Each source's splits, opened once per process (the stdlib read, the shards mapped)."""
        stdlib = self.source == "stdlib"
        key = (self.source, self.max_bytes, self.val_fraction) if stdlib else (self.source, self.digest)
        with _CORPORA_LOCK:
            if key not in _CORPORA:
                if stdlib:
                    raw = np.frombuffer(stdlib_corpus(self.max_bytes), dtype=np.uint8)
                    _CORPORA[key] = [dict(zip(SPLIT_FILES, split_tokens(raw, self.val_fraction)))]
                else:
                    _CORPORA[key] = self._open_dirs()
        return _CORPORA[key]

    def weights(self) -> list[float]:
        """Each source's share of the samples (normalised)."""
        return [1.0] if self.source == "stdlib" else [w for _, w in parse_source(self.source)]

    def parts(self) -> list[np.ndarray]:
        """The split's tokens, one array per source."""
        return [c[self.split] for c in self._corpus()]

    def tokens(self) -> np.ndarray:
        """The split's tokens (of a single source; a mixture has :meth:`parts`)."""
        parts = self.parts()
        if len(parts) != 1:
            raise ConfigError(f"data source {self.source!r} is a mixture: its tokens are parts(), one per directory")
        return parts[0]

    # ------------------------------------------------------------------------------ reading
    def _index(self, step: int, rows: range) -> np.ndarray:
        return np.arange(rows.start, rows.stop, dtype=np.uint64) + np.uint64(step * self.batch_size)

    def sources(self, step: int, rows: range) -> np.ndarray:
        """Which source each of samples ``rows`` of step ``step`` is drawn from: where a uniform
        number hashed from its global index falls among the cumulative weights. The hash takes
        counters with the top bit set, a stream that the windows' starts never reach."""
        weights = self.weights()
        if len(weights) == 1:
            return np.zeros(len(rows), dtype=np.int64)
        bits = mix64(self.seed, self._index(step, rows) | np.uint64(1 << 63))
        u = (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
        return np.minimum(np.searchsorted(np.cumsum(weights), u, side="right"), len(weights) - 1)

    def starts(self, step: int, rows: range) -> np.ndarray:
        """Where the windows of samples ``rows`` of step ``step`` start, each in its own source's
        split (:meth:`sources`)."""
        index, which = self._index(step, rows), self.sources(step, rows)
        out = np.empty(len(rows), dtype=np.int64)
        for k, tokens in enumerate(self.parts()):
            n = len(tokens) - self.block_size
            if n <= 0:
                where = "" if self.source == "stdlib" else f" of {parse_source(self.source)[k][0]}"
                raise ConfigError(f"the {self.split} split{where} has {len(tokens)} tokens, too few for "
                                  f"block_size {self.block_size}")
            mine = which == k
            out[mine] = (mix64(self.seed, index[mine]) % np.uint64(n)).astype(np.int64)
        return out

    def read(self, field: str, step: int, box) -> np.ndarray:
        """The block ``box`` ((start, stop) per axis of the (batch_size, block_size) batch) of
        ``field`` at step ``step``, int64."""
        if field not in FIELDS:
            raise ConfigError(f"a window has fields {FIELDS}, not {field!r}")
        (r0, r1), (c0, c1) = box
        shift = 1 if field == "y" else 0
        cols = np.arange(c0, c1, dtype=np.int64) + shift
        which, starts = self.sources(step, range(r0, r1)), self.starts(step, range(r0, r1))
        out = np.empty((r1 - r0, c1 - c0), dtype=np.int64)
        for k, tokens in enumerate(self.parts()):
            mine = which == k
            out[mine] = tokens[starts[mine][:, None] + cols[None, :]]
        return out


@dataclass(frozen=True)
class Read:
    """A global tensor's values as a worker reads them: ``field`` of ``spec``'s batch at ``step``
    (what :class:`flowsys.global_tensor.GlobalValue` keeps as its ``source``)."""

    spec: Windows
    field: str
    step: int

    def read(self, box) -> np.ndarray:
        return self.spec.read(self.field, self.step, box)

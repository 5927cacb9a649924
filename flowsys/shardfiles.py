"""A checkpoint's rank files, as the workers and the driver write and read them: one
``rank_<r>.safetensors`` per rank (written to a temporary name, then renamed), and any block of a
tensor's logical value read back from the regions of the saved shards that overlap it.

Vocabulary: a worker writes and reads its own shards with this module alone, without the user
API (``flowsys.checkpoint`` plans what each rank writes or reads and keeps the metadata).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from flowsys.device import contiguous
from flowsys.errors import StateDictError

def write_shards(directory: str | os.PathLike, rank: int, arrays: dict[str, np.ndarray]) -> dict:
    """Write ``rank_<rank>.safetensors`` (to a temporary name, then renamed); what was written:
    file name, size, and every tensor's name and shape."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    path = Path(directory) / f"rank_{rank}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: contiguous(np.asarray(v)) for k, v in arrays.items()}, str(tmp))
    os.replace(tmp, path)
    return {"file": path.name, "size": path.stat().st_size,
            "tensors": {k: list(np.shape(v)) for k, v in arrays.items()}}


class RankFiles:
    """The rank files of the checkpoint in ``directory``, each opened (``safe_open``, which
    reads only the regions asked for) on first use and closed on leaving the ``with``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory, self.stack, self.handles = Path(directory), contextlib.ExitStack(), {}

    def __enter__(self) -> RankFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def get(self, rank: int, key: str):
        """Rank ``rank``'s file (a ``safe_open`` handle), which must hold ``key``."""
        from safetensors import safe_open  # noqa: PLC0415

        if rank not in self.handles:
            path = self.directory / f"rank_{rank}.safetensors"
            if not path.exists():
                raise StateDictError(f"checkpoint {self.directory}: rank {rank}'s file is missing; it holds {key}")
            self.handles[rank] = self.stack.enter_context(safe_open(str(path), framework="np"))
        f = self.handles[rank]
        if key not in f.keys():
            raise StateDictError(f"checkpoint: rank {rank}'s file lacks {key}")
        return f


def read_box(files: RankFiles, key: str, info: dict, box) -> np.ndarray:
    """The block ``box`` ([start, stop) per axis) of tensor ``key``'s logical value (``info``:
    its metadata), read from the rank files: only the regions of the saved shards that overlap
    it, partial sums added, replicas once."""
    box = [tuple(b) for b in box]
    out = np.zeros([b - a for a, b in box], dtype=np.dtype(info["dtype"]))
    seen = set()
    for s in info["shards"]:
        rank, saved = s["rank"], [tuple(b) for b in s["box"]]
        lo = [max(a, c) for (a, _), (c, _) in zip(saved, box)]
        hi = [min(b, d) for (_, b), (_, d) in zip(saved, box)]
        if any(a >= b for a, b in zip(lo, hi)) or (not info["partial"] and tuple(saved) in seen):
            continue  # no overlap, or a replica of a box read already
        f = files.get(rank, key)
        piece = f.get_slice(key)
        if tuple(piece.get_shape()) != tuple(b - a for a, b in saved):
            raise StateDictError(f"checkpoint: rank {rank}'s {key} has shape {tuple(piece.get_shape())}, "
                                 f"its box is {s['box']}")
        value = piece[tuple(slice(a - c, b - c) for a, b, (c, _) in zip(lo, hi, saved))] if saved else f.get_tensor(key)
        region = tuple(slice(a - c, b - c) for a, b, (c, _) in zip(lo, hi, box))
        if info["partial"]:
            out[region] += value
        else:
            out[region] = value
            seen.add(tuple(saved))
    return out

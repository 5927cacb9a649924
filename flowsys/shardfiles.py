"""A checkpoint's rank files, as the workers and the driver write and read them: one
``rank_<r>.safetensors`` per rank (written to a temporary name, fsynced, then renamed, with the
file's sha256 and every tensor's crc32 reported), and any block of a tensor's logical value read
back from the regions of the saved shards that overlap it, each saved shard checked against its
crc32 the first time it is read.

Vocabulary: a worker writes and reads its own shards with this module alone, without the user
API (``flowsys.checkpoint`` plans what each rank writes or reads and keeps the metadata).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np

from flowsys.device import contiguous
from flowsys.errors import StateDictError

_CHUNK = 16 << 20  # bytes hashed at a time when a file is read back


class CheckpointCorrupt(StateDictError):
    """A checkpoint file whose bytes are not those written: a checksum recorded in its manifest
    differs, or the file cannot be parsed. The message names the directory, the file and the
    tensor."""


def write_shards(directory: str | os.PathLike, rank: int, arrays: dict[str, np.ndarray]) -> dict:
    """Write ``rank_<rank>.safetensors`` (to a temporary name, fsynced, then renamed, and the
    directory fsynced); what was written: file name, size, every tensor's name and shape, the
    file's ``sha256`` and every tensor's ``crc32`` (of its bytes, taken from ``arrays``)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    path = Path(directory) / f"rank_{rank}.safetensors"
    tmp = path.with_suffix(".tmp")
    arrays = {k: contiguous(v) for k, v in arrays.items()}  # (a device array is copied to the host)
    save_file(arrays, str(tmp))
    sha256, crc32 = checksums(tmp, arrays)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)
    return {"file": path.name, "size": path.stat().st_size,
            "tensors": {k: list(np.shape(v)) for k, v in arrays.items()}, "sha256": sha256, "crc32": crc32}


def checksums(path: str | os.PathLike, arrays: dict[str, np.ndarray] | None = None) -> tuple[str, dict[str, int]]:
    """The sha256 of the safetensors file at ``path`` and the crc32 of each tensor's bytes, in
    one pass. With ``arrays`` (what was just written there) the tensors' bytes come from memory
    and only the header from the file: what was meant to be written is what gets recorded."""
    sha, crc = hashlib.sha256(), {}
    with open(path, "rb") as f:
        head = f.read(8)
        size = os.fstat(f.fileno()).st_size
        header = f.read(min(int.from_bytes(head, "little"), size)) if len(head) == 8 else b""
        sha.update(head + header)
        try:
            layout = json.loads(header)
            spans = sorted((v["data_offsets"], k) for k, v in layout.items() if k != "__metadata__")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CheckpointCorrupt(f"{path}: its safetensors header is unreadable ({e}): the file is corrupt") from e
        at = 0
        for (begin, end), key in spans:
            if begin != at or end < begin:
                raise CheckpointCorrupt(f"{path}: its header places {key} at bytes {begin}..{end}, not after the "
                                        f"tensor before it (byte {at}): the file is corrupt")
            if arrays is not None:
                data = arrays[key].reshape(-1).view(np.uint8)
                sha.update(data)
                crc[key] = zlib.crc32(data)
                f.seek(end - begin, os.SEEK_CUR)
            else:
                value, left = 0, end - begin
                while left:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        break  # the file ends early: the checksum differs
                    sha.update(chunk)
                    value, left = zlib.crc32(chunk, value), left - len(chunk)
                crc[key] = value
            at = end
        for chunk in iter(lambda: f.read(_CHUNK), b""):  # anything after the last tensor counts too
            sha.update(chunk)
    return sha.hexdigest(), crc


def crc32_of(a: np.ndarray) -> int:
    """The crc32 of an array's bytes, as :func:`checksums` computes a saved tensor's."""
    return zlib.crc32(contiguous(a).reshape(-1).view(np.uint8))


def check_tensor(directory, file: str, key: str, got: int, want: int | None) -> None:
    """A ``CheckpointCorrupt`` unless tensor ``key`` of ``file`` has the crc32 its manifest
    recorded."""
    if want is None:
        raise CheckpointCorrupt(f"checkpoint {directory}: its manifest records no checksum of {key} in {file}, "
                                f"which holds it: the file is not the one written")
    if got != want:
        raise CheckpointCorrupt(f"checkpoint {directory}: {file} holds {key} with crc32 {got:08x}, the manifest "
                                f"recorded {want:08x} when it was written: the file is corrupt; load an earlier "
                                f"checkpoint (fs.checkpoint.latest_verified)")


def fsync(path: str | os.PathLike) -> None:
    """Flush a file, or a directory's entries, to disk (a filesystem that cannot sync a
    directory is let be)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


class RankFiles:
    """The rank files of the checkpoint in ``directory``, each opened (``safe_open``, which
    reads only the regions asked for) on first use and closed on leaving the ``with``. Given
    ``crc32`` (the manifest's: per file, per tensor), every saved shard is read whole and checked
    the first time a region of it is asked for; a mismatch is a ``CheckpointCorrupt``."""

    def __init__(self, directory: str | os.PathLike, crc32: dict[str, dict[str, int]] | None = None):
        self.directory, self.stack, self.handles = Path(directory), contextlib.ExitStack(), {}
        self.crc32, self.checked = crc32, set()

    def __enter__(self) -> RankFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def get(self, rank: int, key: str):
        """Rank ``rank``'s file (a ``safe_open`` handle), which must hold ``key``."""
        from safetensors import SafetensorError, safe_open  # noqa: PLC0415

        if rank not in self.handles:
            path = self.directory / f"rank_{rank}.safetensors"
            if not path.exists():
                raise StateDictError(f"checkpoint {self.directory}: rank {rank}'s file is missing; it holds {key}")
            try:
                self.handles[rank] = self.stack.enter_context(safe_open(str(path), framework="np"))
            except SafetensorError as e:
                raise CheckpointCorrupt(f"checkpoint {self.directory}: {path.name} cannot be opened ({e}), so "
                                        f"{key} cannot be read: the file is corrupt") from e
        f = self.handles[rank]
        if key not in f.keys():
            raise StateDictError(f"checkpoint: rank {rank}'s file lacks {key}")
        return f

    def read(self, rank: int, key: str, region: tuple) -> np.ndarray:
        """The block ``region`` (slices; ``()`` the whole) of rank ``rank``'s shard of ``key``."""
        from safetensors import SafetensorError  # noqa: PLC0415

        f, name = self.get(rank, key), f"rank_{rank}.safetensors"
        try:
            if self.crc32 is None or (rank, key) in self.checked:
                return f.get_slice(key)[region] if region else f.get_tensor(key)
            whole = f.get_tensor(key)
        except SafetensorError as e:
            raise CheckpointCorrupt(f"checkpoint {self.directory}: {name}'s {key} cannot be read ({e}): "
                                    f"the file is corrupt") from e
        check_tensor(self.directory, name, key, crc32_of(whole), self.crc32.get(name, {}).get(key))
        self.checked.add((rank, key))
        return whole[region] if region else whole


def read_box(files: RankFiles, key: str, info: dict, box) -> np.ndarray:
    """The block ``box`` ([start, stop) per axis) of tensor ``key``'s logical value (``info``:
    its metadata), read from the rank files: only the regions of the saved shards that overlap
    it (the whole shard when it is to be checked), partial sums added, replicas once."""
    box = [tuple(b) for b in box]
    out = np.zeros([b - a for a, b in box], dtype=np.dtype(info["dtype"]))
    seen = set()
    for s in info["shards"]:
        rank, saved = s["rank"], [tuple(b) for b in s["box"]]
        lo = [max(a, c) for (a, _), (c, _) in zip(saved, box)]
        hi = [min(b, d) for (_, b), (_, d) in zip(saved, box)]
        if any(a >= b for a, b in zip(lo, hi)) or (not info["partial"] and tuple(saved) in seen):
            continue  # no overlap, or a replica of a box read already
        shape = tuple(files.get(rank, key).get_slice(key).get_shape())
        if shape != tuple(b - a for a, b in saved):
            raise StateDictError(f"checkpoint: rank {rank}'s {key} has shape {shape}, its box is {s['box']}")
        value = files.read(rank, key, tuple(slice(a - c, b - c) for a, b, (c, _) in zip(lo, hi, saved)))
        region = tuple(slice(a - c, b - c) for a, b, (c, _) in zip(lo, hi, box))
        if info["partial"]:
            out[region] += value
        else:
            out[region] = value
            seen.add(tuple(saved))
    return out

"""Checkpoints that survive a change of layout.

    fs.checkpoint.save(root, model, optimizer, step=12, extra={"data_position": 3072})
    info = fs.checkpoint.load(root, model, optimizer)      # the latest complete checkpoint

A checkpoint is a directory ``root/step_000012/``:

- ``rank_<r>.safetensors`` — the shards rank ``r`` holds of every parameter (``param/<name>``)
  and of its optimizer state (``state/<name>/<key>``), as laid out when saved;
- ``meta.json`` — per tensor its logical shape, dtype, placement (mesh of ranks) and SBP, and
  which rank holds which box of it; the step, the RNG state and what the caller adds (the data
  position);
- ``MANIFEST.json`` — written last, naming every file with its size. A directory without it is
  an interrupted write and is never loaded.

Every file is written to a temporary name and renamed into place, so a crash leaves either a
complete checkpoint or one without a manifest. Loading assembles each tensor's logical value
from the boxes saved (partial sums added) and lays it out as the model's parameter is laid out
*now*: save under dp2 x tp2, load as tp4, a pipeline split, or one device. Nothing is unpickled:
tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from flowsys.device import contiguous
from flowsys.errors import ConfigError, StateDictError
from flowsys.optim.state import LOGICAL

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def save(root: str | os.PathLike, model, optimizer=None, step: int = 0, extra: dict | None = None) -> Path:
    """Write a checkpoint of ``model`` (and ``optimizer``'s state) as ``root/step_<step>``."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    from flowsys.functions import rng_state  # noqa: PLC0415

    if optimizer is not None and getattr(optimizer, "_state_in_workers", None) is not None:
        from flowsys.optim.state import pull_state  # noqa: PLC0415

        pull_state(optimizer)  # the state the workers keep (graphs run as per-rank plans)
    root = Path(root)
    final = root / f"step_{step:06d}"
    if (final / "MANIFEST.json").exists():
        raise ConfigError(f"checkpoint {final} exists already; save under another step")
    final.mkdir(parents=True, exist_ok=True)
    per_rank: dict[int, dict[str, np.ndarray]] = {}
    tensors: dict[str, Any] = {}
    names = {id(p): name for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        tensors[f"param/{name}"] = _put(per_rank, f"param/{name}", p._data)
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(id(p))
                if not state:
                    continue
                for key, entry in _state_entries(p, state, names[id(p)]):
                    tensors[key] = _put(per_rank, key, entry)
    files = {}
    for rank, arrays in sorted(per_rank.items()):
        path = final / f"rank_{rank}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: contiguous(v) for k, v in arrays.items()}, str(tmp))
        os.replace(tmp, path)
        files[path.name] = path.stat().st_size
    meta = {"step": step, "tensors": tensors, "rng": rng_state(), "extra": extra or {},
            "optimizer": None if optimizer is None else {
                "type": type(optimizer).__name__,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}}
    files["meta.json"] = _write_json(final / "meta.json", meta)
    _write_json(final / "MANIFEST.json", {"step": step, "files": files})  # last: the checkpoint is complete
    return final


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    complete = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and _complete(d):
            complete.append((int(m.group(1)), d))
    return max(complete)[1] if complete else None


def load(path: str | os.PathLike, model, optimizer=None) -> dict:
    """Load the checkpoint at ``path`` (a step directory, or a root: its latest complete one)
    into ``model`` and ``optimizer`` as they are laid out now; returns its step, RNG state and
    extra. The RNG is restored too."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    from flowsys.functions import set_rng_state  # noqa: PLC0415

    path = Path(path)
    if not _STEP_DIR.match(path.name):
        found = latest(path)
        if found is None:
            raise ConfigError(f"no complete checkpoint under {path}")
        path = found
    if not _complete(path):
        raise ConfigError(f"checkpoint {path} is incomplete (no manifest, or a file is missing or truncated)")
    meta = json.loads((path / "meta.json").read_text())
    shards = {}
    for f in sorted(path.glob("rank_*.safetensors")):
        shards[int(f.stem.split("_")[1])] = load_file(str(f))
    logical = {key: _assemble(key, info, shards) for key, info in meta["tensors"].items()}
    params = dict(model.named_parameters())
    missing = sorted(n for n in params if f"param/{n}" not in logical)
    if missing:
        raise StateDictError(f"checkpoint {path} lacks parameter(s) {missing}")
    for name, p in params.items():
        value = logical[f"param/{name}"]
        if tuple(value.shape) != tuple(p.shape):
            raise StateDictError(f"checkpoint {path}: parameter {name} has shape {tuple(value.shape)}, "
                                 f"the model's has {tuple(p.shape)}")
    for name, p in params.items():
        _assign(p, logical[f"param/{name}"])
    if optimizer is not None:
        if meta["optimizer"] is None:
            raise StateDictError(f"checkpoint {path} holds no optimizer state")
        names = {id(p): name for name, p in params.items()}
        optimizer.state.clear()
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                keys = {k.split("/", 2)[2]: v for k, v in logical.items() if k.startswith(f"state/{name}/")}
                if keys:
                    optimizer.state[id(p)] = _restate(p, keys)
    if optimizer is not None:  # the next compiled step gives it to its workers, laid out as it needs
        optimizer._state_in_workers = None
    set_rng_state(meta["rng"])
    return {"step": meta["step"], "extra": meta["extra"], "path": str(path)}


# ------------------------------------------------------------------------------------- pieces
def _put(per_rank: dict, key: str, data) -> dict:
    """Record ``data``'s shards under ``key`` in the rank files; its metadata."""
    from flowsys.global_tensor import GlobalValue  # noqa: PLC0415
    from flowsys.layout import fmt, shard_box  # noqa: PLC0415
    from flowsys.sbp import PartialSum  # noqa: PLC0415

    if type(data) is GlobalValue:
        p = data.placement
        boxes = []
        for i, rank in enumerate(p.ranks):
            box = shard_box(data.shape, data.sbp, p.mesh, p.coords(rank))
            per_rank.setdefault(rank, {})[key] = np.asarray(data.shards[i])
            boxes.append({"rank": rank, "box": [list(b) for b in box]})
        partial = any(isinstance(s, PartialSum) for s in data.sbp)
        return {"shape": list(data.shape), "dtype": np.dtype(data.dtype).str, "placement": np.asarray(
            _nested_ranks(p)).tolist(), "sbp": fmt(data.sbp), "partial": partial, "shards": boxes}
    a = np.asarray(data)
    per_rank.setdefault(0, {})[key] = a
    return {"shape": list(a.shape), "dtype": a.dtype.str, "placement": None, "sbp": None, "partial": False,
            "shards": [{"rank": 0, "box": [[0, n] for n in a.shape]}]}


def _nested_ranks(p) -> list:
    return np.asarray(p.ranks).reshape(p.mesh).tolist()


def _state_entries(p, state: dict, name: str):
    """(key, data) for each array of ``p``'s optimizer state, laid out as ``p`` is; scalars
    (AdamW's step count) as 0-d arrays."""
    from flowsys.global_tensor import GlobalValue  # noqa: PLC0415

    d = p._data
    if LOGICAL in state:  # loaded and not used since: already logical
        for key, v in sorted(state[LOGICAL].items()):
            yield f"state/{name}/{key}", np.asarray(v)
        return
    if type(d) is GlobalValue:
        per_shard = [state.get(i, {}) for i in range(len(d.placement.ranks))]
        keys = sorted({k for s in per_shard for k in s})
        for key in keys:
            values = [s.get(key) for s in per_shard]
            if all(np.ndim(v) == 0 for v in values if v is not None):
                yield f"state/{name}/{key}", np.asarray(next(v for v in values if v is not None))
                continue
            sbp = _state_layout(d, [np.shape(v) for v in values])
            if sbp is None:
                raise StateDictError(f"optimizer state {key!r} of {name} has shard shapes "
                                     f"{[np.shape(v) for v in values]} that match neither the parameter's layout "
                                     f"{d.sbp} nor a ZeRO shard of it")
            yield f"state/{name}/{key}", GlobalValue(d.placement, sbp, d.shape, np.asarray(values[0]).dtype,
                                                     [np.asarray(v) for v in values])
    else:
        for key, v in sorted(state.items()):
            yield f"state/{name}/{key}", np.asarray(v)


def _state_layout(d, shapes: list) -> tuple | None:
    """The layout optimizer state with these shard shapes has: the parameter's, or (ZeRO) the
    parameter's split along one of its broadcast mesh axes."""
    from flowsys.graph.passes import zero_shard  # noqa: PLC0415
    from flowsys.layout import local_shape  # noqa: PLC0415
    from flowsys.sbp import Broadcast  # noqa: PLC0415

    p = d.placement
    candidates = [tuple(d.sbp)] + [zero_shard(d, k) for k, s in enumerate(d.sbp) if isinstance(s, Broadcast)]
    for sbp in candidates:
        if [tuple(local_shape(d.shape, sbp, p.mesh, p.coords(r))) for r in p.ranks] == [tuple(x) for x in shapes]:
            return sbp
    return None


def _assemble(key: str, info: dict, shards: dict) -> np.ndarray:
    out = np.zeros(info["shape"], dtype=np.dtype(info["dtype"]))
    seen = set()
    for s in info["shards"]:
        rank = s["rank"]
        if rank not in shards or key not in shards[rank]:
            raise StateDictError(f"checkpoint: rank {rank}'s file lacks {key}")
        region = tuple(slice(a, b) for a, b in s["box"])
        piece = shards[rank][key]
        if piece.shape != tuple(b - a for a, b in s["box"]):
            raise StateDictError(f"checkpoint: rank {rank}'s {key} has shape {piece.shape}, its box is {s['box']}")
        box_key = tuple(map(tuple, s["box"]))
        if info["partial"]:
            out[region] += piece
        elif box_key not in seen:  # replicas hold the same values
            out[region] = piece
            seen.add(box_key)
    return out


def _assign(p, value: np.ndarray) -> None:
    """Write the logical ``value`` into parameter ``p`` in its current layout (what the workers
    held of it is superseded: the next step sends these values)."""
    from flowsys.global_tensor import GlobalValue, make_global  # noqa: PLC0415
    from flowsys.tensor import stored  # noqa: PLC0415

    d = stored(p)
    if type(d) is GlobalValue:
        p._data = make_global(value.astype(d.dtype), d.placement, d.sbp)
    else:
        p._data = value.astype(d.dtype).copy()
    p.init = None


def _restate(p, keys: dict[str, np.ndarray]) -> dict:
    """Optimizer state for ``p``: per value for a local parameter; for a global one, logical
    values that the next update lays out as it needs them (the parameter's layout, or a ZeRO
    shard of it: see :func:`lay_out_state`)."""
    from flowsys.global_tensor import GlobalValue  # noqa: PLC0415

    d = p._data
    if type(d) is not GlobalValue:
        return {k: (v.item() if v.ndim == 0 else v.astype(d.dtype)) for k, v in keys.items()}
    return {LOGICAL: {k: (v.item() if v.ndim == 0 else v.astype(d.dtype)) for k, v in keys.items()}}


def _write_json(path: Path, value) -> int:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path.stat().st_size


def _complete(d: Path) -> bool:
    manifest = d / "MANIFEST.json"
    if not manifest.exists():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((d / name).exists() and (d / name).stat().st_size == size for name, size in files.items())

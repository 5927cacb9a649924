"""Optimizer state where it lives: in the workers while compiled steps run (pulled for
checkpoints, pushed back after loading one), or in ``Optimizer.state`` on the driver, where
state loaded from a checkpoint stays logical until an update lays it out."""

from __future__ import annotations

from typing import Any

import numpy as np

from flowsys.global_tensor import GlobalValue, make_global
from flowsys.ops.optim import state_fields
from flowsys.keys import uid
from flowsys.tensor import stored

LOGICAL = "__logical__"  # optimizer state held as logical values until its first use lays it out


def lay_out_state(state: dict, placement, sbp) -> dict:
    """``state`` per shard index of the layout (placement, sbp), if it is still logical."""
    if LOGICAL not in state:
        return state
    per_shard: dict[int, dict] = {i: {} for i in range(len(placement.ranks))}
    for k, v in state[LOGICAL].items():
        if np.ndim(v) == 0:
            for s in per_shard.values():
                s[k] = v
        else:
            for i, shard in enumerate(make_global(np.asarray(v), placement, sbp).shards):
                per_shard[i][k] = np.array(shard)
    return per_shard


def stateful(opt) -> bool:
    """Whether ``opt`` keeps state between steps (AdamW's moments, SGD's momentum)."""
    return any(state_fields(opt.update_op, g) for g in opt.param_groups)


def _state_keys(opt, params: dict) -> dict[str, Any]:
    """The workers' key of each parameter ``opt`` trains -> the parameter."""
    trained = {id(p) for group in opt.param_groups for p in group["params"]}
    return {f"{uid(opt)}/{uid(p)}": p for p in params.values() if id(p) in trained}


def pull_state(opt) -> None:
    """Copy the optimizer state the workers keep into ``opt.state`` (laid out as the driver's
    executor keeps it: per parameter, per shard index), e.g. for a checkpoint."""
    from actors.worker import decode  # noqa: PLC0415

    backend = getattr(opt, "_state_in_workers", None)
    if backend is None:
        return
    keys = _state_keys(opt, opt._state_params)
    dumps = backend.get_state(sorted(keys))
    opt.state.clear()
    for rank, dump in sorted(dumps.items()):
        for e in dump.entries:
            p = keys[e.key]
            value = decode(e.value)
            value = value.item() if value.ndim == 0 else value
            if type(stored(p)) is GlobalValue:
                if rank not in stored(p).placement.ranks:
                    continue
                shard = opt.state.setdefault(id(p), {}).setdefault(stored(p).placement.index(rank), {})
            else:
                shard = opt.state.setdefault(id(p), {})
            shard[e.field] = value if np.ndim(value) == 0 else np.array(value)


def push_state(opt, backend, params: dict, layouts: dict | None = None) -> None:
    """Give the workers ``opt.state`` (the driver's copy) for the parameters it trains; state
    still logical (loaded from a checkpoint) is laid out as ``layouts[id(param)]`` (the layout
    its update runs in: the parameter's, or a ZeRO shard)."""
    from actors.worker import encode  # noqa: PLC0415
    from flowsys.planformat import plan_pb2  # noqa: PLC0415

    keys = _state_keys(opt, params)
    placed = [r for p in keys.values() if type(stored(p)) is GlobalValue for r in stored(p).placement.ranks]
    backend.ensure(max(placed, default=0) + 1)  # (fresh workers after a restart hold nothing yet)
    dumps: dict[int, Any] = {}
    ranks = range(backend.world)
    for key, p in keys.items():
        state = opt.state.get(id(p))
        if not state:
            continue
        if LOGICAL in state and type(stored(p)) is GlobalValue:
            placement, sbp = (layouts or {}).get(id(p), (stored(p).placement, stored(p).sbp))
            state = opt.state[id(p)] = lay_out_state(state, placement, sbp)
        if type(stored(p)) is GlobalValue:
            per_rank = {r: state.get(stored(p).placement.index(r), {}) for r in stored(p).placement.ranks}
        else:
            per_rank = {r: state for r in ranks}
        for r, fields in per_rank.items():
            dump = dumps.setdefault(r, plan_pb2.StateDump())
            for field, value in sorted(fields.items()):
                dump.entries.append(plan_pb2.StateEntry(key=key, field=field, value=encode(0, np.asarray(value))))
    backend.set_state({r: d.SerializeToString() for r, d in dumps.items()}, sorted(keys))
    opt._state_in_workers = backend
    opt._state_params = params
    opt._state_generation = backend.generation

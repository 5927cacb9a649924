"""Checkpoints that survive a change of layout.

    fs.checkpoint.save(root, model, optimizer, step=12, extra={"data_position": 3072})
    info = fs.checkpoint.load(root, model, optimizer)      # the latest complete checkpoint

A checkpoint is a directory ``root/step_000012/``:

- ``rank_<r>.safetensors`` — the shards rank ``r`` holds of every parameter (``param/<name>``)
  and of its optimizer state (``state/<name>/<key>``), as laid out when saved;
- ``meta.json`` — per tensor its logical shape, dtype, placement (mesh of ranks) and SBP, and
  which rank holds which box of it; the step, the RNG state and what the caller adds (the data
  position);
- ``MANIFEST.json`` — written last, naming every file with its size, its sha256, and the crc32
  of every tensor in it.

A step is written into a fresh hidden directory ``root/.step_000012.tmp-<random>`` (every file
fsynced, then the directory; the manifest written to a temporary name, fsynced and renamed) and
renamed to ``step_000012`` only when complete, so a crash leaves a hidden directory that is never
loaded, and a second writer of the same step fails at that rename instead of mixing its shards
in. ``lock(root, job_id)`` keeps one job writing a root. Loading checks every tensor it reads
against its crc32 before anything changes (``CheckpointCorrupt`` names the directory, file and
tensor); ``verify`` checks a whole checkpoint, ``latest_verified`` finds the newest that passes,
``prune`` keeps the newest few. Loading assembles each tensor's logical value
from the boxes saved (partial sums added) and lays it out as the model's parameter is laid out
*now*: save under dp2 x tp2, load as tp4, a pipeline split, or one device. Nothing is unpickled:
tensors are safetensors, the rest JSON.

Where the values live decides who reads and writes them. When the model's newest values (and
the optimizer's state) are in a backend's workers (after compiled steps), every worker writes its
own ``rank_<r>.safetensors`` from what it holds, and the driver only names what goes where and
writes ``meta.json`` and the manifest once every rank reported; loading into parameters that
live in the workers, every worker reads just the regions its shards need. Either way the
directory must be one that every node sees (a shared filesystem): a worker that cannot see it
is a ``ConfigError`` naming it. Otherwise (eager, or nothing run yet) the driver reads and
writes the files itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from flowsys.errors import ConfigError, StateDictError
from flowsys.ops.registry import dtype_text
from flowsys.optim.state import LOGICAL
from flowsys.shardfiles import CheckpointCorrupt, RankFiles, check_tensor, checksums, fsync, read_box, write_shards

__all__ = ["CheckpointCorrupt", "DirectoryLock", "check_visible", "check_writable", "latest", "latest_verified",
           "load", "lock", "prune", "save", "verify"]

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TMP_DIR = re.compile(r"^\.step_(\d{6,})\.tmp-[0-9a-f]+$")  # a step being written (or deleted)


def save(root: str | os.PathLike, model, optimizer=None, step: int = 0, extra: dict | None = None,
         loss_scaler=None) -> Path:
    """Write a checkpoint of ``model`` (and ``optimizer``'s state, and an fp16 job's
    ``loss_scaler``: its scale and counts) as ``root/step_<step>``: written whole into a hidden
    directory, fsynced, then renamed, so ``root/step_<step>`` exists only complete. A step that
    exists already is a ``ConfigError``, also when another writer renamed it into place while
    this one wrote."""
    backend = _workers_of(model, optimizer)
    if backend is None and optimizer is not None and getattr(optimizer, "_state_in_workers", None) is not None:
        from flowsys.optim.state import pull_state  # noqa: PLC0415

        pull_state(optimizer)  # (workers restarted, or another backend than the parameters': the driver's way)
    root = Path(root)
    final = root / f"step_{step:06d}"
    if (final / "MANIFEST.json").exists():
        raise ConfigError(f"checkpoint {final} exists already; save under another step")
    if final.is_dir() and any(final.iterdir()):
        raise ConfigError(f"{final} exists without a manifest (an interrupted write by an older flowsys, or files "
                          f"put there by hand); delete it to save step {step} there")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step_{step:06d}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _save_into(tmp, backend, model, optimizer, step, extra, loss_scaler)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _save_into(directory: Path, backend, model, optimizer, step: int, extra, loss_scaler) -> None:
    """Write the checkpoint's files into ``directory``, every one fsynced, the manifest last."""
    from flowsys.functions import rng_state  # noqa: PLC0415

    if backend is not None:
        check_visible(backend, directory)
        per_rank, tensors = _plan_save(backend, model, optimizer)
        written = _write_by_workers(backend, directory, per_rank, tensors)
    else:
        per_rank, tensors = {}, {}
        names = {id(p): name for name, p in model.named_parameters()}
        for name, p in _saved(model):
            tensors[f"param/{name}"] = _put(per_rank, f"param/{name}", p._data)
        if optimizer is not None:
            for p in _trained(optimizer):
                if _is_copy(p, names):
                    continue
                for key, entry in _state_entries(p, optimizer.state.get(id(p)) or {}, names[id(p)]):
                    tensors[key] = _put(per_rank, key, entry)
        written = [write_shards(directory, rank, arrays) for rank, arrays in sorted(per_rank.items())]
    meta = {"step": step, "tensors": tensors, "rng": rng_state(), "extra": extra or {},
            "loss_scaler": None if loss_scaler is None else loss_scaler.state_dict(),
            "optimizer": None if optimizer is None else {
                "type": type(optimizer).__name__,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}}
    written.append(_write_json(directory / "meta.json", meta))
    fsync(directory)  # every file is on disk before the manifest says so
    _write_json(directory / "MANIFEST.json", {  # last: the checkpoint is complete
        "step": step, "files": {w["file"]: w["size"] for w in written},
        "sha256": {w["file"]: w["sha256"] for w in written},
        "crc32": {w["file"]: w["crc32"] for w in written if "crc32" in w}})
    fsync(directory)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final`` (atomic; it fails if ``final`` is there and not
    empty), and make the rename durable."""
    try:
        os.rename(tmp, final)
    except OSError as e:
        if (final / "MANIFEST.json").exists() or (final.is_dir() and any(final.iterdir())):
            raise ConfigError(f"checkpoint {final} was written by another writer while this save wrote it (as "
                              f"{tmp.name}); this save is discarded and {final} is the other writer's: one job writes "
                              f"a checkpoint directory (fs.checkpoint.lock)") from e
        raise ConfigError(f"cannot rename {tmp} to {final}: {e}") from e
    fsync(final.parent)


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none)."""
    return next((d for _, d in _steps(root) if _complete(d)), None)


def _steps(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``step_<N>`` directory under ``root``, complete or not, the newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name))]
    return sorted(found, reverse=True)


def verify(path: str | os.PathLike) -> None:
    """Check the checkpoint directory ``path`` whole, on the driver: its manifest, every file's
    size and sha256, every tensor's crc32, and that every shard ``meta.json`` places is in its
    file. Incomplete is a ``ConfigError``, corrupt a ``CheckpointCorrupt``, each naming what
    failed. (A checkpoint written before checksums were recorded is checked for what it has:
    the sizes, and that every file parses.)

        fs.checkpoint.verify("ckpt/step_000012")
    """
    path = Path(path)
    why = _incomplete(path)
    if why:
        raise ConfigError(f"checkpoint {path} is incomplete: {why}")
    manifest = _manifest(path)
    meta = _meta(path, manifest)
    sha256, crc32 = manifest.get("sha256"), manifest.get("crc32")
    held = {}
    for name in sorted(set(manifest["files"]) - {"meta.json"}):
        got_sha, got_crc = held[name] = checksums(path / name)
        if crc32 is not None:
            want = crc32.get(name, {})
            for key in sorted(set(want) | set(got_crc)):
                if key not in got_crc:
                    raise CheckpointCorrupt(f"checkpoint {path}: {name} lacks {key}, which its manifest records")
                check_tensor(path, name, key, got_crc[key], want.get(key))
        if sha256 is not None and got_sha != sha256.get(name):
            raise CheckpointCorrupt(f"checkpoint {path}: {name} has sha256 {got_sha[:16]}..., the manifest recorded "
                                    f"{(sha256.get(name) or 'none')[:16]}...: its tensors check, its header or padding "
                                    f"differs from what was written; load an earlier checkpoint")
    for key, info in sorted(meta["tensors"].items()):
        for s in info["shards"]:
            name = f"rank_{s['rank']}.safetensors"
            if key not in held.get(name, ("", {}))[1]:
                raise CheckpointCorrupt(f"checkpoint {path}: meta.json places {key} in {name}, which "
                                        f"{'lacks it' if name in held else 'its manifest does not name'}")


def latest_verified(root: str | os.PathLike, warn=print) -> Path | None:
    """The newest checkpoint under ``root`` that passes :func:`verify` (None if none does);
    ``warn(message)`` for each newer one skipped, naming what failed. It reads every file of
    the checkpoints it checks.

        found = fs.checkpoint.latest_verified("ckpt", warn=log.warning)
    """
    for _, d in _steps(root):
        try:
            verify(d)
        except (ConfigError, StateDictError, OSError) as e:
            warn(f"skipping checkpoint {d.name}, falling back to an older one: {e}")
            continue
        return d
    return None


class DirectoryLock:
    """The one-writer lock of a checkpoint root (``root/LOCK``), taken by :func:`lock`. Leaving
    the ``with``, or ``release()``, removes the file if it still names this holder (a lock taken
    again by the same job in the same process leaves it to the outer one). ``took_over``: the
    message when a dead holder's lock was taken over, else None."""

    def __init__(self, path: Path, holder: dict, owned: bool, took_over: str | None = None):
        self.path, self.holder, self.owned, self.took_over = path, holder, owned, took_over

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if not self.owned:
            return
        self.owned = False
        if _holder(self.path) == self.holder:  # (not taken over since)
            self.path.unlink(missing_ok=True)
            fsync(self.path.parent)


def lock(root: str | os.PathLike, job_id: str, warn=print) -> DirectoryLock:
    """Make job ``job_id`` the one writer of the checkpoint root ``root``: creates ``root/LOCK``
    (JSON: job_id, host, pid, time) atomically. Held by the same job: fine. Held by a process of
    this host that is running: ``ConfigError`` naming it. By one that is gone: taken over,
    ``warn(message)`` and ``took_over`` saying so. By another host: ``ConfigError`` (whether it
    still runs cannot be told from here): delete the LOCK file if that job is gone.

        with fs.checkpoint.lock("ckpt", job_id="gpt2-run-7"):
            ...  # save, prune
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "LOCK"
    me = {"job_id": str(job_id), "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    for _ in range(5):  # (a holder may release, or another taker replace, between our looks)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
                f.flush()
                os.fsync(f.fileno())
            fsync(root)
            return DirectoryLock(path, me, owned=True)
        held = _holder(path)
        if held is None:
            continue  # released meanwhile
        if not isinstance(held, dict) or not {"job_id", "host", "pid"} <= set(held):
            raise ConfigError(f"{path} is unreadable ({held!r}): a job may be taking it, or died doing so; one job "
                              f"writes a checkpoint directory: delete {path} if no job writes {root}")
        who = f"job {held['job_id']!r} (pid {held['pid']} on host {held['host']}, since {_when(held.get('time'))})"
        if held["job_id"] == me["job_id"]:
            if (held["host"], held["pid"]) == (me["host"], me["pid"]):
                return DirectoryLock(path, held, owned=False)  # taken again by this process: the outer one releases
            if _replace_lock(path, me):  # the same job, restarted
                return DirectoryLock(path, me, owned=True)
            continue
        if held["host"] != me["host"]:
            raise ConfigError(f"checkpoint directory {root} is locked by {who}: one job writes a checkpoint directory, "
                              f"and from host {me['host']} it cannot be told whether that job still runs; if it is "
                              f"gone, delete {path} and start again, else give this job another checkpoint directory")
        if _alive(int(held["pid"])):
            raise ConfigError(f"checkpoint directory {root} is being written by {who}, which is running: one job "
                              f"writes a checkpoint directory; stop that job or give this one another checkpoint "
                              f"directory")
        if _replace_lock(path, me):
            message = f"took over {path} from {who}, which is no longer running"
            warn(message)
            return DirectoryLock(path, me, owned=True, took_over=message)
    raise ConfigError(f"could not take {path}: other processes keep taking and releasing it; one job writes a "
                      f"checkpoint directory")


def _holder(path: Path):
    """What ``path`` (a LOCK file) says (None when there is none; the text when not JSON)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _replace_lock(path: Path, me: dict) -> bool:
    """Put this holder's LOCK in place of the one there (atomically); whether it is ours after
    (another taker may have replaced it in between)."""
    tmp = path.with_name(f".LOCK.tmp-{secrets.token_hex(4)}")
    with open(tmp, "w") as f:
        f.write(json.dumps(me))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)
    return _holder(path) == me


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "an unknown time"


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints under ``root`` (0: keep all),
    never the newest one that passes :func:`verify` (when deleting, it verifies the newest until
    one passes); and the hidden directories of steps older than the newest complete one that
    nothing touched since it was written (writes that died: with one writer per root, see
    :func:`lock`, none is in progress). What it deleted.

        fs.checkpoint.prune("ckpt", keep=3)
    """
    if keep < 0:
        raise ConfigError(f"prune keeps {keep} checkpoints: give a number >= 0 (0 keeps all)")
    root = Path(root)
    complete = [(n, d) for n, d in _steps(root) if _complete(d)]
    if not keep or not complete:
        return []
    doomed = complete[keep:]
    if doomed:
        for n, d in complete:  # the newest that verifies stays
            try:
                verify(d)
            except (ConfigError, StateDictError, OSError):
                continue
            doomed = [(m, e) for m, e in doomed if m != n]
            break
    newest, written = complete[0][0], (complete[0][1] / "MANIFEST.json").stat().st_mtime
    stale = [d for d in root.iterdir() if (m := _TMP_DIR.match(d.name)) and int(m.group(1)) < newest
             and _last_touched(d) < written]
    removed = []
    for _, d in doomed:
        gone = root / f".step_{d.name[5:]}.tmp-{secrets.token_hex(4)}"
        os.rename(d, gone)  # no longer a checkpoint at once; a crash mid-delete leaves a stale hidden one
        shutil.rmtree(gone, ignore_errors=True)
        removed.append(d)
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    if removed:
        fsync(root)
    return removed


def _last_touched(d: Path) -> float:
    """When ``d`` or anything directly in it last changed."""
    times = [d.stat().st_mtime]
    for e in d.iterdir():
        try:
            times.append(e.stat().st_mtime)
        except FileNotFoundError:
            pass
    return max(times)


def check_writable(root: str | os.PathLike) -> None:
    """Create ``root`` if need be and prove this process can write, fsync and delete a file
    there; else a ``ConfigError`` naming the directory and the OS error.

        fs.checkpoint.check_writable("ckpt")
    """
    root = Path(root)
    probe = root / f".flowsys-writable-{secrets.token_hex(4)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"flowsys")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise ConfigError(f"checkpoint directory {root} is not writable: {type(e).__name__}: {e}; give a directory "
                          f"this job can create, sync and delete files in") from e


def load(path: str | os.PathLike, model, optimizer=None, loss_scaler=None) -> dict:
    """Load the checkpoint at ``path`` (a step directory, or a root: its latest complete one)
    into ``model`` and ``optimizer`` (and ``loss_scaler``) as they are laid out now; returns its
    step, RNG state and extra. The RNG is restored too. Parameters whose values live in a backend's workers are
    read by those workers, each the regions of its own shards. Every tensor read is checked
    against the crc32 its manifest recorded (and ``meta.json`` against its sha256) before anything
    changes: a mismatch is a ``CheckpointCorrupt`` naming the directory, file and tensor."""
    from flowsys.functions import set_rng_state  # noqa: PLC0415

    path = Path(path)
    if not _STEP_DIR.match(path.name):
        found = latest(path)
        if found is None:
            raise ConfigError(f"no complete checkpoint under {path}")
        path = found
    why = _incomplete(path)
    if why:
        raise ConfigError(f"checkpoint {path} is incomplete: {why}")
    manifest = _manifest(path)
    meta = _meta(path, manifest)
    tensors = meta["tensors"]
    params = dict(model.named_parameters())
    saved_as = _saved_names(params)  # a tied copy loads what its primary saved
    missing = sorted(n for n in params if f"param/{saved_as[n]}" not in tensors)
    if missing:
        raise StateDictError(f"checkpoint {path} lacks parameter(s) {missing}")
    for name, p in params.items():
        shape = tuple(tensors[f"param/{saved_as[name]}"]["shape"])
        if shape != tuple(p.shape) and not _repadded(p, shape):
            raise StateDictError(f"checkpoint {path}: parameter {name} has shape {shape}, "
                                 f"the model's has {tuple(p.shape)}")
    if optimizer is not None and meta["optimizer"] is None:
        raise StateDictError(f"checkpoint {path} holds no optimizer state")
    if loss_scaler is not None and not meta.get("loss_scaler"):
        raise StateDictError(f"checkpoint {path} holds no loss scale (saved by a job that did not train in fp16); "
                             f"load it without loss_scaler= to start from the scaler's initial scale")
    backend = _workers_of(model, None)
    by_workers = {} if backend is None else {n: p for n, p in params.items() if _lives_in(p, backend)}
    state_layouts = None if backend is None or optimizer is None else \
        _state_layouts(backend, optimizer, params, tensors, by_workers)
    state_by_workers = state_layouts is not None
    names = {id(p): saved_as[name] for name, p in params.items()}
    on_driver = sorted({f"param/{saved_as[n]}" for n in params if n not in by_workers})
    if optimizer is not None and not state_by_workers:
        on_driver += sorted({k for p in _trained(optimizer) if id(p) in names for k in tensors
                             if k.startswith(f"state/{names[id(p)]}/")})
    shape_of = {f"param/{saved_as[n]}": tuple(p.shape) for n, p in params.items()}  # (a padding may differ)
    if optimizer is not None:
        for p in _trained(optimizer):
            if id(p) in names:
                shape_of.update({k: tuple(p.shape) for k in tensors if k.startswith(f"state/{names[id(p)]}/")
                                 and len(tensors[k]["shape"]) == p.ndim})
    with RankFiles(path, manifest.get("crc32")) as files:  # everything read (and checked) before anything changes
        logical = {k: read_box(files, k, tensors[k], [[0, n] for n in shape_of.get(k, tensors[k]["shape"])])
                   for k in on_driver}
    if by_workers or state_by_workers:
        check_visible(backend, path / "MANIFEST.json", (path / "MANIFEST.json").read_text())
        _load_by_workers(backend, path, tensors, params, by_workers, optimizer, state_layouts, manifest.get("crc32"))
    for name, p in params.items():
        if name not in by_workers:
            _assign(p, logical[f"param/{saved_as[name]}"])
    if optimizer is not None and not state_by_workers:
        optimizer.state.clear()
        for p in _trained(optimizer):
            prefix = f"state/{names[id(p)]}/"
            keys = {k[len(prefix):]: v for k, v in logical.items() if k.startswith(prefix)}
            if keys:
                optimizer.state[id(p)] = _restate(p, keys)
        optimizer._state_in_workers = None  # the next compiled step gives it to its workers, laid out as it needs
    if loss_scaler is not None:
        loss_scaler.load_state_dict(meta["loss_scaler"])
    set_rng_state(meta["rng"])
    return {"step": meta["step"], "extra": meta["extra"], "path": str(path)}


def _repadded(p, saved: tuple) -> bool:
    """Whether ``p`` takes a checkpoint of shape ``saved`` by its padding: they differ only in
    the rows of axis 0 beyond ``p.valid_rows``, which are padding (the real rows are read, the
    padding of the model starts at zero)."""
    rows = getattr(p, "valid_rows", None)
    shape = tuple(p.shape)
    return (rows is not None and len(saved) == len(shape) and saved[1:] == shape[1:]
            and saved[0] >= rows and shape[0] >= rows)


def check_visible(backend, path: str | os.PathLike, token: str | None = None, world: int = 0) -> None:
    """Every worker of ``backend`` (``world`` of them, started if need be) sees ``path``: a
    directory (the driver writes a probe file into it with a random token, every worker reads it
    back) or a file whose text is ``token``. A worker that cannot is a ``ConfigError`` naming
    its rank and node: checkpoints are written and read by the workers themselves."""
    import socket  # noqa: PLC0415

    if world:
        backend.ensure(world)
    path = Path(path)
    probe = None
    if token is None:
        path.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        probe = path / f".flowsys-probe-{token[:8]}"
        probe.write_text(token)
    try:
        seen = backend.sees(str(probe or path), token)
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    blind = sorted(r for r, ok in seen.items() if not ok)
    if blind:
        nodes = backend.nodes() if hasattr(backend, "nodes") else {}
        where = ", ".join(f"rank {r} (node {nodes.get(r, socket.gethostname())})" for r in blind)
        raise ConfigError(f"checkpoint directory {probe.parent if probe else path.parent} is not visible to {where} "
                          f"of the {backend.name} backend: every worker writes and reads its own checkpoint files; "
                          f"use a shared filesystem (NFS, a cluster filesystem) mounted at the same path on every "
                          f"node")


# ---------------------------------------------------------------------- the worker path
def _workers_of(model, optimizer):
    """The backend whose workers hold the model's newest values (and the optimizer's state),
    if exactly one does, its workers are the ones that held them and every rank the model is
    laid out on is one of its workers; else None (the driver holds, or pulls, everything)."""
    from flowsys.global_tensor import GlobalValue  # noqa: PLC0415
    from flowsys.tensor import stored  # noqa: PLC0415

    homes = {getattr(p, "_home", None) for _, p in model.named_parameters()} - {None}
    found = {h.backend for h in homes}
    if any(h.generation != h.backend.generation for h in homes):
        return None  # restarted workers: the driver's path says what was lost
    held = getattr(optimizer, "_state_in_workers", None)
    if held is not None:
        if optimizer._state_generation != held.generation:
            return None
        found.add(held)
    if len(found) != 1:
        return None
    backend = found.pop()
    layouts = [stored(p) for _, p in model.named_parameters()]
    ranks = [r for d in layouts if type(d) is GlobalValue for r in d.placement.ranks]
    if not backend.world or max(ranks, default=0) >= backend.world:
        return None
    return backend


def _lives_in(p, backend) -> bool:
    """Whether ``p``'s newest values are shards in ``backend``'s workers, laid out as ``p`` is."""
    from flowsys.global_tensor import GlobalValue  # noqa: PLC0415
    from flowsys.runtime import home  # noqa: PLC0415
    from flowsys.tensor import stored  # noqa: PLC0415

    return getattr(p, "_home", None) is home(backend) and type(stored(p)) is GlobalValue


def _saved(model):
    """The parameters a checkpoint holds, by name: a tied copy (``Parameter.tied_to``, a pipeline's
    tied embedding on the last stage) is its primary's, saved once under the primary's name."""
    params = list(model.named_parameters())
    names = {id(p): name for name, p in params}
    return [(name, p) for name, p in params if not _is_copy(p, names)]


def _is_copy(p, names: dict) -> bool:
    return id(getattr(p, "tied_to", None)) in names


def _saved_names(params: dict) -> dict[str, str]:
    """Parameter name -> the name it is saved under (a tied copy: its primary's)."""
    names = {id(p): name for name, p in params.items()}
    return {name: names.get(id(getattr(p, "tied_to", None)), name) for name, p in params.items()}


def _trained(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _plan_save(backend, model, optimizer) -> tuple[dict, dict]:
    """What each rank writes — per rank, tensor name -> a resident parameter ``("param", key)``,
    optimizer state ``("state", key, field)``, or an array the driver holds — and the tensors'
    metadata, from the layouts alone (nothing is pulled)."""
    from flowsys.global_tensor import GlobalValue  # noqa: PLC0415
    from flowsys.keys import uid  # noqa: PLC0415
    from flowsys.tensor import stored  # noqa: PLC0415

    per_rank: dict[int, dict] = {}
    tensors: dict[str, Any] = {}
    names = {id(p): name for name, p in model.named_parameters()}
    for name, p in _saved(model):
        key = f"param/{name}"
        if getattr(p, "_home", None) is None:
            tensors[key] = _put(per_rank, key, p._data)
        elif type(stored(p)) is GlobalValue:
            tensors[key] = _put(per_rank, key, stored(p), lambda r, k=str(uid(p)): ("param", k))
        else:  # a local parameter kept by workers: the lowest rank holding it writes it
            k = str(uid(p))
            rank = min((r for r, kk in backend.holds if kk == k), default=None)
            if rank is None:
                tensors[key] = _put(per_rank, key, p._data)
            else:
                tensors[key] = _put(per_rank, key, stored(p), lambda r, k=k: ("param", k), rank=rank)
    if optimizer is None:
        return per_rank, tensors
    if getattr(optimizer, "_state_in_workers", None) is not backend:  # the driver holds it
        for p in _trained(optimizer):
            if _is_copy(p, names):
                continue
            for key, entry in _state_entries(p, optimizer.state.get(id(p)) or {}, names[id(p)]):
                tensors[key] = _put(per_rank, key, entry)
        return per_rank, tensors
    keys = {f"{uid(optimizer)}/{uid(p)}": p for p in _trained(optimizer) if id(p) in names and not _is_copy(p, names)}
    held = backend.describe_state(sorted(keys))
    for skey, p in keys.items():
        d, name = stored(p), names[id(p)]
        ranks = list(d.placement.ranks) if type(d) is GlobalValue else sorted(held)
        fields = sorted({f for r in ranks for f in held.get(r, {}).get(skey, {})})
        for field in fields:
            key = f"state/{name}/{field}"
            shapes = {r: held[r][skey][field] for r in ranks if field in held.get(r, {}).get(skey, {})}
            first = min(shapes)
            shape, dtype = shapes[first]
            ref = ("state", skey, field)
            if not shape or type(d) is not GlobalValue:  # a scalar (AdamW's step) or a local parameter's state
                tensors[key] = _put(per_rank, key, np.empty(shape, dtype), lambda r, ref=ref: ref, rank=first)
                continue
            sbp = _state_layout(d, [shapes.get(r, (None,))[0] for r in ranks])
            if sbp is None:
                raise StateDictError(f"optimizer state {field!r} of {name} has shard shapes "
                                     f"{[shapes.get(r, (None,))[0] for r in ranks]} on ranks {ranks} that match "
                                     f"neither the parameter's layout {d.sbp} nor a ZeRO shard of it")
            layout = GlobalValue(d.placement, sbp, d.shape, np.dtype(dtype), None)
            tensors[key] = _put(per_rank, key, layout, lambda r, ref=ref: ref)
    return per_rank, tensors


def _write_by_workers(backend, directory: Path, per_rank: dict, tensors: dict) -> list[dict]:
    """Every rank writes its file at once; what each wrote (``write_shards``: file, size,
    checksums), once every rank reported and it is what the metadata says."""
    from actors.worker import encode  # noqa: PLC0415
    from flowsys.planformat import plan_pb2  # noqa: PLC0415

    entries = {}
    for rank in range(backend.world):
        dump = plan_pb2.StateDump()
        for name, what in sorted(per_rank.get(rank, {}).items()):
            if isinstance(what, tuple):
                dump.entries.append(plan_pb2.StateEntry(key=name, field=" ".join(what)))
            else:
                dump.entries.append(plan_pb2.StateEntry(key=name, field="inline", value=encode(0, what)))
        entries[rank] = dump.SerializeToString()
    reports = backend.save_shards(str(directory), entries)
    written = []
    for rank, report in sorted(reports.items()):
        expected = {name: [b - a for a, b in next(s["box"] for s in tensors[name]["shards"] if s["rank"] == rank)]
                    for name in per_rank.get(rank, {})}
        if report["tensors"] != expected:
            raise StateDictError(f"checkpoint {directory}: rank {rank} wrote {report['tensors']}, the layouts say "
                                 f"{expected}")
        if report["file"] is not None:
            written.append(report)
    return written


def _state_layouts(backend, optimizer, params: dict, tensors: dict, by_workers: dict) -> dict | None:
    """The layout (SBP, dtype) per (state key, field) in which the workers take the
    checkpoint's optimizer state in place, if they can: they keep this optimizer's state
    already, for every parameter the checkpoint has state of (homed there), with the same
    fields, in a layout recognised from their shard shapes (the one their update uses). None
    otherwise: the driver keeps it logical and the next step lays it out."""
    from flowsys.keys import uid  # noqa: PLC0415
    from flowsys.tensor import stored  # noqa: PLC0415

    if getattr(optimizer, "_state_in_workers", None) is not backend \
            or optimizer._state_generation != backend.generation:
        return None
    names = {id(p): name for name, p in params.items()}
    saved_as = _saved_names(params)
    keys = {f"{uid(optimizer)}/{uid(p)}": p for p in _trained(optimizer) if id(p) in names}
    held = backend.describe_state(sorted(keys))
    layouts = {}
    for skey, p in keys.items():
        name = names[id(p)]
        fields = {k.split("/", 2)[2] for k in tensors if k.startswith(f"state/{saved_as[name]}/")}
        if not fields:
            continue
        if name not in by_workers:
            return None
        d = stored(p)
        ranks = list(d.placement.ranks)
        if any(set(held.get(r, {}).get(skey, {})) != fields for r in ranks):
            return None
        for field in fields:
            shapes = [held[r][skey][field][0] for r in ranks]
            if not shapes[0]:
                continue
            sbp = _state_layout(d, shapes)
            if sbp is None:
                return None
            layouts[(skey, field)] = (sbp, held[ranks[0]][skey][field][1])
    return layouts


def _load_by_workers(backend, path: Path, tensors: dict, params: dict, by_workers: dict, optimizer,
                     state_layouts: dict | None, crc32: dict | None) -> None:
    """Every worker reads the regions of the checkpoint its shards of ``by_workers`` (and of
    ``optimizer``'s state, laid out as ``state_layouts`` says, when given) need, checked against
    ``crc32`` (the manifest's); once every worker read and checked its part, all of them take it
    into what they keep (else none does: a ``CheckpointCorrupt``); the driver then records those
    parameters as living there."""
    from flowsys.layout import local_shape, shard_box  # noqa: PLC0415
    from flowsys.keys import uid  # noqa: PLC0415
    from flowsys.runtime import home  # noqa: PLC0415
    from flowsys.tensor import stored  # noqa: PLC0415

    entries: dict[int, list] = {r: [] for r in range(backend.world)}
    drop: list[str] = []
    saved_as = _saved_names(params)
    for name, p in by_workers.items():
        d = stored(p)
        for r in d.placement.ranks:
            box = shard_box(d.shape, d.sbp, d.placement.mesh, d.placement.coords(r))
            entries[r].append({"name": f"param/{saved_as[name]}", "box": [list(b) for b in box], "dtype": dtype_text(d.dtype),
                               "into": ["param", str(uid(p))]})
    if state_layouts is not None:
        names = {id(p): saved_as[name] for name, p in params.items()}
        for p in _trained(optimizer):
            if id(p) not in names:
                continue
            skey, name, d = f"{uid(optimizer)}/{uid(p)}", names[id(p)], stored(p)
            drop.append(skey)
            for k in sorted(k for k in tensors if k.startswith(f"state/{name}/")):
                field = k.split("/", 2)[2]
                sbp, dtype = state_layouts.get((skey, field), (None, tensors[k]["dtype"]))
                for r in d.placement.ranks:
                    box = [] if sbp is None else shard_box(d.shape, sbp, d.placement.mesh, d.placement.coords(r))
                    entries[r].append({"name": k, "box": [list(b) for b in box], "dtype": dtype,
                                       "into": ["state", skey, field]})
    payload = {}
    for r, es in entries.items():
        read = sorted({e["name"] for e in es})
        checks = None if crc32 is None else {}
        for n in read if crc32 is not None else ():
            for s in tensors[n]["shards"]:
                file = f"rank_{s['rank']}.safetensors"
                if n in crc32.get(file, {}):
                    checks.setdefault(file, {})[n] = crc32[file][n]
        payload[r] = json.dumps({"tensors": {n: tensors[n] for n in read}, "entries": es, "drop_state": drop,
                                 "crc32": checks}).encode()
    reports = backend.load_shards(str(path), payload)
    corrupt = sorted((r, got["corrupt"]) for r, got in reports.items() if isinstance(got, dict) and "corrupt" in got)
    backend.load_shards(str(path), {r: json.dumps({"apply": not corrupt}).encode() for r in entries})
    if corrupt:
        rank, why = corrupt[0]
        raise CheckpointCorrupt(f"{why} (read by rank {rank}; nothing was loaded)")
    h = home(backend)
    for name, p in by_workers.items():
        d, key = stored(p), str(uid(p))
        for r in d.placement.ranks:
            backend.holds[(r, key)] = tuple(local_shape(d.shape, d.sbp, d.placement.mesh, d.placement.coords(r)))
            backend.synced.pop((r, key), None)
        h.adopt(p, key)
        p.init = None
    if state_layouts is not None:
        optimizer.state.clear()  # the workers hold it, laid out as its update needs


# ------------------------------------------------------------------------------------- pieces
def _put(per_rank: dict, key: str, data, source=None, rank: int = 0) -> dict:
    """Record ``data``'s shards under ``key`` in the rank files; its metadata. ``source(rank)``
    says what a rank writes instead of its shard of ``data`` (a reference to what its worker
    holds: ``data`` gives only the layout); a local value goes to ``rank``."""
    from flowsys.global_tensor import GlobalValue  # noqa: PLC0415
    from flowsys.layout import fmt, shard_box  # noqa: PLC0415
    from flowsys.sbp import PartialSum  # noqa: PLC0415

    if type(data) is GlobalValue:
        p = data.placement
        boxes = []
        for i, rank in enumerate(p.ranks):
            box = shard_box(data.shape, data.sbp, p.mesh, p.coords(rank))
            per_rank.setdefault(rank, {})[key] = source(rank) if source else np.asarray(data.shards[i])
            boxes.append({"rank": rank, "box": [list(b) for b in box]})
        partial = any(isinstance(s, PartialSum) for s in data.sbp)
        return {"shape": list(data.shape), "dtype": dtype_text(data.dtype), "placement": np.asarray(
            _nested_ranks(p)).tolist(), "sbp": fmt(data.sbp), "partial": partial, "shards": boxes}
    a = np.asarray(data)
    per_rank.setdefault(rank, {})[key] = source(rank) if source else a
    return {"shape": list(a.shape), "dtype": dtype_text(a.dtype), "placement": None, "sbp": None, "partial": False,
            "shards": [{"rank": rank, "box": [[0, n] for n in a.shape]}]}


def _nested_ranks(p) -> list:
    return np.asarray(p.ranks).reshape(p.mesh).tolist()


def _state_entries(p, state: dict, name: str):
    """(key, data) for each array of ``p``'s optimizer state, laid out as ``p`` is; scalars
    (AdamW's step count) as 0-d arrays."""
    from flowsys.global_tensor import GlobalValue  # noqa: PLC0415
    from flowsys.tensor import stored  # noqa: PLC0415

    d = stored(p)  # its layout: the values may live in the workers
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
    from flowsys.tensor import stored  # noqa: PLC0415

    d = stored(p)
    if type(d) is not GlobalValue:
        return {k: (v.item() if v.ndim == 0 else v.astype(d.dtype)) for k, v in keys.items()}
    return {LOGICAL: {k: (v.item() if v.ndim == 0 else v.astype(d.dtype)) for k, v in keys.items()}}


def _write_json(path: Path, value) -> dict:
    """Write ``value`` as JSON to a temporary name, fsync it and rename it into place; its file
    name, size and sha256 (what a manifest records)."""
    data = json.dumps(value, indent=1, sort_keys=True).encode()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _manifest(d: Path) -> dict:
    return json.loads((d / "MANIFEST.json").read_text())


def _meta(d: Path, manifest: dict) -> dict:
    """The checkpoint's ``meta.json``, checked against the sha256 its manifest recorded."""
    data = (d / "meta.json").read_bytes()
    want = manifest.get("sha256", {}).get("meta.json")
    got = hashlib.sha256(data).hexdigest()
    if want is not None and got != want:
        raise CheckpointCorrupt(f"checkpoint {d}: meta.json has sha256 {got[:16]}..., the manifest recorded "
                                f"{want[:16]}... when it was written: the file is corrupt; load an earlier checkpoint "
                                f"(fs.checkpoint.latest_verified)")
    try:
        return json.loads(data)
    except ValueError as e:
        raise CheckpointCorrupt(f"checkpoint {d}: meta.json is not JSON ({e}): the file is corrupt") from e


def _incomplete(d: Path) -> str | None:
    """Why ``d`` is not a complete checkpoint (None if it is): no manifest, or a file it names
    missing or of another size."""
    if not (d / "MANIFEST.json").exists():
        return "it has no MANIFEST.json (its write was interrupted)"
    try:
        files = _manifest(d)["files"]
        sizes = {name: (d / name).stat().st_size if (d / name).exists() else None for name, size in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"its MANIFEST.json is unreadable ({type(e).__name__}: {e})"
    for name, size in sorted(files.items()):
        if sizes[name] is None:
            return f"{name}, which its manifest names, is missing"
        if sizes[name] != size:
            return f"{name} has {sizes[name]} bytes, its manifest says {size} (truncated or rewritten)"
    return None


def _complete(d: Path) -> bool:
    return _incomplete(d) is None

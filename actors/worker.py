"""The per-device worker: hosts one rank's plans and runs a step of them on request.

A worker holds, between steps, the plans the driver loaded into it, its shards of the
parameters and the optimizer state of those it updates. Each step the driver sends a
``StepRequest`` (protobuf bytes: this step's hyper-parameters and dropout seeds, where to read
the rank's block of the batch, and only what the worker cannot make itself: on a plan's first
step its keys and constants, the initialisers of parameters it creates, values the user changed)
and gets back a ``StepResponse`` (the rank's outputs, a digest of the samples it read, its actor
timeline, or what went wrong). The driver pulls parameters (``get_params``) and optimizer state
(``get_state``) only when asked for them; checkpoints are written and read here
(``save_shards``, ``load_shards``). The same class runs in a thread of the driver (the local
backend, in-process transport) and as a Ray actor in its own process (the Ray backend, gRPC
transport): the code path is one.

While a step runs, a status thread posts the op the rank is running to the driver whenever it
changes (checked every 50 ms), so that if the process dies the driver can say what it was doing.
"""

from __future__ import annotations

import json
import os
import threading
import traceback

import numpy as np

from actors.runtime import RankRuntime, Stalled, pack_timeline
from comm import Communicator
from flowsys.datasource import Windows
from flowsys.device import contiguous, module_of, to_numpy
from flowsys.errors import StateDictError
from flowsys.ops import OPS
from flowsys.ops.registry import dtype_text
from flowsys.ops.optim import update_in_place
from flowsys.planformat import decode_attrs, plan_pb2
from flowsys.rng import InitSpec, materialize
from flowsys.shardfiles import CheckpointCorrupt, RankFiles, read_box, write_shards

STATUS_TAG = 1  # worker -> driver: the op the rank is running (utf-8 text)


class WireError(ValueError):
    """A tensor message that does not describe its bytes."""


def encode(vid: int, array) -> plan_pb2.Tensor:
    a = contiguous(array)
    return plan_pb2.Tensor(id=vid, dtype=dtype_text(a.dtype), shape=list(a.shape), data=a.tobytes())


def _layout(v) -> list:
    """[shape, dtype] of an optimizer-state field: a host or device array, or a Python number."""
    a = v if hasattr(v, "shape") and hasattr(v, "dtype") else np.asarray(v)
    return [list(a.shape), dtype_text(a.dtype)]


def _initial(i: plan_pb2.Init) -> np.ndarray:
    """The block [start, stop) of a parameter's initial value, from its initialiser's spec."""
    spec = InitSpec.from_dict(json.loads(i.spec))
    return materialize(spec, tuple(i.shape), np.dtype(i.dtype), tuple(zip(i.start, i.stop)))


def decode(t: plan_pb2.Tensor) -> np.ndarray:
    """The array a ``Tensor`` message carries (a writable copy); never unpickles."""
    try:
        dtype = np.dtype(t.dtype)
    except (TypeError, ValueError, SyntaxError) as e:
        raise WireError(f"tensor {t.id}: unknown dtype {t.dtype!r}") from e
    if dtype.hasobject:
        raise WireError(f"tensor {t.id}: dtype {t.dtype!r} holds Python objects")
    shape = tuple(t.shape)
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(t.data):
        raise WireError(f"tensor {t.id}: {len(t.data)} bytes do not make a {t.dtype} array of shape {shape}")
    return np.frombuffer(t.data, dtype=dtype).reshape(shape).copy()


# Fault injection for tests: FLOWSYS_FAULT="phase:rank[:step]" makes that rank's worker die when
# it enters ``phase`` (one of FAULT_PHASES) at data step ``step`` (any step when left out), as a
# killed process would: it exits at once when it runs in a process of its own (Ray), and raises
# InjectedFault in a thread of the driver (the local backend). With FLOWSYS_FAULT_MARK naming a
# file, the fault fires only while that file does not exist and creates it: once per job, so the
# restarted worker runs on.
FAULT_ENV, FAULT_MARK_ENV = "FLOWSYS_FAULT", "FLOWSYS_FAULT_MARK"
FAULT_PHASES = ("forward", "backward", "optimizer", "checkpoint_pull", "checkpoint_write", "load",
                "driver")  # "driver": the driving process itself exits as step ``step`` starts (flowsys.train)


def fault_due() -> bool:
    """Whether a matching fault fires now: always, or with FLOWSYS_FAULT_MARK only the first
    time in the job (the mark file is created then)."""
    mark = os.environ.get(FAULT_MARK_ENV)
    if mark:
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
    return True


class InjectedFault(RuntimeError):
    """The fault FLOWSYS_FAULT asked for, in a worker that shares the driver's process."""


def parse_fault(text: str) -> tuple[str, int, int | None] | None:
    """``(phase, rank, step or None)`` from FLOWSYS_FAULT's value (None when empty)."""
    if not text:
        return None
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in FAULT_PHASES or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"{FAULT_ENV}={text!r}: expected phase:rank[:step] with phase one of {FAULT_PHASES}")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None


class Worker:
    """One rank's worker. ``comm`` is its transport endpoint; the driver is rank ``world_size - 1``
    of that transport (the device ranks come first). ``ordered`` (optional) is its end of a
    transport that matches calls by order among the device ranks (NCCL; in tests, the strict
    communicator): the plans that fix an NCCL order (``RankPlan.comm_order``) run on it, the
    others and the control messages on ``comm``."""

    def __init__(self, rank: int, comm: Communicator, timeout: float = 30.0, report: bool = True,
                 ordered: Communicator | None = None):
        self.rank, self.comm, self.timeout = rank, comm, timeout
        self.ordered = ordered
        self.driver = comm.world_size - 1
        self.plans: dict[str, plan_pb2.RankPlan] = {}
        self.runtimes: dict[str, RankRuntime] = {}
        self.state: dict[str, dict] = {}  # optimizer state by the driver's key for (optimizer, parameter)
        self.resident: dict[str, np.ndarray] = {}  # parameters kept between steps, by the driver's key
        self.static: dict[str, dict] = {}  # per plan: the driver's keys of its parameters and state
        self.constants: dict[str, dict[int, np.ndarray]] = {}  # per plan: its constants
        self._specs: dict[str, object] = {}  # data sources by their JSON
        self._running: RankRuntime | None = None
        self.own_process = False  # a Ray actor: an injected fault exits the process
        self.data_step: int | None = None  # the data step of the last batch this worker read
        self.fault = parse_fault(os.environ.get(FAULT_ENV, ""))
        self._status = threading.Thread(target=self._report, name=f"flowsys-status-{rank}", daemon=True)
        self._stop = threading.Event()
        if report:  # (a worker thread of the driver is asked directly: nothing to post)
            self._status.start()

    def fault_point(self, phase: str) -> None:
        """Die here if FLOWSYS_FAULT names this phase, this rank and (when given) this step."""
        if self.fault is None:
            return
        want, rank, step = self.fault
        if want != phase or rank != self.rank or (step is not None and step != self.data_step):
            return
        if not fault_due():
            return
        if self.own_process:
            os._exit(70)
        raise InjectedFault(f"rank {self.rank}: fault injected in {phase} at step {self.data_step} ({FAULT_ENV})")

    # ----------------------------------------------------------------------------- control
    def info(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid()}

    def current(self) -> str:
        """What the rank is running now ("idle" between steps)."""
        rt = self._running
        return rt.current if rt is not None else "idle"

    def load(self, key: str, plan: bytes) -> None:
        rp = plan_pb2.RankPlan.FromString(plan)
        if rp.rank != self.rank:
            raise ValueError(f"worker of rank {self.rank} was sent the plan of rank {rp.rank}")
        self.plans[key] = rp
        old = self.runtimes.pop(key, None)
        if old is not None:
            old.close()

    def get_state(self, keys: list[str]) -> bytes:
        """The optimizer state kept for ``keys`` (a ``StateDump``; keys it holds nothing for are
        left out)."""
        self.fault_point("checkpoint_pull")
        dump = plan_pb2.StateDump()
        for key in keys:
            for field, value in sorted(self.state.get(key, {}).items()):
                dump.entries.append(plan_pb2.StateEntry(key=key, field=field, value=encode(0, to_numpy(value))))
        return dump.SerializeToString()

    def set_state(self, dump: bytes, keys: list[str]) -> None:
        """Replace the optimizer state of ``keys`` with what ``dump`` holds (nothing: fresh)."""
        self.fault_point("load")
        for key in keys:
            self.state.pop(key, None)
        for e in plan_pb2.StateDump.FromString(dump).entries:
            value = decode(e.value)
            self.state.setdefault(e.key, {})[e.field] = value.item() if value.ndim == 0 else value

    def get_params(self, keys: list[str]) -> bytes:
        """The parameter shards kept here for ``keys`` (a ``StateDump``, field ``value``; keys it
        holds nothing for are left out): what the driver pulls when it is asked for values."""
        self.fault_point("checkpoint_pull")
        dump = plan_pb2.StateDump()
        for key in keys:
            if key in self.resident:
                dump.entries.append(plan_pb2.StateEntry(key=key, field="value", value=encode(0, self.resident[key])))
        return dump.SerializeToString()

    def drop_params(self, keys: list[str]) -> None:
        """Forget the parameters ``keys`` (the driver holds newer values, or the model is gone)."""
        for key in keys:
            self.resident.pop(key, None)

    def describe_state(self, keys: list[str]) -> bytes:
        """The shape and dtype of every field of the optimizer state kept for ``keys`` (JSON:
        key -> field -> [shape, dtype]): a checkpoint's layout without its values."""
        self.fault_point("checkpoint_pull")
        return json.dumps({key: {f: _layout(v) for f, v in self.state[key].items()}
                           for key in keys if key in self.state}).encode()

    def sees(self, path: str, token: str) -> bool:
        """Whether this worker reads ``token`` from ``path`` (a checkpoint directory's probe)."""
        try:
            with open(path, encoding="utf-8") as f:
                return f.read() == token
        except OSError:
            return False

    def check_data(self, spec: str) -> str:
        """Whether this worker reads the data source ``spec`` (a ``Windows`` as JSON) as the
        driver does: "" if so, else what is wrong (a missing or different file)."""
        try:
            Windows.from_json(spec).check()
        except Exception as e:  # noqa: BLE001 - reported to the driver, which names the node
            return f"{type(e).__name__}: {e}"
        return ""

    def save_shards(self, entries: bytes, directory: str) -> bytes:
        """Write this rank's ``rank_<r>.safetensors`` of a checkpoint into ``directory`` from
        what it holds. ``entries`` (a ``StateDump``) names each tensor of the file (``key``) and
        where it comes from (``field``): ``"param <key>"`` a resident parameter, ``"state <key>
        <field>"`` optimizer state, ``"inline"`` the value sent along. Returns what it wrote
        (JSON: file, size, tensor names and shapes, the file's sha256 and each tensor's crc32;
        file null when it had nothing to write). The file is fsynced before it is reported."""
        self.fault_point("checkpoint_write")
        arrays = {}
        for e in plan_pb2.StateDump.FromString(entries).entries:
            kind, *where = e.field.split(" ")
            if kind == "inline":
                arrays[e.key] = decode(e.value)
            elif kind == "param" and where[0] in self.resident:
                arrays[e.key] = self.resident[where[0]]
            elif kind == "state" and where[1] in self.state.get(where[0], {}):
                arrays[e.key] = to_numpy(self.state[where[0]][where[1]])
            else:
                raise StateDictError(f"checkpoint: rank {self.rank} holds no {e.field!r} to write as {e.key}")
        if not arrays:
            return json.dumps({"file": None, "size": 0, "tensors": {}}).encode()
        return json.dumps(write_shards(directory, self.rank, arrays)).encode()

    def load_shards(self, entries: bytes, directory: str) -> bytes:
        """Read this rank's shards of parameters and optimizer state from the checkpoint in
        ``directory``, in two calls, so that no rank takes anything unless every rank read and
        checked its part. First ``entries`` (JSON): ``tensors`` (the checkpoint's metadata of
        those it reads), ``entries`` (per shard: tensor name, box, dtype, and where it goes:
        ``["param", key]`` or ``["state", key, field]``), ``drop_state`` (the optimizer state
        keys replaced), ``crc32`` (the manifest's checksums of what it reads, per file and
        tensor): it reads and checks them and keeps them aside; returns ``{"read": [[name,
        shape], ...]}``, or ``{"corrupt": message}`` when a checksum differs. Then ``{"apply":
        true}`` replaces what it keeps with what it read (``false`` drops it)."""
        self.fault_point("load")

        plan = json.loads(entries)
        if "apply" in plan:
            staged, self._loaded = getattr(self, "_loaded", None), None
            if plan["apply"] and staged is not None:
                drop, values = staged
                for key in drop:
                    self.state.pop(key, None)
                for into, value in values:
                    if into[0] == "param":
                        self.resident[into[1]] = value
                    else:
                        self.state.setdefault(into[1], {})[into[2]] = value.item() if value.ndim == 0 else value
            return b"[]"
        self._loaded = None
        try:
            with RankFiles(directory, plan.get("crc32")) as files:
                values = [(e["into"], read_box(files, e["name"], plan["tensors"][e["name"]], e["box"])
                           .astype(e["dtype"])) for e in plan["entries"]]
        except CheckpointCorrupt as e:
            return json.dumps({"corrupt": str(e)}).encode()
        self._loaded = (plan["drop_state"], values)
        return json.dumps({"read": [[e["name"], list(v.shape)] for e, (_, v) in zip(plan["entries"], values)]}).encode()

    def _read(self, r: plan_pb2.Read) -> np.ndarray:
        """This rank's block of a batch field, read here (each data source opened once)."""
        spec = self._specs.get(r.spec)
        if spec is None:
            spec = self._specs[r.spec] = Windows.from_json(r.spec)
        return spec.read(r.field, r.step, tuple(zip(r.start, r.stop)))

    def abort(self, reason: str) -> None:
        """Stop the step in flight: its next wait raises (the driver saw another rank fail)."""
        from comm import CommError  # noqa: PLC0415

        self.comm.mailbox.fail(CommError(reason))
        if self.ordered is not None:
            self.ordered.mailbox.fail(CommError(reason))
            self.ordered.abort(reason)  # a call blocked in it returns with the reason

    def close(self) -> None:
        self._stop.set()
        for rt in self.runtimes.values():
            rt.close()
        if self.ordered is not None:
            self.ordered.close()
        self.comm.close()

    # -------------------------------------------------------------------------------- step
    def step(self, request: bytes) -> bytes:
        """Run one step; never raises: failures come back in the response."""
        resp = plan_pb2.StepResponse()
        rt = None
        try:
            req = plan_pb2.StepRequest.FromString(request)
            if req.plan not in self.plans:
                raise KeyError(f"rank {self.rank}: no plan {req.plan!r} loaded")
            rp = self.plans[req.plan]
            rt = self.runtimes.get(req.plan)
            if rt is None:
                comm = self.ordered if rp.comm_order and self.ordered is not None else self.comm
                rt = self.runtimes[req.plan] = RankRuntime(rp, comm, timeout=self.timeout)
            rt.record = req.record
            rt.timeline = []
            rt.on_phase = self.fault_point if self.fault is not None else None
            fed = {t.id: decode(t) for t in req.feed}
            if req.static:  # the first step of this plan here: its keys and constants
                self.static[req.plan] = json.loads(req.static)
                self.constants[req.plan] = {t.id: decode(t) for t in req.constants}
            hyper = {"groups": [], "state_keys": {}, "variable_keys": {}, **self.static.get(req.plan, {}),
                     **(json.loads(req.hyper) if req.hyper else {})}
            fed.update(self.constants.get(req.plan, {}))
            for r in req.reads:  # this rank's block of a batch, read here
                self.data_step = r.step
                fed[r.id] = self._read(r)
                resp.digests.append(plan_pb2.Digest(id=r.id, row_start=r.start[0], row_stop=r.stop[0],
                                                    first_sum=int(fed[r.id][:, :1].sum()) if fed[r.id].ndim > 1 else 0))
            made = rt.place({i.id: _initial(i) for i in req.inits})  # parameter shards created here
            fed = rt.place(fed)  # on the plan's devices (the parameters kept here stay there)
            for name, vid in rp.variables.items():  # parameters: kept here between steps
                key = hyper["variable_keys"].get(name, name)
                if vid in fed:
                    self.resident[key] = fed[vid]
                elif vid in made:
                    self.resident[key] = fed[vid] = made[vid]
                elif key in self.resident:  # (a checkpoint's shards are read into host memory)
                    fed[vid] = self.resident[key] = rt.place({vid: self.resident[key]})[vid]
                else:
                    raise KeyError(f"rank {self.rank} holds no value of parameter {name!r} and none was sent")
            micro, per = max(1, req.micro_batches), req.seeds_per_piece
            seeds = [list(req.seeds[i * per:(i + 1) * per]) for i in range(micro)]

            def update(op, var, grad) -> None:  # the plan's update op, in place on what this worker owns
                a = decode_attrs(op.attrs)
                state = self.state.setdefault(hyper["state_keys"][a["variable"]], {})
                update_in_place(OPS[op.op], module_of(var), var, grad, state,
                                hyper["groups"][a["optimizer"]][a["group"]])

            self._running = rt
            outs = rt.run(fed, micro, dict(req.grads), update, seeds, list(req.outputs))
            for i, o in enumerate(outs):
                if o is not None:
                    resp.outputs.append(encode(i, o))
            resp.peak_in_flight = rt.peak_in_flight
            if req.record:
                resp.timeline = pack_timeline(rt.timeline)
        except BaseException as err:  # reported to the driver, by type, message and what was running
            resp.error_type = type(err).__name__
            resp.error = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
            if not isinstance(err, Exception):
                resp.error = f"{resp.error}\n{traceback.format_exc()}"
            if isinstance(err, Stalled):
                resp.stalled = json.dumps({"waits": err.waits, "timeout": err.timeout})
            resp.current = rt.current if rt is not None else ""
        finally:
            self._running = None
        return resp.SerializeToString()

    def _report(self) -> None:
        last = None
        while not self._stop.wait(0.05):
            now = self.current()
            if now != last:
                try:
                    self.comm.post(np.frombuffer(now.encode(), dtype=np.uint8), self.driver, STATUS_TAG)
                except Exception:  # noqa: BLE001 - the driver may be gone; the worker goes on
                    pass
                last = now


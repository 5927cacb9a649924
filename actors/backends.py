"""Backends with one interface: where the workers of a step live and how they talk.

- :class:`LocalBackend`: every rank's :class:`~actors.worker.Worker` is a thread of this process;
  they talk over the in-process transport.
- :class:`RayBackend`: every rank's worker is a Ray actor in its own process, placed one per
  device and spread over the cluster's nodes with a placement group; they talk over gRPC
  (:class:`comm.GrpcCommunicator`). Ray places and supervises the workers and carries one call
  per rank per step; the data plane is the transport, never a Ray call per op.

``run(key, plan, requests)`` loads the plan into the workers that lack it, sends every rank its
``StepRequest`` and returns their ``StepResponse`` messages, or raises :class:`RankFailed`
naming the rank that caused a failure and the op it was running: a worker whose step raised,
a worker process that died, or a collective some ranks never joined. The other ranks are told to
stop at once, so a failure costs seconds, not a hang.
"""

from __future__ import annotations

import abc
import functools
import json
import os
import queue
import secrets
import threading
import time
from collections import Counter
from typing import Any

from actors.worker import STATUS_TAG, Worker
from comm import CommError, InProcessHub
from comm.strict import StrictHub
from flowsys.device import share_cores
from flowsys.errors import RankFailed
from flowsys.planformat import plan_pb2


class Backend(abc.ABC):
    """What the driver needs of a backend (see the module docstring)."""

    name = "?"

    def __init__(self, timeout: float = 30.0):
        self.timeout = float(timeout)
        self._loaded: set[tuple[int, str]] = set()
        self.world = 0
        # (rank, parameter key) -> the value the worker holds, as the driver last pulled or sent it
        self.synced: dict[tuple[int, str], Any] = {}
        # (rank, parameter key) -> the local shape of the parameter the worker holds between steps
        self.holds: dict[tuple[int, str], tuple] = {}
        self.home = None  # the driver's record of which parameters' newest values are here (flowsys.runtime.Home)
        self.traffic: dict[int, tuple[int, int]] = {}  # per rank: request and response bytes of the last step
        self.generation = 0  # grows whenever the workers (and what they kept) are gone
        self._last_status: dict[int, str] = {}

    def ensure(self, world: int) -> None:
        """Workers for ranks ``0 .. world - 1`` (more are kept; fewer are replaced: the values
        the old ones held come back to the driver first)."""
        if world > self.world and self.world and self.home is not None and self.home.params:
            self.home.pull()
        self._ensure(world)

    def loaded(self, rank: int, key: str) -> bool:
        """Whether the worker of ``rank`` has plan ``key`` (and what was sent with its first step)."""
        return (rank, key) in self._loaded

    def run(self, key: str, plan, requests: dict[int, bytes]) -> dict[int, plan_pb2.StepResponse]:
        ranks = [rp.rank for rp in plan.ranks]
        self._ensure(max(ranks) + 1)
        for rp in plan.ranks:
            if (rp.rank, key) not in self._loaded:
                self._load(rp.rank, key, rp.SerializeToString())
                self._loaded.add((rp.rank, key))
        return self._dispatch(requests)

    def shutdown(self) -> None:
        if self.world:
            self.generation += 1
        self._loaded.clear()
        self.synced.clear()
        self.holds.clear()
        self.world = 0

    def get_params(self, keys: list[str]) -> dict[int, plan_pb2.StateDump]:
        """Every worker's parameter shards for ``keys``, by rank (what the driver pulls)."""
        return {r: plan_pb2.StateDump.FromString(b) for r, b in self._call_all("get_params", keys).items()}

    def get_state(self, keys: list[str]) -> dict[int, plan_pb2.StateDump]:
        """Every worker's optimizer state for ``keys``, by rank."""
        return {r: plan_pb2.StateDump.FromString(b) for r, b in self._call_all("get_state", keys).items()}

    def set_state(self, dumps: dict[int, bytes], keys: list[str]) -> None:
        """Replace the optimizer state of ``keys`` in every worker (``dumps[rank]``, or none)."""
        empty = plan_pb2.StateDump().SerializeToString()
        self._call_all("set_state", keys, per_rank={r: dumps.get(r, empty) for r in range(self.world)})

    def describe_state(self, keys: list[str]) -> dict[int, dict]:
        """Every worker's optimizer state for ``keys`` as shapes and dtypes only, by rank."""
        return {r: json.loads(b) for r, b in self._call_all("describe_state", keys).items()}

    def sees(self, path: str, token: str) -> dict[int, bool]:
        """Whether every worker reads ``token`` from the file ``path``, by rank."""
        return self._call_all("sees", path, token)

    def check_data(self, spec: str) -> dict[int, str]:
        """Whether every worker can read the data source ``spec`` (a ``Windows`` as JSON), by
        rank: "" where it can, else the error it met."""
        return self._call_all("check_data", spec)

    def save_shards(self, directory: str, entries: dict[int, bytes]) -> dict[int, dict]:
        """Every worker writes its checkpoint file into ``directory`` from what it holds
        (``entries[rank]``: see ``Worker.save_shards``); what each wrote, by rank."""
        return {r: json.loads(b) for r, b in self._call_all("save_shards", directory, per_rank=entries).items()}

    def load_shards(self, directory: str, entries: dict[int, bytes]) -> dict[int, list]:
        """Every worker reads its shards from the checkpoint in ``directory`` (``entries[rank]``:
        see ``Worker.load_shards``); what each read, by rank."""
        return {r: json.loads(b) for r, b in self._call_all("load_shards", directory, per_rank=entries).items()}

    def wants_order(self, plan) -> bool:
        """Whether ``plan`` runs on a transport that matches calls by order (NCCL), which a backend
        readies here (the local and Ray backends build their NCCL communicators on the first such
        plan): the driver then fixes its order (``scheduler.nccl_order.attach``) and checks it
        before :meth:`run`. A plan that carries an order runs on the worker's ordered transport,
        one without on messages."""
        return any(v.device == "cuda" for rp in plan.ranks for v in rp.values)

    # what a backend provides
    @abc.abstractmethod
    def _call_all(self, method: str, *args, per_rank: dict | None = None) -> dict:
        """Call ``method`` on every worker (``per_rank[rank]`` first when given); results by rank."""

    @abc.abstractmethod
    def _ensure(self, world: int) -> None:
        """Workers for ranks ``0 .. world - 1``."""

    @abc.abstractmethod
    def _load(self, rank: int, key: str, plan: bytes) -> None:
        """Load a rank's plan (serialised ``RankPlan``) into its worker under ``key``."""

    @abc.abstractmethod
    def _dispatch(self, requests: dict[int, bytes]) -> dict[int, plan_pb2.StepResponse]:
        """Run one step on the workers; their responses, or a ``RankFailed``."""

    # shared
    def _statuses(self, driver_mailbox) -> dict[int, str]:
        for rank in range(self.world):
            while True:
                try:
                    msg = driver_mailbox.try_take(rank, STATUS_TAG)
                except CommError:  # a worker's stream broke (it died): what arrived before still counts
                    msg = None
                if msg is None:
                    break
                self._last_status[rank] = bytes(msg).decode(errors="replace")
        return self._last_status


def failure(responses: dict[int, plan_pb2.StepResponse], dead: dict[int, str] | None = None,
            doing: dict[int, str] | None = None) -> RankFailed | None:
    """The driver's one error for a failed step, or None when every rank succeeded.

    The root cause is a rank that died or failed by itself, not one that stopped because it
    was told to or timed out waiting; a collective some ranks never joined names them."""
    dead, doing = dead or {}, doing or {}
    for rank, why in sorted(dead.items()):
        return RankFailed(rank, why, doing.get(rank, ""))
    failed = {r: resp for r, resp in responses.items() if resp.error_type}
    if not failed:
        return None
    comm_errors = {"CommError", "Stalled"}
    causes = sorted(r for r, resp in failed.items() if resp.error_type not in comm_errors)
    if causes:
        r = causes[0]
        return RankFailed(r, f"{failed[r].error_type}: {failed[r].error}", failed[r].current)
    stalled = {r: json.loads(resp.stalled) for r, resp in failed.items() if resp.stalled}
    for r, info in sorted(stalled.items()):
        for w in info["waits"]:
            if not w["group"]:
                continue
            joined = {q for q, other in stalled.items() if any(x["channel"] == w["channel"] for x in other["waits"])}
            missing = [q for q in w["group"] if q not in joined]
            if missing:
                return RankFailed(missing[0], f"ranks {missing} never joined the {w['name']} over ranks {w['group']} "
                                  f"(op {w['op']}, piece {w['piece']}) that ranks {sorted(joined)} waited in for "
                                  f"{info['timeout']:g} s", doing.get(missing[0], ""))
    r = min(failed)
    return RankFailed(r, f"{failed[r].error_type}: {failed[r].error}", failed[r].current)


# ------------------------------------------------------------------------------------ local
class LocalBackend(Backend):
    """Every rank's worker is a thread of this process; the in-process transport joins them.

    ``ordered`` picks the transport of the plans that fix an NCCL order (those with ``cuda``
    values): ``"nccl"`` (the default) builds one NCCL communicator per rank on its own GPU when
    the first such plan runs; ``"strict"`` runs *every* plan through :class:`comm.strict.StrictHub`
    on CPU arrays, NCCL's contract checked call by call: how the NCCL code path is tested here.
    """

    name = "local"

    def __init__(self, timeout: float = 30.0, ordered: str = "nccl"):
        super().__init__(timeout)
        if ordered not in ("nccl", "strict"):
            raise ValueError(f"LocalBackend: ordered must be 'nccl' or 'strict', got {ordered!r}")
        self.ordered = ordered
        self.workers: dict[int, Worker] = {}
        self.hub: InProcessHub | None = None
        self._threads: dict[int, queue.SimpleQueue] = {}  # rank -> its thread's queue of steps

    def _run_on(self, rank: int, fn) -> None:
        """Run ``fn`` on rank ``rank``'s own thread, which runs every step of that rank: a thread
        started afresh for each step pays for its cold thread-local state (glibc's tcache, the
        BLAS's and the kernels' per-thread buffers) every step, 2-3 % of the benchmark GPT's step.
        Daemon threads: one stuck in a failed step is left behind (shutdown starts new ones)."""
        q = self._threads.get(rank)
        if q is None:
            q = self._threads[rank] = queue.SimpleQueue()

            def serve(q=q):
                while True:
                    job = q.get()
                    if job is None:
                        return
                    job()

            threading.Thread(target=serve, name=f"flowsys-rank-{rank}", daemon=True).start()
        q.put(fn)

    def _ensure(self, world: int) -> None:
        if self.hub is not None and world <= self.world:
            return
        self.shutdown()
        self.world = world
        self.hub = InProcessHub(world + 1, timeout=self.timeout)  # rank `world` is the driver
        strict = StrictHub(world, timeout=self.timeout) if self.ordered == "strict" else None
        self.workers = {r: Worker(r, self.hub.communicator(r), self.timeout, report=False,
                                  ordered=strict.communicator(r) if strict else None) for r in range(world)}
        share_cores(world)  # the ranks are threads of this process: split the cores between them

    def wants_order(self, plan) -> bool:
        wants = self.ordered == "strict" or super().wants_order(plan)
        if wants and self.ordered == "nccl" and any(w.ordered is None for w in self.workers.values()):
            self._connect_nccl()
        return wants

    def _connect_nccl(self) -> None:
        """One NCCL communicator per rank (rank r on GPU r modulo the visible ones), built together:
        ``ncclCommInitRank`` returns once every rank has joined."""
        from comm.nccl import NcclCommunicator, nccl_unique_id  # noqa: PLC0415

        uid, comms, errors = nccl_unique_id(), {}, []

        def join(r: int) -> None:
            try:
                comms[r] = NcclCommunicator(r, self.world, uid, timeout=self.timeout)
            except Exception as e:  # noqa: BLE001 - reported below, by rank
                errors.append((r, e))

        threads = [threading.Thread(target=join, args=(r,), daemon=True) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout)
        if errors or len(comms) < self.world:
            r, e = errors[0] if errors else (min(set(range(self.world)) - set(comms)), "timed out")
            raise RankFailed(r, f"could not build the NCCL communicators for the cuda plan: {e}", "nccl init")
        for r, w in self.workers.items():
            w.ordered = comms[r]

    def _load(self, rank: int, key: str, plan: bytes) -> None:
        self.workers[rank].load(key, plan)

    def _call_all(self, method: str, *args, per_rank: dict | None = None) -> dict:
        from actors.worker import InjectedFault  # noqa: PLC0415

        out = {}
        for r, w in self.workers.items():
            call = getattr(w, method)
            try:
                out[r] = call(per_rank[r], *args) if per_rank is not None else call(*args)
            except InjectedFault as e:  # a worker "lost" here: as a dead process would be reported
                self._broken()
                raise RankFailed(r, e, method.replace("_", " ")) from e
        return out

    def _dispatch(self, requests: dict[int, bytes]) -> dict[int, plan_pb2.StepResponse]:
        responses: dict[int, plan_pb2.StepResponse] = {}
        done = threading.Condition()

        def main(rank: int) -> None:
            resp = plan_pb2.StepResponse.FromString(self.workers[rank].step(requests[rank]))
            with done:
                responses[rank] = resp
                done.notify_all()

        for r in requests:
            self._run_on(r, functools.partial(main, r))
        deadline = time.monotonic() + self.timeout + 10.0
        with done:
            while len(responses) < len(requests):
                if any(r.error_type for r in responses.values()):
                    # a rank failed or stalled: stop the others now; whoever has not answered
                    # within a second is reported as what it was doing
                    for q in requests:
                        if q not in responses:
                            self.workers[q].abort("aborted: another rank failed")
                    done.wait_for(lambda: len(responses) == len(requests), 1.0)
                    break
                if not done.wait(max(0.0, min(0.5, deadline - time.monotonic()))) and time.monotonic() > deadline:
                    break
        doing = {q: w.current() for q, w in self.workers.items()}
        missing = sorted(set(requests) - set(responses))
        err = failure(responses, doing=doing)
        if err is None and missing:
            err = RankFailed(missing[0], f"ranks {missing} did not finish within {self.timeout + 10:g} s",
                             doing.get(missing[0], ""))
        if err is not None:
            self._broken()
            raise err
        return responses

    def _broken(self) -> None:
        """After a failure the transport's mailboxes may hold stale messages: start afresh."""
        self.shutdown()

    def shutdown(self) -> None:
        for w in self.workers.values():
            w.close()
        if self.workers:
            share_cores(1)
        for q in self._threads.values():
            q.put(None)  # an idle rank thread ends; one stuck in a failed step is abandoned
        self.workers, self.hub, self._threads = {}, None, {}
        super().shutdown()


# -------------------------------------------------------------------------------------- ray
class RayBackend(Backend):
    """One Ray actor per device, spread over the nodes; gRPC between them (see the module doc).

    ``address``: a running cluster to join (``"auto"``, ``"ray://..."``, ``"host:port"``); None
    joins the cluster this process is already connected to, or starts a local one.
    ``shared_memory``: ranks on the same host pass tensors through shared memory (the gRPC
    call carries only the header); False sends every byte over gRPC streams.
    ``tls``: the driver makes one certificate and key for the job (``comm.grpc_transport.make_tls``)
    and every rank's transport, the driver's too, runs mutual TLS with it. The key reaches the
    workers as an argument of their Ray constructor, as the job's secret does: TLS protects the
    data plane when Ray's own channel is protected (Ray's TLS or token authentication).
    """

    name = "ray"

    def __init__(self, address: str | None = None, timeout: float = 30.0,
                 shared_memory: bool = True, tls: bool = False, **init_kwargs: Any):
        super().__init__(timeout)
        import ray  # noqa: PLC0415

        from comm.grpc_transport import make_tls  # noqa: PLC0415

        if not ray.is_initialized():
            init_kwargs.setdefault("include_dashboard", False)
            init_kwargs.setdefault("log_to_driver", False)
            ray.init(address=address, **init_kwargs)
        self.ray = ray
        self.shared_memory = shared_memory
        self.secret = secrets.token_hex(16)
        self.tls = make_tls() if tls else None  # one per job, as the secret
        self.workers: list = []
        self.pg = None
        self.driver = None
        self.nccl = False  # the workers hold NCCL communicators (built for the first cuda plan)

    def _ensure(self, world: int) -> None:
        if self.workers and world <= self.world:
            return
        self.shutdown()
        ray = self.ray
        from ray.util.placement_group import placement_group  # noqa: PLC0415
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: PLC0415

        from comm.grpc_transport import GrpcCommunicator  # noqa: PLC0415

        bundle = {"CPU": 0.01}
        if "flowsys_device" in ray.cluster_resources():  # declared by `flowsys launch` and cluster_configs/
            bundle["flowsys_device"] = 1
        bundles = [dict(bundle) for _ in range(world)]
        self.pg = placement_group(bundles, strategy="SPREAD")
        try:
            ray.get(self.pg.ready(), timeout=max(30.0, self.timeout))
        except Exception as e:  # noqa: BLE001
            raise RankFailed(0, f"could not place {world} workers on the Ray cluster "
                                f"({len(ray.nodes())} nodes): {e}") from e
        cls = ray.remote(RayWorker)
        faults = {k: v for k, v in os.environ.items() if k in ("FLOWSYS_FAULT", "FLOWSYS_FAULT_MARK")}
        self.world = world
        self.workers = [
            cls.options(num_cpus=0.01, resources={k: v for k, v in bundle.items() if k != "CPU"},
                        max_concurrency=2, max_restarts=0, name=None,
                        # the driver's fault-injection settings reach the workers (tests)
                        runtime_env={"env_vars": faults} if faults else None,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r))
            .remote(r, world + 1, self.secret, self.timeout, self.shared_memory,
                    *((self.tls.cert_pem, self.tls.key_pem) if self.tls is not None else ()))
            for r in range(world)]
        host = ray.util.get_node_ip_address()
        self.driver = GrpcCommunicator(world, world + 1, self.secret, host=host, timeout=self.timeout,
                                       shared_memory=self.shared_memory, tls=self.tls)
        addresses = self._get([w.address.remote() for w in self.workers], "start") + [self.driver.address]
        self._get([w.connect.remote(addresses) for w in self.workers], "connect")
        self.driver.connect(addresses)
        self.info = self._get([w.info.remote() for w in self.workers], "start")
        per_host = Counter(i["host"] for i in self.info)  # simulated nodes share one machine's cores
        self._get([w.share_cores.remote(per_host[i["host"]]) for w, i in zip(self.workers, self.info)], "start")

    def _get(self, refs: list, what: str) -> list:
        try:
            return self.ray.get(refs, timeout=max(60.0, self.timeout))
        except Exception as e:  # noqa: BLE001 - reported by rank where we can tell
            self.shutdown()
            raise RankFailed(0, f"Ray workers failed to {what}: {type(e).__name__}: {e}") from e

    def _load(self, rank: int, key: str, plan: bytes) -> None:
        self._get([self.workers[rank].load.remote(key, plan)], "load their plans")

    def _call_all(self, method: str, *args, per_rank: dict | None = None) -> dict:
        """Every worker's result; a worker that died is a ``RankFailed`` naming its rank (the
        workers are then shut down, so the next step starts fresh ones), and an error a worker
        raised is raised here as itself (a corrupt checkpoint stays a ``CheckpointCorrupt``)."""
        ray = self.ray
        refs = {r: getattr(w, method).remote(*((per_rank[r],) if per_rank is not None else ()), *args)
                for r, w in enumerate(self.workers)}
        out, deadline = {}, time.monotonic() + max(60.0, self.timeout)
        what = method.replace("_", " ")
        for r, ref in refs.items():
            try:
                out[r] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.RayTaskError as e:  # the worker raised: its own error
                cause = e.cause if getattr(e, "cause", None) is not None else e
                if isinstance(cause, ray.exceptions.RayActorError):
                    self.shutdown()
                    raise RankFailed(r, f"the worker died while running {what}: {cause}") from e
                raise cause from None
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                self.shutdown()
                raise RankFailed(r, f"the worker {'died' if isinstance(e, ray.exceptions.RayActorError) else 'hung'} "
                                    f"while running {what}: {type(e).__name__}: {e}") from e
        return out

    def pids(self) -> dict[int, int]:
        return {i["rank"]: i["pid"] for i in self.info}

    def nodes(self) -> dict[int, str]:
        return {i["rank"]: i["node"] for i in self.info}

    def _dispatch(self, requests: dict[int, bytes]) -> dict[int, plan_pb2.StepResponse]:
        ray = self.ray
        refs = {self.workers[r].step.remote(req): r for r, req in requests.items()}
        responses: dict[int, plan_pb2.StepResponse] = {}
        dead: dict[int, str] = {}
        pending = list(refs)
        deadline = time.monotonic() + self.timeout + 10.0
        stop_at = None
        while pending and time.monotonic() < (stop_at or deadline):
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.1)
            self._statuses(self.driver.mailbox)  # taken as they come: the mailbox stays bounded in a long step
            for ref in ready:
                rank = refs[ref]
                try:
                    responses[rank] = plan_pb2.StepResponse.FromString(ray.get(ref))
                except ray.exceptions.RayActorError as e:
                    pid = self.pids().get(rank)
                    dead[rank] = f"its worker process (pid {pid}) died ({type(e).__name__})"
            if stop_at is None and (dead or any(r.error_type for r in responses.values())):
                # a rank failed, died or stalled: stop the others now; whoever has not answered
                # within a second is reported as what it was doing
                for ref in pending:
                    self.workers[refs[ref]].abort.remote("aborted: another rank failed")
                stop_at = time.monotonic() + 1.0
        doing = self._statuses(self.driver.mailbox)
        missing = sorted(refs[r] for r in pending)
        err = failure(responses, dead, doing)
        if err is None and missing:
            err = RankFailed(missing[0], f"ranks {missing} did not finish within {self.timeout + 10:g} s",
                             doing.get(missing[0], ""))
        if err is not None:
            self.shutdown()  # the next step starts fresh workers
            raise err
        return responses

    def shutdown(self) -> None:
        ray = self.ray
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.pg is not None:
            try:
                ray.util.remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
        if self.driver is not None:
            self.driver.close()
        self.workers, self.pg, self.driver = [], None, None
        self.nccl = False
        self._last_status = {}
        super().shutdown()

    def wants_order(self, plan) -> bool:
        wants = super().wants_order(plan)
        if wants and not self.nccl:  # rank 0 draws the id (the driver may have no GPU); all join at once
            [uid] = self._get([self.workers[0].nccl_id.remote()], "draw an NCCL id")
            self._get([w.connect_nccl.remote(uid, self.world) for w in self.workers], "build their NCCL communicators")
            self.nccl = True
        return wants


class RayWorker:
    """The Ray actor around a :class:`Worker`: its gRPC endpoint on the node's address."""

    def __init__(self, rank: int, world_size: int, secret: str, timeout: float, shared_memory: bool,
                 tls_cert: bytes | None = None, tls_key: bytes | None = None):
        import ray  # noqa: PLC0415

        from comm.grpc_transport import GrpcCommunicator, TlsConfig  # noqa: PLC0415

        self.node = ray.get_runtime_context().get_node_id()
        self.host = ray.util.get_node_ip_address()
        tls = TlsConfig(tls_cert, tls_key) if tls_cert is not None else None  # the job's, made by the driver
        comm = GrpcCommunicator(rank, world_size, secret, host=ray.util.get_node_ip_address(), timeout=timeout,
                                shared_memory=shared_memory, tls=tls)
        self.worker = Worker(rank, comm, timeout)
        self.worker.own_process = True

    def address(self) -> str:
        return self.worker.comm.address

    def nccl_id(self) -> bytes:
        from comm.nccl import nccl_unique_id  # noqa: PLC0415

        return nccl_unique_id()

    def connect_nccl(self, unique_id: bytes, world: int) -> None:
        """This rank's NCCL communicator over the ``world`` device ranks (returns once all joined):
        the plans that fix an NCCL order run on it, control stays on gRPC."""
        from comm.nccl import NcclCommunicator  # noqa: PLC0415

        self.worker.ordered = NcclCommunicator(self.worker.rank, world, unique_id, timeout=self.worker.timeout)

    def connect(self, addresses: list[str]) -> None:
        self.worker.comm.connect(addresses)

    def info(self) -> dict:
        return {**self.worker.info(), "node": self.node, "host": self.host}

    def share_cores(self, ranks_on_host: int) -> int:
        return share_cores(ranks_on_host)

    def load(self, key: str, plan: bytes) -> None:
        self.worker.load(key, plan)

    def step(self, request: bytes) -> bytes:
        return self.worker.step(request)

    def abort(self, reason: str) -> None:
        self.worker.abort(reason)

    def get_state(self, keys: list[str]) -> bytes:
        return self.worker.get_state(keys)

    def get_params(self, keys: list[str]) -> bytes:
        return self.worker.get_params(keys)

    def set_state(self, dump: bytes, keys: list[str]) -> None:
        self.worker.set_state(dump, keys)

    def describe_state(self, keys: list[str]) -> bytes:
        return self.worker.describe_state(keys)

    def sees(self, path: str, token: str) -> bool:
        return self.worker.sees(path, token)

    def check_data(self, spec: str) -> str:
        return self.worker.check_data(spec)

    def save_shards(self, entries: bytes, directory: str) -> bytes:
        return self.worker.save_shards(entries, directory)

    def load_shards(self, entries: bytes, directory: str) -> bytes:
        return self.worker.load_shards(entries, directory)

